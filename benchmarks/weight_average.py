"""Does averaging the student's weights over the end of its run lift its probe? (round 21)

    python benchmarks/demo_budget.py --only folder-4k-r24-stages2 ...   # the rows
    python benchmarks/weight_average.py [--rows folder-4k-r24-stages2 ...]
                                        [--fractions 0.05 0.1 0.2 0.4]
    python benchmarks/weight_average.py --report          # rewrite the doc from the JSON

Two trainings of the demo's S2-BNN student with the same config and seed, whose loss and
cosine curves agree to three digits, probed 83.1 and 84.25 on Fashion-MNIST's 10,000 test
images (the demo's student and the ``same`` control of docs/STUDENT_LEVERS.md): the sign
patterns a binary network ends on differ more than its training curves say. A uniform average
of the weights over the last part of the run (stochastic weight averaging, with the BatchNorm
statistics averaged alongside) might keep what those endings share.

For each demo_budget row this retrains the row's S2-BNN student from its stage config for the
steps the demo gave it, once, and keeps beside the weights it ends with (``last``, the control)
uniform averages of the backbone's parameters and buffers over the last ``--fractions`` of the
steps. Every network is scored with the demo's probe (weighted kNN and the linear LR sweep, on
the same features path as the demo); the comparison is paired: one training, several endings.
Results accumulate in docs/results/weight_average.json; a row already there is reused.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
from run_all import (  # noqa: E402
    demo_eval_splits,
    demo_probe,
    demo_row,
    machine,
    row_study_main,
    write_markdown,
)

from s2bnn.engine import Callback  # noqa: E402

DEMOS = ROOT / "runs" / "demo_budget"
JSON = ROOT / "docs" / "results" / "weight_average.json"
DOC = ROOT / "docs" / "WEIGHT_AVERAGE.md"
ROWS = ["folder-4k-r24-stages2", *(f"folder-4k-r24-stages2-seed{k}" for k in range(1, 5))]
FRACTIONS = [0.05, 0.1, 0.2, 0.4]
NOTES: list[str] = [
    "- Round 21. No fraction lifts the student: on the five folder rows the averages score "
    "-0.42 to +0.14 against the network the run ends with (mean over rows), and on "
    "Fashion-MNIST, whose 10,000 test images make the probe four times as precise, every "
    "average is below it (83.62-83.94 against 84.25; kNN 80.27-80.64 against 80.88). Nothing "
    "is kept; the engine has no weight averaging.",
    "- What the rows measure instead is how far the linear probe moves between networks that "
    "are nearly the same (one run's endings): on the folder its five numbers per row spread "
    "with a standard deviation of 0.26-0.60 points (ranges 0.6-1.7), the kNN probe's 0.14-0.35. "
    "A single demo's linear top-1 on 1,000 validation images is a draw from about that wide a "
    "spread on top of the student's seed; the folder goal of +15 over the untrained student, "
    "met on average (15.83 over five seeds), cannot be met on every seed by a change smaller "
    "than that.",
    "- The `last` networks are the retrains of docs/STUDENT_LEVERS.md's controls where both "
    "exist (Fashion-MNIST: 84.25 / 80.88 in both, bit for bit: a retrain on the same machine "
    "and thread count repeats). The demo trained the same config on one thread beside the "
    "other student and scored 83.1: the thread count changes the float rounding, and the "
    "ending moves by a point.",
]


class TailAverages(Callback):
    """A callback that keeps, for each fraction f, the uniform average of the student
    backbone's floating-point state over the run's last f of steps."""

    def __init__(self, fractions: list[float]) -> None:
        self.fractions = fractions
        self.sums: dict[float, dict[str, Any]] = {}
        self.counts: dict[float, int] = {f: 0 for f in fractions}

    def on_step_end(self, trainer: Any) -> None:
        import torch

        step, total = trainer.progress.step, trainer.total_steps
        active = [f for f in self.fractions if step > total * (1 - f)]
        if not active:  # most of the run: nothing to read from the weights
            return
        state = trainer.method.backbone.state_dict()
        for f in active:
            acc = self.sums.setdefault(f, {})
            for k, v in state.items():
                if torch.is_floating_point(v):
                    acc[k] = acc[k] + v.double() if k in acc else v.double().clone()
                else:
                    acc[k] = v.clone()  # counters (num_batches_tracked): the last one
            self.counts[f] += 1

    def averaged(self, f: float, like: dict[str, Any]) -> dict[str, Any]:
        n = self.counts[f]
        return {k: (v / n).to(like[k].dtype) if v.is_floating_point() else v
                for k, v in self.sums[f].items()}


def _train_row(row: str, work: Path, fractions: list[float]) -> tuple[Path, dict[float, Path]]:
    from s2bnn.checkpoint import load_checkpoint, save_checkpoint
    from s2bnn.config import load_config
    from s2bnn.engine import train

    out, results = demo_row(DEMOS, row)
    steps = int(results["stages"]["s2bnn"]["steps"])
    run = work / f"{row}-last"
    cfg = load_config(out / "runs" / "s2bnn" / "config.yaml", [
        f"output_dir={run}", "force=true", "resume=never", "time_budget=null",
        "time_budget_max_epochs=null", "progress=false", f"steps={steps}", "epochs=null"])
    averages = TailAverages(fractions)
    train(cfg, callbacks=[averages])
    ckpt = load_checkpoint(run / "checkpoints" / "last.pt")
    dirs = {}
    for f in fractions:
        d = work / f"{row}-avg{f:g}"
        if d.exists():
            shutil.rmtree(d)
        (d / "checkpoints").mkdir(parents=True)
        shutil.copy(run / "config.yaml", d / "config.yaml")
        sd = ckpt["backbone"]["state_dict"]
        ck = {**ckpt, "backbone": {**ckpt["backbone"], "state_dict": averages.averaged(f, sd)}}
        save_checkpoint(ck, d / "checkpoints" / "last.pt")
        dirs[f] = d
    return run, dirs


def average_row(row: str, fractions: list[float], work: Path) -> dict[str, Any]:
    """Retrain row ``row``'s student once; the demo's probe of its last weights and of the
    averages over the last ``fractions`` of its steps."""
    t0 = time.perf_counter()
    last, dirs = _train_row(row, work, fractions)
    _, results = demo_row(DEMOS, row)
    ds = demo_eval_splits(results["config"]["data"])
    scores = {r["name"]: r for r in results["runs"]}
    entry = {"seed": results["config"]["seed"],
             "steps": int(results["stages"]["s2bnn"]["steps"]),
             "untrained": round(scores["random_init"]["linear_top1"], 2),
             "demo": scores["s2bnn"]["linear_top1"],
             "train_s": round(time.perf_counter() - t0, 1),
             "last": demo_probe(ds, last),
             "averages": {f"{f:g}": demo_probe(ds, d) for f, d in dirs.items()},
             "machine": machine()}
    print(f"   {entry}", flush=True)
    return entry


def report(done: dict[str, Any]) -> None:
    machines = sorted({e["machine"] for e in done.values()})
    fracs = list(next(iter(done.values()))["averages"]) if done else []
    lines = [
        "# Averaging the S2-BNN student's weights over the end of its run",
        "",
        "Made by `python benchmarks/weight_average.py` (its docstring says how). "
        + " ".join(f"Machine: {m}." for m in machines),
        "",
        "One retraining of each demo_budget row's S2-BNN student for the steps the demo gave",
        "it; `last` is the network it ends with, `avg f` the uniform average of its backbone's",
        "weights and BatchNorm statistics over the last f of those steps, from the same run.",
        "Linear (kNN) top-1 % with the demo's probe; the margin is over the untrained student.",
        "`spread`: the standard deviation of the linear (kNN) top-1 over that row's networks,",
        "`last` and the averages: how far the probe moves between nearly identical networks.",
        "",
        "| row | seed | steps | demo's student | last | " + " | ".join(
            f"avg {f}" for f in fracs) + " | spread |",
        "|" + "---|" * (6 + len(fracs)),
    ]
    gains: dict[str, list[float]] = {f: [] for f in fracs}
    for row, e in done.items():
        base = e["last"]["linear_top1"]
        cells = []
        for f in fracs:
            p = e["averages"][f]
            gains[f].append(p["linear_top1"] - base)
            cells.append(f"{p['linear_top1']:.1f} ({p['knn_top1']:.1f})")
        nets = [e["last"], *e["averages"].values()]
        sd_lin, sd_knn = (statistics.pstdev(n[k] for n in nets)
                          for k in ("linear_top1", "knn_top1"))
        lines.append(f"| {row} | {e['seed']} | {e['steps']} | {e['demo']:.1f} | "
                     f"{base:.1f} ({e['last']['knn_top1']:.1f}) | " + " | ".join(cells)
                     + f" | {sd_lin:.2f} ({sd_knn:.2f}) |")
    if done:
        lines += ["", "Mean Δ linear against `last`: " + ", ".join(
            f"avg {f} {statistics.mean(g):+.2f}" for f, g in gains.items()) + "."]
        lines += ["", "Margins over the untrained student (linear): " + "; ".join(
            f"{row}: last {e['last']['linear_top1'] - e['untrained']:.2f}, " + ", ".join(
                f"avg {f} {e['averages'][f]['linear_top1'] - e['untrained']:.2f}" for f in fracs)
            for row, e in done.items()) + "."]
    lines.append("")
    write_markdown(DOC, lines, NOTES)


def main() -> None:
    def options(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--fractions", nargs="+", type=float, default=FRACTIONS)
        parser.add_argument("--work", default=str(DEMOS / "weight_average"))

    row_study_main(__doc__, ROWS, JSON,
                   lambda row, args: average_row(row, args.fractions, Path(args.work)),
                   report, reuse=lambda entry: True, options=options)


if __name__ == "__main__":
    main()
