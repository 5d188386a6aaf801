"""Evaluation of frozen backbones: features, linear probe, kNN, fine-tuning, baselines.

Public names are imported lazily (PEP 562): importing one module (the engine's kNN monitor
reads ``s2bnn.eval.features``) does not import every probe.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "extract_features": "features",
    "standardize": "features",
    "topk_accuracy": "features",
    "knn_eval": "knn",
    "knn_scores": "knn",
    "fast_linear_sweep": "linear_sweep",
    "linear_probe_protocol": "linear_protocol",
    "DEFAULT_SGD_LRS": "linear_sweep",
    "DEFAULT_ADAM_LRS": "linear_sweep",
    "finetune": "finetune",
    "check_label_fraction": "finetune",
    "evaluate_features": "baselines",
    "evaluate_backbone": "baselines",
    "evaluate_pixels": "baselines",
    "evaluate_untrained": "baselines",
    "load_backbone": "loading",
    "export_backbone": "loading",
    "prepare_eval": "runs",
    "run_knn": "runs",
    "run_linear": "runs",
    "run_finetune": "runs",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 's2bnn.eval' has no attribute '{name}'")
    value = getattr(importlib.import_module(f"s2bnn.eval.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
