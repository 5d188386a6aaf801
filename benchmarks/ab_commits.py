"""The demo's training stages at two commits, timed in the same run (fixed steps, interleaved).

    python benchmarks/demo_budget.py --only folder-4k-r13-conv    # a demo to take configs from
    python benchmarks/ab_commits.py --base b2cd06b [--run runs/demo_budget/folder-4k-r13-conv]
                                    [--stages s2bnn:240 teacher:200] [--rounds 3]

Demo rows run minutes apart on a machine whose speed drifts by a fifth or more, so their step
counts do not show what a code change bought. This runs each stage's saved config (the demo's
own, with ``steps`` fixed and no time budget) once per round with the base commit's ``src/``
(a git worktree) and once with this checkout's, in the same Python, and prints the mean
images/s of each run (its first three log rows left out: warm-up) and the per-round ratios.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from s2bnn.report.collect import read_metrics

ROOT = Path(__file__).resolve().parents[1]


def images_per_second(metrics: Path) -> float:
    """Mean ``img_per_s`` of a run's ``metrics.csv``, its first three rows left out."""
    rates = [r["img_per_s"] for r in read_metrics(metrics)[3:] if r.get("img_per_s")]
    if not rates:
        raise SystemExit(f"{metrics}: too few logged steps; raise the stage's steps")
    return statistics.fmean(rates)


def run_stage(src: Path, config: Path, steps: int, out: Path) -> float:
    env = {**os.environ, "PYTHONPATH": str(src)}
    cmd = [sys.executable, "-m", "s2bnn", "train", str(config), f"steps={steps}",
           "time_budget=null", "time_budget_replan=false", f"output_dir={out}", "force=true",
           "resume=never", "progress=false"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
    return images_per_second(out / "metrics.csv")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", required=True, help="the commit to compare this checkout with")
    ap.add_argument("--run", default=str(ROOT / "runs" / "demo_budget" / "folder-4k-r13-conv"))
    ap.add_argument("--stages", nargs="+", default=["s2bnn:240", "teacher:200"],
                    help="stage:steps, each a run dir under RUN/runs")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    try:
        stages = [(name, int(steps)) for name, steps in (s.split(":") for s in args.stages)]
    except ValueError:
        raise SystemExit(f"--stages takes stage:steps pairs (e.g. s2bnn:240), got "
                         f"{' '.join(args.stages)}") from None
    if subprocess.run(["git", "rev-parse", "--verify", "-q", f"{args.base}^{{commit}}"],
                      capture_output=True, cwd=ROOT).returncode != 0:
        raise SystemExit(f"--base {args.base}: not a commit of this repository")
    for name, _ in stages:
        if not (Path(args.run) / "runs" / name / "config.yaml").is_file():
            raise SystemExit(f"no {args.run}/runs/{name}/config.yaml: run the demo row first")
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                          text=True, cwd=ROOT).stdout.strip()
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp) / "base"
        subprocess.run(["git", "worktree", "add", "-q", "--detach", str(base), args.base],
                       check=True, cwd=ROOT)
        try:
            speeds: dict[tuple[str, str], list[float]] = {}
            for r in range(args.rounds):
                for code, src in (("base", base / "src"), ("this", ROOT / "src")):
                    for name, steps in stages:
                        cfg = Path(args.run) / "runs" / name / "config.yaml"
                        ips = run_stage(src, cfg, steps, Path(tmp) / f"{name}-{code}-{r}")
                        speeds.setdefault((name, code), []).append(ips)
                        print(f"round {r + 1}: {name} at {code}: {ips:.0f} img/s", flush=True)
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(base)], cwd=ROOT)
    print(f"\nstage      {args.base:>10} img/s {head + ' (this)':>16} img/s  ratio per round")
    for name, steps in stages:
        b, t = speeds[(name, "base")], speeds[(name, "this")]
        ratios = ", ".join(f"{y / x:.2f}" for x, y in zip(b, t))
        print(f"{name:<10} {statistics.median(b):>16.0f} {statistics.median(t):>22.0f}  {ratios}"
              f"  ({steps} steps)")


if __name__ == "__main__":
    main()
