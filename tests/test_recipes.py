"""Every recipe loads; the ImageNet ones dry-run on a tiny 224 px ImageFolder with a random
teacher in the official MoCo v2 layout; the Fashion-MNIST ones dry-run from teacher to students."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn as nn
from test_engine import one_thread, read_metrics  # noqa: F401  (one_thread: autouse)

from s2bnn.checkpoint import load_checkpoint
from s2bnn.config import load_config
from s2bnn.engine import train
from s2bnn.errors import DataError

ROOT = Path(__file__).resolve().parents[1]
FASHION = ["teacher_mocov2", "mocov2_bnn", "mocov2_bnn_plus", "s2bnn_contrastive", "s2bnn",
           "seed", "dino", "mocov2_real"]
IMAGENET = sorted(p.stem for p in (ROOT / "configs" / "imagenet").glob("*.yaml"))
TWO_STEP = {"mocov2_bnn_plus_step2": "mocov2_bnn_plus", "s2bnn_step2": "s2bnn_step1",
            "s2bnn_contrastive_step2": "s2bnn_contrastive"}
# Step 2 is dry-run for S2-BNN only: the other step-2 recipes differ from theirs only in the
# model block, which test_imagenet_recipe_loads checks (a 224 px ReActNet-A step costs seconds).
DRY_STEP2 = {"s2bnn_step2"}


def recipe(group: str, name: str) -> Path:
    return ROOT / "configs" / group / f"{name}.yaml"


# --------------------------------------------------------------------------- recipes load
def test_recipe_sets_are_complete() -> None:
    for name in FASHION:
        assert recipe("fashion_mnist", name).is_file(), name
    for name in ("mocov2_bnn", "mocov2_bnn_plus", "s2bnn_step1", "s2bnn_step2",
                 "s2bnn_contrastive"):
        assert name in IMAGENET


@pytest.mark.parametrize("name", FASHION)
def test_fashion_mnist_recipe_loads(name: str) -> None:
    cfg = load_config(recipe("fashion_mnist", name))
    assert cfg.data.name == "fashion-mnist"
    teacher = load_config(recipe("fashion_mnist", "teacher_mocov2"))
    if name == "teacher_mocov2":
        assert cfg.model.name == "resnet_small" and cfg.method.name == "mocov2"
    else:
        assert cfg.model.name == "reactnet_small"
        binary = name != "mocov2_real"
        assert cfg.model.binary_act is binary and cfg.model.binary_weight is binary
    if cfg.method.name in ("s2bnn", "seed"):
        # Students distil from exactly the run dir the teacher recipe writes.
        assert cfg.method.teacher.path == teacher.output_dir
        assert cfg.method.teacher.arch == teacher.model.name
        if cfg.method.teacher.head == "none":  # the target: the teacher's pooled stages
            from s2bnn.models import build_model
            from s2bnn.teachers import stage_widths

            net = build_model(teacher.model.name, num_classes=0, in_chans=1)
            assert cfg.method.proj_dim == sum(stage_widths(net, cfg.method.teacher.stages))
        else:
            assert cfg.method.proj_dim == teacher.method.proj_dim


def test_paper_claims_strategies_pass_their_checks() -> None:
    """Each strategy of benchmarks/paper_claims.py (a recipe plus its overrides) passes the
    checks its training starts with: a recipe changed under a strategy's overrides (the online
    teacher over s2bnn.yaml's multi-stage target) fails here, not 20 minutes into the run."""
    import sys

    from s2bnn.methods.registry import check_method_config

    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        from paper_claims import STRATEGIES
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    for name, (file, overrides, _label) in STRATEGIES.items():
        cfg = load_config(ROOT / "configs" / "fashion_mnist" / file, overrides)
        check_method_config(cfg.method, cfg.data.augment.num_views)
        assert name != "s2bnn_online" or cfg.method.teacher.kind == "online"


# --------------------------------------------------------------------------- the reference
# The reference's values, read from szq0214/S2-BNN (README commands and the argparse defaults of
# {Distillation_only,Contrastive+Distillation,Contrastive_only}/step{1,2}/main_moco.py, their
# ReActNet.py and moco/builder.py) and, for the MoCo v2 baseline, facebookresearch/moco
# (main_moco.py defaults and its README's MoCo v2 command). Keys are dotted config keys.
_S2BNN_COMMON = {
    "epochs": 200, "batch_size": 256,                        # --epochs 200, --batch-size 256
    "data.image_size": 224, "data.augment.preset": "s2bnn_lite",   # --aug-plus (p 0.6 / 0.2)
    "model.name": "reactnet_a", "model.binary_act": True,
    "optim.name": "adam", "optim.lr": 3e-4, "optim.schedule": "linear",  # Adam, --lr 0.0003,
    "optim.betas": [0.9, 0.999],                             # lr * (1 - epoch / epochs)
    "optim.exclude_bn_bias": False, "optim.exclude_binary": False,  # Adam(model.parameters())
    "method.temperature": 0.2, "method.proj_dim": 128,       # --moco-t 0.2, --moco-dim 128
}
_MOCO = {"method.queue_size": 65536, "method.momentum": 0.999}   # --moco-k, --moco-m defaults
_DISTIL = {"method.teacher.kind": "offline", "method.teacher.arch": "resnet50",
           "method.teacher.head": "mlp", "method.teacher.format": "moco",  # MoCo v2 800 ep RN50
           "method.distill_weight": 1.0, "method.distill_views": "first"}  # images[0] only
_STEP1 = {"model.binary_weight": False, "model.init_from": None}  # step1/ReActNet.py: nn.Conv2d
_STEP2 = {"model.binary_weight": True, "model.init_scope": "model"}  # HardBinaryConv; loads the
#                                                       whole step-1 model (--model-path)
REFERENCE: dict[str, dict] = {
    # Distillation_only: --wd 0; student and teacher see images[0] only (the second crop unused).
    "s2bnn_step1": {**_S2BNN_COMMON, **_DISTIL, **_STEP1, "method.name": "s2bnn",
                    "method.contrastive_weight": 0.0, "optim.weight_decay": 0.0,
                    "data.augment.num_views": 1},
    "s2bnn_step2": {**_S2BNN_COMMON, **_DISTIL, **_STEP2, "method.name": "s2bnn",
                    "method.contrastive_weight": 0.0, "optim.weight_decay": 0.0,
                    "data.augment.num_views": 1, "model.init_from": "runs/imagenet/s2bnn_step1"},
    # Contrastive+Distillation: --wd 0; loss_cl + loss_kd; distillation on the query view.
    "s2bnn_contrastive": {**_S2BNN_COMMON, **_MOCO, **_DISTIL, **_STEP1, "method.name": "s2bnn",
                          "method.contrastive_weight": 1.0, "optim.weight_decay": 0.0,
                          "data.augment.num_views": 2},
    "s2bnn_contrastive_step2": {**_S2BNN_COMMON, **_MOCO, **_DISTIL, **_STEP2,
                                "method.name": "s2bnn", "method.contrastive_weight": 1.0,
                                "optim.weight_decay": 0.0, "data.augment.num_views": 2,
                                "model.init_from": "runs/imagenet/s2bnn_contrastive"},
    # Contrastive_only ("our enhanced MoCo v2"): --wd default 1e-4, not overridden in the README.
    "mocov2_bnn_plus": {**_S2BNN_COMMON, **_MOCO, **_STEP1, "method.name": "mocov2",
                        "optim.weight_decay": 1e-4, "data.augment.num_views": 2},
    "mocov2_bnn_plus_step2": {**_S2BNN_COMMON, **_MOCO, **_STEP2, "method.name": "mocov2",
                              "optim.weight_decay": 1e-4, "data.augment.num_views": 2,
                              "model.init_from": "runs/imagenet/mocov2_bnn_plus"},
    # MoCo v2 baseline: SGD 0.03, momentum 0.9, wd 1e-4 on every parameter, cosine, aug-plus
    # (jitter p 0.8, blur p 0.5), 200 epochs, batch 256, --moco-t 0.2, --mlp; one binary step.
    "mocov2_bnn": {**_MOCO, "epochs": 200, "batch_size": 256, "data.image_size": 224,
                   "data.augment.preset": "mocov2", "data.augment.num_views": 2,
                   "model.name": "reactnet_a", "model.binary_act": True,
                   "model.binary_weight": True, "model.init_from": None, "method.name": "mocov2",
                   "method.temperature": 0.2, "method.proj_dim": 128, "optim.name": "sgd",
                   "optim.lr": 0.03, "optim.momentum": 0.9, "optim.weight_decay": 1e-4,
                   "optim.schedule": "cosine", "optim.exclude_bn_bias": False,
                   "optim.exclude_binary": False},
}


def _get(cfg, dotted: str):
    node = cfg
    for part in dotted.split("."):
        node = getattr(node, part)
    return node


def test_reference_table_covers_every_imagenet_recipe() -> None:
    assert sorted(REFERENCE) == IMAGENET


@pytest.mark.parametrize("name", IMAGENET)
def test_imagenet_recipe_matches_reference(name: str) -> None:
    """Every value in the reference table, key by key (a difference names the key)."""
    cfg = load_config(recipe("imagenet", name))
    wrong = {k: (_get(cfg, k), v) for k, v in REFERENCE[name].items() if _get(cfg, k) != v}
    assert not wrong, f"{name}: (recipe, reference) differ for {wrong}"


@pytest.mark.parametrize("name", IMAGENET)
def test_imagenet_recipe_loads(name: str) -> None:
    cfg = load_config(recipe("imagenet", name))
    assert cfg.output_dir == f"runs/imagenet/{name}"
    text = recipe("imagenet", name).read_text()
    # Every deviation from the reference that remains is stated in the recipe itself.
    assert "Deviation" in text and "precision" in text
    if name in TWO_STEP:
        step1 = load_config(recipe("imagenet", TWO_STEP[name]))
        assert cfg.model.init_from == step1.output_dir
        assert step1.method == cfg.method and step1.optim == cfg.optim


# --------------------------------------------------------------------------- dry runs
def _tiny_imagefolder(root: Path) -> Path:
    from PIL import Image

    gen = torch.Generator().manual_seed(0)
    for split, count in (("train", 2), ("val", 1)):
        for cls in ("n01", "n02"):
            d = root / split / cls
            d.mkdir(parents=True)
            for i in range(count):
                # Not square and larger than 224, like ImageNet photos.
                pixels = torch.randint(0, 256, (240, 260, 3), generator=gen, dtype=torch.uint8)
                Image.fromarray(pixels.numpy()).save(d / f"img{i}.JPEG", quality=90)
    return root


def _moco_v2_teacher(path: Path) -> Path:
    """A randomly initialised ResNet-50 saved in the official MoCo v2 checkpoint layout."""
    import torchvision

    torch.manual_seed(0)
    net = torchvision.models.resnet50()
    net.fc = nn.Sequential(nn.Linear(2048, 2048), nn.ReLU(), nn.Linear(2048, 128))
    sd = net.state_dict()
    state = {f"module.encoder_q.{k}": v for k, v in sd.items()}
    # The key encoder and queue the loader must ignore (same tensors: saved once).
    state.update({f"module.encoder_k.{k}": v for k, v in sd.items()})
    state["module.queue"] = torch.randn(128, 16)
    state["module.queue_ptr"] = torch.zeros(1, dtype=torch.long)
    torch.save({"epoch": 800, "arch": "resnet50", "state_dict": state, "optimizer": {}}, path)
    return path


@pytest.fixture(scope="module")
def imagenet_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("imagenet")
    return {
        "data": _tiny_imagefolder(root / "data"),
        "teacher": _moco_v2_teacher(root / "moco_v2_800ep_pretrain.pth.tar"),
        "runs": root / "runs",
    }


def _dry_overrides(out: Path) -> list[str]:
    return [f"output_dir={out}", "max_steps=2", "batch_size=2", "device=cpu", "progress=false",
            "data.num_workers=0", "log_every=1"]


def _dry_run(name: str, env: dict[str, Path], *extra: str) -> dict:
    out = env["runs"] / name
    cfg = load_config(recipe("imagenet", name), [
        *_dry_overrides(out), f"data.name={env['data']}", f"method.teacher.path={env['teacher']}",
        *extra,
    ])
    train(cfg)
    ckpt = load_checkpoint(out)
    assert ckpt["step"] == 2 and ckpt["finished"]
    assert ckpt["backbone"]["name"] == "reactnet_a" and ckpt["image_size"] == 224
    assert [r["step"] for r in read_metrics(out)] == ["1", "2"]
    return ckpt


@pytest.mark.slow
@pytest.mark.parametrize("name", [n for n in IMAGENET if n not in TWO_STEP])
def test_imagenet_recipe_dry_run(name: str, imagenet_env) -> None:
    """Each ImageNet recipe runs 2 steps; a two-step recipe's step 2 then starts from it."""
    first = _dry_run(name, imagenet_env)
    step2 = [s for s, s1 in TWO_STEP.items() if s1 == name and s in DRY_STEP2]
    assert first["backbone"]["kwargs"]["binary_weight"] is (name == "mocov2_bnn")
    for second in step2:
        ckpt = _dry_run(second, imagenet_env, f"model.init_from={imagenet_env['runs'] / name}")
        assert ckpt["backbone"]["kwargs"]["binary_weight"] is True
        # Two Adam steps of 3e-4 away from step 1's weights, far from any fresh initialisation.
        key = "stem.0.weight"
        w1, w2 = first["backbone"]["state_dict"][key], ckpt["backbone"]["state_dict"][key]
        assert (w2 - w1).abs().max() < 1e-2 < w1.abs().max()


@pytest.mark.slow
def test_fashion_mnist_recipes_dry_run(tmp_path: Path) -> None:
    """Teacher recipe, then every student recipe distilling from that run dir (2 steps each)."""
    common = ["max_steps=2", "batch_size=16", "data.limit=64", "device=cpu", "progress=false",
              "log_every=1"]
    teacher = tmp_path / "teacher_mocov2"
    try:
        train(load_config(recipe("fashion_mnist", "teacher_mocov2"),
                          [f"output_dir={teacher}", *common]))
    except DataError as err:
        pytest.skip(f"Fashion-MNIST not available: {err}")
    for name in FASHION[1:]:
        out = tmp_path / name
        train(load_config(recipe("fashion_mnist", name),
                          [f"output_dir={out}", f"method.teacher.path={teacher}", *common]))
        ckpt = load_checkpoint(out)
        assert ckpt["step"] == 2 and ckpt["backbone"]["name"] == "reactnet_small", name
