"""Fault injection: a real ``s2bnn train`` process is SIGKILLed mid-epoch, half-way through a
checkpoint write and just before the checkpoint's rename; rerunning the same command with
``resume=auto`` ends bit-identical to an uninterrupted run (CPU, deterministic, one thread).

The kills come from the test helper :mod:`faults` (``$S2BNN_FAULT``; the library has no hooks):
``python tests/faults.py train ...`` is ``s2bnn train ...`` with the named fault installed, and
the process sends itself SIGKILL at the chosen point, so the test is deterministic and the kill
is as hard as ``kill -9`` (no handler, no ``finally``, no flush).
"""

from __future__ import annotations

import contextlib
import csv
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import faults
import pytest
from faults import FAULT_ENV
from helpers import assert_identical

from s2bnn import checkpoint as ckpt
from s2bnn.checkpoint import load_checkpoint
from s2bnn.errors import CheckpointError

# 48 images of 8x8 px, batch 16: 3 steps per epoch, 3 epochs. MoCo v2 has a momentum encoder
# and a queue; the kNN monitor draws random numbers of its own; Adam has per-parameter state.
RECIPE = """\
epochs: 3
batch_size: 16
progress: false
device: cpu
deterministic: true
log_every: 1
knn_every: 1
knn_train_size: 32
knn_test_size: 16
seed: 5
data: {name: "synthetic:1:8:48:4"}
model: {name: reactnet_small, width_mult: 0.0625}
method: {name: mocov2, queue_size: 32, momentum: 0.9}
optim: {name: adam, lr: 0.01, warmup_epochs: 0.5}
"""


def _env(fault: str | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != FAULT_ENV}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    if fault:
        env[FAULT_ENV] = fault
    return env


def _command(recipe: Path, out: Path, *over: str) -> list[str]:
    return [sys.executable, faults.__file__, "train", str(recipe), f"output_dir={out}", *over]


def train_cli(recipe: Path, out: Path, *over: str, fault: str | None = None
              ) -> subprocess.CompletedProcess:
    return subprocess.run(_command(recipe, out, *over), env=_env(fault), capture_output=True,
                          text=True, timeout=180)


def temp_files(run: Path) -> list[Path]:
    return sorted(p for d in (run, run / "checkpoints") for p in d.glob(".*.tmp"))


def rows(run: Path) -> list[dict[str, str]]:
    with (run / "metrics.csv").open() as fh:
        return [{k: v for k, v in r.items() if k != "img_per_s"} for r in csv.DictReader(fh)]




def killed(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == -signal.SIGKILL, (proc.returncode, proc.stderr[-2000:])


@contextlib.contextmanager
def uninterrupted_alongside(recipe: Path, full: Path, *over: str) -> Iterator[None]:
    """The uninterrupted reference run, in a process of its own beside the body (2 cores)."""
    ref = subprocess.Popen(_command(recipe, full, *over), env=_env(None),
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        yield
    finally:
        _, err = ref.communicate(timeout=180)
    assert ref.returncode == 0, err[-2000:]


def assert_same_finished_run(full: Path, run: Path) -> None:
    """The interrupted-and-resumed ``run`` ended as the 9-step ``full`` run did, bit for bit."""
    a, b = load_checkpoint(full), load_checkpoint(run)
    assert b["finished"] and (b["epoch"], b["step"]) == (a["epoch"], a["step"]) == (3, 9)
    for key in ("method", "backbone", "optimizer", "scheduler", "rng"):
        assert_identical(a[key], b[key], key)
    # Rows the killed processes logged after their last checkpoint were dropped, then re-logged.
    assert rows(run) == rows(full)


@pytest.mark.slow
def test_sigkill_anywhere_then_resume_is_bit_identical(tmp_path: Path) -> None:
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(RECIPE)
    full, run = tmp_path / "full", tmp_path / "run"
    with uninterrupted_alongside(recipe, full):
        # 1. Killed mid-epoch 2, right after step 5 (step 4 was logged): last.pt is epoch 1's.
        killed(train_cli(recipe, run, fault="kill-step:5"))
        first = load_checkpoint(run)
        assert (first["epoch"], first["step"], first["finished"]) == (1, 3, False)
        assert rows(run)[-1]["step"] == "4"
        good = (run / "checkpoints" / "last.pt").read_bytes()

        # 2. Resumed, then killed half-way through writing epoch 2's checkpoint: the truncated
        #    temporary file is left beside last.pt, which still holds epoch 1, byte for byte.
        killed(train_cli(recipe, run, "resume=auto", fault="kill-write:last.pt:1"))
        assert (run / "checkpoints" / "last.pt").read_bytes() == good
        [partial] = temp_files(run)
        assert partial.parent.name == "checkpoints" and partial.name.startswith(".last.pt.")
        assert 0 < partial.stat().st_size < len(good) * 3 // 4
        with pytest.raises(CheckpointError):
            load_checkpoint(partial)

        # 3. Resumed again (the stale temporary file is removed); epoch 2's checkpoint is
        #    written, and the process dies after writing epoch 3's in full, before its rename.
        killed(train_cli(recipe, run, "resume=auto", fault="kill-rename:last.pt:2"))
        assert not partial.exists()
        second = load_checkpoint(run)
        assert (second["epoch"], second["finished"]) == (2, False)
        [complete] = temp_files(run)
        unrenamed = load_checkpoint(complete)
        assert unrenamed["epoch"] == 3 and unrenamed["finished"]

        # 4. The same command finishes the run from epoch 2's checkpoint.
        done = train_cli(recipe, run, "resume=auto")
        assert done.returncode == 0, done.stderr[-2000:]
        assert temp_files(run) == []
    assert_same_finished_run(full, run)
    assert sum(1 for r in rows(run) if r.get("knn_top1")) == 3


# --------------------------------------------------------------------------- the hook itself
def test_fault_hook_is_inert_unless_it_names_the_point(tmp_path: Path, monkeypatch) -> None:
    faults.install("enospc:metrics.csv:2", monkeypatch.setattr)
    ckpt.atomic_write_bytes(tmp_path / "last.pt", b"a")  # another file: not counted
    ckpt.atomic_write_bytes(tmp_path / "metrics.csv", b"one")  # 1st metrics.csv write: fine
    with pytest.raises(OSError, match="No space left"):
        ckpt.atomic_write_bytes(tmp_path / "metrics.csv", b"two")  # 2nd: the disk is "full"
    ckpt.atomic_write_bytes(tmp_path / "metrics.csv", b"three")  # only the N-th fails
    assert (tmp_path / "metrics.csv").read_bytes() == b"three"
    assert temp_files(tmp_path) == []


def test_config_yaml_rewrite_is_atomic(tmp_path: Path, monkeypatch) -> None:
    """A resumed run rewrites config.yaml: a failure mid-write keeps the old file whole."""
    from s2bnn.config import config_from_dict, load_config, save_config

    path = tmp_path / "config.yaml"
    save_config(config_from_dict({"output_dir": str(tmp_path), "seed": 1}), path)
    before = path.read_bytes()
    faults.install("enospc:config.yaml:1", monkeypatch.setattr)
    with pytest.raises(OSError):
        save_config(config_from_dict({"output_dir": str(tmp_path), "seed": 2}), path)
    assert path.read_bytes() == before and load_config(path).seed == 1
    assert temp_files(tmp_path) == []


def test_stale_temp_files_are_the_only_files_removed(tmp_path: Path) -> None:
    from s2bnn.engine.rundir import remove_stale_temp_files

    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    stale = [run / "checkpoints" / ".last.pt.k3j2_x.tmp", run / ".metrics.csv.a8b.tmp"]
    keep = [run / "checkpoints" / "last.pt", run / "notes.tmp", run / "metrics.csv",
            run / "checkpoints" / "epoch_1.pt"]
    for p in stale + keep:
        p.write_bytes(b"x")
    assert sorted(remove_stale_temp_files(run)) == sorted(stale)
    assert all(p.exists() for p in keep) and not any(p.exists() for p in stale)


def test_atomic_writes_follow_the_umask(tmp_path: Path) -> None:
    """mkstemp makes 0600 files; run files must be readable like any other file the user makes."""
    plain = tmp_path / "plain"
    plain.write_bytes(b"x")
    ckpt.atomic_write_bytes(tmp_path / "atomic", b"x")
    assert (tmp_path / "atomic").stat().st_mode & 0o777 == plain.stat().st_mode & 0o777
