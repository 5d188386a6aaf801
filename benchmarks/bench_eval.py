"""Seconds of the fast linear-probe LR sweep, and the raw-pixel baseline on Fashion-MNIST.

    .venv/bin/python benchmarks/bench_eval.py [--epochs 10] [--no-pixels] [--sweep-threads N]

1. The sweep alone on Fashion-MNIST-sized cached features (60,000 x 256 train, 10,000 test,
   10 classes; Gaussian class clusters, so the accuracy printed is meaningless, the time is
   the point): 8 SGD + 7 Adam heads trained together, LR chosen on a held-out 10 %.
2. The raw-pixel baseline (flattened 28x28 images, kNN k 200 T 0.1 and the same sweep) on the
   real Fashion-MNIST when its idx files are found: the row every self-supervised run must beat.
3. The demo's probe on a 4,000-image set's raw pixels (the first 4,000 Fashion-MNIST training
   images against its test split; 30 epochs, the LR chosen by 5-fold cross-validation as on a
   small folder) with denormal floats flushed to zero while the heads train (the default) and
   without, in alternating rounds, and whether the two give the same accuracies.
4. Feature extraction of the demo's binary student (``reactnet_compact`` at 28 px, 10,000
   images, batch 256; random weights with BatchNorm statistics from a few training batches):
   the fake-quantised PyTorch module against the packed 1-bit runtime the demo evaluates with
   (``s2bnn.demo.packed_forward``), timed in alternating rounds, and how many images' features
   the two disagree on (a bit flipped by float rounding at a sign threshold).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from s2bnn.errors import DataError
from s2bnn.eval.baselines import evaluate_pixels
from s2bnn.eval.knn import knn_eval
from s2bnn.eval.linear_sweep import fast_linear_sweep


def synthetic_features(n: int, d: int, c: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    centres = torch.randn(c, d, generator=torch.Generator().manual_seed(0))
    y = torch.randint(0, c, (n,), generator=gen)
    return 0.3 * centres[y] + torch.randn(n, d, generator=gen), y


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--no-pixels", action="store_true", help="skip the Fashion-MNIST part")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of the feature timing")
    parser.add_argument("--denormal-rounds", type=int, default=2,
                        help="rounds of the flushed / not flushed probe timing (0: skip)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--sweep-threads", type=int, default=1,
                        help="threads of the sweep's heads (0: torch's setting)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads "
          f"(sweep heads: {args.sweep_threads or torch.get_num_threads()})")

    x, y = synthetic_features(60_000, 256, 10, seed=1)
    xt, yt = synthetic_features(10_000, 256, 10, seed=2)
    t0 = time.perf_counter()
    knn_eval(x, y, xt, yt, k=200, temperature=0.1)
    t_knn = time.perf_counter() - t0
    sweep_threads = args.sweep_threads or None
    res = fast_linear_sweep(x, y, xt, yt, epochs=args.epochs, batch_size=args.batch_size,
                            num_threads=sweep_threads)
    heads = len(res["sgd"]["lrs"]) + len(res["adam"]["lrs"])
    print("\ncached features 60,000 x 256 -> 10 classes")
    print(f"  kNN (k 200, 10,000 queries)      {t_knn:6.2f} s")
    print(f"  fast sweep ({heads} heads, {args.epochs} epochs)  {res['seconds']:6.2f} s  "
          f"(SGD lr {res['sgd']['best_lr']:g}, Adam lr {res['adam']['best_lr']:g})")

    feature_extraction(args.rounds)
    if args.no_pixels:
        return
    try:
        from s2bnn.data import build_dataset

        train = build_dataset("fashion-mnist", "train")
        test = build_dataset("fashion-mnist", "test")
    except DataError as err:
        print(f"\nraw-pixel baseline skipped: {err}")
        return
    if args.denormal_rounds:
        denormals(train, test, args.denormal_rounds)
    t0 = time.perf_counter()
    pix = evaluate_pixels(train, test, device="cpu",
                          sweep_kwargs={"epochs": args.epochs, "batch_size": args.batch_size,
                                        "num_threads": sweep_threads})
    total = time.perf_counter() - t0
    lin = pix["linear"]
    print("\nraw pixels, Fashion-MNIST (60,000 x 784)")
    print(f"  kNN top-1                 {pix['knn_top1']:6.2f}")
    print(f"  linear top-1 SGD          {lin['sgd']['top1']:6.2f}  (lr {lin['sgd']['best_lr']:g})")
    print(f"  linear top-1 Adam         {lin['adam']['top1']:6.2f}  "
          f"(lr {lin['adam']['best_lr']:g})")
    print(f"  time (kNN + sweep)        {total:6.2f} s  (sweep {lin['seconds']:.2f} s)")


def denormals(train, test, rounds: int, n: int = 4000) -> None:
    """The probe's seconds with denormals flushed (the default) and not, on ``n`` images."""
    from s2bnn.eval.baselines import _pixels
    from s2bnn.eval.features import standardize

    x, y = _pixels(train, 1024)
    xt, yt = _pixels(test, 1024)
    x, xt = standardize(x[:n], xt)
    y = y[:n]
    times: dict[bool, list[float]] = {True: [], False: []}
    top1: dict[bool, tuple[float, float]] = {}
    for _ in range(rounds):
        for flush in (False, True):
            res = fast_linear_sweep(x, y, xt, yt, flush_denormals=flush)
            times[flush].append(res["seconds"])
            top1[flush] = (res["linear_top1_sgd"], res["linear_top1_adam"])
    off, on = (statistics.median(times[f]) for f in (False, True))
    print(f"\nlinear probe on raw pixels, {n:,} x 784 (5-fold LR choice, 30 epochs), "
          f"median of {rounds} rounds")
    print(f"  denormals kept            {off:6.2f} s  (SGD / Adam top-1 {top1[False][0]:.2f} / "
          f"{top1[False][1]:.2f})")
    print(f"  denormals flushed         {on:6.2f} s  (SGD / Adam top-1 {top1[True][0]:.2f} / "
          f"{top1[True][1]:.2f}; {off / on:.1f}x)")


def feature_extraction(rounds: int, n: int = 10_000, batch: int = 256) -> None:
    """Seconds to extract the demo student's features: the module against the packed runtime."""
    from s2bnn.demo import DemoConfig, packed_forward
    from s2bnn.models import build_model

    torch.manual_seed(0)
    model = build_model(DemoConfig().student_model, num_classes=0, in_chans=1,
                        binary_act=True, binary_weight=True)
    with torch.no_grad():
        for _ in range(3):  # running statistics away from the identity, as after training
            model(torch.randn(128, 1, 28, 28))
    model.eval()
    x = torch.randn(n, 1, 28, 28)
    packed = packed_forward(model, x[:64], device="cpu")
    if packed is None:
        print("\nfeature extraction: no packed runtime here (no compiled kernels)")
        return

    def run(fn):
        t0 = time.perf_counter()
        with torch.no_grad():
            out = torch.cat([fn(c) for c in x.split(batch)])
        return out, time.perf_counter() - t0

    times: dict[str, list[float]] = {"module": [], "packed": []}
    for _ in range(rounds):
        ref, t = run(model)
        times["module"].append(t)
        got, t = run(packed)
        times["packed"].append(t)
    err = (got - ref).norm(dim=1) / ref.norm(dim=1).clamp_min(1e-12)
    tm, tp = (statistics.median(times[k]) for k in ("module", "packed"))
    print(f"\nfeature extraction, {DemoConfig().student_model} at 28 px, {n:,} images, "
          f"batch {batch}, {torch.get_num_threads()} threads (median of {rounds} rounds)")
    print(f"  fake-quantised module     {tm:6.2f} s")
    print(f"  packed 1-bit runtime      {tp:6.2f} s  ({tm / tp:.1f}x)")
    print(f"  images whose features differ by > 1e-4 relative: {int((err > 1e-4).sum())} "
          f"of {n:,}")


if __name__ == "__main__":
    main()
