"""Throughput of the small-image backbones on CPU.

Prints images/s of a training step (forward + backward + SGD update of one view, batch 256,
28x28x1) and of a forward pass (eval mode, no_grad) for ``reactnet_small`` (the paper
comparisons' student; also with the straightforward reference quantizers, for comparison) and
the teacher ``resnet_small``.

    python benchmarks/bench_models.py [--quick] [--threads 2] [--no-tune-malloc]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from s2bnn.models import build_model
from s2bnn.runtime import tune_malloc

# The naive reference quantizers are test code (tests/reference_ops.py), not part of s2bnn.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from reference_ops import use_reference_ops  # noqa: E402


def _rate(fn: Callable[[], None], batch: int, steps: int, repeats: int) -> float:
    """Median images/s over ``repeats`` timings of ``steps`` calls, after two warm-up calls."""
    fn()
    fn()
    rates = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(steps):
            fn()
        rates.append(batch * steps / (time.perf_counter() - t0))
    return statistics.median(rates)


def _bench(name: str, reference: bool, batch: int, steps: int, repeats: int) -> tuple[float, ...]:
    torch.manual_seed(0)
    model = build_model(name, in_chans=1)
    if reference:
        use_reference_ops(model)
    x = torch.randn(batch, 1, 28, 28)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def train_step() -> None:
        opt.zero_grad(set_to_none=True)
        model(x).square().mean().backward()
        opt.step()

    def forward() -> None:
        with torch.no_grad():
            model(x)

    model.train()
    train = _rate(train_step, batch, steps, repeats)
    model.eval()
    fwd = _rate(forward, batch, steps, repeats)
    params = sum(p.numel() for p in model.parameters())
    return params, train, fwd


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer steps (a smoke run)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--no-tune-malloc", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    tuned = False if args.no_tune_malloc else tune_malloc()
    steps, repeats = (2, 1) if args.quick else (8, 3)
    rows = [
        ("reactnet_small", False),
        ("reactnet_small", True),
        ("resnet_small", False),
    ]
    print(f"threads={args.threads} batch={args.batch} input=1x28x28 malloc_tuned={tuned}")
    print(f"{'model':<28} {'params':>10} {'train img/s':>12} {'forward img/s':>14}")
    for name, reference in rows:
        params, train, fwd = _bench(name, reference, args.batch, steps, repeats)
        label = name + (" (reference ops)" if reference else "")
        print(f"{label:<28} {params:>10,} {train:>12,.0f} {fwd:>14,.0f}")


if __name__ == "__main__":
    main()
