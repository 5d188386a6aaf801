"""Runs sized by steps or by wall-clock time, checkpoints within an epoch, and their resumes."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import assert_identical
from test_engine import one_thread, read_metrics, snapshot, tiny_cfg, tiny_parts  # noqa: F401
from test_faults import RECIPE, assert_same_finished_run, killed, train_cli, uninterrupted_alongside

from s2bnn.budget import (
    BudgetError,
    format_duration,
    parse_duration,
    split_budget,
    steps_for_budget,
)
from s2bnn.checkpoint import load_checkpoint
from s2bnn.config import load_config
from s2bnn.engine import Trainer, train
from s2bnn.errors import ConfigError


# --------------------------------------------------------------------------- arithmetic
@pytest.mark.parametrize("text, seconds", [
    ("600", 600.0), (600, 600.0), (2.5, 2.5), ("90s", 90.0), ("10m", 600.0), ("10min", 600.0),
    ("1.5h", 5400.0), ("1h30m", 5400.0), ("1h 30m 15s", 5415.0), (" 45 S ", 45.0), (".5m", 30.0),
])
def test_parse_duration(text, seconds) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "soon", "10 minutes", "1d", "-5", "0", "0s", "m", True,
                                  float("nan"), float("inf"), "5m-"])
def test_parse_duration_refuses(text) -> None:
    with pytest.raises(BudgetError):
        parse_duration(text)


def test_steps_for_budget_small_and_large_datasets() -> None:
    # The steps depend on time only: how many epochs they make depends on the dataset.
    steps = steps_for_budget(120.0, 0.25, spent_s=20.0)
    assert steps == 400
    assert steps / 8 == 50  # 2,000 images at batch 256: 8 steps an epoch -> 50 epochs
    assert steps / 234 < 2  # 60,000 images: under two epochs
    assert steps_for_budget(10.0, 3.0) == 3  # whole steps only, never over the budget
    assert steps_for_budget(1.0, 1.0) == 1


def test_steps_for_budget_too_small_is_a_clear_error() -> None:
    with pytest.raises(BudgetError, match="less than one optimiser step"):
        steps_for_budget(1.0, 2.0)
    with pytest.raises(BudgetError, match="after set-up"):
        steps_for_budget(10.0, 0.1, spent_s=12.0)  # set-up alone used it up
    with pytest.raises(ValueError):
        steps_for_budget(10.0, 0.0)


def test_split_budget_is_proportional_and_never_negative() -> None:
    split = split_budget(600.0, {"teacher": 3, "student": 2, "eval": 1})
    assert split == pytest.approx({"teacher": 300.0, "student": 200.0, "eval": 100.0})
    assert sum(split_budget(17.0, {"a": 0.3, "b": 0.7}).values()) == pytest.approx(17.0)
    assert split_budget(-5.0, {"a": 1.0}) == {"a": 0.0}
    with pytest.raises(ValueError):
        split_budget(10.0, {"a": 0.0})


def test_format_duration() -> None:
    assert format_duration(41.26) == "41.3s" and format_duration(754.2) == "12m34s"


# --------------------------------------------------------------------------- config
def test_sizing_keys_later_layer_wins_same_layer_conflicts(tmp_path: Path) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text("output_dir: x\nepochs: 3\n")
    assert load_config(recipe).epochs == 3
    cfg = load_config(recipe, ["steps=50"])  # the command line replaces the recipe's epochs
    assert (cfg.epochs, cfg.steps, cfg.time_budget) == (None, 50, None)
    cfg = load_config(recipe, ["time_budget=2m"])
    assert (cfg.epochs, cfg.steps, cfg.time_budget) == (None, None, "2m")
    with pytest.raises(ConfigError, match="'epochs' and 'steps' both size the run"):
        load_config(recipe, ["steps=50", "epochs=2"])
    both = tmp_path / "both.yaml"
    both.write_text("output_dir: x\nsteps: 10\ntime_budget: 60\n")
    with pytest.raises(ConfigError, match="'steps' and 'time_budget' both size the run in"):
        load_config(both)
    with pytest.raises(ConfigError, match="'steps' must be > 0"):
        load_config(recipe, ["steps=-1"])
    with pytest.raises(ConfigError, match="config key 'time_budget'"):
        load_config(recipe, ["time_budget=0"])


# --------------------------------------------------------------------------- the engine
def test_run_sized_by_steps_ends_mid_epoch_with_the_schedule(tmp_path: Path) -> None:
    run = tmp_path / "run"
    train(tiny_cfg(run, epochs=None, steps=9, log_every=4,
                   optim={"lr": 0.05, "schedule": "linear"}), parts=tiny_parts())
    ck = load_checkpoint(run)
    # 48 images at batch 8: 6 steps an epoch, so 9 steps end half-way through epoch 2.
    assert (ck["step"], ck["epoch"], ck["epoch_step"], ck["total_steps"]) == (9, 1, 3, 9)
    assert ck["finished"]
    assert [int(r["step"]) for r in read_metrics(run)] == [4, 6, 8, 9]
    assert float(read_metrics(run)[-1]["lr"]) == 0.0  # the linear decay ends at the last step


def test_steps_equal_to_epochs_train_the_same_run(tmp_path: Path) -> None:
    train(tiny_cfg(tmp_path / "e", epochs=2), parts=tiny_parts())
    train(tiny_cfg(tmp_path / "s", epochs=None, steps=12), parts=tiny_parts())
    a, b = load_checkpoint(tmp_path / "e"), load_checkpoint(tmp_path / "s")
    for key in ("backbone", "method", "optimizer", "scheduler"):
        assert_identical(a[key], b[key], key)


def test_mid_epoch_checkpoint_resumes_bit_exact_in_process(tmp_path: Path) -> None:
    """A crash after step 9 of 12 (epoch 2, 3 batches in); checkpoints every 2 steps, so the
    resume starts from step 8, mid-epoch, and ends identical to the uninterrupted run."""
    common = {"deterministic": True, "save_every_steps": 2, "log_every": 1,
              "optim": {"name": "adam", "lr": 0.02, "warmup_epochs": 0.5}}
    train(tiny_cfg(tmp_path / "full", **common), parts=tiny_parts())
    run = tmp_path / "run"
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(tiny_cfg(run, **common), parts=tiny_parts(crash_at=10))
    mid = load_checkpoint(run)
    assert (mid["step"], mid["epoch"], mid["epoch_step"], mid["finished"]) == (8, 1, 2, False)
    train(tiny_cfg(run, resume="auto", **common), parts=tiny_parts())
    a, b = load_checkpoint(tmp_path / "full"), load_checkpoint(run)
    assert b["finished"] and b["step"] == 12
    for key in ("method", "backbone", "optimizer", "scheduler", "rng"):
        assert_identical(a[key], b[key], key)
    strip = [{k: v for k, v in r.items() if k != "img_per_s"} for r in read_metrics(run)]
    assert strip == [{k: v for k, v in r.items() if k != "img_per_s"}
                     for r in read_metrics(tmp_path / "full")]


@pytest.mark.slow
def test_steps_run_killed_mid_epoch_resumes_where_an_epochs_run_would(tmp_path: Path) -> None:
    """A real ``s2bnn train`` sized by steps (9 = 3 epochs of 3), SIGKILLed after step 5 with
    checkpoints every 2 steps, resumed from step 4 (mid-epoch 2): it ends bit-identical to the
    uninterrupted run sized by epochs (MoCo v2 queue, Adam state, kNN monitor, augmentations)."""
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(RECIPE)
    full, run = tmp_path / "full", tmp_path / "run"
    with uninterrupted_alongside(recipe, full):
        by_steps = ("steps=9", "save_every_steps=2")
        killed(train_cli(recipe, run, *by_steps, fault="kill-step:5"))
        mid = load_checkpoint(run)
        assert (mid["step"], mid["epoch"], mid["epoch_step"]) == (4, 1, 1)
        done = train_cli(recipe, run, *by_steps, "resume=auto")
        assert done.returncode == 0, done.stderr[-2000:]
    assert_same_finished_run(full, run)


def test_time_budget_sizes_the_run_once_and_resume_keeps_it(tmp_path: Path,
                                                            monkeypatch) -> None:
    calls: list[int] = []

    def fake_step_seconds(self) -> float:
        calls.append(1)
        return 0.05

    monkeypatch.setattr(Trainer, "measure_step_seconds", fake_step_seconds)
    run = tmp_path / "run"
    # 1 s of budget at 50 ms a step, minus the set-up so far: at most 20 steps. The run
    # crashes at step 5, after a checkpoint at step 4.
    common = {"epochs": None, "time_budget": "1", "save_every_steps": 2,
              "optim": {"lr": 0.05, "schedule": "linear"}}
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(tiny_cfg(run, **common), parts=tiny_parts(crash_at=5))
    planned = load_checkpoint(run)["total_steps"]
    assert 5 <= planned <= 20 and len(calls) == 1
    train(tiny_cfg(run, resume="auto", **common), parts=tiny_parts())
    assert len(calls) == 1  # the resume took the measured length from the checkpoint
    ck = load_checkpoint(run)
    assert ck["total_steps"] == ck["step"] == planned and ck["finished"]
    assert float(read_metrics(run)[-1]["lr"]) == 0.0


def test_time_budget_measures_a_copy_not_the_run(tmp_path: Path) -> None:
    """The timed steps train a throw-away copy: a budget-sized run of N steps is the same run
    as one sized by steps=N."""
    train(tiny_cfg(tmp_path / "b", epochs=None, time_budget="2"), parts=tiny_parts())
    n = load_checkpoint(tmp_path / "b")["total_steps"]
    assert n >= 1
    train(tiny_cfg(tmp_path / "s", epochs=None, steps=n), parts=tiny_parts())
    a, b = load_checkpoint(tmp_path / "b"), load_checkpoint(tmp_path / "s")
    for key in ("backbone", "method", "optimizer", "scheduler"):
        assert_identical(a[key], b[key], key)


def test_budget_below_one_step_refused_and_old_run_kept(tmp_path: Path, monkeypatch) -> None:
    run = tmp_path / "run"
    train(tiny_cfg(run), parts=tiny_parts())
    before = snapshot(run)
    monkeypatch.setattr(Trainer, "measure_step_seconds", lambda self: 5.0)
    with pytest.raises(ConfigError, match="config key 'time_budget'.*less than one optimiser"):
        train(tiny_cfg(run, epochs=None, time_budget="2s", force=True), parts=tiny_parts())
    assert snapshot(run) == before


# --------------------------------------------------------------------------- an epoch cap
def test_cap_budget_steps() -> None:
    from s2bnn.engine.sizing import cap_budget_steps

    assert cap_budget_steps(900, 20, 15) == 300  # a small dataset: the cap ends the run
    assert cap_budget_steps(500, 20, 468) == 500  # a large one: the budget does
    assert cap_budget_steps(500, None, 15) == 500


def test_time_budget_max_epochs_caps_a_budget_sized_run(tmp_path: Path, monkeypatch) -> None:
    """A budget that fits many epochs of a small dataset stops at the cap, with the LR schedule
    ending there; the cap changes nothing of a run sized by epochs or steps."""
    monkeypatch.setattr(Trainer, "measure_step_seconds", lambda self: 0.001)
    common = {"epochs": None, "time_budget": "60", "optim": {"lr": 0.05, "schedule": "linear"}}
    run = tmp_path / "capped"
    train(tiny_cfg(run, time_budget_max_epochs=2, **common), parts=tiny_parts())
    ck = load_checkpoint(run)
    assert ck["total_steps"] == ck["step"] == 2 * ck["steps_per_epoch"] and ck["finished"]
    assert float(read_metrics(run)[-1]["lr"]) == 0.0
    assert ck["sizing"]["time_budget_max_epochs"] == 2
    train(tiny_cfg(tmp_path / "steps", epochs=None, steps=5, time_budget_max_epochs=1),
          parts=tiny_parts())
    assert load_checkpoint(tmp_path / "steps")["total_steps"] == 5
    # Without a time budget the key does not enter the sizing a resume compares.
    assert "time_budget_max_epochs" not in load_checkpoint(tmp_path / "steps")["sizing"]


def test_time_budget_max_epochs_must_be_positive(tmp_path: Path) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text("output_dir: x\ntime_budget: 60\n")
    with pytest.raises(ConfigError, match="'time_budget_max_epochs' must be > 0"):
        load_config(recipe, ["time_budget_max_epochs=0"])
    assert load_config(recipe, ["time_budget_max_epochs=3"]).time_budget_max_epochs == 3


# --------------------------------------------------------------------------- re-planning
def test_replanned_steps() -> None:
    from s2bnn.engine.sizing import replanned_steps

    # 100 steps done of 500 planned; the machine turned out twice as fast: 40 s left at 0.1 s.
    assert replanned_steps(100, 500, 0.1, 40.0) == 500  # 100 + 400: as planned
    assert replanned_steps(100, 500, 0.05, 40.0) == 900  # faster: more steps
    assert replanned_steps(100, 500, 0.2, 40.0) == 300  # slower: fewer
    assert replanned_steps(100, 500, 0.1, 41.0) == 500  # within 3 %: unchanged
    assert replanned_steps(100, 500, 0.05, 40.0, cap=600) == 600  # the epoch cap still holds
    assert replanned_steps(100, 500, 0.1, -5.0) == 100  # out of time: stop now
    with pytest.raises(ValueError):
        replanned_steps(1, 2, 0.0, 1.0)


def test_time_budget_replan_follows_the_real_step_time(tmp_path: Path, monkeypatch) -> None:
    """The timed steps claim 0.2 s a step, so 8 s of budget plan ~37 steps; the real steps are
    far faster, so the re-planning run trains many more, its schedule still ending at 0; without
    re-planning the run keeps the measured plan."""
    monkeypatch.setattr(Trainer, "measure_step_seconds", lambda self: 0.2)
    common = {"epochs": None, "time_budget": "8", "log_every": 1,
              "optim": {"lr": 0.05, "schedule": "linear"}}
    train(tiny_cfg(tmp_path / "fixed", **common), parts=tiny_parts())
    fixed = load_checkpoint(tmp_path / "fixed")["total_steps"]
    assert 15 <= fixed <= 40  # (set-up takes well under 5 s)
    run = tmp_path / "replan"
    train(tiny_cfg(run, time_budget_replan=True, time_budget_max_epochs=30, **common),
          parts=tiny_parts())
    ck = load_checkpoint(run)
    assert ck["finished"] and ck["step"] == ck["total_steps"] > 2 * fixed
    assert ck["total_steps"] <= 30 * ck["steps_per_epoch"]  # never past the epoch cap
    assert float(read_metrics(run)[-1]["lr"]) == 0.0  # the stretched schedule ends at its end
