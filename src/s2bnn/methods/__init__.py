"""Self-supervised methods: one small class per method over :class:`Method`.

* ``mocov2`` -- strategy 1: MoCo v2 on the student itself (:mod:`.mocov2`).
* ``s2bnn`` -- strategy 3: distillation from a frozen (or online) real-valued teacher;
  strategy 2 with ``contrastive_weight > 0`` (:mod:`.s2bnn`).
* ``seed`` -- SEED (:mod:`.seed`); ``dino`` -- DINO (:mod:`.dino`).

:func:`build_method` turns a :class:`s2bnn.config.MethodConfig` into a method.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch.nn as nn

from s2bnn.errors import CheckpointError, ConfigError
from s2bnn.methods.base import Method, mlp_head, queue_length
from s2bnn.methods.dino import DINO
from s2bnn.methods.mocov2 import MoCoV2
from s2bnn.methods.s2bnn import S2BNN
from s2bnn.methods.seed import SEED

if TYPE_CHECKING:
    from s2bnn.config import MethodConfig, TeacherConfig

__all__ = ["Method", "MoCoV2", "S2BNN", "SEED", "DINO", "METHODS", "build_method", "views_needed"]

METHODS = ("mocov2", "s2bnn", "seed", "dino")


def _offline_teacher(tcfg: TeacherConfig, method: str, in_chans: int, proj_dim: int) -> nn.Module:
    from s2bnn.teachers import load_teacher

    if not tcfg.path:
        raise ConfigError(
            f"method '{method}' needs a teacher: set method.teacher.path=RUN_DIR_OR_CHECKPOINT "
            "(e.g. the run dir of configs/fashion_mnist/teacher_mocov2.yaml)"
        )
    if not Path(tcfg.path).exists():
        raise CheckpointError(
            f"teacher not found: {tcfg.path}; train it first (e.g. s2bnn train "
            "configs/fashion_mnist/teacher_mocov2.yaml) or set method.teacher.path"
        )
    teacher = load_teacher(
        tcfg.path, tcfg.arch, head=tcfg.head, precision=tcfg.precision, fmt=tcfg.format,
        **dict(tcfg.kwargs),
    )
    t_chans = getattr(teacher, "in_chans", None)
    if t_chans is not None and t_chans != in_chans:
        raise ConfigError(
            f"the teacher {tcfg.path} takes {t_chans}-channel images but the data has {in_chans}; "
            "use a teacher trained on this data (or convert the images)"
        )
    if teacher.embed_dim != proj_dim:
        raise ConfigError(
            f"the teacher {tcfg.path} gives {teacher.embed_dim}-d embeddings but "
            f"method.proj_dim is {proj_dim}; set method.proj_dim={teacher.embed_dim}"
        )
    return teacher


def _online_teacher(tcfg: TeacherConfig, in_chans: int, proj_dim: int) -> tuple[nn.Module, ...]:
    from s2bnn.models import build_model

    kwargs: dict[str, Any] = {"in_chans": in_chans, **dict(tcfg.kwargs), "num_classes": 0}
    backbone = build_model(tcfg.arch, **kwargs)
    feat = int(backbone.feature_dim)
    return backbone, mlp_head(feat, feat, proj_dim)


def views_needed(cfg: MethodConfig) -> int:
    """Augmented views per image the method ``cfg`` trains on: 2 for the contrastive and
    self-distillation losses (MoCo v2, DINO, a contrastive term, an online MoCo v2 teacher),
    else 1 (distillation from an offline teacher)."""
    if cfg.name in ("mocov2", "dino"):
        return 2
    if cfg.name == "s2bnn" and (cfg.contrastive_weight > 0 or cfg.teacher.kind == "online"):
        return 2
    return 1


def build_method(
    cfg: MethodConfig, backbone: nn.Module, *, num_train: int, total_steps: int, in_chans: int
) -> Method:
    """Build the method ``cfg.name`` around the student ``backbone``.

    ``num_train`` (training images) caps queue lengths; ``total_steps`` (optimiser steps of the
    run) drives DINO's schedules; ``in_chans`` is checked against the teacher's input channels.
    Raises :class:`ConfigError` for an unknown method, a missing teacher or bad values.
    """
    if cfg.name not in METHODS:
        raise ConfigError(f"unknown method '{cfg.name}'; known methods: {', '.join(METHODS)}")
    if not isinstance(getattr(backbone, "feature_dim", None), int):
        raise TypeError("the backbone must have an int feature_dim (build it with build_model)")
    for key in ("momentum", "ema_momentum", "dino_center_momentum"):
        if not 0.0 <= getattr(cfg, key) <= 1.0:
            raise ConfigError(f"method.{key} must be in [0, 1], got {getattr(cfg, key)}")
    for key in ("distill_weight", "contrastive_weight"):
        if getattr(cfg, key) < 0:
            raise ConfigError(f"method.{key} must be >= 0, got {getattr(cfg, key)}")
    for key in ("seed_student_temp", "seed_teacher_temp", "dino_student_temp",
                "dino_teacher_temp", "dino_warmup_teacher_temp"):
        if getattr(cfg, key) <= 0:
            raise ConfigError(f"method.{key} must be > 0, got {getattr(cfg, key)}")
    if not 0.0 <= cfg.dino_warmup_teacher_temp_frac <= 1.0:
        raise ConfigError("method.dino_warmup_teacher_temp_frac must be in [0, 1]")
    if cfg.proj_hidden_dim is not None and cfg.proj_hidden_dim <= 0:
        raise ConfigError(f"method.proj_hidden_dim must be > 0, got {cfg.proj_hidden_dim}")
    qlen = queue_length(cfg.queue_size, num_train)
    moco_kw = dict(
        proj_dim=cfg.proj_dim, hidden_dim=cfg.proj_hidden_dim, temperature=cfg.temperature,
        queue_len=qlen, momentum=cfg.momentum, shuffle=cfg.shuffle_bn in ("auto", "shuffle"),
        groups=cfg.shuffle_bn_groups,
    )
    if cfg.name == "mocov2":
        return MoCoV2(backbone, **moco_kw)
    if cfg.name == "s2bnn":
        if cfg.distill_weight == 0 and cfg.contrastive_weight == 0:
            raise ConfigError("method.distill_weight and method.contrastive_weight are both 0")
        if cfg.teacher.kind == "online":
            online = _online_teacher(cfg.teacher, in_chans, cfg.proj_dim)
            return S2BNN(backbone, online_teacher=(online[0], online[1]),
                         distill_weight=cfg.distill_weight,
                         contrastive_weight=cfg.contrastive_weight,
                         distill_views=cfg.distill_views, **moco_kw)
        teacher = _offline_teacher(cfg.teacher, cfg.name, in_chans, cfg.proj_dim)
        return S2BNN(backbone, teacher=teacher, distill_weight=cfg.distill_weight,
                     contrastive_weight=cfg.contrastive_weight,
                     distill_views=cfg.distill_views, **moco_kw)
    if cfg.name == "seed":
        if cfg.teacher.kind != "offline":
            raise ConfigError("method 'seed' distils from an offline teacher only; "
                              "set method.teacher.kind=offline")
        teacher = _offline_teacher(cfg.teacher, cfg.name, in_chans, cfg.proj_dim)
        return SEED(backbone, teacher=teacher, proj_dim=cfg.proj_dim,
                    hidden_dim=cfg.proj_hidden_dim, queue_len=qlen,
                    student_temp=cfg.seed_student_temp, teacher_temp=cfg.seed_teacher_temp)
    return DINO(
        backbone, total_steps=total_steps, out_dim=cfg.dino_out_dim, bottleneck_dim=cfg.proj_dim,
        hidden_dim=cfg.proj_hidden_dim, student_temp=cfg.dino_student_temp,
        teacher_temp=cfg.dino_teacher_temp, warmup_teacher_temp=cfg.dino_warmup_teacher_temp,
        warmup_frac=cfg.dino_warmup_teacher_temp_frac, center_momentum=cfg.dino_center_momentum,
        ema_momentum=cfg.ema_momentum,
    )
