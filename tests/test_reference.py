"""Published checkpoints load, and our ReActNet-A computes what the reference network computes.

The reference networks are the test-only stand-ins of :mod:`reference_nets` (names, shapes and
maths of szq0214/S2-BNN ``ReActNet.py`` and liuzechun/ReActNet ``reactnet.py``). Everything runs
in float64 so that no sign flips on a rounding difference; narrow widths keep it fast.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from reference_nets import RefReActNet, randomize, reactnet_checkpoint, s2bnn_checkpoint
from test_engine import one_thread  # noqa: F401  (autouse: one thread per test)

from s2bnn.checkpoint import load_checkpoint
from s2bnn.cli import main
from s2bnn.errors import CheckpointError, ModelError
from s2bnn.models import build_model, load_reference_checkpoint
from s2bnn.models.reference import convert_reference_state

W = 0.125  # widths 4 ... 128: every block type of ReActNet-A, fast


def _images(n: int = 3, size: int = 64, seed: int = 5) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed),
                       dtype=torch.float64)


def _ref(binary: bool = True, layout: str = "s2bnn", head: str = "mlp", seed: int = 0):
    return randomize(RefReActNet(W, binary=binary, layout=layout, head=head, dim=16,
                                 num_classes=10), seed).double().eval()


def _save(obj: dict, path: Path) -> Path:
    torch.save(obj, path)
    return path


# --------------------------------------------------------------------------- block parity
@pytest.mark.parametrize("index", [1, 2, 3])  # 4 -> 8 (stride 1), 8 -> 16 (stride 2), 16 -> 16
def test_block_matches_reference_block_forward_and_backward(index: int) -> None:
    """Our block (one cin -> 2 cin 1x1 conv where channels double) against the reference block
    (two cin -> cin convs, two BNs, concatenated) with the same weights: outputs and gradients
    agree in training mode (batch statistics) and in eval mode."""
    ref = _ref()
    ours = load_reference_checkpoint_from(ref)
    rb, ob = ref.feature[index], ours.blocks[index - 1]
    cin = rb.cin
    size = 16
    for mode in ("train", "eval"):
        rb.train(mode == "train")
        ob.train(mode == "train")
        x = torch.randn(4, cin, size, size, dtype=torch.float64,
                        generator=torch.Generator().manual_seed(index))
        x1 = x.clone().requires_grad_(True)
        x2 = x.clone().requires_grad_(True)
        y1, y2 = rb(x1), ob(x2)
        assert y1.shape == y2.shape
        assert torch.allclose(y1, y2, atol=1e-10), (mode, (y1 - y2).abs().max())
        g = torch.randn_like(y1)
        y1.backward(g)
        y2.backward(g)
        assert torch.allclose(x1.grad, x2.grad, atol=1e-9), mode
        # The 3x3 conv's latent-weight gradient and the RSign threshold's gradient agree too.
        gw = rb.binary_3x3.weight.grad
        assert torch.allclose(gw, ob.conv3.weight.grad, atol=1e-9)
        assert torch.allclose(rb.move11.bias.grad.flatten(),
                              ob.conv3.input_quantizer.beta.grad, atol=1e-9)
        if rb.cout == 2 * cin:
            both = torch.cat((rb.binary_pw_down1.weight.grad, rb.binary_pw_down2.weight.grad))
            assert torch.allclose(both, ob.conv1.weight.grad, atol=1e-9)
        for m in (rb, ob):
            m.zero_grad()


def load_reference_checkpoint_from(ref: RefReActNet, tmp: Path | None = None) -> torch.nn.Module:
    conv = convert_reference_state(s2bnn_checkpoint(ref, dim=16), "reactnet_a", source="test")
    model = build_model("reactnet_a", **conv["kwargs"]).double()
    model.load_state_dict(conv["backbone"])
    return model


# --------------------------------------------------------------------------- whole networks
@pytest.mark.parametrize("binary", [True, False])
def test_s2bnn_checkpoint_loads_with_equal_pooled_features(tmp_path: Path, binary: bool) -> None:
    """S2-BNN layout (module.encoder_q.*, every block's unused 1x1 pair, MLP fc, encoder_k,
    queue): the loaded backbone's pooled features equal the reference network's."""
    ref = _ref(binary=binary)
    path = _save(s2bnn_checkpoint(ref, dim=16), tmp_path / "checkpoint_0199.pth.tar")
    ours = load_reference_checkpoint(path, binary_weight=binary).double()
    x = _images()
    with torch.no_grad():
        assert torch.allclose(ours(x), ref.features(x), atol=1e-10)
    assert ours.binary_weight is binary and ours.fc is None


def test_reactnet_release_loads_with_its_classifier(tmp_path: Path) -> None:
    """ReActNet's own layout: module.feature.*, only the used layers, flat `.weights`, and a
    classifier fc; features and logits equal the reference's."""
    ref = _ref(layout="reactnet", head="fc")
    keys = ref.state_dict()
    assert "feature.1.binary_3x3.weights" in keys and "feature.1.binary_pw_down1.weights" in keys
    assert "feature.1.binary_pw.weights" not in keys
    path = _save(reactnet_checkpoint(ref), tmp_path / "model_best.pth.tar")
    x = _images()
    with torch.no_grad():
        feats = load_reference_checkpoint(path).double()(x)
        logits = load_reference_checkpoint(path, with_classifier=True).double()(x)
        assert torch.allclose(feats, ref.features(x), atol=1e-10)
        assert torch.allclose(logits, ref(x), atol=1e-9)


def test_reference_layout_has_the_published_key_names() -> None:
    """Our stand-in produces the names the issue quotes from the published files."""
    keys = set(s2bnn_checkpoint(_ref(), dim=16)["state_dict"])
    for k in ("module.encoder_q.feature.1.move11.bias", "module.encoder_q.feature.3.binary_3x3"
              ".weight", "module.encoder_q.feature.2.binary_pw_down1.weight",
              "module.encoder_q.feature.2.bn2_2.running_var", "module.encoder_q.fc.0.weight",
              "module.encoder_q.fc.2.bias", "module.encoder_k.feature.0.conv1.weight",
              "module.queue", "module.queue_ptr"):
        assert k in keys, k


def test_full_width_reactnet_a_key_layout_converts() -> None:
    """The published width (32 ... 1024, 224 px layout): every key maps (no forward pass)."""
    ref = RefReActNet(1.0, binary=True, layout="s2bnn")
    conv = convert_reference_state({"state_dict": {f"module.encoder_q.{k}": v for k, v in
                                                   ref.state_dict().items()}}, "reactnet_a")
    ours = build_model("reactnet_a")
    assert set(conv["backbone"]) == set(ours.state_dict())
    assert conv["kwargs"] == {"num_classes": 0, "binary_act": True, "binary_weight": True,
                              "in_chans": 3}
    assert conv["head"]["0.weight"].shape == (1024, 1024)


# --------------------------------------------------------------------------- convert CLI
def test_convert_cli_output_works_in_eval_init_from_and_export(tmp_path: Path, capsys) -> None:
    from s2bnn.eval.loading import export_backbone, load_backbone

    ref = _ref()
    src = _save(s2bnn_checkpoint(ref, dim=16), tmp_path / "ref.pth.tar")
    out = tmp_path / "converted.pt"
    assert main(["convert", str(src), "--arch", "reactnet_a", "--out", str(out)]) == 0
    assert "key encoder and queue" in capsys.readouterr().out
    x = _images()
    backbone, info = load_backbone(out)
    assert info["name"] == "reactnet_a"
    with torch.no_grad():
        assert torch.allclose(backbone.double()(x), ref.features(x), atol=1e-10)
    exported = export_backbone(out, tmp_path / "b.safetensors")
    again, _ = load_backbone(exported)
    with torch.no_grad():
        assert torch.allclose(again.double()(x), ref.features(x), atol=1e-10)
    # The method state: MLP head, key encoder and queue (dim x K in the file, K x dim here).
    method = load_checkpoint(out)["method"]
    assert not any(k.startswith("backbone.") for k in method)  # stored once
    sd = s2bnn_checkpoint(ref, dim=16)["state_dict"]
    assert torch.equal(method["head.0.weight"], sd["module.encoder_q.fc.0.weight"])
    assert torch.equal(method["moco.key_head.2.bias"], sd["module.encoder_k.fc.2.bias"])
    assert torch.equal(method["moco.queue.keys"], sd["module.queue"].t())
    assert int(method["moco.queue.ptr"]) == 4
    # As a teacher too (a converted student distils nothing, but the head loads).
    from s2bnn.teachers import load_teacher

    assert load_teacher(out, "reactnet_a").embed_dim == 16


@pytest.mark.slow
def test_converted_file_as_init_from_with_whole_model(tmp_path: Path) -> None:
    """A converted step-1 file starts a step-2 MoCo v2 run with head, key encoder and queue."""
    from s2bnn.config import load_config
    from s2bnn.engine import train

    ref = _ref(binary=False)
    src = _save(s2bnn_checkpoint(ref, dim=16, queue=32), tmp_path / "ref.pth.tar")
    conv = tmp_path / "step1.pt"
    assert main(["convert", str(src), "--arch", "reactnet_a", "--out", str(conv),
                 "--binary-weight", "false"]) == 0
    out = tmp_path / "step2"
    cfg = load_config(None, [
        f"output_dir={out}", "data.name=synthetic:3:64:32:2", "batch_size=16", "max_steps=1",
        "device=cpu", "progress=false", "model.name=reactnet_a", "model.width_mult=0.125",
        "model.binary_weight=true", f"model.init_from={conv}", "model.init_scope=model",
        "method.name=mocov2", "method.queue_size=32", "method.proj_dim=16", "optim.lr=0",
        "data.augment.num_views=2",
    ])
    train(cfg)
    method = load_checkpoint(out)["method"]
    saved = load_checkpoint(conv)["method"]
    assert torch.equal(method["head.0.weight"], saved["head.0.weight"])
    kept = [i for i in range(32) if not 4 <= i < 20]
    assert torch.equal(method["moco.queue.keys"][kept], saved["moco.queue.keys"][kept].float())


# --------------------------------------------------------------------------- bad input
def _moco_resnet(tmp_path: Path) -> Path:
    import torchvision

    net = torchvision.models.resnet18(num_classes=8)
    sd = {f"module.encoder_q.{k}": v for k, v in net.state_dict().items()}
    sd["module.queue"] = torch.randn(8, 4)
    return _save({"epoch": 1, "arch": "resnet18", "state_dict": sd}, tmp_path / "moco.pth.tar")


def test_wrong_architecture_names_missing_and_unexpected_keys(tmp_path: Path, capsys) -> None:
    src = _moco_resnet(tmp_path)
    code = main(["convert", str(src), "--arch", "reactnet_a", "--out", str(tmp_path / "o.pt")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err
    assert "missing key(s): feature.0.bn1" in err and "unexpected key(s): bn1.bias" in err
    assert not (tmp_path / "o.pt").exists()


def test_converting_a_converted_file_and_bad_arch_are_one_line_errors(tmp_path: Path,
                                                                      capsys) -> None:
    src = _save(s2bnn_checkpoint(_ref(), dim=16), tmp_path / "ref.pth.tar")
    out = tmp_path / "c.pt"
    assert main(["convert", str(src), "--arch", "reactnet_a", "--out", str(out)]) == 0
    capsys.readouterr()
    code = main(["convert", str(out), "--arch", "reactnet_small", "--out", str(tmp_path / "d.pt")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err and "reference checkpoints exist for reactnet_a" in err
    fake = {"backbone": {"name": "reactnet_small", "kwargs": {}, "state_dict": {}}}
    with pytest.raises(CheckpointError, match="'reactnet_small' backbone, not --arch reactnet_a"):
        convert_reference_state(fake, "reactnet_a", source="c.pt")
    code = main(["convert", str(out), "--arch", "reactnet_a", "--out", str(tmp_path / "e.pt")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "already an s2bnn checkpoint" in err
    code = main(["convert", str(src), "--arch", "reactnet_a", "--out", str(out)])
    assert code == 2 and "--force" in capsys.readouterr().err
    with pytest.raises(ModelError):
        load_reference_checkpoint(src, arch="birealnet18")


def test_converted_file_with_mismatched_arch_in_init_from_and_teacher(tmp_path: Path) -> None:
    from s2bnn.teachers import load_teacher

    src = _save(s2bnn_checkpoint(_ref(), dim=16), tmp_path / "ref.pth.tar")
    out = tmp_path / "c.pt"
    assert main(["convert", str(src), "--arch", "reactnet_a", "--out", str(out)]) == 0
    with pytest.raises(CheckpointError, match="holds a 'reactnet_a' teacher, not 'resnet50'"):
        load_teacher(out, "resnet50")
