"""The Markdown results table and the notes under it."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

__all__ = ["format_table", "finetune_tags", "pixel_note"]


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


def finetune_tags(runs: Sequence[dict[str, Any]]) -> list[str]:
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
    tags = finetune_tags(runs)
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


def pixel_note(runs: Sequence[dict[str, Any]]) -> str | None:
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
