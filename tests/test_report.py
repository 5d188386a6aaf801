"""Reports: table, notes and PNG plots from run dirs and from plain run dicts."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import yaml

from s2bnn.checkpoint import save_checkpoint
from s2bnn.cli import main
from s2bnn.errors import RunDirError, UserError
from s2bnn.models import list_models, register_model
from s2bnn.report import collect_run, embed_2d, format_table, read_metrics, write_report

TINY = "_report_tiny"
DATA = "synthetic:1:8:120:3"
PNG = b"\x89PNG\r\n\x1a\n"


class Tiny(nn.Module):
    def __init__(self, num_classes: int = 0, in_chans: int = 1) -> None:
        super().__init__()
        self.in_chans = in_chans
        self.net = nn.Sequential(nn.Conv2d(in_chans, 4, 3, 2, 1), nn.BatchNorm2d(4), nn.ReLU(),
                                 nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.feature_dim = 4

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


if TINY not in list_models(include_private=True):
    register_model(TINY)(Tiny)


def make_run(root: Path, name: str, loss0: float, knn: list[float], cosine: bool) -> Path:
    """A tiny training run dir: config.yaml, metrics.csv and checkpoints/last.pt."""
    run = root / name
    (run / "checkpoints").mkdir(parents=True)
    config = {"output_dir": str(run), "data": {"name": DATA, "image_size": None},
              "model": {"name": TINY}, "method": {"name": name.split("_")[0]}}
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    cols = "epoch,step,loss,lr,knn_top1" + (",cosine" if cosine else "")
    rows = [cols]
    for e, k in enumerate(knn, start=1):
        for s in range(3):
            step = (e - 1) * 3 + s + 1
            cells = [str(e), str(step), f"{loss0 - 0.01 * step:.3f}", "0.001",
                     f"{k}" if s == 2 else ""]
            if cosine:
                cells.append(f"{0.1 * step:.2f}")
            rows.append(",".join(cells))
    (run / "metrics.csv").write_text("\n".join(rows) + "\n")
    torch.manual_seed(len(name))
    save_checkpoint({"format": "s2bnn", "version": 1, "config": config, "epoch": len(knn),
                     "step": 3 * len(knn), "finished": True,
                     "backbone": {"name": TINY, "kwargs": {"in_chans": 1, "num_classes": 0},
                                  "state_dict": Tiny().state_dict()}},
                    run / "checkpoints" / "last.pt")
    return run


def test_report_from_two_tiny_runs(tmp_path, capsys):
    a = make_run(tmp_path, "s2bnn_run", 4.85, [40.0, 55.0], cosine=True)
    b = make_run(tmp_path, "mocov2_run", 9.1, [35.0, 41.0], cosine=False)
    # Real evaluations of the fabricated checkpoints fill eval_*.json and the feature sample.
    for run in (a, b):
        assert main(["eval", "linear", str(run), "--epochs", "2", "--sgd-lrs", "0.1", "1",
                     "--adam-lrs", "1e-3", "1e-2", "--json"]) == 0
    assert main(["eval", "finetune", str(a), "--label-fraction", "0.1", "--epochs", "1",
                 "--json"]) == 0
    capsys.readouterr()
    out = tmp_path / "report"
    assert main(["report", str(a), str(b), "--out", str(out)]) == 0
    assert "report.md" in capsys.readouterr().out

    text = (out / "report.md").read_text()
    for needle in ("s2bnn_run", "mocov2_run", "Linear top-1 (SGD)", "Linear top-1 (Adam)",
                   "Fine-tune 10 %", TINY, "kNN top-1"):
        assert needle in text, needle
    for png in ("training_curves.png", "comparison.png", "lr_sweep.png", "feature_maps.png"):
        assert (out / png).read_bytes()[:8] == PNG, png
        assert f"]({png})" in text
    saved = json.loads((out / "report.json").read_text())
    assert [r["name"] for r in saved["runs"]] == ["s2bnn_run", "mocov2_run"]
    lin = json.loads((a / "eval_linear.json").read_text())
    row = saved["runs"][0]
    assert row["linear_top1_sgd"] == lin["linear_top1_sgd"]
    assert row["finetune"]["10"] == json.loads((a / "eval_finetune_10.json").read_text())["top1"]
    assert row["params"] == sum(p.numel() for p in Tiny().parameters())


def test_collect_run_falls_back_to_monitor_knn_and_reads_metrics(tmp_path):
    run = make_run(tmp_path, "s2bnn_a", 4.8, [30.0, 45.5], cosine=True)
    row = collect_run(run, profile=False)
    assert row["method"] == "s2bnn" and row["backbone"] == TINY
    assert row["knn_top1"] == 45.5 and row["knn_source"] == "monitor"
    metrics = read_metrics(run / "metrics.csv")
    assert len(metrics) == 6 and metrics[0]["knn_top1"] is None and metrics[2]["knn_top1"] == 30
    with pytest.raises(RunDirError, match="not a run dir"):
        collect_run(tmp_path)


def test_write_report_flags_runs_below_pixels_and_handles_bare_rows(tmp_path):
    rng = np.random.default_rng(0)
    sample = {"features": rng.normal(size=(60, 5)), "labels": np.arange(60) % 3}
    runs = [
        {"name": "pixels", "method": "pixels", "knn_top1": 84.6, "linear_top1": 84.5,
         "linear_top1_sgd": 84.5, "linear_top1_adam": 84.1},
        {"name": "random_init", "method": "none", "backbone": "reactnet_small", "binary": True,
         "params": 1_880_000, "binary_params": 1_770_000, "ops": 3.2e6, "knn_top1": 60.0,
         "knn_top1_std": 2.5, "linear_top1": 71.0, "linear_top1_sgd": 70.0,
         "linear_top1_adam": 71.0, "embedding_sample": sample},
        {"name": "teacher", "method": "mocov2", "binary": False, "linear_top1": 86.0,
         "linear_top1_sgd": 86.0},
    ]
    report = write_report(runs, tmp_path / "r", dataset="fashion-mnist", embedding="pca",
                          notes=["A note from the caller."])
    text = report.read_text()
    assert "**Below the raw-pixel baseline** (84.5 % linear top-1): random_init." in text
    assert "60.0 ± 2.5" in text and "1.88 M (1.77 M binary)" in text and "3.20 M" in text
    assert "A note from the caller." in text and "Fine-tune" not in text
    assert not (tmp_path / "r" / "training_curves.png").exists()  # no metrics: no curve plot
    assert (tmp_path / "r" / "feature_maps.png").read_bytes()[:8] == PNG
    with pytest.raises(UserError):
        write_report([], tmp_path / "empty")


def test_format_table_columns_follow_the_data():
    table = format_table([{"name": "a", "finetune": {"10": 80.0, "1": 60.0}},
                          {"name": "b", "linear_protocol_top1": 70.0}])
    header = table.splitlines()[0]
    assert header.index("Fine-tune 1 %") < header.index("Fine-tune 10 %")
    assert "Linear top-1 (protocol)" in header
    assert table.splitlines()[3].count("—") >= 5  # row b: missing values shown as dashes


def test_embed_2d_pca_finds_the_main_direction():
    rng = np.random.default_rng(0)
    x = np.outer(rng.normal(size=200), [3.0, 0, 0, 0]) + 0.01 * rng.normal(size=(200, 4))
    xy = embed_2d(x, "pca")
    assert xy.shape == (200, 2)
    assert abs(np.corrcoef(xy[:, 0], x[:, 0])[0, 1]) > 0.99
    assert embed_2d(x[:40], "tsne").shape == (40, 2)
    with pytest.raises(UserError):
        embed_2d(x, "umap")


def test_write_report_takes_evaluation_dicts_as_they_are(tmp_path):
    from torch.utils.data import TensorDataset

    from s2bnn.eval import evaluate_pixels

    gen = torch.Generator().manual_seed(0)
    y = torch.arange(60) % 3
    x = y.view(-1, 1, 1, 1).float() + 0.3 * torch.randn(60, 1, 4, 4, generator=gen)
    train, test = TensorDataset(x[:40], y[:40]), TensorDataset(x[40:], y[40:])
    res = evaluate_pixels(train, test, device="cpu", sample_size=20,
                          sweep_kwargs={"sgd_lrs": [0.1], "adam_lrs": [1e-2], "epochs": 3})
    report = write_report([{"name": "pixels", "method": "pixels", **res}], tmp_path)
    for png in ("lr_sweep.png", "feature_maps.png", "comparison.png"):
        assert (tmp_path / png).read_bytes()[:8] == PNG, png
    row = json.loads((tmp_path / "report.json").read_text())["runs"][0]
    assert row["linear_top1"] == res["linear_top1"] and "embedding_sample" not in row
    assert f"{res['knn_top1']:.1f}" in report.read_text()
