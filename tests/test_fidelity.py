"""Fidelity to the reference code (szq0214/S2-BNN): which views are distilled, what step 2 loads,
where weight decay goes, SEED's temperatures and when ``precision=auto`` picks bf16."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn as nn
from helpers import TinyNet
from test_engine import one_thread  # noqa: F401  (autouse: one thread per test)

from s2bnn.checkpoint import load_checkpoint, method_state
from s2bnn.config import MethodConfig, load_config
from s2bnn.engine import train
from s2bnn.engine.optim import build_optimizer
from s2bnn.errors import CheckpointError
from s2bnn.methods import S2BNN
from s2bnn.models import build_model


class _CountingTeacher(nn.Module):
    """A frozen linear teacher that counts the images it embeds."""

    def __init__(self, in_chans: int = 1, size: int = 8, dim: int = 4) -> None:
        super().__init__()
        self.proj = nn.Linear(in_chans * size * size, dim)
        self.embed_dim = dim
        self.in_chans = in_chans
        self.seen = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen += x.shape[0]
        return nn.functional.normalize(self.proj(x.flatten(1)), dim=1)


def _views(n: int = 6, k: int = 2) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return [torch.randn(n, 1, 8, 8, generator=gen) for _ in range(k)]


# --------------------------------------------------------------------------- distilled views
@pytest.mark.parametrize("contrastive", [0.0, 1.0])
def test_distill_views_first_uses_the_query_view_only(contrastive: float) -> None:
    """`first` distils views[0] only (reference: images[0]); `all` every view, averaged."""
    views = _views()
    losses = {}
    for mode in ("first", "all"):
        torch.manual_seed(0)
        teacher = _CountingTeacher()
        method = S2BNN(TinyNet(), teacher=teacher, proj_dim=4, distill_views=mode,
                       contrastive_weight=contrastive, queue_len=12).train()
        loss, logs = method(views)
        assert teacher.seen == (6 if mode == "first" else 12)
        losses[mode] = logs["loss_distill"]
        if mode == "first":
            # The distillation term is exactly the first view's soft cross-entropy.
            from s2bnn.losses import soft_cross_entropy
            s = method._student(views[0])
            t = teacher(views[0])
            assert torch.allclose(logs["loss_distill"], soft_cross_entropy(s, t, 0.2), atol=1e-6)
        if contrastive:
            assert "loss_contrastive" in logs
    assert not torch.allclose(losses["first"], losses["all"])


def test_distill_views_rejects_unknown() -> None:
    with pytest.raises(ValueError, match="distill_views"):
        S2BNN(TinyNet(), teacher=_CountingTeacher(), proj_dim=4, distill_views="second")


# --------------------------------------------------------------------------- step 2 loads
def _run(out: Path, *extra: str) -> dict:
    cfg = load_config(None, [
        f"output_dir={out}", "data.name=synthetic:1:16:64:4", "batch_size=16", "max_steps=2",
        "device=cpu", "progress=false", "log_every=1", "model.name=reactnet_small",
        "model.width_mult=0.125", "method.name=mocov2", "method.queue_size=32",
        "method.proj_dim=8", "data.augment.num_views=2", *extra,
    ])
    train(cfg)
    return load_checkpoint(out)


def test_init_scope_model_loads_head_key_encoder_and_queue(tmp_path: Path) -> None:
    """Step 2 with init_scope=model starts from the whole step-1 model, as the reference's
    `model.load_state_dict(checkpoint['state_dict'])`; init_scope=backbone keeps a fresh head."""
    s1 = method_state(_run(tmp_path / "s1", "model.binary_weight=false"))
    # lr 0: the weights a step-2 run ends with are the ones it started from.
    common = ["model.binary_weight=true", f"model.init_from={tmp_path / 's1'}", "optim.lr=0"]
    full = method_state(_run(tmp_path / "full", *common, "model.init_scope=model", "max_steps=1"))
    fresh = method_state(_run(tmp_path / "fresh", *common, "max_steps=1"))
    for key in ("head.0.weight", "head.2.bias", "backbone.stem.0.weight"):
        assert torch.equal(full[key], s1[key]), key
    assert not torch.equal(fresh["head.0.weight"], s1["head.0.weight"])
    assert torch.equal(fresh["backbone.stem.0.weight"], s1["backbone.stem.0.weight"])
    # Key encoder: step 1's, moved by one momentum step towards the (equal) query encoder.
    key = "moco.key_head.0.weight"
    assert torch.allclose(full[key], s1[key], atol=1e-2 * s1[key].abs().max().item())
    assert not torch.equal(full[key], s1["head.0.weight"])
    # Queue: step 1's, with one batch of 16 new keys written at step 1's pointer.
    ptr = int(s1["moco.queue.ptr"])
    kept = [i for i in range(32) if not ptr <= i < ptr + 16]
    assert torch.equal(full["moco.queue.keys"][kept], s1["moco.queue.keys"][kept])
    assert not torch.equal(fresh["moco.queue.keys"][kept], s1["moco.queue.keys"][kept])


def test_init_scope_model_needs_a_head(tmp_path: Path) -> None:
    from s2bnn.checkpoint import save_checkpoint

    ckpt = _run(tmp_path / "s1", "model.binary_weight=false")
    ckpt["method"] = {k: v for k, v in ckpt["method"].items() if not k.startswith("head.")}
    bad = tmp_path / "nohead.pt"
    save_checkpoint(ckpt, bad)
    with pytest.raises(CheckpointError, match="no projection head"):
        _run(tmp_path / "s2", f"model.init_from={bad}", "model.init_scope=model")


# --------------------------------------------------------------------------- weight decay
def test_weight_decay_reaches_every_parameter_when_exclusions_are_off() -> None:
    """MoCo v2 and the reference's Adam decay every parameter: binary latent weights, BN, biases,
    RSign thresholds and RPReLU included, once exclude_bn_bias/exclude_binary are off."""
    model = build_model("reactnet_small", width_mult=0.125)
    n_params = len(list(model.parameters()))
    opt = build_optimizer(model, "adam", 1e-3, weight_decay=1e-4, exclude_bn_bias=False,
                          exclude_binary=False)
    decayed = [p for g in opt.param_groups if g["weight_decay"] == 1e-4 for p in g["params"]]
    assert len(decayed) == n_params
    opt = build_optimizer(model, "adam", 1e-3, weight_decay=1e-4, exclude_bn_bias=True,
                          exclude_binary=True)
    decayed = [p for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]]
    assert 0 < len(decayed) < n_params


# --------------------------------------------------------------------------- SEED
def test_seed_temperatures_are_the_official_defaults() -> None:
    """jacobswan1/SEED tools/opts.py: --temp 0.2 (student), --distill-t 1e-4 (teacher)."""
    cfg = MethodConfig()
    assert (cfg.seed_student_temp, cfg.seed_teacher_temp) == (0.2, 1e-4)
    from s2bnn.methods import SEED

    method = SEED(TinyNet(), teacher=_CountingTeacher(), proj_dim=4, queue_len=8)
    assert (method.student_temp, method.teacher_temp) == (0.2, 1e-4)


# --------------------------------------------------------------------------- loss parity
def _unit(n: int, d: int, seed: int) -> torch.Tensor:
    return nn.functional.normalize(
        torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64),
        dim=1)


def test_soft_cross_entropy_is_the_reference_distribution_loss() -> None:
    """S2-BNN extensions/kd_loss.py DistributionLoss(student / moco_t, teacher / moco_t): the
    batch mean of -softmax(teacher) . log_softmax(student), computed there as a batched matrix
    product; gradients agree as well."""
    from s2bnn.losses import soft_cross_entropy

    s = _unit(5, 16, 0).requires_grad_(True)
    s_ref = s.detach().clone().requires_grad_(True)
    t = _unit(5, 16, 1)
    tau = 0.2
    ours = soft_cross_entropy(s, t, tau)
    p = torch.softmax(t / tau, dim=1).unsqueeze(1)                  # N x 1 x C
    log_q = torch.log_softmax(s_ref / tau, dim=1).unsqueeze(2)      # N x C x 1
    ref = (-torch.bmm(p, log_q)).mean()
    assert torch.allclose(ours.double(), ref, atol=1e-12)
    ours.backward()
    ref.backward()
    assert torch.allclose(s.grad, s_ref.grad, atol=1e-12)


def test_info_nce_is_moco_cross_entropy() -> None:
    """moco/builder.py: logits cat([q.k, q.queue]) / T, CrossEntropy with label 0."""
    from s2bnn.losses import info_nce

    q, k, queue = _unit(6, 8, 2), _unit(6, 8, 3), _unit(10, 8, 4)
    logits = torch.cat([(q * k).sum(1, keepdim=True), q @ queue.t()], dim=1) / 0.2
    ref = nn.functional.cross_entropy(logits, torch.zeros(6, dtype=torch.long))
    assert torch.allclose(info_nce(q, k, queue, 0.2).double(), ref, atol=1e-12)


def test_seed_loss_is_the_official_seed_loss() -> None:
    """jacobswan1/SEED seed/builder.py + tools/utils.py soft_cross_entropy: student logits
    cat([s.t, s.queue]) / t_s, teacher softmax(cat([t.t, t.queue]) / t_t), summed and divided by
    the batch size."""
    from s2bnn.losses import seed_loss

    s, t, queue = _unit(4, 8, 5), _unit(4, 8, 6), _unit(12, 8, 7)
    for ts, tt in ((0.2, 1e-4), (0.2, 0.07)):
        ls = torch.cat([(s * t).sum(1, keepdim=True), s @ queue.t()], dim=1) / ts
        lt = torch.softmax(torch.cat([(t * t).sum(1, keepdim=True), t @ queue.t()], 1) / tt, 1)
        ref = -(lt * torch.log_softmax(ls, 1)).sum() / s.shape[0]
        assert torch.allclose(seed_loss(s, t, queue, ts, tt).double(), ref, atol=1e-10)


# --------------------------------------------------------------------------- precision=auto
@pytest.mark.parametrize("flags, bf16", [
    ({"avx2", "fma"}, False),                      # this kind of machine: bf16 emulated
    ({"avx512f", "avx512_bf16"}, True),            # Cooper Lake / Zen 4
    ({"avx512f", "amx_bf16", "amx_tile"}, True),   # Sapphire Rapids
    (set(), False),
])
def test_auto_precision_uses_bf16_only_where_the_cpu_has_it(flags: set, bf16: bool) -> None:
    from s2bnn.devices import autocast_context

    factory = autocast_context("auto", torch.device("cpu"), cpu_flags=flags)
    with factory():
        y = torch.ones(2, 2) @ torch.ones(2, 2)
    assert (y.dtype == torch.bfloat16) is bf16
    with autocast_context("fp32", torch.device("cpu"), cpu_flags=flags)():
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32
