"""The main job end to end on a tiny ImageFolder, its bad inputs, and its recipes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from s2bnn.cli import main
from s2bnn.config import config_from_dict, config_to_dict, load_config
from s2bnn.demo import (
    MOCOV2_RECIPE,
    RESULT_NAMES,
    S2BNN_RECIPE,
    TEACHER_RECIPE,
    DemoConfig,
    stage_configs,
)

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "fashion_mnist"
TINY = ["teacher_epochs=1", "s2bnn_epochs=1", "mocov2_epochs=1", "batch_size=16", "random_seeds=2",
        "eval_train_limit=null", "knn_k=5", "progress=false", "teacher_model=resnet_small",
        "student_model=reactnet_small"]


def _tree(root: Path, classes: int = 3, per_class: int = 12, size: int = 16) -> Path:
    rng = np.random.default_rng(0)
    for split, n in (("train", per_class), ("val", per_class // 3)):
        for c in range(classes):
            d = root / split / f"class{c}"
            d.mkdir(parents=True)
            for i in range(n):
                base = np.zeros((size, size), np.float32)
                base[:, c * size // classes:(c + 1) * size // classes] = 200  # class = stripe
                img = np.clip(base + rng.normal(0, 25, base.shape), 0, 255).astype(np.uint8)
                Image.fromarray(img, mode="L").save(d / f"{i}.png")
    return root


@pytest.mark.slow
def test_demo_end_to_end_on_tiny_imagefolder(tmp_path, capsys):
    data = _tree(tmp_path / "data")
    out = tmp_path / "out"
    assert main(["demo", "--data", str(data), "--out", str(out), *TINY]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["dataset"]
    names = [r["name"] for r in results["runs"]]
    assert sorted(names) == sorted(RESULT_NAMES)
    for run in results["runs"]:
        assert {"name", "method", "backbone", "binary", "knn_top1", "linear_top1"} <= set(run)
        assert 0.0 <= run["knn_top1"] <= 100.0 and 0.0 <= run["linear_top1"] <= 100.0
    by_name = {r["name"]: r for r in results["runs"]}
    assert by_name["s2bnn"]["binary"] is True and by_name["teacher"]["binary"] is False
    report = (out / "report.md").read_text()
    for name in RESULT_NAMES:
        assert name in report
    assert list(out.glob("*.png")), "the report has plots"
    printed = capsys.readouterr().out
    assert "report:" in printed and "[5/5]" in printed

    # A finished demo is not overwritten without --force, and nothing in it changes.
    before = (out / "results.json").read_bytes()
    assert main(["demo", "--data", str(data), "--out", str(out), *TINY]) == 2
    assert "--force" in capsys.readouterr().err
    assert (out / "results.json").read_bytes() == before


def test_missing_data_path_is_one_line_error(tmp_path, capsys):
    assert main(["demo", "--data", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("s2bnn: error:") and "\n" not in err
    assert not (tmp_path / "o").exists()


def test_folder_without_classes_is_one_line_error(tmp_path, capsys):
    (tmp_path / "empty" / "train").mkdir(parents=True)
    assert main(["demo", "--data", str(tmp_path / "empty"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("s2bnn: error:") and "\n" not in err


def test_unknown_demo_key_is_rejected(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path / "o"), "teacher_epoch=1"]) == 2
    assert "teacher_epoch" in capsys.readouterr().err


@pytest.mark.parametrize("embedded, recipe_file", [
    (TEACHER_RECIPE, "teacher_mocov2.yaml"),
    (S2BNN_RECIPE, "s2bnn.yaml"),
    (MOCOV2_RECIPE, "mocov2_bnn_plus.yaml"),
])
def test_demo_stages_match_the_recipes(embedded, recipe_file):
    recipe = config_to_dict(load_config(CONFIGS / recipe_file))
    demo = config_to_dict(config_from_dict({**embedded, "output_dir": "x"}))
    for block in ("model", "method", "optim"):
        if block == "method":  # the teacher's path is where the demo put its own teacher
            recipe[block]["teacher"].pop("path"), demo[block]["teacher"].pop("path")
        assert recipe[block] == demo[block], block
    assert recipe["data"]["augment"] == demo["data"]["augment"]


def test_stage_configs_chain_teacher_into_student(tmp_path):
    cfgs = stage_configs(DemoConfig(data="synthetic", teacher_epochs=2), tmp_path)
    assert cfgs["s2bnn"].method.teacher.path == cfgs["teacher"].output_dir
    assert cfgs["teacher"].epochs == 2 and cfgs["s2bnn"].method.name == "s2bnn"
    assert cfgs["mocov2"].model.name == cfgs["s2bnn"].model.name
