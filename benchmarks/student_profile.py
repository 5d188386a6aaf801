"""Where a binary student's training step spends its time, by feature-map size (study round 4).

    python benchmarks/student_profile.py [--models reactnet_small reactnet_compact]
                                         [--batch 128] [--size 28] [--steps 5] [--threads 2]

For each model: torch.profiler over ``--steps`` training steps (the S2-BNN student's: backbone,
MLP head, soft cross-entropy against fixed unit-vector targets, Adam), then the share of the
step spent in convolution backward, and how the convolutions' time (forward and backward) splits
by the spatial size of their input map. Random weights and inputs: time does not depend on them.
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict

import torch
import torch.nn.functional as F
from torch.profiler import profile

from s2bnn.losses import soft_cross_entropy
from s2bnn.methods.base import mlp_head
from s2bnn.models import build_model

CONV_OPS = ("aten::convolution_backward", "aten::mkldnn_convolution", "aten::convolution")


def profile_student(name: str, batch: int, size: int, steps: int) -> dict[str, object]:
    """Profile ``steps`` student training steps of model ``name``; shares of the step's time."""
    torch.manual_seed(0)
    net = build_model(name, num_classes=0, in_chans=1)
    head = mlp_head(net.feature_dim, net.feature_dim, 128)
    opt = torch.optim.Adam([*net.parameters(), *head.parameters()], 3e-3)
    x = torch.randn(batch, 1, size, size)
    target = F.normalize(torch.randn(batch, 128), dim=1)

    def step() -> None:
        loss = soft_cross_entropy(F.normalize(head(net(x)), dim=1), target, 0.2)
        opt.zero_grad()
        loss.backward()
        opt.step()

    for _ in range(2):  # warm-up: oneDNN primitives are created on first use
        step()
    t0 = time.perf_counter()
    with profile(record_shapes=True) as prof:
        for _ in range(steps):
            step()
    wall = (time.perf_counter() - t0) / steps
    total = sum(e.self_cpu_time_total for e in prof.key_averages())
    by_map: dict[str, float] = defaultdict(float)
    backward = 0.0
    for e in prof.key_averages(group_by_input_shape=True):
        if e.key not in CONV_OPS or not e.input_shapes or not e.input_shapes[0]:
            continue
        shape = e.input_shapes[0]  # backward: grad_output; forward: input
        if e.key == "aten::convolution_backward":
            backward += e.self_cpu_time_total
            shape = e.input_shapes[1]  # the conv's input
        by_map[f"{shape[2]}x{shape[3]}"] += e.self_cpu_time_total
    conv = sum(by_map.values())
    return {"model": name, "ms_per_step": 1000 * wall,
            "params": sum(p.numel() for p in net.parameters()),
            "conv_backward_share": backward / total, "conv_share": conv / total,
            "conv_by_input_map": {k: v / conv for k, v in sorted(
                by_map.items(), key=lambda kv: -int(kv[0].split("x")[0]))}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["reactnet_small", "reactnet_compact"])
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--size", type=int, default=28)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"batch {args.batch}, {args.size}x{args.size}x1, {args.threads} threads, "
          f"torch {torch.__version__}")
    for name in args.models:
        r = profile_student(name, args.batch, args.size, args.steps)
        maps = ", ".join(f"{k} {v:.0%}" for k, v in r["conv_by_input_map"].items())  # type: ignore
        print(f"{name}: {r['params']:,} params, {r['ms_per_step']:.0f} ms a step (profiled); "
              f"convolutions {r['conv_share']:.0%} of it, their backward "
              f"{r['conv_backward_share']:.0%}; convolution time by input map: {maps}")


if __name__ == "__main__":
    main()
