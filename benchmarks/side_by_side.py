"""The demo's two students one after the other on all threads, or side by side on half each.

    python benchmarks/side_by_side.py [--steps 300] [--limit 4000] [--repeats 2]

Trains the demo's S2-BNN and MoCo v2 students (its recipes, bf16 where the CPU has it, 28 px
Fashion-MNIST images) for a fixed number of steps, three ways in one run: each alone on all
of torch's threads (as the demo runs them one after the other), and both at once, each in its
own process on half the threads (``s2bnn.demo.train_side_by_side``, as the demo runs them on a
CPU). Each stage's speed is the median ``img_per_s`` of its ``metrics.csv`` (start-up
excluded). The allocator is tuned as the CLI tunes it (``s2bnn.runtime``). Side by side
for the time two alone would take, a student gets
``2 * side / alone`` times the steps: the gain column. Random-init teacher (speed does not
depend on its weights). Writes docs/results/side_by_side.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
from run_all import machine  # noqa: E402


def speed(run_dir: Path) -> float:
    """Median images/s of a run's logged steps, its first log line (warm-up) left out."""
    from s2bnn.report import read_metrics

    return statistics.median(r["img_per_s"] for r in read_metrics(run_dir / "metrics.csv")[1:])


def main() -> None:
    import torch

    from s2bnn.config import config_from_dict, config_to_dict
    from s2bnn.runtime import tune_malloc

    tune_malloc()  # as the CLI does; the side-by-side processes follow it
    from s2bnn.demo import (
        DemoConfig,
        side_by_side_threads,
        stage_configs,
        train_side_by_side,
        train_stage,
    )

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--limit", type=int, default=4000)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    threads = torch.get_num_threads()
    half = side_by_side_threads(DemoConfig(side_by_side=True))  # what the demo gives each
    rows: dict[str, dict[str, list[float]]] = {"s2bnn": {}, "mocov2": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for rep in range(args.repeats):
            plan = DemoConfig(limit=args.limit, teacher_steps=5, s2bnn_steps=args.steps,
                              mocov2_steps=args.steps // 2, progress=False, precision="auto")
            cfgs = stage_configs(plan, Path(tmp) / f"r{rep}", force=True)
            train_stage(cfgs["teacher"])
            students = {n: cfgs[n] for n in ("s2bnn", "mocov2")}
            for name, cfg in students.items():  # alone, on every thread
                (run_dir, _), = train_side_by_side({name: cfg}, threads, progress=False).values()
                rows[name].setdefault("alone", []).append(speed(run_dir))
            pair = {n: config_from_dict({**config_to_dict(c), "output_dir": f"{c.output_dir}-pair"})
                    for n, c in students.items()}  # fresh run dirs: nothing to reuse
            for name, (run_dir, _) in train_side_by_side(pair, half, progress=False).items():
                rows[name].setdefault("side", []).append(speed(run_dir))
    out = {"machine": machine(), "threads": threads, "steps": args.steps, "rows": rows}
    print(f"Machine: {out['machine']}; {threads} threads; median img/s over {args.repeats} "
          "repeats\n")
    print("| student | alone, all threads | side by side, half each | steps in equal time |")
    print("|---|---|---|---|")
    for name, r in rows.items():
        alone, side = statistics.median(r["alone"]), statistics.median(r["side"])
        out[f"{name}_gain"] = round(2 * side / alone, 3)
        print(f"| {name} | {alone:.0f} | {side:.0f} | {2 * side / alone:.2f}x |")
    path = ROOT / "docs" / "results" / "side_by_side.json"
    path.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
