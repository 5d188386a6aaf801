"""The demo's recipes on a small folder: what lifts the S2-BNN student on 2,000 images (#11).

On ``benchmarks/demo_budget.py``'s ``folder-2k`` row (2,000 training / 1,000 validation PNGs,
28 px, grey, 10 classes) the demo's student stayed short of the issue's goal of 15 points over
the untrained network. Every row here is one change to the demo's recipes, trained on that
folder for a fixed number of optimiser steps (not seconds: this VM's speed drifts between
rows, and steps keep rows comparable), and evaluated as ``s2bnn demo`` evaluates (weighted kNN,
k 200, and the linear probe's SGD and Adam sweeps; on a labelled set this small the probe
picks its LR by 5-fold cross-validation). Raw pixels and the untrained student (3 seeds) are
measured in the same run. No labels reach training.

The default steps are what the demo's stages got at this machine's usual speed on this folder
(teacher 585, S2-BNN student 469: docs/DEMO_BUDGET.md, round 5's first folder run).

    python benchmarks/small_folder.py                 # every pending row, then the doc
    python benchmarks/small_folder.py --only f_t_q512 --redo
    python benchmarks/small_folder.py --report        # rewrite docs/SMALL_FOLDER.md only
    python benchmarks/small_folder.py --quick         # smoke run (tiny steps, numbers mean nothing)

Several seeds and a GPU: ``--seeds 0 1 2`` runs every chosen row once per seed (an s2bnn row at
seed s distils from its teacher row at seed s, so a row and its base are paired), ``--device
cuda`` trains and evaluates there, and ``--jobs N`` runs N (row, seed) jobs at once as
subprocesses, teachers before the students that need them. Such runs go to their own store and
table (``--store gpu`` writes docs/results/small_folder_gpu.json and
docs/SMALL_FOLDER_SEEDS.md), so numbers from different machines never share a table:

    python benchmarks/small_folder.py --store gpu --device cuda --seeds 0 1 2 --jobs 6
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
from demo_budget import write_folder  # noqa: E402
from run_all import machine  # noqa: E402

TEACHER_STEPS, STUDENT_STEPS = 585, 469
FOLDER = (2000, 1000)


@dataclass
class Row:
    key: str
    stage: str  # teacher | s2bnn | mocov2 | pixels | untrained
    variable: str
    value: str
    overrides: dict[str, Any] = field(default_factory=dict)
    steps: int | None = None  # default: TEACHER_STEPS or STUDENT_STEPS
    teacher: str = "f_t_base"  # s2bnn rows: the teacher row they distil from
    base: str | None = None  # the row this one changes one thing of
    # > 0: the paper's two steps. This share of the steps trains with ``step1_model`` (default
    # binary activations, real weights), the rest fully binary from the whole step-1 model.
    two_step: float = 0.0
    step1_model: dict[str, Any] = field(default_factory=lambda: {"binary_weight": False})


ROWS: dict[str, Row] = {r.key: r for r in [
    Row("pixels", "pixels", "baseline", "the flattened image"),
    Row("untrained", "untrained", "baseline", "the student at random init (3 seeds)"),
    Row("f_t_base", "teacher", "baseline", "TEACHER_RECIPE (queue capped at the 2,000 images)"),
    # The queue holds both views' keys of the last ~8 steps: capped at the dataset's size it
    # holds a stale key of about half the images, so a query often meets its own image among
    # the negatives.
    Row("f_t_q1024", "teacher", "queue", "1024", {"method": {"queue_size": 1024}},
        base="f_t_base"),
    Row("f_t_q512", "teacher", "queue", "512", {"method": {"queue_size": 512}},
        base="f_t_base"),
    # 37 epochs on 2,000 images, not 1-2 on 60,000: stronger crops may now pay.
    Row("f_t_crop035", "teacher", "crop scale", "0.35-1",
        {"data": {"augment": {"crop_scale": [0.35, 1.0]}}}, base="f_t_base"),
    # Is the teacher still learning at 37 epochs, and the student at 30? If the teacher is not,
    # its share of a small folder's budget would serve the student better.
    Row("f_t_half", "teacher", "training steps", "293 (half)", steps=293, base="f_t_base"),
    # Against f_t_half (what the demo's teacher now trains on this folder): regularisers that
    # might matter on 2,000 images and not on 60,000.
    Row("f_t_wd", "teacher", "weight decay", "5e-4 (Adam, L2)", {"optim": {"weight_decay": 5e-4}},
        steps=293, base="f_t_half"),
    Row("f_t_tau02", "teacher", "temperature", "0.2", {"method": {"temperature": 0.2}},
        steps=293, base="f_t_half"),
    # Multi-crop (SwAV): small crops as extra queries against both full views' keys, more
    # positive pairs from each image of a small set per step.
    Row("f_t_mc4", "teacher", "multi-crop", "+ 4 local crops (12 px, scale 0.15-0.4)",
        {"data": {"augment": {"local_crops": 4}}}, steps=293, base="f_t_half"),
    # On 60,000 images a wider teacher lost to its lower step count (docs/TEACHER_STUDY.md,
    # t_wide15); on 2,000 images the teacher stops at its epoch cap with time to spare.
    Row("f_t_w15", "teacher", "width", "x1.5 (36/72/144/288)", {"model": {"width_mult": 1.5}},
        steps=293, base="f_t_half"),
    Row("f_s_base", "s2bnn", "baseline", "S2BNN_RECIPE from f_t_base"),
    # The margin the issue asks for is over the same network at random init: how large is it
    # for the ReActNet-A layout the demo used before reactnet_compact (docs/TEACHER_STUDY.md)?
    Row("untrained_small", "untrained", "student", "reactnet_small (3 seeds)",
        {"model": {"name": "reactnet_small"}}, base="untrained"),
    Row("f_s_small", "s2bnn", "student", "reactnet_small", {"model": {"name": "reactnet_small"}},
        base="f_s_base"),
    Row("f_s_2x", "s2bnn", "training steps", "938 (twice)", steps=938, base="f_s_base"),
    Row("f_s_q1024", "s2bnn", "teacher", "f_t_q1024 (queue 1024)", teacher="f_t_q1024",
        base="f_s_base"),
    # 30 epochs of the same 2,000 images: more varied views might be worth more than on 60,000
    # (where jitter cost the student 1.3 points at about one epoch, docs/TEACHER_STUDY.md).
    Row("f_s_color", "s2bnn", "augmentation", "+ brightness/contrast jitter (as the teacher's)",
        {"data": {"augment": {"color": True}}}, base="f_s_base"),
    # The teacher labels any input: mixing two images of the batch (teacher and student see the
    # same mix) gives the student inputs that 2,000 images alone never would (function
    # matching, Beyer et al. 2022). Beta(1, 1): weights uniform; Beta(0.4, 0.4): mostly near
    # one image.
    Row("f_s_mix1", "s2bnn", "mixup", "alpha 1.0", {"method": {"mixup_alpha": 1.0}},
        base="f_s_base"),
    Row("f_s_mix04", "s2bnn", "mixup", "alpha 0.4", {"method": {"mixup_alpha": 0.4}},
        base="f_s_base"),
    # The paper's two steps, which the demo skips: on 60,000 images at about one epoch they
    # gave nothing (docs/TEACHER_STUDY.md, s3_twostep / s3_fromreal); here the student sees 30.
    Row("f_s_twostep", "s2bnn", "binarisation", "two steps: 1/2 binary activations, 1/2 both",
        two_step=0.5, base="f_s_base"),
    Row("f_s_fromreal", "s2bnn", "binarisation", "two steps: 1/2 real-valued, 1/2 binary",
        two_step=0.5, step1_model={"binary_act": False, "binary_weight": False},
        base="f_s_base"),
    # Function matching pays over long schedules (Beyer et al.): mixup at twice the steps.
    Row("f_s_2x_mix1", "s2bnn", "mixup", "alpha 1.0 at 938 steps",
        {"method": {"mixup_alpha": 1.0}}, steps=938, base="f_s_2x"),
    # Round 8, run with three seeds (--seeds). The student's LR 3e-3 was chosen at about one
    # epoch of 60,000 images; here it sees 30 epochs of 2,000, where Adam's steps on the latent
    # binary weights may be too large to settle (the paper's 3e-4 is for 200 epochs).
    Row("f_s_lr1e3", "s2bnn", "learning rate", "1e-3", {"optim": {"lr": 1.0e-3}},
        base="f_s_base"),
    Row("f_s_lr3e4", "s2bnn", "learning rate", "3e-4", {"optim": {"lr": 3.0e-4}},
        base="f_s_base"),
    # tau 0.5 scored 3.3 above 0.2 on 10,000 images at one seed (docs/CLAIMS_FOLLOWUP.md).
    Row("f_s_tau05", "s2bnn", "temperature", "0.5", {"method": {"temperature": 0.5}},
        base="f_s_base"),
    Row("f_s_cos", "s2bnn", "schedule", "cosine", {"optim": {"schedule": "cosine"}},
        base="f_s_base"),
    # The student gained from twice its steps on all three seeds: does a third more pay, and
    # does the lower LR add to it?
    Row("f_s_3x", "s2bnn", "training steps", "1407 (three times)", steps=1407, base="f_s_base"),
    Row("f_s_2x_lr1e3", "s2bnn", "learning rate", "1e-3 at 938 steps", {"optim": {"lr": 1.0e-3}},
        steps=938, base="f_s_2x"),
    Row("f_t_lr3e3", "teacher", "learning rate", "3e-3", {"optim": {"lr": 3.0e-3}},
        steps=293, base="f_t_half"),
    Row("f_t_lr3e4", "teacher", "learning rate", "3e-4", {"optim": {"lr": 3.0e-4}},
        steps=293, base="f_t_half"),
]}

# The rows a --seeds run covers when --only is not given, in the order they are worth running.
SEED_ROWS = ["pixels", "untrained", "f_t_base", "f_s_base", "f_s_lr1e3", "f_s_2x", "f_s_tau05",
             "f_s_lr3e4", "f_s_cos", "f_t_half", "f_t_lr3e3", "f_t_lr3e4", "f_s_3x",
             "f_s_2x_lr1e3"]


def run_name(key: str, seed: int) -> str:
    """A row's run and result name at ``seed`` (seed 0 keeps the bare key)."""
    return key if seed == 0 else f"{key}_s{seed}"


def plan_for(folder: Path, quick: bool, seed: int = 0, device: str = "cpu") -> Any:
    from s2bnn.demo import DemoConfig

    return DemoConfig(data=str(folder), progress=False, random_seeds=1 if quick else 3,
                      seed=seed, device=device)


def stage_config(row: Row, plan: Any, out: Path, quick: bool, part: str | None = None) -> Any:
    """The demo's config of ``row.stage`` on the folder, ``row.overrides`` on top, sized by
    steps; ``part`` (``step1`` / ``step2``) is one of the two steps of a ``two_step`` row. The
    run (and an s2bnn row's teacher) is the one of ``plan.seed``."""
    from s2bnn.config import config_from_dict, config_to_dict
    from s2bnn.demo import deep_merge, stage_configs

    cfg = config_to_dict(stage_configs(plan, out / "demo", force=True)[row.stage])
    steps = row.steps or (TEACHER_STEPS if row.stage == "teacher" else STUDENT_STEPS)
    run_dir = out / "runs" / run_name(row.key, plan.seed)
    extra: dict[str, Any] = {}
    if part is not None:
        steps1 = max(1, round(steps * row.two_step))
        if part == "step1":
            steps, run_dir, extra = steps1, run_dir / "step1", {"model": row.step1_model}
        else:
            steps -= steps1
            extra = {"model": {"init_from": str(run_dir / "step1"), "init_scope": "model"}}
    if quick:
        steps = 3 if part else 6
    cfg = deep_merge(cfg, {**row.overrides, "steps": steps, "epochs": None,
                           "output_dir": str(run_dir), "force": True, "time_budget": None})
    cfg = deep_merge(cfg, extra)
    if row.stage == "s2bnn":
        teacher = out / "runs" / run_name(row.teacher, plan.seed)
        cfg = deep_merge(cfg, {"method": {"teacher": {"path": str(teacher)}}})
    return config_from_dict(cfg, f"row {row.key}")


def run_row(row: Row, plan: Any, out: Path, ds: dict[str, Any], quick: bool) -> dict[str, Any]:
    from s2bnn.demo import evaluate_run, packed_forward_for, train_stage
    from s2bnn.engine import backbone_kwargs
    from s2bnn.eval import evaluate_pixels, evaluate_untrained
    from s2bnn.report import read_metrics

    t0 = time.perf_counter()
    device = plan.device
    nets = {"knn_k": 200, "device": device, "fast_forward": packed_forward_for(ds["test"], device)}
    result: dict[str, Any] = {"stage": row.stage, "variable": row.variable, "value": row.value,
                              "base": row.base, "seed": plan.seed, "device": device}
    if row.stage == "pixels":
        res = evaluate_pixels(ds["pixels_train"], ds["pixels_test"], knn_k=200, device=device)
    elif row.stage == "untrained":
        student = stage_config(Row("x", "s2bnn", "", "", row.overrides), plan, out, quick)
        res = evaluate_untrained(student.model.name, backbone_kwargs(student, 1), ds["train"],
                                 ds["test"], seeds=range(plan.random_seeds), sample_size=2000,
                                 **nets)
    else:
        seconds1, steps1 = 0.0, 0
        if row.two_step:
            step1 = stage_config(row, plan, out, quick, "step1")
            seconds1, steps1 = train_stage(step1)[1], step1.steps
        cfg = stage_config(row, plan, out, quick, "step2" if row.two_step else None)
        run_dir, seconds = train_stage(cfg)
        seconds += seconds1
        metrics = read_metrics(run_dir / "metrics.csv")
        rates = sorted(m["img_per_s"] for m in metrics if m.get("img_per_s"))
        steps = cfg.steps + steps1
        result.update(steps=steps, epochs=round(steps * cfg.batch_size / FOLDER[0], 1),
                      train_seconds=round(seconds, 1),
                      img_per_s=rates[len(rates) // 2] if rates else None,
                      teacher=row.teacher if row.stage == "s2bnn" else None)
        res, _ = evaluate_run(row.key, run_dir, ds, image_size=28, in_chans=1, **nets)
    for k in ("knn_top1", "linear_top1", "linear_top1_sgd", "linear_top1_adam",
              "linear_top1_std"):
        if res.get(k) is not None:
            result[k] = round(float(res[k]), 2)
    result["row_seconds"] = round(time.perf_counter() - t0, 1)
    return result


def write_doc(data: dict[str, Any], path: Path) -> None:
    rows = data["rows"]

    def cell(r: dict[str, Any], k: str) -> str:
        v = r.get(k)
        return "—" if v is None else (f"{v:.1f}" if isinstance(v, float) else str(v))

    lines = ["# The demo's recipes on a 2,000-image folder", "",
             "Written by `python benchmarks/small_folder.py` (see its docstring for the method). "
             f"Machine: {data.get('machine')}.", "",
             f"Folder: {FOLDER[0]} training / {FOLDER[1]} validation PNGs from Fashion-MNIST's "
             "test split (benchmarks/demo_budget.py's `folder-2k`). Every trained row has a fixed "
             "number of steps; linear top-1 is the demo's probe.", "",
             "| row | stage | changes | to | steps (epochs) | train s | img/s | kNN | linear | "
             "Δ | SGD / Adam |", "|" + "---|" * 11]
    for key, row in ROWS.items():
        r = rows.get(key)
        if r is None:
            continue
        delta = "—"
        if r.get("base") in rows and r.get("linear_top1") is not None:
            delta = f"{r['linear_top1'] - rows[r['base']]['linear_top1']:+.1f} ({r['base']})"
        steps = f"{r['steps']} ({r['epochs']})" if r.get("steps") else "—"
        lines.append(" | ".join([
            f"| {key}", row.stage, row.variable, row.value, steps, cell(r, "train_seconds"),
            cell(r, "img_per_s"), cell(r, "knn_top1"), cell(r, "linear_top1"), delta,
            f"{cell(r, 'linear_top1_sgd')} / {cell(r, 'linear_top1_adam')}"]) + " |")
    lines += ["", *NOTES]
    path.write_text("\n".join(lines) + "\n")


# Written by hand after a run (the table above comes from the JSON).
NOTES: list[str] = [
    "## What the rows say",
    "",
    "One seed each, on 1,000 validation images: a linear top-1 there has a binomial standard "
    "error of about 1.3 points, so single differences under ~2 points are not evidence.",
    "",
    "- **The queue is not the folder teacher's problem.** The demo caps MoCo v2's queue at the "
    "dataset (1,792 keys for 2,000 images), so a query often meets a stale key of its own image "
    "among the negatives. Queue 1,024 scored 80.5 (+1.1), queue 512 79.2 (-0.2): not monotonic, "
    "and the student distilled from the 1,024 teacher scored exactly the baseline's 78.7 "
    "(f_s_q1024). The queue rule is unchanged.",
    "- **Nor do stronger crops or the usual regularisers:** crops of 0.35-1 instead of 0.6-1, "
    "79.3 (-0.1); against the 19-epoch teacher (f_t_half, 79.3), Adam weight decay 5e-4 79.0 "
    "(-0.3) and temperature 0.2 77.9 (-1.4).",
    "- **The teacher stops learning long before its budget ends.** Half the steps (293, 19 "
    "epochs) scored 79.3 against 79.4 at 585 (37 epochs); only its kNN moved (72.9 -> 74.6).",
    "- **The student may still be learning.** Twice the steps (938, 60 epochs) lifted it from "
    "78.7 to 79.4 (kNN 73.2 -> 74.6), from 14.6 to 15.3 points above the untrained network "
    "(64.1). That is within the noise on one seed, but it points the same way on both probes.",
    "- **Intensity jitter for the student** (the teacher's brightness/contrast jitter on the "
    "distilled view) cost it 1.0 (77.7), as on 60,000 images (-1.3).",
    "- **Round 7, none kept.** Multi-crop for the teacher (f_t_mc4: four 12 px crops of "
    "0.15-0.4 as extra queries against both full views' keys, `data.augment.local_crops`) "
    "made each step 1.7x slower and scored 78.5 against 79.3 for f_t_half at the same steps "
    "(kNN 70.9 against 72.9). A teacher 1.5x as wide (f_t_w15, 36-288 channels), which the "
    "epoch cap leaves time for on this folder, scored 78.8 (kNN 73.8). Mixup for the student "
    "(`method.mixup_alpha`: teacher and "
    "student see the same mix of two images) scored 78.1 at alpha 1.0 and at alpha 0.4, "
    "against 78.7 (kNN 73.7 and 74.6 against 73.2). Beyer et al. found that distillation with "
    "mixup pays off only over long schedules; at twice the steps (938, 60 epochs) it scored "
    "78.4 against 79.4 without it (f_s_2x_mix1), though its kNN rose (75.6 against 74.6). Both "
    "features stay available as options, and the recipes do not use them.",
    "- **Round 7: the paper's two-step binarisation does not pay here either.** The student "
    "sees 30 epochs here against about one on 60,000 images, where two steps gave nothing "
    "(docs/TEACHER_STUDY.md). Half the steps with binary activations and real weights, then "
    "half fully binary from that model, scored 77.4 (f_s_twostep). Half real-valued, then "
    "half binary, scored 76.9 (f_s_fromreal). The one-step baseline scored 78.7. Each step "
    "has its own LR schedule and only half the steps; the binary weights' latent values may "
    "need more steps than that to settle.",
    "- **Round 7: the margin depends on the student's random init as much as on its "
    "training.** The ReActNet-A layout the demo used before `reactnet_compact` "
    "(`reactnet_small`) scores 51.3 +- 3.0 untrained (untrained_small) and 75.7 distilled "
    "(f_s_small, same teacher and steps, 1.8x the images a second): 24.4 above its random "
    "init and 5.2 below pixels, so it meets both folder goals. `reactnet_compact` scores "
    "64.1 untrained and 78.7 distilled: a margin of 14.6, but the better student by 3.0 "
    "points, as on 60,000 images (2.6-3.4, docs/TEACHER_STUDY.md round 4). The demo keeps "
    "the better student; switching networks to pass a margin over random init would lower "
    "what the user gets.",
    "- **Kept:** the demo's teacher now stops after `teacher_max_epochs` (default 20) epochs "
    "when its budget share would buy more (`time_budget_max_epochs` of the engine; the cap is "
    "raised on tiny sets so that it still allows 300 steps), and the stages after it share the "
    "time it leaves. It binds only on small sets: in a 10-minute demo the teacher gets about 1 "
    "epoch of Fashion-MNIST's 60,000 images and 7 of 10,000.",
    "- **What the demo then got** (docs/DEMO_BUDGET.md, folder rows): teacher 300 steps in "
    "120-126 s, the S2-BNN student 648 and 613 steps (seeds 0 and 1) instead of about 470. The "
    "students scored 77.6 and 78.0, against teachers of 79.4 and 78.4, so not more than f_s_base. "
    "Whether the cap gains anything is not established at this noise level. It does not lose "
    "anything either, and the teacher's time is no longer spent where it bought nothing.",
]


def jobs_for(keys: list[str], seeds: list[int]) -> list[tuple[str, int]]:
    """(row, seed) pairs in the order of ``keys``, except that a student row's teacher row (if
    chosen) comes before it; baselines once (the untrained row already averages several
    inits). Jobs start in this order, so a student never waits for a teacher queued behind it."""
    order: list[str] = []
    for k in keys:
        teacher = ROWS[k].teacher if ROWS[k].stage == "s2bnn" else None
        for key in ([teacher] if teacher in keys else []) + [k]:
            if key not in order:
                order.append(key)
    return [(k, sd) for k in order
            for sd in (seeds if ROWS[k].stage not in ("pixels", "untrained") else seeds[:1])]


def run_parallel(pairs: list[tuple[str, int]], args: argparse.Namespace, data: dict[str, Any],
                 store: Path) -> None:
    """Run ``pairs`` as ``--jobs`` subprocesses of this script at once; a student job waits for
    its teacher's; nothing new starts after ``--deadline`` seconds. Results merge into ``store``
    as each job ends."""
    jobs_dir = Path(args.work) / "jobs"
    jobs_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    threads = max(1, (os.cpu_count() or 2) // args.jobs)
    done: dict[str, bool] = {}
    lock = threading.Lock()
    scheduled = {run_name(*p) for p in pairs}

    def one(pair: tuple[str, int]) -> None:
        key, seed = pair
        name = run_name(key, seed)
        row = ROWS[key]
        if row.stage == "s2bnn":  # its teacher is an earlier job: wait for it
            teacher = run_name(row.teacher, seed)
            while teacher in scheduled and teacher not in done:
                time.sleep(1)
        if args.deadline and time.perf_counter() - start > args.deadline:
            print(f"== {name}: skipped (past the deadline)", flush=True)
            done[name] = False
            return
        out = jobs_dir / f"{name}.json"
        cmd = [sys.executable, __file__, "--only", key, "--seeds", str(seed), "--device",
               args.device, "--work", args.work, "--store", args.store, "--job-out", str(out),
               *(["--quick"] if args.quick else [])]
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        ok = proc.returncode == 0 and out.is_file()
        print(f"== {name}: {'done' if ok else 'FAILED'} in {time.perf_counter() - t0:.0f} s",
              flush=True)
        with lock:
            if ok:
                data["rows"][name] = json.loads(out.read_text())
                data["machine"] = machine()
                store.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
                print(json.dumps(data["rows"][name]), flush=True)
            else:
                print(proc.stdout[-2000:] + proc.stderr[-4000:], flush=True)
            done[name] = ok

    with ThreadPoolExecutor(args.jobs) as pool:
        list(pool.map(one, pairs))


def seed_summary(data: dict[str, Any]) -> list[str]:
    """Markdown: each row's mean ± std over its seeds, and the mean paired difference from its
    base row (same seeds; an s2bnn row and its base distil from the same teacher run)."""
    rows = data["rows"]

    def runs(key: str) -> dict[int, float]:
        return {r["seed"]: r["linear_top1"] for name, r in rows.items()
                if name == key or name.startswith(key + "_s") and name[len(key) + 2:].isdigit()
                if r.get("linear_top1") is not None}

    def ms(v: list[float]) -> str:
        return f"{statistics.mean(v):.1f}" + (f" ± {statistics.stdev(v):.1f}" if len(v) > 1
                                               else "")

    lines = ["| row | stage | changes | to | seeds | linear top-1 (per seed) | mean ± std | "
             "paired Δ vs base |", "|" + "---|" * 8]
    for key, row in ROWS.items():
        mine = runs(key)
        if not mine:
            continue
        per_seed = " / ".join(f"{mine[sd]:.1f}" for sd in sorted(mine))
        delta = "—"
        if row.base:
            base = runs(row.base)
            diffs = [mine[sd] - base[sd] for sd in sorted(mine) if sd in base]
            if diffs:
                delta = (f"{statistics.mean(diffs):+.1f} ({row.base}, {len(diffs)} seed"
                         f"{'s' if len(diffs) > 1 else ''})")
        lines.append(f"| {key} | {row.stage} | {row.variable} | {row.value} | "
                     f"{', '.join(str(sd) for sd in sorted(mine))} | {per_seed} | "
                     f"{ms(list(mine.values()))} | {delta} |")
    return lines


def write_seeds_doc(data: dict[str, Any], path: Path) -> None:
    lines = ["# The demo's recipes on a 2,000-image folder, several seeds", "",
             "Written by `python benchmarks/small_folder.py --store gpu --device cuda --seeds 0 1 "
             "2 --jobs 6` (see its docstring). Machine: "
             f"{data.get('machine')}. Same folder, rows, steps and probe as "
             "docs/SMALL_FOLDER.md, whose rows were measured on 2 CPU cores: numbers from the two "
             "machines are not mixed in one table (the GPU trains with TF32 convolutions and "
             "bf16 autocast).", "", *seed_summary(data), "", *SEED_NOTES]
    path.write_text("\n".join(lines) + "\n")


# Written by hand after a --seeds run.
SEED_NOTES: list[str] = [
    "## What the rows say",
    "",
    "Three seeds per row; an s2bnn row at seed s distils from f_t_base at seed s, so each "
    "paired difference holds the teacher fixed. The untrained row is the mean of 3 random "
    "inits, pixels has no seed. The GPU's baselines agree with the CPU's (pixels 80.9 on both, "
    "untrained 64.4 against 64.1, teacher 79.7 ± 0.8 against one seed's 79.4); its S2-BNN "
    "baseline is lower (76.9 ± 1.5 against one seed's 78.7), inside the spread of its seeds.",
    "",
    "- **The student is still learning at the demo's steps.** Twice the steps (938) gained on "
    "every seed (+1.9, +2.3, +0.9; mean +1.7), three times (1,407) +2.0 (+2.8, +3.3, -0.1). "
    "At three times the student is 0.8 below its teacher (78.9 against 79.7) and 14.5 above "
    "the untrained network: still short of the issue's 15, because the teacher bounds it.",
    "- **The learning rate stays at 3e-3.** The paper's 3e-4 lost on every seed (-2.9); 1e-3 "
    "was +0.8 at 469 steps with mixed signs (+1.3, +2.3, -1.3) and -0.5 at 938 steps.",
    "- **Neither temperature 0.5 (+0.4, mixed signs) nor a cosine schedule (-0.4) is "
    "evidence of anything** at this spread.",
    "- **The teacher:** 585 steps (37 epochs) against 293 (19 epochs, about the demo's cap) "
    "gave +0.9 on average but +1.1, +2.5 and -1.0 per seed: the 20-epoch cap may cost the "
    "teacher about a point here, which one CPU seed (79.4 against 79.3) did not show. Adam "
    "3e-3 (-1.1) and 3e-4 (-0.8) both scored below the recipe's 1e-3.",
    "- **Nothing here changes the recipes.** The demo's student on this folder trains about "
    "1.4 times these steps (648 in docs/DEMO_BUDGET.md's folder-2k row); the rows say the "
    "gain from more would be about a point, not the 1-2 points the margin goal is short by.",
]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", choices=list(ROWS), default=None)
    parser.add_argument("--redo", action="store_true")
    parser.add_argument("--report", action="store_true")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--work", default=None,
                        help="runs and the folder (default: runs/small_folder[_STORE])")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--device", default="cpu", help="cpu (default), cuda, auto")
    parser.add_argument("--store", default="main", choices=["main", "gpu"],
                        help="main: docs/results/small_folder.json and docs/SMALL_FOLDER.md; "
                             "gpu: small_folder_gpu.json and docs/SMALL_FOLDER_SEEDS.md")
    parser.add_argument("--jobs", type=int, default=1, help="(row, seed) jobs run at once")
    parser.add_argument("--deadline", type=float, default=None,
                        help="with --jobs: start no job after this many seconds")
    parser.add_argument("--job-out", default=None, help=argparse.SUPPRESS)  # one job's result
    args = parser.parse_args()
    from s2bnn.demo import eval_datasets

    suffix = "" if args.store == "main" else f"_{args.store}"
    name = f"small_folder{suffix}" + ("_quick" if args.quick else "")
    args.work = args.work or str(ROOT / "runs" / name)
    store = ROOT / "docs" / "results" / f"{name}.json"
    data = json.loads(store.read_text()) if store.is_file() else {"rows": {}}
    work = Path(args.work)
    keys = args.only or (SEED_ROWS if args.store != "main" else list(ROWS))
    if not args.report:
        folder = write_folder(work / "data", *((200, 100) if args.quick else FOLDER))
        pairs = [p for p in jobs_for(keys, args.seeds)
                 if args.redo or args.job_out or run_name(*p) not in data["rows"]]
        store.parent.mkdir(parents=True, exist_ok=True)
        if args.jobs > 1 and args.job_out is None:
            run_parallel(pairs, args, data, store)
            pairs = []
        if pairs:
            ds = eval_datasets(str(folder), None, None, None, 1, 28)
        for key, seed in pairs:
            print(f"== {run_name(key, seed)}", flush=True)
            plan = plan_for(folder, args.quick, seed, args.device)
            result = run_row(ROWS[key], plan, work, ds, args.quick)
            print(json.dumps(result), flush=True)
            if args.job_out:  # a job of run_parallel: the parent merges it
                Path(args.job_out).write_text(json.dumps(result))
                continue
            data["rows"][run_name(key, seed)] = result
            data["machine"] = machine()
            store.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    if not args.quick and args.job_out is None:
        if args.store == "main":
            write_doc(data, ROOT / "docs" / "SMALL_FOLDER.md")
        else:
            write_seeds_doc(data, ROOT / "docs" / "SMALL_FOLDER_SEEDS.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
