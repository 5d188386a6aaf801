"""Speed of one S2-BNN distillation step on CPU: this library's step vs a straightforward one.

The step: a ReActNet-A student (binary activations and weights) with a 2-layer MLP head, and a
frozen real-valued ResNet-50 teacher with MoCo v2's MLP head run under ``no_grad``; both 128-d
outputs are L2-normalised and the loss is the soft cross-entropy
``-sum softmax(t / tau) * log_softmax(s / tau)`` with tau = 0.2; Adam updates the student.
Default: 128 px, batch 16, 2 threads.

Variants, each adding one thing to the one above it:

1. straightforward: the quantizers of ``tests/reference_ops.py`` (sign STE as masked element-wise
   ops, weight scale recomputed with separate ops, RPReLU as a chain of ops) and the teacher as
   torchvision lays it out (NCHW, fp32);
2. fused quantizers and RPReLU (:mod:`s2bnn.nn.quantizers`, one autograd node each);
3. the teacher as :class:`s2bnn.teachers.Teacher` runs it: channels-last (the library default);
4. ``method.teacher.precision=bf16``: the frozen teacher in bf16 (where the CPU has bf16);
5. ``precision=bf16``: the whole step under bf16 autocast;
6. RSign and RPReLU on the compiled CPU kernels (:mod:`s2bnn.nn._kernels`; variants 1-5 run
   them as torch ops).

Timings are interleaved (one step of each variant per round, several rounds) so that a machine
whose speed drifts affects every variant alike; each speed-up is the median of per-round ratios.
``--profile`` adds the share of convolutions in variants 1 and 3 (torch.profiler, one step).

    python benchmarks/bench_step.py [--quick] [--rounds 7] [--threads 2] [--image-size 128]
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from s2bnn.losses import soft_cross_entropy
from s2bnn.models import build_model
from s2bnn.nn import _kernels
from s2bnn.runtime import tune_malloc
from s2bnn.teachers import Teacher

# The naive reference quantizers are test code (tests/reference_ops.py), not part of s2bnn.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from reference_ops import use_reference_ops  # noqa: E402
from run_all import interleaved  # noqa: E402

TAU = 0.2
Step = Callable[[], None]


def _mlp(dim_in: int, hidden: int, dim_out: int = 128) -> nn.Module:
    return nn.Sequential(
        nn.Linear(dim_in, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, dim_out)
    )


def _plain_teacher(backbone: nn.Module, head: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    def forward(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return F.normalize(head(backbone(x)), dim=1)

    return forward


def _make_step(
    student: nn.Module,
    teacher: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    bf16: bool = False,
    kernels: bool = False,
) -> Step:
    head = _mlp(student.feature_dim, student.feature_dim)
    opt = torch.optim.Adam([*student.parameters(), *head.parameters()], lr=5e-4)

    def step() -> None:
        ctx = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
        with _kernels.switched(kernels):
            with ctx:
                t = teacher(x)
                s = F.normalize(head(student(x)).float(), dim=1)
                loss = soft_cross_entropy(s, t.float(), TAU)
            opt.zero_grad(set_to_none=True)
            loss.backward()
        opt.step()

    return step


def _conv_share(step: Step) -> float:
    """Fraction of one step's CPU time spent in convolution ops (forward and backward)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    conv = sum(e.self_cpu_time_total for e in events if "convolution" in e.key)
    return conv / total if total else 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one timed round (a smoke run)")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--profile", action="store_true", help="also print the convolution share")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    tuned = tune_malloc()
    rounds = 1 if args.quick else args.rounds
    torch.manual_seed(0)
    x = torch.randn(args.batch, 3, args.image_size, args.image_size)

    t_backbone = build_model("resnet50", num_classes=0)
    t_head = _mlp(t_backbone.feature_dim, t_backbone.feature_dim)
    t_backbone.eval().requires_grad_(False)
    t_head.eval().requires_grad_(False)
    plain_teacher = _plain_teacher(t_backbone, t_head)
    # Copies: Teacher() makes its backbone channels-last, which must not reach variant 1.
    fast_backbone = build_model("resnet50", num_classes=0)
    fast_backbone.load_state_dict(t_backbone.state_dict())
    teacher_fp32 = Teacher(fast_backbone, t_head, "resnet50", precision="fp32")
    teacher_bf16 = Teacher(fast_backbone, t_head, "resnet50", precision="bf16")
    teacher_auto = Teacher(fast_backbone, t_head, "resnet50", precision="auto")

    first = build_model("reactnet_a")

    def student(reference: bool = False) -> nn.Module:
        model = build_model("reactnet_a")
        model.load_state_dict(first.state_dict())
        return use_reference_ops(model) if reference else model

    bf16_ok = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    variants: dict[str, Step] = {
        "1 straightforward": _make_step(student(reference=True), plain_teacher, x),
        "2 + fused quantizers": _make_step(student(), plain_teacher, x),
        "3 + channels-last teacher": _make_step(student(), teacher_fp32, x),
    }
    if bf16_ok:
        variants["4 + bf16 teacher"] = _make_step(student(), teacher_bf16, x)
        variants["5 + bf16 step"] = _make_step(student(), teacher_auto, x, bf16=True)
    if _kernels.library() is not None:
        variants["6 + RSign/RPReLU kernels"] = _make_step(
            student(), teacher_auto if bf16_ok else teacher_fp32, x, bf16=bf16_ok, kernels=True)

    def timed_teacher(teacher: Callable[[torch.Tensor], torch.Tensor]) -> Step:
        return lambda: teacher(x)

    teacher_only = {"1": timed_teacher(plain_teacher), "3": timed_teacher(teacher_fp32)}
    if bf16_ok:
        teacher_only["4"] = timed_teacher(teacher_bf16)

    every = {**variants, **{f"teacher {k}": v for k, v in teacher_only.items()}}
    times = interleaved(every, rounds)

    base = times["1 straightforward"]
    print(
        f"S2-BNN step: ReActNet-A student + ResNet-50 teacher, {args.image_size} px, "
        f"batch {args.batch}, threads={args.threads}, malloc_tuned={tuned}, "
        f"bf16 on this CPU: {bf16_ok}, rounds={rounds}"
    )
    print(f"{'variant':<36} {'s/step':>7} {'img/s':>7} {'vs 1':>6} {'teacher share':>14}")
    for name in variants:
        sec = statistics.median(times[name])
        ratio = statistics.median(b / t for b, t in zip(base, times[name]))
        key = "teacher " + {"1": "1", "2": "1"}.get(name[0], "4" if name[0] in "456" else "3")
        share = statistics.median(times[key]) / sec if key in times else float("nan")
        print(f"{name:<36} {sec:>7.3f} {args.batch / sec:>7.1f} {ratio:>5.2f}x {share:>13.0%}")
    for k, name in (("1", "NCHW fp32"), ("3", "channels-last fp32"), ("4", "channels-last bf16")):
        if f"teacher {k}" in times:
            sec = statistics.median(times[f"teacher {k}"])
            print(f"{'teacher forward, ' + name:<36} {sec:>7.3f} {args.batch / sec:>7.1f}")
    print("target: >= 1.6x the straightforward step's images/s")
    if args.profile:
        for name in ("1 straightforward", "3 + channels-last teacher"):
            print(f"convolution share of step {name}: {_conv_share(variants[name]):.0%}")


if __name__ == "__main__":
    main()
