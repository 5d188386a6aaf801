"""The demo recipe at its default budget on about 2k, 10k and 60k training images.

    python benchmarks/demo_budget.py [--budget 10m] [--only NAME ...] [--quick]
                                     [--out docs/DEMO_BUDGET.md]

Rows (each one whole ``s2bnn demo`` in its own process, so none inherits another's state):

- ``folder-2k``: an ImageFolder of 2,000 training / 1,000 validation PNGs (28 px, grey, 10
  classes) written from Fashion-MNIST's *test* split, so it is a small folder of small images
  that the demo decodes image by image, as a new user's folder would be;
- ``fmnist-10k``: Fashion-MNIST, the first 10,000 training images (``limit=10000``);
- ``fmnist-60k``: Fashion-MNIST, all 60,000 (the default ``make demo``).

For each row the table gives the demo's wall time against its budget, what each stage got (steps,
epochs, seconds) and the linear top-1 of every network, plus the demo's own warnings. Results
accumulate in ``docs/results/demo_budget.json`` (a row already there is skipped unless
``--redo``), so an interrupted run loses only the row it was in.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
from run_all import machine  # noqa: E402

ROWS: dict[str, dict[str, object]] = {
    "folder-2k": {"folder": (2000, 1000), "overrides": []},
    "fmnist-10k": {"overrides": ["limit=10000"]},
    "fmnist-60k": {"overrides": []},
}


# What the table does not say by itself: the recipe each row ran and the goals. Written
# by hand after a run (the rows above come from the JSON).
NOTES: list[str] = [
    "- Recipes. Every row ran with the recipes after the teacher study's round 3 "
    "(docs/TEACHER_STUDY.md): the teacher is MoCo v2 at temperature 0.1 with the symmetric loss "
    "(`method.symmetric`), and `reactnet_small` starts its RPReLU slopes at 1. Against the rows "
    "they replace (round-2 recipes, same machine, one seed each): fmnist-60k teacher 82.9 -> "
    "83.8, S2-BNN 75.8 -> 77.2, MoCo v2 54.5 -> 67.9, untrained 42.1 -> 55.7; fmnist-10k (whose "
    "old row still had the temperature-0.2 teacher) teacher 82.0 -> 82.6, S2-BNN 74.9 -> 76.1, "
    "MoCo v2 46.5 -> 68.6, untrained 42.1 -> 55.7; folder-2k teacher "
    "77.6 -> 77.6, S2-BNN 72.2 -> 74.5, MoCo v2 44.9 -> 65.1, untrained 37.7 -> 49.2. "
    "The slope-1 init is what lifted the untrained and MoCo v2 students; the study's seed "
    "noise is ~1.5 points.",
    "- Goals of issue #11 at the default budget. Teacher above raw pixels: met on fmnist-60k "
    "(83.8 vs 83.2), **missed** on fmnist-10k (82.6) and on folder-2k (77.6 vs "
    "78.0); two seeds of the teacher "
    "recipe differ by ~1.8 in the study, so the margin is within noise either way. S2-BNN "
    "student >= 80: **missed** (77.2 at best). S2-BNN > MoCo v2 > untrained: met on every row. "
    "Folder: S2-BNN at least untrained + 15 and within 10 of pixels: met (74.5: 25.3 above "
    "the untrained 49.2 and 3.5 below pixels).",
    "- Why the student stops near 77 (study round 3): distilled the same way for the same time, "
    "the same network with real weights and activations reaches 81.2 and with binary "
    "activations but real weights 77.1, fully binary 75.5 (slopes 0.25). The binary activations "
    "cost ~4 points, the binary weights ~1.5; the teacher is not the cap. Screened without a "
    "gain: two-step binarisation, half real-valued then binary (+0.7, one seed), the last stage "
    "at 2x2, batch 64, width x1.5 / x2 (fewer steps, and the wider nets barely matched the "
    "teacher in that time), stride-1 stem, learning rates, schedules, temperatures, views, "
    "augmentation, 50 % more steps.",
    "- Next to try: a wider binary student with a learning rate and warm-up of its own (width "
    "x2 reached a student-teacher cosine of only 0.06 in 193 steps: not just fewer steps), and "
    "the real-valued-first two-step run combined with the slope-1 init.",
]


def write_folder(root: Path, n_train: int, n_val: int) -> Path:
    """PNGs from Fashion-MNIST's test split, class-balanced, in ``train/`` and ``val/``."""
    from PIL import Image

    from s2bnn.data import build_dataset

    if (root / "train").is_dir() and (root / "val").is_dir():
        return root
    test = build_dataset("fashion-mnist", "test")
    images, labels = test.images, test.targets  # type: ignore[attr-defined]
    per_class = {"train": n_train // 10, "val": n_val // 10}
    seen: dict[int, int] = {}
    for i in range(len(labels)):
        c = int(labels[i])
        k = seen.get(c, 0)
        seen[c] = k + 1
        split = "train" if k < per_class["train"] else "val"
        if k >= per_class["train"] + per_class["val"]:
            continue
        d = root / split / f"class_{c}"
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(images[i].squeeze().numpy(), mode="L").save(d / f"{i}.png")
    return root


def run_row(name: str, spec: dict[str, object], budget: str, work: Path,
            extra: list[str]) -> dict[str, object]:
    out = work / name
    if out.exists():  # a fresh demo: --force alone would reuse its finished stages
        shutil.rmtree(out)
    cmd = [sys.executable, "-m", "s2bnn", "demo", "--out", str(out), "--force",
           f"budget={budget}", "progress=false", *spec["overrides"], *extra]  # type: ignore[misc]
    if "folder" in spec:
        n_train, n_val = spec["folder"]  # type: ignore[misc]
        cmd += ["--data", str(write_folder(work / f"{name}-data", n_train, n_val))]
    print(f"== {name}: {' '.join(cmd[3:])}", flush=True)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{name} failed:\n{proc.stderr[-3000:]}")
    results = json.loads((out / "results.json").read_text())
    results["process_seconds"] = round(wall, 1)
    return results


def table(rows: dict[str, dict[str, object]]) -> list[str]:
    nets = ("pixels", "teacher", "s2bnn", "mocov2", "random_init")
    lines = ["| data | train images | wall / budget | teacher steps (epochs) | S2-BNN steps "
             "(epochs) | MoCo v2 steps (epochs) | " + " | ".join(nets) + " |",
             "|" + "---|" * (6 + len(nets))]
    for name, r in rows.items():
        st = r["stages"]  # type: ignore[index]
        top1 = {run["name"]: run.get("linear_top1") for run in r["runs"]}  # type: ignore
        cells = [name, str(r["train_images"]),
                 f"{r['wall_seconds']:.0f} s / {r['budget_seconds']:.0f} s"]
        for stage in ("teacher", "s2bnn", "mocov2"):
            got = st[stage]  # type: ignore[index]
            cells.append(f"{got['steps']} ({got['epochs']}) in {got['seconds']:.0f} s")
        cells += [f"{top1[n]:.1f}" if top1.get(n) is not None else "—" for n in nets]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", default="10m")
    parser.add_argument("--only", nargs="*", choices=list(ROWS), default=None)
    parser.add_argument("--redo", action="store_true", help="re-run rows already in the JSON")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 60 s budget, small probes (numbers mean nothing)")
    parser.add_argument("--work", default=str(ROOT / "runs" / "demo_budget"))
    parser.add_argument("--out", default=str(ROOT / "docs" / "DEMO_BUDGET.md"))
    args = parser.parse_args()
    extra = []
    if args.quick:
        args.budget = "60s"
        extra = ["eval_train_limit=2000", "eval_test_limit=1000", "random_seeds=1"]
    store = Path(args.out).parent / "results" / (
        "demo_budget_quick.json" if args.quick else "demo_budget.json")
    done: dict[str, dict[str, object]] = json.loads(store.read_text()) if store.is_file() else {}
    work = Path(args.work)
    for name in args.only or list(ROWS):
        if name in done and not args.redo:
            print(f"== {name}: already in {store}, skipped (--redo to run it again)")
            continue
        r = run_row(name, ROWS[name], args.budget, work, extra)
        info = json.loads(subprocess.run(
            [sys.executable, "-m", "s2bnn", "data", "info", r["dataset"], "--json"],  # type: ignore
            capture_output=True, text=True, cwd=ROOT).stdout or "{}")
        limit = r["config"].get("limit")  # type: ignore[union-attr]
        r["train_images"] = limit or info.get("num_train")
        r["machine"] = machine()
        done[name] = r
        store.parent.mkdir(parents=True, exist_ok=True)
        store.write_text(json.dumps(done, indent=2) + "\n")
    ordered = {n: done[n] for n in ROWS if n in done}
    machines = sorted({str(r.get("machine")) for r in ordered.values()})
    lines = [
        "# The demo at its default budget on 2k, 10k and 60k training images",
        "",
        "Made by `python benchmarks/demo_budget.py" + (" --quick" if args.quick else "") + "`;"
        " each row is one `s2bnn demo` run at `budget=" + args.budget + "` (linear top-1 in %,"
        " the demo's own probe). The budget is divided between the stages at run time, so a",
        "small set gets many epochs and the full set about as many steps.",
        "",
        *[f"Machine: {m}" for m in machines],
        "",
        *table(ordered),
        "",
        "Warnings the demo printed:",
        "",
    ]
    for name, r in ordered.items():
        for w in r.get("warnings") or ["none"]:  # type: ignore[union-attr]
            lines.append(f"- {name}: {w}")
    if NOTES and not args.quick:
        lines += ["", "## Notes", "", *NOTES]
    lines.append("")
    Path(args.out).write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
