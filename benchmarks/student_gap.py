"""Why the demo's student stays below its teacher on 4,000 images (issue #11, rounds 10-11).

    python benchmarks/demo_budget.py --only folder-4k-bf16 folder-4k-bf16-seed1   # teachers first
    python benchmarks/student_gap.py [--seeds 0 1] [--rows base t_feat ...] [--steps 1600]
                                     [--work DIR] [--no-probes]
    python benchmarks/student_gap.py --report            # rewrite the doc from the JSON

On the 2,000-image folder the demo's S2-BNN student catches up with its teacher; on 4,000 images
it stays 1.2-2.7 points below it (docs/DEMO_BUDGET.md, round 9). This benchmark asks why, one
variable at a time:

1. the linear probe (the demo's) of what the student is taught against what the teacher's
   backbone holds: the teacher's 128-d L2-normalised head output (the paper's target), its
   pooled backbone features (what the teacher's own probe reads), and the student's features;
2. the demo's S2-BNN student (``S2BNN_RECIPE``) trained for a fixed number of optimiser steps
   (about what the demo gives it on this folder) from the same teacher, changing one thing per
   row (``ROWS``: overrides of the stage config). Rows with a ``teacher`` key first retrain
   the teacher (the demo's recipe and steps, with those overrides) and distil from it; rows
   with a ``patch`` key train under one of ``PATCHES`` (ideas that are not config keys: a
   teacher-side temperature, progressive input sizes, a cold compile cache).

A student run already finished in ``--work`` with the same config is reused. No labels reach
training.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
from run_all import machine, probe_features, write_markdown  # noqa: E402

DEMOS = ROOT / "runs" / "demo_budget"
TEACHERS = {0: "folder-4k-bf16", 1: "folder-4k-bf16-seed1"}  # teacher seed -> demo_budget row
TEACHER_STEPS = 620  # what the demo's teacher trains here: its 20-epoch cap, 31 steps an epoch
JSON = ROOT / "docs" / "results" / "student_gap.json"
DOC = ROOT / "docs" / "STUDENT_GAP.md"

# row -> (what changes, to what, overrides of the S2-BNN stage config[, the row it is compared
# with: "base" if not given]). One variable per row. Every row pins what it changes, so a re-run
# reproduces it whatever S2BNN_RECIPE says at the time; "base" pins the preset's crops.
PRESET_CROPS = {"data": {"augment": {"crop_scale": [0.35, 1.0]}}}
TEACHER_CROPS = {"data": {"augment": {"crop_scale": [0.6, 1.0]}}}
ROWS: dict[str, tuple[Any, ...]] = {
    "base": ("baseline", "S2BNN_RECIPE (target: the teacher's 128-d head output; crops 0.35-1)",
             PRESET_CROPS),
    "t_feat": ("target", "the teacher's pooled backbone features (192-d, no head)",
               {**PRESET_CROPS, "method": {"proj_dim": 192, "teacher": {"head": "none"}}}),
    "crop06": ("student crops", "0.6-1 (the teacher's; preset 0.35-1)", TEACHER_CROPS),
    "crop02": ("student crops", "0.2-1", {"data": {"augment": {"crop_scale": [0.2, 1.0]}}}),
    "lr6e-3": ("learning rate", "6e-3 (recipe 3e-3)", {**PRESET_CROPS, "optim": {"lr": 6.0e-3}}),
    "tau05": ("temperature", "0.5 (recipe 0.2)", {**PRESET_CROPS, "method": {"temperature": 0.5}}),
    "crop06_tau05": ("temperature", "0.5, with the teacher's crops", {
        **TEACHER_CROPS, "method": {"temperature": 0.5}}, "crop06"),
    "head1024": ("student head", "hidden layer 1,024 wide (the backbone's 384), teacher's crops",
                 {**TEACHER_CROPS, "method": {"proj_hidden_dim": 1024}}, "crop06"),
    # Rows with a "teacher" key first train a teacher (TEACHER_RECIPE, TEACHER_STEPS steps, the
    # demo's 20-epoch cap on this folder) with those overrides, then the student from it.
    "t_retrain": ("teacher", "retrained at fixed steps, same recipe; teacher's crops", {
        **TEACHER_CROPS, "teacher": {}}, "crop06"),
    "t_proj256": ("teacher", "head output 256-d (128; the student's head follows), teacher's "
                  "crops", {**TEACHER_CROPS, "teacher": {"method": {"proj_dim": 256}},
                            "method": {"proj_dim": 256}}, "t_retrain"),
    "steps2x": ("training steps", "twice the steps (is the student short of steps?)",
                {**PRESET_CROPS, "steps": "2x"}),
    "bs256": ("batch", "256 at half the steps (the paper's batch; equal images)",
              {**PRESET_CROPS, "batch_size": 256, "steps": "0.5x"}),
    "bs64": ("batch", "64 at twice the steps (equal images)",
             {**PRESET_CROPS, "batch_size": 64, "steps": "2x"}),
    # Round 11. Rows with a "patch" key train under one of the PATCHES below: ideas measured
    # here before any becomes a config key (none has).
    "t_temp01": ("teacher temperature", "0.1 in the teacher's softmax only (the student's "
                 "stays 0.2): sharper targets", {**PRESET_CROPS, "patch": ("teacher_tau", 0.1)}),
    "lowres16": ("student input size", "16 px for the first half of the steps, then 28 (the "
                 "teacher always sees 28); 1.34x the steps, about the base's time",
                 {**PRESET_CROPS, "steps": "1.34375x", "patch": ("low_res", 16, 0.5)}),
    "lowres22": ("student input size", "22 px for the first 70 % of the steps, then 28; "
                 "1.19x the steps, about the base's time",
                 {**PRESET_CROPS, "steps": "1.1875x", "patch": ("low_res", 22, 0.7)}),
    "head_linear": ("student head", "one linear layer (`method.proj_hidden_dim=0`; the paper's "
                    "MLP: 384-384-128)", {**PRESET_CROPS, "method": {"proj_hidden_dim": 0}}),
    "compile": ("torch.compile", "`compile=true` from an empty compile cache, as on a fresh "
                "machine (same steps: compare train s)", {**PRESET_CROPS, "compile": True,
                                                          "patch": ("cold_compile",)}),
}


@contextlib.contextmanager
def teacher_tau(tau: float) -> Iterator[None]:
    """The distillation loss with ``tau`` in the teacher's softmax and the method's own
    temperature in the student's: the library's loss on the teacher's embedding scaled by
    ``temperature / tau``."""
    import s2bnn.losses as losses

    def loss(student: Any, teacher: Any, temperature: float) -> Any:
        return saved(student, teacher * (temperature / tau), temperature)

    saved = losses.soft_cross_entropy
    losses.soft_cross_entropy = loss  # block_soft_cross_entropy looks it up per call
    try:
        yield
    finally:
        losses.soft_cross_entropy = saved


@contextlib.contextmanager
def low_res(size: int, until: float) -> Iterator[None]:
    """The student's views resized to ``size`` px (bilinear, antialiased) for the first
    ``until`` of its steps; the teacher keeps the full views (progressive resizing)."""
    import torch.nn.functional as F

    from s2bnn.methods.s2bnn import S2BNN

    where = {"step": 0, "total": 1}
    student, step_end = S2BNN._student, S2BNN.on_train_step_end

    def small_student(self: Any, x: Any) -> Any:
        if self.training and where["step"] < until * where["total"]:
            x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True)
        return student(self, x)

    def count(self: Any, step: int, total: int) -> None:
        where.update(step=step + 1, total=total)
        step_end(self, step, total)

    S2BNN._student, S2BNN.on_train_step_end = small_student, count  # type: ignore[method-assign]
    try:
        yield
    finally:
        S2BNN._student, S2BNN.on_train_step_end = student, step_end  # type: ignore[method-assign]


@contextlib.contextmanager
def cold_compile() -> Iterator[None]:
    """torch.compile's caches in a new empty directory, as on a machine that never compiled."""
    saved = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = tmp
        try:
            yield
        finally:
            if saved is None:
                os.environ.pop("TORCHINDUCTOR_CACHE_DIR", None)
            else:
                os.environ["TORCHINDUCTOR_CACHE_DIR"] = saved


PATCHES = {"teacher_tau": teacher_tau, "low_res": low_res, "cold_compile": cold_compile}

# Written by hand after a run (the tables come from the JSON).
NOTES: list[str] = [
    "- **What the paper's target holds.** The teacher's 128-d head output, the student's target, "
    "probes 81.5-81.6 linear, 1.6-2.1 below the teacher's own backbone (83.2-83.6), though its "
    "kNN is higher (78.7-80.6 against 74.7-76.5). The demo's students (80.9 and 82.1) are at "
    "that target's level, not the backbone's. That the target is not what holds them there "
    "follows from the rows below (steps2x, t_proj256).",
    "- **The backbone features are not a better target** (t_feat: the soft cross-entropy over "
    "the teacher's L2-normalised pooled features, `method.teacher.head=none`): 80.3 against "
    "81.4. After ReLU and pooling those features are all positive and their softmax is nearly "
    "flat at tau 0.2.",
    "- **The student is short of steps.** Twice the steps (3,200, about 100 epochs) lifted it "
    "from 81.4 to 83.0 (steps2x), to within 0.2 of its teacher's backbone. On the 2,000-image "
    "folder the demo's student trains 130-150 epochs and catches up with its teacher; here it "
    "gets 50-65.",
    "- **Batch and schedule are not it.** At equal images, batch 64 (twice the steps) scored "
    "82.1 and batch 256 (half) 82.0, against 81.4 at 128; lr 6e-3 81.9, temperature 0.5 81.8 "
    "(79.8 against 80.2 on seed 1). Every change on seed 0 but t_feat scored 0.4-0.9 above its "
    "base, so that base is likely half a point low: single rows under a point are noise here.",
    "- **Tried, not kept: the teacher's crops for the student** (crop06: random crops of 0.6-1 "
    "of the image, the teacher's, instead of the preset's 0.35-1): +0.8 and +0.9 on the two "
    "seeds, the one change above its base on both; wider crops (0.2-1) scored 81.8. In the "
    "demo (docs/DEMO_BUDGET.md, rows `-r10`) it scored -0.8 and +1.3 on the two seeds of this "
    "folder and -0.2 on Fashion-MNIST: within a run's spread, so `S2BNN_RECIPE` keeps the "
    "preset's crops.",
    "- **A richer target does not help either.** A teacher whose head outputs 256-d instead of "
    "128 (t_proj256, the student's head following) probed 84.2 against 83.2 for the same "
    "teacher retrained with 128 (t_retrain, which repeats the demo's teacher exactly), but its "
    "student scored 82.3 against 82.2. A wider student head (head1024, hidden layer 1,024) "
    "scored 82.5 against 82.2. At these steps the student is limited by its training, not by "
    "what its target carries.",
    "- Determinism: t_retrain's student is the crop06 run again (same teacher, same config) and "
    "scored the same 82.2, so a row's difference from its base is the change plus the "
    "different random stream it causes, not run-to-run jitter of one config.",
    "- **Round 11, a linear student head** (head_linear, `method.proj_hidden_dim=0`, instead of "
    "the paper's MLP, 384-384-128): 82.1 and 81.5 against 81.4 and 80.2 (+0.7, +1.3), kNN +1.0 "
    "and +1.2, the only change here above its base on both seeds in both probes. In the demo "
    "(docs/DEMO_BUDGET.md, rows `-r11`, commit 1a27a3e) it scored 80.0 and 80.0 against 82.0 "
    "and 80.9 (-2.0, -0.9), so `S2BNN_RECIPE` keeps the MLP and `proj_hidden_dim=0` stays an "
    "option. After the teacher's crops in round 10, it is the second change that won at fixed "
    "steps on both seeds and lost in the demo: on this folder these rows have not predicted "
    "the demo.",
    "- **Round 11, not kept.** Sharper targets (t_temp01: the teacher's softmax at 0.1, the "
    "student's at 0.2): +0.5 on both seeds, kNN 0.0 and +0.2, within a row's noise. Progressive "
    "resizing (lowres16, lowres22: the student sees its views at 16 px for the first half of "
    "its steps, or at 22 px for the first 70 %, then at 28; the teacher always at 28): the "
    "cheaper steps bought 1.34x and 1.19x the steps in 198 and 190 s (base 186 s), for 80.3 and "
    "81.7 against 81.4. torch.compile from an empty compile cache, as the demo would meet it on "
    "a fresh machine (compile): the same 1,600 steps took 211.5 s against 186.1 s eager, so over "
    "a stage of a few minutes the first compile costs more than the faster steps return; the "
    "demo does not compile (`compile=true` remains for long runs).",
    "- **Round 14, the backbone features centred.** t_feat lost because the pooled features, "
    "all positive after ReLU, give a nearly flat softmax at tau 0.2. Centred on each batch "
    "(`method.teacher.center=true`, `s2bnn.teachers.center_batch`) they are a sharp target: "
    "retrained for the demo's own steps from the teachers of three round-14 demos, the "
    "students scored +1.8, +2.5 and +0.8 over the head output's (docs/CENTRED_TARGET.md, "
    "benchmarks/centred_target.py). The demo distils them since round 14.",
    "- **Round 15, with the centred target the student is still short of steps.** Twice the "
    "steps its demo gave it lifted it +2.0 and +1.0 on two seeds (margins 15.9 and 15.4); "
    "teachers trained longer or with a 256-d head did not help it on average "
    "(docs/STUDENT_LEVERS.md, benchmarks/student_levers.py). Twice the learning rate (6e-3) "
    "at the demo's steps: +1.0, +0.4, +0.6 on three seeds, which the demo itself did not "
    "confirm (rows `-r16` of docs/DEMO_BUDGET.md: mean margin 14.2 against 14.4 at 3e-3).",
]


def teacher_dir(seed: int) -> Path:
    return DEMOS / TEACHERS[seed] / "runs" / "teacher"


def probe_targets(ds: dict[str, Any], seed: int) -> dict[str, dict[str, float]]:
    """Linear and kNN top-1 of the teacher's target, its backbone, and the demo's student."""
    import torch

    from s2bnn.eval import load_backbone
    from s2bnn.eval.baselines import extract_features, make_loader
    from s2bnn.teachers import load_teacher

    cpu = torch.device("cpu")
    run = DEMOS / TEACHERS[seed] / "runs"
    nets = {"teacher head output (128-d, the paper's target)":
            load_teacher(run / "teacher", "resnet_small", precision="fp32"),
            "teacher backbone": load_backbone(run / "teacher")[0],
            "the demo's S2-BNN student": load_backbone(run / "s2bnn")[0]}
    out = {}
    for name, net in nets.items():
        out[name] = probe_features(*[extract_features(
            net.eval(), make_loader(ds[s], 256, device=cpu), cpu, None) for s in ("train", "test")])
        print(f"seed {seed} {name}: {out[name]}", flush=True)
    return out


def run_student(row: str, seed: int, steps: int, work: Path, data: Path,
                ds: dict[str, Any]) -> dict[str, Any]:
    """Train the demo's S2-BNN stage with ``ROWS[row]`` from teacher ``seed``; probe it."""
    from s2bnn.config import config_from_dict, config_to_dict
    from s2bnn.demo import (
        DemoConfig,
        deep_merge,
        evaluate_run,
        packed_forward_for,
        stage_configs,
        train_stage,
    )

    plan = DemoConfig(data=str(data), s2bnn_steps=steps, progress=False, seed=seed)
    out = work / f"seed{seed}" / row
    cfg = config_to_dict(stage_configs(plan, out, num_train=4000)["s2bnn"])
    cfg["method"]["teacher"]["path"] = str(teacher_dir(seed))
    extra = dict(ROWS[row][2])
    teacher = None
    if "teacher" in extra:
        tplan = DemoConfig(data=str(data), teacher_steps=TEACHER_STEPS, progress=False,
                           seed=seed)
        tcfg = config_to_dict(stage_configs(tplan, out, num_train=4000)["teacher"])
        teacher, _ = train_stage(config_from_dict(deep_merge(tcfg, extra.pop("teacher")),
                                                  f"teacher {row}"))
        cfg["method"]["teacher"]["path"] = str(teacher)
    if isinstance(extra.get("steps"), str):  # "2x": a multiple of --steps
        extra["steps"] = round(steps * float(extra["steps"][:-1]))
    name, *args = extra.pop("patch", ("none",))
    cfg = deep_merge(cfg, extra)
    with PATCHES.get(name, contextlib.nullcontext)(*args):
        run_dir, seconds = train_stage(config_from_dict(cfg, f"student {row}"))
    res, _ = evaluate_run(row, run_dir, ds, image_size=28, in_chans=1, knn_k=200, device="auto",
                          fast_forward=packed_forward_for(ds["test"]))
    out_row = {"seed": seed, "steps": cfg["steps"], "train_seconds": round(seconds, 1) or None,
               "linear_top1": round(float(res["linear_top1"]), 2),
               "knn_top1": round(float(res["knn_top1"]), 2)}
    if teacher is not None:  # the retrained teacher's backbone, as the demo probes it
        tres, _ = evaluate_run("teacher", teacher, ds, image_size=28, in_chans=1, knn_k=200,
                               device="auto")
        out_row["teacher_linear_top1"] = round(float(tres["linear_top1"]), 2)
    return out_row


def write_doc(data: dict[str, Any]) -> None:
    lines = ["# The student's gap to its teacher on the 4,000-image folder", "",
             "Made by `python benchmarks/student_gap.py` (its docstring says how). "
             f"Machine: {data['machine']}.", "",
             "Teachers: " + ", ".join(f"seed {k} = the teacher of demo_budget row `{v}`"
                                      for k, v in TEACHERS.items()) + ". Linear top-1 is the "
             "demo's probe, on the folder's 1,000 validation images.", "",
             "## What the student is taught (linear / kNN top-1 %)", "",
             "| seed | features | dims | linear | kNN |", "|---|---|---|---|---|"]
    for seed, probes in sorted(data.get("probes", {}).items()):
        for name, r in probes.items():
            lines.append(f"| {seed} | {name} | {r['dims']} | {r['linear_top1']:.1f} | "
                         f"{r['knn_top1']:.1f} |")
    lines += ["", "## The S2-BNN student, one change per row (fixed steps)", "",
              "| row | changes | to | seed | steps | train s | teacher | linear | kNN | Δ linear |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    students = data.get("students", {})
    for key, r in sorted(students.items(), key=lambda kv: (kv[1]["seed"],
                                                           list(ROWS).index(kv[0].split("@")[0]))):
        row = key.split("@")[0]
        what, to, _, *vs = ROWS[row]
        vs = vs[0] if vs else "base"
        base = students.get(f"{vs}@{r['seed']}")
        delta = "—" if row == "base" or base is None else \
            f"{r['linear_top1'] - base['linear_top1']:+.1f} ({vs})"
        probe = data.get("probes", {}).get(str(r["seed"]), {}).get("teacher backbone", {})
        teacher = r.get("teacher_linear_top1", probe.get("linear_top1"))
        lines.append(f"| {row} | {what} | {to} | {r['seed']} | {r['steps']} | "
                     f"{r['train_seconds'] or '—'} | "
                     f"{'—' if teacher is None else f'{teacher:.1f}'} | {r['linear_top1']:.1f} | "
                     f"{r['knn_top1']:.1f} | {delta} |")
    lines += ["", "`teacher`: the linear top-1 of the teacher's backbone the row distilled from "
              "(the demo's teacher, or the one the row retrained). `train s` is empty where a "
              "finished run was reused.", ""]
    write_markdown(DOC, lines, NOTES)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", nargs="*", type=int, default=[0], choices=list(TEACHERS))
    parser.add_argument("--steps", type=int, default=1600,
                        help="student steps (about what the demo's student trains on this folder "
                             "on the AVX-512 machine: docs/DEMO_BUDGET.md)")
    parser.add_argument("--rows", nargs="*", choices=list(ROWS), default=list(ROWS))
    parser.add_argument("--work", default=str(ROOT / "runs" / "student_gap"))
    parser.add_argument("--no-probes", action="store_true")
    parser.add_argument("--report", action="store_true")
    args = parser.parse_args()
    if args.report:
        write_doc(json.loads(JSON.read_text()))
        return 0
    missing = [TEACHERS[s] for s in args.seeds if not (teacher_dir(s) / "checkpoints").is_dir()]
    if missing:
        raise SystemExit("teachers missing: run benchmarks/demo_budget.py --only "
                         + " ".join(missing))
    from s2bnn.demo import eval_datasets

    data = json.loads(JSON.read_text()) if JSON.is_file() else {"students": {}, "probes": {}}
    data["machine"] = machine()
    t0 = time.perf_counter()
    for seed in args.seeds:
        data_dir = DEMOS / f"{TEACHERS[seed]}-data"
        ds = eval_datasets(str(data_dir), None, 10000, None, 1, 28)
        if not args.no_probes:
            data["probes"][str(seed)] = probe_targets(ds, seed)
            JSON.write_text(json.dumps(data, indent=2) + "\n")
        for row in args.rows:
            data["students"][f"{row}@{seed}"] = r = run_student(
                row, seed, args.steps, Path(args.work), data_dir, ds)
            print(f"student {row} seed {seed}: {r}", flush=True)
            JSON.write_text(json.dumps(data, indent=2) + "\n")
    print(f"{time.perf_counter() - t0:.0f} s")
    write_doc(data)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
