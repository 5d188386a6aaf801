"""The report's PNG plots (matplotlib, Agg backend); each returns False when it has no data."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from s2bnn.report.embed import embed_2d
from s2bnn.report.tables import finetune_tags

__all__ = ["plot_training_curves", "plot_comparison", "plot_lr_sweep", "plot_feature_maps"]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _series(rows: list[dict[str, Any]], x: str, y: str) -> tuple[list[float], list[float]]:
    xs, ys = [], []
    for row in rows:
        if row.get(x) is not None and row.get(y) is not None and math.isfinite(row[y]):
            xs.append(row[x])
            ys.append(row[y])
    return xs, ys


def plot_training_curves(runs: Sequence[dict[str, Any]], path: Path) -> bool:
    """Loss against step, kNN top-1 against epoch (and cosine when logged), one line per run."""
    panels = [("step", "loss", "training loss"), ("epoch", "knn_top1", "kNN top-1 (%)"),
              ("step", "cosine", "student-teacher cosine")]
    panels = [p for p in panels
              if any(_series(r.get("metrics") or [], p[0], p[1])[0] for r in runs)]
    if not panels:
        return False
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.6), squeeze=False)
    for ax, (x, y, label) in zip(axes[0], panels):
        for run in runs:
            xs, ys = _series(run.get("metrics") or [], x, y)
            if xs:
                ax.plot(xs, ys, marker="o" if len(xs) < 20 else None, ms=3, label=run["name"])
        ax.set_xlabel(x)
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def plot_comparison(runs: Sequence[dict[str, Any]], path: Path) -> bool:
    """Grouped bars: kNN and linear (SGD, Adam, protocol) top-1 and fine-tune per run."""
    keys = [("knn_top1", "kNN"), ("linear_top1_sgd", "linear SGD"),
            ("linear_top1_adam", "linear Adam"), ("linear_protocol_top1", "linear protocol")]
    keys = [k for k in keys if any(r.get(k[0]) is not None for r in runs)]
    tags = finetune_tags(runs)
    if not keys and not tags:
        return False
    plt = _pyplot()
    series = [(label, [r.get(key) for r in runs], [r.get(f"{key}_std") for r in runs])
              for key, label in keys]
    series += [(f"fine-tune {t} %", [(r.get("finetune") or {}).get(t) for r in runs],
                [None] * len(runs)) for t in tags]
    n = len(series)
    width = 0.8 / n
    fig, ax = plt.subplots(figsize=(max(6.0, 1.3 * len(runs) + 2) + 1.5, 4))
    xs = np.arange(len(runs))
    for i, (label, values, stds) in enumerate(series):
        vals = [v if v is not None else 0.0 for v in values]
        errs = [s if s is not None else 0.0 for s in stds]
        bars = ax.bar(xs + (i - (n - 1) / 2) * width, vals, width, label=label,
                      yerr=errs if any(errs) else None, capsize=2)
        for bar, v in zip(bars, values):
            if v is not None:
                ax.annotate(f"{v:.1f}", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                            ha="center", va="bottom", fontsize=6)
    known = [v for _, values, _ in series for v in values if v is not None]
    low = max(0.0, min(known) - 10) if known else 0.0
    ax.set_ylim(low, 100 if not known else min(100.0, max(known) + 5))
    ax.set_xticks(xs)
    ax.set_xticklabels([r["name"] for r in runs], rotation=20, ha="right")
    ax.set_ylabel("top-1 (%)")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _sweep_of(run: dict[str, Any]) -> dict[str, Any]:
    """The fast-sweep dict of a run: ``sweep``, or ``linear`` as ``evaluate_*`` return it."""
    for key in ("sweep", "linear"):
        if isinstance(run.get(key), dict):
            return run[key]
    return {}


def plot_lr_sweep(runs: Sequence[dict[str, Any]], path: Path) -> bool:
    """Linear-probe test top-1 against learning rate, SGD and Adam side by side.

    The star marks the LR chosen on the held-out part of the training set.
    """
    opts = [o for o in ("sgd", "adam")
            if any(isinstance(_sweep_of(r).get(o), dict) for r in runs)]
    if not opts:
        return False
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(opts), figsize=(5.2 * len(opts), 3.8), squeeze=False)
    for ax, opt in zip(axes[0], opts):
        for run in runs:
            curve = _sweep_of(run).get(opt)
            if not isinstance(curve, dict) or not curve.get("lrs"):
                continue
            (line,) = ax.plot(curve["lrs"], curve["test_top1"], marker="o", ms=3,
                              label=run["name"])
            best = curve.get("best_lr")
            if best in curve["lrs"]:
                i = curve["lrs"].index(best)
                ax.plot([best], [curve["test_top1"][i]], marker="*", ms=12,
                        color=line.get_color())
        ax.set_xscale("log")
        ax.set_xlabel(f"{'SGD' if opt == 'sgd' else 'Adam'} learning rate")
        ax.set_ylabel("linear-probe test top-1 (%)")
        ax.grid(alpha=0.3, which="both")
        ax.set_title(f"{'SGD' if opt == 'sgd' else 'Adam'} probe (★: chosen on held-out split)",
                     fontsize=9)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def plot_feature_maps(
    runs: Sequence[dict[str, Any]], path: Path, method: str = "pca",
    class_names: Sequence[str] | None = None,
) -> bool:
    """One 2-D map of test features per run, coloured by class."""
    have = [r for r in runs if isinstance(r.get("embedding_sample"), dict)]
    if not have:
        return False
    plt = _pyplot()
    cols = min(3, len(have))
    rows = math.ceil(len(have) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 4 * rows), squeeze=False)
    cmap = plt.get_cmap("tab10")
    labels_seen: set[int] = set()
    for ax, run in zip(axes.flat, have):
        sample = run["embedding_sample"]
        feats = np.asarray(sample["features"], dtype=np.float64)
        labels = np.asarray(sample["labels"]).astype(int)
        xy = embed_2d(feats, method)
        for cls in np.unique(labels):
            m = labels == cls
            name = class_names[cls] if class_names and cls < len(class_names) else str(cls)
            ax.scatter(xy[m, 0], xy[m, 1], s=3, color=cmap(int(cls) % 10),
                       label=name if int(cls) not in labels_seen else None)
            labels_seen.add(int(cls))
        ax.set_title(f"{run['name']} ({method.upper() if method == 'pca' else 't-SNE'})",
                     fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    for ax in list(axes.flat)[len(have):]:
        ax.axis("off")
    fig.legend(loc="lower center", ncol=min(10, max(1, len(labels_seen))), fontsize=7,
               markerscale=3)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
