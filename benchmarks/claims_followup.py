"""Experiments behind the paper's claims that fail in docs/RESULTS.md, on Fashion-MNIST.

1. **Schedule length.** Each strategy in ``--strategies`` trained for k times its recipe's
   epochs, k in ``--factors`` (one seed): does the ranking change when the runs are longer, and
   do the contrastive binary runs overtake the untrained network?
2. **S2-BNN's temperature.** Strategy 3 with tau in ``--taus`` (the paper uses 0.2; SEED's
   sharper 0.07 teacher temperature is the suspect for SEED's lead).
3. **Probe learning rate.** For an SGD-pre-trained student (strategy 1) and Adam-pre-trained ones
   (enhanced 1, 3), the SGD- and Adam-probe test top-1 against the probe LR, on standardised
   features (this project's probe) and on raw features (the paper's protocol).
4. **The untrained baseline.** The same untrained student with binary weights and activations,
   binary activations only, and real values: how much of a random network's features survive
   binarization (the bar every method has to clear).

Writes ``docs/CLAIMS_FOLLOWUP.md`` and ``docs/results/followup_*.png``; every number in it comes
from this run. Finished runs in ``--out`` are reused (same config), so an interrupted run resumes.

    python benchmarks/claims_followup.py [--teacher RUN_DIR] [--factors 1 3 9] [--quick]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from paper_claims import (
    CONFIGS,
    OFFLINE_TEACHER,
    STRATEGIES,
    pretrain_optimizer,
    train_recipe,
    train_teacher,
)
from run_all import machine

ROOT = Path(__file__).resolve().parents[1]
SGD_LRS = [1e-3, 1e-2, 1e-1, 1.0, 10.0, 30.0]
ADAM_LRS = [1e-4, 1e-3, 1e-2, 1e-1]
# The probe these tables were measured with: 10 epochs, the library's default until the probe
# was found short of converged (docs/PROBE_EPOCHS.md); pinned so the rows stay re-runnable.
PROBE = {"epochs": 10}


def _recipe_epochs(name: str) -> int:
    from s2bnn.config import load_config

    recipe, extra, _ = STRATEGIES[name]
    return int(load_config(CONFIGS / recipe, extra).epochs)


def _run(name: str, out: Path, teacher: Path, common: list[str], extra: list[str]) -> Path:
    recipe, base, _ = STRATEGIES[name]
    overrides = [*common, f"output_dir={out}", *base, *extra]
    if name in OFFLINE_TEACHER:
        overrides.append(f"method.teacher.path={teacher}")
    run_dir, _ = train_recipe(recipe, overrides)
    return run_dir


def _probe_curves(run_dir: Path, ds: dict[str, Any]) -> dict[str, Any]:
    """SGD/Adam probe sweeps of one run's features, standardised and raw."""
    from torch.utils.data import DataLoader

    from s2bnn.eval import extract_features, fast_linear_sweep, load_backbone

    backbone, _ = load_backbone(run_dir)
    feats = {split: extract_features(backbone, DataLoader(ds[split], batch_size=512))
             for split in ("train", "test")}
    out = {}
    for std in (True, False):
        res = fast_linear_sweep(*feats["train"], *feats["test"], sgd_lrs=SGD_LRS,
                                adam_lrs=ADAM_LRS, standardize_features=std, **PROBE)
        out["standardised" if std else "raw"] = {
            opt: {"lrs": res[opt]["lrs"], "test_top1": res[opt]["test_top1"],
                  "best_lr": res[opt]["best_lr"], "top1": res[opt]["top1"]}
            for opt in ("sgd", "adam")}
    return out


def _plot(path: Path, series: dict[str, tuple[list[float], list[float]]], xlabel: str,
          title: str, hline: tuple[float, str] | None = None, logx: bool = False) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8.4, 4.2))
    for label, (xs, ys) in series.items():
        ax.plot(xs, ys, marker="o", label=label)
    if hline is not None:
        ax.axhline(hline[0], color="grey", linestyle="--", label=hline[1])
    if logx:
        ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("linear top-1 (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # beside, not over
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="runs/claims_followup")
    ap.add_argument("--doc", default=str(ROOT / "docs" / "CLAIMS_FOLLOWUP.md"))
    ap.add_argument("--teacher", default=None,
                    help="teacher run dir to reuse (default: train one into --out)")
    ap.add_argument("--teacher-epochs", type=int, default=4)
    ap.add_argument("--limit", type=int, default=10000, help="training images per run")
    ap.add_argument("--eval-train", type=int, default=10000, help="labelled probe images")
    ap.add_argument("--factors", type=int, nargs="+", default=[1, 3, 9])
    ap.add_argument("--strategies", nargs="+", choices=list(STRATEGIES),
                    default=["mocov2_bnn_plus", "s2bnn_contrastive", "s2bnn", "mocov2_real",
                             "dino"])
    ap.add_argument("--taus", type=float, nargs="+", default=[0.05, 0.1, 0.2, 0.5])
    ap.add_argument("--random-seeds", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="tiny sizes: checks the script runs")
    args = ap.parse_args()
    if args.quick:
        args.limit, args.eval_train, args.teacher_epochs = 512, 1000, 1
        args.factors, args.taus, args.random_seeds = [1, 2], [0.1, 0.2], 1
        args.strategies = ["mocov2_bnn_plus", "s2bnn"]

    from s2bnn.demo import eval_datasets, evaluate_run
    from s2bnn.eval import evaluate_untrained, load_backbone
    from s2bnn.runtime import tune_malloc

    tune_malloc()
    t0 = time.perf_counter()
    out = Path(args.out)
    common = [f"data.limit={args.limit}", "progress=false", "knn_every=0", "resume=auto",
              "seed=0"]
    teacher = train_teacher(out, args.teacher, args.limit, args.teacher_epochs, common)
    ds = eval_datasets("fashion-mnist", None, args.eval_train, None, 1, 28)

    def top1(run_dir: Path, name: str) -> float:
        row, _ = evaluate_run(name, run_dir, ds, image_size=28, in_chans=1, sweep_kwargs=PROBE)
        return float(row["linear_top1"])

    schedule: dict[str, list[tuple[int, float]]] = {}
    for name in args.strategies:
        base_epochs = _recipe_epochs(name)
        for k in args.factors:
            epochs = base_epochs * k
            print(f"== schedule: {name}, {epochs} epochs ({k}x)", flush=True)
            run = _run(name, out / f"{name}_x{k}", teacher, common, [f"epochs={epochs}"])
            schedule.setdefault(name, []).append((k, top1(run, name)))

    taus: list[tuple[float, float]] = []
    for tau in args.taus:
        print(f"== temperature: s2bnn, tau {tau}", flush=True)
        run = _run("s2bnn", out / f"s2bnn_tau{tau:g}", teacher, common,
                   [f"method.temperature={tau}"])
        taus.append((tau, top1(run, "s2bnn")))

    probes: dict[str, Any] = {}
    for name in ("mocov2_bnn", "mocov2_bnn_plus", "s2bnn"):
        print(f"== probe LR: {name}", flush=True)
        probes[name] = _probe_curves(_run(name, out / f"{name}_x1", teacher, common, []), ds)

    _, binfo = load_backbone(out / "s2bnn_x1")
    student_kw = {**(binfo.get("kwargs") or {}), "num_classes": 0}
    untrained: dict[str, tuple[float, float]] = {}
    for label, over in (("binary weights and activations", {}),
                        ("binary activations, real weights", {"binary_weight": False}),
                        ("real-valued", {"binary_weight": False, "binary_act": False})):
        print(f"== untrained student: {label}", flush=True)
        res = evaluate_untrained("reactnet_small", {**student_kw, **over}, ds["train"],
                                 ds["test"], seeds=range(args.random_seeds), sweep_kwargs=PROBE)
        untrained[label] = (float(res["linear_top1"]), float(res["linear_top1_std"]))
    random_top1 = untrained["binary weights and activations"][0]
    wall = time.perf_counter() - t0

    figs = Path(args.doc).parent / "results"
    figs.mkdir(parents=True, exist_ok=True)
    labels = {k: v[2] for k, v in STRATEGIES.items()}
    _plot(figs / "followup_schedule.png",
          {labels[n]: ([k for k, _ in pts], [a for _, a in pts]) for n, pts in schedule.items()},
          "epochs, as a multiple of the recipe's", "Linear top-1 against schedule length",
          hline=(random_top1, "untrained binary student"))
    _plot(figs / "followup_tau.png", {"③ S2-BNN": ([t for t, _ in taus], [a for _, a in taus])},
          "temperature τ", "S2-BNN: linear top-1 against τ", logx=True)
    _plot(figs / "followup_probe_lr.png",
          {f"{labels[n]}, SGD probe, {kind}": (c["sgd"]["lrs"], c["sgd"]["test_top1"])
           for n, per in probes.items() for kind, c in per.items()},
          "SGD probe learning rate", "Probe test top-1 against probe LR", logx=True)

    lines = [
        "# Follow-up: the claims that fail, tested", "",
        f"Produced by `python benchmarks/{Path(__file__).name}"
        + (" --quick" if args.quick else "") + f"` on {machine()}; wall time {wall / 60:.1f} min."
        f" {args.limit} training images per run, seed 0, teacher {teacher}; probes trained on "
        f"{args.eval_train} labelled images and tested on the 10,000 test images. "
        f"Untrained binary student: {random_top1:.1f} (mean of {args.random_seeds} seeds).", "",
        "## 1. Schedule length", "",
        "| run | " + " | ".join(f"{k}x epochs" for k in args.factors) + " |",
        "|---|" + "---|" * len(args.factors),
    ]
    for name, pts in schedule.items():
        lines.append(f"| {labels[name]} ({_recipe_epochs(name)} epochs at 1x) | "
                     + " | ".join(f"{a:.1f}" for _, a in pts) + " |")
    lines += ["", "![schedule](results/followup_schedule.png)", "",
              "## 2. S2-BNN's temperature", "",
              "| τ | " + " | ".join(f"{t:g}" for t, _ in taus) + " |",
              "|---|" + "---|" * len(taus),
              "| linear top-1 | " + " | ".join(f"{a:.1f}" for _, a in taus) + " |", "",
              "![tau](results/followup_tau.png)", "",
              "## 3. Probe learning rate: SGD- vs Adam-pre-trained students", "",
              "Best probe LR (chosen on held-out training features) and its test top-1:", "",
              "| run | pre-training optimiser | features | SGD probe: best LR, top-1 | "
              "Adam probe: best LR, top-1 |", "|---|---|---|---|---|"]
    for name, per in probes.items():
        opt = pretrain_optimizer(name)
        for kind, c in per.items():
            lines.append(f"| {labels[name]} | {opt} | {kind} | {c['sgd']['best_lr']:g}, "
                         f"{c['sgd']['top1']:.1f} | {c['adam']['best_lr']:g}, "
                         f"{c['adam']['top1']:.1f} |")
    lines += ["", "SGD-probe test top-1 at each LR (" + ", ".join(f"{lr:g}" for lr in SGD_LRS)
              + "):", ""]
    for name, per in probes.items():
        for kind, c in per.items():
            lines.append(f"- {labels[name]}, {kind}: "
                         + ", ".join(f"{a:.1f}" for a in c["sgd"]["test_top1"]))
    lines += ["", "![probe LR](results/followup_probe_lr.png)", "",
              "## 4. The untrained baseline", "",
              f"Untrained `reactnet_small`, linear top-1, mean ± std over {args.random_seeds} "
              "seeds:", "", "| untrained student | linear top-1 |", "|---|---|"]
    lines += [f"| {label} | {m:.1f} ± {sd:.1f} |" for label, (m, sd) in untrained.items()]
    lines.append("")
    Path(args.doc).write_text("\n".join(lines))
    (figs / "claims_followup.json").write_text(json.dumps(
        {"args": vars(args), "machine": machine(), "wall_seconds": wall, "schedule": schedule,
         "taus": taus, "probes": probes, "untrained": untrained}, indent=2, default=str))
    print("\n".join(lines))
    print(f"\nwrote {args.doc}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
