"""s2bnn.deploy: lowering, packed runtime (every ISA level), file format, CLI, ONNX."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import yaml

from s2bnn.checkpoint import save_checkpoint
from s2bnn.cli import main
from s2bnn.deploy import _build, load, pack
from s2bnn.deploy.runtime import VERSION, pack_bits_torch, unpack_bits
from s2bnn.errors import CheckpointError, ModelError
from s2bnn.models import build_model
from s2bnn.models.profile import profile_model
from s2bnn.nn import QuantConv2d, RSign

DATA = "synthetic:1:12:120:4"
LEVELS = ["portable", "popcnt", "avx2", "avx512"]


def randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial BatchNorm statistics and RSign / RPReLU parameters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5, generator=g)
                m.running_var.uniform_(0.5, 2.0, generator=g)
                m.weight.uniform_(-1.5, 1.5, generator=g)  # negative scales flip signs
                m.bias.uniform_(-0.5, 0.5, generator=g)
            for name, p in m.named_parameters(recurse=False):
                if name in ("beta", "shift_in", "shift_out"):
                    p.uniform_(-0.3, 0.3, generator=g)
                elif name == "slope":
                    p.uniform_(-0.5, 0.5, generator=g)
    return model.eval()


# Channel counts that are not multiples of 64 (width 0.3 -> 10 ... 307 channels, 0.9 -> 58 ...),
# odd image sizes, stride 2 everywhere the networks have it, batch 3.
CASES = [
    ("reactnet_small", dict(num_classes=7, in_chans=1, width_mult=0.3, mid_blocks=1), 29),
    ("reactnet_small", dict(num_classes=0, in_chans=2, width_mult=0.9, mid_blocks=0,
                            stem_stride=1), 15),
    ("birealnet18", dict(num_classes=5, in_chans=3, width_mult=0.3, stem_stride=2,
                         layers=[1, 1, 1, 1]), 33),
    ("birealnet18", dict(num_classes=0, in_chans=3, width_mult=0.2, layers=[1, 1, 2, 1]), 37),
    ("binary_resnet18_plain", dict(num_classes=3, in_chans=1, width_mult=0.25, stem_stride=1,
                           layers=[1, 1, 1, 1]), 19),
    # channels multiples of 8: the vectorised epilogue, with cat shortcuts read as y[c mod C]
    ("reactnet_small", dict(num_classes=4, in_chans=1, width_mult=1.0, mid_blocks=1), 13),
    # even sizes all the way down: the 2x2 pool shortcuts averaged in the kernels' epilogue;
    # 10 channels at the stem (two taps per word), 40 (five words of 8) after it
    ("reactnet_small", dict(num_classes=6, in_chans=3, width_mult=0.3, mid_blocks=1), 32),
    ("reactnet_small", dict(num_classes=0, in_chans=1, width_mult=1.25, mid_blocks=0), 64),
    # capped widths: stride-2 blocks that keep their width (pool shortcut, no cat), odd size
    ("reactnet_small", dict(num_classes=3, in_chans=1, width_mult=0.5, mid_blocks=1,
                            max_channels=64), 29),
    # no middle block and no last stage: the network ends on the 2x2 map (pooled by the head)
    ("reactnet_small", dict(num_classes=0, in_chans=1, width_mult=0.5, mid_blocks=0,
                            tail_blocks=0), 28),
    # XNOR-Net: BN -> sign -> bconv -> times the activation scale K (act_scale + mul)
    ("xnor_resnet18", dict(num_classes=5, in_chans=3, width_mult=0.25, stem_stride=2,
                           layers=[1, 1, 1, 1]), 33),
]


def _levels() -> list[str]:
    return [lv for lv in LEVELS if lv in _build.available_isas()]


@pytest.mark.parametrize("name,kwargs,size", CASES)
def test_packed_matches_eval_forward(name, kwargs, size):
    model = randomize(build_model(name, **kwargs), seed=len(name) + size)
    x = torch.randn(3, kwargs["in_chans"], size, size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(x)
    packed = pack(model, isa="torch")
    assert sum(1 for _ in packed.binary_convs()) > 0
    base = packed(x)
    assert base.shape == ref.shape
    torch.testing.assert_close(base, ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()))
    # Every compiled level gives exactly the same numbers as the pure-torch path.
    for level in ["portable"] + _levels():
        packed.set_isa(level)
        assert torch.equal(packed(x), base), level


def test_every_isa_level_or_a_stated_skip():
    have = _build.available_isas()
    if _build.kernels() is None:
        pytest.skip("no C compiler: only the pure-torch path runs here")
    missing = [lv for lv in LEVELS if lv not in have]
    model = randomize(build_model("reactnet_small", num_classes=0, in_chans=1, width_mult=0.7,
                                  mid_blocks=1), seed=3)
    x = torch.randn(2, 1, 23, 23)
    packed = pack(model, isa="portable")
    want = packed(x)
    for level in _levels():
        packed.set_isa(level)
        assert torch.equal(packed(x), want), level
    if missing:
        pytest.skip(f"this CPU lacks {', '.join(missing)}: those levels were not run")


@pytest.mark.parametrize("k,stride,cin,cout,size", [
    (3, 1, 70, 33, 9), (3, 2, 130, 64, 10), (1, 1, 64, 129, 7), (1, 2, 5, 3, 8), (3, 2, 1, 7, 5),
    # 1x1 read in place (rows of 4 words, 6 channels past the last whole 8 in the epilogue), the
    # AVX2 two-unit GEMM with a scalar word tail (9 words) and an odd last channel (18 words)
    (1, 1, 200, 70, 5), (3, 1, 64, 16, 6), (3, 1, 128, 9, 5), (3, 2, 256, 24, 7),
    # at most 32 input channels: two taps per word (odd tap count, stride 2, odd sizes)
    (3, 1, 32, 40, 9), (3, 2, 20, 16, 7), (3, 1, 33, 8, 5), (5, 1, 7, 6, 6),
    # few pixel tiles, at least 64 output channels per thread: channels split over the threads
    (3, 1, 64, 192, 6), (1, 1, 128, 256, 5), (3, 2, 96, 150, 7),
    # the 4 x 4 POPCNT tile at each row length compiled as a constant (5, 9, 18, 36, 72, 144
    # words) and at others, with 1-3 channels past the last multiple of 4 (the 4 x 2 tail)
    (3, 1, 24, 6, 7), (3, 2, 64, 7, 5), (3, 1, 256, 13, 4), (3, 1, 512, 6, 4),
    (3, 1, 1024, 5, 3), (3, 1, 320, 11, 3), (1, 1, 1024, 7, 3),
])
def test_popcount_part_is_bit_exact(k, stride, cin, cout, size):
    """The integer dot products equal a float conv of +-1 tensors (exact below 2**24)."""
    conv = QuantConv2d(cin, cout, k, stride, k // 2, input_quantizer=RSign(cin),
                       weight_quantizer="ste_sign").eval()  # alpha = 1: output = dot
    with torch.no_grad():
        conv.input_quantizer.beta.uniform_(-0.2, 0.2)
    x = torch.randn(2, cin, size, size)
    with torch.no_grad():
        ref = conv(x)
    packed = pack(nn.Sequential(conv))
    for level in ["torch", "portable"] + _levels():
        packed.set_isa(level)
        assert torch.equal(packed(x), ref), level


def test_bits_round_trip_and_channel_padding():
    v = torch.randn(2, 70, 3, 4)
    bits = pack_bits_torch(v)
    assert bits.shape == (2, 3, 4, 2)
    assert torch.equal(unpack_bits(bits, 70), torch.where(v < 0, -1.0, 1.0))
    assert int((bits[..., 1] >> 6).abs().sum()) == 0  # bits past channel 70 stay 0
    lib = _build.kernels()
    if lib is None:
        pytest.skip("no C compiler")
    xc = v.contiguous(memory_format=torch.channels_last)
    for level in range(4):
        out = torch.empty_like(bits)
        lib.s2d_sign_pack(xc.data_ptr(), 24, 70, None, out.data_ptr(), level, 2)
        assert torch.equal(out, bits)


def _tiny_packed(tmp_path: Path):
    model = randomize(build_model("reactnet_small", num_classes=4, in_chans=1, width_mult=0.25,
                                  mid_blocks=0), seed=5)
    packed = pack(model, meta={"note": "test"})
    path = packed.save(tmp_path / "net.s2bnn")
    return model, packed, path


def test_save_load_round_trip(tmp_path):
    model, packed, path = _tiny_packed(tmp_path)
    again = load(path)
    x = torch.randn(2, 1, 17, 17)
    assert torch.equal(again(x), packed(x))
    assert again.meta == {"note": "test"}
    assert set(again.tensors) == set(packed.tensors)


def test_file_size_agrees_with_profiler():
    """Rule: size_packed_bytes (binary weights at 1 bit, rounded up per output channel and tap
    to whole bytes; everything else float32) >= the file's tensor bytes, and the file is within
    10 % + 64 KiB of it (BatchNorm folds into two floats per channel like the profile counts it;
    the JSON graph is the rest)."""
    import os
    import tempfile

    model = build_model("reactnet_small", num_classes=10, in_chans=1)
    prof = profile_model(model, image_size=28, in_chans=1)
    packed = pack(model, isa="torch")
    with tempfile.TemporaryDirectory() as d:
        size = os.path.getsize(packed.save(Path(d) / "m.s2bnn"))
    tensor_bytes = sum(t.numel() * t.element_size() for t in packed.tensors.values())
    assert tensor_bytes <= prof["size_packed_bytes"]
    assert abs(size - prof["size_packed_bytes"]) <= 0.10 * prof["size_packed_bytes"] + 65536


def _one_line(capsys, rc: int, *needles: str) -> None:
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.startswith("s2bnn: error:") and "\n" not in err, err
    for n in needles:
        assert n in err, err


def test_bad_files_fail_in_one_line(tmp_path, capsys):
    _, _, path = _tiny_packed(tmp_path)
    data = path.read_bytes()
    img = tmp_path / "x.png"
    _save_png(img, 0)
    cases = {}
    cases["truncated"] = data[: len(data) - 100]
    tampered = bytearray(data)
    tampered[-5] ^= 0xFF
    cases["checksum"] = bytes(tampered)
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + n])
    header["__metadata__"]["version"] = str(VERSION + 1)
    new = json.dumps(header).encode()
    new += b" " * (n - len(new)) if len(new) <= n else b""
    cases["newer"] = data[:8] + new + data[8 + n:] if len(new) == n else None
    for what, blob in cases.items():
        if blob is None:
            continue
        bad = tmp_path / f"{what}.s2bnn"
        bad.write_bytes(blob)
        with pytest.raises(CheckpointError, match=what if what != "checksum" else "checksum"):
            load(bad)
        _one_line(capsys, main(["predict", str(bad), str(img)]), what)
    _one_line(capsys, main(["predict", str(tmp_path / "missing.s2bnn"), str(img)]),
              "does not exist")


def test_bad_inputs(tmp_path):
    model, packed, _ = _tiny_packed(tmp_path)
    with pytest.raises(ModelError, match="channel"):
        packed(torch.randn(1, 3, 17, 17))
    with pytest.raises(ModelError, match="dtype"):
        packed(torch.zeros(1, 1, 17, 17, dtype=torch.uint8))
    with pytest.raises(ModelError, match="shape"):
        packed(torch.zeros(1, 17, 17))
    real = build_model("reactnet_small", num_classes=0, binary_act=False, binary_weight=False)
    with pytest.raises(ModelError, match="no binary convolution"):
        pack(real)


def _save_png(path: Path, seed: int, size: int = 20, mode: str = "L") -> None:
    from PIL import Image

    g = torch.Generator().manual_seed(seed)
    arr = torch.randint(0, 256, (size, size + 3), generator=g, dtype=torch.uint8)
    Image.fromarray(arr.numpy(), mode=mode).save(path)


def _make_run(tmp_path: Path) -> Path:
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    kwargs = {"in_chans": 1, "num_classes": 0, "width_mult": 0.25, "mid_blocks": 0}
    model = randomize(build_model("reactnet_small", **kwargs), seed=2)
    config = {"output_dir": str(run), "data": {"name": DATA, "image_size": 12},
              "model": {"name": "reactnet_small"}, "method": {"name": "s2bnn"}}
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    save_checkpoint({"format": "s2bnn", "version": 1, "config": config, "epoch": 1, "step": 1,
                     "finished": True,
                     "backbone": {"name": "reactnet_small", "kwargs": kwargs,
                                  "state_dict": model.state_dict()}},
                    run / "checkpoints" / "last.pt")
    return run


def test_cli_export_head_and_predict(tmp_path, capsys):
    run = _make_run(tmp_path)
    feats = tmp_path / "feats.s2bnn"
    assert main(["export", str(run), "--format", "packed", "--out", str(feats)]) == 0
    capsys.readouterr()
    assert load(feats).meta["output"] == "features"
    img = tmp_path / "a.png"
    _save_png(img, 1)
    _one_line(capsys, main(["predict", str(feats), str(img)]), "no classifier")

    assert main(["eval", "linear", str(run), "--epochs", "2", "--sgd-lrs", "0.1",
                 "--adam-lrs", "1e-3", "--save-head"]) == 0
    capsys.readouterr()
    assert (run / "head.safetensors").is_file()
    net = tmp_path / "net.s2bnn"
    assert main(["export", str(run), "--format", "packed", "--out", str(net)]) == 0
    capsys.readouterr()
    before = net.read_bytes()
    _one_line(capsys, main(["export", str(run), "--format", "packed", "--out", str(net)]),
              "--force")
    assert net.read_bytes() == before  # nothing overwritten

    # The packed file alone: image -> logits of the saved head.
    from s2bnn.deploy.export import build_deploy_model, load_image

    model, _ = build_deploy_model(run)
    packed = load(net)
    x = load_image(img, packed.meta["preprocess"]).unsqueeze(0)
    with torch.no_grad():
        torch.testing.assert_close(packed(x), model(x), rtol=1e-4, atol=1e-4)

    img2 = tmp_path / "b.png"
    _save_png(img2, 2, size=30)
    assert main(["predict", str(net), str(img), str(img2)]) == 0
    out = capsys.readouterr().out
    ranks = [line.split()[0] for line in out.splitlines() if line.startswith("  ")]
    assert ranks == ["1.", "2.", "3.", "4."] * 2 and "a.png" in out  # 4 classes: top-4
    assert main(["predict", str(net), str(img), "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert len(res[0]["top"]) == 4 and res[0]["top"][0]["class"]

    notimg = tmp_path / "notes.png"
    notimg.write_text("not an image")
    _one_line(capsys, main(["predict", str(net), str(notimg)]), "not a readable image")

    real_run = tmp_path / "real"
    (real_run / "checkpoints").mkdir(parents=True)
    kw = {"in_chans": 1, "num_classes": 0, "width_mult": 0.25, "mid_blocks": 0,
          "binary_act": False, "binary_weight": False}
    save_checkpoint({"format": "s2bnn", "version": 1, "epoch": 1, "step": 1,
                     "backbone": {"name": "reactnet_small", "kwargs": kw,
                                  "state_dict": build_model("reactnet_small", **kw).state_dict()}},
                    real_run / "checkpoints" / "last.pt")
    target = tmp_path / "real.s2bnn"
    _one_line(capsys, main(["export", str(real_run), "--format", "packed", "--out",
                            str(target)]), "no binary convolution")
    assert not target.exists()


def test_onnx_matches_pytorch(tmp_path, capsys):
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    run = _make_run(tmp_path)
    out = tmp_path / "net.onnx"
    assert main(["export", str(run), "--format", "onnx", "--out", str(out)]) == 0
    capsys.readouterr()
    from s2bnn.deploy.export import build_deploy_model

    model, _ = build_deploy_model(run)
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    import onnx

    ops = {n.op_type for n in onnx.load(str(out)).graph.node}
    assert "Sign" in ops and "Conv" in ops
    for shape in [(1, 1, 12, 12), (3, 1, 15, 15)]:
        x = torch.randn(*shape)
        got = sess.run(None, {"images": x.numpy()})[0]
        with torch.no_grad():
            ref = model(x)
        torch.testing.assert_close(torch.from_numpy(got), ref, rtol=1e-4, atol=1e-4)
