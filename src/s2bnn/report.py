"""Tables and plots from run dirs: ``report.md`` plus PNGs (matplotlib, Agg backend).

A *run* here is a plain dict, so the demo can pass rows that never had a run dir (raw pixels,
untrained seeds). Recognised keys, all optional except ``name``:

``name``, ``method``, ``backbone``, ``binary`` (bool or text), ``params``, ``binary_params``,
``ops``; accuracies in percent: ``knn_top1``, ``linear_top1``, ``linear_top1_sgd``,
``linear_top1_adam``, ``linear_protocol_top1``, ``finetune`` (``{"1": top1, "10": top1}``, keys
are label percentages) and ``<key>_std`` for any of them; ``metrics`` (rows of
``metrics.csv`` as dicts of floats); ``sweep`` or ``linear`` (the fast linear sweep dict with
``sgd``/``adam`` curves); ``embedding_sample`` (``{"features", "labels"}`` arrays or tensors of
test features). The dicts returned by ``s2bnn.eval.evaluate_backbone``, ``evaluate_pixels``
and ``evaluate_untrained`` can be passed as they are, with a ``name`` added.

:func:`collect_run` builds such a dict from a run dir and the ``eval_*.json`` files that
``s2bnn eval`` wrote into it.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from s2bnn.checkpoint import atomic_write_bytes
from s2bnn.errors import RunDirError, UserError

__all__ = ["collect_run", "read_metrics", "write_report", "format_table", "embed_2d"]

_ACC_KEYS = ("knn_top1", "linear_top1", "linear_top1_sgd", "linear_top1_adam",
             "linear_protocol_top1")


# --------------------------------------------------------------------------- reading run dirs
def read_metrics(path: str | Path) -> list[dict[str, float | None]]:
    """Rows of a ``metrics.csv`` with every cell as float (``None`` when empty or not a number)."""
    path = Path(path)
    if not path.is_file():
        return []
    rows = []
    with path.open(newline="") as fh:
        for raw in csv.DictReader(fh):
            row: dict[str, float | None] = {}
            for key, value in raw.items():
                if key is None:
                    continue
                try:
                    row[key] = float(value) if value not in (None, "") else None
                except ValueError:
                    row[key] = None
            rows.append(row)
    return rows


def _read_json(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None


def _binary_label(act: Any, weight: Any) -> str | bool | None:
    if act is None and weight is None:
        return None
    if act and weight:
        return True
    if act:
        return "activations"
    if weight:
        return "weights"
    return False


def _model_facts(run_dir: Path, config: dict[str, Any] | None) -> dict[str, Any]:
    """Backbone name, binary mode, parameters and OPs, from the checkpoint and the profiler."""
    from s2bnn.eval.loading import load_backbone

    facts: dict[str, Any] = {}
    try:
        model, info = load_backbone(run_dir)
    except UserError:
        return facts
    facts["backbone"] = info["name"]
    facts["binary"] = _binary_label(getattr(model, "binary_act", info["kwargs"].get("binary_act")),
                                    getattr(model, "binary_weight",
                                            info["kwargs"].get("binary_weight")))
    facts["params"] = int(sum(p.numel() for p in model.parameters()))
    data = (config or {}).get("data") or {}
    try:
        from s2bnn.models.profile import profile_model

        size = data.get("image_size")
        if not size:
            from s2bnn.data import default_image_size

            size = default_image_size(data.get("name") or "fashion-mnist")
        prof = profile_model(model, image_size=int(size), in_chans=int(info["in_chans"] or 1))
    except (ImportError, UserError, OSError):
        return facts
    for key in ("real_params", "binary_params", "ops", "flops", "bops"):
        if prof.get(key) is not None:
            facts[key] = prof[key]
    if prof.get("real_params") is not None and prof.get("binary_params") is not None:
        facts["params"] = int(prof["real_params"]) + int(prof["binary_params"])
    return facts


def collect_run(run_dir: str | Path, *, profile: bool = True) -> dict[str, Any]:
    """A report row from a run dir: its config, metrics.csv, eval_*.json and feature sample."""
    from s2bnn.eval.loading import read_run_config
    from s2bnn.eval.runs import SAMPLE_FILE, load_embedding_sample

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise RunDirError(f"run dir not found: {run_dir}")
    config = read_run_config(run_dir)
    metrics = read_metrics(run_dir / "metrics.csv")
    evals = sorted(run_dir.glob("eval_*.json"))
    if config is None and not metrics and not evals:
        raise RunDirError(
            f"{run_dir} is not a run dir (no config.yaml, metrics.csv or eval_*.json); "
            "pass directories written by `s2bnn train`"
        )
    run: dict[str, Any] = {"name": run_dir.name, "run_dir": str(run_dir), "metrics": metrics}
    if config:
        run["method"] = (config.get("method") or {}).get("name")
        model = config.get("model") or {}
        run["backbone"] = model.get("name")
        run["dataset"] = (config.get("data") or {}).get("name")
    if profile and (run_dir / "checkpoints" / "last.pt").is_file():
        run.update({k: v for k, v in _model_facts(run_dir, config).items() if v is not None})
    linear = _read_json(run_dir / "eval_linear.json")
    if linear:
        for key in _ACC_KEYS:
            if linear.get(key) is not None:
                run[key] = linear[key]
        if isinstance(linear.get("linear"), dict):
            run["sweep"] = linear["linear"]
    knn = _read_json(run_dir / "eval_knn.json")
    if knn and knn.get("knn_top1") is not None:
        run["knn_top1"] = knn["knn_top1"]
    protocol = _read_json(run_dir / "eval_linear_protocol.json")
    if protocol and protocol.get("linear_top1") is not None:
        run["linear_protocol_top1"] = protocol["linear_top1"]
    finetune: dict[str, float] = {}
    for path in run_dir.glob("eval_finetune_*.json"):
        res = _read_json(path)
        if res and res.get("finetune_top1") is not None:
            finetune[path.stem[len("eval_finetune_"):]] = res["finetune_top1"]
    if finetune:
        run["finetune"] = finetune
    if "knn_top1" not in run:
        # Fall back to the training monitor's last kNN value.
        last = [r["knn_top1"] for r in metrics if r.get("knn_top1") is not None]
        if last:
            run["knn_top1"] = last[-1]
            run["knn_source"] = "monitor"
    sample = load_embedding_sample(run_dir / SAMPLE_FILE)
    if sample is not None:
        run["embedding_sample"] = sample
    return run


# --------------------------------------------------------------------------- table
def _fmt_acc(run: dict[str, Any], key: str) -> str:
    value = run.get(key)
    if value is None:
        return "—"
    std = run.get(f"{key}_std")
    return f"{value:.1f} ± {std:.1f}" if std is not None else f"{value:.1f}"


def _fmt_count(value: Any) -> str:
    if value is None:
        return "—"
    value = float(value)
    if value >= 1e9:
        return f"{value / 1e9:.2f} G"
    if value >= 1e6:
        return f"{value / 1e6:.2f} M"
    if value >= 1e3:
        return f"{value / 1e3:.1f} k"
    return f"{value:.0f}"


def _fmt_binary(value: Any) -> str:
    if value is None:
        return "—"
    if value is True:
        return "yes"
    if value is False:
        return "no"
    return str(value)


def _fmt_params(run: dict[str, Any]) -> str:
    total = run.get("params")
    if total is None:
        return "—"
    binary = run.get("binary_params")
    if binary:
        return f"{_fmt_count(total)} ({_fmt_count(binary)} binary)"
    return _fmt_count(total)


def _finetune_tags(runs: Sequence[dict[str, Any]]) -> list[str]:
    tags = {tag for run in runs for tag in (run.get("finetune") or {})}
    return sorted(tags, key=lambda t: float(t) if _is_number(t) else math.inf)


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def format_table(runs: Sequence[dict[str, Any]]) -> str:
    """The Markdown results table: one row per run, fine-tune columns only when present."""
    tags = _finetune_tags(runs)
    protocol = any(r.get("linear_protocol_top1") is not None for r in runs)
    head = ["Run", "Method", "Backbone", "Binary", "Params", "OPs", "kNN top-1",
            "Linear top-1 (SGD)", "Linear top-1 (Adam)"]
    if protocol:
        head.append("Linear top-1 (protocol)")
    head += [f"Fine-tune {t} %" for t in tags]
    align = ["---"] * 4 + ["---:"] * (len(head) - 4)
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(align) + "|"]
    for run in runs:
        cells = [
            str(run.get("name", "?")), str(run.get("method") or "—"),
            str(run.get("backbone") or "—"), _fmt_binary(run.get("binary")), _fmt_params(run),
            _fmt_count(run.get("ops")), _fmt_acc(run, "knn_top1"),
            _fmt_acc(run, "linear_top1_sgd"), _fmt_acc(run, "linear_top1_adam"),
        ]
        if protocol:
            cells.append(_fmt_acc(run, "linear_protocol_top1"))
        ft = run.get("finetune") or {}
        cells += [f"{ft[t]:.1f}" if ft.get(t) is not None else "—" for t in tags]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _best_linear(run: dict[str, Any]) -> float | None:
    if run.get("linear_top1") is not None:
        return float(run["linear_top1"])
    values = [run.get(k) for k in ("linear_top1_sgd", "linear_top1_adam", "linear_protocol_top1")]
    values = [float(v) for v in values if v is not None]
    return max(values) if values else None


def _pixel_note(runs: Sequence[dict[str, Any]]) -> str | None:
    pixels = next((r for r in runs if r.get("method") == "pixels" or r.get("name") == "pixels"),
                  None)
    if pixels is None or _best_linear(pixels) is None:
        return None
    ref = _best_linear(pixels)
    below = [r["name"] for r in runs if r is not pixels and _best_linear(r) is not None
             and _best_linear(r) < ref]  # type: ignore[operator]
    if not below:
        return f"Every run's linear probe is above the raw-pixel baseline ({ref:.1f} %)."
    return (f"**Below the raw-pixel baseline** ({ref:.1f} % linear top-1): "
            f"{', '.join(below)}. Their features are worse for a linear classifier than the "
            "flattened images themselves.")


# --------------------------------------------------------------------------- plots
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
    tags = _finetune_tags(runs)
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


def embed_2d(features: Any, method: str = "pca", seed: int = 0) -> np.ndarray:
    """A 2-D embedding of ``(N, D)`` features: ``pca`` (SVD) or ``tsne`` (scikit-learn)."""
    x = np.asarray(features, dtype=np.float64)
    x = x - x.mean(0, keepdims=True)
    if method == "pca":
        if x.shape[1] < 2:
            return np.concatenate([x, np.zeros((len(x), 2 - x.shape[1]))], axis=1)
        _, _, vt = np.linalg.svd(x, full_matrices=False)
        return x @ vt[:2].T
    if method == "tsne":
        from sklearn.manifold import TSNE

        perplexity = float(min(30.0, max(2.0, (len(x) - 1) / 3)))
        return TSNE(n_components=2, init="pca", perplexity=perplexity,
                    random_state=seed).fit_transform(x)
    raise UserError(f"unknown embedding '{method}'; use pca or tsne")


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


# --------------------------------------------------------------------------- report
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
    note = _pixel_note(runs)
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
