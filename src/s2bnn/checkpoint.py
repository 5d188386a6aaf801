"""The one place that reads and writes weights.

Writes are atomic: the bytes go to a temporary file in the same directory, are flushed and
fsync'ed, and only then renamed over the target, so a crash or a full disk mid-write never leaves
a truncated checkpoint in place of a good one. Reads use ``torch.load(weights_only=True)``: a
checkpoint that would need to run pickled code is refused, never executed.

A training checkpoint is a dict (written by :func:`s2bnn.engine.state.checkpoint_state`)::

    {"format": "s2bnn", "version": 1, "config": {...}, "epoch": int, "step": int,
     "backbone": {"name": str, "kwargs": {...}, "state_dict": {...}},
     "method": the rest of method.training_state(), "frozen_fingerprint": str | None,
     "optimizer": ..., "scheduler": ..., "rng": {...}, ...}

The backbone is stored once, under ``backbone``; checkpoints written before that also repeat it
as ``backbone.*`` keys of ``method``, and :func:`method_state` reads both.
"""

from __future__ import annotations

import functools
import io
import json
import os
import pickle
import tempfile
import warnings
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
    "method_state",
    "resolve_checkpoint",
    "save_safetensors",
    "load_safetensors",
]


@functools.cache
def _new_file_mode() -> int:
    """What ``open()`` gives a new file (0o666 less the umask); ``mkstemp`` would give 0o600."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return 0o666 & ~int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


def _write_temp(path: Path, data: bytes) -> Path:
    """``data`` in a new, complete and fsync'ed temporary file beside ``path``; removed again if
    the write fails (e.g. a full disk)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            os.fchmod(fh.fileno(), _new_file_mode())
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return Path(tmp)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see either the old file or the whole new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _write_temp(path, data)
    try:
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
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


def _unpickling_detail(err: Exception) -> str:
    """The informative line of torch's weights-only refusal (its first lines are boilerplate)."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    skip = ("Weights only load failed", "Please file an issue", "Check the documentation")
    useful = [line for line in lines if not line.startswith(skip)]
    text = (useful or lines or ["unsafe content"])[0]
    return text.removeprefix("WeightsUnpickler error:").strip()[:160] or "unsafe content"


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint without executing any pickled code.

    Raises :class:`CheckpointError` for a missing, truncated, unsafe or non-dict file.
    """
    path = resolve_checkpoint(path)
    if path.suffix == ".safetensors":
        return load_safetensors(path)
    try:
        with warnings.catch_warnings():
            # Noise before a refusal of an old-protocol pickle; the refusal says what matters.
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            obj = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        raise CheckpointError(
            f"refusing to load {path}: weights-only loading rejects its content "
            f"({_unpickling_detail(err)}); it is not a PyTorch checkpoint of plain tensors, or it "
            "holds pickled code or objects; only load checkpoints you trust, re-saved as plain "
            "tensors (e.g. safetensors)"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"cannot read checkpoint {path}: {first[:200]} (truncated or not a "
                              "PyTorch file?)") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, expected a dict of weights")
    return obj


def method_state(ckpt: dict[str, Any]) -> dict[str, Any]:
    """A training checkpoint's whole method state: its ``method`` entry with the backbone's
    tensors (stored once, under ``backbone``) back under ``backbone.*``."""
    state = dict(ckpt.get("method") or {})
    entry = ckpt.get("backbone")
    if isinstance(entry, dict) and isinstance(entry.get("state_dict"), dict):
        for key, value in entry["state_dict"].items():
            state.setdefault(f"backbone.{key}", value)
    return state


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
