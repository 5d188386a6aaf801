"""The method registry: a name in ``method.name`` -> its class, which validates and builds itself.

Every method class is registered with :func:`register_method` and implements three classmethods
of :class:`~s2bnn.methods.base.Method`: ``views_needed(cfg)``, ``check_config(cfg)`` (its own
keys; one-line :class:`ConfigError` for bad values) and ``from_config(cfg, backbone, ctx)``.
:func:`check_method_config` runs every check before any data or teacher is loaded, and
:func:`build_method` builds. The teachers several methods load are built here too.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import torch.nn as nn

from s2bnn.errors import CheckpointError, ConfigError

if TYPE_CHECKING:
    from s2bnn.config import MethodConfig, TeacherConfig
    from s2bnn.methods.base import Method

__all__ = ["BuildContext", "register_method", "method_names", "method_class",
           "check_method_config", "views_needed", "build_method", "offline_teacher",
           "online_teacher", "check_range"]

_REGISTRY: dict[str, type[Method]] = {}
M = TypeVar("M", bound="type[Method]")


@dataclass(frozen=True)
class BuildContext:
    """What a method needs to know about its run beyond its config."""

    num_train: int  # training images: caps queue lengths
    total_steps: int  # optimiser steps of the run: step schedules (DINO)
    in_chans: int  # image channels: checked against a teacher's


def register_method(cls: M) -> M:
    """Class decorator: make ``cls`` buildable as ``method.name=<cls.name>``."""
    _REGISTRY[cls.name] = cls
    return cls


def method_names() -> tuple[str, ...]:
    """The registered method names, in registration order."""
    return tuple(_REGISTRY)


def method_class(name: str) -> type[Method]:
    """The class registered as ``name``; an unknown name is a one-line :class:`ConfigError`."""
    if name not in _REGISTRY:
        raise ConfigError(f"unknown method '{name}'; known methods: {', '.join(_REGISTRY)}")
    return _REGISTRY[name]


def check_range(cfg: Any, key: str, low: float | None = None, high: float | None = None,
                *, strict_low: bool = False) -> None:
    """``method.<key>`` lies in ``[low, high]`` (``(low, ...`` with ``strict_low``)."""
    value = getattr(cfg, key)
    if low is not None and (value <= low if strict_low else value < low):
        bound = f"> {low:g}" if strict_low else f">= {low:g}"
        if high is not None:
            bound = f"in [{low:g}, {high:g}]"
        raise ConfigError(f"method.{key} must be {bound}, got {value}")
    if high is not None and value > high:
        raise ConfigError(f"method.{key} must be in [{low:g}, {high:g}], got {value}")


def views_needed(cfg: MethodConfig) -> int:
    """Augmented views per image the method ``cfg`` trains on."""
    return method_class(cfg.name).views_needed(cfg)


def check_method_config(cfg: MethodConfig, num_views: int | None = None) -> None:
    """Every check of ``cfg`` (and, given ``num_views``, of the views the data gives), cheap and
    before anything is loaded."""
    cls = method_class(cfg.name)
    if cfg.proj_hidden_dim is not None and cfg.proj_hidden_dim < 0:
        raise ConfigError(f"method.proj_hidden_dim must be >= 0 (0: a linear head), got "
                          f"{cfg.proj_hidden_dim}")
    if cfg.teacher.whiten and not cfg.teacher.center:
        # Any method that distils a frozen teacher (S2-BNN, SEED) builds it the same way.
        raise ConfigError("method.teacher.whiten whitens the centred target; set "
                          "method.teacher.center=true with it")
    cls.check_config(cfg)
    need = cls.views_needed(cfg)
    if num_views is not None and num_views < need:
        raise ConfigError(
            f"method '{cfg.name}' with these settings needs {need} augmented views per "
            f"image, but data.augment.num_views={num_views}; "
            f"set data.augment.num_views={need}"
        )


def build_method(
    cfg: MethodConfig, backbone: nn.Module, *, num_train: int, total_steps: int, in_chans: int
) -> Method:
    """Build the method ``cfg.name`` around the student ``backbone``.

    ``num_train`` (training images) caps queue lengths; ``total_steps`` (optimiser steps of the
    run) drives DINO's schedules; ``in_chans`` is checked against the teacher's input channels.
    Raises :class:`ConfigError` for an unknown method, a missing teacher or bad values.
    """
    cls = method_class(cfg.name)
    if not isinstance(getattr(backbone, "feature_dim", None), int):
        raise TypeError("the backbone must have an int feature_dim (build it with build_model)")
    check_method_config(cfg)
    return cls.from_config(cfg, backbone, BuildContext(num_train, total_steps, in_chans))


# --------------------------------------------------------------------------- teachers
def offline_teacher(tcfg: TeacherConfig, method: str, in_chans: int, proj_dim: int,
                    ensemble: bool = False) -> nn.Module:
    """The frozen teacher ``method.teacher`` points at, checked against the data and head; with
    ``ensemble`` (a method that distils from several) a :class:`TeacherEnsemble` of ``path``
    and ``extra_paths`` when the latter is set."""
    from s2bnn.teachers import TeacherEnsemble

    if tcfg.extra_paths and not ensemble:
        raise ConfigError(f"method '{method}' distils from one teacher; method.teacher."
                          "extra_paths is for method s2bnn (leave it empty)")
    for key in ("stages", "grid"):
        if getattr(tcfg, key) != 1 and not ensemble:
            raise ConfigError(f"method '{method}' distils one embedding; method.teacher.{key} "
                              "is for method s2bnn (leave it 1)")
    if not tcfg.path:
        raise ConfigError(
            f"method '{method}' needs a teacher: set method.teacher.path=RUN_DIR_OR_CHECKPOINT "
            "(e.g. the run dir of configs/fashion_mnist/teacher_mocov2.yaml)"
        )
    teachers = [_one_teacher(tcfg, path, in_chans, proj_dim)
                for path in (tcfg.path, *tcfg.extra_paths)]
    return teachers[0] if len(teachers) == 1 else TeacherEnsemble(teachers)


def _one_teacher(tcfg: TeacherConfig, path: str, in_chans: int, proj_dim: int) -> nn.Module:
    from s2bnn.teachers import load_teacher

    if not Path(path).exists():
        raise CheckpointError(
            f"teacher not found: {path}; train it first (e.g. s2bnn train "
            "configs/fashion_mnist/teacher_mocov2.yaml) or set method.teacher.path"
        )
    teacher = load_teacher(
        path, tcfg.arch, head=tcfg.head, precision=tcfg.precision, fmt=tcfg.format,
        center=tcfg.center, stages=tcfg.stages, grid=tcfg.grid, whiten=tcfg.whiten,
        **dict(tcfg.kwargs),
    )
    t_chans = getattr(teacher, "in_chans", None)
    if t_chans is not None and t_chans != in_chans:
        raise ConfigError(
            f"the teacher {path} takes {t_chans}-channel images but the data has {in_chans}; "
            "use a teacher trained on this data (or convert the images)"
        )
    if teacher.embed_dim != proj_dim:
        raise ConfigError(
            f"the teacher {path} gives {teacher.embed_dim}-d embeddings but "
            f"method.proj_dim is {proj_dim}; set method.proj_dim={teacher.embed_dim}"
        )
    return teacher


def online_teacher(tcfg: TeacherConfig, in_chans: int, proj_dim: int
                   ) -> tuple[nn.Module, nn.Module]:
    """A fresh real-valued teacher backbone and MLP head, trained in the same run."""
    from s2bnn.methods.base import mlp_head
    from s2bnn.models import build_model

    kwargs: dict[str, Any] = {"in_chans": in_chans, **dict(tcfg.kwargs), "num_classes": 0}
    backbone = build_model(tcfg.arch, **kwargs)
    feat = int(backbone.feature_dim)
    return backbone, mlp_head(feat, feat, proj_dim)
