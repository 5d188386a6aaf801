"""One training loop for every method: data, optimiser, precision, DDP, checkpoints and logs.

``train(cfg)`` runs a recipe into ``cfg.output_dir`` (layout in :mod:`s2bnn.engine.rundir`). The
method (``s2bnn.methods``) owns the maths: ``method(views) -> (loss, logs)`` and
``method.on_train_step_end(step, total_steps)`` after each optimiser step; this loop owns
everything around it.

How long: a run is sized by ``epochs``, ``steps`` or ``time_budget``. A time budget is turned
into steps before training starts: a throw-away copy of the method trains a few steps on real
batches, and the run gets as many steps as fit in what is left of the budget; the LR schedule then
spans exactly those steps, and the checkpoint keeps the number so a resume does not re-measure.

Reproducibility: the global RNGs (torch, numpy, python) and the data loader's generator are
re-seeded at the start of every epoch from ``(seed, rank, epoch)``, and the sampler's shuffle
from ``(seed, epoch)``. Together with the model, method (queues, EMA weights, centres), optimiser
and scheduler state in the checkpoint, this makes a run resumed from an epoch's checkpoint
continue exactly as the uninterrupted run would have (bit for bit on CPU), on every rank, even
though only rank 0 writes the checkpoint. A checkpoint written within an epoch
(``save_every_steps``) also holds the position in the epoch and the RNG state of that moment: the
resume skips the batches already seen and restores the RNGs, which is bit-exact where the
augmentation draws from the main process (``data.num_workers=0`` or batch augmentation).
"""

from __future__ import annotations

import copy
import errno
import io
import itertools
import math
import os
import random
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler, Subset

from s2bnn import distributed as D
from s2bnn.budget import BudgetError, format_duration, parse_duration, steps_for_budget
from s2bnn.checkpoint import (
    FAULT_ENV,
    FORMAT,
    VERSION,
    fault_point,
    load_checkpoint,
    save_checkpoint,
)
from s2bnn.config import SIZING_KEYS, Config, config_to_dict, save_config
from s2bnn.devices import autocast_context, resolve_device
from s2bnn.engine.optim import build_optimizer, build_scheduler
from s2bnn.engine.rundir import (
    MetricsCSV,
    RunPlan,
    clear_run_dir,
    plan_run,
    remove_stale_temp_files,
)
from s2bnn.errors import CheckpointError, ConfigError, DataError, TrainingError, UserError

__all__ = ["Parts", "build_parts", "backbone_kwargs", "train"]


# --------------------------------------------------------------------------- what is trained
@dataclass
class Parts:
    """What the loop trains, built from a config by :func:`build_parts`.

    Tests and embedding code can pass their own (e.g. a tiny dataset and method) to
    :func:`train`. ``build_backbone`` and ``build_method`` are called after seeding;
    ``build_method(backbone, total_steps)`` must return a :class:`s2bnn.methods.Method`
    (the engine checkpoints its ``training_state()``). ``knn_sets()`` returns ``(memory bank,
    queries, num_classes)`` of labelled eval-transformed images for the kNN monitor, or ``None``
    when there is no labelled split.
    """

    train_set: Dataset
    in_chans: int
    image_size: int
    backbone_name: str
    backbone_kwargs: dict[str, Any]
    build_backbone: Callable[[], nn.Module]
    build_method: Callable[[nn.Module, int], nn.Module]
    knn_sets: Callable[[], tuple[Dataset, Dataset, int] | None] | None = None
    # Set when the loader yields raw uint8 batches that are augmented on the device.
    batch_transform: Callable[[torch.Tensor], list[torch.Tensor]] | None = None


def _seeded_subset(dataset: Dataset, size: int, seed: int) -> Dataset:
    n = len(dataset)  # type: ignore[arg-type]
    if size >= n:
        return dataset
    gen = torch.Generator().manual_seed(seed)
    return Subset(dataset, sorted(torch.randperm(n, generator=gen)[:size].tolist()))


# An ImageFolder whose decoded training images fit in this is held in memory (data.in_memory).
IN_MEMORY_AUTO_BYTES = 1 << 30


def backbone_kwargs(cfg: Config, in_chans: int) -> dict[str, Any]:
    """The ``build_model`` arguments of the student ``cfg.model`` describes, for images with
    ``in_chans`` channels (features only: ``num_classes=0``)."""
    mc = cfg.model
    kwargs: dict[str, Any] = dict(mc.kwargs)
    if "in_chans" in kwargs and kwargs["in_chans"] != in_chans:
        raise ConfigError(
            f"model.kwargs.in_chans={kwargs['in_chans']} but {cfg.data.name} has {in_chans}-"
            "channel images; drop model.kwargs.in_chans (the data sets it) or use matching data"
        )
    for key in ("binary_act", "binary_weight", "width_mult", "stem_stride"):
        value = getattr(mc, key)
        if value is not None:
            kwargs[key] = value
    kwargs.update(num_classes=0, in_chans=in_chans)
    return kwargs


def build_parts(cfg: Config) -> Parts:
    """Dataset with augmented views, backbone and method builders, kNN splits for ``cfg``."""
    from s2bnn import data
    from s2bnn.methods import build_method, views_needed
    from s2bnn.models import build_model

    need = views_needed(cfg.method)
    if cfg.data.augment.num_views < need:
        # Checked here, before any data or teacher is loaded, not at the first forward pass.
        raise ConfigError(
            f"method '{cfg.method.name}' with these settings needs {need} augmented views per "
            f"image, but data.augment.num_views={cfg.data.augment.num_views}; "
            f"set data.augment.num_views={need}"
        )
    dc = cfg.data
    train_set = data.build_dataset(
        dc.name, "train", root=dc.root, limit=dc.limit, skip_corrupt=dc.skip_corrupt
    )
    in_chans = int(train_set.in_chans)  # type: ignore[attr-defined]
    image_size = int(dc.image_size or data.default_image_size(dc.name))
    if isinstance(train_set, data.ImageFolderDataset) and dc.in_memory is not False and (
            dc.in_memory or data.cached_size(train_set, image_size) <= IN_MEMORY_AUTO_BYTES):
        train_set = data.to_memory(train_set, image_size, progress=cfg.progress)
    mean, std = data.dataset_stats(dc.name)
    aug = dc.augment
    aug_args = dict(
        num_views=aug.num_views, crop_scale=aug.crop_scale, color=aug.color, blur=aug.blur,
        local_crops=aug.local_crops, local_size=aug.local_size,
        local_crop_scale=aug.local_crop_scale, mean=mean, std=std,
    )
    in_memory = isinstance(getattr(train_set, "images", None), torch.Tensor)
    if dc.batch_augment and not in_memory:
        raise ConfigError(
            f"data.batch_augment=true needs a dataset held in memory as one uint8 tensor "
            f"(fashion-mnist, synthetic, or a folder with data.in_memory); {dc.name} is decoded "
            "image by image: leave it unset or set data.in_memory=true"
        )
    batch_transform = None
    if in_memory and dc.batch_augment is not False:
        batch_transform = data.build_batch_train_transform(
            aug.preset, image_size, in_chans, **aug_args)
    else:
        # The dataset was built first to learn its channels; every dataset applies `.transform`.
        train_set.transform = data.build_train_transform(  # type: ignore[attr-defined]
            aug.preset, image_size, in_chans, **aug_args)

    mc = cfg.model
    kwargs = backbone_kwargs(cfg, in_chans)
    num_train = len(train_set)  # type: ignore[arg-type]

    def knn_sets() -> tuple[Dataset, Dataset, int] | None:
        tf = data.build_eval_transform(image_size, in_chans, mean, std)
        bank = data.build_dataset(
            dc.name, "train", transform=tf, root=dc.root, limit=dc.limit,
            skip_corrupt=dc.skip_corrupt,
        )
        try:
            queries = data.build_dataset(
                dc.name, "test", transform=tf, root=dc.root, skip_corrupt=dc.skip_corrupt
            )
        except DataError:
            return None
        if len(queries) == 0:  # type: ignore[arg-type]
            return None
        return (
            _seeded_subset(bank, cfg.knn_train_size, cfg.seed),
            _seeded_subset(queries, cfg.knn_test_size, cfg.seed + 1),
            int(bank.num_classes),  # type: ignore[attr-defined]
        )

    return Parts(
        train_set=train_set,
        in_chans=in_chans,
        image_size=image_size,
        backbone_name=mc.name,
        backbone_kwargs=kwargs,
        build_backbone=lambda: build_model(mc.name, **kwargs),
        build_method=lambda backbone, total: build_method(
            cfg.method, backbone, num_train=num_train, total_steps=total, in_chans=in_chans
        ),
        knn_sets=knn_sets,
        batch_transform=batch_transform,
    )


# --------------------------------------------------------------------------- seeds
def _derive_seed(*parts: int) -> int:
    return int(np.random.SeedSequence([int(p) & 0xFFFFFFFF for p in parts]).generate_state(1)[0])


def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _seed_worker(worker_id: int) -> None:
    # torch seeds each worker's torch and `random` RNGs from the loader's generator; numpy too:
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


def _rng_state() -> dict[str, Any]:
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


def _set_rng_state(state: dict[str, Any], source: str = "the checkpoint") -> None:
    """Restore what :func:`_rng_state` saved; a state that does not restore is an error, since
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


class _SkipSampler(Sampler):
    """The indices of ``base`` after the first ``skip``: the rest of an epoch resumed mid-way."""

    def __init__(self, base: Sampler, skip: int) -> None:
        self.base, self.skip = base, skip

    def __iter__(self) -> Iterator[int]:
        return itertools.islice(iter(self.base), self.skip, None)

    def __len__(self) -> int:
        return max(len(self.base) - self.skip, 0)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- distributed set-up
def _init_distributed(device: torch.device) -> bool:
    """Join the process group torchrun describes (WORLD_SIZE > 1); True when we created it."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or not dist.is_available():
        return False
    if dist.is_initialized():
        return False
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return True


def _broadcast_plan(plan_fn: Callable[[], RunPlan]) -> RunPlan:
    """Rank 0 decides what to do with the run dir; every rank gets the same answer or error."""
    payload: list[Any] = [None]
    if D.is_main_process():
        try:
            payload[0] = ("ok", plan_fn())
        except UserError as err:
            payload[0] = ("error", (type(err), str(err)))
    if D.is_distributed():
        dist.broadcast_object_list(payload, src=0)
    kind, value = payload[0]
    if kind == "error":
        cls, msg = value
        raise cls(msg)
    return value


def _convert_sync_bn(module: nn.Module) -> nn.Module:
    """SyncBatchNorm for every BatchNorm in training mode.

    The frozen teacher is kept in eval mode by its method, so it keeps plain BatchNorm (it
    uses running statistics and has nothing to synchronise); momentum encoders are in training
    mode and are converted too, as in MoCo's SyncBN variant.
    """
    for name, child in module.named_children():
        if not child.training:
            continue
        if isinstance(child, nn.modules.batchnorm._BatchNorm):
            setattr(module, name, nn.SyncBatchNorm.convert_sync_batchnorm(child))
        else:
            _convert_sync_bn(child)
    return module


# --------------------------------------------------------------------------- the loop
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


class _Trainer:
    def __init__(self, cfg: Config, parts: Parts | Callable[[Config], Parts] | None) -> None:
        self.cfg = cfg
        self.parts_arg = parts
        self.rank = D.rank()
        self.world = D.world_size()
        self.main = self.rank == 0
        self.show = self.main and cfg.progress
        self.run_dir = Path(cfg.output_dir)
        self.ckpt_dir = self.run_dir / "checkpoints"
        self.t_start = time.perf_counter()  # a time budget counts from here, set-up included
        # Fault-injection test hook (s2bnn.checkpoint.fault_point); read once, so it costs
        # nothing per step when unset.
        self.fault_steps = os.environ.get(FAULT_ENV, "").startswith("kill-step:")

    def say(self, msg: str) -> None:
        if self.show:
            from tqdm import tqdm

            tqdm.write(msg, file=sys.stderr)

    # ---------------------------------------------------------------- set-up
    def setup(self, device: torch.device) -> None:
        cfg = self.cfg
        self.device = device
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
        self.autocast = autocast_context(cfg.precision, device)

        self.plan = _broadcast_plan(
            lambda: plan_run(self.run_dir, config_to_dict(cfg), cfg.resume, cfg.force)
        )

        _seed_all(cfg.seed)
        parts = self.parts_arg
        if parts is None:
            parts = build_parts(cfg)
        elif not isinstance(parts, Parts):
            parts = parts(cfg)
        self.parts = parts

        self.per_rank = cfg.batch_size // self.world
        self.sampler = DistributedSampler(
            parts.train_set, num_replicas=self.world, rank=self.rank, shuffle=True,
            seed=cfg.seed, drop_last=True,
        )
        self.loader_gen = torch.Generator()
        self.loader = self._make_loader(self.sampler)
        self.steps_per_epoch = len(self.loader)
        if self.steps_per_epoch == 0:
            raise ConfigError(
                f"{len(parts.train_set)} training images give no full batch of "  # type: ignore
                f"{cfg.batch_size}; lower batch_size or raise data.limit"
            )
        self.resume_ckpt = (load_checkpoint(self.plan.checkpoint)
                            if self.plan.action == "resume" else None)
        planned = self._planned_steps()

        _seed_all(cfg.seed)
        backbone = parts.build_backbone()
        step1 = None
        if cfg.model.init_from and self.plan.action == "fresh":
            step1 = self._init_backbone(backbone, cfg.model.init_from)
        method = parts.build_method(backbone, planned or self.steps_per_epoch)
        if step1 is not None:
            self._init_rest_of_method(method, step1, cfg.model.init_from)
        if not isinstance(getattr(method, "backbone", None), nn.Module):
            raise TypeError("a method must expose its student backbone as `.backbone`")
        if cfg.sync_bn and self.world > 1:
            method = _convert_sync_bn(method)
        self.method = method.to(device)
        if planned is None:  # a time budget: measure, then size the run
            planned = self._steps_in_budget()
            self.method.set_total_steps(planned)
        self.total_steps = planned

        oc = cfg.optim
        self.optimizer = self._optimizer_for(self.method)
        self.warmup_steps = round(oc.warmup_epochs * self.steps_per_epoch)
        self.scheduler = build_scheduler(
            self.optimizer, self.total_steps, self.warmup_steps, oc.schedule, oc.lr, oc.min_lr
        )
        self.params = [p for g in self.optimizer.param_groups for p in g["params"]]

        self.epoch = 0  # epochs completed
        self.epoch_step = 0  # batches done in the current epoch (> 0 only in a mid-epoch resume)
        self.bad_steps = 0
        self.step = 0
        self.resume_rng: dict[str, Any] | None = None
        if self.resume_ckpt is not None:
            self._load(self.plan.checkpoint, self.resume_ckpt)
            self.resume_ckpt = None  # its tensors are in the model now; free the copy

        self.model: nn.Module = self.method
        if cfg.compile:
            # In place, so state_dict keys stay those of the plain module.
            self.method.compile()
        if self.world > 1:
            from torch.nn.parallel import DistributedDataParallel as DDP

            ignored = list(getattr(self.method, "ddp_ignored_names", list)())
            if ignored:
                DDP._set_params_and_buffers_to_ignore_for_model(self.method, ignored)
            # channels_last 1x1 conv weights get canonically strided gradients; DDP then copies
            # them into its bucket (cheap, correct) and would warn about it on every run.
            warnings.filterwarnings("ignore", message="Grad strides do not match bucket view")
            self.model = DDP(
                self.method, device_ids=[device.index] if device.type == "cuda" else None,
                gradient_as_bucket_view=True,
            )

    def _init_backbone(self, backbone: nn.Module, source: str) -> dict[str, Any] | None:
        """Two-step binarization: start from a step-1 run (or a converted reference checkpoint).

        ``model.init_scope=backbone`` loads the backbone only. ``model`` also loads the rest of
        the step-1 model into the method once it is built (:meth:`_init_rest_of_method`, given
        the step-1 method state this returns) -- projection head and, where both steps have
        them, momentum key encoder and queue -- as the reference step 2 does (S2-BNN
        ``main_moco.py --model-path``: ``model.load_state_dict(ckpt['state_dict'])``).
        """
        ckpt = load_checkpoint(source)
        entry = ckpt.get("backbone")
        if not isinstance(entry, dict) or not isinstance(entry.get("state_dict"), dict):
            sd = ckpt.get("state_dict")
            if isinstance(sd, dict) and any(str(k).startswith("module.encoder_q.") for k in sd):
                raise CheckpointError(
                    f"model.init_from={source} is a reference (MoCo-layout) checkpoint; convert "
                    f"it first: s2bnn convert {source} --arch {self.parts.backbone_name} --out "
                    "FILE.pt, then set model.init_from=FILE.pt"
                )
            raise CheckpointError(
                f"model.init_from={source} is not an s2bnn training checkpoint (no backbone "
                "entry); pass a step-1 run dir or one of its checkpoints/*.pt"
            )
        if entry.get("name") not in (None, self.parts.backbone_name):
            raise CheckpointError(
                f"model.init_from={source} holds a '{entry.get('name')}' backbone but model.name "
                f"is '{self.parts.backbone_name}'; use the same architecture in both steps"
            )
        from s2bnn.models import load_backbone_state

        load_backbone_state(backbone, entry["state_dict"], source)
        if self.cfg.model.init_scope != "model":
            self.say(f"backbone initialised from {source}")
            return None
        saved = ckpt.get("method")
        if not isinstance(saved, dict) or not any(k.startswith("head.") for k in saved):
            raise CheckpointError(
                f"model.init_from={source} holds no projection head (head.* keys), so "
                "model.init_scope=model cannot load the whole step-1 model; use "
                "model.init_scope=backbone"
            )
        return saved

    def _init_rest_of_method(self, method: nn.Module, saved: dict[str, Any], source: str) -> None:
        """``model.init_scope=model``: the step-1 head (and key encoder, queue) into ``method``."""
        own = method.training_state() if hasattr(method, "training_state") \
            else method.state_dict()
        keys = [k for k in own if not k.startswith("backbone.")]
        missing = [k for k in keys if k not in saved]
        if any(k.startswith("head.") for k in missing):
            raise CheckpointError(
                f"model.init_from={source}: its projection head does not fit this method "
                f"(missing {', '.join(k for k in missing if k.startswith('head.'))[:200]})"
            )
        bad = [f"{k} {tuple(saved[k].shape)} vs {tuple(own[k].shape)}" for k in keys
               if k in saved and tuple(saved[k].shape) != tuple(own[k].shape)]
        if bad:
            raise CheckpointError(
                f"model.init_from={source}: step-1 tensors do not fit this method (file vs "
                f"model): {', '.join(bad[:3])}; are both steps the same method and proj_dim?"
            )
        method.load_state_dict({k: saved[k] for k in keys if k in saved}, strict=False)
        fresh = sorted({k.split(".")[0] for k in missing})
        loaded = sorted({k.split(".")[0] for k in keys if k in saved})
        self.say(f"{', '.join(['backbone', *loaded])} initialised from {source}"
                 + (f"; fresh: {', '.join(fresh)}" if fresh else ""))

    def _make_loader(self, sampler: Sampler) -> DataLoader:
        return DataLoader(
            self.parts.train_set, batch_size=self.per_rank, sampler=sampler,
            num_workers=self.cfg.data.num_workers, drop_last=True, generator=self.loader_gen,
            worker_init_fn=_seed_worker, pin_memory=self.device.type == "cuda",
            persistent_workers=False,
        )

    def _optimizer_for(self, module: nn.Module) -> torch.optim.Optimizer:
        oc = self.cfg.optim
        return build_optimizer(
            module, oc.name, oc.lr, weight_decay=oc.weight_decay, momentum=oc.momentum,
            betas=oc.betas, exclude_bn_bias=oc.exclude_bn_bias, exclude_binary=oc.exclude_binary,
            lars_eta=oc.lars_eta,
        )

    def _sizing(self) -> dict[str, Any]:
        return {key: getattr(self.cfg, key) for key in SIZING_KEYS}

    def _planned_steps(self) -> int | None:
        """Optimiser steps of the run, or None when a time budget is still to be measured."""
        cfg, ckpt = self.cfg, self.resume_ckpt
        if ckpt is not None and ckpt.get("sizing") == self._sizing() and ckpt.get("total_steps"):
            return int(ckpt["total_steps"])  # a resume keeps what the budget was measured to be
        if cfg.steps is not None:
            return int(cfg.steps)
        if cfg.time_budget is not None:
            return None
        return int(cfg.epochs or 1) * self.steps_per_epoch

    def _measure_step_seconds(self) -> float:
        """Seconds per optimiser step, timed on a throw-away copy of the method (real batches,
        loading included), so the run itself starts from untouched weights and RNG state."""
        probe = copy.deepcopy(self.method)
        opt = self._optimizer_for(probe)
        rng = _rng_state()
        times: list[float] = []
        batches: Iterator[list[torch.Tensor]] = iter(())
        try:
            # Under DDP every rank runs the same number of steps: methods with collectives in
            # their forward (shuffle BN) would otherwise wait on each other forever.
            for i in range(12 if self.world == 1 else 6):
                t0 = time.perf_counter()
                views = next(batches, None)
                if views is None:  # a tiny dataset: fewer batches an epoch than timed steps
                    batches = self._batches(self.loader)
                    views = next(batches)
                with self.autocast():
                    loss, _ = probe(views)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                probe.on_train_step_end(i, self.steps_per_epoch)
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)
                if i > 0:  # the first step pays for allocations and lazy initialisation
                    times.append(time.perf_counter() - t0)
                if self.world == 1 and len(times) >= 3 and sum(times) > 2.0:
                    break
            # What each epoch end adds: a new loader iterator (worker start-up) and last.pt
            # (serialised here in memory, then doubled for the disk and its fsync). On a small
            # dataset of a few steps an epoch this is a large part of the time.
            t0 = time.perf_counter()
            del batches
            iter(self.loader)
            t1 = time.perf_counter()
            torch.save({"m": probe.state_dict(), "o": opt.state_dict()}, io.BytesIO())
            epoch_end = (t1 - t0) + 2 * (time.perf_counter() - t1)
        finally:
            _set_rng_state(rng, "the engine's own snapshot")
            del probe, opt
        times.sort()
        seconds = times[len(times) // 2] + epoch_end / self.steps_per_epoch
        if self.world > 1:  # every rank must train the same number of steps
            t = torch.tensor([seconds], dtype=torch.float64, device=self.device)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            seconds = float(t[0])
        return seconds

    def _steps_in_budget(self) -> int:
        budget = parse_duration(self.cfg.time_budget)  # type: ignore[arg-type]
        step_s = self._measure_step_seconds()
        spent = time.perf_counter() - self.t_start
        try:
            steps = steps_for_budget(budget, step_s, spent)
        except BudgetError as err:
            raise ConfigError(f"config key 'time_budget': {err}; raise it or use steps=N") from None
        self.say(f"time budget {format_duration(budget)}: {step_s * 1000:.0f} ms a step after "
                 f"{format_duration(spent)} of set-up -> {steps} steps "
                 f"({steps / self.steps_per_epoch:.2f} epochs)")
        return steps

    def _load(self, path: Path | None, ckpt: dict[str, Any]) -> None:
        saved = ckpt.get("frozen_fingerprint")
        if saved is not None and saved != self.method.frozen_fingerprint():
            raise CheckpointError(
                f"cannot resume from {path}: the teacher's weights differ from those the run "
                f"started with (method.teacher.path={self.cfg.method.teacher.path} changed?); "
                "point at the original teacher or start a new output_dir"
            )
        try:
            self.method.load_training_state(ckpt["method"])
            self.optimizer.load_state_dict(ckpt["optimizer"])
            self.scheduler.load_state_dict(ckpt["scheduler"])
        except (KeyError, RuntimeError, ValueError) as err:
            first = str(err).strip().splitlines()[0][:200] if str(err).strip() else repr(err)
            raise CheckpointError(
                f"cannot resume from {path}: it does not match this model/optimiser ({first}); "
                "use the config the run was made with, or another output_dir"
            ) from None
        self.epoch = int(ckpt["epoch"])
        self.step = int(ckpt["step"])
        self.epoch_step = int(ckpt.get("epoch_step", 0))
        self.bad_steps = int(ckpt.get("bad_steps", 0))
        if self.epoch_step:
            # Mid-epoch: the epoch's seeding is redone, then the RNGs are set to where they were.
            self.resume_rng = ckpt.get("rng")
            if self.resume_rng is None:
                raise CheckpointError(f"cannot resume from {path}: it was written mid-epoch "
                                      "but holds no RNG state; start a new output_dir")
            if self.cfg.data.num_workers > 0 and self.parts.batch_transform is None:
                self.say("resuming mid-epoch with data.num_workers > 0: the same images in the "
                         "same order, but loader workers draw their augmentations anew (set "
                         "data.num_workers=0 for a bit-exact resume)")
        # The schedule may have been lengthened (epochs changed): take the lr from it, not the file.
        for group, base in zip(self.optimizer.param_groups, self.scheduler.base_lrs):
            group["lr"] = base * self.scheduler.lr_lambdas[0](self.step)
        self.say(self.plan.note)

    # ---------------------------------------------------------------- outputs
    def open_outputs(self) -> None:
        self.metrics: MetricsCSV | None = None
        self.tb: Any = None
        if not self.main:
            return
        resumed = self.plan.action == "resume"
        if not resumed:
            if self.plan.note:
                self.say(self.plan.note)
            if self.run_dir.is_dir():
                clear_run_dir(self.run_dir)
        self.ckpt_dir.mkdir(parents=True, exist_ok=True)
        remove_stale_temp_files(self.run_dir)  # left by a run killed mid-write
        save_config(self.cfg, self.run_dir / "config.yaml")
        self.metrics = MetricsCSV(
            self.run_dir / "metrics.csv", keep_until_step=self.step if resumed else None
        )
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # pragma: no cover - tensorboard is a dependency
            self.say("tensorboard is not installed: no tb/ events")
            return
        # purge_step drops events a crashed run wrote after its last checkpoint.
        self.tb = SummaryWriter(
            str(self.run_dir / "tb"), purge_step=self.step + 1 if resumed else None
        )

    def close_outputs(self) -> None:
        if self.tb is not None:
            self.tb.close()

    def checkpoint(self, finished: bool, epoch_end: bool = True) -> None:
        if not self.main:
            return
        cfg = self.cfg
        state = {
            "format": FORMAT,
            "version": VERSION,
            "config": config_to_dict(cfg),
            "epoch": self.epoch,
            "step": self.step,
            "epoch_step": self.epoch_step,
            "total_steps": self.total_steps,
            "steps_per_epoch": self.steps_per_epoch,
            "sizing": self._sizing(),
            "backbone": {
                "name": self.parts.backbone_name,
                "kwargs": dict(self.parts.backbone_kwargs),
                "state_dict": self.method.backbone.state_dict(),
            },
            "method": self.method.training_state(),  # the frozen teacher is reloaded, not saved
            "frozen_fingerprint": self.method.frozen_fingerprint(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "rng": _rng_state(),
            "bad_steps": self.bad_steps,
            "world_size": self.world,
            "image_size": self.parts.image_size,
            "in_chans": self.parts.in_chans,
            "finished": finished,
        }
        last = self.ckpt_dir / "last.pt"
        kept = (f"the previous checkpoint {last} is kept" if last.is_file()
                else "no checkpoint was written yet")
        target = last
        try:
            save_checkpoint(state, last)
            if epoch_end and cfg.save_every and self.epoch % cfg.save_every == 0:
                kept = f"{last} was written"
                target = self.ckpt_dir / f"epoch_{self.epoch}.pt"
                save_checkpoint(state, target)
        except OSError as err:
            # A full disk, a quota or a permission problem: the write was atomic, so nothing
            # half-written replaced a good file.
            raise TrainingError(
                f"cannot write checkpoint {target} at step {self.step}: "
                f"{err.strerror or err}; {kept}; free space (or fix the directory) and rerun "
                "the same command with resume=auto"
            ) from None

    def log_row(self, row: dict[str, Any]) -> None:
        if self.metrics is not None:
            self.metrics.write(row)
        if self.tb is not None:
            for key, value in row.items():
                if key not in ("epoch", "step") and isinstance(value, (int, float)):
                    self.tb.add_scalar(f"train/{key}", value, row["step"])

    # ---------------------------------------------------------------- kNN monitor
    def knn(self) -> float | None:
        """kNN top-1 (%) of the student backbone on a small labelled split (rank 0 only)."""
        if not hasattr(self, "_knn_data"):
            fn = self.parts.knn_sets
            self._knn_data = fn() if fn is not None else None
            if self._knn_data is None:
                self.say("kNN monitor: no labelled test split, skipped")
        if self._knn_data is None:
            return None
        from s2bnn.eval.features import extract_features, make_loader
        from s2bnn.eval.knn import knn_eval

        bank, queries, num_classes = self._knn_data
        bs = max(64, self.cfg.batch_size // self.world)
        nw = self.cfg.data.num_workers
        backbone = self.method.backbone
        # A private RNG state: the monitor must not change what training draws next.
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            tr_f, tr_y = extract_features(
                backbone, make_loader(bank, bs, num_workers=nw, device=self.device), self.device
            )
            te_f, te_y = extract_features(
                backbone, make_loader(queries, bs, num_workers=nw, device=self.device),
                self.device,
            )
        res = knn_eval(tr_f, tr_y, te_f, te_y, num_classes=num_classes, k=self.cfg.knn_k)
        return float(res["knn_top1"])

    # ---------------------------------------------------------------- training
    def _bad_step(self, logs: dict[str, Any], loss_val: float) -> None:
        cfg = self.cfg
        terms = _non_finite_terms(logs) or ["loss"]
        where = f"step {self.step + 1} (epoch {self.epoch + 1})"
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
        self.bad_steps += 1
        self.say(f"skipped {where}: non-finite {what} ({self.bad_steps}/{cfg.max_bad_steps})")
        if self.bad_steps >= cfg.max_bad_steps:
            raise TrainingError(
                f"{self.bad_steps} non-finite steps (last at {where}, term(s) {what}) reached "
                f"max_bad_steps={cfg.max_bad_steps}; {kept}; lower optim.lr or set optim.grad_clip"
            )

    def _batches(self, loader: DataLoader) -> Iterator[list[torch.Tensor]]:
        augment = self.parts.batch_transform
        for batch in loader:
            views = batch[0] if isinstance(batch, (list, tuple)) and len(batch) == 2 else batch
            if augment is not None:
                yield augment(views.to(self.device, non_blocking=True))
                continue
            if isinstance(views, torch.Tensor):
                views = [views]
            yield [v.to(self.device, non_blocking=True) for v in views]

    def _train_step(self, views: list[torch.Tensor], sums: dict[str, torch.Tensor]) -> bool:
        """One optimiser step; False when the step was skipped (non-finite loss, policy skip)."""
        cfg = self.cfg
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
            self.step += 1
            return False
        loss.backward()
        if cfg.optim.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.params, cfg.optim.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        self.method.on_train_step_end(self.step, self.total_steps)
        self.step += 1
        sums["loss"] = sums.get("loss", 0) + loss_val
        for key, value in logs.items():
            v = value.detach().float().mean() if isinstance(value, torch.Tensor) else \
                torch.tensor(float(value))
            sums[key] = sums.get(key, 0) + v
        return True

    def _log_point(
        self, sums: dict[str, torch.Tensor], good: int, steps: int, elapsed: float, knn: bool,
    ) -> dict[str, Any]:
        row: dict[str, Any] = {
            "epoch": self.epoch + 1,
            "step": self.step,
            "loss": float(sums["loss"]) / good if good else float("nan"),
            "lr": self.optimizer.param_groups[0]["lr"],
            "img_per_s": steps * self.cfg.batch_size / elapsed if elapsed > 0 else 0.0,
        }
        for key, value in sums.items():
            if key != "loss":
                row[key] = float(value) / good
        if self.bad_steps:
            row["bad_steps"] = self.bad_steps
        if knn:
            if self.main:
                top1 = self.knn()
                if top1 is not None:
                    row["knn_top1"] = top1
            D.barrier()
        if self.main:
            self.log_row(row)
        return row

    def _dry_run_over(self) -> bool:
        return self.cfg.max_steps is not None and self.step >= self.cfg.max_steps

    def _train_epoch(self) -> None:
        """Train to the end of the epoch, or until the run's steps (or max_steps) are done."""
        cfg = self.cfg
        from tqdm import tqdm

        # Everything random in this epoch follows from (seed, rank, epoch): see the module doc.
        _seed_all(_derive_seed(cfg.seed, self.rank, self.epoch))
        self.loader_gen.manual_seed(_derive_seed(cfg.seed, self.rank, self.epoch, 1))
        self.sampler.set_epoch(self.epoch)
        start = self.epoch_step
        loader = self.loader
        if start:  # a mid-epoch resume: skip what was trained, continue the RNGs from there
            loader = self._make_loader(_SkipSampler(self.sampler, start * self.per_rank))
            assert self.resume_rng is not None
            _set_rng_state(self.resume_rng)
            self.resume_rng = None
        bar = tqdm(
            total=min(self.steps_per_epoch, self.total_steps - self.step + start), initial=start,
            desc=f"epoch {self.epoch + 1}/{self.num_epochs}", disable=not self.show,
            dynamic_ncols=True, leave=False, file=sys.stderr,
        )
        sums: dict[str, torch.Tensor] = {}
        good = steps = 0
        t0 = time.perf_counter()
        row: dict[str, Any] = {}
        try:
            for i, views in enumerate(self._batches(loader), start=start):
                good += int(self._train_step(views, sums))
                steps += 1
                self.epoch_step = i + 1
                if self.fault_steps:
                    fault_point("kill-step")
                bar.update(1)
                last = i + 1 == self.steps_per_epoch
                stop = self.step >= self.total_steps or self._dry_run_over()
                save = (cfg.save_every_steps > 0 and self.step % cfg.save_every_steps == 0
                        and not (last or stop))
                if self.step % cfg.log_every == 0 or last or stop or save:
                    knn = cfg.knn_every > 0 and (
                        (last and (self.epoch + 1) % cfg.knn_every == 0) or stop)
                    row = self._log_point(sums, good, steps, time.perf_counter() - t0, knn)
                    post = {"loss": f"{row['loss']:.4f}", "lr": f"{row['lr']:.2e}",
                            "img/s": f"{row['img_per_s']:.0f}"}
                    post.update({k: f"{v:.3f}" for k, v in row.items() if k.startswith("cos")})
                    bar.set_postfix(post, refresh=False)
                    sums, good, steps = {}, 0, 0
                    t0 = time.perf_counter()
                if save:
                    self.checkpoint(finished=False, epoch_end=False)
                if stop and not last:
                    return
        finally:
            bar.close()
        self.epoch += 1
        self.epoch_step = 0
        if row:
            self.say(
                f"epoch {self.epoch}/{self.num_epochs} step {self.step}: loss {row['loss']:.4f}"
                + (f", knn_top1 {row['knn_top1']:.2f}" if "knn_top1" in row else "")
            )

    def run(self) -> None:
        cfg = self.cfg
        lr0 = self.optimizer.param_groups[0]["lr"]
        self.num_epochs = math.ceil(self.total_steps / self.steps_per_epoch)
        self.say(
            f"training {self.total_steps} steps ({self.total_steps / self.steps_per_epoch:.2f} "
            f"epochs of {self.steps_per_epoch}), batch {cfg.batch_size} on {self.world} x "
            f"{self.device}, lr {lr0:.3g}; run dir {self.run_dir}"
        )
        t0 = time.perf_counter()
        wrote = False
        while self.step < self.total_steps and not self._dry_run_over():
            self._train_epoch()
            # A dry run stopped by max_steps is finished too (it is not meant to be resumed).
            done = self.step >= self.total_steps or self._dry_run_over()
            self.checkpoint(finished=done, epoch_end=self.epoch_step == 0)
            wrote = True
        if not wrote:
            # Nothing left to train (e.g. a resumed run whose epochs were lowered): mark finished.
            self.checkpoint(finished=True)
        self.say(f"trained to step {self.step} in {format_duration(time.perf_counter() - t0)} "
                 f"({format_duration(time.perf_counter() - self.t_start)} with set-up)")
        D.barrier()


def train(cfg: Config, *, parts: Parts | Callable[[Config], Parts] | None = None) -> Path:
    """Run the recipe ``cfg`` into ``cfg.output_dir`` and return that directory.

    Under ``torchrun`` (``WORLD_SIZE > 1``) each process joins the process group (NCCL on GPUs,
    gloo on CPUs) and trains its share of every global batch; only rank 0 writes files. ``parts``
    replaces what :func:`build_parts` would build from ``cfg`` (a :class:`Parts` or a function of
    the config).
    """
    prev_det = torch.are_deterministic_algorithms_enabled()
    prev_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    prev_bench = torch.backends.cudnn.benchmark
    created = False
    trainer: _Trainer | None = None
    try:
        device = resolve_device(cfg.device)
        if cfg.deterministic:
            # cuBLAS needs this before its first call to be deterministic.
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True, warn_only=True)
            torch.backends.cudnn.benchmark = False
        elif device.type == "cuda":
            torch.backends.cudnn.benchmark = True
        created = _init_distributed(device)
        trainer = _Trainer(cfg, parts)
        trainer.setup(device)
        trainer.open_outputs()
        trainer.run()
        return trainer.run_dir
    except OSError as err:
        if err.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        raise TrainingError(
            f"disk full while writing {err.filename or cfg.output_dir}: {err.strerror}; the last "
            "complete checkpoint is kept; free space and rerun the same command with resume=auto"
        ) from None
    finally:
        if trainer is not None and hasattr(trainer, "tb"):
            trainer.close_outputs()
        torch.use_deterministic_algorithms(prev_det, warn_only=prev_warn)
        torch.backends.cudnn.benchmark = prev_bench
        if created and dist.is_initialized():
            dist.destroy_process_group()

