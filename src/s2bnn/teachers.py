"""Frozen real-valued teachers: images -> L2-normalised embeddings.

:func:`load_teacher` reads (through :func:`s2bnn.checkpoint.load_checkpoint`, weights-only, never
running pickled code) any of:

(a) an official MoCo v2 checkpoint (``moco_v2_800ep_pretrain.pth.tar``): a dict with ``epoch``,
    ``arch``, ``state_dict``, ``optimizer``; the query encoder ``module.encoder_q.*`` is kept (its
    ``fc.0``/``fc.2`` MLP is the projection head), ``module.encoder_k.*``, ``module.queue`` and
    ``module.queue_ptr`` are dropped on purpose, anything else is an error;
(b) a torchvision-style state dict (optionally under ``state_dict``/``model``, optionally with a
    ``module.`` prefix): backbone keys go to the backbone, the one remaining top-level group
    (``fc.*`` for ResNets) is the head;
(c) this project's training checkpoints (or a run dir, which means ``checkpoints/last.pt``):
    ``ckpt["backbone"]`` rebuilds the backbone and the keys of ``ckpt["method"]`` under
    :data:`PROJECTION_HEAD_PREFIX` (``head.``) are the head, which is where every method in
    :mod:`s2bnn.methods` keeps the student's (query encoder's) projection head;
(d) safetensors files holding a state dict as in (b) (metadata ``arch`` is checked if present);
(e) the official SwAV checkpoints (``swav_800ep_pretrain.pth.tar``, ``swav_RN50w4_400ep_...``; the
    wide ones need arch ``resnet50w2/w4/w5``): a flat ``module.``-prefixed state dict (or one under
    ``state_dict`` as ``main_swav.py`` saves it) whose ``projection_head.*`` (Linear, BatchNorm1d,
    ReLU, Linear) is the head; ``prototypes*`` are dropped on purpose;
(f) the official DINO ResNet-50: the backbone-only ``dino_resnet50_pretrain.pth`` is case (b)
    without a head (pooled 2048-d features); the full checkpoint (``student``/``teacher``/...) gives
    its EMA ``teacher`` backbone, and its DINO head (GELU MLP, weight-normalised prototypes) is
    not a projection head we rebuild, so the embedding is the pooled backbone feature (the
    released full file also pickles its argparse ``args``, which weights-only loading refuses:
    use the backbone-only file, or re-save the ``teacher`` entry as plain tensors);
(g) the official SimSiam checkpoint (``module.encoder.*`` + ``module.predictor.*``): the encoder's
    3-layer projector ``fc.*`` is the head (2048-d); the predictor is dropped on purpose.

:func:`detect_format` names the layout (``s2bnn``, ``moco``, ``swav``, ``dino``, ``simsiam``,
``torchvision``); ``load_teacher(fmt=...)`` checks it, so a SwAV or DINO file handed to a recipe
written for the MoCo v2 teacher (``method.teacher.format=moco``) stops with one line naming both.

The head is rebuilt from the checkpoint's tensors: ``Linear`` layers (and ``BatchNorm1d``) at the
indices of an ``nn.Sequential``, with a ReLU in every gap (MoCo v2: Linear, ReLU, Linear).
Missing, unexpected or mis-shaped keys stop the load with a :class:`CheckpointError` that lists
a few of them.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from s2bnn.checkpoint import load_checkpoint
from s2bnn.errors import CheckpointError, ConfigError, few
from s2bnn.models import build_model
from s2bnn.models.common import model_in_chans

__all__ = [
    "PROJECTION_HEAD_PREFIX", "HEAD_CHOICES", "PRECISION_CHOICES", "FORMAT_CHOICES", "Teacher",
    "TeacherEnsemble", "load_teacher", "detect_format", "center_batch", "whiten_batch",
    "stage_features", "stage_widths",
]

# Key prefix of the student's projection head in every method's state_dict (see module docstring).
PROJECTION_HEAD_PREFIX = "head."
HEAD_CHOICES = ("auto", "mlp", "linear", "none")
# auto: whatever the training step runs in (the engine's `precision`); fp32 / bf16: always that.
PRECISION_CHOICES = ("auto", "fp32", "bf16")
FORMAT_CHOICES = ("auto", "s2bnn", "moco", "swav", "dino", "simsiam", "torchvision")
_FORMAT_NAMES = {
    "s2bnn": "an s2bnn training checkpoint", "moco": "an official MoCo v2 checkpoint",
    "swav": "an official SwAV checkpoint", "dino": "an official DINO checkpoint",
    "simsiam": "an official SimSiam checkpoint", "torchvision": "a plain (torchvision) state dict",
}
# A requested format also accepts these detected ones: DINO's backbone-only release is a plain
# torchvision state dict, and safetensors exports are plain state dicts too.
_FORMAT_ACCEPTS = {"dino": ("dino", "torchvision")}

_MOCO_Q = "module.encoder_q."
_MOCO_K = "module.encoder_k."
_MOCO_IGNORED_EXACT = ("module.queue", "module.queue_ptr")


class Teacher(nn.Module):
    """A frozen ``backbone`` + projection ``head``; ``forward`` returns unit-length embeddings.

    Always in eval mode (``train()`` keeps it there), no parameter requires grad, and the forward
    pass runs under ``torch.no_grad``. The backbone is kept channels-last (NHWC), the layout in
    which oneDNN and cuDNN convolutions are fastest; the state dict is unchanged by it.
    ``precision``: ``auto`` runs in the caller's autocast state (the engine's ``precision``),
    ``fp32`` / ``bf16`` always in that precision. A frozen teacher only supplies targets, so
    bf16 is a cheap speed-up where the device computes it natively (CPUs with AVX512-BF16/AMX,
    recent GPUs); the embeddings come back as float32 either way. ``center``: subtract the
    batch's mean output before normalising (see :func:`center_batch`); ``whiten``: centre and
    softly whiten it instead (see :func:`whiten_batch`). ``stages`` > 1 (with an
    identity head): the pooled outputs of the backbone's last ``stages`` stages instead of its
    pooled features (see :func:`stage_features`), each centred (with ``center``) and normalised
    on its own and set side by side; ``block_dims`` holds their widths. ``grid`` > 1 (with an
    identity head): each of those stages pooled to a ``grid`` x ``grid`` map, every cell its own
    block (see :func:`stage_features`).
    """

    def __init__(
        self, backbone: nn.Module, head: nn.Module, arch: str, precision: str = "auto",
        center: bool = False, stages: int = 1, grid: int = 1, whiten: bool = False,
    ) -> None:
        super().__init__()
        if precision not in PRECISION_CHOICES:
            raise ConfigError(
                f"teacher precision '{precision}' unknown; allowed: {', '.join(PRECISION_CHOICES)}"
            )
        self.backbone = backbone.to(memory_format=torch.channels_last)
        self.head = head
        self.arch = arch
        self.precision = precision
        self.center = center
        self.whiten = whiten
        self.stages = int(stages)
        self.grid = int(grid)
        self.in_chans = model_in_chans(backbone)
        linears = [m for m in head.modules() if isinstance(m, nn.Linear)]
        for key, value, what in (("stages", self.stages, "pooled backbone stages"),
                                 ("grid", self.grid, "the backbone's feature maps")):
            if value < 1:
                raise ConfigError(f"method.teacher.{key} must be >= 1, got {value}")
            if value > 1 and linears:
                raise ConfigError(f"method.teacher.{key}={value} distils {what}, not a "
                                  "projection head: set method.teacher.head=none")
        for p in self.parameters():
            p.requires_grad_(False)
        # Built in eval mode; a method that holds it keeps it there (Method.attach_offline_teacher
        # is the one place that enforces it, for any frozen module).
        self.eval()
        if self.stages == self.grid == 1:
            self.block_dims: tuple[int, ...] = (
                linears[-1].out_features if linears else int(backbone.feature_dim),)
        else:
            self.block_dims = stage_widths(self.backbone, self.stages, arch, self.grid)
        self.embed_dim = sum(self.block_dims)

    def _autocast(self, x: torch.Tensor) -> Any:
        if self.precision == "auto":
            return contextlib.nullcontext()
        return torch.autocast(
            x.device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16"
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.no_grad(), self._autocast(x):
            if self.stages == self.grid == 1:
                zs = [self.head(self.backbone(x))]
            else:
                zs = stage_features(self.backbone, x, self.stages, self.arch, self.grid)
        if self.whiten:
            zs = [whiten_batch(z.float()) for z in zs]
        else:
            zs = [center_batch(z.float()) if self.center else z.float() for z in zs]
        return torch.cat([F.normalize(z, dim=1) for z in zs], dim=1)


def stage_widths(backbone: nn.Module, stages: int | None, arch: str = "the teacher",
                 grid: int = 1, key: str | None = None) -> tuple[int, ...]:
    """The widths of :func:`stage_features` of ``backbone``, from one forward of a small blank
    batch in eval mode (so no BatchNorm statistics move)."""
    was_training = backbone.training
    device = next(backbone.parameters()).device
    backbone.eval()
    try:
        with torch.no_grad():
            blank = torch.zeros(2, model_in_chans(backbone) or 3, 64, 64, device=device)
            feats = stage_features(backbone, blank, stages, arch, grid, key)
    finally:
        backbone.train(was_training)
    return tuple(int(f.shape[1]) for f in feats)


def stage_features(backbone: nn.Module, x: torch.Tensor, stages: int | None,
                   arch: str = "the teacher", grid: int = 1,
                   key: str | None = None) -> list[torch.Tensor]:
    """The globally average-pooled outputs of ``backbone``'s last ``stages`` stages (``None``:
    all), the shallowest first; the last is the backbone's own pooled features.

    ``grid`` > 1: each stage average-pooled to a ``grid`` x ``grid`` map instead (adaptive
    pooling, so any map size works), one ``N x C`` tensor per cell, row by row, stage by stage.

    A stage ends where the next block changes the feature map's shape (or the network ends).
    Backbones: this library's (``stem`` + ``blocks``, e.g. ``resnet_small``) and torchvision's
    ResNets (``layer1``..``layer4``). On the demo's teacher the last two stages side by side
    probe 1.3 points above its pooled features alone, on average over five seeds
    (benchmarks/teacher_stages.py, docs/TEACHER_STAGES.md). ``key``: the config key that asked
    for the stages, named in the errors (default: the teacher's ``stages`` and ``grid``).
    """
    if hasattr(backbone, "stem") and hasattr(backbone, "blocks"):
        h, blocks = backbone.stem(x), list(backbone.blocks)
    elif all(hasattr(backbone, f"layer{i}") for i in range(1, 5)):
        h = backbone.maxpool(backbone.relu(backbone.bn1(backbone.conv1(x))))
        blocks = [getattr(backbone, f"layer{i}") for i in range(1, 5)]
    else:
        asked, fix = ((f"{key}={stages}", f"{key}=1") if key else (
            "method.teacher.stages > 1 or grid > 1",
            "method.teacher.stages=1 and method.teacher.grid=1"))
        raise ConfigError(f"{asked}: {arch} has no stages this library can read (a stem + "
                          f"blocks backbone or a torchvision ResNet); set {fix}")
    outs = []
    for block in blocks:
        h = block(h)
        outs.append(h)
    ends = [o for o, nxt in zip(outs, outs[1:] + [None]) if nxt is None or nxt.shape != o.shape]
    if stages is not None and stages > len(ends):
        raise ConfigError(f"{key or 'method.teacher.stages'}={stages} but {arch} has "
                          f"{len(ends)} stages")
    picked = ends[-(stages or len(ends)):]
    if grid == 1:
        return [o.float().mean((2, 3)) for o in picked]
    cells = [F.adaptive_avg_pool2d(o.float(), grid).flatten(2) for o in picked]  # N x C x g*g
    return [c[:, :, k] for c in cells for k in range(grid * grid)]


def center_batch(z: torch.Tensor) -> torch.Tensor:
    """``z`` minus its mean over the batch (dim 0); a batch of one is returned as it is.

    Pooled ReLU features all point into the positive orthant: L2-normalised, their softmax at
    the paper's tau is nearly flat. Centred, each dimension says how much more of a feature
    this view has than the batch does, and the softmax over them is a sharper target."""
    return z - z.mean(0, keepdim=True) if z.shape[0] > 1 else z


def whiten_batch(z: torch.Tensor) -> torch.Tensor:
    """``z`` centred on the batch and softly whitened: its batch covariance ``C`` (D x D) turned
    into ``C (C + m I)^-1``, ``m`` the mean variance per dimension; a batch of one is returned
    as it is.

    Centred pooled features are dominated by a few directions (the demo's two-stage target on
    the 4,000-image folder keeps half its variance in 3-4 of its 288 principal directions and
    90 % in 25-28; docs/TARGET_SPECTRUM.md), and a cosine-like loss on them is mostly a loss on
    those few. Here each direction of variance ``e`` keeps variance
    ``e / (e + m)``: the dominant ones come out near 1, the weak ones (mostly noise) stay weak,
    so the middle of the spectrum counts as much as the top in the target."""
    if z.shape[0] < 2:
        return z
    zc = center_batch(z)
    cov = zc.T @ zc / zc.shape[0]
    e, v = torch.linalg.eigh(cov.double())
    e = e.clamp_min(0)  # rounding can leave the null directions a little below 0
    # The floor keeps a batch of (nearly) identical images from blowing rounding noise up to
    # unit size; against real features' spread it is nothing.
    m = torch.maximum(e.mean(), 1e-6 * z.double().pow(2).mean() + 1e-30)
    w = (v * (e + m).rsqrt()) @ v.T
    return zc @ w.to(zc.dtype)


class TeacherEnsemble(nn.Module):
    """Several frozen teachers as one: ``forward`` returns their embeddings side by side
    (N x members*D), each block of D unit length, in the order given.

    For multi-teacher distillation (:class:`s2bnn.methods.s2bnn.S2BNN` with
    ``method.teacher.extra_paths``): teachers trained with different seeds see the data
    differently (their features side by side probe better than either alone); whether a student
    learns more from them depends on the budget (docs/MULTI_TEACHER.md).
    """

    def __init__(self, teachers: list[Teacher]) -> None:
        super().__init__()
        if not teachers:
            raise ValueError("TeacherEnsemble needs at least one teacher")
        dims = {t.embed_dim for t in teachers}
        if len(dims) != 1:
            raise ConfigError(f"the teachers give embeddings of different sizes {sorted(dims)}; "
                              "every teacher of method.teacher.path/extra_paths needs the same")
        self.teachers = nn.ModuleList(teachers)
        if len({getattr(t, "block_dims", None) for t in teachers}) != 1:
            raise ConfigError("the teachers of method.teacher.path/extra_paths split their "
                              "embeddings into different stages; give them one architecture")
        self.members = len(teachers)
        self.member_dim = dims.pop()
        self.embed_dim = self.members * self.member_dim
        self.block_dims = tuple(teachers[0].block_dims) * self.members
        self.in_chans = teachers[0].in_chans
        self.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([t(x) for t in self.teachers], dim=1)


def _tensors(obj: Any) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(
        isinstance(v, torch.Tensor) for v in obj.values())


def _check_arch(found: Any, arch: str, path: Path) -> None:
    if isinstance(found, str) and found and found != arch:
        raise CheckpointError(
            f"{path} holds a '{found}' teacher, not '{arch}'; set method.teacher.arch={found} "
            f"or pass a checkpoint of a {arch}"
        )


def _flat_of(ckpt: dict[str, Any]) -> dict[str, Any] | None:
    for key in ("state_dict", "model"):
        if _tensors(ckpt.get(key)):
            return ckpt[key]
    return ckpt if _tensors(ckpt) else None


def detect_format(ckpt: dict[str, Any]) -> str:
    """The layout of a loaded checkpoint: ``s2bnn``, ``moco``, ``swav``, ``dino``, ``simsiam``
    or ``torchvision`` (any other plain state dict); ``unknown`` if it holds no state dict."""
    if isinstance(ckpt.get("backbone"), dict) and "state_dict" in ckpt["backbone"]:
        return "s2bnn"
    if isinstance(ckpt.get("teacher"), dict) and isinstance(ckpt.get("student"), dict):
        return "dino"
    flat = _flat_of(ckpt)
    if flat is None:
        return "unknown"
    keys = [k[len("module."):] if k.startswith("module.") else k for k in flat]
    if any(k.startswith("encoder_q.") for k in keys):
        return "moco"
    if any(k.startswith("predictor.") for k in keys) and any(
            k.startswith("encoder.") for k in keys):
        return "simsiam"
    if any(k.startswith(("prototypes", "projection_head.")) for k in keys):
        return "swav"
    return "torchvision"


def _check_format(found: str, fmt: str, path: Path) -> None:
    if fmt == "auto" or found in _FORMAT_ACCEPTS.get(fmt, (fmt,)):
        return
    what = _FORMAT_NAMES.get(found, "not a checkpoint layout we know")
    raise CheckpointError(
        f"{path} is {what} ({found} layout), not the {fmt} layout method.teacher.format "
        f"expects; set method.teacher.format={found if found in _FORMAT_NAMES else 'auto'} "
        "(and a matching method.teacher.arch/head/proj_dim) or pass the intended file"
    )


def _strip(flat: dict[str, Any], prefix: str) -> dict[str, Any]:
    return {k[len(prefix):]: v for k, v in flat.items() if k.startswith(prefix)}


def _unmodule(flat: dict[str, Any]) -> dict[str, Any]:
    if flat and all(k.startswith("module.") for k in flat):
        return _strip(flat, "module.")
    return dict(flat)


def _split_checkpoint(
    ckpt: dict[str, Any], arch: str, path: Path, fmt: str = "auto"
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor] | None, dict[str, Any]]:
    """-> (backbone-ish flat state dict, head state dict if known, build kwargs)."""
    found = detect_format(ckpt)
    _check_format(found, fmt, path)
    if found == "dino":
        # (f) full DINO checkpoint: the EMA teacher's backbone; its DINO head is not rebuilt.
        _check_arch((ckpt.get("args") or {}).get("arch") if isinstance(ckpt.get("args"), dict)
                    else None, arch, path)
        teacher = _unmodule(ckpt["teacher"])
        return _strip(teacher, "backbone."), {}, {}
    if found == "simsiam":
        # (g) SimSiam: encoder (backbone + projector fc.*) kept, predictor dropped.
        _check_arch(ckpt.get("arch"), arch, path)
        flat = _unmodule(_flat_of(ckpt) or {})
        stray = [k for k in flat if not k.startswith(("encoder.", "predictor."))]
        if stray:
            raise CheckpointError(f"{path}: unexpected keys in a SimSiam checkpoint: {few(stray)}")
        enc = _strip(flat, "encoder.")
        head = _strip(enc, "fc.")
        return {k: v for k, v in enc.items() if not k.startswith("fc.")}, head, {}
    if found == "swav":
        # (e) SwAV: backbone + projection_head; the prototypes (clustering layer) are dropped.
        flat = _unmodule(_flat_of(ckpt) or {})
        head = _strip(flat, "projection_head.")
        body = {k: v for k, v in flat.items()
                if not k.startswith(("projection_head.", "prototypes"))}
        return body, head, {}
    # (c) this project's training checkpoint
    if isinstance(ckpt.get("backbone"), dict) and "state_dict" in ckpt["backbone"]:
        bb = ckpt["backbone"]
        _check_arch(bb.get("name"), arch, path)
        method_sd = ckpt.get("method") or {}
        head = {k[len(PROJECTION_HEAD_PREFIX):]: v for k, v in method_sd.items()
                if k.startswith(PROJECTION_HEAD_PREFIX)}
        return dict(bb["state_dict"]), head, dict(bb.get("kwargs") or {})
    # (d) safetensors: {"state_dict": tensors, "metadata": {...}}
    if "metadata" in ckpt and _tensors(ckpt.get("state_dict")):
        meta = ckpt["metadata"] or {}
        _check_arch(meta.get("arch", meta.get("name")), arch, path)
        flat = dict(ckpt["state_dict"])
    elif _tensors(ckpt.get("state_dict")):
        _check_arch(ckpt.get("arch"), arch, path)
        flat = dict(ckpt["state_dict"])
    elif _tensors(ckpt.get("model")):
        flat = dict(ckpt["model"])
    elif _tensors(ckpt):
        flat = dict(ckpt)
    else:
        raise CheckpointError(
            f"{path} is not a teacher checkpoint: expected an s2bnn checkpoint, an official "
            "MoCo v2 checkpoint, a state dict or a safetensors file"
        )
    # (a) official MoCo v2 layout: keep the query encoder, drop key encoder and queue explicitly.
    if any(k.startswith(_MOCO_Q) for k in flat):
        kept: dict[str, torch.Tensor] = {}
        stray: list[str] = []
        for k, v in flat.items():
            if k.startswith(_MOCO_Q):
                kept[k[len(_MOCO_Q):]] = v
            elif k.startswith(_MOCO_K) or k in _MOCO_IGNORED_EXACT:
                continue
            else:
                stray.append(k)
        if stray:
            raise CheckpointError(f"{path}: unexpected keys in a MoCo v2 checkpoint: {few(stray)}")
        return kept, None, {}
    # (b) plain state dict, possibly saved from a DDP-wrapped model
    if all(k.startswith("module.") for k in flat):
        flat = {k[len("module."):]: v for k, v in flat.items()}
    return flat, None, {}


def _best_prefixes(ckpt_keys: set[str], model_keys: set[str]) -> tuple[str, str]:
    """(strip, add) such that ``add + key[len(strip):]`` maps most checkpoint keys onto the model.

    Lets a torchvision state dict load into a registry model that wraps the torchvision net under
    a prefix (or the reverse), without knowing the wrapper.
    """
    votes: Counter[tuple[str, str]] = Counter()
    for keys_a, keys_b, as_add in ((model_keys, ckpt_keys, True), (ckpt_keys, model_keys, False)):
        for key in keys_a:
            parts = key.split(".")
            for i in range(1, len(parts)):
                if ".".join(parts[i:]) in keys_b:
                    prefix = ".".join(parts[:i]) + "."
                    votes[("", prefix) if as_add else (prefix, "")] += 1
    best = ("", "")
    best_n = len(ckpt_keys & model_keys)
    for (strip, add), _ in votes.most_common(4):
        n = sum(1 for k in ckpt_keys if k.startswith(strip) and add + k[len(strip):] in model_keys)
        if n > best_n:
            best, best_n = (strip, add), n
    return best


def _load_backbone(
    backbone: nn.Module, flat: dict[str, torch.Tensor], head_known: bool, path: Path, arch: str
) -> dict[str, torch.Tensor]:
    """Strictly load the backbone part of ``flat``; return the leftover head keys."""
    model_sd = backbone.state_dict()
    model_keys = set(model_sd)
    strip, add = _best_prefixes(set(flat), model_keys)
    model_tops = {k[len(add):].split(".")[0] for k in model_keys if k.startswith(add)}
    mapped: dict[str, torch.Tensor] = {}
    leftover: dict[str, torch.Tensor] = {}
    unexpected: list[str] = []
    for k, v in flat.items():
        name = add + k[len(strip):] if k.startswith(strip) else None
        if name is not None and name in model_keys:
            mapped[name] = v
        elif (not head_known and name is not None
              and name[len(add):].split(".")[0] not in model_tops):
            leftover[k[len(strip):]] = v
        else:
            unexpected.append(k)
    # Only one top-level group (fc / head / classifier) can be the head; others are strays.
    groups = Counter(k.split(".")[0] for k in leftover)
    if len(groups) > 1:
        head_group = groups.most_common(1)[0][0]
        unexpected += [strip + k for k in leftover if k.split(".")[0] != head_group]
        leftover = {k: v for k, v in leftover.items() if k.split(".")[0] == head_group}
    missing = model_keys - set(mapped)
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing keys: {few(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {few(unexpected)}")
        raise CheckpointError(
            f"{path} does not fit a '{arch}' backbone ({'; '.join(parts)}); is it a checkpoint of "
            "another architecture or of other model kwargs (method.teacher.kwargs)?"
        )
    bad = [f"{k} {tuple(v.shape)} vs {tuple(model_sd[k].shape)}" for k, v in mapped.items()
           if tuple(v.shape) != tuple(model_sd[k].shape)]
    if bad:
        raise CheckpointError(
            f"{path} does not fit a '{arch}' backbone: shape mismatch (checkpoint vs model) for "
            f"{few(bad)}; another architecture, width or in_chans?"
        )
    backbone.load_state_dict(mapped, strict=True)
    if not leftover:
        return {}
    head_group = next(iter(leftover)).split(".")[0]
    n = len(head_group) + 1
    return {k[n:] if k.startswith(head_group + ".") else "": v for k, v in leftover.items()}


def _build_head(sd: dict[str, torch.Tensor], path: Path) -> nn.Module:
    """Rebuild a Linear / Sequential(Linear, ReLU, [BatchNorm1d], Linear, ...) head from tensors."""
    if "" in sd:
        raise CheckpointError(f"{path}: the projection head holds a bare tensor; cannot rebuild it")
    if "weight" in sd and sd["weight"].dim() == 2:
        extra = set(sd) - {"weight", "bias"}
        if extra:
            raise CheckpointError(f"{path}: unexpected keys in the projection head: {few(extra)}")
        w = sd["weight"]
        head: nn.Module = nn.Linear(w.shape[1], w.shape[0], bias="bias" in sd)
        head.load_state_dict(sd)
        return head
    by_index: dict[int, dict[str, torch.Tensor]] = {}
    for k, v in sd.items():
        idx, _, rest = k.partition(".")
        if not idx.isdigit() or not rest:
            raise CheckpointError(f"{path}: cannot rebuild the projection head from key '{k}'")
        by_index.setdefault(int(idx), {})[rest] = v
    layers: list[nn.Module] = []
    for i in range(max(by_index) + 1):
        p = by_index.get(i)
        if p is None:
            layers.append(nn.ReLU(inplace=True))
        elif "weight" in p and p["weight"].dim() == 2:
            layers.append(nn.Linear(p["weight"].shape[1], p["weight"].shape[0], bias="bias" in p))
        elif "running_mean" in p:
            layers.append(nn.BatchNorm1d(p["running_mean"].shape[0], affine="weight" in p))
        else:
            raise CheckpointError(
                f"{path}: cannot rebuild layer {i} of the projection head (keys {few(p)})"
            )
    seq = nn.Sequential(*layers)
    try:
        seq.load_state_dict({f"{i}.{k}": v for i, p in by_index.items() for k, v in p.items()})
    except RuntimeError as err:
        raise CheckpointError(f"{path}: projection head does not load: "
                              f"{str(err).splitlines()[0][:200]}") from None
    return seq


def load_teacher(
    path: str | Path, arch: str, *, head: str = "auto", precision: str = "auto",
    fmt: str = "auto", center: bool = False, stages: int = 1, grid: int = 1,
    whiten: bool = False, **model_kwargs: Any,
) -> Teacher:
    """Load a frozen teacher mapping images to L2-normalised embeddings.

    ``arch`` is a registry name (``s2bnn.models.build_model``); ``model_kwargs`` go to the builder
    (on top of the kwargs an s2bnn checkpoint records; ``num_classes`` is always 0). ``head``:
    ``auto`` takes the checkpoint's projection head if it has one (else pooled features),
    ``mlp``/``linear`` require that kind of head in the checkpoint, ``none`` ignores any head.
    ``precision`` is the teacher's forward precision (see :class:`Teacher`). ``fmt`` is the
    expected layout (:data:`FORMAT_CHOICES`; ``auto``: any), checked against :func:`detect_format`.
    ``center``: the embeddings are centred on each batch's mean before normalising;
    ``whiten``: centred and softly whitened on each batch (:func:`whiten_batch`).
    ``stages`` > 1 (needs ``head='none'``): the pooled outputs of that many last stages, side
    by side (see :class:`Teacher`); ``grid`` > 1 (needs ``head='none'``): each pooled to a
    ``grid`` x ``grid`` map, one block per cell.
    Raises :class:`CheckpointError` for a missing file, another architecture, or missing,
    unexpected or mis-shaped keys.
    """
    if head not in HEAD_CHOICES:
        raise ConfigError(f"teacher head '{head}' unknown; allowed: {', '.join(HEAD_CHOICES)}")
    if fmt not in FORMAT_CHOICES:
        raise ConfigError(f"teacher format '{fmt}' unknown; allowed: {', '.join(FORMAT_CHOICES)}")
    path = Path(path)
    ckpt = load_checkpoint(path)
    flat, head_sd, kwargs = _split_checkpoint(ckpt, arch, path, fmt)
    kwargs = {**kwargs, **model_kwargs, "num_classes": 0}
    backbone = build_model(arch, **kwargs)
    leftover = _load_backbone(backbone, flat, head_sd is not None, path, arch)
    if head_sd is None:
        head_sd = leftover
    if head == "none" or not head_sd:
        if head in ("mlp", "linear"):
            raise CheckpointError(
                f"{path} holds no projection head but method.teacher.head={head}; use head=auto or "
                "head=none to distil from the pooled backbone features"
            )
        return Teacher(backbone, nn.Identity(), arch, precision, center, stages, grid, whiten)
    head_module = _build_head(head_sd, path)
    linears = [m for m in head_module.modules() if isinstance(m, nn.Linear)]
    if head == "mlp" and len(linears) < 2 or head == "linear" and len(linears) != 1:
        raise CheckpointError(
            f"{path} holds a projection head with {len(linears)} linear layer(s), not a {head} "
            "head; set method.teacher.head=auto"
        )
    feat = int(getattr(backbone, "feature_dim", linears[0].in_features))
    if linears[0].in_features != feat:
        raise CheckpointError(
            f"{path}: projection head takes {linears[0].in_features}-d input but the '{arch}' "
            f"backbone gives {feat}-d features; another architecture?"
        )
    # Teacher refuses stages > 1 or grid > 1 on a projection head.
    return Teacher(backbone, head_module, arch, precision, center, stages, grid, whiten)
