"""The builder: from a config, the data, the student, the method and the optimiser a run trains.

:func:`build_parts` gives the data and the (not yet called) model and method builders as one
:class:`Parts`; tests and embedding code pass their own to :func:`s2bnn.engine.train`.
:func:`load_step1_backbone` and :func:`init_rest_of_method` start a step-2 run from a step-1
one (two-step binarization), and
:func:`make_optimizer` / :func:`make_scheduler` turn ``cfg.optim`` into their objects.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
from torch.utils.data import Dataset, Subset

from s2bnn.checkpoint import load_checkpoint
from s2bnn.config import Config, OptimConfig
from s2bnn.engine.optim import build_optimizer, build_scheduler, stretch_scheduler
from s2bnn.errors import CheckpointError, ConfigError, DataError

__all__ = ["Parts", "build_parts", "backbone_kwargs", "load_step1_backbone",
           "init_rest_of_method", "make_optimizer",
           "make_scheduler", "IN_MEMORY_AUTO_BYTES"]


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
    from s2bnn.methods import build_method, check_method_config
    from s2bnn.models import build_model

    # Every method key (and the views the method needs) is checked before any data or teacher
    # is loaded, not at the first forward pass.
    check_method_config(cfg.method, cfg.data.augment.num_views)
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


# --------------------------------------------------------------------------- two-step runs
def load_step1_backbone(backbone: nn.Module, source: str, cfg: Config, backbone_name: str,
                        say: Callable[[str], None] = lambda msg: None
                        ) -> dict[str, Any] | None:
    """Two-step binarization: load a step-1 run's backbone (or a converted reference
    checkpoint's) at ``source`` into ``backbone``, before the method is built around it.

    ``model.init_scope=backbone`` stops there. ``model`` returns the step-1 method state, which
    :func:`init_rest_of_method` loads into the method once it is built -- projection head and,
    where both steps have them, momentum key encoder and queue -- as the reference step 2 does
    (S2-BNN ``main_moco.py --model-path``: ``model.load_state_dict(ckpt['state_dict'])``).
    """
    from s2bnn.checkpoint import method_state
    from s2bnn.models import load_backbone_state

    ckpt = load_checkpoint(source)
    entry = ckpt.get("backbone")
    if not isinstance(entry, dict) or not isinstance(entry.get("state_dict"), dict):
        sd = ckpt.get("state_dict")
        if isinstance(sd, dict) and any(str(k).startswith("module.encoder_q.") for k in sd):
            raise CheckpointError(
                f"model.init_from={source} is a reference (MoCo-layout) checkpoint; convert "
                f"it first: s2bnn convert {source} --arch {backbone_name} --out "
                "FILE.pt, then set model.init_from=FILE.pt"
            )
        raise CheckpointError(
            f"model.init_from={source} is not an s2bnn training checkpoint (no backbone "
            "entry); pass a step-1 run dir or one of its checkpoints/*.pt"
        )
    if entry.get("name") not in (None, backbone_name):
        raise CheckpointError(
            f"model.init_from={source} holds a '{entry.get('name')}' backbone but model.name "
            f"is '{backbone_name}'; use the same architecture in both steps"
        )
    load_backbone_state(backbone, entry["state_dict"], source)
    if cfg.model.init_scope != "model":
        say(f"backbone initialised from {source}")
        return None
    saved = ckpt.get("method")
    if not isinstance(saved, dict) or not any(k.startswith("head.") for k in saved):
        raise CheckpointError(
            f"model.init_from={source} holds no projection head (head.* keys), so "
            "model.init_scope=model cannot load the whole step-1 model; use "
            "model.init_scope=backbone"
        )
    return method_state(ckpt)


def init_rest_of_method(method: nn.Module, saved: dict[str, Any], source: str,
                        say: Callable[[str], None] = lambda msg: None) -> None:
    """``model.init_scope=model``: the step-1 head (and key encoder, queue) into ``method``."""
    own = method.training_state() if hasattr(method, "training_state") else method.state_dict()
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
    say(f"{', '.join(['backbone', *loaded])} initialised from {source}"
        + (f"; fresh: {', '.join(fresh)}" if fresh else ""))


# --------------------------------------------------------------------------- optimisation
def make_optimizer(oc: OptimConfig, module: nn.Module) -> torch.optim.Optimizer:
    """The optimiser ``oc`` names over ``module``'s trainable parameters."""
    return build_optimizer(
        module, oc.name, oc.lr, weight_decay=oc.weight_decay, momentum=oc.momentum,
        betas=oc.betas, exclude_bn_bias=oc.exclude_bn_bias, exclude_binary=oc.exclude_binary,
        lars_eta=oc.lars_eta,
    )


def make_scheduler(oc: OptimConfig, optimizer: torch.optim.Optimizer, total_steps: int,
                   steps_per_epoch: int) -> Any:
    """The per-step LR schedule of ``oc`` over ``total_steps`` (warm-up given in epochs)."""
    return build_scheduler(optimizer, total_steps, _warmup_steps(oc, steps_per_epoch),
                           oc.schedule, oc.lr, oc.min_lr)


def stretch_schedule(oc: OptimConfig, scheduler: Any, total_steps: int,
                     steps_per_epoch: int) -> None:
    """:func:`make_scheduler`'s schedule, re-planned in place to end at ``total_steps``."""
    stretch_scheduler(scheduler, total_steps, _warmup_steps(oc, steps_per_epoch), oc.schedule,
                      oc.lr, oc.min_lr)


def _warmup_steps(oc: OptimConfig, steps_per_epoch: int) -> int:
    return round(oc.warmup_epochs * steps_per_epoch)
