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
    STAGE_SHARES,
    TEACHER_RECIPE,
    DemoConfig,
    stage_configs,
    weak_results,
)

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "fashion_mnist"
TINY = ["teacher_steps=3", "s2bnn_steps=3", "mocov2_epochs=1", "batch_size=16", "random_seeds=2",
        "eval_train_limit=null", "knn_k=5", "progress=false", "teacher_model=resnet_small",
        "student_model=reactnet_small"]


def _tree(root: Path, classes: int = 3, per_class: int = 12, size: int = 16,
          colour: bool = False) -> Path:
    rng = np.random.default_rng(0)
    for split, n in (("train", per_class), ("val", per_class // 3)):
        for c in range(classes):
            d = root / split / f"class{c}"
            d.mkdir(parents=True)
            for i in range(n):
                base = np.zeros((size, size), np.float32)
                base[:, c * size // classes:(c + 1) * size // classes] = 200  # class = stripe
                img = np.clip(base + rng.normal(0, 25, base.shape), 0, 255).astype(np.uint8)
                if colour:  # RGB, the stripe in a colour of its own
                    img = np.stack([img if k != c % 3 else img // 2 for k in range(3)], axis=-1)
                Image.fromarray(img, mode="RGB" if colour else "L").save(d / f"{i}.png")
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
    # The binary networks' features come from the packed 1-bit runtime where it is built.
    from s2bnn.deploy._build import kernels

    packed = "packed" if kernels() is not None else "module"
    for name in ("s2bnn", "mocov2", "random_init"):
        assert by_name[name]["features_by"] == packed, name
    assert by_name["teacher"]["features_by"] == "module"
    report = (out / "report.md").read_text()
    for name in RESULT_NAMES:
        assert name in report
    assert list(out.glob("*.png")), "the report has plots"
    printed = capsys.readouterr().out
    assert "report:" in printed and "[6/6]" in printed
    # Each stage says what it got; stages sized by steps get exactly those steps.
    assert results["stages"]["teacher"]["steps"] == results["stages"]["s2bnn"]["steps"] == 3
    assert results["stages"]["mocov2"]["steps"] == 36 // 16  # one epoch of 36 images
    assert "teacher: 3 steps" in printed
    # On a CPU with 2+ threads the two students train side by side, one process each.
    import torch

    side = results["stages"]["s2bnn"].get("side_by_side")
    assert bool(side) == (torch.get_num_threads() >= 2)
    if side:
        assert side == {"with": ["mocov2"], "threads": torch.get_num_threads() // 2}
        assert "side by side with s2bnn" in printed and "side by side with mocov2" in printed
    # 3 steps are far too few: the summary and the report say so, with the fix.
    assert any("only 3 optimiser steps" in w and "budget=" in w for w in results["warnings"])
    assert "WARNING: the teacher stage trained only 3 optimiser steps" in printed
    assert "WARNING" in report

    # A finished demo is not overwritten without --force, and nothing in it changes.
    before = (out / "results.json").read_bytes()
    assert main(["demo", "--data", str(data), "--out", str(out), *TINY]) == 2
    assert "--force" in capsys.readouterr().err
    assert (out / "results.json").read_bytes() == before


def test_demo_brings_large_images_down_to_what_a_cpu_budget_affords(tmp_path):
    """Images above 64 px (which training would take to 224) are trained and probed at
    CPU_MAX_IMAGE_SIZE on a CPU, with a line saying so; smaller images and an explicit
    image_size are left alone."""
    from s2bnn.demo import CPU_MAX_IMAGE_SIZE, demo_image_size

    big = str(_tree(tmp_path / "big", size=80, colour=True))
    small = str(_tree(tmp_path / "small", size=40, colour=True))
    size, note = demo_image_size(DemoConfig(data=big, device="cpu"), 80)
    assert size == CPU_MAX_IMAGE_SIZE == 64
    assert "80 px" in note and "at 64 px" in note and "image_size=80" in note
    assert demo_image_size(DemoConfig(data=small, device="cpu"), 40) == (40, None)
    assert demo_image_size(DemoConfig(data=big, device="cpu", image_size=96), 80) == (96, None)
    assert demo_image_size(DemoConfig(device="cpu"), 28) == (28, None)


@pytest.mark.slow
def test_demo_trains_and_probes_large_images_at_the_cpu_size(tmp_path, capsys):
    data = _tree(tmp_path / "data", size=80, colour=True)
    out = tmp_path / "out"
    tiny = [t for t in TINY if not t.startswith("mocov2_epochs")] + ["mocov2_steps=2"]
    assert main(["demo", "--data", str(data), "--out", str(out), "device=cpu", *tiny]) == 0
    printed = capsys.readouterr().out
    assert "3x64x64" in printed and "the images are 80 px" in printed
    for stage in ("teacher", "s2bnn", "mocov2"):
        assert load_config(out / "runs" / stage / "config.yaml").data.image_size == 64, stage
    assert json.loads((out / "demo_config.json").read_text())["image_size"] == 64
    assert "the images are 80 px" in (out / "report.md").read_text()


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


def test_unknown_student_model_stops_before_any_work(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path / "o"), "student_model=nope"]) == 2
    err = capsys.readouterr().err.strip()
    assert "student_model" in err and "'nope'" in err and "reactnet_compact" in err
    assert "\n" not in err
    assert not (tmp_path / "o").exists()


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
    if "batch_size" in embedded:  # a recipe's own batch (the teacher's) is kept in step too
        assert recipe["batch_size"] == embedded["batch_size"]


def test_stages_after_an_overrun_still_get_seconds_and_valid_configs(tmp_path):
    # The teacher ran past the whole budget (another job slowed it): the stages after it get the
    # floor, not zero, and every stage's config builds (a 10k demo once died here with
    # "config key 'time_budget': a duration must be > 0 seconds, got 0.0").
    from s2bnn.demo import MIN_STAGE_FRACTION, stage_seconds

    todo = {"s2bnn": STAGE_SHARES["s2bnn"], "mocov2": STAGE_SHARES["mocov2"]}
    seconds = stage_seconds(-30.0, todo, 600.0, first=False)
    assert seconds == {"s2bnn": MIN_STAGE_FRACTION * 600.0, "mocov2": MIN_STAGE_FRACTION * 600.0}
    cfgs = stage_configs(DemoConfig(data="synthetic"), tmp_path, seconds=seconds)
    assert float(cfgs["mocov2"].time_budget) == pytest.approx(MIN_STAGE_FRACTION * 600.0, abs=0.1)
    # With time left the shares are kept; before the first stage nothing is floored.
    fine = stage_seconds(290.0, todo, 600.0, first=False)
    assert fine["s2bnn"] / fine["mocov2"] == pytest.approx(todo["s2bnn"] / todo["mocov2"])
    assert stage_seconds(-1.0, {"teacher": 0.4}, 600.0, first=True) == {"teacher": 0.0}


def test_stages_keep_their_recipe_batch(tmp_path):
    cfgs = stage_configs(DemoConfig(data="synthetic", batch_size=512), tmp_path)
    assert cfgs["teacher"].batch_size == TEACHER_RECIPE["batch_size"] < 512
    assert cfgs["s2bnn"].batch_size == S2BNN_RECIPE["batch_size"] < 512
    assert cfgs["mocov2"].batch_size == 512  # no batch of its own: the demo's
    small = stage_configs(DemoConfig(data="synthetic", batch_size=16), tmp_path)
    assert {c.batch_size for c in small.values()} == {16}  # the demo's batch caps the recipes


@pytest.mark.slow
@pytest.mark.parametrize("side_by_side", [False, True])
def test_demo_sized_by_its_budget_ends_within_it(tmp_path, capsys, side_by_side):
    """No stage sized by hand: the budget is divided between the stages, each trains the steps
    that fit its part, and the whole demo ends within the budget, with the students one after
    the other or side by side."""
    data = _tree(tmp_path / "data")
    sized = [a for a in TINY if not a.startswith(("teacher_", "s2bnn_", "mocov2_"))]
    assert main(["demo", "--data", str(data), "--out", str(tmp_path / "o"), *sized,
                 "budget=40s", "teacher_max_epochs=null",
                 f"side_by_side={str(side_by_side).lower()}"]) == 0
    results = json.loads((tmp_path / "o" / "results.json").read_text())
    stages = results["stages"]
    assert set(stages) == {"teacher", "s2bnn", "mocov2"}
    assert "epoch_cap" not in stages["teacher"]
    for got in stages.values():
        assert got["steps"] >= 1 and got["budget_seconds"] > 0
        assert got["seconds"] <= 1.25 * got["budget_seconds"] + 2
    if side_by_side:  # each student trains for all the time the teacher left, at once
        assert stages["s2bnn"]["budget_seconds"] == stages["mocov2"]["budget_seconds"]
        assert stages["mocov2"]["budget_seconds"] > stages["teacher"]["budget_seconds"]
        assert stages["s2bnn"]["side_by_side"]["with"] == ["mocov2"]
    else:
        assert stages["teacher"]["budget_seconds"] > stages["mocov2"]["budget_seconds"]
        assert "side_by_side" not in stages["s2bnn"]
    assert results["wall_seconds"] <= 1.1 * 40 + 3


def test_side_by_side_threads(monkeypatch):
    import torch

    import s2bnn.devices
    from s2bnn.demo import side_by_side_threads

    auto, on, off = (DemoConfig(data="synthetic", side_by_side=v) for v in (None, True, False))
    for threads, halves in ((2, 1), (16, 8), (3, 1)):
        monkeypatch.setattr(torch, "get_num_threads", lambda t=threads: t)
        assert side_by_side_threads(auto) == side_by_side_threads(on) == halves
        assert side_by_side_threads(off) == 0
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    assert side_by_side_threads(auto) == 0 and side_by_side_threads(on) == 1
    # On a GPU the students share one device: auto keeps them one after the other.
    monkeypatch.setattr(torch, "get_num_threads", lambda: 16)
    monkeypatch.setattr(s2bnn.devices, "resolve_device", lambda pref: torch.device("cuda", 0))
    assert side_by_side_threads(auto) == 0 and side_by_side_threads(on) == 8


@pytest.mark.slow
def test_side_by_side_stage_errors_reach_the_parent(tmp_path):
    """A user error in one side-by-side stage stops both and is raised as itself; a good pair
    returns each stage's run dir."""
    from s2bnn.demo import train_side_by_side
    from s2bnn.errors import DataError

    def cfg(name: str, data: str) -> object:
        return config_from_dict({"output_dir": str(tmp_path / name), "steps": 2,
                                 "batch_size": 8, "progress": False, "model": {
                                     "name": "resnet_small"}, "method": {"name": "mocov2",
                                     "queue_size": 16}, "data": {"name": data}})

    got = train_side_by_side({"a": cfg("a", "synthetic:1:16:32:2"),
                              "b": cfg("b", "synthetic:1:16:32:2")}, threads=1, progress=False)
    assert {n: p.name for n, (p, _) in got.items()} == {"a": "a", "b": "b"}
    assert all(sec > 0 for _, sec in got.values())
    missing = str(tmp_path / "nowhere")
    with pytest.raises(DataError, match="nowhere"):
        train_side_by_side({"a": cfg("c", "synthetic:1:16:32:2"), "b": cfg("d", missing)},
                           threads=1, progress=False)
    # A stage killed mid-run: test_side_by_side_killed_stage_stops_both_and_leaks_nothing.


_STOPPED_STAGE_SCRIPT = """
import multiprocessing, os, signal, threading, time
from pathlib import Path
from s2bnn.config import config_from_dict
from s2bnn.demo import train_side_by_side
from s2bnn.errors import TrainingError

OUT = Path({out!r})


def cfg(name):
    return config_from_dict({{"output_dir": str(OUT / name), "steps": 100000, "batch_size": 8,
                             "progress": False, "model": {{"name": "resnet_small"}},
                             "method": {{"name": "mocov2", "queue_size": 16}},
                             "data": {{"name": "synthetic:1:16:32:2"}}}})


def kill_one():  # as the kernel's OOM killer would, once both train (past their first tqdm)
    deadline = time.time() + 90
    while time.time() < deadline and not all((OUT / n / "metrics.csv").is_file() for n in "ab"):
        time.sleep(0.2)
    os.kill(multiprocessing.active_children()[0].pid, signal.SIGKILL)


if __name__ == "__main__":
    threading.Thread(target=kill_one, daemon=True).start()
    try:
        train_side_by_side({{"a": cfg("a"), "b": cfg("b")}}, threads=1, progress=False)
    except TrainingError as err:
        print("stopped:", err)
    print("children left:", len(multiprocessing.active_children()))
"""


@pytest.mark.slow
def test_side_by_side_killed_stage_stops_both_and_leaks_nothing(tmp_path):
    """A side-by-side stage killed mid-run is a TrainingError naming its exit code; the other
    one is stopped too, and neither leaves named semaphores: the parent's resource tracker
    prints no 'leaked semaphore' warning at exit (each stage's training made tqdm bars, whose
    default lock is such a semaphore). Run in its own interpreter, whose exit is the check."""
    import subprocess
    import sys

    script = tmp_path / "run.py"
    script.write_text(_STOPPED_STAGE_SCRIPT.format(out=str(tmp_path / "runs")))
    got = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                         timeout=300)
    lines = got.stdout.strip().splitlines()
    assert len(lines) == 2 and lines[0].startswith("stopped:"), got.stderr[-2000:]
    assert "exit code -9" in lines[0]
    assert lines[1] == "children left: 0"  # the other one was stopped too
    assert "leaked" not in got.stderr, got.stderr[-2000:]


def test_budgeted_teacher_is_capped_in_epochs(tmp_path):
    from s2bnn.demo import MIN_STEPS, _describe_stage, teacher_epoch_cap

    assert teacher_epoch_cap(20, 2000, 128) == 20  # 15 steps an epoch: 300 steps at most
    assert teacher_epoch_cap(20, 60000, 128) == 20  # never reached in a 10-minute demo
    # 3 steps an epoch: the cap is raised so that it still allows MIN_STEPS steps.
    assert teacher_epoch_cap(20, 500, 128) == -(-MIN_STEPS // 3)
    assert teacher_epoch_cap(None, 500, 128) is None and teacher_epoch_cap(20, None, 128) == 20
    cfgs = stage_configs(DemoConfig(data="synthetic"), tmp_path, num_train=2000)
    assert cfgs["teacher"].time_budget_max_epochs == DemoConfig().teacher_max_epochs == 40
    assert cfgs["s2bnn"].time_budget_max_epochs is cfgs["mocov2"].time_budget_max_epochs is None
    fixed = stage_configs(DemoConfig(data="synthetic", teacher_steps=5), tmp_path, num_train=2000)
    assert fixed["teacher"].time_budget_max_epochs is None  # a fixed size is not capped
    # Budgeted stages re-plan their steps as they train; a fixed size is what it says.
    assert fixed["s2bnn"].time_budget_replan and not fixed["teacher"].time_budget_replan
    off = stage_configs(DemoConfig(data="synthetic", teacher_max_epochs=None), tmp_path,
                        num_train=2000)
    assert off["teacher"].time_budget_max_epochs is None
    text = _describe_stage("teacher", {"steps": 300, "epochs": 20.0, "seconds": 150.0,
                                       "budget_seconds": 240.0, "epoch_cap": 20})
    assert "stopped at 20 epochs (teacher_max_epochs)" in text and "students" in text


@pytest.mark.slow
def test_demo_teacher_stopped_by_its_cap_leaves_its_time_to_the_students(tmp_path, capsys,
                                                                         monkeypatch):
    import s2bnn.demo

    monkeypatch.setattr(s2bnn.demo, "MIN_STEPS", 1)  # a tiny folder: let the cap bind at 2
    data = _tree(tmp_path / "data")
    sized = [a for a in TINY if not a.startswith(("teacher_", "s2bnn_", "mocov2_"))]
    assert main(["demo", "--data", str(data), "--out", str(tmp_path / "o"), *sized,
                 "budget=30s", "teacher_max_epochs=2", "max_teachers=2"]) == 0
    results = json.loads((tmp_path / "o" / "results.json").read_text())
    teacher, s2bnn = results["stages"]["teacher"], results["stages"]["s2bnn"]
    assert teacher["epoch_cap"] == 2 and teacher["epochs"] == 2.0
    assert teacher["seconds"] < 0.5 * teacher["budget_seconds"]
    # The time it left trained a second teacher (max_teachers=2), as long as the first, and the
    # S2-BNN student distilled from both; the rest went to the students.
    assert teacher["teachers"] == 2
    (second,) = teacher["more_teachers"]
    assert second["seed"] == 1 and second["epochs"] == 2.0
    from s2bnn.eval.loading import read_run_config

    extra = read_run_config(tmp_path / "o" / "runs" / "s2bnn")["method"]["teacher"]["extra_paths"]
    assert extra == [str(tmp_path / "o" / "runs" / "teacher_2")]
    assert s2bnn["budget_seconds"] > teacher["budget_seconds"]
    out = capsys.readouterr().out
    assert "stopped at 2 epochs (teacher_max_epochs); 1 more teacher (seed 1" in out
    assert "distils from all 2" in out
    assert results["wall_seconds"] <= 1.1 * 30 + 3


@pytest.mark.parametrize("over, needle", [
    (["teacher_max_epochs=0"], "'teacher_max_epochs' must be > 0"),
    (["max_teachers=0"], "'max_teachers' must be >= 1"),
    (["budget=soon"], "demo key 'budget'"),
    (["budget=-3"], "demo key 'budget'"),
    (["teacher_steps=5", "teacher_epochs=1"], "'teacher_steps' and 'teacher_epochs'"),
    (["s2bnn_steps=0"], "'s2bnn_steps' must be > 0"),
    (["side_by_side=maybe"], "config key 'side_by_side'"),
    (["budget=1s", "eval_train_limit=null"], "used up before the teacher stage"),
])
def test_bad_demo_budget_is_one_line_and_writes_nothing_old(tmp_path, capsys, over, needle):
    data = _tree(tmp_path / "data")
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep.txt").write_text("earlier work")
    code = main(["demo", "--data", str(data), "--out", str(out), *TINY[4:], *over])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("s2bnn: error:") and err.count("\n") == 1, err
    assert needle in err, err
    assert (out / "keep.txt").read_text() == "earlier work"
    assert not (out / "runs").exists()


def test_large_images_on_a_missing_device_are_one_line_and_write_nothing(tmp_path, capsys):
    """Choosing the size of images above 64 px asks which device the demo runs on, before any
    work: a device that is not there is the usual one-line error."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("needs a machine without CUDA")
    data = _tree(tmp_path / "data", size=80, colour=True)
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep.txt").write_text("earlier work")
    code = main(["demo", "--data", str(data), "--out", str(out), *TINY[4:], "device=cuda"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("s2bnn: error:") and err.count("\n") == 1, err
    assert "device=cuda but no CUDA device is visible" in err, err
    assert (out / "keep.txt").read_text() == "earlier work"
    assert not (out / "runs").exists() and not (out / "demo_config.json").exists()


def test_claims_call_a_gap_within_the_sampling_error_a_tie():
    """A claim's verdict follows the numbers; with the test set's size, a gap smaller than twice
    one accuracy's binomial error is said to be within it, and the error itself is stated."""
    from s2bnn.demo import _check_claims
    from s2bnn.eval.features import accuracy_stderr

    assert accuracy_stderr(83.0, 1000) == pytest.approx(1.188, abs=1e-3)
    assert accuracy_stderr(83.0, 10000) == pytest.approx(0.3756, abs=1e-4)
    assert accuracy_stderr(100.0, 50) == 0.0
    with pytest.raises(ValueError):
        accuracy_stderr(50.0, 0)
    rows = {"pixels": {"linear_top1": 83.2}, "teacher": {"linear_top1": 84.0},
            "random_init": {"linear_top1": 67.9}, "mocov2": {"linear_top1": 78.5},
            "s2bnn": {"linear_top1": 83.9}}
    plain = _check_claims(rows)
    assert len(plain) == 4 and not any("sampling error" in line for line in plain)
    assert plain[0].endswith("holds") and plain[3].endswith("holds")
    assert plain[2] == "MoCo v2 student > untrained student (78.5 vs 67.9): holds"
    sized = _check_claims(rows, 1000)
    assert sized[0].endswith("holds")  # 5.4 points apart: beyond the error
    assert "holds, but the gap (0.80) is within twice" in sized[3]  # teacher vs pixels
    assert "(2 x 1.18 = 2.36)" in sized[3] and "1,000 test images" in sized[3]
    # A gap that rounds to twice the rounded error: both shown to two decimals.
    edge = _check_claims({**rows, "teacher": {"linear_top1": 84.7},
                          "pixels": {"linear_top1": 82.3}}, 1000)
    assert "the gap (2.40) is within" in edge[3] and "(2 x 1.21 = 2.41)" in edge[3]
    assert "±1.2 points" in sized[4]
    assert _check_claims(rows, 100000)[3].endswith("holds")  # 0.8 apart, error 0.12
    # The paper's ordering ends with MoCo v2 above the untrained network; below it, it fails.
    below = _check_claims({**rows, "mocov2": {"linear_top1": 21.7},
                           "random_init": {"linear_top1": 26.9}}, 600)
    assert below[2] == "MoCo v2 student > untrained student (21.7 vs 26.9): does NOT hold"
    flipped = _check_claims({**rows, "mocov2": {"linear_top1": 84.5}}, 1000)
    assert "does NOT hold, but the gap (0.60)" in flipped[0]


def test_weak_results_name_the_cause_and_the_fix():
    rows = {"pixels": {"linear_top1": 84.0}, "teacher": {"linear_top1": 80.0},
            "random_init": {"linear_top1": 40.0}, "s2bnn": {"linear_top1": 42.0}}
    stages = {"teacher": {"steps": 45, "epochs": 3.0}, "s2bnn": {"steps": 5000, "epochs": 20.0}}
    warnings = weak_results(rows, stages, "10m")
    assert len(warnings) == 3
    assert "teacher stage trained only 45 optimiser steps (3 epochs)" in warnings[0]
    assert "not above raw pixels" in warnings[1] and "stronger teacher" in warnings[1]
    assert "barely above the untrained" in warnings[2]
    below = weak_results({**rows, "s2bnn": {"linear_top1": 38.0}}, {}, "10m")
    assert "S2-BNN student (38.0) is not above the untrained network (40.0)" in below[1]
    good = {"pixels": {"linear_top1": 84.0}, "teacher": {"linear_top1": 86.0},
            "random_init": {"linear_top1": 40.0}, "s2bnn": {"linear_top1": 82.0}}
    assert weak_results(good, {"s2bnn": {"steps": 5000, "epochs": 20.0}}, "10m") == []
    far = {**good, "s2bnn": {"linear_top1": 60.0}}
    assert "points below its teacher" in weak_results(far, {}, "10m")[0]
    # A MoCo v2 student at or below the untrained network is named, with its likely causes.
    moco = weak_results({**good, "mocov2": {"linear_top1": 38.5}}, {}, "10m")
    assert len(moco) == 1 and "MoCo v2 student (38.5) is not above the untrained" in moco[0]
    assert "colour" in moco[0] and "budget=30m" in moco[0]
    assert weak_results({**good, "mocov2": {"linear_top1": 55.0}}, {}, "10m") == []
    # A teacher that stopped at its epoch cap is short of data, not of time: no "more time".
    small = {**good, "teacher": {"linear_top1": 79.0}}
    capped = weak_results(small, {"teacher": {"steps": 300, "epochs": 20.0, "epoch_cap": 20}},
                          "10m")
    assert len(capped) == 1 and "after 20 epochs" in capped[0], capped
    assert "more unlabelled images" in capped[0] and "budget=30m" not in capped[0]


def test_stage_configs_chain_teacher_into_student(tmp_path):
    cfgs = stage_configs(DemoConfig(data="synthetic", teacher_epochs=2), tmp_path)
    assert cfgs["s2bnn"].method.teacher.path == cfgs["teacher"].output_dir
    assert cfgs["teacher"].epochs == 2 and cfgs["s2bnn"].method.name == "s2bnn"
    # Stages without a fixed size get a time budget: their share of the demo's budget.
    assert cfgs["s2bnn"].epochs is None and float(cfgs["s2bnn"].time_budget) == pytest.approx(
        600 * STAGE_SHARES["s2bnn"], abs=0.1)
    cfgs = stage_configs(DemoConfig(data="synthetic", s2bnn_steps=7), tmp_path,
                         seconds={"mocov2": 12.5})
    assert cfgs["s2bnn"].steps == 7 and cfgs["mocov2"].time_budget == "12.5"
    assert cfgs["mocov2"].model.name == cfgs["s2bnn"].model.name


def test_student_target_follows_the_teacher_model(tmp_path):
    """The S2-BNN stage distils the teacher's last two stages, and its head's width is theirs,
    for whichever teacher_model the demo trains; a network whose stages the library cannot
    read falls back to its pooled features rather than stopping the demo."""
    from s2bnn.demo import distill_target

    cfg = stage_configs(DemoConfig(data="synthetic"), tmp_path)["s2bnn"].method
    grid = S2BNN_RECIPE["method"]["teacher"]["grid"]
    assert ((cfg.teacher.stages, cfg.teacher.grid, cfg.proj_dim)
            == (2, grid, grid**2 * (96 + 192)) == distill_target("resnet_small", 2, grid))
    wide = stage_configs(DemoConfig(data="synthetic", teacher_model="resnet18"), tmp_path)
    wide_cfg = wide["s2bnn"].method
    assert ((wide_cfg.teacher.stages, wide_cfg.teacher.grid, wide_cfg.proj_dim)
            == (2, grid, grid**2 * (256 + 512)))
    assert distill_target("resnet_small", 2, 2) == (2, 2, 4 * (96 + 192))
    assert distill_target("mobilenet_v3_small", 2, 2) == (1, 1, 576)


def test_teachers_that_fit_the_share_the_first_one_left():
    from s2bnn.demo import teachers_that_fit

    assert teachers_that_fit(240.0, 50.0, 2) == 2
    assert teachers_that_fit(240.0, 50.0, 4) == 4  # 190 s left: 3 more of 50 s
    assert teachers_that_fit(240.0, 50.0, 9) == 4  # ... and no more than fit
    assert teachers_that_fit(240.0, 120.0, 4) == 2
    assert teachers_that_fit(240.0, 130.0, 4) == 1  # what is left is shorter than one teacher
    assert teachers_that_fit(240.0, 300.0, 4) == 1  # overran its share
    assert teachers_that_fit(240.0, 50.0, 1) == 1
    assert teachers_that_fit(240.0, 0.0, 4) == 1  # nothing measured (a reused run)


def test_stage_configs_with_several_teachers(tmp_path):
    from s2bnn.demo import teacher_dir

    one = stage_configs(DemoConfig(data="synthetic", seed=3), tmp_path, num_train=2000)
    assert one["s2bnn"].method.teacher.extra_paths == [] and "teacher_2" not in one
    cfgs = stage_configs(DemoConfig(data="synthetic", seed=3), tmp_path, num_train=2000,
                         teachers=3, seconds={"teacher_2": 40.0, "teacher_3": 35.5})
    assert cfgs["s2bnn"].method.teacher.path == cfgs["teacher"].output_dir
    assert cfgs["s2bnn"].method.teacher.extra_paths == [str(teacher_dir(tmp_path, 2)),
                                                        str(teacher_dir(tmp_path, 3))]
    for k, sec in ((2, "40.0"), (3, "35.5")):
        extra, first = config_to_dict(cfgs[f"teacher_{k}"]), config_to_dict(cfgs["teacher"])
        assert extra.pop("seed") == 3 + k - 1 and extra.pop("time_budget") == sec
        assert extra.pop("output_dir") == cfgs["s2bnn"].method.teacher.extra_paths[k - 2]
        for key in ("seed", "time_budget", "output_dir"):
            first.pop(key)
        assert extra == first  # the same recipe, the same epoch cap
    assert cfgs["teacher_2"].time_budget_max_epochs == DemoConfig().teacher_max_epochs


def test_a_resumed_demo_keeps_its_teacher_count(tmp_path, monkeypatch):
    """The count is decided once, from the first teacher's time, and kept in runs/teachers.json:
    a demo resumed after its first teacher (reused, 0 s) trains the same extra teachers."""
    import s2bnn.demo as demo

    trained = []
    monkeypatch.setattr(demo, "train_stage", lambda cfg, any_budget=False: (
        trained.append((cfg.output_dir, cfg.seed, float(cfg.time_budget))) or (
            Path(cfg.output_dir), 30.0)))
    monkeypatch.setattr(demo, "stage_summary", lambda run, sec, budget, cap=None: {
        "steps": 300, "epochs": 20.0, "seconds": sec, "budget_seconds": budget})
    plan = DemoConfig(data="synthetic", max_teachers=3)
    first = {"steps": 300, "epochs": 20.0, "seconds": 40.0, "epoch_cap": 20}
    assert demo._more_teachers(plan, tmp_path, False, 2000, 200.0, first) == 3
    assert [t[:2] for t in trained] == [(str(demo.teacher_dir(tmp_path, k)), k - 1)
                                       for k in (2, 3)]
    assert trained[0][2] == pytest.approx(80.0, abs=1.0)  # 160 s left, for two teachers
    assert first["teachers"] == 3 and [t["seed"] for t in first["more_teachers"]] == [1, 2]
    assert "2 more teachers (seeds 1, 2" in demo._describe_stage("teacher", first)
    assert "distils from all 3" in demo._describe_stage("teacher", first)
    trained.clear()
    reused = {"steps": 300, "epochs": 20.0, "seconds": 0.0, "epoch_cap": 20}
    assert demo._more_teachers(plan, tmp_path, False, 2000, 200.0, reused) == 3
    assert len(trained) == 2
    # Not stopped by its cap (it used its share), or a fixed size: one teacher.
    trained.clear()
    assert demo._more_teachers(plan, tmp_path, True, 2000, 200.0, {"seconds": 190.0}) == 1
    assert demo._more_teachers(plan, tmp_path, True, 2000, None, dict(first)) == 1
    assert trained == [] and json.loads((tmp_path / "runs" / "teachers.json").read_text()) == {
        "teachers": 1}
    # A record of 3 from an earlier run does not outvote a smaller max_teachers now, and with
    # one teacher asked for nothing is recorded or trained.
    (tmp_path / "runs" / "teachers.json").write_text('{"teachers": 3}')
    two = DemoConfig(data="synthetic", max_teachers=2)
    assert demo._more_teachers(two, tmp_path, False, 2000, 200.0, dict(reused)) == 2
    assert len(trained) == 1
    off = tmp_path / "off"
    got = dict(first)
    assert demo._more_teachers(DemoConfig(data="synthetic"), off, False, 2000, 200.0, got) == 1
    assert got["teachers"] == 1 and got["more_teachers"] == [] and not off.exists()


def test_demo_precision_reaches_every_stage(tmp_path, capsys):
    assert {c.precision for c in stage_configs(DemoConfig(data="synthetic"), tmp_path).values()
            } == {"auto"}
    for precision in ("fp32", "bf16"):
        cfgs = stage_configs(DemoConfig(data="synthetic", precision=precision), tmp_path)
        assert {c.precision for c in cfgs.values()} == {precision}
    assert main(["demo", "--data", "synthetic", "--out", str(tmp_path / "o"),
                 "precision=fp16"]) == 2
    err = capsys.readouterr().err.strip()
    assert "precision" in err and "fp16" in err and "\n" not in err
    assert not (tmp_path / "o").exists()


def test_finished_stage_reuse_and_time_budgets(tmp_path):
    """A resumed demo keeps a finished stage whatever its budget; a forced rerun does not."""
    from s2bnn.demo import finished_with_same_config
    from s2bnn.engine import train

    base = {"output_dir": str(tmp_path / "t"), "progress": False, "batch_size": 8,
            "data": {"name": "synthetic:1:8:32:4"}, "model": {"name": "resnet_small"},
            "method": {"name": "mocov2", "queue_size": 16}}
    train(config_from_dict({**base, "steps": 2}))
    assert finished_with_same_config(config_from_dict({**base, "steps": 2}))
    assert not finished_with_same_config(config_from_dict({**base, "steps": 3}))
    budgeted = {**base, "output_dir": str(tmp_path / "b"), "time_budget": "3"}
    train(config_from_dict(budgeted))
    other = config_from_dict({**budgeted, "time_budget": "30"})
    assert finished_with_same_config(other, any_budget=True)
    assert not finished_with_same_config(other)


def test_both_students_are_the_demo_student_model(tmp_path):
    # The recipes name reactnet_small (the paper comparisons' configs); the demo trains and
    # compares its own student_model in both student stages and in the untrained baseline.
    cfgs = stage_configs(DemoConfig(data="synthetic"), tmp_path)
    assert cfgs["s2bnn"].model.name == cfgs["mocov2"].model.name == "reactnet_compact"
    other = stage_configs(DemoConfig(data="synthetic", student_model="reactnet_small"), tmp_path)
    assert other["s2bnn"].model.name == other["mocov2"].model.name == "reactnet_small"


def _binary_student(size: int = 16):
    import torch

    from s2bnn.models import build_model

    torch.manual_seed(0)
    model = build_model("reactnet_small", num_classes=0, in_chans=1, binary_act=True,
                        binary_weight=True)
    model.train()
    with torch.no_grad():  # running statistics away from the identity, as after training
        for _ in range(3):
            model(torch.randn(32, 1, size, size))
    return model.eval()


def test_packed_forward_runs_binary_nets_on_the_packed_runtime_and_declines_the_rest(
        monkeypatch):
    import torch

    import s2bnn.deploy
    from s2bnn.demo import packed_forward
    from s2bnn.deploy import _build
    from s2bnn.models import build_model

    model, sample = _binary_student(), torch.randn(16, 1, 16, 16)
    fast = packed_forward(model, sample, device="cpu")
    if _build.kernels() is None:  # no C compiler here: the module evaluates itself
        assert fast is None
        return
    assert isinstance(fast, s2bnn.deploy.PackedModel)
    x = torch.randn(8, 1, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), model(x), rtol=1e-4, atol=1e-4)
    # A real-valued network has nothing to pack.
    assert packed_forward(build_model("resnet_small", num_classes=0, in_chans=1).eval(),
                          sample, device="cpu") is None
    # A packed model that disagrees with the module on the sample is not used.
    real_pack = s2bnn.deploy.pack

    def wrong(m, **kw):
        packed = real_pack(m, **kw)
        return lambda x: packed(x) * 1.01

    monkeypatch.setattr(s2bnn.deploy, "pack", wrong)
    assert packed_forward(model, sample, device="cpu") is None
    monkeypatch.setattr(s2bnn.deploy, "pack", real_pack)
    monkeypatch.setattr(_build, "kernels", lambda: None)
    assert packed_forward(model, sample, device="cpu") is None


def test_packed_forward_for_guards_on_the_first_64_images_of_the_test_set():
    import torch

    from s2bnn.demo import packed_forward, packed_forward_for

    images = torch.arange(100.0).reshape(100, 1, 1, 1).expand(100, 1, 4, 4)
    forward = packed_forward_for([(img, 0) for img in images], device="cpu")
    assert forward.func is packed_forward and forward.keywords["device"] == "cpu"
    torch.testing.assert_close(forward.keywords["sample"], images[:64])
    few = packed_forward_for([(img, 0) for img in images[:5]])
    torch.testing.assert_close(few.keywords["sample"], images[:5])


def test_side_by_side_children_follow_the_parents_allocator_tuning():
    """The CLI tunes glibc's allocator (cheap element-wise ops cost ~3x without it); the
    processes of side-by-side students are told whether it did, from malloc_tuned()."""
    import subprocess
    import sys

    code = ("from s2bnn import runtime\n"
            "assert not runtime.malloc_tuned()\n"
            "ok = runtime.tune_malloc()\n"
            "assert runtime.malloc_tuned() == ok\n"
            "print(ok)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    if sys.platform.startswith("linux"):
        assert out.stdout.strip() == "True"
