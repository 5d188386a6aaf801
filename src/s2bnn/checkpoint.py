"""The one place that reads and writes weights.

Writes are atomic: the bytes go to a temporary file in the same directory, are flushed and
fsync'ed, and only then renamed over the target, so a crash or a full disk mid-write never leaves
a truncated checkpoint in place of a good one. Reads use ``torch.load(weights_only=True)``: a
checkpoint that would need to run pickled code is refused, never executed.

A training checkpoint is a dict::

    {"format": "s2bnn", "version": 1, "config": {...}, "epoch": int, "step": int,
     "backbone": {"name": str, "kwargs": {...}, "state_dict": {...}},
     "method": state_dict, "optimizer": ..., "scheduler": ..., "rng": {...}, ...}
"""

from __future__ import annotations

import io
import json
import os
import pickle
import tempfile
from pathlib import Path
from typing import Any

import torch

from s2bnn.errors import CheckpointError

FORMAT = "s2bnn"
VERSION = 1

__all__ = [
    "FORMAT",
    "VERSION",
    "atomic_write_bytes",
    "save_checkpoint",
    "load_checkpoint",
    "resolve_checkpoint",
    "save_safetensors",
    "load_safetensors",
]


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see either the old file or the whole new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    # The rename itself must survive a power cut: sync the directory entry too.
    try:
        dir_fd = os.open(path.parent, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dir_fd)
    except OSError:
        pass
    finally:
        os.close(dir_fd)


def save_checkpoint(state: dict[str, Any], path: str | Path) -> None:
    """Serialise ``state`` with ``torch.save`` and write it atomically to ``path``."""
    buf = io.BytesIO()
    torch.save(state, buf)
    atomic_write_bytes(path, buf.getvalue())


def resolve_checkpoint(path: str | Path) -> Path:
    """A run dir (its ``checkpoints/last.pt``) or a file; fail with a hint otherwise."""
    path = Path(path)
    if path.is_dir():
        candidate = path / "checkpoints" / "last.pt"
        if candidate.is_file():
            return candidate
        raise CheckpointError(
            f"{path} is a directory without checkpoints/last.pt; pass a run dir or a .pt file"
        )
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    return path


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint without executing any pickled code.

    Raises :class:`CheckpointError` for a missing, truncated, unsafe or non-dict file.
    """
    path = resolve_checkpoint(path)
    if path.suffix == ".safetensors":
        return load_safetensors(path)
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else "unsafe content"
        raise CheckpointError(
            f"refusing to load {path}: it holds objects that weights-only loading does not allow "
            f"({first[:160]}); only load checkpoints you trust, re-saved as plain tensors"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"cannot read checkpoint {path}: {first[:200]} (truncated or not a "
                              "PyTorch file?)") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, expected a dict of weights")
    return obj


def save_safetensors(
    tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, Any] | None = None
) -> None:
    """Write tensors (and JSON-able metadata) as a safetensors file, atomically."""
    from safetensors.torch import save

    meta = {k: json.dumps(v) for k, v in (metadata or {}).items()}
    data = save({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, metadata=meta)
    atomic_write_bytes(path, data)


def load_safetensors(path: str | Path) -> dict[str, Any]:
    """Read a safetensors file: ``{"state_dict": tensors, "metadata": decoded metadata}``."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        tensors: dict[str, torch.Tensor] = {}
        with safe_open(str(path), framework="pt", device="cpu") as fh:
            raw_meta = fh.metadata() or {}
            for key in fh.keys():
                tensors[key] = fh.get_tensor(key)
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"cannot read safetensors file {path}: {err}") from None
    meta: dict[str, Any] = {}
    for key, value in raw_meta.items():
        try:
            meta[key] = json.loads(value)
        except json.JSONDecodeError:
            meta[key] = value
    return {"state_dict": tensors, "metadata": meta}
