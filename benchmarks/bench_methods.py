"""Images/s of one training step for the three strategies of S2-BNN, and the teacher's share.

    python benchmarks/bench_methods.py            # Fashion-MNIST size: 28x28x1, batch 256
    python benchmarks/bench_methods.py --quick    # fewer timed steps
    python benchmarks/bench_methods.py --preset imagenet --image-size 128 --batch-size 16

Strategies: 1 = ``mocov2`` on the student, 2 = ``s2bnn`` with ``contrastive_weight=1``,
3 = ``s2bnn`` (distillation only). A step is forward + backward + Adam step + the method's
end-of-step bookkeeping, on ``--views`` augmented views per image (random tensors; the data
pipeline is not timed). Images/s counts images, not views. Weights are random: speed does not
depend on them. The teacher's share is the time of its forward pass (no grad, eval mode) on the
step's views divided by the strategy-3 step time; "student alone" is forward + backward + Adam
of student + head on the same views with a trivial loss, the floor the distillation step can
approach.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from s2bnn.checkpoint import save_checkpoint
from s2bnn.config import MethodConfig, TeacherConfig
from s2bnn.methods import build_method
from s2bnn.methods.base import mlp_head
from s2bnn.models import build_model

PRESETS = {
    # student, teacher, image size, in_chans, batch
    "fmnist": ("reactnet_small", "resnet_small", 28, 1, 256),
    "imagenet": ("reactnet_a", "resnet50", 224, 3, 256),
}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(fn: Callable[[], None], warmup: int, steps: int, device: torch.device) -> float:
    """Median seconds per call of ``fn`` after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def _write_teacher(arch: str, in_chans: int, proj_dim: int, path: Path) -> None:
    """A random teacher in this project's checkpoint layout (backbone + ``head.*``)."""
    kwargs = {"in_chans": in_chans}
    backbone = build_model(arch, num_classes=0, **kwargs)
    feat = int(backbone.feature_dim)
    head = mlp_head(feat, feat, proj_dim)
    save_checkpoint({
        "format": "s2bnn", "version": 1, "config": {}, "epoch": 0, "step": 0,
        "backbone": {"name": arch, "kwargs": kwargs, "state_dict": backbone.state_dict()},
        "method": {f"head.{k}": v for k, v in head.state_dict().items()},
    }, path)


def main(argv: list[str] | None = None) -> dict[str, float]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), default="fmnist")
    ap.add_argument("--image-size", type=int, default=None)
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--views", type=int, default=2)
    ap.add_argument("--steps", type=int, default=8, help="timed steps per measurement")
    ap.add_argument("--quick", action="store_true", help="3 timed steps, 1 warm-up")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--bf16", action="store_true", help="bf16 autocast (GPUs that support it)")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    student_arch, teacher_arch, size, in_chans, batch = PRESETS[args.preset]
    size = args.image_size or size
    batch = args.batch_size or batch
    steps, warmup = (3, 1) if args.quick else (args.steps, 2)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available()
                          else "cpu" if args.device == "auto" else args.device)
    autocast = torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=args.bf16)
    torch.manual_seed(0)
    views = [torch.randn(batch, in_chans, size, size, device=device) for _ in range(args.views)]
    results: dict[str, float] = {}

    with tempfile.TemporaryDirectory() as tmp:
        teacher_path = Path(tmp) / "teacher.pt"
        _write_teacher(teacher_arch, in_chans, 128, teacher_path)
        teacher_cfg = TeacherConfig(path=str(teacher_path), arch=teacher_arch)
        strategies = {
            "1 mocov2": MethodConfig(name="mocov2"),
            "2 s2bnn+contrastive": MethodConfig(name="s2bnn", contrastive_weight=1.0,
                                                teacher=teacher_cfg),
            "3 s2bnn": MethodConfig(name="s2bnn", teacher=teacher_cfg),
        }
        method = None
        for label, cfg in strategies.items():
            student = build_model(student_arch, num_classes=0, in_chans=in_chans)
            method = build_method(cfg, student, num_train=65536, total_steps=1000,
                                  in_chans=in_chans).to(device).train()
            opt = torch.optim.Adam([p for p in method.parameters() if p.requires_grad], lr=1e-4)

            def step(method=method, opt=opt) -> None:  # type: ignore[no-untyped-def]
                with autocast:
                    loss, _ = method(views)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                method.on_train_step_end(1, 1000)

            results[label] = batch / _time(step, warmup, steps, device)

        # Strategy 3's parts: the teacher's forward, and the student alone.
        assert method is not None and method.teacher is not None
        teacher = method.teacher

        def teacher_only() -> None:
            with torch.no_grad(), autocast:
                teacher(torch.cat(views))

        t_teacher = _time(teacher_only, warmup, steps, device)
        student_opt = torch.optim.Adam(
            list(method.backbone.parameters()) + list(method.head.parameters()), lr=1e-4)

        def student_only() -> None:
            with autocast:
                loss = sum(F.normalize(method.head(method.backbone(v)), dim=1).square().mean()
                           for v in views)
            student_opt.zero_grad(set_to_none=True)
            loss.backward()
            student_opt.step()

        t_student = _time(student_only, warmup, steps, device)
    t_step3 = batch / results["3 s2bnn"]
    results["teacher_share_of_step3"] = t_teacher / t_step3
    results["student_alone"] = batch / t_student
    results["step3_over_student_alone"] = t_step3 / t_student

    if args.json:
        print(json.dumps(results, indent=2))
        return results
    print(f"{args.preset}: student {student_arch}, teacher {teacher_arch}, "
          f"{in_chans}x{size}x{size}, batch {batch}, {args.views} views, {device}"
          f"{' bf16' if args.bf16 else ''}, "
          f"{torch.get_num_threads()} threads, median of {steps} steps")
    for label in strategies:
        print(f"  strategy {label:<22} {results[label]:9.1f} images/s")
    print(f"  student alone (fwd+bwd+Adam)   {results['student_alone']:9.1f} images/s")
    print(f"  teacher share of strategy 3    {100 * results['teacher_share_of_step3']:8.1f} %")
    print(f"  strategy 3 / student alone     {results['step3_over_student_alone']:9.2f} x time")
    return results


if __name__ == "__main__":
    main()
