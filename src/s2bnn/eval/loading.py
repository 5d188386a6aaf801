"""Rebuild a backbone from a run dir, a training checkpoint or an exported safetensors file."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import yaml

from s2bnn.checkpoint import load_checkpoint, load_safetensors, save_safetensors
from s2bnn.errors import CheckpointError, RunDirError

__all__ = ["load_backbone", "export_backbone", "run_dir_of", "read_run_config"]

EXPORT_FORMAT = "s2bnn-backbone"


def run_dir_of(path: str | Path) -> Path | None:
    """The run dir a path belongs to: the dir itself, or ``RUN/`` for ``RUN/checkpoints/x.pt``."""
    path = Path(path)
    if path.is_dir():
        return path
    parent = path.parent
    if parent.name == "checkpoints" and (parent.parent / "config.yaml").is_file():
        return parent.parent
    return None


def read_run_config(run_dir: str | Path) -> dict[str, Any] | None:
    """The resolved ``config.yaml`` of a run dir as a plain dict, or ``None`` without one."""
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        return None
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError:
        return None
    return data if isinstance(data, dict) else None


def _backbone_entry(obj: dict[str, Any], source: str) -> dict[str, Any]:
    entry = obj.get("backbone")
    if not isinstance(entry, dict) or "name" not in entry or "state_dict" not in entry:
        raise CheckpointError(
            f"{source} holds no backbone (expected an s2bnn training checkpoint with a "
            "'backbone' entry {name, kwargs, state_dict}); pass a run dir, its "
            "checkpoints/last.pt, or a file written by `s2bnn export`"
        )
    return entry


def load_backbone(path: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the student backbone saved at ``path`` in eval mode.

    ``path`` is a run dir (its ``checkpoints/last.pt``), a training checkpoint, or a safetensors
    file written by :func:`export_backbone`. Returns ``(backbone, info)``; ``info`` holds
    ``name``, ``kwargs``, ``source``, ``run_dir`` (or ``None``), ``config`` (the run's resolved
    config as a dict, or ``None``), ``epoch``, ``step`` and ``in_chans``.
    """
    from s2bnn.models import build_model, load_backbone_state
    from s2bnn.models.common import model_in_chans

    path = Path(path)
    source = str(path)
    run_dir = run_dir_of(path)
    config: dict[str, Any] | None = None
    epoch = step = None
    if path.suffix == ".safetensors":
        obj = load_safetensors(path)
        meta = obj["metadata"]
        if "name" not in meta:
            raise CheckpointError(
                f"{source} has no backbone metadata (name, kwargs); only safetensors files "
                "written by `s2bnn export` can be evaluated"
            )
        name, kwargs, state = meta["name"], dict(meta.get("kwargs") or {}), obj["state_dict"]
        if isinstance(meta.get("config"), dict):
            config = meta["config"]
        epoch, step = meta.get("epoch"), meta.get("step")
    else:
        obj = load_checkpoint(path)
        entry = _backbone_entry(obj, source)
        name, kwargs, state = entry["name"], dict(entry.get("kwargs") or {}), entry["state_dict"]
        config = obj.get("config") if isinstance(obj.get("config"), dict) else None
        epoch, step = obj.get("epoch"), obj.get("step")
    if config is None and run_dir is not None:
        config = read_run_config(run_dir)
    kwargs["num_classes"] = 0  # always the pooled-feature form
    model = build_model(name, **kwargs)
    load_backbone_state(model, state, source)
    model.eval()
    info = {
        "name": name,
        "kwargs": kwargs,
        "source": source,
        "run_dir": str(run_dir) if run_dir is not None else None,
        "config": config,
        "epoch": epoch,
        "step": step,
        "in_chans": model_in_chans(model, kwargs),
        "feature_dim": int(getattr(model, "feature_dim", 0)) or None,
    }
    return model, info


def export_backbone(path: str | Path, out: str | Path, force: bool = False) -> Path:
    """Write the backbone of a run dir or checkpoint as safetensors with its build metadata.

    The file holds the backbone's tensors and metadata ``format``, ``name``, ``kwargs`` (enough
    for ``build_model(name, **kwargs)``), ``config`` (the run's), ``epoch`` and ``step``.
    An existing ``out`` is only overwritten with ``force``.
    """
    out = Path(out)
    if out.suffix != ".safetensors":
        raise RunDirError(f"export target {out} must end in .safetensors")
    if out.exists() and not force:
        raise RunDirError(f"{out} already exists; pass --force to overwrite it")
    source = str(path)
    obj = load_checkpoint(path)
    entry = _backbone_entry(obj, source)
    config = obj.get("config")
    if not isinstance(config, dict):
        rd = run_dir_of(path)
        config = read_run_config(rd) if rd is not None else None
    # clone(): safetensors refuses tensors that share storage.
    tensors = {k: v.detach().clone() for k, v in entry["state_dict"].items()
               if isinstance(v, torch.Tensor)}
    meta: dict[str, Any] = {
        "format": EXPORT_FORMAT,
        "name": entry["name"],
        "kwargs": dict(entry.get("kwargs") or {}),
        "epoch": obj.get("epoch"),
        "step": obj.get("step"),
    }
    if config is not None:
        meta["config"] = config
    save_safetensors(tensors, out, metadata=meta)
    return out
