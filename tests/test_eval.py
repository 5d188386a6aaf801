"""Evaluation: kNN, linear probes (fast sweep and protocol), fine-tuning, loading, export, CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import yaml
from torch.utils.data import TensorDataset

from s2bnn.checkpoint import save_checkpoint
from s2bnn.cli import main
from s2bnn.errors import CheckpointError, UserError
from s2bnn.eval.baselines import evaluate_backbone, evaluate_pixels, evaluate_untrained
from s2bnn.eval.features import cache_dataset, extract_features, make_loader
from s2bnn.eval.finetune import check_label_fraction, finetune, fraction_tag
from s2bnn.eval.knn import knn_eval, knn_scores
from s2bnn.eval.linear_protocol import (
    assert_state_unchanged,
    linear_probe_protocol,
    snapshot_state,
)
from s2bnn.eval.linear_sweep import denormals_as_zero, denormals_flushed, fast_linear_sweep
from s2bnn.eval.loading import export_backbone, load_backbone
from s2bnn.models import list_models, register_model

TINY = "_eval_tiny"
DATA = "synthetic:1:8:200:4"


class TinyNet(nn.Module):
    """Conv + BatchNorm + pool: enough to have running statistics to protect."""

    def __init__(self, num_classes: int = 0, in_chans: int = 1, width: int = 6) -> None:
        super().__init__()
        self.in_chans = in_chans
        self.body = nn.Sequential(
            nn.Conv2d(in_chans, width, 3, 2, 1), nn.BatchNorm2d(width), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.feature_dim = width
        self.fc = nn.Linear(width, num_classes) if num_classes else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] != self.in_chans:
            raise UserError(f"TinyNet takes {self.in_chans} channels, got {x.shape[1]}")
        f = self.body(x)
        return f if self.fc is None else self.fc(f)


if TINY not in list_models(include_private=True):
    register_model(TINY)(TinyNet)


def make_run(tmp_path: Path, name: str = "run", in_chans: int = 1, with_backbone: bool = True,
             data: str = DATA) -> Path:
    """A run dir in the documented format: config.yaml, checkpoints/last.pt, metrics.csv."""
    run = tmp_path / name
    (run / "checkpoints").mkdir(parents=True)
    torch.manual_seed(0)
    model = TinyNet(in_chans=in_chans)
    config = {"output_dir": str(run), "data": {"name": data, "image_size": None},
              "model": {"name": TINY}, "method": {"name": "s2bnn"}}
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    (run / "metrics.csv").write_text("epoch,step,loss,lr\n1,5,4.8,0.001\n2,10,4.7,0.0005\n")
    state = {"format": "s2bnn", "version": 1, "config": config, "epoch": 2, "step": 10,
             "finished": True}
    if with_backbone:
        state["backbone"] = {"name": TINY, "kwargs": {"in_chans": in_chans, "num_classes": 0},
                             "state_dict": model.state_dict()}
    save_checkpoint(state, run / "checkpoints" / "last.pt")
    return run


def blobs(n: int, d: int, c: int, seed: int, spread: float = 0.2):
    gen = torch.Generator().manual_seed(seed)
    centres = torch.randn(c, d, generator=torch.Generator().manual_seed(123)) * 3
    y = torch.arange(n) % c
    return centres[y] + spread * torch.randn(n, d, generator=gen), y


def image_set(n: int, seed: int, chans: int = 1, size: int = 8, classes: int = 2):
    """Images whose class sets the brightness: learnable by a tiny conv net."""
    gen = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % classes
    x = y.view(-1, 1, 1, 1).float() / max(classes - 1, 1) * 2 - 1
    x = x + 0.1 * torch.randn(n, chans, size, size, generator=gen)
    ds = TensorDataset(x, y)
    ds.targets = y  # type: ignore[attr-defined]
    ds.num_classes = classes  # type: ignore[attr-defined]
    return ds


# --------------------------------------------------------------------------- kNN
def test_knn_equals_brute_force():
    gen = torch.Generator().manual_seed(0)
    train = torch.randn(50, 8, generator=gen)
    labels = torch.randint(0, 3, (50,), generator=gen)
    test = torch.randn(17, 8, generator=gen)
    k, t = 7, 0.1
    got = knn_scores(train, labels, test, num_classes=3, k=k, temperature=t, chunk_size=4)
    want = torch.zeros(17, 3)
    for i in range(17):
        sims = [float(torch.dot(test[i] / test[i].norm(), train[j] / train[j].norm()))
                for j in range(50)]
        order = sorted(range(50), key=lambda j: -sims[j])[:k]
        for j in order:
            want[i, labels[j]] += torch.exp(torch.tensor(sims[j] / t))
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_knn_eval_clips_k_and_reports_percent():
    x, y = blobs(40, 5, 4, seed=0)
    xt, yt = blobs(20, 5, 4, seed=1)
    res = knn_eval(x, y, xt, yt, k=1000)
    assert res["k"] == 40
    assert res["knn_top1"] == pytest.approx(100.0)
    # Labels shuffled: the vote no longer matches.
    res = knn_eval(x, y[torch.randperm(40, generator=torch.Generator().manual_seed(0))], xt, yt,
                   k=5)
    assert res["knn_top1"] < 90


# --------------------------------------------------------------------------- fast linear sweep
def test_fast_sweep_separates_linearly_separable_features():
    x, y = blobs(600, 16, 5, seed=0)
    xt, yt = blobs(300, 16, 5, seed=1)
    res = fast_linear_sweep(x, y, xt, yt, sgd_lrs=[0.01, 0.1, 1.0], adam_lrs=[1e-3, 1e-2],
                            epochs=10, batch_size=64)
    assert res["sgd"]["top1"] >= 99.0
    assert res["adam"]["top1"] >= 99.0
    assert res["linear_top1"] >= 99.0
    assert len(res["sgd"]["test_top1"]) == 3 and len(res["adam"]["val_top1"]) == 2
    json.dumps(res)  # the whole result is JSON-able


def test_fast_sweep_chooses_lr_on_heldout_split_not_test():
    # Noisy, overlapping classes: LRs differ; the choice must follow the held-out curve.
    x, y = blobs(800, 32, 6, seed=2, spread=4.0)
    xt, yt = blobs(400, 32, 6, seed=3, spread=4.0)
    lrs = [1e-4, 1e-2, 1.0, 30.0]
    scrambled = yt[torch.randperm(len(yt), generator=torch.Generator().manual_seed(0))]
    for folds in (1, 5):
        kw = dict(sgd_lrs=lrs, adam_lrs=[1e-5, 1e-2], epochs=5, folds=folds)
        res = fast_linear_sweep(x, y, xt, yt, **kw)
        for opt in ("sgd", "adam"):
            curve = res[opt]
            best = max(range(len(curve["lrs"])), key=lambda i: (curve["val_top1"][i], -i))
            assert curve["best_lr"] == curve["lrs"][best]
        assert res["folds"] == folds
        if folds == 1:
            assert res["num_val"] == pytest.approx(80, abs=6)
            assert res["num_train"] + res["num_val"] == 800
        else:  # every training image held out once: a count of hits over all 800
            assert res["num_val"] == res["num_train"] == 800
            for v in res["sgd"]["val_top1"]:
                assert v * 8 == pytest.approx(round(v * 8), abs=1e-6)
        # The test set has no say: scrambled test labels change the test curve, not the choice.
        other = fast_linear_sweep(x, y, xt, scrambled, **kw)
        for opt in ("sgd", "adam"):
            assert other[opt]["val_top1"] == res[opt]["val_top1"]
            assert other[opt]["best_lr"] == res[opt]["best_lr"]
            assert other[opt]["test_top1"] != res[opt]["test_top1"]


def test_small_labelled_sets_choose_the_lr_by_cross_validation():
    from s2bnn.eval.linear_sweep import _stratified_folds, selection_folds

    assert selection_folds(60000, 0.1) == selection_folds(10000, 0.1) == 1
    assert selection_folds(2000, 0.1) == 5 and selection_folds(2000, 0.5) == 1
    assert selection_folds(3, 0.1) == 1 and selection_folds(7, 0.1) == 3
    y = torch.tensor([0] * 23 + [1] * 7 + [2] * 12)
    fold = _stratified_folds(y, 5, seed=0)
    for c in range(3):
        counts = torch.bincount(fold[y == c], minlength=5)
        assert int(counts.max() - counts.min()) <= 1  # every class spread evenly
    assert int(torch.bincount(fold).max() - torch.bincount(fold).min()) <= 1
    # The default follows the rule: 300 training images -> 5 folds, on a learnable problem.
    x, yy = blobs(300, 8, 3, seed=0)
    xt, yt = blobs(90, 8, 3, seed=1)
    res = fast_linear_sweep(x, yy, xt, yt, sgd_lrs=[0.1, 1.0], adam_lrs=[1e-2], epochs=5)
    assert res["folds"] == 5 and res["linear_top1"] >= 99.0
    with pytest.raises(ValueError, match="folds"):
        fast_linear_sweep(x, yy, xt, yt, folds=0)


def test_fast_sweep_standardisation_hides_the_feature_scale():
    """Standardised, a feature scale of 1 or 300 gives the same sweep; raw, SGD's best LR moves
    with the scale (the effect the paper's probe-LR remarks are about)."""
    x, y = blobs(400, 16, 4, seed=4, spread=3.0)
    xt, yt = blobs(200, 16, 4, seed=5, spread=3.0)
    lrs, kw = [1e-4, 1e-2, 1.0], dict(adam_lrs=[], epochs=5)
    std = [fast_linear_sweep(s * x, y, s * xt, yt, sgd_lrs=lrs, **kw) for s in (1.0, 300.0)]
    assert std[0]["sgd"]["test_top1"] == pytest.approx(std[1]["sgd"]["test_top1"], abs=0.6)
    raw = [fast_linear_sweep(s * x, y, s * xt, yt, sgd_lrs=lrs, standardize_features=False, **kw)
           for s in (1.0, 300.0)]
    assert raw[1]["sgd"]["best_lr"] < raw[0]["sgd"]["best_lr"]


def test_fast_sweep_chooses_the_weight_decay_with_the_lr():
    """A list of weight decays makes a grid with the LRs; the choice is made held out (the test
    labels have no say), the curves reported are the chosen decay's, and a one-value list is
    the plain sweep. (The per-head decay arithmetic is checked against torch.optim above.)"""
    x, y = blobs(120, 64, 4, seed=6, spread=6.0)
    xt, yt = blobs(400, 64, 4, seed=7, spread=6.0)
    scrambled = yt[torch.randperm(len(yt), generator=torch.Generator().manual_seed(0))]
    kw = dict(sgd_lrs=[0.1, 1.0], adam_lrs=[1e-2], epochs=20, folds=5)
    plain = fast_linear_sweep(x, y, xt, yt, weight_decay=0.0, **kw)
    assert fast_linear_sweep(x, y, xt, yt, weight_decay=[0.0], **kw)["sgd"] == plain["sgd"]
    decays = [0.0, 0.1, 3.0]
    grid = fast_linear_sweep(x, y, xt, yt, weight_decay=decays, **kw)
    other = fast_linear_sweep(x, y, xt, scrambled, weight_decay=decays, **kw)
    assert grid["weight_decays"] == decays
    for opt in ("sgd", "adam"):
        by_wd = grid[opt]["best_val_top1_by_weight_decay"]
        assert len(set(by_wd)) > 1  # the decay is applied: it changes the held-out score
        assert grid[opt]["best_val_top1"] == max(by_wd) == max(grid[opt]["val_top1"])
        assert grid[opt]["best_weight_decay"] == decays[by_wd.index(max(by_wd))]
        assert by_wd[0] == plain[opt]["best_val_top1"]  # the 0 column is the plain sweep
        assert len(grid[opt]["val_top1"]) == len(grid[opt]["test_top1"]) == len(grid[opt]["lrs"])
        assert other[opt]["best_weight_decay"] == grid[opt]["best_weight_decay"]
        assert other[opt]["best_lr"] == grid[opt]["best_lr"]
    with pytest.raises(ValueError, match="weight_decay must be >= 0"):
        fast_linear_sweep(x, y, xt, yt, weight_decay=[0.0, -1.0], **kw)
    refit = fast_linear_sweep(x, y, xt, yt, weight_decay=decays, refit=True, **{**kw, "folds": 1})
    assert refit["refit"] and refit["sgd"]["best_weight_decay"] in decays


def test_fast_sweep_refit_and_single_optimiser():
    x, y = blobs(200, 8, 3, seed=0)
    xt, yt = blobs(90, 8, 3, seed=1)
    res = fast_linear_sweep(x, y, xt, yt, sgd_lrs=[0.1], adam_lrs=[], epochs=5, refit=True)
    assert "adam" not in res and res["best_optimizer"] == "sgd"
    assert res["linear_top1"] == res["sgd"]["top1"] >= 99.0
    assert res["linear_top5"] is None  # 3 classes: no top-5



@pytest.mark.parametrize("start", [False, True])
def test_denormals_as_zero_sets_and_restores_the_mode(start):
    torch.set_flush_denormal(start)
    try:
        assert denormals_flushed() is start
        with denormals_as_zero():
            assert denormals_flushed()
        assert denormals_flushed() is start  # a caller's own setting survives
        with denormals_as_zero(False):
            assert denormals_flushed() is start
    finally:
        torch.set_flush_denormal(False)


def test_fast_sweep_trains_its_heads_with_denormals_flushed(monkeypatch):
    import s2bnn.eval.linear_sweep as sweep

    seen = []
    train_heads = sweep._train_heads

    def spy(*args, **kwargs):
        seen.append(denormals_flushed())
        return train_heads(*args, **kwargs)

    monkeypatch.setattr(sweep, "_train_heads", spy)
    # LRs up to 30 drive logits hundreds apart: exp() of the gap lands among the denormals.
    x, y = blobs(400, 16, 5, seed=0, spread=2.0)
    xt, yt = blobs(200, 16, 5, seed=1, spread=2.0)
    flushed = fast_linear_sweep(x, y, xt, yt, epochs=5, folds=1)
    assert seen and all(seen) and not denormals_flushed()
    seen.clear()
    plain = fast_linear_sweep(x, y, xt, yt, epochs=5, folds=1, flush_denormals=False)
    assert seen and not any(seen)
    for key in ("linear_top1", "linear_top1_sgd", "linear_top1_adam"):
        assert flushed[key] == plain[key]
    assert flushed["sgd"]["val_top1"] == plain["sgd"]["val_top1"]

# --------------------------------------------------------------------------- features and protocol
def test_extract_features_uses_eval_mode_and_restores_mode():
    model = TinyNet()
    model.train()
    ds = image_set(20, seed=0)
    before = snapshot_state(model)
    feats, labels = extract_features(model, make_loader(ds, 8), "cpu")
    assert model.training
    assert_state_unchanged(model, before)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(feats, model(ds.tensors[0]))
    assert labels.tolist() == ds.tensors[1].tolist() and feats.shape == (20, 6)


def test_protocol_probe_leaves_batchnorm_and_weights_untouched():
    model = TinyNet()
    # Non-trivial running stats, so an accidental update would show.
    model.body[1].running_mean.fill_(0.3)
    model.body[1].running_var.fill_(2.0)
    model.train()
    before = snapshot_state(model)
    flags = [p.requires_grad for p in model.parameters()]
    res = linear_probe_protocol(model, image_set(64, 0), image_set(32, 1), epochs=2,
                                batch_size=16, lr=0.5, device="cpu")
    after = model.state_dict()
    for key, value in before.items():
        assert torch.equal(value, after[key]), key
    assert model.training and [p.requires_grad for p in model.parameters()] == flags
    assert res["backbone_unchanged"] and res["milestones"] == [1, 1]
    assert len(res["history"]) == 2 and 0 <= res["top1"] <= 100


def test_protocol_probe_detects_a_backbone_that_changes():
    class Drifting(TinyNet):
        def forward(self, x):
            self.body[1].running_mean.add_(1.0)  # a bug: stats move even in eval mode
            return super().forward(x)

    with pytest.raises(RuntimeError, match="changed during linear evaluation"):
        linear_probe_protocol(Drifting(), image_set(16, 0), image_set(8, 1), epochs=1,
                              batch_size=8, device="cpu", feature_norm=False)


# --------------------------------------------------------------------------- fine-tune
def test_finetune_learns_and_keeps_callers_backbone():
    model = TinyNet()
    before = snapshot_state(model)
    res = finetune(model, image_set(64, 0), image_set(40, 1), epochs=8, lr=1e-2,
                   batch_size=16, device="cpu")
    assert_state_unchanged(model, before)
    assert res["top1"] >= 90.0
    assert res["num_labelled"] == 64 and len(res["history"]) == 8


@pytest.mark.parametrize("bad", [0, 0.0, -0.1, 1.5, float("nan"), "x"])
def test_label_fraction_outside_unit_interval(bad):
    with pytest.raises(UserError, match=r"\(0, 1\]"):
        check_label_fraction(bad)


def test_fraction_tag():
    assert fraction_tag(0.01) == "1" and fraction_tag(0.1) == "10" and fraction_tag(1.0) == "100"


# --------------------------------------------------------------------------- baselines
def test_extract_features_runs_the_given_forward_in_place_of_the_module():
    model, ds = TinyNet(), image_set(12, seed=0)
    feats, _ = extract_features(model, make_loader(ds, 5), "cpu",
                                forward=lambda x: x.flatten(1)[:, :3] * 2)
    torch.testing.assert_close(feats, ds.tensors[0].flatten(1)[:, :3] * 2)


def test_evaluate_backbone_says_which_forward_computed_the_features():
    train, test = image_set(40, 0), image_set(20, 1)
    sweep = {"sgd_lrs": [0.1], "adam_lrs": [], "epochs": 2}
    model = TinyNet()
    seen = []

    def fast(m):
        seen.append(m)
        return lambda x: m(x) + 0.0

    res = evaluate_backbone(model, train, test, sweep_kwargs=sweep, device="cpu", knn_k=5,
                            fast_forward=fast)
    assert seen == [model] and res["features_by"] == "fast"
    plain = evaluate_backbone(model, train, test, sweep_kwargs=sweep, device="cpu", knn_k=5)
    assert plain["features_by"] == "module" and plain["knn_top1"] == res["knn_top1"]
    declined = evaluate_untrained(TINY, {"in_chans": 1}, train, test, seeds=(0,),
                                  sweep_kwargs=sweep, device="cpu", knn_k=5,
                                  fast_forward=lambda m: None)
    assert declined["features_by"] == "module"


def test_cache_dataset_holds_the_transformed_view_and_its_classes():
    from s2bnn.data import build_dataset, build_eval_transform

    tf = build_eval_transform(8, 1, mean=(0.5,), std=(0.25,))
    ds = build_dataset("synthetic:1:8:30:3", "train", transform=tf)
    cached = cache_dataset(ds, batch_size=7)
    assert len(cached) == len(ds) and cached.classes == ds.classes
    assert cached.num_classes == ds.num_classes and cached.images.dtype == torch.float32
    for i in (0, 13, len(ds) - 1):
        x, y = ds[i]
        cx, cy = cached[i]
        torch.testing.assert_close(cx, x.float())
        assert cy == y
    # Too large for the cap: the dataset itself comes back (read image by image as before).
    assert cache_dataset(ds, max_bytes=len(ds) * 8 * 8 * 4 - 1) is ds
    plain = image_set(9, seed=0, classes=3)  # no class names: they are numbered
    assert cache_dataset(plain).classes == ["0", "1", "2"]


def test_pixel_and_untrained_baselines():
    train, test = image_set(60, 0, classes=3), image_set(30, 1, classes=3)
    sweep = {"sgd_lrs": [0.1], "adam_lrs": [1e-2], "epochs": 5}
    pix = evaluate_pixels(train, test, sweep_kwargs=sweep, device="cpu", sample_size=10)
    assert pix["feature_dim"] == 64 and pix["knn_top1"] >= 90 and pix["linear_top1"] >= 90
    assert pix["embedding_sample"]["features"].shape == (10, 64)
    one = evaluate_backbone(TinyNet(), train, test, sweep_kwargs=sweep, device="cpu")
    assert {"knn_top1", "linear_top1_sgd", "linear_top1_adam", "linear"} <= set(one)
    res = evaluate_untrained(TINY, {"in_chans": 1}, train, test, seeds=(0, 1),
                             sweep_kwargs=sweep, device="cpu")
    assert res["seeds"] == [0, 1] and len(res["per_seed"]) == 2
    values = [r["knn_top1"] for r in res["per_seed"]]
    assert res["knn_top1"] == pytest.approx(sum(values) / 2)
    assert res["knn_top1_std"] == pytest.approx(abs(values[0] - values[1]) / 2)


# --------------------------------------------------------------------------- loading and export
def test_load_backbone_from_run_dir_checkpoint_and_export(tmp_path):
    run = make_run(tmp_path)
    model, info = load_backbone(run)
    assert info["name"] == TINY and info["in_chans"] == 1 and info["run_dir"] == str(run)
    assert info["config"]["data"]["name"] == DATA and not model.training
    same, _ = load_backbone(run / "checkpoints" / "last.pt")
    out = export_backbone(run, tmp_path / "tiny.safetensors")
    exported, meta = load_backbone(out)
    assert meta["name"] == TINY and meta["config"]["data"]["name"] == DATA
    for key, value in model.state_dict().items():
        assert torch.equal(value, same.state_dict()[key])
        assert torch.equal(value, exported.state_dict()[key])
    with pytest.raises(UserError, match="--force"):
        export_backbone(run, out)
    export_backbone(run, out, force=True)


def test_checkpoint_without_backbone_is_refused(tmp_path):
    run = make_run(tmp_path, with_backbone=False)
    with pytest.raises(CheckpointError, match="holds no backbone"):
        load_backbone(run)


# --------------------------------------------------------------------------- CLI
def _one_line_error(capsys, rc: int, *needles: str) -> None:
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    assert err.startswith("s2bnn: error:") and "\n" not in err, err
    for needle in needles:
        assert needle in err, err


def test_cli_eval_knn_linear_finetune_and_export(tmp_path, capsys):
    run = make_run(tmp_path)
    assert main(["eval", "knn", str(run), "--k", "20", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["knn"]["k"] == 20 and res["data"] == DATA and res["num_classes"] == 4
    assert (run / "eval_knn.json").is_file() and (run / "eval_features.npz").is_file()

    assert main(["eval", "linear", str(run), "--epochs", "3", "--sgd-lrs", "0.1", "1",
                 "--adam-lrs", "1e-3"]) == 0
    out = capsys.readouterr().out
    assert "linear SGD top-1" in out and "learning-rate sweep" in out
    saved = json.loads((run / "eval_linear.json").read_text())
    assert saved["linear"]["sgd"]["lrs"] == [0.1, 1.0] and "linear_top1_adam" in saved

    assert main(["eval", "linear", str(run), "--mode", "protocol", "--epochs", "1",
                 "--batch-size", "64", "--limit", "64", "--json"]) == 0
    saved = json.loads((run / "eval_linear_protocol.json").read_text())
    assert saved["backbone_unchanged"] and saved["mode"] == "protocol"
    capsys.readouterr()

    assert main(["eval", "finetune", str(run), "--label-fraction", "0.1", "--epochs", "1"]) == 0
    saved = json.loads((run / "eval_finetune_10.json").read_text())
    assert saved["num_labelled"] == 20 and saved["label_fraction"] == 0.1

    target = tmp_path / "out" / "student.safetensors"
    assert main(["export", str(run), "--out", str(target)]) == 0
    capsys.readouterr()
    _one_line_error(capsys, main(["export", str(run), "--out", str(target)]), "--force")
    assert main(["export", str(run), "--out", str(target), "--force"]) == 0
    # An exported file evaluates like its run (dataset from the stored config).
    custom = tmp_path / "knn_export.json"
    assert main(["eval", "knn", str(target), "--k", "5", "--out", str(custom)]) == 0
    assert json.loads(custom.read_text())["data"] == DATA


def _protocol_call(tmp_path, monkeypatch, capsys, *flags: str) -> dict:
    """Run ``eval linear --mode protocol`` with the probe replaced by a recorder."""
    import s2bnn.eval.linear_protocol as linear_mod

    seen: dict = {}

    def record(backbone, train_ds, test_ds, **kwargs):
        seen.update(train_ds=train_ds, kwargs=kwargs)
        return {"mode": "protocol", "top1": 50.0, "top5": None}

    monkeypatch.setattr(linear_mod, "linear_probe_protocol", record)
    run = make_run(tmp_path)
    assert main(["eval", "linear", str(run), "--mode", "protocol", "--json", *flags]) == 0
    seen["json"] = json.loads(capsys.readouterr().out)
    return seen


def _crop_and_ops(train_ds) -> tuple:
    from torchvision.transforms import v2

    views = train_ds.transform.transforms  # MultiView of one view
    assert len(views) == 1
    ops = views[0].transforms
    crops = [op for op in ops if isinstance(op, v2.RandomResizedCrop)]
    assert len(crops) == 1
    return crops[0], ops


def test_cli_protocol_defaults_are_main_lincls(tmp_path, monkeypatch, capsys):
    """Bare fc, RandomResizedCrop at torchvision's 0.08-1 with flips, SGD 0.1 / 0.9 / wd 0."""
    from torchvision.transforms import v2

    seen = _protocol_call(tmp_path, monkeypatch, capsys)
    kw = seen["kwargs"]
    assert kw["feature_norm"] is False
    assert kw["lr"] == 0.1 and kw["momentum"] == 0.9 and kw["weight_decay"] == 0.0
    assert kw["epochs"] == 100 and "milestones" not in kw  # -> 60 and 80 inside the probe
    crop, ops = _crop_and_ops(seen["train_ds"])
    assert tuple(crop.scale) == pytest.approx((0.08, 1.0))
    assert tuple(crop.ratio) == pytest.approx((3 / 4, 4 / 3))
    flips = [op for op in ops if isinstance(op, v2.RandomHorizontalFlip)]
    assert len(flips) == 1 and flips[0].p == 0.5
    # Nothing else random: no colour jitter, grayscale or blur (main_lincls has none).
    assert not any(isinstance(op, (v2.RandomApply, v2.ColorJitter, v2.RandomGrayscale,
                                   v2.GaussianBlur)) for op in ops)
    assert seen["json"]["crop_scale"] == [0.08, 1.0]


def test_cli_protocol_old_behaviour_is_reachable_by_flags(tmp_path, monkeypatch, capsys):
    seen = _protocol_call(tmp_path, monkeypatch, capsys, "--feature-norm", "--crop-scale",
                          "0.2", "1")
    assert seen["kwargs"]["feature_norm"] is True
    crop, _ = _crop_and_ops(seen["train_ds"])
    assert tuple(crop.scale) == pytest.approx((0.2, 1.0))
    seen = _protocol_call(tmp_path / "b", monkeypatch, capsys, "--no-feature-norm")
    assert seen["kwargs"]["feature_norm"] is False


def test_protocol_probe_trains_a_bare_fc_by_default():
    """No BatchNorm or other normalisation sits between the frozen features and the fc."""
    torch.manual_seed(0)
    res = linear_probe_protocol(TinyNet(), image_set(32, 0), image_set(16, 1), epochs=1,
                                batch_size=16, device="cpu")
    assert res["head"] == ["Linear"] and res["feature_norm"] is False
    assert res["lr"] == 0.1 and res["momentum"] == 0.9 and res["weight_decay"] == 0.0
    assert linear_probe_protocol(TinyNet(), image_set(32, 0), image_set(16, 1), epochs=1,
                                 batch_size=16, device="cpu", feature_norm=True)["head"] == \
        ["BatchNorm1d", "Linear"]
    assert linear_probe_protocol(TinyNet(), image_set(16, 0), image_set(8, 1), epochs=100,
                                 batch_size=16, device="cpu")["milestones"] == [60, 80]


def test_cli_protocol_runs_end_to_end_with_the_bare_fc(tmp_path, capsys):
    run = make_run(tmp_path)
    assert main(["eval", "linear", str(run), "--mode", "protocol", "--epochs", "1",
                 "--batch-size", "64", "--limit", "64", "--json"]) == 0
    saved = json.loads((run / "eval_linear_protocol.json").read_text())
    assert saved["head"] == ["Linear"] and saved["crop_scale"] == [0.08, 1.0]
    _one_line_error(capsys, main(["eval", "linear", str(run), "--mode", "protocol",
                                  "--crop-scale", "0.5", "0.2"]), "--crop-scale")


def test_cli_bad_inputs_give_one_line_errors(tmp_path, capsys):
    bare = make_run(tmp_path, "bare", with_backbone=False)
    _one_line_error(capsys, main(["eval", "knn", str(bare)]), "holds no backbone")
    _one_line_error(capsys, main(["export", str(bare), "--out", str(tmp_path / "x.safetensors")]),
                    "holds no backbone")

    run = make_run(tmp_path, "ok")
    for bad in ("0", "1.5", "-0.01"):
        _one_line_error(capsys, main(["eval", "finetune", str(run), "--label-fraction", bad]),
                        "(0, 1]")
    _one_line_error(capsys, main(["eval", "linear", str(run), "--data", "synthetic:3:8:40:4"]),
                    "3-channel", "takes 1 channels")
    _one_line_error(capsys, main(["eval", "knn", str(tmp_path / "missing")]), "not found")
    _one_line_error(capsys, main(["eval", "linear", str(run), "--sgd-lrs", "--adam-lrs"]),
                    "both empty")


def test_batched_heads_match_torch_optimisers():
    """Hand-written gradients and updates equal autograd + torch.optim SGD/Adam, head by head."""
    from s2bnn.eval.linear_sweep import _train_heads

    x, y = blobs(50, 6, 3, seed=0, spread=2.0)
    sgd_lrs, adam_lrs = [0.05, 0.5], [1e-3, 3e-2]
    decays = [0.01, 0.0, 0.3, 0.01]  # one per head
    epochs, bs = 2, 16
    w, b = _train_heads(x, y, 3, sgd_lrs, adam_lrs, epochs=epochs, batch_size=bs, momentum=0.9,
                        betas=(0.9, 0.999), weight_decays=decays, seed=3)
    total = epochs * 4
    for i, (kind, lr) in enumerate([("sgd", v) for v in sgd_lrs] + [("adam", v) for v in adam_lrs]):
        head = nn.Linear(6, 3)
        nn.init.zeros_(head.weight)
        nn.init.zeros_(head.bias)
        # Weight decay on the weight only, as the batched heads do.
        groups = [{"params": [head.weight], "weight_decay": decays[i]},
                  {"params": [head.bias], "weight_decay": 0.0}]
        opt = (torch.optim.SGD(groups, lr=lr, momentum=0.9) if kind == "sgd"
               else torch.optim.Adam(groups, lr=lr))
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: 0.5 * (1 + torch.cos(torch.tensor(torch.pi * s / total)).item()))
        gen = torch.Generator().manual_seed(3)
        for _ in range(epochs):
            perm = torch.randperm(50, generator=gen)
            for start in range(0, 50, bs):
                idx = perm[start:start + bs]
                loss = nn.functional.cross_entropy(head(x[idx]), y[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
                sched.step()
        torch.testing.assert_close(w[:, i, :], head.weight.detach().T, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(b[i], head.bias.detach(), rtol=1e-4, atol=1e-5)


def test_recalibrate_batchnorm_sets_running_stats_to_data_average():
    from s2bnn.eval.finetune import recalibrate_batchnorm

    model = TinyNet().eval()
    ds = image_set(24, seed=0)
    recalibrate_batchnorm(model, ds, batch_size=8, num_workers=0, device=torch.device("cpu"))
    bn = model.body[1]
    with torch.no_grad():
        pre = model.body[0](ds.tensors[0])  # activations entering the BatchNorm
    # Three equal batches: the cumulative average of batch means is the overall mean.
    torch.testing.assert_close(bn.running_mean, pre.mean((0, 2, 3)), rtol=1e-4, atol=1e-5)
    assert bn.momentum == 0.1 and not model.training  # momentum and mode restored


def test_cli_fast_probe_epochs_default_is_the_librarys(capsys):
    from s2bnn.eval.linear_sweep import DEFAULT_EPOCHS

    with pytest.raises(SystemExit):
        main(["eval", "linear", "--help"])
    assert f"default: {DEFAULT_EPOCHS} fast" in " ".join(capsys.readouterr().out.split())
