"""Methods: each trains on synthetic data and its loss goes down; state survives a state_dict
round trip; frozen parts stay frozen; DDP bookkeeping names exist; bad configs fail early.

The student and teacher backbones are a tiny CNN defined here (patched into the registry per
test where a builder name is needed), so these tests do not depend on ``s2bnn.models``.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from helpers import TinyNet

from s2bnn.checkpoint import save_checkpoint
from s2bnn.config import MethodConfig, TeacherConfig
from s2bnn.errors import CheckpointError, ConfigError
from s2bnn.losses import seed_loss
from s2bnn.methods import DINO, S2BNN, SEED, MoCoV2, build_method, views_needed
from s2bnn.methods.base import KeyQueue, queue_length
from s2bnn.methods.dino import cosine_momentum
from s2bnn.methods.mocov2 import MomentumContrast
from s2bnn.models.registry import _REGISTRY

DIM = 32  # projection dimension in these tests
N_IMAGES, BATCH = 128, 32


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> object:
    """Tiny tensors: thread start-up costs more than it saves (and the cores are shared)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def registry(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(_REGISTRY, "tiny_test_net", TinyNet)


def _save_teacher(run: Path, seed: int, dim: int = DIM) -> Path:
    torch.manual_seed(seed)
    backbone = TinyNet(in_chans=1, width=8)
    head = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, dim))
    save_checkpoint({
        "format": "s2bnn", "version": 1, "config": {}, "epoch": 1, "step": 1,
        "backbone": {"name": "tiny_test_net", "kwargs": {"in_chans": 1, "width": 8},
                     "state_dict": backbone.state_dict()},
        "method": {f"head.{k}": v for k, v in head.state_dict().items()},
    }, run / "checkpoints" / "last.pt")
    return run


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run dir in this project's checkpoint layout holding a random tiny teacher, and in its
    ``second/`` another one (another seed) for the multi-teacher cases."""
    run = _save_teacher(tmp_path_factory.mktemp("teacher_run"), 123)
    _save_teacher(run / "second", 456)
    return run


def _data() -> list[list[torch.Tensor]]:
    """Fixed batches of two fixed views of smooth random 1x16x16 images."""
    gen = torch.Generator().manual_seed(0)
    images = F.interpolate(torch.randn(N_IMAGES, 1, 4, 4, generator=gen), size=16,
                           mode="bilinear", align_corners=False)
    v0 = images + 0.1 * torch.randn(images.shape, generator=gen)
    v1 = images.flip(-1) + 0.1 * torch.randn(images.shape, generator=gen)
    return [[a, b] for a, b in zip(v0.split(BATCH), v1.split(BATCH))]


def _cfg(name: str, **kw: object) -> MethodConfig:
    teacher = kw.pop("teacher", TeacherConfig())
    kw.setdefault("proj_dim", DIM)
    return MethodConfig(name=name, queue_size=N_IMAGES, teacher=teacher,
                        **kw)  # type: ignore[arg-type]


def _teacher_cfg(run: Path | None, **kw: object) -> TeacherConfig:
    path = str(run) if run is not None else None
    return TeacherConfig(path=path, arch="tiny_test_net", **kw)  # type: ignore[arg-type]


def _build(cfg: MethodConfig, seed: int = 0, total_steps: int = 100):  # type: ignore[no-untyped-def]
    torch.manual_seed(seed)
    return build_method(cfg, TinyNet(), num_train=N_IMAGES, total_steps=total_steps, in_chans=1)


def _epoch_losses(method: nn.Module, epochs: int, lr: float = 3e-3) -> list[float]:
    """Mean loss per pass over the fixed batches, after one gradient-free pass that fills queues."""
    batches = _data()
    method.train()
    with torch.no_grad():
        for views in batches:
            method(views)
            method.on_train_step_end(0, 1000)
    opt = torch.optim.Adam([p for p in method.parameters() if p.requires_grad], lr=lr)
    out, step = [], 0
    for _ in range(epochs):
        total = 0.0
        for views in batches:
            loss, logs = method(views)
            assert all(not v.requires_grad and v.dim() == 0 for v in logs.values())
            opt.zero_grad()
            loss.backward()
            opt.step()
            step += 1
            method.on_train_step_end(step, epochs * len(batches))
            total += loss.item()
        out.append(total / len(batches))
    return out


CASES = {
    "mocov2": lambda run: _cfg("mocov2", momentum=0.99),
    "mocov2_symmetric": lambda run: _cfg("mocov2", momentum=0.99, symmetric=True),
    "s2bnn": lambda run: _cfg("s2bnn", teacher=_teacher_cfg(run)),
    "s2bnn_contrastive": lambda run: _cfg("s2bnn", teacher=_teacher_cfg(run),
                                          contrastive_weight=1.0, momentum=0.99),
    "s2bnn_online": lambda run: _cfg("s2bnn", teacher=_teacher_cfg(None, kind="online"),
                                     momentum=0.99),
    "s2bnn_teachers": lambda run: _cfg("s2bnn", teacher=_teacher_cfg(
        run, extra_paths=[str(run / "second")] if run else [])),
    "s2bnn_linear_head": lambda run: _cfg("s2bnn", teacher=_teacher_cfg(run), proj_hidden_dim=0),
    # The demo's target: the teacher's pooled features (TinyNet width 8: 16-d), batch-centred.
    "s2bnn_centred_features": lambda run: _cfg("s2bnn", proj_dim=16, teacher=_teacher_cfg(
        run, head="none", center=True)),
    "seed": lambda run: _cfg("seed", teacher=_teacher_cfg(run)),
    "dino": lambda run: _cfg("dino", dino_out_dim=64, ema_momentum=0.99,
                             dino_center_momentum=0.99),
}
# DINO on 128 tiny random images drifts towards the uniform output (loss -> log 64) at small
# learning rates; a faster student and a slower centre keep it in the regime where it learns.
LR = {"dino": 1e-2}


@pytest.mark.parametrize("case", sorted(CASES))
def test_loss_goes_down(case: str, registry: None, teacher_run: Path) -> None:
    method = _build(CASES[case](teacher_run))
    losses = _epoch_losses(method, epochs=6, lr=LR.get(case, 3e-3))
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0], losses


def test_distillation_raises_student_teacher_cosine(registry: None, teacher_run: Path) -> None:
    method = _build(CASES["s2bnn"](teacher_run))
    views = _data()[0]
    before = method(views)[1]["cosine"].item()
    _epoch_losses(method, epochs=4)
    assert method(views)[1]["cosine"].item() > before


def test_centred_teacher_targets_reach_the_loss(registry: None, teacher_run: Path) -> None:
    method = _build(CASES["s2bnn_centred_features"](teacher_run))
    teacher = method.teacher
    assert teacher.center and teacher.embed_dim == 16
    x = _data()[0][0]
    with torch.no_grad():
        feats = teacher.backbone(x).float()
    # Pooled ReLU features are all positive; the target is them minus the batch's mean.
    assert (feats >= 0).all()
    torch.testing.assert_close(teacher(x), F.normalize(feats - feats.mean(0), dim=1))
    plain = _build(_cfg("s2bnn", proj_dim=16, teacher=_teacher_cfg(teacher_run, head="none")))
    torch.testing.assert_close(plain.teacher(x), F.normalize(feats, dim=1))


def test_method_types_and_submodules(registry: None, teacher_run: Path) -> None:
    assert isinstance(_build(CASES["mocov2"](teacher_run)), MoCoV2)
    s2 = _build(CASES["s2bnn"](teacher_run))
    assert isinstance(s2, S2BNN) and s2.moco is None  # no key encoder/queue without the term
    s2c = _build(CASES["s2bnn_contrastive"](teacher_run))
    assert isinstance(s2c.moco, MomentumContrast) and s2c.moco.queue.keys.shape == (128, DIM)
    assert isinstance(_build(CASES["seed"](teacher_run)), SEED)
    assert isinstance(_build(CASES["dino"](teacher_run)), DINO)


def test_frozen_teacher_stays_frozen_and_gets_no_grad(registry: None, teacher_run: Path) -> None:
    method = _build(CASES["s2bnn_contrastive"](teacher_run))
    method.train()
    assert method.training and method.backbone.training
    assert not method.teacher.training
    assert not any(m.training for m in method.teacher.modules())
    assert method.moco.key_backbone.training  # key encoder: batch statistics, like MoCo
    before = {k: v.clone() for k, v in method.teacher.state_dict().items()}
    loss, _ = method(_data()[0])
    loss.backward()
    assert all(p.grad is None and not p.requires_grad for p in method.teacher.parameters())
    assert all(p.grad is None for p in method.moco.parameters())
    assert any(p.grad is not None for p in method.backbone.parameters())
    for k, v in method.teacher.state_dict().items():  # BN running stats untouched too
        torch.testing.assert_close(v, before[k])


@pytest.mark.parametrize("case", ["mocov2", "s2bnn_contrastive", "s2bnn_online",
                                  "s2bnn_teachers", "seed", "dino"])
def test_ddp_ignored_names(case: str, registry: None, teacher_run: Path) -> None:
    method = _build(CASES[case](teacher_run))
    names = set(method.ddp_ignored_names())
    all_names = {n for n, _ in method.named_parameters()} | {n for n, _ in method.named_buffers()}
    assert names and names <= all_names
    assert not any(n.startswith(("backbone.", "head.", "dino_head.")) for n in names)
    # Every parameter the optimiser trains is left to DDP; every frozen one is ignored.
    for n, p in method.named_parameters():
        assert (n in names) == (not p.requires_grad), n


@pytest.mark.parametrize("case", ["mocov2", "s2bnn_contrastive", "s2bnn_online", "seed", "dino"])
def test_state_dict_round_trip(case: str, registry: None, teacher_run: Path) -> None:
    method = _build(CASES[case](teacher_run), seed=0)
    _epoch_losses(method, epochs=1)
    state = {k: v.clone() for k, v in method.state_dict().items()}
    fresh = _build(CASES[case](teacher_run), seed=1)
    fresh.load_state_dict(state)
    for k, v in fresh.state_dict().items():
        assert torch.equal(v, state[k]), k
    # Training state that must survive: queues and their pointers, EMA weights, the centre.
    moved = [k for k in state if k.endswith(("queue.keys", "queue.ptr", "center", "steps_done"))
             or ".key_backbone." in k or k.startswith("ema_")]
    assert moved
    # The same next step from both: identical loss and identical state afterwards.
    views = _data()[1]
    for m in (method, fresh):
        m.train()
    loss_a, _ = method(views)
    loss_b, _ = fresh(views)
    assert loss_a.item() == loss_b.item()
    method.on_train_step_end(5, 10)
    fresh.on_train_step_end(5, 10)
    for (k, a), b in zip(method.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(a, b), k


@pytest.mark.parametrize("case", ["s2bnn", "s2bnn_contrastive", "s2bnn_teachers", "seed"])
def test_training_state_leaves_the_offline_teacher_out(
    case: str, registry: None, teacher_run: Path
) -> None:
    method = _build(CASES[case](teacher_run), seed=0)
    _epoch_losses(method, epochs=1)
    state = method.training_state()
    assert not [k for k in state if k.startswith("teacher.")]
    assert set(state) == {k for k in method.state_dict() if not k.startswith("teacher.")}
    fresh = _build(CASES[case](teacher_run), seed=1)
    fresh.load_training_state(state)
    assert fresh.frozen_fingerprint() == method.frozen_fingerprint() is not None
    for k, v in method.state_dict().items():
        assert torch.equal(v, fresh.state_dict()[k]), k
    # A checkpoint written before this change held the teacher too: still accepted.
    fresh.load_training_state(method.state_dict())
    with pytest.raises(RuntimeError, match="missing keys"):
        fresh.load_training_state({k: v for k, v in state.items() if k.startswith("head.")})
    with pytest.raises(RuntimeError, match="unexpected keys"):
        fresh.load_training_state({**state, "bogus.weight": torch.zeros(1)})
    # Another teacher gives another fingerprint.
    with torch.no_grad():
        next(fresh.teacher.parameters()).add_(1e-3)
    assert fresh.frozen_fingerprint() != method.frozen_fingerprint()


def test_methods_without_a_frozen_teacher_checkpoint_everything(
    registry: None, teacher_run: Path
) -> None:
    for case in ("mocov2", "s2bnn_online", "dino"):
        method = _build(CASES[case](teacher_run))
        assert set(method.training_state()) == set(method.state_dict())
        assert method.frozen_fingerprint() is None


def test_views_needed() -> None:
    assert [views_needed(CASES[c](None)) for c in sorted(CASES)] == [
        # dino mocov2 mocov2_symmetric s2bnn s2bnn_centred_features s2bnn_contrastive
        # s2bnn_linear_head s2bnn_online s2bnn_teachers seed
        2, 2, 2, 1, 1, 2, 1, 2, 1, 1]


def test_queue_is_updated_after_the_step(registry: None, teacher_run: Path) -> None:
    method = _build(CASES["mocov2"](teacher_run))
    before = method.moco.queue.keys.clone()
    views = _data()[0]
    method.train()
    method(views)
    torch.testing.assert_close(method.moco.queue.keys, before)  # forward alone changes nothing
    method.on_train_step_end(1, 10)
    assert int(method.moco.queue.ptr) == BATCH
    assert not torch.equal(method.moco.queue.keys[:BATCH], before[:BATCH])
    torch.testing.assert_close(method.moco.queue.keys[BATCH:], before[BATCH:])


def test_symmetric_moco_is_the_mean_of_both_directions_and_queues_both_keys(
        registry: None, teacher_run: Path) -> None:
    from s2bnn.losses import info_nce

    sym = _build(CASES["mocov2_symmetric"](teacher_run))
    one_way = _build(CASES["mocov2"](teacher_run))  # same seed: the same weights and queue
    v0, v1 = _data()[0]
    for m in (sym, one_way):
        m.train()
    loss, _ = sym([v0, v1])
    with torch.no_grad():  # the two directions, recomputed with the one-way method
        q0 = one_way.moco.query(one_way.backbone, one_way.head, v0)
        q1 = one_way.moco.query(one_way.backbone, one_way.head, v1)
        k0 = one_way.moco.keys(v0, one_way.backbone, one_way.head)
        k1 = one_way.moco.keys(v1, one_way.backbone, one_way.head)
        queue = one_way.moco.queue.keys
        expected = 0.5 * (info_nce(q0, k1, queue, 0.2) + info_nce(q1, k0, queue, 0.2))
        plain, _ = one_way([v0, v1])
    torch.testing.assert_close(loss.detach(), expected, rtol=1e-5, atol=1e-6)
    assert abs(float(loss.detach()) - float(plain)) > 1e-4  # not the one-way loss
    sym.on_train_step_end(1, 10)
    assert int(sym.moco.queue.ptr) == 2 * BATCH
    torch.testing.assert_close(sym.moco.queue.keys[:BATCH], k0)
    torch.testing.assert_close(sym.moco.queue.keys[BATCH:2 * BATCH], k1)


@pytest.mark.parametrize("symmetric", [False, True])
def test_moco_extra_views_are_queries_only(
        symmetric: bool, registry: None, teacher_run: Path) -> None:
    """Views after the first two (multi-crop's small crops) are queries against the full views'
    keys; the loss is the mean over all query-key pairs and only full views' keys are queued."""
    from s2bnn.losses import info_nce

    case = "mocov2_symmetric" if symmetric else "mocov2"
    multi, ref = _build(CASES[case](teacher_run)), _build(CASES[case](teacher_run))
    v0, v1 = _data()[0]
    small = [F.interpolate(v, size=8, mode="bilinear", align_corners=False) for v in (v0, v1)]
    for m in (multi, ref):
        m.train()
    loss, _ = multi([v0, v1, *small])
    with torch.no_grad():
        mc = ref.moco
        q0, q1 = (mc.query(ref.backbone, ref.head, v) for v in (v0, v1))
        k0, k1 = (mc.keys(v, ref.backbone, ref.head) for v in (v0, v1))
        extra = [mc.query(ref.backbone, ref.head, v) for v in small]
        pairs = [(q0, k1), (q1, k0)] if symmetric else [(q0, k1)]
        pairs += [(e, k) for e in extra for k in ((k0, k1) if symmetric else (k1,))]
        terms = [info_nce(q, k, mc.queue.keys, 0.2) for q, k in pairs]
        expected = sum(terms) / len(terms)
        plain, _ = ref([v0, v1])
    torch.testing.assert_close(loss.detach(), expected, rtol=1e-5, atol=1e-6)
    assert abs(float(loss.detach()) - float(plain)) > 1e-4  # the small crops count
    multi.on_train_step_end(1, 10)
    assert int(multi.moco.queue.ptr) == (2 if symmetric else 1) * BATCH


def test_shuffled_keys_are_unshuffled() -> None:
    """Without BatchNorm, shuffle-BN must not change any key: row i is still image i's key."""
    backbone = TinyNet(bn=False)
    head = nn.Linear(16, 8)
    mc = MomentumContrast(backbone, head, queue_len=16, dim=8, temperature=0.2, momentum=0.9,
                          shuffle=True, groups=4)
    x = torch.randn(16, 1, 16, 16)
    with torch.no_grad():
        plain = F.normalize(head(backbone(x)), dim=1)
        torch.testing.assert_close(mc.keys(x, backbone, head), plain)
        torch.testing.assert_close(mc.query(backbone, head, x), plain)


def test_shuffle_bn_groups_use_their_own_statistics() -> None:
    backbone = TinyNet()
    head = nn.Linear(16, 8)
    kw = dict(queue_len=16, dim=8, temperature=0.2, momentum=0.9)
    grouped = MomentumContrast(backbone, head, shuffle=True, groups=2, **kw)
    plain = MomentumContrast(backbone, head, shuffle=False, groups=2, **kw)
    x = torch.randn(16, 1, 16, 16)
    with torch.no_grad():
        q_grouped = grouped.query(backbone, head, x)
        q_plain = plain.query(backbone, head, x)
        first_half = F.normalize(head(backbone(x[:8])), dim=1)
    torch.testing.assert_close(q_grouped[:8], first_half)
    assert not torch.allclose(q_grouped, q_plain)


def test_key_queue_wraps_around() -> None:
    q = KeyQueue(5, 2)
    q.push(torch.ones(3, 2))
    q.push(2 * torch.ones(3, 2))
    assert int(q.ptr) == 1
    assert q.keys[:, 0].tolist() == [2.0, 1.0, 1.0, 2.0, 2.0]
    q.push(3 * torch.ones(7, 2))  # more keys than slots: the newest 5 fill the queue
    assert q.keys[:, 0].tolist() == [3.0] * 5


def test_queue_length() -> None:
    assert queue_length(65536, 60000) == 59904  # clipped, multiple of 256
    assert queue_length(65536, 1_281_167) == 65536
    assert queue_length(4096, 100) == 100
    assert queue_length(1000, 5000) == 768


def test_dino_schedules_and_centre(registry: None, teacher_run: Path) -> None:
    assert cosine_momentum(0.996, 0, 100) == pytest.approx(0.996)
    assert cosine_momentum(0.996, 100, 100) == pytest.approx(1.0)
    assert 0.996 < cosine_momentum(0.996, 50, 100) < 1.0
    cfg = _cfg("dino", dino_out_dim=64, dino_warmup_teacher_temp=0.02, dino_teacher_temp=0.06,
               dino_warmup_teacher_temp_frac=0.5)
    method = _build(cfg, total_steps=100)
    assert method.teacher_temp_at(0) == pytest.approx(0.02)
    assert method.teacher_temp_at(25) == pytest.approx(0.04)
    assert method.teacher_temp_at(80) == pytest.approx(0.06)
    method.train()
    method(_data()[0])
    assert torch.count_nonzero(method.center) == 0
    method.on_train_step_end(1, 100)
    assert torch.count_nonzero(method.center) > 0 and int(method.steps_done) == 1


def test_dino_multicrop_teacher_sees_global_views_only(registry: None) -> None:
    method = _build(_cfg("dino", dino_out_dim=64))
    seen: list[tuple[int, ...]] = []
    method.ema_backbone.register_forward_hook(lambda m, i, o: seen.append(tuple(i[0].shape)))
    g = torch.randn(4, 1, 16, 16)
    local = torch.randn(4, 1, 8, 8)
    loss, _ = method.train()([g, g + 0.1, local, local + 0.1])
    loss.backward()
    assert seen == [(8, 1, 16, 16)]


def test_two_view_distillation_averages_views(registry: None, teacher_run: Path) -> None:
    method = _build(CASES["s2bnn"](teacher_run)).eval()  # eval: batch-independent outputs
    a, b = _data()[0]
    loss_a = method([a])[0]
    loss_b = method([b])[0]
    loss_ab = method([a, b])[0]
    assert loss_ab.item() == pytest.approx((loss_a.item() + loss_b.item()) / 2, rel=1e-6)


def test_mix_pairs_is_a_per_image_convex_combination() -> None:
    from s2bnn.methods.base import mix_pairs, sample_mixup

    x = torch.arange(4.0).view(4, 1, 1, 1).expand(4, 1, 2, 2)
    perm = torch.tensor([1, 2, 3, 0])
    lam = torch.tensor([1.0, 0.0, 0.25, 0.5])
    mixed = mix_pairs(x, lam, perm)
    assert mixed[:, 0, 0, 0].tolist() == [0.0, 2.0, 0.25 * 2 + 0.75 * 3, 0.5 * 3 + 0.5 * 0]
    torch.manual_seed(0)
    lam, perm = sample_mixup(1000, 0.4, torch.device("cpu"))
    assert lam.shape == (1000,) and bool(((lam >= 0) & (lam <= 1)).all())
    assert sorted(perm.tolist()) == list(range(1000))
    # Beta(0.4, 0.4) is U-shaped: most weights near 0 or 1; Beta(1, 1) is uniform.
    assert ((lam < 0.1) | (lam > 0.9)).float().mean() > 0.4
    lam1, _ = sample_mixup(1000, 1.0, torch.device("cpu"))
    assert ((lam1 < 0.1) | (lam1 > 0.9)).float().mean() < 0.3


def test_mixup_distils_the_same_mixed_view_and_only_in_training(
        registry: None, teacher_run: Path) -> None:
    method = _build(_cfg("s2bnn", teacher=_teacher_cfg(teacher_run), mixup_alpha=1.0))
    seen: dict[str, list[torch.Tensor]] = {"teacher": [], "student": []}
    method.teacher.register_forward_pre_hook(lambda m, a: seen["teacher"].append(a[0].clone()))
    method.backbone.register_forward_pre_hook(lambda m, a: seen["student"].append(a[0].clone()))
    from s2bnn.methods.base import mix_pairs, sample_mixup

    view = _data()[0][0]
    method.train()
    torch.manual_seed(5)
    method([view])
    torch.manual_seed(5)  # mixing is the first draw of the step
    expected = mix_pairs(view, *sample_mixup(len(view), 1.0, view.device))
    assert torch.equal(seen["teacher"][-1], expected)
    assert torch.equal(seen["student"][-1], expected)  # the teacher labels the student's input
    assert not torch.allclose(expected, view)
    method.eval()
    method([view])
    assert torch.equal(seen["teacher"][-1], view) and torch.equal(seen["student"][-1], view)
    base = _build(_cfg("s2bnn", teacher=_teacher_cfg(teacher_run))).train()
    base.backbone.register_forward_pre_hook(lambda m, a: seen["student"].append(a[0].clone()))
    base([view])
    assert torch.equal(seen["student"][-1], view)  # off by default


def test_errors(registry: None, teacher_run: Path) -> None:
    with pytest.raises(ConfigError, match="unknown method 'simclr'"):
        _build(_cfg("simclr"))
    with pytest.raises(ConfigError, match="needs a teacher"):
        _build(_cfg("s2bnn"))
    with pytest.raises(ConfigError, match="needs a teacher"):
        _build(_cfg("seed"))
    with pytest.raises(ConfigError, match="1-channel images but the data has 3"):
        torch.manual_seed(0)
        build_method(CASES["s2bnn"](teacher_run), TinyNet(in_chans=3), num_train=10,
                     total_steps=10, in_chans=3)
    with pytest.raises(ConfigError, match="set method.proj_dim=32"):
        _build(MethodConfig(name="s2bnn", proj_dim=128, teacher=_teacher_cfg(teacher_run)))
    with pytest.raises(ConfigError, match="offline teacher only"):
        _build(_cfg("seed", teacher=_teacher_cfg(teacher_run, kind="online")))
    method = _build(CASES["s2bnn_contrastive"](teacher_run))
    with pytest.raises(ConfigError, match="num_views=2"):
        method([_data()[0][0]])
    with pytest.raises(ConfigError, match="momentum"):
        _build(_cfg("mocov2", momentum=1.5))
    with pytest.raises(ConfigError, match="mixup_alpha > 0 needs method.contrastive_weight 0"):
        _build(_cfg("s2bnn", teacher=_teacher_cfg(teacher_run), mixup_alpha=1.0,
                    contrastive_weight=1.0))
    with pytest.raises(ConfigError, match="mixup_alpha > 0 needs"):
        _build(_cfg("s2bnn", teacher=_teacher_cfg(None, kind="online"), mixup_alpha=1.0))


def test_seed_closes_the_gap_to_the_teacher(registry: None, teacher_run: Path) -> None:
    """SEED's loss is floored by the teacher's entropy (near log(K+1) for a random teacher), so
    check the gap to that floor, KL(p_T || p_S), which is what the student can reduce."""
    # Trained at the teacher temperature the gap is measured at (the default is the official
    # code's 1e-4, whose near one-hot targets this 0.07 gap does not follow).
    method = _build(_cfg("seed", teacher=_teacher_cfg(teacher_run), seed_teacher_temp=0.07))

    def kl() -> float:
        method.eval()
        with torch.no_grad():
            views = _data()[0]
            t = method.teacher(views[0])
            s = F.normalize(method.head(method.backbone(views[0])), dim=1)
            q = method.queue.keys
            gap = seed_loss(s, t, q, 0.2, 0.07) - seed_loss(t, t, q, 0.07, 0.07)
        method.train()
        return gap.item()

    _epoch_losses(method, epochs=0)  # fill the queue
    before = kl()
    _epoch_losses(method, epochs=4)
    assert kl() < 0.5 * before


def test_several_teachers_one_head_block_each(registry: None, teacher_run: Path) -> None:
    """method.teacher.extra_paths: the targets are both teachers' embeddings side by side, the
    student has one unit block per teacher, the loss is the mean of the paper's loss over the
    blocks, and training brings the student closer to each teacher."""
    from s2bnn.teachers import TeacherEnsemble, load_teacher

    method = _build(CASES["s2bnn_teachers"](teacher_run))
    assert isinstance(method.teacher, TeacherEnsemble) and method.members == 2
    assert method.head[-1].out_features == 2 * DIM
    x = _data()[0][0]
    alone = [load_teacher(p, "tiny_test_net") for p in (teacher_run, teacher_run / "second")]
    target = method.teacher(x)
    torch.testing.assert_close(target, torch.cat([t(x) for t in alone], 1))
    assert not torch.allclose(target[:, :DIM], target[:, DIM:])  # two different teachers
    _check_block_distillation(method, x, (DIM, DIM))


def _check_block_distillation(method: nn.Module, x: torch.Tensor, sizes: tuple[int, ...],
                              each: bool = True, epochs: int = 4) -> None:
    """The student gives one unit block per target block, the loss is the paper's loss per block
    averaged over the blocks, the logged cosine is the blocks' mean, and ``epochs`` of training
    lower the loss and raise the cosine of every block (``each``) or their mean."""
    from s2bnn.losses import soft_cross_entropy

    def blocks() -> list[tuple[torch.Tensor, torch.Tensor]]:
        with torch.no_grad():
            s, t = method._student(x), method.teacher(x)
        for b in s.split(sizes, 1):
            torch.testing.assert_close(b.norm(dim=1), torch.ones(len(x)))
        return list(zip(s.split(sizes, 1), t.split(sizes, 1)))

    method.eval()
    loss, logs = method([x])
    paper = [soft_cross_entropy(s, t, method.temperature) for s, t in blocks()]
    torch.testing.assert_close(loss, torch.stack(paper).mean())
    cosines = [(s * t).sum(1).mean() for s, t in blocks()]
    torch.testing.assert_close(logs["cosine"], torch.stack(cosines).mean())
    losses = _epoch_losses(method, epochs=epochs)
    assert losses[-1] < losses[0], losses
    method.eval()
    after = [(s * t).sum(1).mean() for s, t in blocks()]
    if each:
        assert all(a > b for a, b in zip(after, cosines)), (cosines, after)
    else:
        assert sum(after) > sum(cosines), (cosines, after)


def test_several_teachers_errors(registry: None, teacher_run: Path, tmp_path: Path) -> None:
    extra = [str(teacher_run / "second")]
    with pytest.raises(ConfigError, match="extra_paths .*needs method.contrastive_weight 0"):
        _build(_cfg("s2bnn", teacher=_teacher_cfg(teacher_run, extra_paths=extra),
                    contrastive_weight=1.0))
    with pytest.raises(ConfigError, match="method 'seed' distils from one teacher"):
        _build(_cfg("seed", teacher=_teacher_cfg(teacher_run, extra_paths=extra)))
    with pytest.raises(CheckpointError, match="teacher not found: .*nowhere"):
        _build(_cfg("s2bnn", teacher=_teacher_cfg(
            teacher_run, extra_paths=[str(tmp_path / "nowhere")])))
    other = _save_teacher(tmp_path / "wide", 7, dim=2 * DIM)
    with pytest.raises(ConfigError, match=f"{other} gives 64-d embeddings"):
        _build(_cfg("s2bnn", teacher=_teacher_cfg(teacher_run, extra_paths=[str(other)])))


def test_missing_teacher_file_names_the_fix(registry: None, tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="teacher not found: .*teacher_mocov2.yaml"):
        _build(_cfg("s2bnn", teacher=_teacher_cfg(tmp_path / "no_such_run")))


# --------------------------------------------------------------------------- registry
def test_registry_names_match_the_config_choices() -> None:
    from s2bnn.config import CHOICES
    from s2bnn.methods import method_names

    assert set(method_names()) == set(CHOICES["method.name"])


@pytest.mark.parametrize("name, key, value, match", [
    ("mocov2", "momentum", 1.5, r"method.momentum must be in \[0, 1\]"),
    ("s2bnn", "contrastive_weight", -1.0, r"method.contrastive_weight must be >= 0"),
    ("s2bnn", "mixup_alpha", -0.5, r"method.mixup_alpha must be >= 0"),
    ("seed", "seed_teacher_temp", 0.0, r"method.seed_teacher_temp must be > 0"),
    ("dino", "dino_warmup_teacher_temp_frac", 2.0, r"must be in \[0, 1\]"),
    ("dino", "dino_student_temp", -0.1, r"method.dino_student_temp must be > 0"),
])
def test_each_method_checks_its_own_keys_before_anything_loads(
        name: str, key: str, value: float, match: str) -> None:
    from s2bnn.methods import check_method_config

    with pytest.raises(ConfigError, match=match):
        check_method_config(_cfg(name, **{key: value}))
    # Another method's keys are not this method's business.
    other = "mocov2" if name != "mocov2" else "dino"
    check_method_config(_cfg(other, **{key: value}) if key not in ("momentum",) else _cfg(other))


@pytest.mark.parametrize("name", ["mocov2", "s2bnn", "seed"])
def test_proj_hidden_dim_0_is_one_linear_layer_and_the_run_can_teach(
        name: str, registry: None, teacher_run: Path, tmp_path: Path) -> None:
    from s2bnn.methods import check_method_config
    from s2bnn.teachers import load_teacher

    cfg = _cfg(name, proj_hidden_dim=0, teacher=_teacher_cfg(teacher_run), momentum=0.99)
    check_method_config(cfg)
    method = _build(cfg)
    assert isinstance(method.head, nn.Linear)
    assert (method.head.in_features, method.head.out_features) == (16, DIM)
    # The default (None) is the MLP: Linear, ReLU, Linear at the backbone's width.
    mlp = _build(_cfg(name, teacher=_teacher_cfg(teacher_run), momentum=0.99)).head
    assert [type(m) for m in mlp] == [nn.Linear, nn.ReLU, nn.Linear] and mlp[0].out_features == 16
    # Such a run serves as a teacher: its head.weight / head.bias rebuild the linear head.
    save_checkpoint({
        "format": "s2bnn", "version": 1, "config": {}, "epoch": 1, "step": 1,
        "backbone": {"name": "tiny_test_net", "kwargs": {},
                     "state_dict": method.backbone.state_dict()},
        "method": method.state_dict(),
    }, tmp_path / "checkpoints" / "last.pt")
    teacher = load_teacher(tmp_path, "tiny_test_net", head="linear")
    x = torch.randn(4, 1, 16, 16)
    method.eval()
    want = F.normalize(method.head(method.backbone(x)), dim=1)
    torch.testing.assert_close(teacher(x), want)


def test_proj_hidden_dim_checks() -> None:
    from s2bnn.methods import check_method_config

    with pytest.raises(ConfigError, match=r"method.proj_hidden_dim must be >= 0"):
        check_method_config(_cfg("s2bnn", proj_hidden_dim=-1))
    with pytest.raises(ConfigError, match=r"must be > 0 for dino"):
        check_method_config(_cfg("dino", proj_hidden_dim=0))
    check_method_config(_cfg("dino", proj_hidden_dim=8))


def test_views_are_checked_with_the_config() -> None:
    from s2bnn.methods import check_method_config

    with pytest.raises(ConfigError, match="set data.augment.num_views=2"):
        check_method_config(_cfg("mocov2"), num_views=1)
    check_method_config(_cfg("s2bnn"), num_views=1)


def test_a_registered_method_builds_from_its_name(registry: None) -> None:
    from s2bnn.methods import Method, register_method
    from s2bnn.methods.registry import _REGISTRY as METHOD_REGISTRY

    class Probe(Method):
        name = "probe_method"

        @classmethod
        def from_config(cls, cfg, backbone, ctx):  # type: ignore[no-untyped-def]
            method = cls(backbone)
            method.ctx = ctx
            return method

    try:
        register_method(Probe)
        built = _build(_cfg("probe_method"), total_steps=7)
        assert isinstance(built, Probe) and built.ctx.total_steps == 7
        assert built.ctx.num_train == N_IMAGES and built.ctx.in_chans == 1
    finally:
        METHOD_REGISTRY.pop("probe_method", None)


# --------------------------------------------------------------------------- momentum encoders
def test_one_momentum_helper_for_moco_and_dino(registry: None, teacher_run: Path) -> None:
    """MoCo's key encoder and DINO's EMA teacher: synced at the first training forward (not
    at construction, not again after a resume), then EMA-updated with the method's momentum."""
    from s2bnn.methods.momentum import MomentumEncoders

    for case, owner, online, copy_name in (
            ("mocov2", lambda m: m.moco, lambda m: m.backbone, "key_backbone"),
            ("dino", lambda m: m, lambda m: m.backbone, "ema_backbone")):
        method = _build(CASES[case](teacher_run))
        enc = owner(method)
        assert isinstance(enc, MomentumEncoders) and not bool(enc.initialized)
        target = getattr(enc, copy_name)
        with torch.no_grad():
            for p in online(method).parameters():
                p.add_(1.0)  # the student moves before the first forward (e.g. DDP broadcast)
        method.train()
        method(_data()[0])
        assert bool(enc.initialized)
        for a, b in zip(target.parameters(), online(method).parameters()):
            assert torch.equal(a, b) and not a.requires_grad
        before = [p.clone() for p in target.parameters()]
        with torch.no_grad():
            for p in online(method).parameters():
                p.add_(1.0)
        method.on_train_step_end(0, 100)
        moved = [not torch.equal(a, b) for a, b in zip(before, target.parameters())]
        assert any(moved)
        # A resumed method keeps its loaded copies: the first forward does not re-copy.
        state = method.state_dict()
        resumed = _build(CASES[case](teacher_run), seed=1)
        resumed.load_state_dict(state)
        resumed.train()
        resumed(_data()[0])
        for a, b in zip(getattr(owner(resumed), copy_name).parameters(), target.parameters()):
            assert torch.equal(a, b)


@pytest.mark.parametrize("weight", [1.0, 0.5])
def test_compiled_s2bnn_loss_has_a_gradient(weight: float, registry: None,
                                            teacher_run: Path) -> None:
    # `compile: true` compiles the method in place. With distill_weight 1 inductor once turned
    # `1.0 * loss` into an alias of the loss it also logs detached, and the step failed with
    # "element 0 of tensors does not require grad".
    method = _build(_cfg("s2bnn", teacher=_teacher_cfg(teacher_run), distill_weight=weight))
    method.train()
    views = _data()[0][:1]
    eager, _ = method(views)
    torch._dynamo.reset()
    method.compile()
    loss, logs = method(views)
    assert loss.requires_grad and not logs["loss_distill"].requires_grad
    assert torch.allclose(loss, eager, atol=1e-5)
    loss.backward()
    assert all(p.grad is not None for p in method.head.parameters())


def test_teacher_stages_one_head_block_per_stage(tmp_path: Path) -> None:
    """method.teacher.stages=2: the targets are the teacher's last two stages (pooled, centred,
    each unit length), the student's head has one block per stage, the loss is the mean of the
    paper's loss over the blocks, and training brings the student closer to both."""
    from s2bnn.models import build_model

    torch.manual_seed(7)
    net = build_model("resnet_small", num_classes=0, in_chans=1, width_mult=0.25)
    torch.save(net.state_dict(), tmp_path / "small.pth")
    tcfg = TeacherConfig(path=str(tmp_path / "small.pth"), arch="resnet_small", head="none",
                         center=True, stages=2, kwargs={"width_mult": 0.25})
    method = _build(_cfg("s2bnn", proj_dim=72, teacher=tcfg))
    assert method.block_dims == (24, 48) and method.head[-1].out_features == 72
    _check_block_distillation(method, _data()[0][0], (24, 48))
    with pytest.raises(ConfigError, match="gives 72-d embeddings but method.proj_dim is 48"):
        _build(_cfg("s2bnn", proj_dim=48, teacher=tcfg))
    with pytest.raises(ConfigError, match="stages is for method s2bnn"):
        _build(_cfg("seed", proj_dim=72, teacher=tcfg))
    with pytest.raises(ConfigError, match="needs method.contrastive_weight 0"):
        _build(_cfg("s2bnn", proj_dim=72, teacher=tcfg, contrastive_weight=1.0))


def test_teacher_whiten_distils_the_whitened_stages(tmp_path: Path) -> None:
    """method.teacher.whiten=true: each stage's block of the target is its centred features
    softly whitened on the batch, then normalised, and distillation works on it as on the
    centred target."""
    from s2bnn.models import build_model
    from s2bnn.teachers import stage_features, whiten_batch

    torch.manual_seed(7)
    net = build_model("resnet_small", num_classes=0, in_chans=1, width_mult=0.25).eval()
    torch.save(net.state_dict(), tmp_path / "small.pth")
    tcfg = TeacherConfig(path=str(tmp_path / "small.pth"), arch="resnet_small", head="none",
                         center=True, stages=2, whiten=True, kwargs={"width_mult": 0.25})
    method = _build(_cfg("s2bnn", proj_dim=72, teacher=tcfg))
    x = _data()[0][0]
    with torch.no_grad():
        want = torch.cat([F.normalize(whiten_batch(z.float()), dim=1)
                          for z in stage_features(net, x, 2)], 1)
        torch.testing.assert_close(method.teacher(x), want, atol=1e-4, rtol=1e-4)
    _check_block_distillation(method, x, (24, 48))


def test_teacher_grid_one_head_block_per_cell(tmp_path: Path) -> None:
    """method.teacher.grid=2: every cell of the stages' 2x2 maps is a block of the target and of
    the student's head, and training brings the student closer to them on average."""
    from s2bnn.models import build_model

    torch.manual_seed(7)
    net = build_model("resnet_small", num_classes=0, in_chans=1, width_mult=0.25)
    torch.save(net.state_dict(), tmp_path / "small.pth")
    tcfg = TeacherConfig(path=str(tmp_path / "small.pth"), arch="resnet_small", head="none",
                         center=True, stages=2, grid=2, kwargs={"width_mult": 0.25})
    sizes = (24,) * 4 + (48,) * 4
    method = _build(_cfg("s2bnn", proj_dim=288, teacher=tcfg))
    assert method.block_dims == sizes and method.head[-1].out_features == 288
    # Eight cells of a random teacher on 16 px noise: the student's pooled features cannot
    # follow every cell, but the loss falls and the blocks' mean cosine rises.
    _check_block_distillation(method, _data()[0][0], sizes, each=False, epochs=12)
    with pytest.raises(ConfigError, match="gives 288-d embeddings but method.proj_dim is 72"):
        _build(_cfg("s2bnn", proj_dim=72, teacher=tcfg))
    with pytest.raises(ConfigError, match="grid is for method s2bnn"):
        _build(_cfg("seed", proj_dim=288, teacher=replace(tcfg, stages=1)))
    with pytest.raises(ConfigError, match="grid > 1 .*needs method.contrastive_weight 0"):
        _build(_cfg("s2bnn", proj_dim=192, teacher=replace(tcfg, stages=1),
                    contrastive_weight=1.0))


def test_deep_supervision_adds_the_earlier_stages_losses(tmp_path: Path) -> None:
    """method.student_stages=3: the student's two stages before its last each get a head that
    predicts the same target; the loss is the last stage's plus stage_weight times their mean
    (logged as loss_stages), and training lowers it."""
    from s2bnn.losses import soft_cross_entropy
    from s2bnn.methods.registry import check_method_config
    from s2bnn.models import build_model
    from s2bnn.teachers import stage_features

    torch.manual_seed(7)
    teacher = build_model("resnet_small", num_classes=0, in_chans=1, width_mult=0.25)
    torch.save(teacher.state_dict(), tmp_path / "small.pth")
    tcfg = TeacherConfig(path=str(tmp_path / "small.pth"), arch="resnet_small", head="none",
                         center=True, kwargs={"width_mult": 0.25})
    cfg = _cfg("s2bnn", proj_dim=48, teacher=tcfg, student_stages=3, stage_weight=0.5)

    def student() -> nn.Module:
        return build_model("resnet_small", num_classes=0, in_chans=1, width_mult=0.25)

    torch.manual_seed(0)
    method = build_method(cfg, student(), num_train=N_IMAGES, total_steps=100, in_chans=1)
    # resnet_small x0.25 ends its stages at 6, 12, 24 and 48 channels.
    assert [h[0].in_features for h in method.stage_heads] == [12, 24]
    assert method.head[0].in_features == 48
    x = _data()[0][0]
    method.eval()
    loss, logs = method([x])
    with torch.no_grad():
        t = method.teacher(x)
        feats = stage_features(method.backbone, x, 3)
        s = [F.normalize(h(f), dim=1)
             for h, f in zip([*method.stage_heads, method.head], feats)]
    last = soft_cross_entropy(s[2], t, method.temperature)
    earlier = (soft_cross_entropy(s[0], t, method.temperature)
               + soft_cross_entropy(s[1], t, method.temperature)) / 2
    torch.testing.assert_close(logs["loss_distill"], last)
    torch.testing.assert_close(logs["loss_stages"], earlier)
    torch.testing.assert_close(loss, last + 0.5 * earlier)
    torch.testing.assert_close(method._student(x), s[2])
    losses = _epoch_losses(method, epochs=4)
    assert losses[-1] < losses[0], losses

    for bad, match in ((replace(cfg, student_stages=0), "method.student_stages must be >= 1"),
                       (replace(cfg, stage_weight=-1.0), "method.stage_weight"),
                       (replace(cfg, contrastive_weight=1.0),
                        "student_stages > 1 .*needs method.contrastive_weight 0")):
        with pytest.raises(ConfigError, match=match):
            check_method_config(bad)
    with pytest.raises(ConfigError, match="method.student_stages=5 but the student has 4"):
        build_method(replace(cfg, student_stages=5), student(), num_train=N_IMAGES,
                     total_steps=100, in_chans=1)
    with pytest.raises(ConfigError, match="method.student_stages=2: the student has no stages"):
        build_method(replace(cfg, student_stages=2), TinyNet(), num_train=N_IMAGES,
                     total_steps=100, in_chans=1)
