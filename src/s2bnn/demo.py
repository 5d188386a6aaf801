"""The main job: the S2-BNN pipeline end to end on one dataset.

1. pretrain a real-valued teacher with MoCo v2;
2. distil a binary ReActNet-style student from it with S2-BNN (strategy 3, distillation only);
3. train the same binary student with MoCo v2 (strategy 1, the paper's enhanced recipe: Adam,
   "lite" augmentation), so the two students differ only in what they learn from;
4. evaluate the teacher, both students, the untrained student (several seeds) and raw pixels with
   weighted kNN and the linear probe (SGD and Adam learning-rate sweeps);
5. write ``report.md``, PNG plots and ``results.json`` and print the summary.

The stages' training configs mirror ``configs/fashion_mnist/{teacher_mocov2,s2bnn,
mocov2_bnn_plus}.yaml`` (a test keeps them in step); :class:`DemoConfig` only sets sizes. A
stage whose run dir already holds a finished run with the same config is reused, and an
interrupted one resumes, so running the same command again after a crash finishes the job
instead of starting over.
"""

from __future__ import annotations

import copy
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional

from s2bnn.checkpoint import atomic_write_bytes
from s2bnn.config import Config, config_from_dict, config_to_dict, load_config
from s2bnn.errors import DataError, RunDirError

__all__ = [
    "DemoConfig", "stage_configs", "run_demo", "RESULT_NAMES", "eval_datasets", "evaluate_run",
    "result_row", "train_stage", "finished_with_same_config",
]

RESULT_NAMES = ("pixels", "teacher", "random_init", "mocov2", "s2bnn")


@dataclass
class DemoConfig:
    """Sizes of the demo; every field can be overridden as ``key=value`` on the command line."""

    data: str = "fashion-mnist"  # fashion-mnist, synthetic[:C:H:N:K] or an ImageFolder path
    root: Optional[str] = None  # directory holding the Fashion-MNIST idx files
    limit: Optional[int] = None  # training images used by every stage (None: all)
    image_size: Optional[int] = None  # None: the dataset's own (28 for Fashion-MNIST)
    batch_size: int = 256
    seed: int = 0
    device: str = "auto"
    num_workers: int = 0
    teacher_model: str = "resnet_small"
    teacher_epochs: int = 3
    student_model: str = "reactnet_small"
    # Equal wall time for the two students: S2-BNN distils one view per image, MoCo v2 needs two.
    s2bnn_epochs: int = 3
    mocov2_epochs: int = 2
    # Labelled images the probes train on (None: all). 10,000 keeps the whole demo inside 10 min
    # on 2 cores with a margin (20,000 took 104 s of a 605 s demo on a slow day).
    eval_train_limit: Optional[int] = 10000
    eval_test_limit: Optional[int] = None  # test images (None: all)
    random_seeds: int = 3  # untrained-student baseline: one evaluation per seed
    knn_k: int = 200
    progress: bool = True


# The three recipes the demo runs, as data. They match configs/fashion_mnist/*.yaml except for
# the keys the demo sets from DemoConfig (data, sizes, output dirs).
TEACHER_RECIPE: dict[str, Any] = {
    "data": {"augment": {"preset": "mocov2"}},
    "model": {"name": "resnet_small"},
    "method": {"name": "mocov2", "proj_dim": 128, "temperature": 0.2, "queue_size": 4096,
               "momentum": 0.99},
    "optim": {"name": "adam", "lr": 1.0e-3, "weight_decay": 0.0, "schedule": "cosine",
              "warmup_epochs": 0.1},
}
S2BNN_RECIPE: dict[str, Any] = {
    "data": {"augment": {"preset": "s2bnn_lite", "num_views": 1}},
    "model": {"name": "reactnet_small", "binary_act": True, "binary_weight": True},
    "method": {"name": "s2bnn", "temperature": 0.2, "distill_weight": 1.0,
               "contrastive_weight": 0.0,
               "teacher": {"kind": "offline", "arch": "resnet_small"}},
    "optim": {"name": "adam", "lr": 3.0e-3, "weight_decay": 0.0, "schedule": "linear"},
}
MOCOV2_RECIPE: dict[str, Any] = {  # the enhanced baseline: S2-BNN's optimiser and augmentation
    "data": {"augment": {"preset": "s2bnn_lite"}},
    "model": {"name": "reactnet_small", "binary_act": True, "binary_weight": True},
    "method": {"name": "mocov2", "proj_dim": 128, "temperature": 0.2, "queue_size": 4096,
               "momentum": 0.99},
    "optim": {"name": "adam", "lr": 3.0e-3, "weight_decay": 0.0, "schedule": "linear"},
}


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def stage_configs(plan: DemoConfig, out: Path, force: bool = False) -> dict[str, Config]:
    """The validated training configs of the three stages, keyed by result name."""
    common = {
        "seed": plan.seed,
        "batch_size": plan.batch_size,
        "device": plan.device,
        "resume": "auto",
        "force": force,
        "progress": plan.progress,
        "log_every": 10,
        "data": {"name": plan.data, "root": plan.root, "limit": plan.limit,
                 "image_size": plan.image_size, "num_workers": plan.num_workers},
    }
    teacher_dir = out / "runs" / "teacher"
    stages = {
        "teacher": _merge(TEACHER_RECIPE, {
            **common, "output_dir": str(teacher_dir), "epochs": plan.teacher_epochs,
            "model": {"name": plan.teacher_model}}),
        "s2bnn": _merge(S2BNN_RECIPE, {
            **common, "output_dir": str(out / "runs" / "s2bnn"), "epochs": plan.s2bnn_epochs,
            "model": {"name": plan.student_model},
            "method": {"teacher": {"path": str(teacher_dir), "arch": plan.teacher_model}}}),
        "mocov2": _merge(MOCOV2_RECIPE, {
            **common, "output_dir": str(out / "runs" / "mocov2"), "epochs": plan.mocov2_epochs,
            "model": {"name": plan.student_model}}),
    }
    return {name: config_from_dict(cfg, f"demo stage '{name}'") for name, cfg in stages.items()}


def _header(step: int, total: int, text: str) -> None:
    print(f"\n== [{step}/{total}] {text}", flush=True)


def finished_with_same_config(cfg: Config) -> bool:
    """True when the stage's run dir holds a finished run of exactly this config."""
    from s2bnn.checkpoint import load_checkpoint

    last = Path(cfg.output_dir) / "checkpoints" / "last.pt"
    if not last.is_file():
        return False
    ckpt = load_checkpoint(last)
    ignore = {"force", "resume", "progress"}
    old = {k: v for k, v in (ckpt.get("config") or {}).items() if k not in ignore}
    new = {k: v for k, v in config_to_dict(cfg).items() if k not in ignore}
    return bool(ckpt.get("finished")) and old == new


def train_stage(cfg: Config) -> tuple[Path, float]:
    from s2bnn.engine import train

    if finished_with_same_config(cfg):
        print(f"reusing the finished run in {cfg.output_dir}", flush=True)
        return Path(cfg.output_dir), 0.0
    start = time.perf_counter()
    run_dir = train(cfg)
    return Path(run_dir), time.perf_counter() - start


def eval_datasets(data: str, root: str | None, train_limit: int | None,
                  test_limit: int | None, in_chans: int, image_size: int) -> dict[str, Any]:
    """Labelled splits for the probes (eval transform) and for the raw-pixel baseline."""
    from s2bnn.data import build_dataset, build_eval_transform, dataset_stats

    mean, std = dataset_stats(data)
    tf = build_eval_transform(image_size, in_chans, mean=mean, std=std)
    out = {
        "train": build_dataset(data, "train", transform=tf, root=root, limit=train_limit),
        "test": build_dataset(data, "test", transform=tf, root=root, limit=test_limit),
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
    row = result_row(name, method, binfo.get("name"), binary, res, **prof)
    report_row = {**row, "sweep": res.get("linear"),
                  "embedding_sample": res.get("embedding_sample"),
                  "metrics": read_metrics(Path(run_dir) / "metrics.csv")}
    return row, report_row


def _check_claims(rows: dict[str, dict[str, Any]]) -> list[str]:
    """The paper's claims that this run can test, each stated with its numbers."""
    def top1(name: str) -> float | None:
        return rows.get(name, {}).get("linear_top1")

    lines = []
    s2, moco, rand, pix, teacher = (top1(n) for n in
                                    ("s2bnn", "mocov2", "random_init", "pixels", "teacher"))
    if s2 is not None and moco is not None:
        verdict = "holds" if s2 > moco else "does NOT hold"
        lines.append(f"S2-BNN student > MoCo v2 student (linear top-1 {s2:.1f} vs {moco:.1f}): "
                     f"{verdict}")
    if s2 is not None and rand is not None:
        verdict = "holds" if s2 > rand else "does NOT hold"
        lines.append(f"S2-BNN student > untrained student ({s2:.1f} vs {rand:.1f} mean over "
                     f"seeds): {verdict}")
    if teacher is not None and pix is not None:
        verdict = "above" if teacher > pix else "NOT above"
        lines.append(f"teacher {teacher:.1f} is {verdict} raw pixels {pix:.1f} (a teacher below "
                     "pixels is too weak to teach much)")
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


def run_demo(plan: DemoConfig, out: str | Path, force: bool = False) -> dict[str, Any]:
    """Run the whole pipeline into ``out``; returns the ``results.json`` content."""
    from s2bnn.data import dataset_info, default_image_size
    from s2bnn.eval import evaluate_pixels, evaluate_untrained, load_backbone
    from s2bnn.report import write_report

    out = Path(out)
    if (out / "results.json").is_file() and not force:
        raise RunDirError(f"{out} holds a finished demo (results.json); choose another --out or "
                          "pass --force to run it again")
    info = dataset_info(plan.data, root=plan.root)
    if info["num_classes"] < 2:
        raise DataError(f"{plan.data} has {info['num_classes']} class(es); the demo's probes "
                        "need at least 2 labelled classes")
    in_chans = int(info["image_shape"][0])
    image_size = plan.image_size or default_image_size(plan.data)
    configs = stage_configs(plan, out, force=force)
    out.mkdir(parents=True, exist_ok=True)
    (out / "demo_config.json").write_text(json.dumps(asdict(plan), indent=2))
    total = 5
    print(f"s2bnn demo on {info['name']}: {info['num_train']} train / {info['num_test']} test "
          f"images, {info['num_classes']} classes, {in_chans}x{image_size}x{image_size}; "
          f"output in {out}", flush=True)

    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    _header(1, total, f"teacher: MoCo v2 on real-valued {plan.teacher_model} "
                      f"({plan.teacher_epochs} epochs)")
    teacher_dir, timings["teacher"] = train_stage(configs["teacher"])
    _header(2, total, f"S2-BNN: distil binary {plan.student_model} from the frozen teacher "
                      f"({plan.s2bnn_epochs} epochs, strategy 3)")
    s2bnn_dir, timings["s2bnn"] = train_stage(configs["s2bnn"])
    _header(3, total, f"MoCo v2: the same binary {plan.student_model} without a teacher "
                      f"({plan.mocov2_epochs} epochs, strategy 1)")
    mocov2_dir, timings["mocov2"] = train_stage(configs["mocov2"])

    _header(4, total, "evaluation: weighted kNN and linear probes (SGD and Adam LR sweeps)")
    t_eval = time.perf_counter()
    ds = eval_datasets(plan.data, plan.root, plan.eval_train_limit, plan.eval_test_limit,
                       in_chans, image_size)
    common = {"knn_k": plan.knn_k, "device": plan.device}
    results: dict[str, dict[str, Any]] = {}
    report_runs: dict[str, dict[str, Any]] = {}

    print("raw pixels ...", flush=True)
    res = evaluate_pixels(ds["pixels_train"], ds["pixels_test"], **common)
    results["pixels"] = result_row("pixels", None, "flattened image", False, res,
                                   params=0, ops=0)
    report_runs["pixels"] = {**results["pixels"], "sweep": res.get("linear")}

    for name, run_dir in (("teacher", teacher_dir), ("mocov2", mocov2_dir),
                          ("s2bnn", s2bnn_dir)):
        print(f"{name} ...", flush=True)
        row, report_row = evaluate_run(name, run_dir, ds, image_size=image_size,
                                       in_chans=in_chans, **common)
        row["train_seconds"] = report_row["train_seconds"] = round(timings[name], 1)
        results[name], report_runs[name] = row, report_row

    print(f"untrained {plan.student_model} ({plan.random_seeds} seeds) ...", flush=True)
    _, binfo = load_backbone(s2bnn_dir)
    res = evaluate_untrained(plan.student_model, {**(binfo.get("kwargs") or {}),
                                                  "num_classes": 0},
                             ds["train"], ds["test"], seeds=range(plan.random_seeds),
                             sample_size=2000, **common)
    results["random_init"] = result_row("random_init", None, plan.student_model, True, res,
                                        seeds=plan.random_seeds)
    report_runs["random_init"] = {**results["random_init"], "sweep": res.get("linear"),
                                  "embedding_sample": res.get("embedding_sample")}
    timings["evaluation"] = time.perf_counter() - t_eval

    _header(5, total, "report")
    order = ["pixels", "teacher", "random_init", "mocov2", "s2bnn"]
    claims = _check_claims(results)
    wall = time.perf_counter() - t0
    notes = [*claims, f"wall time {wall:.0f} s (" + ", ".join(
        f"{k} {v:.0f} s" for k, v in timings.items()) + ")"]
    report = write_report([report_runs[n] for n in order], out, title="s2bnn demo",
                          dataset=info["name"], notes=notes,
                          class_names=getattr(ds["test"], "classes", None))
    payload = {
        "dataset": info["name"],
        "runs": [results[n] for n in order],
        "claims": claims,
        "seconds": {k: round(v, 1) for k, v in timings.items()},
        "wall_seconds": round(wall, 1),
        "config": asdict(plan),
    }
    atomic_write_bytes(out / "results.json", (json.dumps(payload, indent=2) + "\n").encode())
    print()
    print(_format_summary(payload["runs"]))
    for line in claims:
        print(f"- {line}")
    print(f"\nreport: {report}\nresults: {out / 'results.json'}  ({wall:.0f} s)")
    return payload


def load_demo_config(path: str | None, overrides: list[str]) -> DemoConfig:
    """A :class:`DemoConfig` from an optional YAML file and ``key=value`` overrides."""
    return load_config(path, overrides, schema=DemoConfig)
