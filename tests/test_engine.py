"""The training engine on a tiny stand-in method: run dir, refusals, NaN policy, optimisers.

The stand-ins here (``TinyViews``, ``TinyBackbone``, ``TinyMethod``, ``tiny_parts``) are also
used by test_resume.py and test_ddp.py. They follow the method contract (``forward(views) ->
(loss, logs)``, ``on_train_step_end``, ``ddp_ignored_names``, all state in ``state_dict``) and
exercise what a real method has: BatchNorm buffers, a momentum encoder and a queue.
"""

from __future__ import annotations

import copy
import csv
import math
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import Dataset, TensorDataset

from s2bnn import distributed as D
from s2bnn.checkpoint import load_checkpoint, method_state, save_checkpoint
from s2bnn.config import config_from_dict, load_config
from s2bnn.engine import Parts, train
from s2bnn.engine.optim import LARS, build_optimizer, lr_factor, param_groups
from s2bnn.errors import CheckpointError, ConfigError, RunDirError, TrainingError
from s2bnn.eval.monitor import monitors
from s2bnn.methods import Method


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors gain nothing from threads, and a busy shared machine makes OpenMP's barriers
    cost ~0.1 s per op; one thread keeps these tests fast and their timing stable."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# --------------------------------------------------------------------------- stand-ins
class TinyViews(Dataset):
    """Fixed random vectors; two "views" each, with noise drawn from the global torch RNG
    (like torchvision's transforms), or identical views when ``noise == 0``."""

    def __init__(self, n: int = 48, dim: int = 6, noise: float = 0.1) -> None:
        gen = torch.Generator().manual_seed(1234)
        self.x = torch.randn(n, dim, generator=gen)
        self.y = torch.arange(n) % 3
        self.noise = noise

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        x = self.x[i]
        views = [x + self.noise * torch.randn_like(x) for _ in range(2)]
        return views, int(self.y[i])


class TinyBackbone(nn.Module):
    def __init__(self, dim: int = 6, bn: bool = True, width: int = 8) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Linear(dim, width)]
        if bn:
            layers.append(nn.BatchNorm1d(width))
        layers += [nn.ReLU(), nn.Linear(width, width)]
        self.net = nn.Sequential(*layers)
        self.feature_dim = width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class TinyMethod(Method):
    """Momentum encoder + queue; loss = alignment of q and k plus a queue term.

    ``nan_at`` / ``crash_at``: the global forward call (1-based) at which the loss becomes NaN /
    a RuntimeError simulates a crash. ``nan_term`` names the logged term that goes non-finite.
    """

    def __init__(self, backbone: nn.Module, nan_at: tuple[int, ...] = (), crash_at: int = 0,
                 queue: int = 16) -> None:
        super().__init__(backbone)
        self.key = copy.deepcopy(backbone)
        for p in self.key.parameters():
            p.requires_grad = False
        dim = backbone.feature_dim
        self.register_buffer("queue", F.normalize(torch.randn(queue, dim), dim=1))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))
        self.nan_at = set(nan_at)
        self.crash_at = crash_at
        self.calls = 0
        self.ended: list[int] = []
        self._last_k: torch.Tensor | None = None

    def forward(self, views):
        self.calls += 1
        if self.calls == self.crash_at:
            raise RuntimeError("simulated crash")
        q = F.normalize(self.backbone(views[0]), dim=1)
        with torch.no_grad():
            k = F.normalize(self.key(views[1]), dim=1)
        align = (2 - 2 * (q * k).sum(1)).mean()
        spread = (q @ self.queue.T).pow(2).mean()
        if self.calls in self.nan_at:
            spread = spread * float("nan")
        self._last_k = k
        cos = (q * k).sum(1).mean().detach()
        return align + 0.1 * spread, {"align": align.detach(), "spread": spread.detach(),
                                       "cosine": cos}

    @torch.no_grad()
    def on_train_step_end(self, step: int, total_steps: int) -> None:
        self.ended.append(step)
        for pk, pq in zip(self.key.parameters(), self.backbone.parameters()):
            pk.mul_(0.9).add_(pq.detach(), alpha=0.1)
        # The global batch's keys, as real methods gather them (bf16 under autocast).
        k = D.all_gather_nograd(self._last_k).to(self.queue.dtype)
        n = k.shape[0]
        idx = (self.ptr + torch.arange(n)) % self.queue.shape[0]
        self.queue[idx] = k
        self.ptr.fill_(int((self.ptr + n) % self.queue.shape[0]))

    def ddp_ignored_names(self) -> list[str]:
        return ["queue", "ptr"]


def tiny_parts(n: int = 48, dim: int = 6, bn: bool = True, noise: float = 0.1,
               nan_at: tuple[int, ...] = (), crash_at: int = 0, record: list | None = None):
    """A ``parts`` function for :func:`s2bnn.engine.train` built on the stand-ins."""

    def make(cfg) -> Parts:
        def build_method(backbone, total):
            if record is not None:
                record.append({k: v.clone() for k, v in backbone.state_dict().items()})
            return TinyMethod(backbone, nan_at=nan_at, crash_at=crash_at)

        def knn_sets():
            data = TinyViews(n, dim, noise=0.0)
            return TensorDataset(data.x, data.y), TensorDataset(data.x[:12], data.y[:12]), 3

        return Parts(
            train_set=TinyViews(n, dim, noise), in_chans=1, image_size=dim,
            backbone_name="tiny", backbone_kwargs={"dim": dim, "bn": bn},
            build_backbone=lambda: TinyBackbone(dim, bn), build_method=build_method,
            knn_sets=knn_sets,
        )

    return make


def tiny_cfg(out: Path, **over):
    # fp32: precision "auto" is bf16 on CPUs with AVX512-BF16 or AMX, and these runs compare
    # numbers across runs and processes.
    base = {"output_dir": str(out), "epochs": 2, "batch_size": 8, "progress": False,
            "log_every": 2, "device": "cpu", "seed": 3, "precision": "fp32"}
    base.update(over)
    optim = base.pop("optim", {"lr": 0.05})
    return config_from_dict({**base, "optim": optim})


def read_metrics(run: Path) -> list[dict[str, str]]:
    with (run / "metrics.csv").open() as fh:
        return list(csv.DictReader(fh))


def snapshot(run: Path) -> dict[str, bytes]:
    return {str(p.relative_to(run)): p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()}


# --------------------------------------------------------------------------- run dir
def test_run_dir_layout_checkpoint_and_metrics(tmp_path: Path) -> None:
    run = tmp_path / "run"
    cfg = tiny_cfg(run, knn_every=1, save_every=1)
    out = train(cfg, parts=tiny_parts(), callbacks=monitors(cfg))
    assert out == run
    loaded = load_config(run / "config.yaml")
    assert loaded.batch_size == 8 and loaded.output_dir == str(run)

    ckpt = load_checkpoint(run)
    assert ckpt["format"] == "s2bnn" and ckpt["version"] == 1
    assert ckpt["epoch"] == 2 and ckpt["step"] == 12 and ckpt["finished"] is True
    assert ckpt["backbone"]["name"] == "tiny"
    assert set(ckpt["rng"]) >= {"torch", "numpy", "python"}
    assert {"optimizer", "scheduler", "method", "config"} <= set(ckpt)
    # The backbone entry alone rebuilds the trained student; it is stored once.
    fresh = TinyBackbone(**ckpt["backbone"]["kwargs"])
    fresh.load_state_dict(ckpt["backbone"]["state_dict"])
    assert not any(k.startswith("backbone.") for k in ckpt["method"])
    assert torch.equal(fresh.net[0].weight, method_state(ckpt)["backbone.net.0.weight"])
    assert (run / "checkpoints" / "epoch_1.pt").is_file()
    assert load_checkpoint(run / "checkpoints" / "epoch_1.pt")["finished"] is False

    rows = read_metrics(run)
    assert list(rows[0])[:5] == ["epoch", "step", "loss", "lr", "img_per_s"]
    assert {"align", "spread", "cosine", "knn_top1"} <= set(rows[0])
    steps = [int(r["step"]) for r in rows]
    assert steps == [2, 4, 6, 8, 10, 12]
    knn = [r["knn_top1"] for r in rows if r["knn_top1"]]
    assert len(knn) == 2 and all(0 <= float(v) <= 100 for v in knn)
    # Linear decay to 0 over 12 steps: lr after step s is lr0 * (1 - s/12).
    assert float(rows[1]["lr"]) == pytest.approx(0.05 * (1 - 4 / 12), rel=1e-5)
    assert any((run / "tb").iterdir())


def test_refuses_finished_run_and_force_overwrites(tmp_path: Path) -> None:
    run = tmp_path / "run"
    train(tiny_cfg(run, epochs=1), parts=tiny_parts())
    before = snapshot(run)
    for resume in ("never", "auto"):
        with pytest.raises(RunDirError, match="finished run.*force=true"):
            train(tiny_cfg(run, epochs=1, resume=resume), parts=tiny_parts())
    assert snapshot(run) == before  # nothing touched
    train(tiny_cfg(run, epochs=1, force=True, seed=9), parts=tiny_parts())
    assert load_checkpoint(run)["config"]["seed"] == 9


def _unfinished_run(run: Path, **over) -> None:
    # Crash in epoch 2 (6 steps per epoch): checkpoint after epoch 1 stays, unfinished.
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(tiny_cfg(run, **over), parts=tiny_parts(crash_at=9))
    assert load_checkpoint(run)["finished"] is False


def test_unfinished_run_needs_resume_auto_or_force(tmp_path: Path) -> None:
    run = tmp_path / "run"
    _unfinished_run(run)
    before = snapshot(run)
    with pytest.raises(RunDirError, match="resume=auto.*force=true"):
        train(tiny_cfg(run), parts=tiny_parts())
    with pytest.raises(RunDirError, match="different config.*optim.lr"):
        train(tiny_cfg(run, resume="auto", optim={"lr": 0.01}), parts=tiny_parts())
    assert snapshot(run) == before
    # Keys that only say where/how to run may change, e.g. log_every and epochs.
    train(tiny_cfg(run, resume="auto", log_every=3, epochs=3), parts=tiny_parts())
    ckpt = load_checkpoint(run)
    assert ckpt["epoch"] == 3 and ckpt["finished"]


def test_force_resumes_with_changed_config(tmp_path: Path) -> None:
    run = tmp_path / "run"
    _unfinished_run(run)
    train(tiny_cfg(run, resume="auto", force=True, optim={"lr": 0.01}), parts=tiny_parts())
    ckpt = load_checkpoint(run)
    assert ckpt["epoch"] == 2 and ckpt["config"]["optim"]["lr"] == 0.01


def test_batch_smaller_than_world_is_one_line_error(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(D, "world_size", lambda: 4)
    with pytest.raises(ConfigError, match="smaller than the 4 ranks"):
        train(tiny_cfg(tmp_path / "r", batch_size=2), parts=tiny_parts())
    with pytest.raises(ConfigError, match="split evenly"):
        train(tiny_cfg(tmp_path / "r", batch_size=6), parts=tiny_parts())
    assert not (tmp_path / "r").exists()


def test_too_few_images_for_a_batch(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no full batch"):
        train(tiny_cfg(tmp_path / "r", batch_size=64), parts=tiny_parts(n=20))


# --------------------------------------------------------------------------- NaN policy
def test_nan_stop_names_step_and_term_and_keeps_checkpoint(tmp_path: Path) -> None:
    run = tmp_path / "run"
    with pytest.raises(TrainingError) as info:
        train(tiny_cfg(run), parts=tiny_parts(nan_at=(8,)))
    msg = str(info.value)
    assert "step 8 (epoch 2)" in msg and "spread" in msg and "align" not in msg
    assert "\n" not in msg and "last good checkpoint" in msg
    ckpt = load_checkpoint(run)
    assert ckpt["epoch"] == 1 and ckpt["step"] == 6 and not ckpt["finished"]
    assert all(torch.isfinite(v).all() for v in ckpt["method"].values() if v.is_floating_point())


def test_nan_skip_counts_and_stops_after_max_bad_steps(tmp_path: Path) -> None:
    run = tmp_path / "run"
    train(tiny_cfg(run, nan_policy="skip", max_bad_steps=3), parts=tiny_parts(nan_at=(2, 5)))
    ckpt = load_checkpoint(run)
    assert ckpt["finished"] and ckpt["bad_steps"] == 2 and ckpt["step"] == 12
    assert all(torch.isfinite(v).all() for v in ckpt["method"].values() if v.is_floating_point())
    rows = read_metrics(run)
    assert rows[-1]["bad_steps"] == "2"

    with pytest.raises(TrainingError, match="3 non-finite steps.*max_bad_steps=3"):
        train(tiny_cfg(tmp_path / "r2", nan_policy="skip", max_bad_steps=3),
              parts=tiny_parts(nan_at=(2, 3, 4)))


def test_skipped_step_does_not_update_weights(tmp_path: Path) -> None:
    ended: list[list[int]] = []

    def parts(cfg):
        p = tiny_parts(nan_at=(1,))(cfg)
        inner = p.build_method

        def build(backbone, total):
            m = inner(backbone, total)
            ended.append(m.ended)
            return m

        p.build_method = build
        return p

    train(tiny_cfg(tmp_path / "r", epochs=1, nan_policy="skip", max_steps=3), parts=parts)
    assert ended[0] == [1, 2]  # step 0 skipped: no on_train_step_end for it


# --------------------------------------------------------------------------- two-step init
def test_init_from_step1_run(tmp_path: Path) -> None:
    step1 = tmp_path / "step1"
    train(tiny_cfg(step1, epochs=1), parts=tiny_parts())
    seen: list[dict] = []
    train(tiny_cfg(tmp_path / "step2", epochs=1, model={"init_from": str(step1)}),
          parts=tiny_parts(record=seen))
    trained = load_checkpoint(step1)["backbone"]["state_dict"]
    assert all(torch.equal(seen[0][k], trained[k]) for k in trained)

    other = tiny_parts()

    def renamed(cfg):
        p = other(cfg)
        p.backbone_name = "other"
        return p

    with pytest.raises(CheckpointError, match="'tiny' backbone but model.name is 'other'"):
        train(tiny_cfg(tmp_path / "s3", epochs=1, model={"init_from": str(step1)}), parts=renamed)
    with pytest.raises(CheckpointError, match="not found"):
        train(tiny_cfg(tmp_path / "s4", model={"init_from": str(tmp_path / "nope.pt")}),
              parts=tiny_parts())
    bogus = tmp_path / "bogus.pt"
    save_checkpoint({"state_dict": {}}, bogus)
    with pytest.raises(CheckpointError, match="not an s2bnn training checkpoint"):
        train(tiny_cfg(tmp_path / "s5", model={"init_from": str(bogus)}), parts=tiny_parts())


# --------------------------------------------------------------------------- optimisers
def test_lr_schedules() -> None:
    assert [lr_factor(s, 10, 0, "linear") for s in (0, 5, 10)] == [1.0, 0.5, 0.0]
    assert lr_factor(0, 10, 4, "cosine") == pytest.approx(0.25)
    assert lr_factor(3, 10, 4, "cosine") == pytest.approx(1.0)
    assert lr_factor(4, 10, 4, "cosine") == pytest.approx(1.0)
    assert lr_factor(7, 10, 4, "cosine") == pytest.approx(0.5)
    assert lr_factor(10, 10, 4, "cosine", min_ratio=0.1) == pytest.approx(0.1)
    assert lr_factor(9, 10, 2, "constant") == 1.0
    with pytest.raises(ConfigError):
        lr_factor(5, 10, 0, "step")


def test_param_groups_exclude_bn_bias_and_frozen() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Linear(4, 2))
    frozen = nn.Linear(2, 2)
    frozen.requires_grad_(False)
    model.append(frozen)
    groups = param_groups(model, 0.1, exclude_bn_bias=True)
    decay = {id(p) for p in groups[0]["params"]}
    assert decay == {id(model[0].weight), id(model[2].weight)}
    assert groups[1]["weight_decay"] == 0.0 and len(groups[1]["params"]) == 4
    everything = param_groups(model, 0.1, exclude_bn_bias=False)
    assert len(everything) == 1 and len(everything[0]["params"]) == 6


def test_lars_scales_update_by_trust_ratio() -> None:
    w = nn.Parameter(torch.tensor([3.0, 4.0]))  # norm 5
    opt = LARS([{"params": [w], "lars_exclude": False}], lr=1.0, momentum=0.0, eta=0.1)
    w.grad = torch.tensor([0.0, 10.0])  # norm 10
    opt.step()
    # update = g * 0.1 * 5 / 10 = 0.05 * g
    assert torch.allclose(w.detach(), torch.tensor([3.0, 3.5]))
    sd = opt.state_dict()
    assert "state" in sd


def test_build_optimizer_names() -> None:
    model = nn.Linear(3, 2)
    assert isinstance(build_optimizer(model, "adam", 1e-3), torch.optim.Adam)
    assert isinstance(build_optimizer(model, "sgd", 1e-3, weight_decay=1e-4), torch.optim.SGD)
    assert isinstance(build_optimizer(model, "lars", 1e-3), LARS)
    with pytest.raises(ConfigError):
        build_optimizer(nn.Linear(3, 2).requires_grad_(False), "adam", 1e-3)


def test_adam_is_fused_on_the_cpu_and_steps_like_the_default_one() -> None:
    torch.manual_seed(0)
    model = nn.Linear(5, 3)
    ref = nn.Linear(5, 3)
    ref.load_state_dict(model.state_dict())
    opt = build_optimizer(model, "adam", 1e-2, weight_decay=1e-3)
    assert opt.defaults["fused"] is True
    plain = torch.optim.Adam([{"params": [p for n, p in ref.named_parameters() if n == g]}
                              for g in ("weight", "bias")], lr=1e-2)
    plain.param_groups[0]["weight_decay"] = opt.param_groups[0]["weight_decay"]
    plain.param_groups[1]["weight_decay"] = opt.param_groups[1]["weight_decay"]
    x = torch.randn(8, 5)
    for _ in range(3):
        for m, o in ((model, opt), (ref, plain)):
            o.zero_grad()
            m(x).square().sum().backward()
            o.step()
    for a, b in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_grad_clip_and_sgd_warmup_run(tmp_path: Path) -> None:
    cfg = tiny_cfg(tmp_path / "r", epochs=1, optim={"name": "lars", "lr": 0.1, "grad_clip": 0.5,
                                                    "warmup_epochs": 0.5, "schedule": "cosine",
                                                    "weight_decay": 1e-4})
    train(cfg, parts=tiny_parts())
    rows = read_metrics(tmp_path / "r")
    assert all(math.isfinite(float(r["loss"])) for r in rows)
    # Warm-up over 3 steps: after step 2 the factor is 3/3 -> peak lr.
    assert float(rows[0]["lr"]) == pytest.approx(0.1, rel=1e-6)


def test_unreadable_checkpoint_needs_force(tmp_path: Path) -> None:
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "last.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="force=true"):
        train(tiny_cfg(run, resume="auto"), parts=tiny_parts())
    train(tiny_cfg(run, epochs=1, force=True), parts=tiny_parts())
    assert load_checkpoint(run)["finished"]


def test_sync_bn_converts_trainable_parts_only() -> None:
    from s2bnn.engine.ddp import convert_sync_bn

    method = TinyMethod(TinyBackbone())
    method.teacher = TinyBackbone().eval()  # a frozen teacher is kept in eval mode
    convert_sync_bn(method)
    assert isinstance(method.backbone.net[1], nn.SyncBatchNorm)
    assert isinstance(method.key.net[1], nn.SyncBatchNorm)  # momentum encoder, as in MoCo
    assert type(method.teacher.net[1]) is nn.BatchNorm1d


def test_cli_refusal_is_one_line(tmp_path: Path, capsys) -> None:
    from s2bnn.cli import main

    run = tmp_path / "run"
    train(tiny_cfg(run, epochs=1), parts=tiny_parts())
    recipe = tmp_path / "r.yaml"
    recipe.write_text("epochs: 1\n")
    code = main(["train", str(recipe), f"output_dir={run}"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("s2bnn: error: output_dir") and err.count("\n") == 1


def test_precision_choices(tmp_path: Path) -> None:
    from s2bnn.devices import autocast_context

    cpu = torch.device("cpu")
    with autocast_context("auto", cpu, cpu_flags=frozenset({"avx2", "fma"}))():
        assert not torch.is_autocast_enabled("cpu")  # fp32 where the CPU would emulate bf16
    with autocast_context("auto", cpu, cpu_flags=frozenset({"avx512f", "avx512_bf16"}))():
        assert torch.is_autocast_enabled("cpu")  # bf16 where it computes it natively
    with autocast_context("bf16", cpu)():
        assert torch.is_autocast_enabled("cpu")
    train(tiny_cfg(tmp_path / "r", epochs=1, precision="bf16"), parts=tiny_parts())
    assert all(math.isfinite(float(r["loss"])) for r in read_metrics(tmp_path / "r"))


def test_batch_augment_default_for_in_memory_data(tmp_path: Path) -> None:
    from s2bnn.engine import build_parts

    base = {"output_dir": str(tmp_path / "r"), "method": {"name": "mocov2"},
            "model": {"name": "reactnet_small"}}
    parts = build_parts(config_from_dict({**base, "data": {"name": "synthetic:1:16:64:4"}}))
    assert parts.batch_transform is not None
    image, _ = parts.train_set[0]
    assert image.dtype == torch.uint8  # the loader hands raw images; views are made per batch
    batch = torch.stack([parts.train_set[i][0] for i in range(4)])
    views = parts.batch_transform(batch)
    assert len(views) == 2 and views[0].shape == (4, 1, 16, 16)
    assert views[0].dtype == torch.float32 and not torch.equal(views[0], views[1])

    off = build_parts(config_from_dict(
        {**base, "data": {"name": "synthetic:1:16:64:4", "batch_augment": False}}))
    assert off.batch_transform is None
    per_image, _ = off.train_set[0]
    assert len(per_image) == 2 and per_image[0].shape == (1, 16, 16)


def test_batch_augment_true_needs_in_memory_data(tmp_path: Path) -> None:
    from PIL import Image

    from s2bnn.engine import build_parts

    for split in ("train", "val"):
        d = tmp_path / "data" / split / "a"
        d.mkdir(parents=True)
        Image.new("L", (8, 8)).save(d / "0.png")
    # A small folder is held in memory by default, so it can be augmented per batch; kept on
    # disk (data.in_memory=false) it cannot.
    cfg = config_from_dict({"output_dir": str(tmp_path / "r"),
                            "data": {"name": str(tmp_path / "data"), "batch_augment": True,
                                     "in_memory": False}})
    with pytest.raises(ConfigError, match="batch_augment.*data.in_memory=true"):
        build_parts(cfg)
    cfg = config_from_dict({"output_dir": str(tmp_path / "r"),
                            "data": {"name": str(tmp_path / "data"), "batch_augment": True}})
    assert build_parts(cfg).batch_transform is not None
