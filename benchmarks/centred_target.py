"""What the S2-BNN student distils: the teacher's head output or its centred backbone features.

    python benchmarks/demo_budget.py --only folder-4k-r14 folder-4k-r14-seed1 folder-4k-r14-seed2
    python benchmarks/centred_target.py [--rows folder-4k-r14 ...] [--variants centred features]
    python benchmarks/centred_target.py --report          # rewrite the doc from the JSON

Each demo_budget row named by ``--rows`` (its run dir under runs/demo_budget, made by the first
command) holds a teacher and the S2-BNN student the demo distilled from it, with the paper's
target: the teacher's 128-d L2-normalised projection-head output. For every variant this
retrains that student from the same stage config (same seed, data, recipe) for exactly the
steps the demo gave it, changing only the target:

- ``centred``: the teacher's pooled backbone features minus their batch mean, L2-normalised
  (``method.teacher.head=none``, ``method.teacher.center=true``; what the demo distils since
  round 14);
- ``features``: the same features uncentred (``head=none`` only), the control: all positive
  after ReLU, their softmax at tau 0.2 is nearly flat.

Every student is scored with the demo's probe (weighted kNN and the linear LR sweep on the
folder's labelled split) on the same features path (the packed 1-bit runtime). Results
accumulate in docs/results/centred_target.json; a row already there is reused.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import yaml

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
from run_all import (  # noqa: E402
    demo_eval_splits,
    demo_probe,
    demo_row,
    machine,
    retrain,
    retrain_study_main,
    write_markdown,
)

DEMOS = ROOT / "runs" / "demo_budget"
JSON = ROOT / "docs" / "results" / "centred_target.json"
DOC = ROOT / "docs" / "CENTRED_TARGET.md"
ROWS = ["folder-4k-r14", "folder-4k-r14-seed1", "folder-4k-r14-seed2"]
VARIANTS: dict[str, tuple[str, list[str]]] = {
    "centred": ("pooled backbone features, batch-centred",
                ["method.teacher.head=none", "method.teacher.center=true"]),
    "features": ("pooled backbone features, uncentred",
                 ["method.teacher.head=none", "method.teacher.center=false"]),
}
NOTES: list[str] = [
    "- Round 14. The centred features taught a better student on all three seeds: +1.8, +2.5, "
    "+0.8 linear over the head output at the same steps (seed 1, whose student had scored "
    "79.8-82.2 in every demo, gained most). The uncentred control (`--variants features`) was "
    "not run here; at 1,600 steps from earlier teachers it scored 80.3 against 81.4 "
    "(docs/STUDENT_GAP.md, t_feat). The demo distils the centred features since this round "
    "(docs/DEMO_BUDGET.md, rows `-r15`: 82.9, 82.2 and 81.8 with the steps those demos got).",
    "- `train s` includes start-up, and the machine's speed drifts by a fifth within an hour "
    "here: it says what a row cost, not how fast a target trains.",
]


def _train(config: Path, out: Path, steps: int, overrides: list[str]) -> float:
    from s2bnn.demo import feature_width

    teacher_arch = yaml.safe_load(config.read_text())["method"]["teacher"]["arch"]
    return retrain(config, out, [f"steps={steps}", f"method.proj_dim={feature_width(teacher_arch)}",
                                 *overrides])


def run(rows: list[str], variants: list[str], work: Path) -> dict[str, Any]:
    done: dict[str, Any] = json.loads(JSON.read_text()) if JSON.is_file() else {}
    for row in rows:
        out, results = demo_row(DEMOS, row)
        student = out / "runs" / "s2bnn"
        target = yaml.safe_load((student / "config.yaml").read_text())["method"]["teacher"]
        if target.get("head") == "none":
            raise SystemExit(f"{row}'s student already distils the backbone features; name a "
                             "demo_budget row from before round 14 (e.g. folder-4k-r14)")
        ds = demo_eval_splits(results["config"]["data"])
        steps = int(results["stages"]["s2bnn"]["steps"])
        runs = {r["name"]: r for r in results["runs"]}
        entry = done.setdefault(row, {"seed": results["config"]["seed"], "steps": steps,
                                      "teacher": runs["teacher"]["linear_top1"],
                                      "untrained": round(runs["random_init"]["linear_top1"], 2),
                                      "variants": {}})
        if "paper" not in entry["variants"]:
            print(f"== {row}: the demo's own student (the paper's target)", flush=True)
            entry["variants"]["paper"] = {**demo_probe(ds, student), "train_s": None}
        for name in variants:
            if name in entry["variants"]:
                continue
            print(f"== {row}: {name}, {steps} steps", flush=True)
            run_dir = work / f"{row}-{name}"
            seconds = _train(student / "config.yaml", run_dir, steps, VARIANTS[name][1])
            entry["variants"][name] = {**demo_probe(ds, run_dir), "train_s": seconds}
        entry["machine"] = machine()
        JSON.parent.mkdir(parents=True, exist_ok=True)
        JSON.write_text(json.dumps(done, indent=2) + "\n")
    return done


def report(done: dict[str, Any]) -> None:
    machines = sorted({e["machine"] for e in done.values() if "machine" in e})
    lines = [
        "# The S2-BNN target: the teacher's head output or its centred backbone features",
        "",
        "Made by `python benchmarks/centred_target.py` (its docstring says how). "
        + " ".join(f"Machine: {m}." for m in machines),
        "",
        "Each row retrains the demo's S2-BNN student of a demo_budget row (docs/DEMO_BUDGET.md)",
        "from the same config and teacher for the steps the demo gave it, changing only the",
        "target. Linear / kNN top-1 % with the demo's probe on the folder's 1,000 validation",
        "images; `paper` is the demo's own student (the 128-d head output, the paper's target).",
        "",
        "| row | seed | steps | teacher | untrained | target | linear | kNN | Δ linear "
        "| margin over untrained | train s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row, e in done.items():
        base = e["variants"].get("paper", {}).get("linear_top1")
        for name, v in e["variants"].items():
            what = "head output, 128-d (paper)" if name == "paper" else VARIANTS[name][0]
            delta = "—" if name == "paper" or base is None else f"{v['linear_top1'] - base:+.1f}"
            lines.append(
                f"| {row} | {e['seed']} | {e['steps']} | {e['teacher']} | {e['untrained']} | "
                f"{what} | {v['linear_top1']} | {v['knn_top1']} | {delta} | "
                f"{v['linear_top1'] - e['untrained']:.1f} | {v['train_s'] or ''} |")
    lines.append("")
    write_markdown(DOC, lines, NOTES)


def main() -> None:
    retrain_study_main(__doc__, ROWS, list(VARIANTS), ["centred"],
                       DEMOS / "centred_target", JSON, run, report)


if __name__ == "__main__":
    main()
