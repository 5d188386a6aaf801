"""Run the speed benchmarks one after another and collect their printed figures.

    python benchmarks/run_all.py [--quick] [--out docs/BENCHMARKS.md]

Each benchmark runs in its own process (so one's thread or allocator settings do not leak into
the next) and its output is copied verbatim into the Markdown file, under the machine it ran on.
Run it on a quiet machine: the figures are wall-clock throughputs.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent

BENCHES: list[tuple[str, list[str], str]] = [
    ("bench_models.py", [], "Backbones: training step and forward images/s (28x28x1, batch 256)"),
    ("bench_step.py", ["--profile"], "S2-BNN step, ReActNet-A + ResNet-50 teacher, 128 px, "
                                     "batch 16: this library's step vs a straightforward one"),
    ("bench_kernels.py", [], "Training fast paths (compiled RSign / RPReLU kernels, GEMM weight "
                             "gradient, fused Adam) against PyTorch's ops, on the demo's student "
                             "(reactnet_compact, 28 px, batch 128)"),
    ("bench_methods.py", [], "Strategies 1-3 on the Fashion-MNIST recipe: images/s per step"),
    ("bench_loader.py", ["--datasets", "fashion-mnist", "--workers", "0", "1"],
     "Data loader alone: images/s per augmentation preset"),
    ("bench_eval.py", [], "Fast linear-probe sweep and the raw-pixel baseline"),
]


def interleaved(calls: dict[str, Callable[[], object]], rounds: int, warmup: int = 1
                ) -> dict[str, list[float]]:
    """Seconds per call of each variant over ``rounds`` rounds of one call each (after
    ``warmup`` untimed calls of each): a machine whose speed drifts affects every variant alike.
    """
    for call in calls.values():  # first-call allocations, oneDNN primitives, library builds
        for _ in range(warmup):
            call()
    times: dict[str, list[float]] = {k: [] for k in calls}
    for _ in range(rounds):
        for k, call in calls.items():
            t0 = time.perf_counter()
            call()
            times[k].append(time.perf_counter() - t0)
    return times


def probe_features(train: tuple, test: tuple) -> dict[str, float | int]:
    """The demo's probes (linear sweep, 200-NN) of given ``(features, labels)`` pairs: feature
    dims, linear and kNN top-1, for the small studies that compare teachers' features."""
    from s2bnn.eval.baselines import evaluate_features

    (tr, y), (te, yt) = train, test
    res = evaluate_features(tr, y, te, yt, num_classes=int(y.max()) + 1, device="cpu", knn_k=200)
    return {"dims": int(tr.shape[1]), "linear_top1": round(float(res["linear_top1"]), 2),
            "knn_top1": round(float(res["knn_top1"]), 2)}


def write_markdown(path: Path, lines: list[str], notes: list[str]) -> None:
    """Write a study's doc: its ``lines``, then its hand-written ``notes`` under "## Notes"."""
    if notes:
        lines = [*lines, "## Notes", "", *notes, ""]
    path.write_text("\n".join(lines))
    print(f"wrote {path}")


def demo_row(demos: Path, row: str) -> tuple[Path, dict[str, Any]]:
    """A demo_budget row's dir under ``demos`` and its results.json (one line if absent): the
    inputs of the studies that retrain its stages."""
    import json

    results = demos / row / "results.json"
    if not results.is_file():
        raise SystemExit(f"{results} not found: run python benchmarks/demo_budget.py --only {row} "
                         "first (its teacher and student are this benchmark's inputs)")
    return demos / row, json.loads(results.read_text())


def demo_eval_splits(data: str) -> dict[str, Any]:
    """``data``'s labelled splits as the demo's probe reads them (decode once per row)."""
    from s2bnn.demo import eval_datasets

    return eval_datasets(data, None, 10000, None, 1, 28)


def demo_probe(ds: dict[str, Any], run_dir: Path) -> dict[str, float]:
    """The demo's probe of ``run_dir``'s backbone on the splits ``ds``."""
    from s2bnn.demo import evaluate_run, packed_forward_for

    row, _ = evaluate_run(run_dir.name, run_dir, ds, image_size=28, in_chans=1, knn_k=200,
                          device="auto", fast_forward=packed_forward_for(ds["test"], "auto"))
    return {"linear_top1": round(float(row["linear_top1"]), 2),
            "knn_top1": round(float(row["knn_top1"]), 2)}


def retrain(config: Path, out: Path, overrides: list[str]) -> float:
    """``s2bnn train config`` into a fresh ``out`` with a fixed size instead of the time budget
    a demo stage ran under (``overrides`` size it: ``steps=N`` or ``epochs=N``); wall seconds,
    start-up included. A failed run stops the study with the end of its stderr."""
    cmd = [sys.executable, "-m", "s2bnn", "train", str(config), f"output_dir={out}",
           "force=true", "resume=never", "time_budget=null", "time_budget_max_epochs=null",
           "progress=false", *overrides]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=HERE.parent, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"training {out} failed:\n{proc.stderr[-2000:]}")
    return round(time.perf_counter() - t0, 1)


def retrain_study_main(doc: str, rows: list[str], variants: list[str], default: list[str],
                       work: Path, results: Path, run: Callable[..., Any],
                       report: Callable[[Any], None]) -> None:
    """The command line of a study that retrains demo_budget rows' stages (``--rows``,
    ``--variants``, ``--work``; ``--report`` only rewrites the doc from ``results``)."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--rows", nargs="+", default=rows)
    parser.add_argument("--variants", nargs="+", choices=variants, default=default)
    parser.add_argument("--work", default=str(work))
    parser.add_argument("--report", action="store_true", help="only rewrite the doc")
    args = parser.parse_args()
    if args.report:
        report_from(results, report)
        return
    report(run(args.rows, args.variants, Path(args.work)))


def row_study_main(doc: str, rows: list[str], results: Path,
                   compute: Callable[[str, argparse.Namespace], dict[str, Any]],
                   report: Callable[[Any], None],
                   reuse: Callable[[dict[str, Any]], bool] = lambda entry: False,
                   options: Callable[[argparse.ArgumentParser], None] | None = None) -> None:
    """The command line of a study with one entry per demo_budget row: ``--rows`` (default
    ``rows``) are computed with ``compute(row, args)`` into ``results`` (JSON, one entry a row,
    written after each; an entry for which ``reuse`` says so is kept), then ``report`` gets
    them all, ``rows`` first; ``--report`` only rewrites the doc. ``options`` adds the study's
    own arguments to the parser."""
    import json

    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--rows", nargs="+", default=rows)
    parser.add_argument("--report", action="store_true", help="only rewrite the doc")
    if options is not None:
        options(parser)
    args = parser.parse_args()

    def ordered(done: dict[str, Any]) -> None:
        report({r: done[r] for r in [*rows, *done] if r in done})

    if args.report:
        report_from(results, ordered)
        return
    done: dict[str, Any] = json.loads(results.read_text()) if results.is_file() else {}
    for row in args.rows:
        if row in done and reuse(done[row]):
            continue
        print(f"== {row}", flush=True)
        done[row] = compute(row, args)
        results.parent.mkdir(parents=True, exist_ok=True)
        results.write_text(json.dumps(done, indent=2) + "\n")
    ordered(done)


def report_from(results: Path, report: Callable[[Any], None]) -> None:
    """``--report``: rewrite a study's doc from its JSON ``results`` alone."""
    import json

    if not results.is_file():
        raise SystemExit(f"{results} not found: run the benchmark first")
    report(json.loads(results.read_text()))


def machine() -> str:
    """The CPU (with the vector extensions that decide its speed here), cores, GPU, versions."""
    cpu, flags = platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and cpu == platform.machine():
                cpu = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    except OSError:
        pass
    # A model name such as "AMD EPYC" names CPUs three times apart in speed here.
    isa = [name for flag, name in (("avx2", "AVX2"), ("avx512f", "AVX-512"),
                                   ("avx512_bf16", "AVX512-BF16"), ("amx_bf16", "AMX"))
           if flag in flags]
    if isa:
        cpu = f"{cpu} ({', '.join(isa)})"
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (f"{cpu}, {os.cpu_count()} CPU cores, {gpu}; Python {platform.python_version()}, "
            f"torch {torch.__version__}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="pass --quick where a script has it")
    ap.add_argument("--out", default=str(HERE.parent / "docs" / "BENCHMARKS.md"))
    ap.add_argument("--only", nargs="+", default=None, help="script names to run")
    args = ap.parse_args()
    sections = [
        "# Benchmarks", "",
        f"Produced by `python benchmarks/run_all.py{' --quick' if args.quick else ''}` on "
        f"{machine()}, {dt.date.today().isoformat()}. Wall-clock figures of one run each.", "",
    ]
    failed = 0
    for script, extra, title in BENCHES:
        if args.only and script not in args.only:
            continue
        cmd = [sys.executable, str(HERE / script), *extra]
        if args.quick and script in ("bench_models.py", "bench_step.py", "bench_methods.py",
                                     "bench_kernels.py"):
            cmd.append("--quick")
        print(f"== {script}", flush=True)
        start = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        took = time.perf_counter() - start
        print(proc.stdout, flush=True)
        if proc.returncode != 0:
            failed += 1
            print(proc.stderr[-2000:], file=sys.stderr)
        sections += [f"## {title}", "", f"`python benchmarks/{script} {' '.join(cmd[2:])}`"
                     f" ({took:.0f} s, exit {proc.returncode})", "", "```",
                     proc.stdout.strip(), "```", ""]
    Path(args.out).write_text("\n".join(sections))
    print(f"wrote {args.out}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
