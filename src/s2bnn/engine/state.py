"""The state of a run, in one place: where it is, its random-number streams, its checkpoint.

Reproducibility: the global RNGs (torch, numpy, python) and the data loader's generator are
re-seeded at the start of every epoch from ``(seed, rank, epoch)``, and the sampler's shuffle
from ``(seed, epoch)``. With the method (queues, EMA weights, centres), optimiser and scheduler
state in the checkpoint, a run resumed from an epoch's checkpoint continues exactly as the
uninterrupted run would have (bit for bit on CPU), on every rank, though only rank 0 writes it.
A checkpoint written within an epoch (``save_every_steps``) also holds the position in the epoch
and the RNG state of that moment: the resume skips the batches already seen and restores the
RNGs, which is bit-exact where the augmentation draws from the main process
(``data.num_workers=0`` or batch augmentation).

The checkpoint schema (:func:`checkpoint_state`) and its reading (:func:`restore`) live here and
nowhere else; :mod:`s2bnn.checkpoint` writes and reads the bytes.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
from torch.utils.data import Sampler

from s2bnn.checkpoint import FORMAT, VERSION, method_state
from s2bnn.errors import CheckpointError

__all__ = [
    "Progress", "derive_seed", "seed_all", "seed_worker", "rng_state", "set_rng_state",
    "SkipSampler", "checkpoint_state", "restore",
]


@dataclass
class Progress:
    """Where a run is. ``step`` counts optimiser steps, skipped (non-finite) ones included."""

    epoch: int = 0  # epochs completed
    step: int = 0
    epoch_step: int = 0  # batches done in the current epoch (> 0 only in a mid-epoch resume)
    bad_steps: int = 0


# --------------------------------------------------------------------------- random numbers
def derive_seed(*parts: int) -> int:
    """A 32-bit seed mixed from ``parts`` (e.g. seed, rank, epoch), independent per tuple."""
    return int(np.random.SeedSequence([int(p) & 0xFFFFFFFF for p in parts]).generate_state(1)[0])


def seed_all(seed: int) -> None:
    """Seed python's, numpy's and torch's global RNGs."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def seed_worker(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: torch seeds each worker's torch and ``random`` RNGs from the
    loader's generator; numpy too, from the same seed."""
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


def rng_state() -> dict[str, Any]:
    """The global RNG states, in a form ``torch.load(weights_only=True)`` accepts."""
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "keys": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any], source: str = "the checkpoint") -> None:
    """Restore what :func:`rng_state` saved; a state that does not restore is an error, since
    carrying on would silently break a bit-exact resume."""
    try:
        torch.set_rng_state(state["torch"])
        npst = state["numpy"]
        np.random.set_state((
            "MT19937", npst["keys"].numpy().astype(np.uint32), npst["pos"], npst["has_gauss"],
            npst["cached_gaussian"],
        ))
        py = state["python"]
        random.setstate((py[0], tuple(py[1]), py[2]))
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])
    except (KeyError, TypeError, ValueError, RuntimeError, AttributeError) as err:
        raise CheckpointError(
            f"cannot restore the random-number state saved in {source} ({type(err).__name__}: "
            f"{str(err)[:120]}); the resume would not continue the run exactly: start a new "
            "output_dir, or resume from an epoch-end checkpoint"
        ) from None


class SkipSampler(Sampler):
    """The indices of ``base`` after the first ``skip``: the rest of an epoch resumed mid-way."""

    def __init__(self, base: Sampler, skip: int) -> None:
        self.base, self.skip = base, skip

    def __iter__(self) -> Iterator[int]:
        return itertools.islice(iter(self.base), self.skip, None)

    def __len__(self) -> int:
        return max(len(self.base) - self.skip, 0)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- the checkpoint
def checkpoint_state(
    *, config: dict[str, Any], progress: Progress, total_steps: int, steps_per_epoch: int,
    sizing: dict[str, Any], backbone_name: str, backbone_kwargs: dict[str, Any],
    method: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any, world_size: int,
    image_size: int, in_chans: int, finished: bool,
) -> dict[str, Any]:
    """Everything a resume (and evaluation, export, a later teacher) needs, as one dict.

    The backbone is stored once, under ``backbone``; ``method`` holds the rest of the method's
    :meth:`~s2bnn.methods.Method.training_state` (head, momentum encoders, queues) and never the
    frozen teacher, which is reloaded from its own file.
    """
    rest = {k: v for k, v in method.training_state().items()  # type: ignore[operator]
            if not k.startswith("backbone.")}
    return {
        "format": FORMAT,
        "version": VERSION,
        "config": config,
        "epoch": progress.epoch,
        "step": progress.step,
        "epoch_step": progress.epoch_step,
        "total_steps": total_steps,
        "steps_per_epoch": steps_per_epoch,
        "sizing": sizing,
        "backbone": {
            "name": backbone_name,
            "kwargs": dict(backbone_kwargs),
            "state_dict": method.backbone.state_dict(),  # type: ignore[union-attr]
        },
        "method": rest,
        "frozen_fingerprint": method.frozen_fingerprint(),  # type: ignore[operator]
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "rng": rng_state(),
        "bad_steps": progress.bad_steps,
        "world_size": world_size,
        "image_size": image_size,
        "in_chans": in_chans,
        "finished": finished,
    }


def restore(
    ckpt: dict[str, Any], path: Path | None, method: nn.Module,
    optimizer: torch.optim.Optimizer, scheduler: Any, teacher_path: str | None = None,
) -> tuple[Progress, dict[str, Any] | None]:
    """Load a training checkpoint into ``method``, ``optimizer`` and ``scheduler``.

    Returns where the run is and, for a checkpoint written mid-epoch, the RNG state to restore
    once that epoch's seeding is redone. Raises a one-line :class:`CheckpointError` when the
    checkpoint does not fit (another model, optimiser or teacher).
    """
    saved = ckpt.get("frozen_fingerprint")
    if saved is not None and saved != method.frozen_fingerprint():  # type: ignore[operator]
        raise CheckpointError(
            f"cannot resume from {path}: the teacher's weights differ from those the run "
            f"started with (method.teacher.path={teacher_path} changed?); point at the original "
            "teacher or start a new output_dir"
        )
    try:
        method.load_training_state(method_state(ckpt))  # type: ignore[operator]
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
    except (KeyError, RuntimeError, ValueError) as err:
        first = str(err).strip().splitlines()[0][:200] if str(err).strip() else repr(err)
        raise CheckpointError(
            f"cannot resume from {path}: it does not match this model/optimiser ({first}); "
            "use the config the run was made with, or another output_dir"
        ) from None
    progress = Progress(epoch=int(ckpt["epoch"]), step=int(ckpt["step"]),
                        epoch_step=int(ckpt.get("epoch_step", 0)),
                        bad_steps=int(ckpt.get("bad_steps", 0)))
    rng = None
    if progress.epoch_step:
        rng = ckpt.get("rng")
        if rng is None:
            raise CheckpointError(f"cannot resume from {path}: it was written mid-epoch "
                                  "but holds no RNG state; start a new output_dir")
    # The schedule may have been lengthened (epochs changed): take the lr from it, not the file.
    for group, base in zip(optimizer.param_groups, scheduler.base_lrs):
        group["lr"] = base * scheduler.lr_lambdas[0](progress.step)
    return progress, rng
