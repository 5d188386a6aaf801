"""The main job: the S2-BNN pipeline end to end on one dataset.

1. evaluate the baselines that need no training: raw pixels and the untrained student (several
   seeds), with weighted kNN and the linear probe (SGD and Adam learning-rate sweeps); their
   time also tells how long the trained networks' evaluation will take;
2. pretrain a real-valued teacher with MoCo v2 (with ``max_teachers`` > 1, on a small set where
   the teacher stops at its epoch cap early, the time it leaves trains more teachers from other
   seeds);
3. distil a binary ReActNet-style student from it (from them) with S2-BNN (strategy 3,
   distillation only);
4. train the same binary student with MoCo v2 (strategy 1, the paper's enhanced recipe: Adam,
   "lite" augmentation), so the two students differ only in what they learn from;
5. evaluate the teacher and both students the same way (the binary networks' features, here
   and in step 1, on the packed 1-bit runtime of :mod:`s2bnn.deploy`: :func:`packed_forward`);
6. write ``report.md``, PNG plots and ``results.json`` and print the summary, with a warning
   and its fix for every weak result.

The demo has one wall-clock ``budget`` (default 10 minutes). Before each training stage it
divides what is left, less the evaluation still to come, between the stages still to run in
fixed proportions (:data:`STAGE_SHARES`), and the stage trains as many steps as fit in its part
(``time_budget`` of the engine, re-planned as it trains: ``time_budget_replan``). A
2,000-image folder then gets many epochs and a large set a fraction of one; the teacher stops
after ``teacher_max_epochs`` epochs, and a stage that ran long or short is made up for by the
ones after it. On a CPU the two students then train side by side (``side_by_side``), each in
its own process on half the threads and for all the time the teacher left: small networks use
one thread better than two, so each gets more steps than its half of the time alone would give.
A stage can instead be given a fixed size (``teacher_steps=``, ``s2bnn_epochs=``, ...).

The stages' training configs mirror ``configs/fashion_mnist/{teacher_mocov2,s2bnn,
mocov2_bnn_plus}.yaml`` (a test keeps them in step); :class:`DemoConfig` only sets sizes. A
stage whose run dir already holds a finished run with the same config is reused, and an
interrupted one resumes, so running the same command again after a crash finishes the job
instead of starting over.
"""

from __future__ import annotations

import copy
import functools
import json
import math
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Optional

from s2bnn.budget import BudgetError, format_duration, parse_duration, split_budget
from s2bnn.checkpoint import atomic_write_bytes
from s2bnn.config import Config, config_from_dict, config_to_dict, load_config
from s2bnn.errors import ConfigError, DataError, RunDirError, TrainingError, UserError

__all__ = [
    "DemoConfig", "stage_configs", "run_demo", "RESULT_NAMES", "eval_datasets", "evaluate_run",
    "result_row", "train_stage", "finished_with_same_config", "STAGE_SHARES", "weak_results",
    "demo_image_size", "CPU_MAX_IMAGE_SIZE",
    "deep_merge", "stage_seconds", "teacher_epoch_cap", "teachers_that_fit", "teacher_dir",
    "packed_forward", "packed_forward_for", "side_by_side_threads", "train_side_by_side",
]

RESULT_NAMES = ("pixels", "teacher", "random_init", "mocov2", "s2bnn")
STAGES = ("teacher", "s2bnn", "mocov2")
# How the training time is divided. The teacher gets the largest part: a student cannot learn
# more than its teacher knows. The two students get about equal wall time.
STAGE_SHARES: dict[str, float] = {"teacher": 0.40, "s2bnn": 0.31, "mocov2": 0.29}
# A stage with fewer optimiser steps than this gets a warning in the report.
MIN_STEPS = 300
MIN_STAGE_FRACTION = 0.04  # of the budget: the least a later stage gets after overruns
REPORT_SECONDS = 8.0  # plots and files at the end, kept out of the training time
CHILD_EXIT_SECONDS = 30.0  # a side-by-side stage's process may take this long to exit
MAX_TEACHERS = 1  # DemoConfig.max_teachers (1: one teacher)


@dataclass
class DemoConfig:
    """Sizes of the demo; every field can be overridden as ``key=value`` on the command line."""

    data: str = "fashion-mnist"  # fashion-mnist, synthetic[:C:H:N:K] or an ImageFolder path
    root: Optional[str] = None  # directory holding the Fashion-MNIST idx files
    limit: Optional[int] = None  # training images used by every stage (None: all)
    # None: the dataset's own up to 64 px (28 for Fashion-MNIST); larger images at
    # CPU_MAX_IMAGE_SIZE on a CPU, at 224 on a GPU (demo_image_size).
    image_size: Optional[int] = None
    batch_size: int = 256  # the most any stage uses: a stage's recipe may use less (all: 128)
    seed: int = 0
    device: str = "auto"
    # Every stage's training precision: auto (bf16 autocast on GPUs and on CPUs with AVX512-BF16
    # or AMX, else fp32), fp32 or bf16. Evaluation is fp32 either way.
    precision: str = "auto"
    num_workers: int = 0
    # Wall time of the whole demo (evaluation and report included): 600, 90s, 10m, 1h30m.
    budget: str = "10m"
    teacher_model: str = "resnet_small"
    # Both students' network. reactnet_compact (x0.75, ends at 2x2 at 28 px) scored 2.6-3.4 points
    # above reactnet_small (ReActNet-A's layout at 1/4 width) in the same time (teacher study,
    # round 4); the recipes' own model name below is replaced by this one.
    student_model: str = "reactnet_compact"
    # A fixed size for a stage instead of its share of the budget (at most one per stage).
    teacher_steps: Optional[int] = None
    teacher_epochs: Optional[int] = None
    s2bnn_steps: Optional[int] = None
    s2bnn_epochs: Optional[int] = None
    mocov2_steps: Optional[int] = None
    mocov2_epochs: Optional[int] = None
    # The teacher's budget share buys at most this many epochs; the time it leaves goes to the
    # students. 20 until round 18, when the student was short of steps (on 2,000 images the
    # teacher scored alike after 19 and 37 epochs: benchmarks/small_folder.py). With the
    # students side by side they have steps to spare and end within a point of their teacher;
    # on 4,000 images 40 epochs lifted the teachers of five seeds by +0.2..+2.1 (mean +1.0,
    # docs/TEACHER_EPOCHS.md) and their students in the demo (rows -r22-cap40 of
    # docs/DEMO_BUDGET.md). Sixty lifted the teachers again (mean +0.8) but not their students
    # (rows -r23-cap60: mean margin 15.09 against 15.27). Larger sets get far fewer epochs than
    # this. None: no cap.
    teacher_max_epochs: Optional[int] = 40
    # A teacher stopped by that cap leaves most of its share unused on a small set. With
    # max_teachers > 1 that time trains more teachers (seeds seed+1, seed+2, ...), each given
    # the first one's time, as many as fit (at most this many in all), and the S2-BNN student
    # distils from all of them: one head block per teacher, the paper's loss averaged over the
    # blocks (method.teacher.extra_paths). Off by default: on the folders a second teacher
    # scored +2.5 and +0.8 at equal student steps but -0.6, -0.9 and -1.2 inside the demo
    # (docs/MULTI_TEACHER.md, docs/DEMO_BUDGET.md), and with the centred target about what one
    # teacher gave at the same epochs (rows -r19-t2: mean margin 14.47 on 4,000 images).
    max_teachers: int = MAX_TEACHERS
    # Labelled images the probes train on (None: all). 10,000 keeps the whole demo inside 10 min
    # on 2 cores with a margin (20,000 took 104 s of a 605 s demo on a slow day).
    eval_train_limit: Optional[int] = 10000
    eval_test_limit: Optional[int] = None  # test images (None: all)
    random_seeds: int = 3  # untrained-student baseline: one evaluation per seed
    knn_k: int = 200
    progress: bool = True
    # Train the two students at the same time, each in its own process on half the CPU threads,
    # both for all the time the teacher leaves (None: on when the stages run on a CPU with 2 or
    # more threads). At batch 128 and 28 px one thread gives a binary student 0.65 of what two
    # give (ops this small do not split well), so side by side each student trains about 1.3x
    # the steps of its half of the time alone; the two still get equal wall time and threads.
    side_by_side: Optional[bool] = None


# The three recipes the demo runs, as data. They match configs/fashion_mnist/*.yaml except for
# the keys the demo sets from DemoConfig (data, sizes, output dirs).
# The teacher's augmentation and every stage's batch (DemoConfig.batch_size only caps it) come
# from benchmarks/teacher_study.py: on 28 px grey images brightness/contrast jitter, crops of
# 0.6-1 and batch 128 each lifted the teacher, and batch 128 (twice the steps in the same time)
# the S2-BNN student (docs/TEACHER_STUDY.md). The MoCo v2 student keeps 256: at 128 it fell from
# 53.6 to 30.5 linear top-1 in the default demo (docs/DEMO_BUDGET.md). The S2-BNN student's
# lr 3e-3, linear schedule, tau 0.2 and one view each beat every alternative screened in round 2
# of the study (lr 1e-3 / 1e-2, cosine, tau 0.1, two views, width x0.375, stem stride 1); with
# the centred target lr 6e-3 won retrained at fixed steps and not in the demo (rows -r16 of
# docs/DEMO_BUDGET.md), and batch 64 (1.75x the steps) gained nothing there (rows -r18).
# Its crops stay the preset's: the teacher's (0.6-1) gained at fixed steps on 4,000 images
# and not in the demo (docs/STUDENT_GAP.md, round 10).
TEACHER_RECIPE: dict[str, Any] = {
    "batch_size": 128,
    "data": {"augment": {"preset": "mocov2", "color": True, "crop_scale": [0.6, 1.0]}},
    "model": {"name": "resnet_small"},
    # temperature 0.1 (t_tau01): +0.5 linear, +1.0 kNN, +1.6 embedding kNN over 0.2, on both
    # seeds; queue 16384, no blur, width x1.5 did not help (docs/TEACHER_STUDY.md, round 2).
    # symmetric (t3_sym): +0.7 linear on each of two seeds at half the steps; stem stride 1 did
    # not help (round 3).
    "method": {"name": "mocov2", "proj_dim": 128, "temperature": 0.1, "queue_size": 4096,
               "momentum": 0.99, "symmetric": True},
    "optim": {"name": "adam", "lr": 1.0e-3, "weight_decay": 0.0, "schedule": "cosine",
              "warmup_epochs": 0.1},
}
S2BNN_RECIPE: dict[str, Any] = {
    "batch_size": 128,
    "data": {"augment": {"preset": "s2bnn_lite", "num_views": 1}},
    "model": {"name": "reactnet_small", "binary_act": True, "binary_weight": True},
    # The paper's MLP head: a linear one (proj_hidden_dim 0) scored +0.7 / +1.3 at fixed steps
    # but -2.0 / -0.9 in the demo (docs/STUDENT_GAP.md, docs/DEMO_BUDGET.md, round 11).
    # The target is not the paper's: the teacher's pooled backbone features, centred on the
    # batch, instead of its 128-d head output. The head output probes 1.6-2.1 points below the
    # backbone on small data and the student learns no more than it holds; uncentred, the
    # features scored -1.1 (a flat softmax), centred +1.8 / +2.5 / +0.8 on three seeds at the
    # demo's steps (docs/CENTRED_TARGET.md, round 14). Since round 20 the teacher's last two
    # stages, side by side (one softmax block each): they probe 1.3 points above its pooled
    # features alone on five seeds (docs/TEACHER_STAGES.md), and the student learns what its
    # target holds: in the demo (rows -r24-stages2 of docs/DEMO_BUDGET.md) the folder's mean
    # margin over the untrained student rose from 15.27 to 15.83. method.proj_dim (96 + 192,
    # resnet_small's last two widths) and the stages are set by stage_configs for
    # DemoConfig.teacher_model (see distill_target).
    "method": {"name": "s2bnn", "temperature": 0.2, "distill_weight": 1.0,
               "contrastive_weight": 0.0, "proj_dim": 288,
               "teacher": {"kind": "offline", "arch": "resnet_small", "head": "none",
                           "center": True, "stages": 2, "grid": 1}},
    "optim": {"name": "adam", "lr": 3.0e-3, "weight_decay": 0.0, "schedule": "linear"},
}
MOCOV2_RECIPE: dict[str, Any] = {  # the enhanced baseline: S2-BNN's optimiser and augmentation
    "data": {"augment": {"preset": "s2bnn_lite"}},
    "model": {"name": "reactnet_small", "binary_act": True, "binary_weight": True},
    "method": {"name": "mocov2", "proj_dim": 128, "temperature": 0.2, "queue_size": 4096,
               "momentum": 0.99},
    "optim": {"name": "adam", "lr": 3.0e-3, "weight_decay": 0.0, "schedule": "linear"},
}


def deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """``base`` updated by ``extra``, nested dicts merged key by key; neither is changed."""
    out = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def stage_size(plan: DemoConfig, name: str) -> dict[str, Any]:
    """The sizing key of stage ``name``: its fixed steps or epochs, else ``{}`` (a budget share)."""
    steps, epochs = getattr(plan, f"{name}_steps"), getattr(plan, f"{name}_epochs")
    if steps is not None and epochs is not None:
        raise ConfigError(f"demo keys '{name}_steps' and '{name}_epochs' both size the {name} "
                          "stage; set only one of them")
    for key, value in ((f"{name}_steps", steps), (f"{name}_epochs", epochs)):
        if value is not None and value <= 0:
            raise ConfigError(f"demo key '{key}' must be > 0, got {value}")
    if steps is not None:
        return {"steps": steps}
    return {"epochs": epochs} if epochs is not None else {}


def teacher_epoch_cap(max_epochs: int | None, num_train: int | None, batch: int) -> int | None:
    """The epochs a time-budgeted teacher may train at most: ``max_epochs``, raised so that the
    cap still allows :data:`MIN_STEPS` optimiser steps on a tiny dataset (``None``: no cap)."""
    if max_epochs is None or not num_train:
        return max_epochs
    per_epoch = max(1, num_train // batch)
    return max(int(max_epochs), math.ceil(MIN_STEPS / per_epoch))


def teachers_that_fit(share: float, first: float, max_teachers: int) -> int:
    """How many teachers a teacher share of ``share`` seconds trains when the first one, stopped
    by its epoch cap, took ``first`` seconds: that one and as many more of the same length as
    fit in the rest of the share, at most ``max_teachers`` in all."""
    if max_teachers <= 1 or not first > 0:
        return 1
    return 1 + max(0, min(max_teachers - 1, math.floor((share - first) / first)))


def teacher_dir(out: Path, k: int) -> Path:
    """Run dir of the demo's ``k``-th teacher (1: the first, ``runs/teacher``)."""
    return out / "runs" / ("teacher" if k == 1 else f"teacher_{k}")


# On a CPU the demo's budget buys small images only: a step costs about the square of the image
# side (64x at 224 px what it costs at 28), and a folder of 96 px images, which the training
# default brings to 224 px, overran a 3-minute demo in its baselines alone. Larger images are
# trained and probed at this size there (docs/DEMO_BUDGET.md, row colour96-3k).
CPU_MAX_IMAGE_SIZE = 64


def demo_image_size(plan: DemoConfig, side: int) -> tuple[int, str | None]:
    """The side the demo trains and probes at, for data whose images are ``side`` px, and a
    line saying so when that is not what training would choose by default (else ``None``).

    ``plan.image_size`` when set; else the training default (:func:`default_image_size`: the
    images' own side up to 64 px, 224 above), except that on a CPU images above 64 px are
    brought down to :data:`CPU_MAX_IMAGE_SIZE`.
    """
    from s2bnn.data import default_image_size
    from s2bnn.data.datasets import SMALL_IMAGE_MAX
    from s2bnn.devices import resolve_device

    if plan.image_size:
        return plan.image_size, None
    if side <= SMALL_IMAGE_MAX or resolve_device(plan.device).type != "cpu":
        return default_image_size(plan.data), None
    return CPU_MAX_IMAGE_SIZE, (
        f"the images are {side} px: on a CPU the demo trains and probes them at "
        f"{CPU_MAX_IMAGE_SIZE} px, which its budget can afford (image_size={min(side, 224)} "
        "sets another size)")


def stage_configs(plan: DemoConfig, out: Path, force: bool = False,
                  seconds: dict[str, float] | None = None,
                  num_train: int | None = None, teachers: int = 1) -> dict[str, Config]:
    """The validated training configs of the three stages, keyed by result name.

    A stage without a fixed size trains for ``seconds[name]`` (default: its share of the whole
    budget, a placeholder until the demo knows what is left when the stage starts); the teacher
    for at most :func:`teacher_epoch_cap` epochs of ``num_train`` images. With ``teachers`` > 1
    the configs of the extra teachers are there too (``teacher_2``, ...: the teacher's recipe
    at seeds ``seed+1``, ..., each for ``seconds[name]``), and the S2-BNN student distils from
    every teacher.
    """
    from s2bnn.models import list_models

    for key in ("teacher_model", "student_model"):  # before any stage or baseline does work
        if getattr(plan, key) not in list_models(include_private=True):
            raise ConfigError(f"demo key '{key}' is '{getattr(plan, key)}'; registered models: "
                              f"{', '.join(list_models())}")
    common = {
        "seed": plan.seed,
        "device": plan.device,
        "precision": plan.precision,
        "resume": "auto",
        "force": force,
        "progress": plan.progress,
        "log_every": 10,
        "data": {"name": plan.data, "root": plan.root, "limit": plan.limit,
                 "image_size": plan.image_size, "num_workers": plan.num_workers},
    }
    total = _budget_seconds(plan)
    if plan.teacher_max_epochs is not None and plan.teacher_max_epochs <= 0:
        raise ConfigError(f"demo key 'teacher_max_epochs' must be > 0 (or null for no cap), "
                          f"got {plan.teacher_max_epochs}")
    if plan.max_teachers < 1:
        raise ConfigError(f"demo key 'max_teachers' must be >= 1 (1: one teacher), "
                          f"got {plan.max_teachers}")
    sizes = {}
    for name in STAGES:
        # This VM's speed drifts by a third within minutes: a stage re-plans its steps as it
        # trains instead of trusting the few steps timed before it started.
        sizes[name] = stage_size(plan, name) or {
            "time_budget": f"{(seconds or {}).get(name, total * STAGE_SHARES[name]):.1f}",
            "time_budget_replan": True}
    recipes = {"teacher": TEACHER_RECIPE, "s2bnn": S2BNN_RECIPE, "mocov2": MOCOV2_RECIPE}
    for name, recipe in recipes.items():
        sizes[name]["batch_size"] = min(recipe.get("batch_size", plan.batch_size),
                                        plan.batch_size)
    if "time_budget" in sizes["teacher"]:
        sizes["teacher"]["time_budget_max_epochs"] = teacher_epoch_cap(
            plan.teacher_max_epochs, num_train, sizes["teacher"]["batch_size"])
    recipe_teacher = S2BNN_RECIPE["method"]["teacher"]
    t_stages, t_grid, t_width = distill_target(plan.teacher_model, recipe_teacher["stages"],
                                               recipe_teacher["grid"])
    stages = {
        "teacher": deep_merge(TEACHER_RECIPE, {
            **common, "output_dir": str(teacher_dir(out, 1)), **sizes["teacher"],
            "model": {"name": plan.teacher_model}}),
        "s2bnn": deep_merge(S2BNN_RECIPE, {
            **common, "output_dir": str(out / "runs" / "s2bnn"), **sizes["s2bnn"],
            "model": {"name": plan.student_model},
            "method": {"proj_dim": t_width, "teacher": {
                "stages": t_stages, "grid": t_grid, "path": str(teacher_dir(out, 1)),
                "arch": plan.teacher_model,
                "extra_paths": [str(teacher_dir(out, k)) for k in range(2, teachers + 1)]}}}),
        "mocov2": deep_merge(MOCOV2_RECIPE, {
            **common, "output_dir": str(out / "runs" / "mocov2"), **sizes["mocov2"],
            "model": {"name": plan.student_model}}),
    }
    for k in range(2, teachers + 1):
        extra = {"seed": plan.seed + k - 1, "output_dir": str(teacher_dir(out, k))}
        if "time_budget" in sizes["teacher"]:
            extra["time_budget"] = f"{(seconds or {}).get(f'teacher_{k}', 1.0):.1f}"
        stages[f"teacher_{k}"] = deep_merge(stages["teacher"], extra)
    return {name: config_from_dict(cfg, f"demo stage '{name}'") for name, cfg in stages.items()}


def feature_width(model: str) -> int:
    """The pooled feature width of registered network ``model``."""
    from s2bnn.models import build_model

    return int(build_model(model, num_classes=0).feature_dim)


def distill_target(model: str, stages: int, grid: int = 1) -> tuple[int, int, int]:
    """``(stages, grid, width)`` of the target the demo's S2-BNN student distils from a teacher
    of registered network ``model``: its last ``stages`` stages pooled to ``grid`` x ``grid``
    cells, side by side, or its pooled features alone (``stages`` and ``grid`` 1) for a network
    whose stages :func:`s2bnn.teachers.stage_features` cannot read or that has fewer."""
    from s2bnn.models import build_model
    from s2bnn.teachers import stage_widths

    net = build_model(model, num_classes=0)
    try:
        return stages, grid, sum(stage_widths(net, stages, model, grid))
    except ConfigError:
        return 1, 1, int(net.feature_dim)


def _budget_seconds(plan: DemoConfig) -> float:
    try:
        return parse_duration(plan.budget)
    except BudgetError as err:
        raise ConfigError(f"demo key 'budget': {err}") from None


def _header(step: int, total: int, text: str) -> None:
    print(f"\n== [{step}/{total}] {text}", flush=True)


def _saved_config(cfg: Config) -> tuple[dict[str, Any], bool] | None:
    """(config, finished) of the checkpoint in the stage's run dir, if it has one."""
    from s2bnn.checkpoint import load_checkpoint

    last = Path(cfg.output_dir) / "checkpoints" / "last.pt"
    if not last.is_file():
        return None
    ckpt = load_checkpoint(last)
    return ckpt.get("config") or {}, bool(ckpt.get("finished"))


def finished_with_same_config(cfg: Config, any_budget: bool = False) -> bool:
    """True when the stage's run dir holds a finished run of this config. With ``any_budget``
    its time budget may differ (the seconds left for a stage change from one demo run to the
    next, so a demo resumed after a crash would otherwise retrain its finished stages)."""
    saved = _saved_config(cfg)
    if saved is None:
        return False
    ignore = {"force", "resume", "progress"}
    if any_budget and cfg.time_budget is not None and saved[0].get("time_budget") is not None:
        ignore.add("time_budget")
    old = {k: v for k, v in saved[0].items() if k not in ignore}
    new = {k: v for k, v in config_to_dict(cfg).items() if k not in ignore}
    return saved[1] and old == new


def train_stage(cfg: Config, any_budget: bool = False) -> tuple[Path, float]:
    """Train one stage, reusing a finished run of the same config (``any_budget``: of any time
    budget); returns (run dir, seconds)."""
    from s2bnn.engine import train
    from s2bnn.eval.monitor import monitors

    if finished_with_same_config(cfg, any_budget):
        print(f"reusing the finished run in {cfg.output_dir}", flush=True)
        return Path(cfg.output_dir), 0.0
    saved = _saved_config(cfg)
    if saved is not None and not saved[1] and saved[0].get("time_budget") is not None \
            and cfg.time_budget is not None:
        # An interrupted stage resumes with the budget it was measured for, not a new one.
        cfg = config_from_dict({**config_to_dict(cfg), "time_budget": saved[0]["time_budget"]})
    start = time.perf_counter()
    run_dir = train(cfg, callbacks=monitors(cfg))
    return Path(run_dir), time.perf_counter() - start


def side_by_side_threads(plan: DemoConfig) -> int:
    """CPU threads for each student when the two train side by side; 0: one after the other.

    ``plan.side_by_side`` None (auto) runs them side by side on a CPU with at least two
    threads; True does so anywhere (on a GPU both processes share it)."""
    import torch

    from s2bnn.devices import resolve_device

    threads = torch.get_num_threads()
    if plan.side_by_side is False:
        return 0
    if plan.side_by_side is None and (threads < 2 or resolve_device(plan.device).type != "cpu"):
        return 0
    return max(1, threads // 2)


def _stage_in_child(name: str, cfg_dict: dict[str, Any], threads: int, any_budget: bool,
                    launched: float, tune: bool, queue: Any) -> None:
    """A side-by-side student's process: train it on ``threads`` threads, report to ``queue``;
    ``tune``: the parent tuned its allocator (:func:`s2bnn.runtime.tune_malloc`), so does this."""
    import threading

    import torch
    from tqdm import tqdm

    from s2bnn.runtime import tune_malloc

    # tqdm's default lock is a named multiprocessing semaphore; a child stopped by the parent
    # (the other stage failed) cannot unlink it, and the resource tracker then reports it leaked
    # at shutdown. This process shares no bars with another, so a thread lock does.
    tqdm.set_lock(threading.RLock())
    if tune:
        tune_malloc()
    torch.set_num_threads(threads)
    try:
        if cfg_dict.get("time_budget") is not None:
            # The budget counts from the trainer's start; this process's start-up comes off it.
            late = max(0.0, time.time() - launched)
            budget = parse_duration(cfg_dict["time_budget"])
            cfg_dict["time_budget"] = f"{max(1.0, budget - late):.1f}"
        run_dir, seconds = train_stage(config_from_dict(cfg_dict), any_budget)
        queue.put((name, "ok", str(run_dir), seconds))
    except UserError as err:
        queue.put((name, "user", type(err).__name__, str(err)))
    except BaseException as err:  # a bug (or Ctrl-C): the parent shows its traceback
        import traceback

        queue.put((name, "bug", type(err).__name__, traceback.format_exc()))


def _last_step(run_dir: Path) -> int | None:
    """The last step in a run dir's ``metrics.csv`` (None before its first log line)."""
    from s2bnn.report import read_metrics

    step = (read_metrics(run_dir / "metrics.csv") or [{}])[-1].get("step")
    return int(step) if step is not None else None


def train_side_by_side(cfgs: dict[str, Config], threads: int, any_budget: bool = False,
                       progress: bool = True) -> dict[str, tuple[Path, float]]:
    """Train the stages ``cfgs`` at the same time, each in its own process on ``threads`` CPU
    threads (:func:`train_stage` there); returns {name: (run dir, seconds)}.

    A stage's time budget counts from the launch. A user error in either stage stops both and
    is raised here as the same error class (both resume on the next run); a stage's process
    that died without a word raises :class:`TrainingError`.
    """
    import multiprocessing as mp
    from queue import Empty

    from tqdm import tqdm

    import s2bnn.errors as errors
    from s2bnn.runtime import malloc_tuned

    ctx = mp.get_context("spawn")  # fork would copy this process's thread pools mid-use
    queue = ctx.Queue()
    launched = time.time()
    procs = {name: ctx.Process(
        target=_stage_in_child, daemon=False,  # a daemon could not start loader workers
        args=(name, {**config_to_dict(cfg), "progress": False}, threads, any_budget, launched,
              malloc_tuned(), queue)) for name, cfg in cfgs.items()}
    budgets = [parse_duration(c.time_budget) for c in cfgs.values() if c.time_budget is not None]
    bar = tqdm(total=round(max(budgets)) if budgets else None, unit="s", file=sys.stderr,
               desc=f"{' + '.join(cfgs)} side by side", disable=not progress,
               dynamic_ncols=True, leave=False)
    done: dict[str, tuple[Any, ...]] = {}
    try:
        for proc in procs.values():
            proc.start()
        while len(done) < len(procs):
            try:
                msg = queue.get(timeout=1.0)
                done[msg[0]] = msg
                if msg[1] != "ok":
                    break
            except Empty:  # nobody finished this second
                dead = [n for n, p in procs.items() if n not in done and not p.is_alive()]
                if dead and queue.empty():
                    time.sleep(0.5)  # a message may still be in the pipe
                    if queue.empty():
                        name = dead[0]
                        raise TrainingError(
                            f"the {name} stage's process ended with exit code "
                            f"{procs[name].exitcode} before finishing (out of memory?); run the "
                            "same command again to resume it") from None
            bar.n = min(round(time.time() - launched), bar.total or 10**9)
            bar.set_postfix({n: _last_step(Path(c.output_dir)) for n, c in cfgs.items()},
                            refresh=True)
    finally:
        bar.close()
        for name, proc in procs.items():
            if done.get(name, ("", ""))[1] == "ok":
                # It reported and is exiting: killed mid-exit it could leave named semaphores.
                proc.join(timeout=CHILD_EXIT_SECONDS)
            if proc.is_alive():
                proc.terminate()
            proc.join()
    for name, msg in done.items():
        if msg[1] == "user":
            cls = getattr(errors, msg[2], None)
            raise (cls if isinstance(cls, type) and issubclass(cls, UserError)
                   else UserError)(msg[3])
        if msg[1] == "bug":
            raise RuntimeError(f"the {name} stage failed in its process:\n{msg[3]}")
    return {name: (Path(msg[2]), float(msg[3])) for name, msg in done.items()}


def stage_summary(run_dir: Path, seconds: float, budget_s: float | None,
                  max_epochs: int | None = None) -> dict[str, Any]:
    """What a trained stage got: optimiser steps, epochs, seconds (and its budget); with
    ``max_epochs`` (its time budget's epoch cap), whether the cap, not the time, ended it."""
    from s2bnn.checkpoint import load_checkpoint
    from s2bnn.engine.sizing import epoch_cap_steps

    ckpt = load_checkpoint(run_dir)
    steps = int(ckpt.get("step", 0))
    per_epoch = int(ckpt.get("steps_per_epoch") or 0)
    out = {"steps": steps, "epochs": round(steps / per_epoch, 2) if per_epoch else None,
           "seconds": round(seconds, 1),
           "budget_seconds": round(budget_s, 1) if budget_s is not None else None}
    cap = epoch_cap_steps(max_epochs, per_epoch) if per_epoch else None
    if cap is not None and steps >= cap:  # the engine's own cap, so both agree
        out["epoch_cap"] = max_epochs
    return out


def stage_seconds(left: float, todo: dict[str, float], budget: float,
                  first: bool) -> dict[str, float]:
    """Seconds for each stage still to run: ``left`` split by the shares in ``todo``.

    After the first stage, every stage still to run gets at least ``MIN_STAGE_FRACTION`` of the
    budget, so that when earlier stages overran (a slower machine, another job) the later ones
    still train something instead of being handed zero seconds.
    """
    seconds = split_budget(left, todo) if todo else {}
    if not first:
        seconds = {n: max(s, MIN_STAGE_FRACTION * budget) for n, s in seconds.items()}
    return seconds


def _more_teachers(plan: DemoConfig, out: Path, force: bool, num_train: int,
                   share: float | None, first: dict[str, Any]) -> int:
    """Train the extra teachers that the first teacher's unused share pays for (see
    ``DemoConfig.max_teachers``); returns the number of teachers in all and adds
    ``teachers`` and ``more_teachers`` (what each extra one got) to ``first``. The count goes to
    ``runs/teachers.json``, so that a demo resumed after its first teacher keeps it."""
    first["teachers"], first["more_teachers"] = 1, []
    if plan.max_teachers <= 1:
        return 1
    record = out / "runs" / "teachers.json"
    if first["seconds"] == 0 and record.is_file() and not force:  # first teacher reused
        count = min(int(json.loads(record.read_text())["teachers"]), plan.max_teachers)
    elif share is None or not first.get("epoch_cap"):
        count = 1  # a fixed-size teacher, or one that used its whole share
    else:
        count = teachers_that_fit(share, first["seconds"], plan.max_teachers)
    atomic_write_bytes(record, json.dumps({"teachers": count}).encode())
    first["teachers"] = count
    start = time.perf_counter()
    for k in range(2, count + 1):
        left = (share or 0.0) - first["seconds"] - (time.perf_counter() - start)
        sec = max(left / (count - k + 1), 1.0)
        name = f"teacher_{k}"
        cfg = stage_configs(plan, out, force=force, seconds={name: sec}, num_train=num_train,
                            teachers=count)[name]
        print(f"\n== teacher {k} of {count} (seed {cfg.seed}), {format_duration(sec)} of the "
              "time the first one left", flush=True)
        run_dir, seconds = train_stage(cfg, any_budget=not force)
        got = stage_summary(run_dir, seconds, sec, cfg.time_budget_max_epochs)
        first["more_teachers"].append({"seed": cfg.seed, **got})
    return count


def _epochs(n: float) -> str:
    return f"{n:g} epoch" + ("" if n == 1 else "s")


def _describe_stage(name: str, got: dict[str, Any]) -> str:
    text = f"{name}: {got['steps']} steps"
    if got.get("epochs") is not None:
        text += f" ({_epochs(got['epochs'])})"
    text += f" in {format_duration(got['seconds'])}"
    if got.get("budget_seconds") is not None:
        text += f" (its budget {format_duration(got['budget_seconds'])})"
    side = got.get("side_by_side")
    if side:
        text += (f", side by side with {', '.join(side['with'])} on {side['threads']} CPU "
                 f"thread{'s' if side['threads'] > 1 else ''}")
    more = got.get("more_teachers") or []
    if got.get("epoch_cap") is not None:
        text += f"; stopped at {_epochs(got['epoch_cap'])} (teacher_max_epochs)"
        text += ", its time left to the students" if not more else ""
    if more:
        seeds = ", ".join(str(t["seed"]) for t in more)
        text += (f"; {len(more)} more teacher{'s' if len(more) > 1 else ''} (seed"
                 f"{'s' if len(more) > 1 else ''} {seeds}: "
                 f"{', '.join(str(t['steps']) for t in more)} steps in "
                 f"{format_duration(sum(t['seconds'] for t in more))}), and the S2-BNN student "
                 f"distils from all {len(more) + 1}")
    return text


def eval_datasets(data: str, root: str | None, train_limit: int | None,
                  test_limit: int | None, in_chans: int, image_size: int) -> dict[str, Any]:
    """Labelled splits for the probes (eval transform, held in memory where they fit: every
    network reads them) and for the raw-pixel baseline."""
    from s2bnn.data import build_dataset, build_eval_transform, dataset_stats
    from s2bnn.eval.features import cache_dataset

    mean, std = dataset_stats(data)
    tf = build_eval_transform(image_size, in_chans, mean=mean, std=std)
    out = {
        split: cache_dataset(build_dataset(data, split, transform=tf, root=root, limit=limit))
        for split, limit in (("train", train_limit), ("test", test_limit))
    }
    # Raw pixels: the uint8 images themselves where the dataset holds them in memory, else the
    # resized eval view (ImageFolder images differ in size).
    raw_train = build_dataset(data, "train", root=root, limit=train_limit)
    raw_ok = hasattr(raw_train, "images")
    out["pixels_train"] = raw_train if raw_ok else out["train"]
    out["pixels_test"] = (build_dataset(data, "test", root=root, limit=test_limit)
                          if raw_ok else out["test"])
    return out


_ROW_KEYS = ("knn_top1", "linear_top1", "linear_top1_sgd", "linear_top1_adam")


def result_row(name: str, method: str | None, backbone: str | None, binary: Any,
               result: dict[str, Any], **extra: Any) -> dict[str, Any]:
    """One ``results.json`` row: identity, accuracies (with ``*_std`` when given) and extras."""
    row: dict[str, Any] = {"name": name, "method": method, "backbone": backbone,
                           "binary": binary}
    for key in _ROW_KEYS:
        if result.get(key) is not None:
            row[key] = float(result[key])
        if result.get(f"{key}_std") is not None:
            row[f"{key}_std"] = float(result[f"{key}_std"])
    row.update(extra)
    return row


def _profile(backbone: Any, image_size: int, in_chans: int) -> dict[str, Any]:
    from s2bnn.models.profile import profile_model

    prof = profile_model(backbone, image_size=image_size, in_chans=in_chans)
    return {"params": prof.get("real_params", 0) + prof.get("binary_params", 0),
            "binary_params": prof.get("binary_params"), "ops": prof.get("ops")}


def _features_by(res: dict[str, Any]) -> str | None:
    """What computed a row's features: ``packed`` (the 1-bit runtime) or ``module`` (torch)."""
    by = res.get("features_by")
    return "packed" if by == "fast" else by


def evaluate_run(name: str, run_dir: str | Path, ds: dict[str, Any], *, image_size: int,
                 in_chans: int, **eval_kwargs: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """Evaluate a run dir's backbone; returns (results row, report row with curves and maps)."""
    from s2bnn.eval import evaluate_backbone, load_backbone
    from s2bnn.report import read_metrics

    backbone, binfo = load_backbone(run_dir)
    res = evaluate_backbone(backbone, ds["train"], ds["test"], sample_size=2000, **eval_kwargs)
    from s2bnn.eval.loading import read_run_config

    prof = _profile(backbone, image_size, in_chans)
    binary = bool(prof["binary_params"])  # 1-bit weights and activations somewhere in the net
    method = ((read_run_config(run_dir) or {}).get("method") or {}).get("name")
    row = result_row(name, method, binfo.get("name"), binary, res, **prof,
                     features_by=_features_by(res))
    report_row = {**row, "sweep": res.get("linear"),
                  "embedding_sample": res.get("embedding_sample"),
                  "metrics": read_metrics(Path(run_dir) / "metrics.csv")}
    return row, report_row


def packed_forward(model: Any, sample: Any, device: str = "auto") -> Any:
    """``model``'s eval forward on the packed 1-bit runtime (:mod:`s2bnn.deploy`), or ``None``.

    The demo computes the binary networks' features with it: XNOR/popcount instead of the
    fake-quantised float forward, about 5x faster on 2 cores for the demo's student, and the
    same arithmetic a user deploys. ``None`` (evaluate the module itself) off the CPU, without
    compiled kernels, for a network without binary convolutions or with a layer the runtime
    cannot lower, and when the packed outputs on ``sample`` differ from the module's. That guard
    compares the median image: float rounding at a sign threshold can flip a bit, and so change
    the features, of an image or two in a thousand.
    """
    import torch

    from s2bnn.deploy import pack
    from s2bnn.deploy._build import kernels
    from s2bnn.devices import resolve_device
    from s2bnn.errors import ModelError

    if resolve_device(device).type != "cpu" or kernels() is None:
        return None
    try:
        packed = pack(model.eval())
    except ModelError:
        return None
    with torch.no_grad():
        ref = model(sample).flatten(1)
    got = packed(sample).flatten(1)
    if got.shape != ref.shape:
        return None
    err = (got - ref).norm(dim=1) / ref.norm(dim=1).clamp_min(1e-12)
    return packed if float(err.median()) < 1e-4 else None


def packed_forward_for(test_set: Any, device: str = "auto") -> Any:
    """The ``fast_forward`` the demo's evaluation uses (:func:`packed_forward`), its guard
    sample the first (at most 64) images of ``test_set``."""
    import torch

    sample = torch.stack([test_set[i][0] for i in range(min(64, len(test_set)))])
    return functools.partial(packed_forward, sample=sample, device=device)


def _check_claims(rows: dict[str, dict[str, Any]], num_test: int | None = None) -> list[str]:
    """The paper's claims that this run can test, each stated with its numbers; with
    ``num_test`` (the probes' test images) a gap smaller than twice one accuracy's sampling
    error (:func:`s2bnn.eval.features.accuracy_stderr`) is called what it is."""
    from s2bnn.eval.features import accuracy_stderr

    def top1(name: str) -> float | None:
        return rows.get(name, {}).get("linear_top1")

    def verdict(a: float, b: float, yes: str, no: str) -> str:
        text = yes if a > b else no
        if num_test:
            err = max(accuracy_stderr(a, num_test), accuracy_stderr(b, num_test))
            if abs(a - b) < 2 * err:
                # Two decimals: at one, a gap of 2.4 against an error of ±1.2 read as a
                # contradiction where the unrounded gap 2.40 was below 2 x 1.207.
                text += (f", but the gap ({abs(a - b):.2f}) is within twice one accuracy's "
                         f"sampling error on {num_test:,} test images "
                         f"(2 x {err:.2f} = {2 * err:.2f})")
        return text

    lines = []
    s2, moco, rand, pix, teacher = (top1(n) for n in
                                    ("s2bnn", "mocov2", "random_init", "pixels", "teacher"))
    if s2 is not None and moco is not None:
        lines.append(f"S2-BNN student > MoCo v2 student (linear top-1 {s2:.1f} vs {moco:.1f}): "
                     + verdict(s2, moco, "holds", "does NOT hold"))
    if s2 is not None and rand is not None:
        lines.append(f"S2-BNN student > untrained student ({s2:.1f} vs {rand:.1f} mean over "
                     "seeds): " + verdict(s2, rand, "holds", "does NOT hold"))
    if moco is not None and rand is not None:
        # The paper's ordering ends here: contrastive learning alone still beats no training.
        lines.append(f"MoCo v2 student > untrained student ({moco:.1f} vs {rand:.1f}): "
                     + verdict(moco, rand, "holds", "does NOT hold"))
    if teacher is not None and pix is not None:
        lines.append(f"teacher above raw pixels ({teacher:.1f} vs {pix:.1f}; a teacher below "
                     "pixels is too weak to teach much): "
                     + verdict(teacher, pix, "holds", "does NOT hold"))
    if num_test and s2 is not None:
        lines.append(f"the linear top-1 of one network on these {num_test:,} test images moves "
                     f"by about ±{accuracy_stderr(s2, num_test):.1f} points with the draw of the "
                     "images (binomial standard error): read gaps smaller than twice that as "
                     "ties")
    return lines


def _format_summary(rows: list[dict[str, Any]]) -> str:
    def cell(row: dict[str, Any], key: str) -> str:
        if row.get(key) is None:
            return "—"
        std = row.get(f"{key}_std")
        return f"{row[key]:.1f}" + (f" ± {std:.1f}" if std is not None else "")

    head = f"{'run':<12} {'method':<8} {'backbone':<15} {'binary':<7} {'kNN':>11} " \
           f"{'linear':>11} {'SGD':>11} {'Adam':>11}"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r['name']:<12} {str(r.get('method') or '—'):<8} {str(r.get('backbone') or '—'):<15} "
            f"{str(r.get('binary')):<7} {cell(r, 'knn_top1'):>11} {cell(r, 'linear_top1'):>11} "
            f"{cell(r, 'linear_top1_sgd'):>11} {cell(r, 'linear_top1_adam'):>11}")
    return "\n".join(lines)


def weak_results(rows: dict[str, dict[str, Any]], stages: dict[str, dict[str, Any]],
                 budget: str) -> list[str]:
    """A warning, with its cause and fix, for each result not worth having."""
    def top1(name: str) -> float | None:
        return rows.get(name, {}).get("linear_top1")

    more = "give the demo more time (e.g. budget=30m)"
    out = []
    for name, got in stages.items():
        if got["steps"] < MIN_STEPS:
            epochs = f" ({_epochs(got['epochs'])})" if got.get("epochs") is not None else ""
            out.append(f"the {name} stage trained only {got['steps']} optimiser steps{epochs}, "
                       f"too few to learn much from this data (budget {budget}); {more}")
    teacher, pix, s2, rand = (top1(n) for n in ("teacher", "pixels", "s2bnn", "random_init"))
    stronger = ("distil from a stronger teacher with s2bnn train configs/fashion_mnist/"
                "s2bnn.yaml method.teacher.path=...")
    capped = (stages.get("teacher") or {}).get("epoch_cap")
    if teacher is not None and pix is not None and teacher <= pix:
        if capped:  # more time would not help: the epoch cap, not the clock, stopped it
            out.append(f"the teacher ({teacher:.1f}) is not above raw pixels ({pix:.1f}) after "
                       f"{_epochs(capped)} of this data, where more epochs stopped paying on "
                       "small sets (docs/SMALL_FOLDER.md); the students are capped near it. "
                       "More time will not fix that: train the teacher on more unlabelled "
                       f"images, or {stronger}")
        else:
            out.append(f"the teacher ({teacher:.1f}) is not above raw pixels ({pix:.1f}), so it "
                       f"has little to teach and the students are capped below pixels; {more}, "
                       f"or {stronger}")
    if s2 is not None and rand is not None and s2 < rand + 5:
        where = "barely above" if s2 > rand else "not above"
        out.append(f"the S2-BNN student ({s2:.1f}) is {where} the untrained network "
                   f"({rand:.1f}): it has not learnt from its teacher yet; {more}")
    elif s2 is not None and teacher is not None and s2 < teacher - 15:
        out.append(f"the S2-BNN student ({s2:.1f}) is {teacher - s2:.0f} points below its "
                   f"teacher ({teacher:.1f}); binary students need many more steps than real "
                   f"ones: {more}")
    moco = top1("mocov2")
    if moco is not None and rand is not None and moco <= rand:
        # Seen on colour folders (docs/DEMO_BUDGET.md, rows colour-3k and colour96-3k: MoCo v2
        # 21.3 and 13.7 against 25.2 and 20.7 untrained; 42.0 against 33.5 on the same images
        # in grey). Instance discrimination can rest on any cue both views share (SimCLR's
        # colour histograms), whether or not it says anything about the classes.
        out.append(f"the MoCo v2 student ({moco:.1f}) is not above the untrained network "
                   f"({rand:.1f}): contrastive learning alone gave this binary network no "
                   "features the labels use (the paper's finding: a binary network learns far "
                   "less from instance discrimination than from a teacher), or it learnt a cue "
                   "the augmentation leaves in both views, such as colour. Use the S2-BNN "
                   f"student; for a fairer MoCo v2 baseline {more}")
    return out


def run_demo(plan: DemoConfig, out: str | Path, force: bool = False) -> dict[str, Any]:
    """Run the whole pipeline into ``out`` within ``plan.budget``; returns ``results.json``."""
    from s2bnn.data import dataset_info
    from s2bnn.engine import backbone_kwargs
    from s2bnn.eval import evaluate_pixels, evaluate_untrained
    from s2bnn.report import write_report

    t0 = time.perf_counter()
    out = Path(out)
    if (out / "results.json").is_file() and not force:
        raise RunDirError(f"{out} holds a finished demo (results.json); choose another --out or "
                          "pass --force to run it again")
    budget = _budget_seconds(plan)
    info = dataset_info(plan.data, root=plan.root)
    if info["num_classes"] < 2:
        raise DataError(f"{plan.data} has {info['num_classes']} class(es); the demo's probes "
                        "need at least 2 labelled classes")
    in_chans = int(info["image_shape"][0])
    image_size, size_note = demo_image_size(plan, max(info["image_shape"][1:]))
    if size_note:  # every stage and probe at that size
        plan = replace(plan, image_size=image_size)
    num_train = min(int(info["num_train"]), plan.limit or int(info["num_train"]))
    configs = stage_configs(plan, out, force=force,  # every key checked before work starts
                            num_train=num_train)
    out.mkdir(parents=True, exist_ok=True)
    (out / "demo_config.json").write_text(json.dumps(asdict(plan), indent=2))
    total = 6
    print(f"s2bnn demo on {info['name']}: {info['num_train']} train / {info['num_test']} test "
          f"images, {info['num_classes']} classes, {in_chans}x{image_size}x{image_size}; "
          f"budget {format_duration(budget)}; output in {out}", flush=True)
    if size_note:
        print(size_note, flush=True)

    timings: dict[str, float] = {}
    results: dict[str, dict[str, Any]] = {}
    report_runs: dict[str, dict[str, Any]] = {}
    common = {"knn_k": plan.knn_k, "device": plan.device}

    _header(1, total, "baselines: raw pixels and the untrained student "
                      f"({plan.random_seeds} seeds), weighted kNN and linear probes")
    t_eval = time.perf_counter()
    ds = eval_datasets(plan.data, plan.root, plan.eval_train_limit, plan.eval_test_limit,
                       in_chans, image_size)
    res = evaluate_pixels(ds["pixels_train"], ds["pixels_test"], **common)
    results["pixels"] = result_row("pixels", None, "flattened image", False, res,
                                   params=0, ops=0)
    report_runs["pixels"] = {**results["pixels"], "sweep": res.get("linear")}
    t_nets = time.perf_counter()
    nets = {**common, "fast_forward": packed_forward_for(ds["test"], plan.device)}
    student_kwargs = backbone_kwargs(configs["s2bnn"], in_chans)
    res = evaluate_untrained(plan.student_model, student_kwargs, ds["train"], ds["test"],
                             seeds=range(plan.random_seeds), sample_size=2000, **nets)
    results["random_init"] = result_row("random_init", None, plan.student_model, True, res,
                                        seeds=plan.random_seeds, features_by=_features_by(res))
    report_runs["random_init"] = {**results["random_init"], "sweep": res.get("linear"),
                                  "embedding_sample": res.get("embedding_sample")}
    now = time.perf_counter()
    timings["baselines"] = now - t_eval
    # The three trained networks are evaluated the same way: about three untrained seeds' worth
    # (the teacher is a little slower), measured here on this data and this machine.
    eval_reserve = 1.2 * 3 * (now - t_nets) / max(plan.random_seeds, 1)

    stages: dict[str, dict[str, Any]] = {}
    dirs: dict[str, Path] = {}
    teachers = 1
    texts = {
        "teacher": f"teacher: MoCo v2 on real-valued {plan.teacher_model}",
        "s2bnn": f"S2-BNN: distil binary {plan.student_model} from the frozen teacher "
                 "(strategy 3)",
        "mocov2": f"MoCo v2: the same binary {plan.student_model} without a teacher "
                  "(strategy 1)",
    }
    threads = side_by_side_threads(plan)
    groups = [("teacher",), ("s2bnn", "mocov2")] if threads else [(n,) for n in STAGES]
    for group in groups:
        i = STAGES.index(group[0])
        todo = {n: STAGE_SHARES[n] for n in STAGES[i:] if not stage_size(plan, n)}
        left = budget - (time.perf_counter() - t0) - eval_reserve - REPORT_SECONDS
        seconds = stage_seconds(left, todo, budget, first=i == 0)
        together = len(group) > 1
        if together:  # side by side, each student trains for all the time that is left
            seconds = {n: max(left, MIN_STAGE_FRACTION * budget) for n in seconds}
        for name in group:
            if name in seconds and seconds[name] <= 0:
                raise ConfigError(
                    f"demo key 'budget': {format_duration(budget)} is used up before the {name}"
                    f" stage (the evaluation on this data needs about "
                    f"{format_duration(eval_reserve)}); raise budget or lower eval_train_limit")
        cfgs = {name: stage_configs(plan, out, force=force, seconds=seconds,
                                    num_train=num_train, teachers=teachers)[name]
                for name in group}
        for name in group:
            share = f", {format_duration(seconds[name])} of the budget" if name in seconds else ""
            if together:
                share += (f" (side by side with the other student, on {threads} CPU "
                          f"thread{'s' if threads > 1 else ''} each)")
            _header(2 + STAGES.index(name), total, texts[name] + share)
        # A rerun with --force trains again (e.g. with a larger budget); a demo resumed after a
        # crash keeps the stages it had finished.
        if together:
            got = train_side_by_side(cfgs, threads, any_budget=not force,
                                     progress=plan.progress)
        else:
            got = {group[0]: train_stage(cfgs[group[0]], any_budget=not force)}
        for name, cfg in cfgs.items():
            dirs[name], timings[name] = got[name]
            stages[name] = stage_summary(dirs[name], timings[name], seconds.get(name),
                                         cfg.time_budget_max_epochs if cfg.time_budget else None)
            if together:
                stages[name]["side_by_side"] = {"with": [n for n in group if n != name],
                                                "threads": threads}
            if name == "teacher":
                teachers = _more_teachers(plan, out, force, num_train, seconds.get(name),
                                          stages[name])
                timings[name] += sum(t["seconds"]
                                     for t in stages[name].get("more_teachers", []))
            print(_describe_stage(name, stages[name]), flush=True)

    _header(5, total, "evaluation of the trained networks: weighted kNN and linear probes")
    t_eval = time.perf_counter()
    for name in ("teacher", "mocov2", "s2bnn"):
        print(f"{name} ...", flush=True)
        row, report_row = evaluate_run(name, dirs[name], ds, image_size=image_size,
                                       in_chans=in_chans, **nets)
        for key in ("steps", "epochs"):
            row[key] = report_row[key] = stages[name][key]
        row["train_seconds"] = report_row["train_seconds"] = round(timings[name], 1)
        results[name], report_runs[name] = row, report_row
    timings["evaluation"] = time.perf_counter() - t_eval

    _header(6, total, "report")
    order = ["pixels", "teacher", "random_init", "mocov2", "s2bnn"]
    claims = _check_claims(results, len(ds["test"]))
    warnings = weak_results(results, stages, format_duration(budget))
    wall = time.perf_counter() - t0
    packed = [n for n in order if results[n].get("features_by") == "packed"]
    notes = [*([size_note] if size_note else []), *claims,
             *[_describe_stage(n, g) for n, g in stages.items()],
             *([f"features of {', '.join(packed)} computed on the packed 1-bit runtime "
                "(s2bnn.deploy), the arithmetic a deployed network runs"] if packed else []),
             *[f"WARNING: {w}" for w in warnings],
             f"wall time {wall:.0f} s of a {budget:.0f} s budget (" + ", ".join(
                 f"{k} {v:.0f} s" for k, v in timings.items())
             + ("; the students side by side" if threads else "") + ")"]
    report = write_report([report_runs[n] for n in order], out, title="s2bnn demo",
                          dataset=info["name"], notes=notes,
                          class_names=getattr(ds["test"], "classes", None))
    wall = time.perf_counter() - t0
    payload = {
        "dataset": info["name"],
        "runs": [results[n] for n in order],
        "claims": claims,
        "warnings": warnings,
        "stages": stages,
        "seconds": {k: round(v, 1) for k, v in timings.items()},
        "budget_seconds": round(budget, 1),
        "wall_seconds": round(wall, 1),
        "config": asdict(plan),
    }
    atomic_write_bytes(out / "results.json", (json.dumps(payload, indent=2) + "\n").encode())
    print()
    print(_format_summary(payload["runs"]))
    for line in claims:
        print(f"- {line}")
    for name, got in stages.items():
        print(f"- {_describe_stage(name, got)}")
    for line in warnings:
        print(f"WARNING: {line}")
    print(f"\nreport: {report}\nresults: {out / 'results.json'}  ({wall:.0f} s of a "
          f"{budget:.0f} s budget)")
    return payload


def load_demo_config(path: str | None, overrides: list[str]) -> DemoConfig:
    """A :class:`DemoConfig` from an optional YAML file and ``key=value`` overrides."""
    return load_config(path, overrides, schema=DemoConfig)
