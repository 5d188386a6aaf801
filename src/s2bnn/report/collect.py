"""Report rows from run dirs: config, ``metrics.csv``, ``eval_*.json``, model facts."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from s2bnn.errors import RunDirError, UserError

__all__ = ["collect_run", "read_metrics"]

_ACC_KEYS = ("knn_top1", "linear_top1", "linear_top1_sgd", "linear_top1_adam",
             "linear_protocol_top1")


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
