"""Long-run health: memory and open files of a strategy-3 (S2-BNN) training run stay flat.

Trains ``configs/fashion_mnist/s2bnn.yaml`` (binary ReActNet student distilling a frozen
ResNet teacher) for ``--steps`` optimiser steps on the CPU through the real engine (checkpoints
every epoch, metrics.csv, TensorBoard, kNN monitor) and samples, every ``--every`` steps from
the method's ``on_train_step_end`` hook, the process's resident memory (VmRSS), open file
descriptors (/proc/self/fd) and threads. After the warm-up (``--warmup`` steps: allocator pools,
first checkpoint and kNN monitor), the median of the last three samples is compared with the median
of the first three: the run is healthy when both grow by less than 5 %.

The teacher is ``runs/fashion_mnist/teacher_mocov2`` when that run exists, else (or with
``--random-teacher``) a randomly initialised teacher written to the temporary run folder: its
weights do not matter for memory and file handles.

    python benchmarks/bench_health.py                       # ~10-15 min on 2 cores
    python benchmarks/bench_health.py --steps 60 --every 10 --warmup 20   # a quick check
    python benchmarks/bench_health.py --out docs/health.json

Exit status 1 when a figure grows by 5 % or more.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
RECIPE = ROOT / "configs" / "fashion_mnist" / "s2bnn.yaml"
TEACHER_RUN = ROOT / "runs" / "fashion_mnist" / "teacher_mocov2"
LIMIT_PCT = 5.0


def proc_status() -> dict[str, int]:
    """VmRSS (KiB), threads and open file descriptors of this process, from /proc."""
    out: dict[str, int] = {}
    with open("/proc/self/status") as fh:
        for line in fh:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key.lower() + "_kib"] = int(value.split()[0])
            elif key == "Threads":
                out["threads"] = int(value)
    out["fds"] = len(os.listdir("/proc/self/fd")) - 1  # less the one listdir itself holds
    return out


def random_teacher(path: Path, arch: str, in_chans: int, proj_dim: int) -> Path:
    """An s2bnn-format checkpoint of a randomly initialised ``arch`` with a MoCo v2 MLP head."""
    from s2bnn.checkpoint import FORMAT, VERSION, save_checkpoint
    from s2bnn.methods.base import mlp_head
    from s2bnn.models import build_model

    torch.manual_seed(0)
    kwargs = {"in_chans": in_chans, "num_classes": 0}
    backbone = build_model(arch, **kwargs)
    feat = int(backbone.feature_dim)
    head = mlp_head(feat, feat, proj_dim)
    save_checkpoint({
        "format": FORMAT, "version": VERSION, "epoch": 0, "step": 0, "finished": True,
        "backbone": {"name": arch, "kwargs": kwargs, "state_dict": backbone.state_dict()},
        "method": {f"head.{k}": v for k, v in head.state_dict().items()},
    }, path)
    return path


def growth(samples: list[dict[str, Any]], key: str, warmup: int) -> tuple[float, float, float]:
    """(baseline, final, growth %) of ``key``: medians of the first and last three samples
    taken after ``warmup`` steps."""
    after = [s[key] for s in samples if s["step"] > warmup]
    if len(after) < 2:
        raise SystemExit(f"too few samples after the warm-up of {warmup} steps: lower --every "
                         "or --warmup, or raise --steps")
    k = min(3, len(after) // 2)
    base, last = statistics.median(after[:k]), statistics.median(after[-k:])
    return base, last, 100.0 * (last - base) / base if base else 0.0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3000, help="optimiser steps (default 3000)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--every", type=int, default=None,
                        help="sample every N steps (default: steps / 40)")
    parser.add_argument("--warmup", type=int, default=None,
                        help="steps before the baseline (default: the first epoch, so that the "
                             "first checkpoint and kNN monitor are in it; 20-50 %% of steps)")
    parser.add_argument("--limit", type=int, default=None,
                        help="training images (default: all 60,000; fewer means more epoch "
                             "boundaries, i.e. more checkpoints and kNN monitors)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads")
    parser.add_argument("--random-teacher", action="store_true",
                        help="use a random teacher even when the teacher run exists")
    parser.add_argument("--run-dir", default=None, help="keep the run here (default: a temp dir)")
    parser.add_argument("--out", default=None, help="write the samples and figures as JSON")
    args = parser.parse_args()
    if args.steps < 10:
        parser.error("--steps must be at least 10")
    if args.threads:
        torch.set_num_threads(args.threads)

    from s2bnn.config import load_config
    from s2bnn.engine import build_parts, train
    from s2bnn.runtime import tune_malloc

    tune_malloc()  # as the CLI does
    every = args.every or max(1, args.steps // 40)
    limit = args.limit or 60000
    per_epoch = limit // args.batch_size
    if args.warmup is not None:
        warmup = args.warmup
    else:  # the first epoch end allocates the kNN monitor's buffers once: keep it in the warm-up
        warmup = min(max(args.steps // 5, per_epoch + every), args.steps // 2)
    samples: list[dict[str, Any]] = []
    t0 = time.perf_counter()

    def sample(step: int) -> None:
        samples.append({"step": step, "seconds": round(time.perf_counter() - t0, 2),
                        **proc_status()})

    def parts_with_probe(cfg):
        parts = build_parts(cfg)
        inner = parts.build_method

        def build(backbone, total_steps):
            method = inner(backbone, total_steps)
            end = method.on_train_step_end

            def on_end(step: int, total: int) -> None:
                end(step, total)
                if (step + 1) % every == 0 or step == 0:
                    sample(step + 1)

            method.on_train_step_end = on_end  # an instance attribute: the class is untouched
            return method

        parts.build_method = build
        return parts

    with tempfile.TemporaryDirectory(prefix="s2bnn_health_") as tmp:
        run_dir = Path(args.run_dir) if args.run_dir else Path(tmp) / "run"
        teacher = TEACHER_RUN
        if args.random_teacher or not (TEACHER_RUN / "checkpoints" / "last.pt").is_file():
            teacher = random_teacher(Path(tmp) / "teacher.pt", "resnet_small", 1, 128)
        epochs = max(1, math.ceil(args.steps / per_epoch))
        overrides = [
            f"output_dir={run_dir}", f"batch_size={args.batch_size}", f"epochs={epochs}",
            f"max_steps={args.steps}", f"method.teacher.path={teacher}", "device=cpu",
            "progress=false", "force=true",
        ]
        if args.limit:
            overrides.append(f"data.limit={args.limit}")
        cfg = load_config(RECIPE, overrides)
        print(f"health: {RECIPE.relative_to(ROOT)}, {args.steps} steps of batch "
              f"{args.batch_size} ({epochs} epoch(s) of {per_epoch} steps), teacher {teacher}, "
              f"{torch.get_num_threads()} thread(s); sampling every {every} steps",
              file=sys.stderr, flush=True)
        sample(0)
        train(cfg, parts=parts_with_probe)
        sample(args.steps)  # after the last checkpoint and the end of the run
        wall = time.perf_counter() - t0

    print(f"\n{'step':>6} {'s':>8} {'RSS MiB':>9} {'peak MiB':>9} {'fds':>4} {'threads':>7}")
    for s in samples:
        print(f"{s['step']:>6} {s['seconds']:>8.1f} {s['vmrss_kib'] / 1024:>9.1f} "
              f"{s['vmhwm_kib'] / 1024:>9.1f} {s['fds']:>4} {s['threads']:>7}")
    figures = {}
    healthy = True
    print(f"\nafter the warm-up ({warmup} steps), median of the first vs the last 3 samples:")
    for key, label, scale in (("vmrss_kib", "RSS (MiB)", 1024), ("fds", "open fds", 1),
                              ("threads", "threads", 1)):
        base, last, pct = growth(samples, key, warmup)
        ok = pct < LIMIT_PCT if key != "threads" else True  # threads: reported, not judged
        healthy &= ok
        figures[key] = {"baseline": base, "final": last, "growth_pct": round(pct, 2)}
        print(f"  {label:<10} {base / scale:>9.1f} -> {last / scale:>9.1f}  {pct:+6.2f} %"
              + ("" if key == "threads" else ("  ok" if ok else f"  >= {LIMIT_PCT:g} %: FAIL")))
    print(f"wall {wall:.0f} s, {args.steps * args.batch_size / wall:.0f} img/s overall")
    if args.out:
        payload = {
            "benchmark": "bench_health", "recipe": str(RECIPE.relative_to(ROOT)),
            "steps": args.steps, "batch_size": args.batch_size, "epochs": epochs,
            "limit": limit, "warmup_steps": warmup, "every": every,
            "threads": torch.get_num_threads(), "wall_s": round(wall, 1),
            "random_teacher": teacher != TEACHER_RUN, "limit_pct": LIMIT_PCT,
            "healthy": healthy, "growth": figures, "samples": samples,
            "machine": {"python": platform.python_version(), "torch": torch.__version__,
                        "cpus": os.cpu_count()},
        }
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(payload, indent=2) + "\n")
        print(f"written: {args.out}")
    return 0 if healthy else 1


if __name__ == "__main__":
    raise SystemExit(main())
