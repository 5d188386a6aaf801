"""Why the demo's teacher sits below raw pixels, and which recipe fixes it (issue #11, item 2).

Two tables on Fashion-MNIST, every row one change from a baseline, at equal wall time:

1. **Teacher.** MoCo v2 on ``resnet_small`` with the demo's ``TEACHER_RECIPE`` (the baseline),
   then one suspect per row: augmentation for small grey images (crop scale, blur, intensity
   jitter), temperature, queue, momentum, optimiser and learning rate, batch size, width, depth,
   stem stride, a symmetric loss. Each row's throughput is measured first (a short calibration
   run, cached per compute signature) and the row gets the optimiser steps that fit ``--budget``
   seconds; steps, epochs and seconds are recorded.
2. **Student.** The binary ``reactnet_small`` distilled by S2-BNN (``S2BNN_RECIPE``) from the
   best teacher, one change per row (learning rate, tau, views, augmentation, schedule, stem,
   width), beside the same student trained by MoCo v2 (``MOCOV2_RECIPE``), the untrained
   student (3 seeds) and the student distilled from today's teacher.

Every row is evaluated as ``s2bnn demo`` evaluates (weighted kNN, k 200, and the linear probe's
SGD and Adam LR sweeps on the pooled backbone features, 10,000 labelled training images, the
10,000 test images); raw pixels are measured in the same run. Teacher rows also report the
probe on the 128-d embedding the students distil (an extra column; the main columns read the
backbone, like the demo). No labels reach training: they are read by the probes only.

Each row runs as its own process under the CPU lock, so other jobs interleave between rows and
an interruption loses only the row in flight; results accumulate in the JSON and finished rows
are skipped::

    python benchmarks/teacher_study.py                    # every pending row, then the doc
    python benchmarks/teacher_study.py --only t_base t_color
    python benchmarks/teacher_study.py --report           # rewrite docs/TEACHER_STUDY.md only
    python benchmarks/teacher_study.py --quick            # smoke run (tiny data, seconds a row)
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
LOCK = "/tmp/s2bnn-cpu.lock"
# The probe these tables were measured with: 10 epochs, the library's default until the probe
# was found short of converged (docs/PROBE_EPOCHS.md); pinned so the rows stay re-runnable.
PROBE = {"epochs": 10}
IMAGE_SIZE, IN_CHANS = 28, 1


@dataclass
class Row:
    key: str
    table: str  # teacher | student | mocov2 | untrained | pixels
    variable: str  # what this row changes from its baseline
    value: str
    overrides: dict[str, Any] = field(default_factory=dict)
    teacher: str | None = None  # student rows: the teacher row they distil from
    seed: int = 0
    # 1: screened against the recipes as they stood before this study (ROUND1_PINS keeps those
    # rows re-runnable as measured); 2: against today's recipes, which took round 1's winners.
    round: int = 1
    budget: float | None = None  # training seconds (default: the table's --budget)
    # Student rows: the paper's two-step binarisation, this share of the steps with real weights
    # (binary activations only), the rest with binary weights initialised from that model.
    two_step: float | None = None
    step1_model: dict[str, Any] = field(default_factory=lambda: {"binary_weight": False})


# The teacher the student table distils from (the screening's winner, chosen after the teacher
# table; --teacher overrides it).
BEST_TEACHER = "t_best"
# The winning teacher recipe: the screening's winners combined (overrides on TEACHER_RECIPE as it
# stood before this study). Filled in from the teacher table.
BEST_TEACHER_OVERRIDES: dict[str, Any] = {
    "data": {"augment": {"color": True, "crop_scale": [0.6, 1.0]}},
    "batch_size": 128,
}


# What round 1's baselines were before its winners went into the recipes: the teacher without
# intensity jitter, with the preset's crops (0.35-1), and every row at batch 256.
ROUND1_PINS: dict[str, dict[str, Any]] = {
    "teacher": {"batch_size": 256, "data": {"augment": {"color": None, "crop_scale": None}},
                "method": {"temperature": 0.2}},
    "student": {"batch_size": 256},
    "mocov2": {"batch_size": 256},
}
# Round 2's baselines: the recipes as round 1 left them, i.e. its winners (t_best, s_bs128).
# Round 2's winner since went into TEACHER_RECIPE (temperature 0.1), so its rows pin 0.2 back.
ROUND2_BASE = {"teacher": "t_best", "student": "s_bs128"}
ROUND2_PINS: dict[str, dict[str, Any]] = {"teacher": {"method": {"temperature": 0.2}},
                                          "student": {}, "mocov2": {}}
# Round 3's baselines: today's recipes as they are (no pins), the teacher at the demo's share of
# its default budget and the students distilled from that teacher at theirs.
ROUND3_BASE = {"teacher": "t3_base", "student": "s3_base"}
ROUND3_PINS: dict[str, dict[str, Any]] = {"teacher": {}, "student": {}, "mocov2": {}}
ROUND3_TEACHER_S, ROUND3_STUDENT_S = 210.0, 150.0
# Round 4's baseline: the student recipe after round 3 (RPReLU slopes at 1), distilled from the
# teacher recipe after round 3 (t3_sym, the symmetric loss), 150 s each.
ROUND4_BASE = {"teacher": "t3_sym", "student": "s4_base"}
# reactnet_small's RPReLU slopes started at 0.25 until round 3's s3_slope1 made 1 its default;
# rounds 1-3 ran with 0.25, so their student rows pin it (the slope rows set 1).
SLOPE_025 = {"model": {"kwargs": {"prelu_init": 0.25}}}
SLOPE_025_ROUNDS = (1, 2, 3)
PINS = {1: ROUND1_PINS, 2: ROUND2_PINS, 3: ROUND3_PINS, 4: ROUND3_PINS}
BASES = {1: {"teacher": "t_base", "student": "s_base"}, 2: ROUND2_BASE, 3: ROUND3_BASE,
         4: ROUND4_BASE}


def _teacher_rows() -> list[Row]:
    def t(key: str, variable: str, value: str, **kw: Any) -> Row:
        return Row(key, "teacher", variable, value, **kw)

    def t2(key: str, variable: str, value: str, **kw: Any) -> Row:
        return Row(key, "teacher", variable, value, round=2, **kw)

    def t3(key: str, variable: str, value: str, **kw: Any) -> Row:
        return Row(key, "teacher", variable, value, round=3, budget=ROUND3_TEACHER_S, **kw)

    def t4(key: str, variable: str, value: str, **kw: Any) -> Row:
        return Row(key, "teacher", variable, value, round=4, budget=ROUND3_TEACHER_S, **kw)

    aug = lambda **a: {"data": {"augment": a}}  # noqa: E731
    meth = lambda **a: {"method": a}  # noqa: E731
    opt = lambda **a: {"optim": a}  # noqa: E731
    model = lambda **a: {"model": a}  # noqa: E731
    return [
        t("t_base", "baseline", "TEACHER_RECIPE (crop 0.35-1, blur p 0.5, no jitter on grey)"),
        t("t_color", "intensity jitter", "brightness + contrast 0.4, p 0.8", overrides=aug(
            color=True)),
        t("t_crop02", "crop scale", "0.2-1", overrides=aug(crop_scale=[0.2, 1.0])),
        t("t_crop06", "crop scale", "0.6-1", overrides=aug(crop_scale=[0.6, 1.0])),
        t("t_tau05", "temperature", "0.5", overrides=meth(temperature=0.5)),
        t("t_lr3e3", "learning rate", "Adam 3e-3", overrides=opt(lr=3e-3)),
        t("t_bs128", "batch size", "128", overrides={"batch_size": 128}),
        t("t_m09", "key momentum", "0.9", overrides=meth(momentum=0.9)),
        t("t_best", "combined", "the winners together", overrides=BEST_TEACHER_OVERRIDES),
        # Round 2: one change each from t_best (TEACHER_RECIPE before round 2).
        t2("t_noblur", "blur", "off", overrides=aug(blur=False)),
        t2("t_tau01", "temperature", "0.1", overrides=meth(temperature=0.1)),
        t2("t_queue16k", "queue", "16384", overrides=meth(queue_size=16384)),
        t2("t_sgd", "optimiser", "SGD 0.06, momentum 0.9, wd 5e-4", overrides=opt(
            name="sgd", lr=0.06, weight_decay=5e-4)),
        t2("t_wide15", "width", "x1.5 (36/72/144/288)", overrides=model(width_mult=1.5)),
        t2("t_deep2", "depth", "2 blocks per stage", overrides=model(kwargs={
            "layers": [2, 2, 2, 2]})),
        t2("t_stem1", "stem stride", "1", overrides=model(stem_stride=1)),
        t2("t_sym", "loss", "symmetric (both views as queries)", overrides=meth(symmetric=True)),
        t2("t_long", "training time", "210 s (the demo teacher's share)", budget=210.0),
        # Round 3: one change each from t3_base (today's TEACHER_RECIPE, 210 s).
        t3("t3_base", "baseline", "TEACHER_RECIPE (round 2's winner, tau 0.1), 210 s"),
        t3("t3_stem1", "stem stride", "1", overrides=model(stem_stride=1)),
        t3("t3_deep2", "depth", "2 blocks per stage", overrides=model(kwargs={
            "layers": [2, 2, 2, 2]})),
        t3("t3_sgd", "optimiser", "SGD 0.06, momentum 0.9, wd 5e-4", overrides=opt(
            name="sgd", lr=0.06, weight_decay=5e-4)),
        t3("t3_sym", "loss", "symmetric (method.symmetric: both views as queries)",
           overrides=meth(symmetric=True)),
        # Round 4: one change each from t3_sym (today's TEACHER_RECIPE, 210 s).
        t4("t4_bs64", "batch size", "64 (twice the steps)", overrides={"batch_size": 64}),
    ]


def _student_rows() -> list[Row]:
    def s(key: str, variable: str, value: str, **kw: Any) -> Row:
        return Row(key, "student", variable, value, **kw)

    def s2(key: str, variable: str, value: str, **kw: Any) -> Row:
        return Row(key, "student", variable, value, round=2, **kw)

    def s3(key: str, variable: str, value: str, **kw: Any) -> Row:
        return Row(key, "student", variable, value, round=3, teacher="t3_base",
                   budget=ROUND3_STUDENT_S, **kw)

    def s4(key: str, variable: str, value: str, **kw: Any) -> Row:
        return Row(key, "student", variable, value, round=4, teacher="t3_sym",
                   budget=ROUND3_STUDENT_S, **kw)

    def layout(width: float, **kwargs: Any) -> dict[str, Any]:  # a round-4 student layout
        return {"model": {"width_mult": width, "kwargs": kwargs}}

    kwargs = lambda **a: {"model": {"kwargs": a}}  # noqa: E731

    aug = lambda **a: {"data": {"augment": a}}  # noqa: E731
    return [
        s("s_base", "baseline", "S2BNN_RECIPE from the best teacher"),
        s("s_oldteacher", "teacher", "the first teacher (t_base)", teacher="t_base"),
        s("s_tau05", "temperature", "0.5", overrides={"method": {"temperature": 0.5}}),
        s("s_color", "augmentation", "+ intensity jitter", overrides=aug(color=True)),
        s("s_crop06", "augmentation", "crop 0.6-1", overrides=aug(crop_scale=[0.6, 1.0])),
        s("s_bs128", "batch size", "128", overrides={"batch_size": 128}),
        # Round 2: one change each from s_bs128 (today's S2BNN_RECIPE).
        s2("s_lr1e3", "learning rate", "Adam 1e-3", overrides={"optim": {"lr": 1e-3}}),
        s2("s_lr1e2", "learning rate", "Adam 1e-2", overrides={"optim": {"lr": 1e-2}}),
        s2("s_tau01", "temperature", "0.1", overrides={"method": {"temperature": 0.1}}),
        s2("s_views2", "views", "2 (both distilled)", overrides=aug(num_views=2)),
        s2("s_cosine", "schedule", "cosine", overrides={"optim": {"schedule": "cosine"}}),
        s2("s_bs64", "batch size", "64", overrides={"batch_size": 64}),
        s2("s_wide", "width", "x0.375 (12...384)", overrides={"model": {"width_mult": 0.375}}),
        s2("s_stem1", "stem stride", "1", overrides={"model": {"stem_stride": 1}}),
        s2("s_long", "training time", "180 s", budget=180.0),
        s2("s_demoteacher", "teacher", "t_long (210 s, as in the demo)", teacher="t_long"),
        s2("s_slope1", "RPReLU init slope", "1 (identity at init: no drift, no stuck signs)",
           overrides={"model": {"kwargs": {"prelu_init": 1.0}}}),
        s2("s_tteau01", "teacher", "t_tau01 (teacher tau 0.1)", teacher="t_tau01"),
        # Round 3: one change each from s3_base (today's S2BNN_RECIPE, 150 s, from t3_base).
        s3("s3_base", "baseline", "S2BNN_RECIPE from t3_base, 150 s"),
        s3("s3_real", "precision", "real weights and activations (not binary: the ceiling)",
           overrides={"model": {"binary_act": False, "binary_weight": False}}),
        s3("s3_binact", "precision", "binary activations, real weights (step 1 alone)",
           overrides={"model": {"binary_weight": False}}),
        s3("s3_twostep", "binarisation", "two steps: 1/2 binary activations, 1/2 both",
           two_step=0.5),
        s3("s3_fromreal", "binarisation", "two steps: 1/2 real-valued, 1/2 binary from it",
           two_step=0.5, step1_model={"binary_act": False, "binary_weight": False}),
        s3("s3_tail1", "layout", "last stage at 2x2 (tail_stride 1)",
           overrides=kwargs(tail_stride=1)),
        s3("s3_slope1", "RPReLU init slope", "1", overrides=kwargs(prelu_init=1.0)),
        s3("s3_bs64", "batch size", "64", overrides={"batch_size": 64}),
        s3("s3_wide05", "width", "x0.5 (16...512)", overrides={"model": {"width_mult": 0.5}}),
        s3("s3_wide05mid1", "width and depth", "x0.5, 1 middle block instead of 5",
           overrides={"model": {"width_mult": 0.5, "kwargs": {"mid_blocks": 1}}}),
        # Round 4: one change each from s4_base (today's S2BNN_RECIPE from t3_sym, 150 s). The
        # width rows move compute from the 2x2 / 1x1 tail (most of the step's time at 28 px) to
        # the wide early maps, at about the baseline's time per step.
        s4("s4_base", "baseline", "S2BNN_RECIPE from t3_sym, 150 s"),
        s4("s4_tfeat", "target", "the teacher's pooled backbone features (192-d), not its head",
           overrides={"method": {"proj_dim": 192, "teacher": {"head": "none"}}}),
        s4("s4_fromreal", "binarisation", "two steps: 1/2 real-valued, 1/2 binary from it",
           two_step=0.5, step1_model={"binary_act": False, "binary_weight": False}),
        s4("s4_w05c128", "width", "x0.5 early, at most 128 channels, 2 middle blocks",
           overrides=layout(0.5, max_channels=128, mid_blocks=2)),
        s4("s4_w1c64", "width", "x1 early (32...64), at most 64 channels, 2 middle blocks",
           overrides=layout(1.0, max_channels=64, mid_blocks=2)),
        s4("s4_w05c64", "width", "x0.5 early, at most 64 channels, 5 middle blocks",
           overrides=layout(0.5, max_channels=64)),
        s4("s4_w05c128m5", "width", "x0.5 early, at most 128 channels, 5 middle blocks",
           overrides=layout(0.5, max_channels=128)),
        s4("s4_w05c128m0", "width", "x0.5 early, at most 128 channels, no middle block",
           overrides=layout(0.5, max_channels=128, mid_blocks=0)),
        s4("s4_w05c256m0", "width", "x0.5 early, at most 256 channels, no middle block",
           overrides=layout(0.5, max_channels=256, mid_blocks=0)),
        s4("s4_w1c128m1", "width", "x1 early (32...128), at most 128 channels, 1 middle block",
           overrides=layout(1.0, max_channels=128, mid_blocks=1)),
        s4("s4_w0625c160m0", "width", "x0.625 early, at most 160 channels, no middle block",
           overrides=layout(0.625, max_channels=160, mid_blocks=0)),
        s4("s4_w075c192m0", "width", "x0.75 early, at most 192 channels, no middle block",
           overrides=layout(0.75, max_channels=192, mid_blocks=0)),
        s4("s4_w05c256t0", "width and depth",
           "x0.5 early, at most 256 channels, no middle block, no last stage (ends at 2x2)",
           overrides=layout(0.5, max_channels=256, mid_blocks=0, tail_blocks=0)),
        s4("s4_w0625t0", "width and depth",
           "x0.625 (20...320), no middle block, no last stage (ends at 2x2)",
           overrides=layout(0.625, mid_blocks=0, tail_blocks=0)),
        s4("s4_w075t0", "width and depth",
           "x0.75 (24...384), no middle block, no last stage (ends at 2x2)",
           overrides=layout(0.75, mid_blocks=0, tail_blocks=0)),
        s4("s4_w1t0", "width and depth",
           "x1 (32...512), no middle block, no last stage (ends at 2x2)",
           overrides=layout(1.0, mid_blocks=0, tail_blocks=0)),
        Row("m_base", "mocov2", "baseline", "MOCOV2_RECIPE (no teacher)"),
        Row("m_color", "mocov2", "augmentation", "+ intensity jitter", round=2, overrides=aug(
            color=True)),
        Row("untrained", "untrained", "untrained", "reactnet_small at random init (3 seeds)"),
    ]


def all_rows() -> dict[str, Row]:
    rows = [Row("pixels", "pixels", "raw pixels", "flattened image, standardised")]
    rows += _teacher_rows() + _student_rows()
    return {r.key: r for r in rows}


def with_seed(row: Row, seed: int) -> Row:
    out = copy.deepcopy(row)
    out.seed = seed
    out.key = f"{row.key}@s{seed}" if seed else row.key
    return out


def parse_key(key: str) -> Row:
    base, _, seed = key.partition("@s")
    rows = all_rows()
    if base not in rows:
        raise SystemExit(f"unknown row '{base}'; rows: {', '.join(rows)}")
    return with_seed(rows[base], int(seed or 0))


# --------------------------------------------------------------------------- configs
@dataclass
class Plan:
    out: Path
    json_path: Path
    doc_path: Path
    budget: float  # seconds of training per teacher row
    student_budget: float
    limit: int | None
    eval_train: int | None
    eval_test: int | None
    cal_steps: int
    teacher: str
    quick: bool


def _has_steps_key() -> bool:
    from s2bnn.config import Config

    return "steps" in Config.__dataclass_fields__


def row_config(row: Row, plan: Plan, out_dir: Path, steps: int | None,
               calibrate: bool = False) -> dict[str, Any]:
    """The training config dict of a row (steps=None: a calibration run of cal_steps)."""
    from s2bnn.demo import MOCOV2_RECIPE, S2BNN_RECIPE, TEACHER_RECIPE, deep_merge

    base = {"teacher": TEACHER_RECIPE, "student": S2BNN_RECIPE, "mocov2": MOCOV2_RECIPE}[row.table]
    base = deep_merge(base, PINS[row.round][row.table])
    if row.table in ("student", "mocov2") and row.round in SLOPE_025_ROUNDS:
        base = deep_merge(base, SLOPE_025)
    cfg = deep_merge(base, {
        "seed": row.seed, "batch_size": base.get("batch_size", 256), "device": "cpu",
        "resume": "auto",
        "force": calibrate, "progress": False, "log_every": 10 if calibrate else 20,
        "knn_every": 0, "output_dir": str(out_dir),
        "data": {"name": "fashion-mnist", "limit": plan.limit, "num_workers": 0},
    })
    cfg = deep_merge(cfg, row.overrides)
    if row.table == "student":
        tdir = plan.out / "runs" / (row.teacher or plan.teacher)
        cfg = deep_merge(cfg, {"method": {"teacher": {"path": str(tdir), "arch": "resnet_small"}}})
    n_train = plan.limit or 60000
    per_epoch = max(1, n_train // int(cfg["batch_size"]))
    if calibrate:
        cfg.update(epochs=1, max_steps=plan.cal_steps)
    else:
        assert steps is not None
        if _has_steps_key():
            cfg.update(steps=steps)
        else:  # until the trainer has `steps`: whole epochs, truncated (schedule cut short)
            cfg.update(epochs=math.ceil(steps / per_epoch), max_steps=steps)
    return cfg


def signature(row: Row, plan: Plan) -> str:
    """What a row's step costs depend on (rows with equal signatures share a calibration)."""
    cfg = row_config(row, plan, plan.out / "tmp", None, calibrate=True)
    parts = {"table": row.table, "model": cfg["model"], "batch": cfg["batch_size"],
             "views": cfg["data"]["augment"].get("num_views", 2),
             "sym": bool(cfg["method"].get("symmetric")),
             "shuffle": cfg["method"].get("shuffle_bn", "auto")}
    if row.table == "student":
        parts["teacher"] = row.teacher or plan.teacher
    return json.dumps(parts, sort_keys=True)


# --------------------------------------------------------------------------- results file
def machine() -> dict[str, Any]:
    import torch

    model, flags = platform.machine(), ""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        for line in out.splitlines():
            name, _, value = line.partition(":")
            if name.strip() == "Model name":
                model = value.strip()
            elif name.strip() == "Flags":
                flags = value.strip()
    except OSError:
        pass
    simd = [f for f in flags.split() if f.startswith(("avx", "amx", "fma", "f16c"))]
    return {"cpu": model, "cpu_count": os.cpu_count(), "simd_flags": simd,
            "torch": torch.__version__, "python": platform.python_version(),
            "threads": torch.get_num_threads()}


def load_results(path: Path) -> dict[str, Any]:
    if path.is_file():
        return json.loads(path.read_text())
    return {"rows": {}, "throughput": {}}


def save_results(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    tmp.replace(path)


def _update(plan: Plan, section: str, key: str, value: Any) -> None:
    data = load_results(plan.json_path)  # re-read: another row may have finished meanwhile
    data.setdefault(section, {})[key] = value
    data["machine"] = machine()
    save_results(plan.json_path, data)


# --------------------------------------------------------------------------- one row
def _eval_sets(plan: Plan) -> dict[str, Any]:
    from s2bnn.demo import eval_datasets

    return eval_datasets("fashion-mnist", None, plan.eval_train, plan.eval_test, IN_CHANS,
                         IMAGE_SIZE)


def _accuracies(res: dict[str, Any]) -> dict[str, Any]:
    out = {k: round(float(res[k]), 2) for k in
           ("knn_top1", "linear_top1", "linear_top1_sgd", "linear_top1_adam")
           if res.get(k) is not None}
    for k in ("knn_top1", "linear_top1"):
        if res.get(f"{k}_std") is not None:
            out[f"{k}_std"] = round(float(res[f"{k}_std"]), 2)
    sweep = res.get("linear") or {}
    for opt in ("sgd", "adam"):
        if isinstance(sweep.get(opt), dict):
            out[f"best_lr_{opt}"] = sweep[opt].get("best_lr")
    return out


def calibrate(row: Row, plan: Plan) -> float:
    """Seconds per optimiser step of this row's compute signature (cached in the JSON)."""
    from s2bnn.config import config_from_dict
    from s2bnn.engine import train
    from s2bnn.report import read_metrics

    sig = signature(row, plan)
    cached = load_results(plan.json_path).get("throughput", {}).get(sig)
    if cached:
        return float(cached["sec_per_step"])
    with tempfile.TemporaryDirectory(dir=plan.out) as tmp:
        cfg = row_config(row, plan, Path(tmp) / "cal", None, calibrate=True)
        t0 = time.perf_counter()
        train(config_from_dict(cfg, f"calibration of {row.key}"))
        wall = time.perf_counter() - t0
        rows = read_metrics(Path(tmp) / "cal" / "metrics.csv")
    rates = [r["img_per_s"] for r in rows[1:] if r.get("img_per_s")] or \
        [r["img_per_s"] for r in rows if r.get("img_per_s")]
    img_s = sorted(rates)[len(rates) // 2]
    sec = float(cfg["batch_size"]) / img_s
    _update(plan, "throughput", sig, {"sec_per_step": sec, "img_per_s": img_s,
                                      "calibration_wall_s": round(wall, 1), "row": row.key})
    return sec


def run_row(row: Row, plan: Plan) -> dict[str, Any]:
    import torch

    from s2bnn.config import config_from_dict
    from s2bnn.demo import deep_merge, evaluate_run, train_stage
    from s2bnn.eval import evaluate_pixels, evaluate_untrained

    ds = None
    t_start = time.perf_counter()
    result: dict[str, Any] = {"table": row.table, "variable": row.variable, "value": row.value,
                              "seed": row.seed, "base": row.key.split("@")[0], "round": row.round}
    if row.table == "pixels":
        ds = _eval_sets(plan)
        res = evaluate_pixels(ds["pixels_train"], ds["pixels_test"], knn_k=200, device="cpu",
                              sweep_kwargs=PROBE)
        result.update(_accuracies(res))
    elif row.table == "untrained":
        ds = _eval_sets(plan)
        res = evaluate_untrained("reactnet_small", {"in_chans": IN_CHANS, "num_classes": 0,
                                                    "prelu_init": 0.25},
                                 ds["train"], ds["test"], seeds=range(3), knn_k=200,
                                 device="cpu", sweep_kwargs=PROBE)
        result.update(_accuracies(res))
    else:
        budget = (None if plan.quick else row.budget) or \
            (plan.budget if row.table == "teacher" else plan.student_budget)
        sec_step = calibrate(row, plan)
        steps = max(1, int(budget / sec_step))
        run_dir = plan.out / "runs" / row.key
        t0 = time.perf_counter()
        if row.two_step:
            # Step 1 (by default binary activations, real weights) for its share of the steps,
            # then step 2 (both binary) from the whole step-1 model, each with its own LR
            # schedule, as the paper's two steps; the time per step is the binary one's
            # calibration for both.
            steps1 = max(1, round(steps * row.two_step))
            step1 = deep_merge(row_config(row, plan, run_dir / "step1", steps1),
                               {"model": row.step1_model})
            train_stage(config_from_dict(step1, f"row {row.key}, step 1"))
            cfg_d = deep_merge(row_config(row, plan, run_dir, steps - steps1), {"model": {
                "init_from": str(run_dir / "step1"), "init_scope": "model"}})
        else:
            cfg_d = row_config(row, plan, run_dir, steps)
        cfg = config_from_dict(cfg_d, f"row {row.key}")
        train_stage(cfg)
        train_wall = time.perf_counter() - t0
        from s2bnn.report import read_metrics

        metrics = read_metrics(run_dir / "metrics.csv")
        n_train = plan.limit or 60000
        last = metrics[-1] if metrics else {}
        result.update(steps=steps, epochs=round(steps * cfg.batch_size / n_train, 2),
                      train_seconds=round(train_wall, 1), budget_seconds=budget,
                      sec_per_step=round(sec_step, 4),
                      final_loss=last.get("loss"), final_cosine=last.get("cosine"))
        t_eval = time.perf_counter()
        ds = _eval_sets(plan)
        res, _ = evaluate_run(row.key, run_dir, ds, image_size=IMAGE_SIZE, in_chans=IN_CHANS,
                              knn_k=200, device="cpu", sweep_kwargs=PROBE)
        result.update(_accuracies(res))
        result["params"] = res.get("params")
        if row.table == "teacher":
            result.update(_embedding_probe(run_dir, ds))
        result["eval_seconds"] = round(time.perf_counter() - t_eval, 1)
    result["row_seconds"] = round(time.perf_counter() - t_start, 1)
    result["torch_threads"] = torch.get_num_threads()
    return result


def _embedding_probe(run_dir: Path, ds: dict[str, Any]) -> dict[str, Any]:
    """kNN and linear top-1 on the teacher's 128-d normalised embedding (what students distil)."""
    from s2bnn.eval import evaluate_features, extract_features
    from s2bnn.eval.features import make_loader
    from s2bnn.teachers import load_teacher

    teacher = load_teacher(run_dir, "resnet_small", precision="fp32")
    tr = extract_features(teacher, make_loader(ds["train"], 512))
    te = extract_features(teacher, make_loader(ds["test"], 512))
    res = evaluate_features(*tr, *te, knn_k=200, device="cpu", sweep_kwargs=PROBE)
    return {"emb_knn_top1": round(float(res["knn_top1"]), 2),
            "emb_linear_top1": round(float(res["linear_top1"]), 2)}


# --------------------------------------------------------------------------- the doc
def _cell(r: dict[str, Any] | None, key: str) -> str:
    if not r or r.get(key) is None:
        return "—"
    std = r.get(f"{key}_std")
    return f"{r[key]:.1f}" + (f" ± {std:.1f}" if std is not None else "")


def _delta(r: dict[str, Any], rows: dict[str, Any], key: str = "linear_top1") -> str:
    """Linear top-1 minus the row's baseline (BASES: t_base / s_base in round 1, the recipes
    round 1 left in round 2, today's in round 3), named after the number."""
    table = r.get("table")
    if table not in ("teacher", "student"):
        return "—"
    name = BASES[r.get("round", 1)][table]
    seed = r.get("seed") or 0
    if seed and f"{name}@s{seed}" in rows:  # against the same seed of the baseline
        name = f"{name}@s{seed}"
    base = rows.get(name)
    if not base or r.get(key) is None or base.get(key) is None:
        return "—"
    if r.get("base") == name.split("@")[0] and (r.get("seed") or 0) == (base.get("seed") or 0):
        return "+0.0"
    return f"{r[key] - base[key]:+.1f} ({name})"


def _seed_stats(rows: dict[str, Any], base: str) -> tuple[float, float, int] | None:
    vals = [r["linear_top1"] for k, r in rows.items()
            if k.split("@")[0] == base and r.get("linear_top1") is not None]
    if len(vals) < 2:
        return None
    mean = sum(vals) / len(vals)
    std = math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1))
    return mean, std, len(vals)


CONCLUSIONS = """\
Written from the tables above (single seed unless section 3 says otherwise). Round 1 screened
against the recipes as they stood before the study (t_base, s_base); its winners went into the
recipes, and round 2 screened one change at a time against those (t_best, s_bs128).

### Round 1

- **Why the first teacher sat below pixels: its augmentation was wrong for 28 px grey images.**
  With colour off for 1-channel images (the preset's default), the two views of an image differ
  only by crop, blur and flip, so they share their exact intensity histogram, a shortcut the
  network can match on. Brightness + contrast jitter (`data.augment.color=true`) was the largest
  single gain (+2.7 linear, +3.1 kNN). Milder crops (0.6-1 instead of 0.35-1) gave +1.9; stronger
  ones (0.2-1) cost 0.8. Batch 128 (twice the steps in the same time) gave +1.2.
- **What did not help:** Adam 3e-3 (+0.4 linear, -1.1 kNN: noise), tau 0.5 (-1.2), key
  momentum 0.9 (-4.4: the key encoder follows too fast).
- **Kept (t_best):** colour jitter + crop 0.6-1 + batch 128: linear 82.5 / 81.1 on two seeds
  (mean 81.8, seed noise ~1.5), kNN 77.6 / 76.8.
- **Students** (120 s each): the better teacher lifts the S2-BNN student from 70.7 (distilled
  from t_base) to 73.3; batch 128 (575 steps of 128 instead of 291 of 256) to 75.8 (kept).
  tau 0.5 (+0.5) and crops 0.6-1 (-0.2) are noise; intensity jitter costs the student 1.3.
  MoCo v2 on the same student 51.2, untrained 42.1 ± 3.9.
- The `train s` column of two rows (t_color, t_m09) is inflated by another job that ran outside
  the CPU lock; their step counts (equal to the baseline's) are what the comparison rests on.

### Round 2

Other engineers' jobs ran outside the CPU lock during several round-2 rows, so their `train s`
is inflated (s_views2 869 s, s_lr1e2 476 s for 120 s of calibrated steps); every row still got
the steps its calibration gave it, which is what the comparison rests on.

- **Student: nothing screened beat the recipe (s_bs128, 75.8).** Adam lr 1e-3 72.6 (-3.2) and
  1e-2 74.9 (-0.8): 3e-3 stays. Cosine 74.1 (-1.7): linear decay stays. tau 0.1 75.6 (noise).
  Two distilled views 68.3 (223 steps of twice the work). The slower networks lose more from
  having fewer steps than they gain: width x0.375 70.0 (238 steps), stem stride 1 73.5 (208).
  RPReLU slopes initialised at 1 instead of 0.25 (`model.kwargs.prelu_init=1`, new, default
  unchanged), which removes the untrained net's drift and stuck signs of section 4, gave 76.7 /
  kNN 74.7 (+0.9 / +1.0, 512 steps): within seed noise, so the ReActNet default stays. (Its
  first run, `s_slope1_contaminated` in the JSON, was calibrated while another job ran outside
  the lock and got 98 steps: 70.4; it is not in the table.)
- **The student is not short of steps.** s_long (863 steps, 1.5x) gave 75.9, +0.2: at this
  recipe the binary student plateaus near 76 within ~600 steps, so a larger share of the demo
  budget would not buy it the 4 points it misses (STAGE_SHARES unchanged). Its cosine to the
  teacher keeps rising (0.77 -> 0.82) while its features do not.
- **Teacher: temperature 0.1 is the one change that helped, a little.** t_tau01: linear 83.1 /
  81.4 on two seeds (mean 82.3, against t_best's 81.8), kNN 79.0 / 77.4 (+1.0 on the mean), the
  128-d embedding the students distil kNN 80.5 / 78.6 (+1.6). Each seed beats the same seed of
  t_best on all three, but by less than the seed noise on linear top-1; kept (TEACHER_RECIPE,
  configs/fashion_mnist/teacher_mocov2.yaml). The student distilled from it (s_tteau01, 485
  steps) scored 74.8 against 75.8: within noise, not a gain.
- **Teacher, no help:** blur off 82.2, queue 16384 82.1, width x1.5 81.1 (343 steps).
- **Not measured in round 2** (time; the rows are defined, run them with `--only`): teacher
  SGD, depth 2, stem stride 1, symmetric loss, t_long (210 s); students s_demoteacher, m_color.
  Round 3 ran stem stride 1 and the symmetric loss against today's recipe instead.

### Round 3

Baselines: today's recipes at the demo's default shares, the teacher 210 s (t3_base) and each
student 150 s distilled from it (s3_base); a row marked @s1 is seed 1 against seed 1 of its
baseline. Other jobs ran outside the CPU lock during some rows (t3_base@s1 446 s, s3_slope1@s1
735 s of `train s` for 210 s / 150 s of calibrated steps); the steps are what the comparison
rests on.

- **Where the binary student loses its points: the binary activations.** The same network with
  real weights and activations, distilled the same way for the same time, reaches 81.2 (s3_real,
  kNN 78.2), at the teacher's own level; binary activations with real weights (s3_binact) 77.1;
  both binary (s3_base) 75.5 / 75.2 on two seeds. So binarising the activations costs about 4
  points and the weights another 1.5, and the student's cosine to the teacher's embedding tells
  the same story (0.84 real, 0.66 binary activations, 0.55 binary). The teacher is not what caps
  the student: the real-valued student matches it.
- **Binary-student rows, none a way to 80:**
  - the paper's two-step binarisation (half the steps with real weights, half with binary ones
    from that model): 75.4, no gain at this length; half the steps fully real-valued, then
    binary from that model (s3_fromreal): 76.2 (+0.7, one seed, within noise; not combined with
    the slope-1 init below, and the demo would need a fourth stage for it);
  - the last stage at 2x2 instead of 1x1 (`model.kwargs.tail_stride=1`, new): 73.5 (-2.0);
  - batch 64 (795 steps; the step does not get twice as cheap): 74.6 (-0.9);
  - wider: x0.5 gets 193 steps in 150 s (3.2x the time per step) and scores 62.5; x0.5 with one
    middle block instead of five, 251 steps, 71.4. These two barely matched the teacher (cosine
    0.06 and 0.23 at the end, against 0.55): not only fewer steps; whether a lower learning rate
    or a warm-up lets a wider binary student train in this time was not measured.
- **RPReLU slopes initialised at 1: kept.** s3_slope1 76.6 / 75.8 on two seeds against s3_base's
  75.5 / 75.2 (+1.1 / +0.6), after +0.9 in round 2 on another teacher: three paired runs, each
  positive. `reactnet_small` now starts its RPReLU slopes at 1 (ReActNet-A keeps PReLU's 0.25 as
  published); the study's earlier rows pin 0.25, as they ran.
- **Teacher: the symmetric loss, kept.** Both views as queries, each against the other's key
  (`method.symmetric=true`, new; MoCo v3's loss), twice the encoder work per step: 515 steps in
  210 s against 1,038. t3_sym 83.8 / 82.0 on two seeds against t3_base's 83.1 / 81.4 (+0.7 /
  +0.7 linear; kNN +1.1 / +0.3; embedding kNN +0.3 / +0.1). It is in TEACHER_RECIPE and
  configs/fashion_mnist/teacher_mocov2.yaml. The teacher's seed-to-seed spread (1.7 on t3_base,
  1.8 on t3_sym) is as large as its margin over raw pixels (83.2), so "above pixels" holds on one
  seed of two.
- **Teacher, no help:** stem stride 1 at 28 px, 334 steps (3x the time per step): 81.6 (-1.5).

### Round 4

Baseline: today's student recipe (slopes at 1) distilled from today's teacher recipe (t3_sym),
150 s: s4_base 77.1 / 77.4 on two seeds, the demo's 77.2. The question was where the time of a
step goes. `python benchmarks/student_profile.py` (torch.profiler, batch 128, 28 px, 2 threads)
printed for reactnet_small: convolutions 49 % of the step, their backward 39 %; of the
convolutions' time, 55 % on 2x2 input maps and 18 % on 1x1 ones (the five middle blocks at 128
channels and the last stage at 256, where a 3x3 kernel mostly multiplies padding), 27 % on the
28x28 to 4x4 maps. The 8- to 64-channel blocks there, where a binary network loses most
information (one bit per channel), cost little. For reactnet_compact (below) the same script
printed 2 % on 2x2 maps and 96 % on 14x14 to 4x4. So the width rows move
compute from the small maps to the large ones (`max_channels` caps the late widths,
`mid_blocks` and `tail_blocks` drop blocks; new keyword arguments), most at about the
baseline's time per step (the `steps` column says what each got).

- **Width early, depth late: +2.6 to +3.4, kept as `reactnet_compact`.** x0.75 (24 ... 384
  channels), no middle blocks and no last stage, so the network ends on the 2x2 map: 421 steps
  (1.46x the baseline's time per step), 80.5 / 79.9 on two seeds against 77.1 / 77.4, kNN 78.4 /
  78.1 against 75.8 / 75.7, with 1.01 M parameters instead of 1.78 M. Its student-teacher
  cosine ends at 0.80 (baseline 0.72). It is the demo's student now (`student_model`), and the
  MoCo v2 student and the untrained baseline use the same network.
- **The steps between.** One change at a time from x0.25 with five middle blocks:
  - x0.5, channels capped at 128, two middle blocks: 78.7 / 78.5 (same time per step);
  - the same with no middle block: 79.2 / 78.9 (684 steps); with all five: 76.7 (469 steps);
  - x0.5 capped at 256, no middle block: 79.6 / 79.5; without the last stage: 79.3 (660 steps);
  - no middle block and no last stage at x0.625: 80.1 (539 steps); at x0.75: 80.5 / 79.9; at
    x1: 79.6 (245 steps: 1.7x x0.75's time per step, and too few steps);
  - capped at 64 channels (a 64-d feature): x0.5 75.8, x1 with two middle blocks 76.1; x1 with
    128 channels and one middle block 77.3 (350 steps).
- **No help:** distilling the teacher's pooled backbone features (192-d, `method.teacher.head=
  none`) instead of its 128-d head output, 76.6 (-0.6; the soft cross-entropy over non-negative
  features gave the student little to match, cosine -0.2 at the end); half the steps
  real-valued, then binary from that model, with the slope-1 init: 76.3 (-0.9, after +0.7 at
  slope 0.25 in round 3: noise).

- **Teacher at batch 64 (t4_bs64, against t3_sym): not pursued.** Its calibration run measured
  156 images/s where the row itself then trained at 208, so it got 511 steps in 157 s instead
  of 210 s. At about t3_sym's steps (515 of 128) but half the images it scored 81.9 against
  83.8 (kNN 78.0 against 79.8). Batch 64 also runs a third fewer images a second than 128 on
  this CPU, so in equal time it would get about 680 steps, a third more, not twice as many.
  The second seed was not run.

### Why the untrained student scores 42 while the prototype's scored ~71 (section 4)

The probe reads what the paper's protocol reads and ReActNet's own code returns before its fc:
the global average pool of the last block's output (RPReLU(BN(conv) + shortcut)), real-valued,
256-d at width 0.25, not signed. The layout matches the reference ReActNet-A (real conv + BN
stem, no activation before the blocks, pool then fc), so there is no tail bug to fix. At 28 px
with the stride-2 stem the last two blocks run on a 1x1 map (the pool is the identity there).

- **Untrained:** accuracy peaks after block 1 (59 linear) and falls with depth to 42 at the
  output. At random init the residual stream drifts positive (RPReLU's 0.25 slope shrinks the
  negative half, BatchNorm's running statistics are still the identity, RSign's thresholds are
  0), so the sign inputs saturate: by the last block 90 % of them are +1 and ~200 of 256 channels
  give the same sign almost everywhere. Deep binary layers then pass almost nothing on. The
  prototype's untrained 70.7-72.8 must have come from a different network or probe (its code is
  not kept); with ours no block of an untrained net reaches 61.
- **Trained (s_bs128):** accuracy rises block by block to 76.1 at block 10 and stays there;
  sign inputs are balanced (+1 shares 0.4-0.73, at most 2 stuck channels). Training fixes the
  drift, so the low untrained number says nothing about the trained student; the last two
  blocks (1x1 map, 47 % of the binary weights) add nothing measurable at 28 px.
"""


def _features_section() -> list[str]:
    """Section 4 from ``benchmarks/student_features.py``'s JSON, when it has been run."""
    path = ROOT / "docs" / "results" / "student_features.json"
    if not path.is_file():
        return []
    data = json.loads(path.read_text())
    untrained = [v for k, v in data.items() if k.startswith("untrained")]
    trained = {k: v for k, v in data.items() if not k.startswith("untrained")}
    if not untrained:
        return []
    names = list(trained)
    lines = ["", "## 4. What the probe reads from the student, block by block", "",
             "Made by `python benchmarks/student_features.py --untrained 0 1 2 --run "
             + " ".join(f"runs/teacher_study/runs/{n}" for n in names) + "`: the demo's probe "
             "(kNN k 200, linear sweep) on the globally average-pooled output of every block "
             f"of `reactnet_small` at 28 px, untrained ({len(untrained)} seeds, mean) and "
             "trained, and the share of +1 in the sign input of each block's 1x1 convolution "
             "(`stuck`: channels whose sign is the same in over 95 % of positions). The last "
             "block is what the probe reads (`feature_dim` 256; at 28 px the last two blocks run "
             "on a 1x1 map, so the pooling is the identity there).", "",
             "| tap | map | dim | untrained linear | untrained +1 share / stuck | "
             + " | ".join(f"{n} linear | {n} +1 share / stuck" for n in names) + " |",
             "|" + "---|" * (5 + 2 * len(names))]
    sizes = {"stem": 14, "block0": 14, "block1": 7, "block2": 7, "block3": 4, "block4": 4}
    for tap in untrained[0]["taps"]:
        lin = sum(u["taps"][tap]["linear_top1"] for u in untrained) / len(untrained)
        dim = untrained[0]["taps"][tap]["dim"]
        n = int(tap[5:]) if tap.startswith("block") else -1
        side = sizes.get(tap, 2 if n <= 10 else 1)

        def sign(entry: dict[str, Any], tap: str = tap) -> str:
            sg = entry["signs"].get(f"{tap}.conv1")
            return f"{sg['plus_share']:.2f} / {sg['channels_stuck']}" if sg else "—"

        cells = [tap, f"{side}x{side}", str(dim), f"{lin:.1f}",
                 " ; ".join(sign(u) for u in untrained)]
        for v in trained.values():
            cells += [f"{v['taps'][tap]['linear_top1']:.1f}", sign(v)]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def write_doc(plan: Plan) -> Path:
    data = load_results(plan.json_path)
    rows: dict[str, Any] = data.get("rows", {})
    m = data.get("machine") or machine()
    order = list(all_rows())
    jp = plan.json_path
    jp_s = str(jp.relative_to(ROOT) if jp.is_relative_to(ROOT) else jp)
    simd = " ".join(m.get("simd_flags") or [])
    lines = [
        "# Teacher study: a teacher above raw pixels, and the student it teaches",
        "",
        "Produced by `python benchmarks/teacher_study.py` (raw results: "
        f"`{jp_s}`). "
        f"Machine: {m.get('cpu')}, {m.get('cpu_count')} CPU cores "
        f"({m.get('threads')} torch threads), SIMD flags {simd}; "
        f"Python {m.get('python')}, torch {m.get('torch')}. Every job of this study ran under the "
        "shared CPU lock, but other people's jobs outside it inflated the `train s` of some "
        "rows (named in the conclusions); rows are compared at the steps their calibration gave "
        "them.",
        "",
        "Protocol. Fashion-MNIST, 28 px, no labels before the probes. Every row changes one "
        "thing from its table's baseline and trains for the same wall time: a short calibration "
        "run measures the row's seconds per step and the row gets the steps that fit the "
        f"budget ({plan.budget:.0f} s per teacher, {plan.student_budget:.0f} s per student); "
        "the LR schedule follows those steps"
        + ("" if _has_steps_key() else " (truncated: whole epochs cut at max_steps)") + ". "
        "Evaluation is the demo's: weighted kNN (k 200) and the linear probe (SGD and Adam LR "
        "sweeps, LR chosen on held-out training features) on the pooled backbone features, "
        f"{plan.eval_train or 60000} labelled training images, "
        f"{plan.eval_test or 10000} test images. `emb` columns: the same probes on the "
        "teacher's 128-d L2-normalised head output, the target the students distil. "
        "Δ: linear top-1 minus the baseline named beside it (round 1: t_base / s_base, the "
        "recipes before the study; round 2: t_best / s_bs128, the recipes round 1 left; "
        f"round 3: t3_base / s3_base, today's recipes at the demo's shares of its default "
        f"budget, {ROUND3_TEACHER_S:.0f} s per teacher and {ROUND3_STUDENT_S:.0f} s per "
        "student; round 4: s4_base, today's student recipe distilled from t3_sym for "
        f"{ROUND3_STUDENT_S:.0f} s, and t3_sym for teacher rows; a second seed against the "
        "same seed of its baseline). "
        "One seed unless stated.",
        "",
    ]
    pix = rows.get("pixels")
    lines += [f"**Raw pixels** (same run): kNN {_cell(pix, 'knn_top1')}, "
              f"linear {_cell(pix, 'linear_top1')}.", ""]
    # teacher table
    lines += ["## 1. Teacher (MoCo v2 on resnet_small)", "",
              "| row | changes | to | steps | epochs | train s | kNN | linear | Δ | "
              "SGD / Adam | emb kNN | emb linear |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for key in order:
        for rk, r in rows.items():
            if rk.split("@")[0] != key or r.get("table") != "teacher":
                continue
            lines.append(
                f"| {rk} | {r['variable']} | {r['value']} | {r.get('steps')} | "
                f"{r.get('epochs')} | {r.get('train_seconds')} | {_cell(r, 'knn_top1')} | "
                f"{_cell(r, 'linear_top1')} | {_delta(r, rows)} | "
                f"{_cell(r, 'linear_top1_sgd')} / {_cell(r, 'linear_top1_adam')} | "
                f"{_cell(r, 'emb_knn_top1')} | {_cell(r, 'emb_linear_top1')} |")
    # student table
    lines += ["", f"## 2. Binary student (reactnet_small), distilled from `{plan.teacher}` "
              "(round 3: from `t3_base`, round 4: from `t3_sym`)", "",
              "| row | method | changes | to | steps | epochs | train s | kNN | linear | Δ | "
              "SGD / Adam |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    names = {"student": "S2-BNN", "mocov2": "MoCo v2", "untrained": "—"}
    for key in order:
        for rk, r in rows.items():
            if rk.split("@")[0] != key or r.get("table") not in names:
                continue
            delta = _delta(r, rows)
            lines.append(
                f"| {rk} | {names[r['table']]} | {r['variable']} | {r['value']} | "
                f"{r.get('steps', '—')} | {r.get('epochs', '—')} | "
                f"{r.get('train_seconds', '—')} | {_cell(r, 'knn_top1')} | "
                f"{_cell(r, 'linear_top1')} | {delta}"
                f" | {_cell(r, 'linear_top1_sgd')} / {_cell(r, 'linear_top1_adam')} |")
    # seeds
    seeded = sorted({k.split("@")[0] for k in rows if "@s" in k})
    if seeded:
        lines += ["", "## 3. Seed noise", "",
                  "| row | seeds | linear top-1 mean | std (n-1) |", "|---|---|---|---|"]
        for key in seeded:
            st = _seed_stats(rows, key)
            if st:
                lines.append(f"| {key} | {st[2]} | {st[0]:.1f} | {st[1]:.1f} |")
    lines += _features_section()
    total = sum(r.get("row_seconds", 0) for r in rows.values())
    cal = sum(t.get("calibration_wall_s", 0) for t in data.get("throughput", {}).values())
    lines += ["", f"Wall time: {total / 60:.1f} min over {len(rows)} rows, plus "
              f"{cal / 60:.1f} min of calibration runs.", "", "## Conclusions", "", CONCLUSIONS]
    plan.doc_path.parent.mkdir(parents=True, exist_ok=True)
    plan.doc_path.write_text("\n".join(lines).rstrip() + "\n")
    return plan.doc_path


# --------------------------------------------------------------------------- driver
def default_keys() -> list[str]:
    rows = all_rows()
    return [k for k in rows if k != "t_best" or BEST_TEACHER_OVERRIDES]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", nargs="+", default=None,
                    help="row keys to run (KEY or KEY@sN for seed N); default: every row")
    ap.add_argument("--seeds", type=int, nargs="+", default=None,
                    help="with --only: run these seeds of each row")
    ap.add_argument("--report", action="store_true", help="only rewrite the doc from the JSON")
    ap.add_argument("--quick", action="store_true", help="smoke run: tiny data, 8 s per row")
    ap.add_argument("--budget", type=float, default=None, help="teacher seconds (150)")
    ap.add_argument("--student-budget", type=float, default=None, help="student seconds (120)")
    ap.add_argument("--teacher", default=BEST_TEACHER, help="teacher row students distil from")
    ap.add_argument("--in-process", action="store_true",
                    help="run rows in this process (the default spawns one locked process per row)")
    ap.add_argument("--redo", action="store_true", help="run rows even if already in the JSON")
    args = ap.parse_args()
    q = args.quick
    plan = Plan(
        out=ROOT / "runs" / ("teacher_study_quick" if q else "teacher_study"),
        json_path=(ROOT / "runs" / "teacher_study_quick" / "teacher_study.json") if q
        else ROOT / "docs" / "results" / "teacher_study.json",
        doc_path=(ROOT / "runs" / "teacher_study_quick" / "TEACHER_STUDY.md") if q
        else ROOT / "docs" / "TEACHER_STUDY.md",
        budget=args.budget or (8.0 if q else 150.0),
        student_budget=args.student_budget or (8.0 if q else 120.0),
        limit=2048 if q else None, eval_train=1000 if q else 10000, eval_test=1000 if q else None,
        cal_steps=6 if q else 30, teacher=args.teacher, quick=q,
    )
    plan.out.mkdir(parents=True, exist_ok=True)
    if args.report:
        print(write_doc(plan))
        return 0
    keys = args.only or default_keys()
    if args.seeds:
        keys = [f"{k}@s{s}" if s else k for k in keys for s in args.seeds]
    for key in keys:
        row = parse_key(key)
        if row.key in load_results(plan.json_path).get("rows", {}) and not args.redo:
            print(f"== {row.key}: done, skipped", flush=True)
            continue
        if args.in_process:
            print(f"== {row.key}: {row.variable} -> {row.value}", flush=True)
            result = run_row(row, plan)
            _update(plan, "rows", row.key, result)
            print(f"== {row.key}: " + json.dumps({k: result.get(k) for k in (
                "steps", "train_seconds", "knn_top1", "linear_top1", "emb_knn_top1")}),
                flush=True)
        else:
            cmd = ["flock", LOCK, sys.executable, __file__, "--in-process", "--only", row.key,
                   "--teacher", plan.teacher, "--budget", str(plan.budget),
                   "--student-budget", str(plan.student_budget)]
            cmd += ["--quick"] * q + ["--redo"] * args.redo
            rc = subprocess.call(cmd)
            if rc:
                print(f"== {row.key}: failed (exit {rc})", flush=True)
    if not args.in_process:
        print(write_doc(plan))
    return 0


if __name__ == "__main__":
    sys.exit(main())
