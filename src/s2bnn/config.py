"""Configuration as data: a typed schema, YAML recipes and dotted ``key=value`` overrides.

A recipe is a YAML file whose keys mirror :class:`Config`. Loading merges, in order, the schema's
defaults, the recipe and the command-line overrides, and checks every key and type against the
schema before any work starts. Errors name the offending key and what would have been accepted.

The schema is plain dataclasses so the rest of the code reads ``cfg.optim.lr`` with type hints;
OmegaConf does the merging and the type checks.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml
from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import (
    ConfigAttributeError,
    ConfigKeyError,
    GrammarParseError,
    OmegaConfBaseException,
    ValidationError,
)

from s2bnn.budget import BudgetError, parse_duration
from s2bnn.errors import ConfigError

__all__ = [
    "AugmentConfig",
    "DataConfig",
    "ModelConfig",
    "TeacherConfig",
    "MethodConfig",
    "OptimConfig",
    "Config",
    "load_config",
    "config_from_dict",
    "config_to_dict",
    "save_config",
    "MISSING",
]


@dataclass
class AugmentConfig:
    """Augmentation of the training views; ``None`` means "the preset's value for this size"."""

    preset: str = "s2bnn_lite"  # mocov2 | s2bnn_lite | eval | multicrop
    num_views: int = 2
    crop_scale: Optional[list[float]] = None  # RandomResizedCrop scale range
    color: Optional[bool] = None  # colour jitter/grayscale; None: on for RGB, off for grey images
    blur: Optional[bool] = None  # Gaussian blur; None: preset default
    # Small crops after the full views (multi-crop): DINO's local views; MoCo v2 uses them as
    # extra queries. Any training preset (not eval).
    local_crops: int = 0
    local_size: Optional[int] = None
    local_crop_scale: Optional[list[float]] = None


@dataclass
class DataConfig:
    """Where the images come from and how they are fed."""

    name: str = "fashion-mnist"  # fashion-mnist | synthetic | path to an ImageFolder tree
    root: Optional[str] = None  # directory with the four Fashion-MNIST idx files
    limit: Optional[int] = None  # use only the first N training images (smoke runs)
    image_size: Optional[int] = None  # training/eval resolution; None: the dataset's own
    num_workers: int = 0
    skip_corrupt: bool = False  # skip and count unreadable images instead of stopping
    # Augment whole uint8 batches on the training device instead of image by image in the
    # loader. None (auto): on for in-memory datasets (Fashion-MNIST, synthetic), whose
    # per-image augmentation would otherwise cost more than the training step on a CPU.
    batch_augment: Optional[bool] = None
    # Decode an ImageFolder's training images once into memory (resized to the eval rule's
    # square), so they are augmented per batch too. None (auto): when they fit in 1 GiB.
    in_memory: Optional[bool] = None
    augment: AugmentConfig = field(default_factory=AugmentConfig)


@dataclass
class ModelConfig:
    """The student backbone, built by ``s2bnn.models.build_model(name, **kwargs)``."""

    name: str = "reactnet_small"
    binary_act: Optional[bool] = None  # None: the builder's default
    binary_weight: Optional[bool] = None
    width_mult: Optional[float] = None
    stem_stride: Optional[int] = None
    kwargs: dict[str, Any] = field(default_factory=dict)  # any other builder argument
    # Two-step binarization: initialise from a step-1 run dir or checkpoint (or a file written
    # by `s2bnn convert` from a reference checkpoint).
    init_from: Optional[str] = None
    # What init_from loads. backbone: the backbone only (fresh head). model: the whole step-1
    # model -- backbone, projection head and, where both steps have them, the momentum key
    # encoder and the queue -- as the reference step 2 loads (S2-BNN main_moco.py --model-path).
    # Never the optimiser or the schedule.
    init_scope: str = "backbone"


@dataclass
class TeacherConfig:
    """The real-valued teacher that S2-BNN and SEED distil from."""

    kind: str = "offline"  # offline (frozen, loaded from `path`) | online (MoCo v2 in the same run)
    path: Optional[str] = None  # run dir, s2bnn checkpoint, official MoCo v2 .pth.tar, safetensors
    # S2-BNN, offline: more teachers of the same arch, read like `path`. The student's head gets
    # one proj_dim block per teacher and the loss is the mean of the paper's loss over them
    # (multi-teacher distillation; not in the paper, empty by default).
    extra_paths: list[str] = field(default_factory=list)
    arch: str = "resnet50"  # registry name of the teacher backbone
    kwargs: dict[str, Any] = field(default_factory=dict)  # build_model kwargs of the teacher
    # Offline: the projection head in the checkpoint. auto: whatever the checkpoint holds (none if
    # it holds no head); mlp / linear: require that head; none: use pooled backbone features.
    # Its output dimension must equal method.proj_dim (the online teacher's head outputs that).
    head: str = "auto"
    # Offline: subtract the batch mean of the teacher's outputs before L2-normalising them (not
    # in the paper). Pooled backbone features (head: none) are all positive after ReLU, so their
    # softmax at tau 0.2 is nearly flat; centred, they are a sharp target that carries more than
    # the 128-d head output (docs/CENTRED_TARGET.md, round 14). A batch of one is left as it is.
    # Refused with kind: online.
    center: bool = False
    # Offline, with center: also whiten the centred outputs softly on each batch (see
    # s2bnn.teachers.whiten_batch), so that the few directions that hold most of their variance
    # do not make up most of the target (not in the paper).
    whiten: bool = False
    # S2-BNN, offline, head none: distil the pooled outputs of the teacher backbone's last
    # `stages` stages (each centred with `center` and normalised, one softmax block each; the
    # student's head gets one block per stage) instead of its pooled features alone (not in the
    # paper). method.proj_dim is then the sum of those stages' widths.
    stages: int = 1
    # S2-BNN, offline, head none: pool each distilled stage to a `grid` x `grid` map instead of
    # one value per channel, and distil every cell as its own block (centred, normalised, one
    # softmax each): the target then says where in the image the teacher saw what. method.proj_dim
    # is grid**2 times the sum of the stages' widths (not in the paper).
    grid: int = 1
    # The file's layout. auto: detected (s2bnn, MoCo v2, SwAV, DINO, SimSiam, torchvision,
    # safetensors); any other value is checked against the detected one, so e.g. a SwAV file
    # given to a recipe written for the MoCo v2 teacher stops with one line naming both.
    format: str = "auto"  # auto | s2bnn | moco | swav | dino | simsiam | torchvision
    # Precision of the frozen offline teacher's forward. auto: that of the training step
    # (`precision`); bf16: always bf16 (much faster on CPUs with AMX / AVX512-BF16, see
    # benchmarks/bench_step.py; targets differ from fp32 ones by rounding only); fp32: always fp32.
    precision: str = "auto"


@dataclass
class MethodConfig:
    """The self-supervised method and its loss hyper-parameters."""

    name: str = "s2bnn"  # mocov2 | s2bnn | seed | dino
    proj_dim: int = 128
    # None: the backbone's feature dimension; 0: no hidden layer (one linear layer)
    proj_hidden_dim: Optional[int] = None
    temperature: float = 0.2  # tau of InfoNCE and of S2-BNN's soft cross-entropy
    # MoCo v2 (also the contrastive term of strategy 2 and the online teacher)
    queue_size: int = 65536  # clipped to the number of training images
    momentum: float = 0.999
    # Against MoCo's BatchNorm shortcut. shuffle (= auto): keys are encoded in a shuffled order,
    # across ranks under DDP, else in shuffle_bn_groups groups of one device's batch (queries in
    # groups too); syncbn: no shuffle (set sync_bn=true); none: no shuffle.
    shuffle_bn: str = "auto"  # auto | shuffle | syncbn | none
    shuffle_bn_groups: int = 2
    # MoCo v2 only. true: each view is also a query against the other view's key, the two
    # InfoNCE terms averaged and both key batches queued (twice the encoder work per step).
    symmetric: bool = False
    # S2-BNN
    distill_weight: float = 1.0
    contrastive_weight: float = 0.0  # > 0: strategy 2 (contrastive + distillation)
    # Views the distillation term covers. first: the first (query) view only, as the reference
    # code (S2-BNN main_moco.py distils images[0]); all: every view, averaged.
    distill_views: str = "all"  # first | all
    # > 0: each distilled view is mixed with another image of the batch before teacher and
    # student see it (mixup, weight ~ Beta(a, a) per image; 0: off, as the reference). The
    # teacher labels any input, so mixing adds new inputs to distil on (Beyer et al. 2022).
    mixup_alpha: float = 0.0
    # > 1: deep supervision. Each of the student's last student_stages stages (pooled) gets its
    # own MLP head that predicts the whole target too; the earlier stages' losses, averaged, are
    # added with weight stage_weight to the last stage's. Only the last stage's head is the
    # method's (and is dropped after training like it). 1: off, as the paper.
    student_stages: int = 1
    stage_weight: float = 1.0
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    # SEED
    # The official SEED code's defaults (jacobswan1/SEED tools/opts.py: --temp 0.2 for the
    # student, --distill-t 1e-4 for the teacher).
    seed_student_temp: float = 0.2
    seed_teacher_temp: float = 1e-4
    # DINO
    dino_out_dim: int = 4096
    dino_student_temp: float = 0.1
    dino_teacher_temp: float = 0.04
    dino_warmup_teacher_temp: float = 0.04
    dino_warmup_teacher_temp_frac: float = 0.0  # fraction of the run's steps to warm up over
    dino_center_momentum: float = 0.9
    ema_momentum: float = 0.996  # start value, raised to 1 with a cosine schedule


@dataclass
class OptimConfig:
    """Optimiser and learning-rate schedule (per step, with warm-up)."""

    name: str = "adam"  # adam | sgd | lars
    lr: float = 3e-4
    weight_decay: float = 0.0
    momentum: float = 0.9
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    schedule: str = "linear"  # linear (decay to 0, S2-BNN's) | cosine | constant
    warmup_epochs: float = 0.0
    min_lr: float = 0.0
    exclude_bn_bias: bool = True  # no weight decay on BatchNorm, biases and scales
    exclude_binary: bool = True  # no weight decay on the latent weights of binary layers
    grad_clip: Optional[float] = None  # max global gradient norm (None: no clipping)
    lars_eta: float = 0.001  # LARS trust coefficient


@dataclass
class Config:
    """One training run."""

    output_dir: str = MISSING
    resume: str = "never"  # never | auto
    force: bool = False  # allow overwriting a finished run or resuming with a changed config
    seed: int = 0
    # How long to train: exactly one of epochs, steps or time_budget (none: 1 epoch). A later
    # layer (recipe, then command line) that sets one replaces the others of earlier layers.
    epochs: Optional[int] = None
    steps: Optional[int] = None  # optimiser steps; the LR schedule spans them (may end mid-epoch)
    # Wall-clock seconds for the whole run, set-up included (600, 90s, 10m, 1h30m): the engine
    # times a few steps first and trains as many as fit; the schedule spans exactly those.
    time_budget: Optional[str] = None
    # With time_budget: train at most this many epochs, and let the schedule end there, when
    # fewer steps than fit the budget already exhaust what the data gives (a small dataset).
    # Ignored without time_budget.
    time_budget_max_epochs: Optional[int] = None
    # With time_budget: re-plan the steps while training from the step time seen so far, for a
    # machine whose speed drifts (a shared VM): the schedule is stretched or shortened to end at
    # the new last step. Off, the run is the one steps=N would train.
    time_budget_replan: bool = False
    max_steps: Optional[int] = None  # stop after this many optimiser steps (dry runs)
    batch_size: int = 256  # global batch, split across ranks
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    # auto: bf16 autocast on GPUs with bf16 and on CPUs with AVX512-BF16 or AMX, else fp32
    precision: str = "auto"  # auto | fp32 | bf16
    compile: bool = False
    deterministic: bool = False
    sync_bn: bool = False
    log_every: int = 10  # steps between metrics.csv/TensorBoard rows
    knn_every: int = 0  # epochs between kNN monitors (0: never); reported, never trained on
    knn_train_size: int = 5000  # labelled training images in the kNN monitor's memory bank
    knn_test_size: int = 1000  # test images the kNN monitor classifies
    knn_k: int = 20
    save_every: int = 0  # also keep checkpoints/epoch_N.pt every N epochs (0: only last.pt)
    # Also rewrite checkpoints/last.pt every N optimiser steps within an epoch (0: at epoch ends
    # only), so a pre-empted ImageNet run loses at most N steps; the resume is bit-exact.
    save_every_steps: int = 0
    nan_policy: str = "stop"  # stop | skip
    max_bad_steps: int = 10  # with nan_policy=skip, stop after this many skipped steps
    progress: bool = True
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)


# Values a key may take; checked after merging so the message can list them.
CHOICES: dict[str, tuple[str, ...]] = {
    "resume": ("never", "auto"),
    "precision": ("auto", "fp32", "bf16"),
    "nan_policy": ("stop", "skip"),
    "data.augment.preset": ("mocov2", "s2bnn_lite", "eval", "multicrop"),
    "method.name": ("mocov2", "s2bnn", "seed", "dino"),
    "method.shuffle_bn": ("auto", "shuffle", "syncbn", "none"),
    "method.teacher.kind": ("offline", "online"),
    "method.teacher.head": ("auto", "mlp", "linear", "none"),
    "method.teacher.precision": ("auto", "fp32", "bf16"),
    "method.teacher.format": ("auto", "s2bnn", "moco", "swav", "dino", "simsiam", "torchvision"),
    "method.distill_views": ("first", "all"),
    "model.init_scope": ("backbone", "model"),
    "optim.name": ("adam", "sgd", "lars"),
    "optim.schedule": ("linear", "cosine", "constant"),
}

POSITIVE: tuple[str, ...] = (
    "epochs", "steps", "time_budget_max_epochs", "data.limit", "batch_size", "method.proj_dim",
    "data.augment.num_views", "method.queue_size", "method.shuffle_bn_groups", "method.temperature",
    "method.dino_out_dim",
)


def _open_free_dicts(node: DictConfig) -> None:
    """Let ``dict[str, Any]`` fields (``model.kwargs``, ``method.teacher.kwargs``) take any key;
    struct mode would refuse every key they were meant to hold."""
    for key in node:
        child = node._get_node(key)
        if isinstance(child, DictConfig):
            if child._metadata.object_type is dict:
                OmegaConf.set_struct(child, False)
            else:
                _open_free_dicts(child)


def _schema(schema: type = Config) -> DictConfig:
    cfg = OmegaConf.structured(schema)
    OmegaConf.set_struct(cfg, True)
    _open_free_dicts(cfg)
    return cfg


def _explain(
    err: OmegaConfBaseException, source: str, schema: type = Config
) -> ConfigError:
    key = getattr(err, "full_key", None) or ""
    if isinstance(err, (ConfigKeyError, ConfigAttributeError)):
        parent = key.rsplit(".", 1)[0] if "." in key else ""
        node = _schema(schema)
        try:
            if parent:
                node = OmegaConf.select(node, parent)
            known = ", ".join(sorted(node.keys())) if isinstance(node, DictConfig) else ""
        except OmegaConfBaseException:
            known = ""
        hint = f" (known keys{' under ' + parent if parent else ''}: {known})" if known else ""
        return ConfigError(f"unknown config key '{key}' in {source}{hint}")
    if isinstance(err, ValidationError):
        msg = str(err).splitlines()[0]
        return ConfigError(f"bad value for config key '{key}' in {source}: {msg}")
    if isinstance(err, GrammarParseError):
        return ConfigError(f"cannot parse config value in {source}: {str(err).splitlines()[0]}")
    return ConfigError(f"invalid config in {source}: {str(err).splitlines()[0]}")


def _check_values(cfg: Config) -> None:
    flat = config_to_dict(cfg)

    def get(dotted: str) -> Any:
        node: Any = flat
        for part in dotted.split("."):
            node = node[part]
        return node

    for key, allowed in CHOICES.items():
        value = get(key)
        if value not in allowed:
            raise ConfigError(
                f"config key '{key}' is '{value}'; allowed values: {', '.join(allowed)}"
            )
    for key in POSITIVE:
        if get(key) is not None and get(key) <= 0:
            raise ConfigError(f"config key '{key}' must be > 0, got {get(key)}")
    if cfg.save_every_steps < 0:
        raise ConfigError(f"config key 'save_every_steps' must be >= 0, got {cfg.save_every_steps}")
    if cfg.time_budget is not None:
        try:
            parse_duration(cfg.time_budget)
        except BudgetError as err:
            raise ConfigError(f"config key 'time_budget': {err}") from None
    for key in ("data.augment.crop_scale", "data.augment.local_crop_scale"):
        value = get(key)
        if value is not None and (len(value) != 2 or not 0 < value[0] <= value[1] <= 1):
            raise ConfigError(f"config key '{key}' must be [low, high] with 0 < low <= high <= 1")


def _parse_overrides(overrides: list[str], schema: type = Config) -> DictConfig:
    for item in overrides:
        if "=" not in item or item.startswith("="):
            raise ConfigError(f"override '{item}' is not of the form key=value (e.g. epochs=10)")
    try:
        return OmegaConf.from_dotlist(list(overrides))
    except OmegaConfBaseException as err:
        raise _explain(err, "the command line", schema) from None


def config_from_dict(data: dict[str, Any], source: str = "config") -> Config:
    """Validate a plain dict against the schema and return a :class:`Config`."""
    return _merge([(OmegaConf.create(data), source)])


# Keys that size a run; a run has at most one. See Config.epochs.
SIZING_KEYS: tuple[str, ...] = ("epochs", "steps", "time_budget")


def _sizing_in(layer: DictConfig, source: str) -> str | None:
    """The one sizing key ``layer`` sets (None if none); two in one layer conflict."""
    given = [k for k in SIZING_KEYS if k in layer and layer[k] is not None]
    if len(given) > 1:
        names = " and ".join(f"'{k}'" for k in given)
        raise ConfigError(
            f"config keys {names} both size the run in {source}; set only one of them "
            f"(a run is sized by epochs, steps or time_budget)")
    return given[0] if given else None


def _merge(layers: list[tuple[DictConfig, str]], schema: type = Config) -> Any:
    cfg = _schema(schema)
    for layer, source in layers:
        sizing = _sizing_in(layer, source) if schema is Config else None
        try:
            cfg = OmegaConf.merge(cfg, layer)
        except OmegaConfBaseException as err:
            raise _explain(err, source, schema) from None
        for key in SIZING_KEYS:  # the recipe's epochs give way to steps= on the command line
            if sizing is not None and key != sizing:
                cfg[key] = None
    try:
        obj = OmegaConf.to_object(cfg)
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", "") or ""
        if "Missing mandatory value" in str(err):
            raise ConfigError(
                f"config key '{key}' must be set (e.g. add {key}=runs/my_run)"
            ) from None
        raise _explain(err, "the merged config", schema) from None
    assert isinstance(obj, schema)
    if isinstance(obj, Config):
        _check_values(obj)
    return obj


def load_config(
    path: str | Path | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    defaults: dict[str, Any] | None = None,
    schema: type = Config,
) -> Any:
    """Load a recipe, apply ``key=value`` overrides and validate the result.

    ``defaults`` (e.g. an ``output_dir`` chosen by the caller) sit between schema and recipe.
    ``schema`` is :class:`Config` for training runs; other dataclasses (the demo's plan) work too.
    """
    layers: list[tuple[DictConfig, str]] = []
    if defaults:
        layers.append((OmegaConf.create(defaults), "defaults"))
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path} (see configs/ for the recipes)")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"cannot parse YAML in {path}: {str(err).splitlines()[0]}") from None
        if not isinstance(data, dict):
            raise ConfigError(
                f"{path} must hold a mapping of config keys, not {type(data).__name__}"
            )
        layers.append((OmegaConf.create(data), str(path)))
    layers.append((_parse_overrides(list(overrides), schema), "the command line"))
    return _merge(layers, schema)


def config_to_dict(cfg: Config) -> dict[str, Any]:
    """A plain, YAML-safe dict of the config."""
    return dataclasses.asdict(cfg)


def save_config(cfg: Config, path: str | Path) -> None:
    """Write the resolved config as YAML (the run dir's ``config.yaml``), atomically.

    A resumed run rewrites it; a crash mid-write must not leave a truncated recipe behind.
    """
    from s2bnn.checkpoint import atomic_write_bytes  # bottom layer too; imports torch, so lazily

    text = yaml.safe_dump(config_to_dict(cfg), sort_keys=False)
    atomic_write_bytes(path, text.encode())
