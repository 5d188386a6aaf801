"""Speed of one S2-BNN distillation step on CPU: fused vs straightforward quantizers.

The step: a ReActNet-A student (binary activations and weights) with a 2-layer MLP head, and a
frozen real-valued ResNet-50 teacher with MoCo v2's MLP head run under ``no_grad``; both 128-d
outputs are L2-normalised and the loss is the soft cross-entropy
``-sum softmax(t / tau) * log_softmax(s / tau)`` with tau = 0.2; Adam updates the student.
Default: 128 px, batch 16, 2 threads. The same run times the student with the fused quantizers
(and fused RPReLU) and with the reference ones, and the teacher's forward on its own.

    python benchmarks/bench_step.py [--quick] [--threads 2] [--image-size 128] [--batch 16]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from s2bnn.models import build_model
from s2bnn.nn import tune_malloc
from s2bnn.nn.reference import use_reference_ops

TAU = 0.2


def _soft_ce(student: torch.Tensor, teacher: torch.Tensor, tau: float) -> torch.Tensor:
    try:
        from s2bnn.losses import soft_cross_entropy

        return soft_cross_entropy(student, teacher, tau)
    except ImportError:  # losses.py not there yet: the same formula inline
        p_t = F.softmax(teacher / tau, dim=1)
        return -(p_t * F.log_softmax(student / tau, dim=1)).sum(1).mean()


def _mlp(dim_in: int, hidden: int, dim_out: int = 128) -> nn.Module:
    return nn.Sequential(
        nn.Linear(dim_in, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, dim_out)
    )


def _seconds(fn: Callable[[], object], steps: int, repeats: int) -> float:
    """Median seconds per call over ``repeats`` timings of ``steps`` calls, after one warm-up."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(steps):
            fn()
        times.append((time.perf_counter() - t0) / steps)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one timed step each (a smoke run)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--batch", type=int, default=16)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    tuned = tune_malloc()
    steps, repeats = (1, 1) if args.quick else (1, 3)
    torch.manual_seed(0)

    teacher = build_model("resnet50")
    teacher_head = _mlp(teacher.feature_dim, teacher.feature_dim)
    teacher.eval().requires_grad_(False)
    teacher_head.eval().requires_grad_(False)
    x = torch.randn(args.batch, 3, args.image_size, args.image_size)

    def teacher_forward() -> torch.Tensor:
        with torch.no_grad():
            return F.normalize(teacher_head(teacher(x)), dim=1)

    fused = build_model("reactnet_a")
    reference = build_model("reactnet_a")
    reference.load_state_dict(fused.state_dict())
    use_reference_ops(reference)

    def make_step(student: nn.Module) -> Callable[[], None]:
        head = _mlp(student.feature_dim, student.feature_dim)
        opt = torch.optim.Adam([*student.parameters(), *head.parameters()], lr=5e-4)

        def step() -> None:
            t = teacher_forward()
            s = F.normalize(head(student(x)), dim=1)
            loss = _soft_ce(s, t, TAU)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        return step

    t_teacher = _seconds(teacher_forward, steps, repeats)
    t_fused = _seconds(make_step(fused), steps, repeats)
    t_ref = _seconds(make_step(reference), steps, repeats)

    print(
        f"S2-BNN step: ReActNet-A student + ResNet-50 teacher, {args.image_size} px, "
        f"batch {args.batch}, threads={args.threads}, malloc_tuned={tuned}"
    )
    print(f"{'variant':<26} {'s/step':>8} {'img/s':>8} {'teacher share':>14}")
    for name, sec in (("fused quantizers", t_fused), ("reference quantizers", t_ref)):
        print(f"{name:<26} {sec:>8.3f} {args.batch / sec:>8.1f} {t_teacher / sec:>13.0%}")
    print(f"{'teacher forward only':<26} {t_teacher:>8.3f} {args.batch / t_teacher:>8.1f}")
    print(f"speed-up fused / reference: {t_ref / t_fused:.2f}x (target >= 1.6x)")


if __name__ == "__main__":
    main()
