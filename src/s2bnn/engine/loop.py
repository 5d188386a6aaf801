"""One training loop for every method.

``train(cfg)`` runs a recipe into ``cfg.output_dir`` (layout in :mod:`s2bnn.engine.rundir`). The
method (``s2bnn.methods``) owns the maths: ``method(views) -> (loss, logs)`` and
``method.on_train_step_end(step, total_steps)`` after each optimiser step. The loop owns what is
around it, and reads top to bottom in :meth:`Trainer.fit`:

    for each epoch:   seed it, then for each batch: step, log (callbacks add monitors), save
    after each epoch: checkpoint

What is built comes from :mod:`.build`, how long from :mod:`.sizing`, the checkpoint's content
and the RNG discipline from :mod:`.state`, DDP from :mod:`.ddp`, and everything that only
watches (metrics log, progress bar, monitors) are :mod:`.callbacks`.
"""

from __future__ import annotations

import errno
import math
import os
import sys
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.utils.data import DataLoader, DistributedSampler, Sampler

from s2bnn import distributed as D
from s2bnn.budget import format_duration, parse_duration
from s2bnn.checkpoint import load_checkpoint, save_checkpoint
from s2bnn.config import Config, config_to_dict, save_config
from s2bnn.devices import autocast_context, resolve_device
from s2bnn.engine import sizing
from s2bnn.engine.build import (
    Parts,
    build_parts,
    init_rest_of_method,
    load_step1_backbone,
    make_optimizer,
    make_scheduler,
    stretch_schedule,
)
from s2bnn.engine.callbacks import Callback, MetricsLogger, ProgressBar
from s2bnn.engine.ddp import broadcast_plan, convert_sync_bn, init_distributed, wrap_ddp
from s2bnn.engine.rundir import clear_run_dir, plan_run, remove_stale_temp_files
from s2bnn.engine.state import (
    Progress,
    SkipSampler,
    checkpoint_state,
    derive_seed,
    restore,
    seed_all,
    seed_worker,
    set_rng_state,
)
from s2bnn.errors import ConfigError, TrainingError

__all__ = ["Trainer", "train"]


def _to_float(value: Any) -> float:
    if isinstance(value, torch.Tensor):
        return float(value.detach().float().mean())
    return float(value)


def _non_finite_terms(logs: dict[str, Any]) -> list[str]:
    bad = []
    for key, value in logs.items():
        try:
            if not math.isfinite(_to_float(value)):
                bad.append(key)
        except (TypeError, ValueError):
            continue
    return bad


class Trainer:
    """One run: :meth:`setup` builds it, :meth:`open_run_dir` prepares its directory,
    :meth:`fit` trains it. Callbacks see it as their ``trainer`` argument."""

    def __init__(self, cfg: Config, parts: Parts | Callable[[Config], Parts] | None = None,
                 callbacks: Iterable[Callback] = ()) -> None:
        self.cfg = cfg
        self.parts_arg = parts
        self.rank = D.rank()
        self.world = D.world_size()
        self.main = self.rank == 0
        self.show = self.main and cfg.progress
        self.run_dir = Path(cfg.output_dir)
        self.ckpt_dir = self.run_dir / "checkpoints"
        self.callbacks: list[Callback] = [MetricsLogger(), ProgressBar(), *callbacks]
        self.progress = Progress()
        self.t_start = time.perf_counter()  # a time budget counts from here, set-up included

    def say(self, msg: str) -> None:
        """A line on stderr from rank 0 when ``progress=true`` (above any progress bar)."""
        if self.show:
            from tqdm import tqdm

            tqdm.write(msg, file=sys.stderr)

    def _call(self, hook: str, *args: Any, **kwargs: Any) -> None:
        for cb in self.callbacks:
            getattr(cb, hook)(self, *args, **kwargs)

    # ---------------------------------------------------------------- set-up
    def _check(self, device: torch.device) -> None:
        cfg = self.cfg
        if cfg.batch_size < self.world:
            raise ConfigError(
                f"batch_size={cfg.batch_size} is smaller than the {self.world} ranks; "
                f"use batch_size >= {self.world} (it is the global batch)"
            )
        if cfg.batch_size % self.world:
            raise ConfigError(
                f"batch_size={cfg.batch_size} does not split evenly over {self.world} ranks; "
                f"use a multiple of {self.world}"
            )
        if cfg.log_every <= 0:
            raise ConfigError(f"config key 'log_every' must be > 0, got {cfg.log_every}")
        if cfg.max_steps is not None and cfg.max_steps <= 0:
            raise ConfigError(f"config key 'max_steps' must be > 0, got {cfg.max_steps}")
        if cfg.sync_bn and self.world > 1 and device.type != "cuda":
            raise ConfigError("sync_bn=true needs CUDA devices under DDP; set sync_bn=false on CPU")

    def setup(self, device: torch.device) -> None:
        """Decide start or resume, build data, model, method and optimiser, size the run."""
        cfg = self.cfg
        self.device = device
        self._check(device)
        self.autocast = autocast_context(cfg.precision, device)
        self.plan = broadcast_plan(
            lambda: plan_run(self.run_dir, config_to_dict(cfg), cfg.resume, cfg.force))

        seed_all(cfg.seed)
        parts = self.parts_arg
        self.parts = (build_parts(cfg) if parts is None
                      else parts if isinstance(parts, Parts) else parts(cfg))
        self.per_rank = cfg.batch_size // self.world
        self.sampler = DistributedSampler(
            self.parts.train_set, num_replicas=self.world, rank=self.rank, shuffle=True,
            seed=cfg.seed, drop_last=True,
        )
        self.loader_gen = torch.Generator()
        self.loader = self.make_loader(self.sampler)
        self.steps_per_epoch = len(self.loader)
        if self.steps_per_epoch == 0:
            raise ConfigError(
                f"{len(self.parts.train_set)} training images give no full batch of "  # type: ignore
                f"{cfg.batch_size}; lower batch_size or raise data.limit"
            )
        resume = (load_checkpoint(self.plan.checkpoint)
                  if self.plan.action == "resume" else None)
        planned = sizing.planned_steps(cfg, self.steps_per_epoch, resume)

        self.method = self._build_method(planned or self.steps_per_epoch).to(device)
        self.replan: tuple[float, int | None] | None = None  # (budget s, step cap) to re-plan
        if planned is None:  # a time budget: measure, then size the run
            budget = parse_duration(cfg.time_budget)  # type: ignore[arg-type]
            step_s = self.measure_step_seconds()
            planned, line = sizing.agreed_steps_in_budget(
                budget, step_s, time.perf_counter() - self.t_start, self.steps_per_epoch,
                self.world, device)
            capped = sizing.cap_budget_steps(planned, cfg.time_budget_max_epochs,
                                             self.steps_per_epoch)
            if capped < planned:
                line += (f"; capped at time_budget_max_epochs={cfg.time_budget_max_epochs} "
                         f"-> {capped} steps")
                planned = capped
            self.say(line)
            if cfg.time_budget_replan:
                self.replan = (budget, sizing.epoch_cap_steps(cfg.time_budget_max_epochs,
                                                              self.steps_per_epoch))
            self.method.set_total_steps(planned)
        self.total_steps = planned

        self.optimizer = make_optimizer(cfg.optim, self.method)
        self.scheduler = make_scheduler(cfg.optim, self.optimizer, self.total_steps,
                                        self.steps_per_epoch)
        self.params = [p for g in self.optimizer.param_groups for p in g["params"]]
        self.resume_rng: dict[str, Any] | None = None
        if resume is not None:
            self._resume(resume)
            del resume  # its tensors are in the model now; free the copy

        self.model: nn.Module = self.method
        if cfg.compile:
            self.method.compile()  # in place, so state_dict keys stay those of the plain module
        if self.world > 1:
            self.model = wrap_ddp(self.method, device)

    def _build_method(self, total_steps: int) -> nn.Module:
        cfg, parts = self.cfg, self.parts
        seed_all(cfg.seed)
        backbone = parts.build_backbone()
        step1 = None
        if cfg.model.init_from and self.plan.action == "fresh":
            step1 = load_step1_backbone(backbone, cfg.model.init_from, cfg, parts.backbone_name,
                                        self.say)
        method = parts.build_method(backbone, total_steps)
        if step1 is not None:
            init_rest_of_method(method, step1, cfg.model.init_from, self.say)  # type: ignore
        if not isinstance(getattr(method, "backbone", None), nn.Module):
            raise TypeError("a method must expose its student backbone as `.backbone`")
        if cfg.sync_bn and self.world > 1:
            method = convert_sync_bn(method)
        return method

    def _resume(self, ckpt: dict[str, Any]) -> None:
        self.progress, self.resume_rng = restore(
            ckpt, self.plan.checkpoint, self.method, self.optimizer, self.scheduler,
            self.cfg.method.teacher.path)
        if (self.progress.epoch_step and self.cfg.data.num_workers > 0
                and self.parts.batch_transform is None):
            self.say("resuming mid-epoch with data.num_workers > 0: the same images in the "
                     "same order, but loader workers draw their augmentations anew (set "
                     "data.num_workers=0 for a bit-exact resume)")
        self.say(self.plan.note)

    def measure_step_seconds(self) -> float:
        """Seconds per optimiser step (:func:`s2bnn.engine.sizing.measure_step_seconds`)."""
        return sizing.measure_step_seconds(self)

    def make_loader(self, sampler: Sampler) -> DataLoader:
        """The training loader over ``sampler`` (batches of this rank's share)."""
        return DataLoader(
            self.parts.train_set, batch_size=self.per_rank, sampler=sampler,
            num_workers=self.cfg.data.num_workers, drop_last=True, generator=self.loader_gen,
            worker_init_fn=seed_worker, pin_memory=self.device.type == "cuda",
            persistent_workers=False,
        )

    def batches(self, loader: DataLoader) -> Iterator[list[torch.Tensor]]:
        """The loader's batches as lists of views on the device (augmented here when the
        data is augmented per batch)."""
        augment = self.parts.batch_transform
        for batch in loader:
            views = batch[0] if isinstance(batch, (list, tuple)) and len(batch) == 2 else batch
            if augment is not None:
                yield augment(views.to(self.device, non_blocking=True))
                continue
            if isinstance(views, torch.Tensor):
                views = [views]
            yield [v.to(self.device, non_blocking=True) for v in views]

    # ---------------------------------------------------------------- the run dir
    def open_run_dir(self) -> None:
        """Rank 0: clear a run dir that starts afresh, write config.yaml, start the logs."""
        if self.main:
            if self.plan.action != "resume":
                if self.plan.note:
                    self.say(self.plan.note)
                if self.run_dir.is_dir():
                    clear_run_dir(self.run_dir)
            self.ckpt_dir.mkdir(parents=True, exist_ok=True)
            remove_stale_temp_files(self.run_dir)  # left by a run killed mid-write
            save_config(self.cfg, self.run_dir / "config.yaml")
        if self.cfg.knn_every > 0 and not any(
                "knn_top1" in getattr(cb, "provides", ()) for cb in self.callbacks):
            self.say(f"knn_every={self.cfg.knn_every} but no kNN monitor was handed to train(): "
                     "pass callbacks=s2bnn.eval.monitor.monitors(cfg)")
        self._call("on_train_start")

    def checkpoint(self, finished: bool, epoch_end: bool = True) -> None:
        """Rank 0 writes ``last.pt`` (and ``epoch_N.pt`` every ``save_every`` epochs)."""
        if not self.main:
            return
        cfg, p = self.cfg, self.progress
        state = checkpoint_state(
            config=config_to_dict(cfg), progress=p, total_steps=self.total_steps,
            steps_per_epoch=self.steps_per_epoch, sizing=sizing.sizing_of(cfg),
            backbone_name=self.parts.backbone_name, backbone_kwargs=self.parts.backbone_kwargs,
            method=self.method, optimizer=self.optimizer, scheduler=self.scheduler,
            world_size=self.world, image_size=self.parts.image_size,
            in_chans=self.parts.in_chans, finished=finished,
        )
        last = self.ckpt_dir / "last.pt"
        kept = (f"the previous checkpoint {last} is kept" if last.is_file()
                else "no checkpoint was written yet")
        target = last
        try:
            save_checkpoint(state, last)
            if epoch_end and cfg.save_every and p.epoch % cfg.save_every == 0:
                kept = f"{last} was written"
                target = self.ckpt_dir / f"epoch_{p.epoch}.pt"
                save_checkpoint(state, target)
        except OSError as err:
            # A full disk, a quota or a permission problem: the write was atomic, so nothing
            # half-written replaced a good file.
            raise TrainingError(
                f"cannot write checkpoint {target} at step {p.step}: "
                f"{err.strerror or err}; {kept}; free space (or fix the directory) and rerun "
                "the same command with resume=auto"
            ) from None

    # ---------------------------------------------------------------- training
    def fit(self) -> None:
        """Train epoch after epoch to the run's last step, checkpointing after each."""
        cfg, p = self.cfg, self.progress
        self.num_epochs = math.ceil(self.total_steps / self.steps_per_epoch)
        self.say(
            f"training {self.total_steps} steps ({self.total_steps / self.steps_per_epoch:.2f} "
            f"epochs of {self.steps_per_epoch}), batch {cfg.batch_size} on {self.world} x "
            f"{self.device}, lr {self.optimizer.param_groups[0]['lr']:.3g}; run dir "
            f"{self.run_dir}"
        )
        t0 = time.perf_counter()
        self.replan_from = (t0, p.step)
        self.next_replan = p.step + self._replan_every()
        wrote = False
        while not self.done():
            self.train_epoch()
            # A dry run stopped by max_steps is finished too (it is not meant to be resumed).
            self.checkpoint(finished=self.done(), epoch_end=p.epoch_step == 0)
            wrote = True
        if not wrote:
            # Nothing left to train (e.g. a resumed run whose epochs were lowered): mark finished.
            self.checkpoint(finished=True)
        self.say(f"trained to step {p.step} in {format_duration(time.perf_counter() - t0)} "
                 f"({format_duration(time.perf_counter() - self.t_start)} with set-up)")
        D.barrier()

    def done(self) -> bool:
        """All planned steps trained, or a dry run's ``max_steps`` reached."""
        step, cap = self.progress.step, self.cfg.max_steps
        return step >= self.total_steps or (cap is not None and step >= cap)

    def train_epoch(self) -> None:
        """Train to the end of the epoch, or until the run is :meth:`done`."""
        cfg, p = self.cfg, self.progress
        loader = self._seed_epoch()
        start = p.epoch_step
        self._call("on_epoch_start", min(self.steps_per_epoch, self.total_steps - p.step + start),
                   start)
        sums: dict[str, torch.Tensor] = {}
        good = steps = 0
        t0 = time.perf_counter()
        row: dict[str, Any] = {}
        for i, views in enumerate(self.batches(loader), start=start):
            good += int(self.train_step(views, sums))
            steps += 1
            p.epoch_step = i + 1
            self._call("on_step_end")
            if self.replan is not None and p.step >= self.next_replan:
                self._replan()
            last = i + 1 == self.steps_per_epoch
            stop = self.done()
            save = (cfg.save_every_steps > 0 and p.step % cfg.save_every_steps == 0
                    and not (last or stop))
            if p.step % cfg.log_every == 0 or last or stop or save:
                row = self.log(sums, good, steps, time.perf_counter() - t0, last, stop)
                sums, good, steps = {}, 0, 0
                t0 = time.perf_counter()
            if save:
                self.checkpoint(finished=False, epoch_end=False)
            if stop and not last:
                return
        p.epoch += 1
        p.epoch_step = 0
        self._call("on_epoch_end", row)

    def _replan_every(self) -> int:
        return max(10, self.total_steps // 20)

    def _replan(self) -> None:
        """Re-plan a time-budgeted run's last step from the step time seen so far in this run
        (``time_budget_replan``): the budget's steps were measured on a few steps before
        training, and a machine whose speed drifts would end the run early or late."""
        budget, cap = self.replan  # type: ignore[misc]
        p, now = self.progress, time.perf_counter()
        self.next_replan = p.step + self._replan_every()
        if p.step >= 0.9 * self.total_steps:
            return  # a change this late would only jolt the end of the schedule
        t0, step0 = self.replan_from
        step_s = (now - t0) / max(1, p.step - step0)
        new = sizing.replanned_steps(p.step, self.total_steps, step_s,
                                     budget - (now - self.t_start), cap)
        if self.world > 1:  # every rank must stop at the same step
            t = torch.tensor([new], dtype=torch.int64, device=self.device)
            dist.all_reduce(t, op=dist.ReduceOp.MIN)
            new = int(t[0])
        if new == self.total_steps:
            return
        self.say(f"time budget re-planned at step {p.step}: {step_s * 1000:.0f} ms a step so "
                 f"far -> {new} steps instead of {self.total_steps}")
        self.total_steps = new
        stretch_schedule(self.cfg.optim, self.scheduler, new, self.steps_per_epoch)
        self.method.set_total_steps(new)
        self.num_epochs = math.ceil(new / self.steps_per_epoch)

    def _seed_epoch(self) -> DataLoader:
        """Everything random in this epoch follows from (seed, rank, epoch): see
        :mod:`s2bnn.engine.state`. A mid-epoch resume skips what was trained and continues the
        RNGs from where the checkpoint left them."""
        cfg, p = self.cfg, self.progress
        seed_all(derive_seed(cfg.seed, self.rank, p.epoch))
        self.loader_gen.manual_seed(derive_seed(cfg.seed, self.rank, p.epoch, 1))
        self.sampler.set_epoch(p.epoch)
        if not p.epoch_step:
            return self.loader
        loader = self.make_loader(SkipSampler(self.sampler, p.epoch_step * self.per_rank))
        assert self.resume_rng is not None
        set_rng_state(self.resume_rng)
        self.resume_rng = None
        return loader

    def train_step(self, views: list[torch.Tensor], sums: dict[str, torch.Tensor]) -> bool:
        """One optimiser step; False when the step was skipped (non-finite loss, policy skip)."""
        cfg, p = self.cfg, self.progress
        with self.autocast():
            loss, logs = self.model(views)
        loss_val = loss.detach().float()
        finite = torch.isfinite(loss_val)
        if self.world > 1:
            # All ranks must agree, or one would wait forever in DDP's gradient all-reduce.
            flag = finite.to(torch.int32).reshape(1)
            dist.all_reduce(flag, op=dist.ReduceOp.MIN)
            finite = flag[0] > 0
        self.optimizer.zero_grad(set_to_none=True)
        if not bool(finite):
            self._bad_step(logs, float(loss_val))
            if self.world > 1:
                (loss * 0).backward()  # join the all-reduce DDP expects; the grads are dropped
                self.optimizer.zero_grad(set_to_none=True)
            # Buffers the forward already changed (BatchNorm statistics, queues) are not rolled
            # back; the schedule advances so it stays aligned with the data (torch warns when
            # that happens before any optimiser step: intended here).
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                self.scheduler.step()
            p.step += 1
            return False
        loss.backward()
        if cfg.optim.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.params, cfg.optim.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        self.method.on_train_step_end(p.step, self.total_steps)
        p.step += 1
        sums["loss"] = sums.get("loss", 0) + loss_val
        for key, value in logs.items():
            v = value.detach().float().mean() if isinstance(value, torch.Tensor) else \
                torch.tensor(float(value))
            sums[key] = sums.get(key, 0) + v
        return True

    def _bad_step(self, logs: dict[str, Any], loss_val: float) -> None:
        cfg, p = self.cfg, self.progress
        terms = _non_finite_terms(logs) or ["loss"]
        where = f"step {p.step + 1} (epoch {p.epoch + 1})"
        what = ", ".join(terms)
        kept = (
            f"the last good checkpoint {self.ckpt_dir / 'last.pt'} is kept"
            if (self.ckpt_dir / "last.pt").is_file() else "no checkpoint was written yet"
        )
        if cfg.nan_policy == "stop":
            raise TrainingError(
                f"non-finite loss ({loss_val}) at {where} in term(s) {what}; {kept}; lower "
                "optim.lr, set optim.grad_clip, or set nan_policy=skip"
            )
        p.bad_steps += 1
        self.say(f"skipped {where}: non-finite {what} ({p.bad_steps}/{cfg.max_bad_steps})")
        if p.bad_steps >= cfg.max_bad_steps:
            raise TrainingError(
                f"{p.bad_steps} non-finite steps (last at {where}, term(s) {what}) reached "
                f"max_bad_steps={cfg.max_bad_steps}; {kept}; lower optim.lr or set optim.grad_clip"
            )

    def log(self, sums: dict[str, torch.Tensor], good: int, steps: int, elapsed: float,
            epoch_end: bool, final: bool) -> dict[str, Any]:
        """A log row of the averages since the last one; callbacks add to it, then see it."""
        p = self.progress
        row: dict[str, Any] = {
            "epoch": p.epoch + 1,
            "step": p.step,
            "loss": float(sums["loss"]) / good if good else float("nan"),
            "lr": self.optimizer.param_groups[0]["lr"],
            "img_per_s": steps * self.cfg.batch_size / elapsed if elapsed > 0 else 0.0,
        }
        for key, value in sums.items():
            if key != "loss":
                row[key] = float(value) / good
        if p.bad_steps:
            row["bad_steps"] = p.bad_steps
        self._call("on_log", row, epoch_end=epoch_end, final=final)
        self._call("on_logged", row)
        return row


def train(cfg: Config, *, parts: Parts | Callable[[Config], Parts] | None = None,
          callbacks: Iterable[Callback] = ()) -> Path:
    """Run the recipe ``cfg`` into ``cfg.output_dir`` and return that directory.

    Under ``torchrun`` (``WORLD_SIZE > 1``) each process joins the process group (NCCL on GPUs,
    gloo on CPUs) and trains its share of every global batch; only rank 0 writes files. ``parts``
    replaces what :func:`build_parts` would build from ``cfg`` (a :class:`Parts` or a function of
    the config). ``callbacks`` watch the run (e.g. :func:`s2bnn.eval.monitor.monitors`).
    """
    prev_det = torch.are_deterministic_algorithms_enabled()
    prev_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    prev_bench = torch.backends.cudnn.benchmark
    created = False
    trainer: Trainer | None = None
    started = False
    try:
        device = resolve_device(cfg.device)
        if cfg.deterministic:
            # cuBLAS needs this before its first call to be deterministic.
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True, warn_only=True)
            torch.backends.cudnn.benchmark = False
        elif device.type == "cuda":
            torch.backends.cudnn.benchmark = True
        created = init_distributed(device)
        trainer = Trainer(cfg, parts, callbacks)
        trainer.setup(device)
        started = True
        trainer.open_run_dir()
        trainer.fit()
        return trainer.run_dir
    except OSError as err:
        if err.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        raise TrainingError(
            f"disk full while writing {err.filename or cfg.output_dir}: {err.strerror}; the last "
            "complete checkpoint is kept; free space and rerun the same command with resume=auto"
        ) from None
    finally:
        if trainer is not None and started:
            trainer._call("on_train_end")
        torch.use_deterministic_algorithms(prev_det, warn_only=prev_warn)
        torch.backends.cudnn.benchmark = prev_bench
        if created and dist.is_initialized():
            dist.destroy_process_group()
