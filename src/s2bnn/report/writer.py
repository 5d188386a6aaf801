"""``report.md`` and ``report.json``: the table, its notes and the plots, written atomically."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from s2bnn.checkpoint import atomic_write_bytes
from s2bnn.errors import UserError
from s2bnn.report.plots import (
    plot_comparison,
    plot_feature_maps,
    plot_lr_sweep,
    plot_training_curves,
)
from s2bnn.report.tables import format_table, pixel_note

__all__ = ["write_report"]


def _jsonable(run: dict[str, Any]) -> dict[str, Any]:
    skip = {"metrics", "embedding_sample", "sweep", "per_seed", "linear", "knn"}
    return {k: v for k, v in run.items() if k not in skip}


def write_report(
    runs: Sequence[dict[str, Any]],
    out_dir: str | Path,
    *,
    title: str = "s2bnn report",
    dataset: str | None = None,
    embedding: str = "pca",
    class_names: Sequence[str] | None = None,
    notes: Sequence[str] = (),
) -> Path:
    """Write ``report.md``, ``report.json`` and the PNG plots for ``runs`` into ``out_dir``.

    Plots without data (e.g. no ``metrics``) are skipped. Returns the path of ``report.md``.
    """
    if not runs:
        raise UserError("nothing to report: pass at least one run dir")
    if embedding not in ("pca", "tsne"):
        raise UserError(f"unknown embedding '{embedding}'; use pca or tsne")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    figures = [
        ("training_curves.png", "Training curves", plot_training_curves(
            runs, out / "training_curves.png")),
        ("comparison.png", "Accuracy by run", plot_comparison(runs, out / "comparison.png")),
        ("lr_sweep.png", "Linear-probe accuracy against learning rate",
         plot_lr_sweep(runs, out / "lr_sweep.png")),
        ("feature_maps.png", f"Test features in 2-D ({'PCA' if embedding == 'pca' else 't-SNE'})",
         plot_feature_maps(runs, out / "feature_maps.png", embedding, class_names)),
    ]
    lines = [f"# {title}", ""]
    if dataset:
        lines += [f"Dataset: **{dataset}**. Accuracies are top-1 in percent on the test split.", ""]
    else:
        lines += ["Accuracies are top-1 in percent on the test split.", ""]
    lines += [format_table(runs), ""]
    lines += [
        "kNN: weighted vote of the k nearest L2-normalised training features (k 200, "
        "T 0.1 unless stated). "
        "Linear (SGD/Adam): a linear probe on frozen, standardised features, learning rate "
        "chosen per optimiser on a held-out 10 % of the training set.",
        "",
    ]
    note = pixel_note(runs)
    extra = ([note] if note else []) + list(notes)
    monitor = [r["name"] for r in runs if r.get("knn_source") == "monitor"]
    if monitor:
        extra.append(f"kNN of {', '.join(monitor)} is the training monitor's last value "
                     "(a subset of the data), not a full `s2bnn eval knn`.")
    for text in extra:
        lines += [text, ""]
    for file, caption, made in figures:
        if made:
            lines += [f"## {caption}", "", f"![{caption}]({file})", ""]
    report = out / "report.md"
    atomic_write_bytes(report, "\n".join(lines).encode())
    summary = {"dataset": dataset, "runs": [_jsonable(r) for r in runs]}
    atomic_write_bytes(out / "report.json", (json.dumps(summary, indent=2, default=str) + "\n")
                       .encode())
    return report
