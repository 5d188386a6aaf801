"""How much each stage of the demo's teacher holds: the linear probe of its stages' pooled outputs.

    python benchmarks/demo_budget.py --only folder-4k-r22-cap40 ...    # the rows (teachers)
    python benchmarks/teacher_stages.py [--rows folder-4k-r22-cap40 ...]
    python benchmarks/teacher_stages.py --report          # rewrite the doc from the JSON

The S2-BNN student of the demo distils its teacher's pooled backbone features (centred) and
ends within about a point of that teacher's probe. This asks whether the teacher holds more than
those features say: for the teacher of each demo_budget row it probes, with the demo's probe
(weighted kNN and the linear LR sweep on the row's labelled splits), the globally pooled output
of every stage (:func:`s2bnn.teachers.stage_features`), the last two and the last three side by
side, the last stage's map before pooling, and the last two stages pooled to 2x2 maps (each
cell's features side by side, the target of ``method.teacher.grid=2``). Nothing is trained.
Results accumulate in docs/results/teacher_stages.json; a row already there is reused.
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
from run_all import (  # noqa: E402
    demo_eval_splits,
    demo_row,
    machine,
    row_study_main,
    write_markdown,
)

DEMOS = ROOT / "runs" / "demo_budget"
JSON = ROOT / "docs" / "results" / "teacher_stages.json"
DOC = ROOT / "docs" / "TEACHER_STAGES.md"
ROWS = ["folder-4k-r22-cap40", *(f"folder-4k-r22-cap40-seed{k}" for k in range(1, 5))]
NOTES: list[str] = [
    "- Round 20. The teachers of the five `-r22-cap40` demos (the shipped recipe of round 18, "
    "40 epochs of the 4,000-image folder) probe 82.3-84.6 with their pooled features, the "
    "S2-BNN student's target until this round, and 83.7-85.6 with their last two stages side "
    "by side (+1.3, +0.2, +1.8, +1.7, +1.5; mean +1.30). The third-last stage adds nothing "
    "more (mean +1.32), and the last stage's map before pooling (the position of each feature "
    "kept, 768-d at 2x2) +1.08. Earlier stages alone probe well below the last (-1.8 to -7.6). "
    "The demo's student ends within about a point of what its target holds (docs/"
    "STUDENT_LEVERS.md), so the demo distils the last two stages since this round "
    "(`method.teacher.stages=2`; docs/DEMO_BUDGET.md, rows `-r24-stages2`).",
    "- Fashion-MNIST (`--rows fmnist-60k-r24`: the demo's teacher after 4 epochs of 60,000 "
    "images, probed on 10,000 labelled training and the 10,000 test images): 84.4 pooled, "
    "85.5 with the last two stages, 86.0 with the last three. The mean line above includes "
    "this row; over the five folder teachers alone it is +1.30 (two stages) and +1.32 "
    "(three).",
    "- Round 21, the last two stages pooled to 2x2 maps instead of one value per channel, each "
    "cell's features side by side (1,152-d; the target of `method.teacher.grid=2`, which keeps "
    "where in the image the teacher saw what): 85.9 / 85.2 / 84.8 / 85.5 / 84.9 on the five "
    "folder teachers against 83.7 / 84.8 / 85.6 / 84.5 / 83.8 for the two stages pooled (+2.2, "
    "+0.4, -0.8, +1.0, +1.1; mean +0.78), 86.6 against 85.5 on Fashion-MNIST. Students "
    "retrained for the demo's steps with that target gained on the kNN probe and not on the "
    "linear one (docs/STUDENT_LEVERS.md, `grid2`).",
    "- The probe is the demo's (the linear LR sweep and weighted kNN, k=200) on the folder's "
    "4,000 labelled training and 1,000 validation images; the features side by side are the "
    "stages' pooled outputs as they come (the student's target normalises each stage on its "
    "own). Nothing is trained: a row takes under a minute.",
]


def _features(net: Any, dataset: Any) -> dict[str, Any]:
    """Per-stage pooled features, the last map unpooled, the last two stages pooled to 2x2 cells
    (the target of ``method.teacher.grid=2``), and labels of ``dataset``."""
    import torch

    from s2bnn.eval.features import make_loader
    from s2bnn.teachers import stage_features

    parts: dict[str, list[Any]] = {}
    store: dict[str, Any] = {}
    last = list(net.blocks)[-1]
    hook = last.register_forward_hook(lambda m, a, o: store.__setitem__("map", o))
    try:
        for x, y in make_loader(dataset, 256, num_workers=0, device=torch.device("cpu")):
            with torch.no_grad():
                feats = stage_features(net, x.float(), None)
                cells = stage_features(net, x.float(), 2, grid=2)
            for k, f in enumerate(feats):
                parts.setdefault(f"stage{k + 1}", []).append(f)
            parts.setdefault("cells", []).append(torch.cat(cells, 1))
            parts.setdefault("map", []).append(store["map"].float().flatten(1))
            parts.setdefault("y", []).append(y)
    finally:
        hook.remove()
    return {k: torch.cat(v) for k, v in parts.items()}


def probe_row(row: str) -> dict[str, Any]:
    """The probes of row ``row``'s teacher, by feature set."""
    import torch

    from s2bnn.eval import load_backbone
    from s2bnn.eval.baselines import evaluate_features

    out, results = demo_row(DEMOS, row)
    ds = demo_eval_splits(results["config"]["data"])
    net, _ = load_backbone(out / "runs" / "teacher")
    net.eval()
    tr, te = _features(net, ds["train"]), _features(net, ds["test"])
    n = sum(1 for k in tr if k.startswith("stage"))
    sets: dict[str, tuple[str, ...]] = {f"stage {k}": (f"stage{k}",) for k in range(1, n + 1)}
    sets["last two stages"] = (f"stage{n - 1}", f"stage{n}")
    sets["last three stages"] = (f"stage{n - 2}", f"stage{n - 1}", f"stage{n}")
    sets["last stage's map, unpooled"] = ("map",)
    sets["last two stages, 2x2 cells"] = ("cells",)
    probes = {}
    for name, keys in sets.items():
        a, b = (torch.cat([f[k] for k in keys], 1) for f in (tr, te))
        r = evaluate_features(a, tr["y"], b, te["y"], knn_k=200)
        probes[name] = {"dims": int(a.shape[1]), "linear_top1": round(r["linear_top1"], 2),
                        "knn_top1": round(r["knn_top1"], 2)}
        print(f"   {row}: {name} ({a.shape[1]}-d) linear {r['linear_top1']:.2f} "
              f"kNN {r['knn_top1']:.2f}", flush=True)
    pixels = next(r for r in results["runs"] if r["name"] == "pixels")["linear_top1"]
    return {"seed": results["config"]["seed"], "pixels": pixels, "probes": probes,
            "machine": machine()}


def report(done: dict[str, Any]) -> None:
    machines = sorted({e["machine"] for e in done.values()})
    names = list(next(iter(done.values()))["probes"]) if done else []
    lines = [
        "# What the demo's teacher holds, stage by stage",
        "",
        "Made by `python benchmarks/teacher_stages.py` (its docstring says how). "
        + " ".join(f"Machine: {m}." for m in machines),
        "",
        "Linear (kNN) top-1 % of the demo's probe on the pooled outputs of each stage of the",
        "teacher of a demo_budget row (docs/DEMO_BUDGET.md), of stages side by side, and of the",
        "last stage's map before pooling; the teacher's own features (what the demo's student",
        "distils) are the last stage's. Δ: against the last stage.",
        "",
        "| row | seed | pixels | " + " | ".join(
            f"{n} ({next(iter(done.values()))['probes'][n]['dims']}-d)" for n in names) + " |",
        "|" + "---|" * (3 + len(names)),
    ]
    gains: dict[str, list[float]] = {n: [] for n in names}
    for row, e in done.items():
        last = e["probes"][[n for n in names if n.startswith("stage ")][-1]]["linear_top1"]
        cells = []
        for n in names:
            p = e["probes"][n]
            gains[n].append(p["linear_top1"] - last)
            cells.append(f"{p['linear_top1']:.1f} ({p['knn_top1']:.1f})")
        lines.append(f"| {row} | {e['seed']} | {e['pixels']:.1f} | " + " | ".join(cells) + " |")
    lines += ["", "Mean Δ linear against the last stage: " + ", ".join(
        f"{n} {statistics.mean(g):+.2f}" for n, g in gains.items()) + ".", ""]
    write_markdown(DOC, lines, NOTES)


def main() -> None:
    row_study_main(__doc__, ROWS, JSON, lambda row, _: probe_row(row), report,
                   reuse=lambda e: "last two stages, 2x2 cells" in e["probes"])


if __name__ == "__main__":
    main()
