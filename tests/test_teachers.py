"""Teacher loading: official MoCo v2 layout, torchvision and safetensors state dicts, our own
checkpoints, and the errors. Registry entries are patched in per test (``monkeypatch``), so these
tests do not depend on which backbones ``s2bnn.models`` registers."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from helpers import TinyNet

from s2bnn.checkpoint import save_checkpoint, save_safetensors
from s2bnn.errors import CheckpointError, ConfigError
from s2bnn.models import list_models
from s2bnn.models.registry import _REGISTRY
from s2bnn.teachers import (
    PROJECTION_HEAD_PREFIX,
    Teacher,
    center_batch,
    load_teacher,
    stage_features,
    whiten_batch,
)


def _tv_builder(fn: Any, feat: int) -> Any:
    """Registry builder: a torchvision ResNet whose fc is Identity (keys as torchvision's)."""

    def build(num_classes: int = 0, in_chans: int = 3) -> nn.Module:
        net = fn(weights=None)
        if in_chans != 3:
            net.conv1 = nn.Conv2d(in_chans, 64, 7, 2, 3, bias=False)
        net.fc = nn.Identity() if num_classes == 0 else nn.Linear(feat, num_classes)
        net.feature_dim = feat
        return net

    return build


class Wrapped(nn.Module):
    """A registry model that keeps torchvision's net under a prefix (keys ``net.*``)."""

    def __init__(self, num_classes: int = 0) -> None:
        super().__init__()
        self.net = torchvision.models.resnet18(weights=None)
        self.net.fc = nn.Identity()
        self.feature_dim = 512

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> object:
    """Small tensors: thread start-up costs more than it saves (and the cores are shared)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def registry(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(_REGISTRY, "resnet18", _tv_builder(torchvision.models.resnet18, 512))
    monkeypatch.setitem(_REGISTRY, "resnet34", _tv_builder(torchvision.models.resnet34, 512))
    monkeypatch.setitem(_REGISTRY, "resnet50", _tv_builder(torchvision.models.resnet50, 2048))
    monkeypatch.setitem(_REGISTRY, "tiny_test_net", TinyNet)
    monkeypatch.setitem(_REGISTRY, "wrapped_resnet18", Wrapped)


def _moco_checkpoint(arch: str, feat: int, path: Path) -> tuple[nn.Module, nn.Module]:
    """Write a checkpoint in the official MoCo v2 layout; return (encoder_q, its head)."""
    torch.manual_seed(0)
    enc = getattr(torchvision.models, arch)(weights=None)
    enc.fc = nn.Sequential(nn.Linear(feat, feat), nn.ReLU(), nn.Linear(feat, 128))
    state = {f"module.encoder_q.{k}": v for k, v in enc.state_dict().items()}
    state.update({f"module.encoder_k.{k}": v.clone() for k, v in enc.state_dict().items()})
    state["module.queue"] = F.normalize(torch.randn(128, 64), dim=0)
    state["module.queue_ptr"] = torch.zeros(1, dtype=torch.long)
    torch.save({"epoch": 800, "arch": arch, "state_dict": state, "optimizer": {"state": {}}},
               path)
    return enc.eval(), enc.fc


@pytest.fixture(scope="module")
def moco18(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, nn.Module]:
    """One official-layout ResNet-18 checkpoint shared by the tests that only read it."""
    path = tmp_path_factory.mktemp("moco") / "moco_v2.pth.tar"
    enc, _ = _moco_checkpoint("resnet18", 512, path)
    return path, enc


def _images(n: int = 2, chans: int = 3, size: int = 32) -> torch.Tensor:
    return torch.randn(n, chans, size, size, generator=torch.Generator().manual_seed(1))


def test_official_moco_v2_layout_resnet18(registry: None, moco18: tuple[Path, nn.Module]) -> None:
    path, enc = moco18
    teacher = load_teacher(path, "resnet18")
    assert isinstance(teacher, Teacher)
    assert teacher.embed_dim == 128 and teacher.in_chans == 3
    assert [type(m) for m in teacher.head] == [nn.Linear, nn.ReLU, nn.Linear]
    x = _images()
    with torch.no_grad():
        expected = F.normalize(enc(x), dim=1)
    torch.testing.assert_close(teacher(x), expected)
    assert torch.allclose(teacher(x).norm(dim=1), torch.ones(2))


def test_official_moco_v2_layout_resnet50_head(registry: None, tmp_path: Path) -> None:
    path = tmp_path / "moco_v2_800ep_pretrain.pth.tar"
    enc, fc = _moco_checkpoint("resnet50", 2048, path)
    teacher = load_teacher(path, "resnet50")
    lin = [m for m in teacher.head if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in lin] == [(2048, 2048), (2048, 128)]
    torch.testing.assert_close(lin[1].weight, fc[2].weight)
    # Outputs are compared in the ResNet-18 test; here the weights, to keep the test fast.
    torch.testing.assert_close(teacher.backbone.layer4[2].conv3.weight, enc.layer4[2].conv3.weight)


def test_teacher_is_frozen_and_stays_in_eval(
    registry: None, moco18: tuple[Path, nn.Module]
) -> None:
    from s2bnn.methods import Method

    teacher = load_teacher(moco18[0], "resnet18")
    assert all(not p.requires_grad for p in teacher.parameters())
    assert not teacher.training and not any(m.training for m in teacher.modules())
    holder = Method(nn.Linear(1, 1))
    holder.attach_offline_teacher(teacher)
    holder.train()  # the method trains; its teacher stays in eval
    assert holder.training and not any(m.training for m in teacher.modules())
    x = _images().requires_grad_()
    assert not teacher(x).requires_grad


def test_moco_arch_mismatch_is_reported(registry: None, moco18: tuple[Path, nn.Module]) -> None:
    with pytest.raises(CheckpointError, match="'resnet18' teacher, not 'resnet50'"):
        load_teacher(moco18[0], "resnet50")


def test_moco_missing_and_stray_keys_are_listed(
    registry: None, moco18: tuple[Path, nn.Module], tmp_path: Path
) -> None:
    ckpt = torch.load(moco18[0], weights_only=True)
    path = tmp_path / "broken.pth.tar"
    del ckpt["state_dict"]["module.encoder_q.layer1.0.conv1.weight"]
    torch.save(ckpt, path)
    with pytest.raises(CheckpointError, match=r"missing keys: layer1\.0\.conv1\.weight"):
        load_teacher(path, "resnet18")
    ckpt["state_dict"]["module.something_else"] = torch.zeros(1)
    torch.save(ckpt, path)
    with pytest.raises(CheckpointError, match="module.something_else"):
        load_teacher(path, "resnet18")


def test_torchvision_state_dict_of_another_architecture(registry: None, tmp_path: Path) -> None:
    path = tmp_path / "r18.pth"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), path)
    with pytest.raises(CheckpointError, match="missing keys: layer1.2"):
        load_teacher(path, "resnet34")
    tiny = tmp_path / "tiny.pth"
    torch.save(TinyNet(in_chans=1).state_dict(), tiny)
    with pytest.raises(CheckpointError, match="shape mismatch"):
        load_teacher(tiny, "tiny_test_net", in_chans=3)


def test_torchvision_state_dict_heads(registry: None, tmp_path: Path) -> None:
    torch.manual_seed(0)
    net = torchvision.models.resnet18(weights=None, num_classes=10).eval()
    path = tmp_path / "r18.pth"
    torch.save({f"module.{k}": v for k, v in net.state_dict().items()}, path)  # DDP-saved
    x = _images()
    linear = load_teacher(path, "resnet18")  # auto: the fc layer in the checkpoint
    assert isinstance(linear.head, nn.Linear) and linear.embed_dim == 10
    with torch.no_grad():
        torch.testing.assert_close(linear(x), F.normalize(net(x), dim=1))
    none = load_teacher(path, "resnet18", head="none")
    assert none.embed_dim == 512
    net.fc = nn.Identity()
    with torch.no_grad():
        torch.testing.assert_close(none(x), F.normalize(net(x), dim=1))
    with pytest.raises(CheckpointError, match="not a mlp head"):
        load_teacher(path, "resnet18", head="mlp")
    headless = tmp_path / "headless.pth"
    torch.save(net.state_dict(), headless)
    assert load_teacher(headless, "resnet18").embed_dim == 512
    with pytest.raises(CheckpointError, match="no projection head"):
        load_teacher(headless, "resnet18", head="linear")


def test_state_dict_into_a_prefixed_registry_model(registry: None, tmp_path: Path) -> None:
    torch.manual_seed(0)
    net = torchvision.models.resnet18(weights=None).eval()
    path = tmp_path / "r18.pth"
    torch.save(net.state_dict(), path)
    teacher = load_teacher(path, "wrapped_resnet18")
    with torch.no_grad():
        torch.testing.assert_close(teacher(_images()), F.normalize(net(_images()), dim=1))


def test_safetensors_teacher(registry: None, tmp_path: Path) -> None:
    torch.manual_seed(0)
    net = torchvision.models.resnet18(weights=None)
    net.fc = nn.Sequential(nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 64))
    net.eval()
    path = tmp_path / "teacher.safetensors"
    save_safetensors(net.state_dict(), path, metadata={"arch": "resnet18"})
    teacher = load_teacher(path, "resnet18", head="mlp")
    assert teacher.embed_dim == 64
    with torch.no_grad():
        torch.testing.assert_close(teacher(_images()), F.normalize(net(_images()), dim=1))
    with pytest.raises(CheckpointError, match="not 'resnet34'"):
        load_teacher(path, "resnet34")


def _own_checkpoint(run_dir: Path, name: str = "tiny_test_net") -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    backbone = TinyNet(in_chans=1)
    head = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 32))
    method_sd = {f"backbone.{k}": v for k, v in backbone.state_dict().items()}
    method_sd.update({f"{PROJECTION_HEAD_PREFIX}{k}": v for k, v in head.state_dict().items()})
    method_sd["moco.queue.keys"] = torch.randn(8, 32)
    save_checkpoint({
        "format": "s2bnn", "version": 1, "config": {}, "epoch": 1, "step": 10,
        "backbone": {"name": name, "kwargs": {"in_chans": 1, "width": 8},
                     "state_dict": backbone.state_dict()},
        "method": method_sd,
    }, run_dir / "checkpoints" / "last.pt")
    return backbone.eval(), head


def test_own_checkpoint_from_run_dir(registry: None, tmp_path: Path) -> None:
    backbone, head = _own_checkpoint(tmp_path / "run")
    teacher = load_teacher(tmp_path / "run", "tiny_test_net")
    assert teacher.embed_dim == 32 and teacher.in_chans == 1
    x = _images(4, 1, 16)
    with torch.no_grad():
        torch.testing.assert_close(teacher(x), F.normalize(head(backbone(x)), dim=1))
    with pytest.raises(CheckpointError, match="'tiny_test_net' teacher, not 'resnet18'"):
        load_teacher(tmp_path / "run", "resnet18")


def test_missing_teacher_file(registry: None, tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="not found"):
        load_teacher(tmp_path / "nope.pth.tar", "resnet18")
    (tmp_path / "empty_run").mkdir()
    with pytest.raises(CheckpointError, match="checkpoints/last.pt"):
        load_teacher(tmp_path / "empty_run", "resnet18")


@pytest.mark.skipif("resnet18" not in list_models(), reason="s2bnn.models has no resnet18 yet")
def test_official_layout_into_the_registry_resnet18(moco18: tuple[Path, nn.Module]) -> None:
    """The real registry's resnet18 (not patched) takes torchvision keys."""
    path, enc = moco18
    teacher = load_teacher(path, "resnet18")
    with torch.no_grad():
        torch.testing.assert_close(teacher(_images()), F.normalize(enc(_images()), dim=1))


@pytest.mark.parametrize("precision", ["auto", "fp32", "bf16"])
def test_teacher_precision_and_layout(precision: str) -> None:
    """The teacher runs channels-last (same function) in the precision asked for; bf16 targets
    differ from fp32 ones by rounding only, and come back as float32."""
    torch.manual_seed(0)
    backbone, head = TinyNet(in_chans=3, width=8), nn.Linear(16, 8)
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        expected = F.normalize(head(backbone.eval()(x)), dim=1)
    teacher = Teacher(backbone, head, "tiny", precision=precision)
    conv = teacher.backbone.features[0].weight
    assert conv.is_contiguous(memory_format=torch.channels_last)
    out = teacher(x)
    assert out.dtype == torch.float32
    tol = 3e-2 if precision == "bf16" else 1e-5
    torch.testing.assert_close(out, expected, atol=tol, rtol=0)
    if precision == "bf16":
        assert not torch.equal(out, expected)  # it did run in bf16
    # Under a bf16 autocast (precision=bf16 training), auto follows it and fp32 opts out.
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inner = teacher(x)
    if precision == "fp32":
        torch.testing.assert_close(inner, expected, atol=1e-5, rtol=0)
    else:
        assert not torch.equal(inner, expected)
        torch.testing.assert_close(inner, expected, atol=3e-2, rtol=0)


def test_teacher_precision_unknown() -> None:
    with pytest.raises(ConfigError, match="precision 'fp16' unknown"):
        Teacher(TinyNet(), nn.Identity(), "tiny", precision="fp16")


# --------------------------------------------------------------------------- SwAV, DINO, SimSiam
# Layouts as the official code saves them (facebookresearch/swav src/resnet50.py + hubconf.py,
# facebookresearch/dino main_dino.py + hubconf.py, facebookresearch/simsiam simsiam/builder.py +
# main_simsiam.py), on a ResNet-18 body to stay fast.
def _resnet18(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    net = torchvision.models.resnet18(weights=None).eval()
    net.fc = nn.Identity()
    return net


def _swav_file(path: Path, wrapped: bool = False) -> tuple[nn.Module, nn.Module]:
    net = _resnet18()
    head = nn.Sequential(nn.Linear(512, 64), nn.BatchNorm1d(64), nn.ReLU(), nn.Linear(64, 16))
    head.eval()
    with torch.no_grad():
        head[1].running_mean.normal_()
        head[1].running_var.uniform_(0.5, 1.5)
    sd = {f"module.{k}": v for k, v in net.state_dict().items() if not k.startswith("fc.")}
    sd.update({f"module.projection_head.{k}": v for k, v in head.state_dict().items()})
    sd["module.prototypes.weight"] = torch.randn(30, 16)
    # The released files are a bare state dict; main_swav.py's own checkpoints wrap it.
    torch.save({"epoch": 400, "state_dict": sd, "optimizer": {}} if wrapped else sd, path)
    return net, head


@pytest.mark.parametrize("wrapped", [False, True])
def test_swav_checkpoint(registry: None, tmp_path: Path, wrapped: bool) -> None:
    path = tmp_path / "swav_800ep_pretrain.pth.tar"
    net, head = _swav_file(path, wrapped)
    teacher = load_teacher(path, "resnet18", fmt="swav")
    assert teacher.embed_dim == 16
    assert [type(m) for m in teacher.head] == [nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Linear]
    x = _images()
    with torch.no_grad():
        torch.testing.assert_close(teacher(x), F.normalize(head(net(x)), dim=1))


def test_dino_checkpoints(registry: None, tmp_path: Path) -> None:
    net = _resnet18()
    x = _images()
    with torch.no_grad():
        expected = F.normalize(net(x), dim=1)
    # The backbone-only release (dino_resnet50_pretrain.pth): torchvision keys, fc removed.
    bare = tmp_path / "dino_resnet50_pretrain.pth"
    torch.save({k: v for k, v in net.state_dict().items()}, bare)
    teacher = load_teacher(bare, "resnet18", fmt="dino")
    assert teacher.embed_dim == 512
    torch.testing.assert_close(teacher(x), expected)
    # The full checkpoint: student and (EMA) teacher, DDP-wrapped, with the DINO head.
    dino_head = {"mlp.0.weight": torch.randn(32, 512), "mlp.0.bias": torch.zeros(32),
                 "last_layer.weight_g": torch.ones(64, 1),
                 "last_layer.weight_v": torch.randn(64, 32)}
    teacher_sd = {f"module.backbone.{k}": v for k, v in net.state_dict().items()}
    teacher_sd.update({f"module.head.{k}": v for k, v in dino_head.items()})
    student_sd = {k: torch.zeros_like(v) for k, v in teacher_sd.items()}
    full = tmp_path / "dino_resnet50_pretrain_full_checkpoint.pth"
    torch.save({"student": student_sd, "teacher": teacher_sd, "optimizer": {}, "epoch": 800,
                "args": {"arch": "resnet18"}, "dino_loss": {"center": torch.zeros(1, 64)}}, full)
    teacher = load_teacher(full, "resnet18")
    torch.testing.assert_close(teacher(x), expected)
    with pytest.raises(CheckpointError, match="holds no projection head"):
        load_teacher(full, "resnet18", head="mlp")


def test_simsiam_checkpoint(registry: None, tmp_path: Path) -> None:
    net = _resnet18()
    proj = nn.Sequential(nn.Linear(512, 512, bias=False), nn.BatchNorm1d(512), nn.ReLU(),
                         nn.Linear(512, 512, bias=False), nn.BatchNorm1d(512), nn.ReLU(),
                         nn.Linear(512, 64), nn.BatchNorm1d(64, affine=False)).eval()
    pred = nn.Sequential(nn.Linear(64, 16, bias=False), nn.BatchNorm1d(16), nn.ReLU(),
                         nn.Linear(16, 64))
    sd = {f"module.encoder.{k}": v for k, v in net.state_dict().items()}
    sd.update({f"module.encoder.fc.{k}": v for k, v in proj.state_dict().items()})
    sd.update({f"module.predictor.{k}": v for k, v in pred.state_dict().items()})
    path = tmp_path / "checkpoint_0099.pth.tar"
    torch.save({"epoch": 100, "arch": "resnet18", "state_dict": sd, "optimizer": {}}, path)
    teacher = load_teacher(path, "resnet18", fmt="simsiam", head="mlp")
    assert teacher.embed_dim == 64
    assert isinstance(teacher.head[7], nn.BatchNorm1d) and not teacher.head[7].affine
    x = _images()
    with torch.no_grad():
        torch.testing.assert_close(teacher(x), F.normalize(proj(net(x)), dim=1))


def test_wrong_format_is_named_in_one_line(registry: None, tmp_path: Path,
                                           moco18: tuple[Path, nn.Module]) -> None:
    swav = tmp_path / "swav.pth.tar"
    _swav_file(swav)
    with pytest.raises(CheckpointError, match=r"is an official SwAV checkpoint \(swav layout\), "
                       r"not the moco layout") as err:
        load_teacher(swav, "resnet18", fmt="moco")
    assert "\n" not in str(err.value) and "method.teacher.format=swav" in str(err.value)
    dino = tmp_path / "dino_full.pth"
    torch.save({"student": {"module.backbone.conv1.weight": torch.zeros(1)},
                "teacher": {"module.backbone.conv1.weight": torch.zeros(1)}}, dino)
    with pytest.raises(CheckpointError, match="official DINO checkpoint"):
        load_teacher(dino, "resnet18", fmt="moco")
    with pytest.raises(CheckpointError, match="MoCo v2 checkpoint"):
        load_teacher(moco18[0], "resnet18", fmt="swav")
    with pytest.raises(ConfigError, match="teacher format 'byol' unknown"):
        load_teacher(moco18[0], "resnet18", fmt="byol")


def test_swav_wide_resnet_key_layout() -> None:
    """SwAV's RN50-w2/w4 keys: torchvision names at every width x widen (stem 64 w)."""
    from s2bnn.models import build_model

    net = build_model("resnet50w2", layers=[1, 1, 1, 1], width_mult=0.25)
    sd = net.state_dict()
    assert sd["conv1.weight"].shape == (32, 3, 7, 7)  # 64 * 2 * 0.25
    assert sd["layer4.0.conv3.weight"].shape == (1024, 256, 1, 1)
    assert net.feature_dim == 1024 and "fc.weight" not in sd


def test_center_batch_subtracts_the_batch_mean_and_leaves_one_image_alone() -> None:
    z = torch.rand(6, 5) + 1.0  # all positive, like pooled ReLU features
    c = center_batch(z)
    torch.testing.assert_close(c.mean(0), torch.zeros(5))
    torch.testing.assert_close(c[0] - c[1], z[0] - z[1])  # differences between views kept
    assert torch.equal(center_batch(z[:1]), z[:1])  # nothing to centre on: unchanged


def test_whiten_batch_evens_out_the_spectrum_and_keeps_its_directions() -> None:
    """Each principal direction of variance e comes out with variance e / (e + m), m the mean
    variance, along the same direction; one image is left alone."""
    torch.manual_seed(0)
    z = torch.randn(64, 8, dtype=torch.float64) * torch.tensor([8.0, 4, 2, 1, 0.5, 0.2, 0.1,
                                                                0.05], dtype=torch.float64)
    z = z @ torch.linalg.qr(torch.randn(8, 8, dtype=torch.float64))[0] + 3.0
    w = whiten_batch(z)
    torch.testing.assert_close(w.mean(0), torch.zeros(8, dtype=torch.float64))
    zc = z - z.mean(0)
    e, v = torch.linalg.eigh(zc.T @ zc / 64)
    out = v.T @ (w.T @ w / 64) @ v  # the output covariance in the input's principal axes
    torch.testing.assert_close(out, torch.diag(e / (e + e.mean())))
    share = lambda a: float(torch.linalg.eigvalsh(a.T @ a)[-1] / torch.trace(a.T @ a))  # noqa
    assert share(w) < share(zc) - 0.2  # the top direction holds less of the whole
    assert torch.equal(whiten_batch(z[:1]), z[:1])
    # One image three times: centred, only rounding is left, and it is not blown up.
    assert whiten_batch(z[:1].repeat(3, 1)).abs().max() < 1e-6


def test_load_teacher_centres_on_request(registry: None, tmp_path: Path) -> None:
    torch.manual_seed(0)
    net = TinyNet(in_chans=1).eval()
    path = tmp_path / "tiny.pth"
    torch.save(net.state_dict(), path)
    x = _images(4, chans=1, size=16)
    centred = load_teacher(path, "tiny_test_net", head="none", center=True, in_chans=1)
    plain = load_teacher(path, "tiny_test_net", head="none", in_chans=1)
    with torch.no_grad():
        feats = net(x)
    torch.testing.assert_close(centred(x), F.normalize(feats - feats.mean(0), dim=1))
    torch.testing.assert_close(plain(x), F.normalize(feats, dim=1))
    assert not plain.center
    white = load_teacher(path, "tiny_test_net", head="none", center=True, whiten=True,
                         in_chans=1)
    torch.testing.assert_close(white(x), F.normalize(whiten_batch(feats), dim=1))


def test_stage_features_of_our_backbones_and_torchvision_resnets(registry: None) -> None:
    """A stage ends where the next block changes the map's shape; the last stage's pooled output
    is the backbone's own pooled features."""
    from s2bnn.models import build_model
    from s2bnn.teachers import stage_features

    torch.manual_seed(0)
    small = build_model("resnet_small", num_classes=0, in_chans=1, width_mult=0.25,
                        layers=(2, 1, 2, 1)).eval()
    x = _images(3, chans=1, size=16)
    with torch.no_grad():
        feats = stage_features(small, x, None)
        assert [f.shape[1] for f in feats] == [6, 12, 24, 48]  # two blocks in stages 1, 3
        torch.testing.assert_close(feats[-1], small(x))
        two = stage_features(small, x, 2)
        torch.testing.assert_close(torch.cat(two, 1), torch.cat(feats[2:], 1))
        tv = build_model("resnet18", num_classes=0, in_chans=1).eval()
        tv_feats = stage_features(tv, _images(2, chans=1, size=32), None)
        assert [f.shape[1] for f in tv_feats] == [64, 128, 256, 512]
        torch.testing.assert_close(tv_feats[-1], tv(_images(2, chans=1, size=32)))
    with pytest.raises(ConfigError, match="stages=5 but resnet_small has 4 stages"):
        stage_features(small, x, 5, "resnet_small")
    with pytest.raises(ConfigError, match="no stages this library can read"):
        stage_features(TinyNet(in_chans=1), x, 2)


def test_stage_features_on_a_grid_are_the_maps_pooled_cell_by_cell(registry: None) -> None:
    """grid=g: each stage average-pooled to g x g, one N x C block per cell, row by row and
    stage by stage; the cells' mean is the stage's pooled output where g divides the map."""
    from s2bnn.models import build_model
    from s2bnn.teachers import stage_widths

    torch.manual_seed(0)
    net = build_model("resnet_small", num_classes=0, in_chans=1, width_mult=0.25).eval()
    x = _images(3, chans=1, size=32)  # stage maps 16, 8, 4, 2
    with torch.no_grad():
        pooled = stage_features(net, x, 2)
        cells = stage_features(net, x, 2, grid=2)
        last = net.blocks(net.stem(x))
    assert [c.shape for c in cells] == [(3, 24)] * 4 + [(3, 48)] * 4
    assert stage_widths(net, 2, grid=2) == (24,) * 4 + (48,) * 4
    torch.testing.assert_close(cells[4], last[:, :, 0, 0].float())  # a 2x2 map: cells are pixels
    torch.testing.assert_close(cells[5], last[:, :, 0, 1].float())  # row by row
    torch.testing.assert_close(cells[6], last[:, :, 1, 0].float())
    for k, stage in enumerate(pooled):
        torch.testing.assert_close(torch.stack(cells[4 * k:4 * k + 4]).mean(0), stage)
    with torch.no_grad():  # adaptive pooling: a map the grid does not divide still works
        odd = stage_features(net, _images(2, chans=1, size=28), 1, grid=3)
    assert len(odd) == 9 and all(c.shape == (2, 48) for c in odd)


def _small_resnet_file(tmp_path: Path) -> tuple[nn.Module, Path, dict[str, Any]]:
    """A seeded quarter-width resnet_small saved as a bare state dict, and the load_teacher
    keywords that read its pooled stages."""
    from s2bnn.models import build_model

    torch.manual_seed(0)
    net = build_model("resnet_small", num_classes=0, in_chans=1, width_mult=0.25).eval()
    path = tmp_path / "small.pth"
    torch.save(net.state_dict(), path)
    return net, path, dict(head="none", center=True, in_chans=1, width_mult=0.25)


def test_teacher_on_a_grid_gives_one_unit_block_per_cell(registry: None,
                                                         tmp_path: Path) -> None:
    net, path, kw = _small_resnet_file(tmp_path)
    teacher = load_teacher(path, "resnet_small", stages=2, grid=2, **kw)
    assert teacher.block_dims == (24,) * 4 + (48,) * 4 and teacher.embed_dim == 288
    x = _images(5, chans=1, size=32)
    z = teacher(x)
    with torch.no_grad():
        cells = stage_features(net, x, 2, grid=2)
    for block, cell in zip(z.split(teacher.block_dims, 1), cells):
        torch.testing.assert_close(block, F.normalize(cell - cell.mean(0), dim=1))
    last = load_teacher(path, "resnet_small", grid=2, **kw)  # the last stage only
    assert last.block_dims == (48,) * 4
    torch.testing.assert_close(last(x), z[:, 96:])
    with pytest.raises(ConfigError, match="grid=2 distils the backbone's feature maps"):
        Teacher(net, nn.Linear(48, 8), "resnet_small", grid=2)
    with pytest.raises(ConfigError, match="grid must be >= 1, got 0"):
        load_teacher(path, "resnet_small", grid=0, **kw)


def test_teacher_with_stages_gives_one_unit_block_per_stage(registry: None,
                                                            tmp_path: Path) -> None:
    net, path, kw = _small_resnet_file(tmp_path)
    two = load_teacher(path, "resnet_small", stages=2, **kw)
    one = load_teacher(path, "resnet_small", **kw)
    assert two.block_dims == (24, 48) and two.embed_dim == 72 and one.block_dims == (48,)
    x = _images(5, chans=1, size=16)
    z = two(x)
    assert z.shape == (5, 72)
    torch.testing.assert_close(z[:, :24].norm(dim=1), torch.ones(5))
    torch.testing.assert_close(z[:, 24:], one(x))  # the last stage: the usual target
    with torch.no_grad():
        mid = net.blocks[:3](net.stem(x)).mean((2, 3))
    torch.testing.assert_close(z[:, :24], F.normalize(mid - mid.mean(0), dim=1))
    assert not any(p.requires_grad for p in two.parameters()) and not two.training
    with pytest.raises(ConfigError, match="set method.teacher.head=none"):
        Teacher(net, nn.Linear(48, 8), "resnet_small", stages=2)
    _own_checkpoint(tmp_path / "with_head")  # a checkpoint whose head head=auto would take
    with pytest.raises(ConfigError, match="not a projection head: set method.teacher.head=none"):
        load_teacher(tmp_path / "with_head", "tiny_test_net", stages=2)
    with pytest.raises(ConfigError, match="stages must be >= 1, got 0"):
        load_teacher(path, "resnet_small", stages=0, **kw)
