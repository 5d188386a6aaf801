"""How long a run trains: its optimiser steps from ``epochs``, ``steps`` or ``time_budget``.

A time budget is turned into steps before training starts: a throw-away copy of the method
trains a few steps on real batches, and the run gets as many steps as fit in what is left of the
budget; the LR schedule then spans exactly those steps, and the checkpoint keeps the number so
a resume does not re-measure. The arithmetic itself is :mod:`s2bnn.budget`'s.
"""

from __future__ import annotations

import copy
import io
import math
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from s2bnn.budget import BudgetError, format_duration, steps_for_budget
from s2bnn.config import SIZING_KEYS, Config
from s2bnn.engine.build import make_optimizer
from s2bnn.engine.state import rng_state, set_rng_state
from s2bnn.errors import ConfigError

if TYPE_CHECKING:
    from s2bnn.engine.loop import Trainer

__all__ = ["sizing_of", "epoch_cap_steps", "cap_budget_steps", "replanned_steps", "planned_steps",
           "measure_step_seconds", "steps_in_budget", "agreed_steps_in_budget"]


def sizing_of(cfg: Config) -> dict[str, Any]:
    """The config keys that size a run (kept in the checkpoint, compared on resume)."""
    out = {key: getattr(cfg, key) for key in SIZING_KEYS}
    if cfg.time_budget is not None and cfg.time_budget_max_epochs is not None:
        # Only when it applies, so that checkpoints written before the key existed still match.
        out["time_budget_max_epochs"] = cfg.time_budget_max_epochs
    return out


def epoch_cap_steps(max_epochs: int | None, steps_per_epoch: int) -> int | None:
    """The steps of ``max_epochs`` epochs (``None``: no cap)."""
    return None if max_epochs is None else max(1, int(max_epochs) * int(steps_per_epoch))


def cap_budget_steps(steps: int, max_epochs: int | None, steps_per_epoch: int) -> int:
    """``steps`` (what fits a time budget), at most ``max_epochs`` epochs of
    ``steps_per_epoch`` when a cap is given."""
    cap = epoch_cap_steps(max_epochs, steps_per_epoch)
    return steps if cap is None else min(steps, cap)


def replanned_steps(step: int, total: int, step_seconds: float, seconds_left: float,
                    cap: int | None = None, tolerance: float = 0.03) -> int:
    """The last step of a time-budgeted run re-planned at ``step``: as many more steps as fit in
    ``seconds_left`` at ``step_seconds`` each (at most ``cap`` in all, and never fewer than
    ``step``: a run out of time stops now). Within ``tolerance`` of ``total`` it stays
    ``total``, so that timing noise does not keep moving the schedule."""
    if not step_seconds > 0:
        raise ValueError(f"step time must be > 0, got {step_seconds}")
    fit = step + max(0, math.floor(seconds_left / step_seconds))
    if cap is not None:
        fit = min(fit, cap)
    fit = max(fit, step)
    return total if abs(fit - total) <= tolerance * total else fit


def planned_steps(cfg: Config, steps_per_epoch: int,
                  resume_ckpt: dict[str, Any] | None = None) -> int | None:
    """Optimiser steps of the run, or ``None`` when a time budget is still to be measured.

    A resume with unchanged sizing keys keeps what its budget was measured to be."""
    ckpt = resume_ckpt
    if ckpt is not None and ckpt.get("sizing") == sizing_of(cfg) and ckpt.get("total_steps"):
        return int(ckpt["total_steps"])
    if cfg.steps is not None:
        return int(cfg.steps)
    if cfg.time_budget is not None:
        return None
    return int(cfg.epochs or 1) * steps_per_epoch


def measure_step_seconds(trainer: Trainer) -> float:
    """Seconds per optimiser step of ``trainer``'s run, timed on a throw-away copy of its method
    (real batches, loading included), so the run itself starts from untouched weights and RNG
    state; what each epoch end adds is spread over the epoch's steps."""
    probe = copy.deepcopy(trainer.method)
    opt = make_optimizer(trainer.cfg.optim, probe)
    rng = rng_state()
    times: list[float] = []
    batches: Iterator[list[torch.Tensor]] = iter(())
    world, device = trainer.world, trainer.device
    try:
        # Under DDP every rank runs the same number of steps: methods with collectives in
        # their forward (shuffle BN) would otherwise wait on each other forever.
        for i in range(12 if world == 1 else 6):
            t0 = time.perf_counter()
            views = next(batches, None)
            if views is None:  # a tiny dataset: fewer batches an epoch than timed steps
                batches = trainer.batches(trainer.loader)
                views = next(batches)
            with trainer.autocast():
                loss, _ = probe(views)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            probe.on_train_step_end(i, trainer.steps_per_epoch)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if i > 0:  # the first step pays for allocations and lazy initialisation
                times.append(time.perf_counter() - t0)
            if world == 1 and len(times) >= 3 and sum(times) > 2.0:
                break
        # What each epoch end adds: a new loader iterator (worker start-up) and last.pt
        # (serialised here in memory, then doubled for the disk and its fsync). On a small
        # dataset of a few steps an epoch this is a large part of the time.
        t0 = time.perf_counter()
        del batches
        iter(trainer.loader)
        t1 = time.perf_counter()
        torch.save({"m": probe.state_dict(), "o": opt.state_dict()}, io.BytesIO())
        epoch_end = (t1 - t0) + 2 * (time.perf_counter() - t1)
    finally:
        set_rng_state(rng, "the engine's own snapshot")
        del probe, opt
    times.sort()
    seconds = times[len(times) // 2] + epoch_end / trainer.steps_per_epoch
    if world > 1:  # every rank must train the same number of steps
        t = torch.tensor([seconds], dtype=torch.float64, device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        seconds = float(t[0])
    return seconds


def steps_in_budget(budget: float, step_seconds: float, spent: float, steps_per_epoch: int,
                    ) -> tuple[int, str]:
    """The steps that fit in ``budget`` seconds after ``spent`` seconds of set-up, and a line
    saying so. A budget too small for one step is a one-line :class:`ConfigError`."""
    try:
        steps = steps_for_budget(budget, step_seconds, spent)
    except BudgetError as err:
        raise ConfigError(f"config key 'time_budget': {err}; raise it or use steps=N") from None
    return steps, (f"time budget {format_duration(budget)}: {step_seconds * 1000:.0f} ms a step "
                   f"after {format_duration(spent)} of set-up -> {steps} steps "
                   f"({steps / steps_per_epoch:.2f} epochs)")


def agreed_steps_in_budget(budget: float, step_seconds: float, spent: float,
                           steps_per_epoch: int, world: int, device: torch.device
                           ) -> tuple[int, str]:
    """:func:`steps_in_budget` on every rank, then the smallest answer on all of them.

    Each rank measured its own set-up time, so near a step boundary the ranks could disagree by
    one step and then wait for each other forever in the last gradient all-reduce; a budget too
    small on any rank is an error on every rank.
    """
    try:
        steps, line = steps_in_budget(budget, step_seconds, spent, steps_per_epoch)
        error: ConfigError | None = None
    except ConfigError as err:
        steps, line, error = 0, "", err
    if world > 1:
        t = torch.tensor([steps], dtype=torch.int64, device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        if int(t[0]) != steps and error is None:
            steps = int(t[0])
            if steps == 0:
                error = ConfigError("config key 'time_budget': on another rank not one step fits "
                                    "in it; raise it or use steps=N")
            else:
                line += f"; {steps} steps agreed by all {world} ranks"
    if error is not None:
        raise error
    return steps, line
