"""The training spine on a CUDA device. Skipped where torch sees no GPU (CI has none); on a GPU
machine run ``pytest tests/test_cuda.py``. Every check compares the GPU with the CPU or with
an uninterrupted GPU run, so a device-only bug (a tensor left on the CPU, an RNG stream not
checkpointed, a kernel without a CUDA path) fails here."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import assert_identical
from test_demo import TINY, _tree
from test_resume import _crashing_parts

from s2bnn.checkpoint import load_checkpoint
from s2bnn.cli import main
from s2bnn.config import config_from_dict
from s2bnn.engine import train
from s2bnn.models import build_model
from s2bnn.nn import quantizers as Q

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")

DATA = {"name": "synthetic:1:16:48:4"}
STUDENT = {"name": "reactnet_small", "width_mult": 0.125}


def _cfg(out: Path, **over):
    base = {"output_dir": str(out), "epochs": 2, "batch_size": 16, "progress": False,
            "device": "cuda", "log_every": 1, "data": DATA, "model": STUDENT,
            "method": {"name": "mocov2", "queue_size": 32, "momentum": 0.9}}
    return config_from_dict({**base, **over})


def test_quantizers_forward_and_backward_match_the_cpu():
    torch.manual_seed(0)
    x = torch.randn(4, 8, 6, 6, requires_grad=True)
    w = torch.randn(16, 8, 3, 3, requires_grad=True)
    outs = {}
    for dev in ("cpu", "cuda"):
        xd = x.detach().to(dev).requires_grad_()
        wd = w.detach().to(dev).requires_grad_()
        a, s, b = Q.react_sign(xd), Q.ste_sign(xd), Q.scaled_sign(wd)
        for t in (a, s, b):
            (t * torch.linspace(-1, 1, t.numel(), device=dev).view_as(t)).sum().backward()
        outs[dev] = [t.detach().cpu() for t in (a, s, b, xd.grad, wd.grad)]
    for cpu, gpu in zip(outs["cpu"], outs["cuda"]):
        torch.testing.assert_close(gpu, cpu)


def test_binary_student_forward_matches_the_cpu():
    torch.manual_seed(0)
    net = build_model("reactnet_small", num_classes=0, in_chans=1, width_mult=0.25).eval()
    x = torch.randn(8, 1, 28, 28)
    with torch.no_grad():
        cpu = net(x)
        tf32 = torch.backends.cudnn.allow_tf32
        torch.backends.cudnn.allow_tf32 = False  # fp32 on both sides: sign thresholds agree
        try:
            gpu = net.cuda()(x.cuda()).cpu()
        finally:
            torch.backends.cudnn.allow_tf32 = tf32
    # A rounding difference at a sign threshold may flip a bit: compare the bulk, not every value.
    close = torch.isclose(gpu, cpu, rtol=1e-3, atol=1e-3).float().mean()
    assert close > 0.95, f"only {close:.1%} of features agree with the CPU"


def test_bf16_distillation_trains_and_saves_a_cpu_loadable_checkpoint(tmp_path: Path):
    teacher = train(_cfg(tmp_path / "teacher", model={"name": "resnet_small",
                                                      "width_mult": 0.25}))
    run = train(_cfg(tmp_path / "s2bnn", precision="bf16", method={
        "name": "s2bnn", "teacher": {"path": str(teacher), "arch": "resnet_small"}}))
    ckpt = load_checkpoint(run)  # onto the CPU, whatever device wrote it
    assert ckpt["finished"] and ckpt["step"] == 2 * 3
    tensors = [v for v in ckpt["backbone"]["state_dict"].values() if torch.is_tensor(v)]
    assert tensors and all(t.device.type == "cpu" for t in tensors)
    lines = (run / "metrics.csv").read_text().splitlines()
    header, rows = lines[0].split(","), [ln.split(",") for ln in lines[1:]]
    losses = [float(r[header.index("loss")]) for r in rows]
    assert losses and all(torch.isfinite(torch.tensor(losses)))
    cosine = [float(r[header.index("cosine")]) for r in rows if r[header.index("cosine")]]
    assert cosine, "distillation logs the student-teacher cosine on the GPU too"


def test_deterministic_resume_on_the_gpu_is_bit_exact(tmp_path: Path):
    """MoCo v2 with its queue, shuffle BN and batch augmentation drawn on the device: a run
    killed mid-epoch and resumed ends as the uninterrupted run, CUDA RNG included."""
    full, run = tmp_path / "full", tmp_path / "run"
    train(_cfg(full, deterministic=True))
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(_cfg(run, deterministic=True), parts=_crashing_parts(5))
    train(_cfg(run, deterministic=True, resume="auto"))
    a, b = load_checkpoint(full), load_checkpoint(run)
    for key in ("backbone", "method", "optimizer", "scheduler"):
        assert_identical(a[key], b[key], key)


def test_demo_end_to_end_on_the_gpu(tmp_path: Path, capsys):
    data = _tree(tmp_path / "data")
    out = tmp_path / "out"
    assert main(["demo", "--data", str(data), "--out", str(out), *TINY, "device=cuda"]) == 0
    results = json.loads((out / "results.json").read_text())
    by_name = {r["name"]: r for r in results["runs"]}
    # The packed runtime is a CPU runtime: on the GPU the module computes every feature.
    assert {r["features_by"] for r in by_name.values() if "features_by" in r} == {"module"}
    for r in by_name.values():
        assert 0.0 <= r["linear_top1"] <= 100.0
    assert json.loads((out / "demo_config.json").read_text())["device"] == "cuda"
