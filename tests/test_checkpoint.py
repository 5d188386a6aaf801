"""Checkpoints: atomic writes that survive a failing disk, weights-only reads that refuse code."""

from __future__ import annotations

import errno
import os
import pickle

import pytest
import torch

from s2bnn import checkpoint as ckpt
from s2bnn.errors import CheckpointError


def test_roundtrip_and_run_dir_resolution(tmp_path):
    state = {"format": ckpt.FORMAT, "epoch": 3, "w": torch.arange(4.0)}
    ckpt.save_checkpoint(state, tmp_path / "run" / "checkpoints" / "last.pt")
    loaded = ckpt.load_checkpoint(tmp_path / "run")
    assert loaded["epoch"] == 3 and torch.equal(loaded["w"], state["w"])
    assert not [p for p in (tmp_path / "run" / "checkpoints").iterdir() if p.suffix == ".tmp"]


class _Exploit:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_crafted_pickle_is_refused(tmp_path):
    path = tmp_path / "evil.pt"
    with open(path, "wb") as fh:
        pickle.dump({"state_dict": _Exploit()}, fh)
    with pytest.raises(CheckpointError, match="refusing to load"):
        ckpt.load_checkpoint(path)


def test_truncated_and_missing(tmp_path):
    path = tmp_path / "good.pt"
    ckpt.save_checkpoint({"w": torch.ones(1000)}, path)
    (tmp_path / "cut.pt").write_bytes(path.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        ckpt.load_checkpoint(tmp_path / "cut.pt")
    with pytest.raises(CheckpointError, match="not found"):
        ckpt.load_checkpoint(tmp_path / "absent.pt")
    with pytest.raises(CheckpointError, match="without checkpoints/last.pt"):
        ckpt.load_checkpoint(tmp_path)


def test_full_disk_keeps_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    ckpt.save_checkpoint({"epoch": 1}, path)
    before = path.read_bytes()

    def no_space(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ckpt.os, "fsync", no_space)
    with pytest.raises(OSError, match="No space"):
        ckpt.save_checkpoint({"epoch": 2, "big": torch.zeros(10)}, path)
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # temp file cleaned up
    assert ckpt.load_checkpoint(path)["epoch"] == 1


def test_safetensors_roundtrip_with_metadata(tmp_path):
    path = tmp_path / "w.safetensors"
    ckpt.save_safetensors({"a": torch.randn(2, 3)}, path, {"name": "resnet18", "kwargs": {"x": 1}})
    out = ckpt.load_checkpoint(path)
    assert out["metadata"] == {"name": "resnet18", "kwargs": {"x": 1}}
    assert out["state_dict"]["a"].shape == (2, 3)
    (tmp_path / "bad.safetensors").write_bytes(b"garbage")
    with pytest.raises(CheckpointError):
        ckpt.load_checkpoint(tmp_path / "bad.safetensors")
