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
        assert cfg.method.proj_dim == teacher.method.proj_dim


@pytest.mark.parametrize("name", IMAGENET)
def test_imagenet_recipe_loads(name: str) -> None:
    cfg = load_config(recipe("imagenet", name))
    assert cfg.model.name == "reactnet_a" and cfg.model.binary_act is True
    assert cfg.data.image_size == 224 and cfg.batch_size == 256 and cfg.epochs == 200
    assert cfg.output_dir == f"runs/imagenet/{name}"
    if name != "mocov2_bnn":  # the plain baseline keeps MoCo v2's own SGD recipe
        assert (cfg.optim.name, cfg.optim.lr, cfg.optim.weight_decay, cfg.optim.schedule) == (
            "adam", 3e-4, 0.0, "linear")
        assert cfg.data.augment.preset == "s2bnn_lite"
    if name in TWO_STEP:
        step1 = load_config(recipe("imagenet", TWO_STEP[name]))
        assert cfg.model.init_from == step1.output_dir and cfg.model.binary_weight is True
        assert step1.model.binary_weight is False
        assert step1.method == cfg.method
    if cfg.method.name == "s2bnn":
        assert cfg.method.teacher.arch == "resnet50" and cfg.method.teacher.path


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
