"""Images/s of the data loader alone (no model), per augmentation preset and worker count.

    .venv/bin/python benchmarks/bench_loader.py [--batches 20] [--workers 0 1 2]

Times a DataLoader (batch 256, 2 views per image) over Fashion-MNIST (in-memory uint8 tensors,
torchvision v2 transforms per sample) and over a tiny generated ImageFolder tree (PNG files
decoded with PIL on every access). Rows "batched" load uint8 batches and augment them in the main
process with ``build_batch_train_transform`` (whole-batch ops). The first batch is not timed
(worker start-up); batches are drawn with replacement so a small tree never runs dry. Training
steps here run at ~1,000-2,000 img/s, so a preset whose loader gives less than that on the
workers you can spare will starve the model.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, RandomSampler

from s2bnn.data import (
    build_batch_train_transform,
    build_dataset,
    build_train_transform,
    dataset_stats,
    default_image_size,
)
from s2bnn.errors import DataError


def make_tree(root: Path, classes: int = 10, per_class: int = 60, size: int = 32) -> Path:
    """A small RGB ImageFolder tree of random PNGs (train/ only is timed; val/ for completeness)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in (("train", per_class), ("val", 2)):
        for c in range(classes):
            d = root / split / f"c{c}"
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(d / f"{i}.png")
    return root


def measure(dataset, workers: int, batch_size: int, batches: int, batch_aug=None) -> float:
    sampler = RandomSampler(dataset, replacement=True, num_samples=(batches + 1) * batch_size)
    loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers,
                        drop_last=True, persistent_workers=False)
    it = iter(loader)
    next(it)  # worker start-up and first-touch costs are not what we measure
    n, start = 0, time.perf_counter()
    for _ in range(batches):
        try:
            views, _ = next(it)
        except StopIteration:
            break
        if batch_aug is not None:
            views = batch_aug(views)
        n += views[0].shape[0]
    elapsed = time.perf_counter() - start
    del it
    return n / elapsed if elapsed > 0 else float("nan")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=20, help="timed batches per row")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--num-views", type=int, default=2)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--presets", nargs="+", default=["mocov2", "s2bnn_lite", "multicrop",
                                                         "eval"])
    parser.add_argument("--datasets", nargs="+", default=["fashion-mnist", "folder"])
    parser.add_argument("--no-batched", action="store_true", help="skip the batched rows")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads of the main process (default: torch's choice)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.datasets:
            if name == "folder":
                name = str(make_tree(Path(tmp) / "tree"))
                label = "imagefolder 32px RGB png"
            else:
                label = name
            try:
                probe = build_dataset(name, "train")
            except DataError as err:
                print(f"skipping {name}: {err}", file=sys.stderr)
                continue
            size, chans = default_image_size(name), probe.in_chans
            mean, std = dataset_stats(name)
            for preset in args.presets:
                tf = build_train_transform(preset, size, chans, num_views=args.num_views,
                                           mean=mean, std=std)
                dataset = build_dataset(name, "train", transform=tf)
                for workers in args.workers:
                    ips = measure(dataset, workers, args.batch_size, args.batches)
                    rows.append((label, f"{chans}x{size}x{size}", preset, workers, ips))
                    print(f"  {label:<26} {preset:<11} workers={workers}: {ips:8.0f} img/s",
                          file=sys.stderr, flush=True)
                if args.no_batched or label != name:
                    continue  # batched augmentation needs one image size: in-memory sets only
                aug = build_batch_train_transform(preset, size, chans, num_views=args.num_views,
                                                  mean=mean, std=std)
                ips = measure(probe, 0, args.batch_size, args.batches, batch_aug=aug)
                rows.append((label, f"{chans}x{size}x{size}", f"{preset} batched", 0, ips))
                print(f"  {label:<26} {preset:<11} batched:   {ips:8.0f} img/s",
                      file=sys.stderr, flush=True)

    print(f"\nDataLoader alone, batch {args.batch_size}, {args.num_views} views per image, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads\n")
    print("| dataset | image | preset | workers | img/s |")
    print("|---|---|---|---:|---:|")
    for label, shape, preset, workers, ips in rows:
        print(f"| {label} | {shape} | {preset} | {workers} | {ips:,.0f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
