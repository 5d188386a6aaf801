"""`s2bnn eval linear | knn | finetune` (parsing only).

The work lives in :mod:`s2bnn.eval.runs`, imported inside the handlers so ``s2bnn --help`` stays
fast.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from s2bnn.cli.args import positive_float, positive_int
from s2bnn.errors import UserError


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _common(args: argparse.Namespace) -> dict[str, Any]:
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    return {
        "data": args.data, "root": args.root, "image_size": args.image_size,
        "device": args.device, "limit": args.limit, "test_limit": args.test_limit,
        "batch_size": args.batch_size, "num_workers": args.workers, "out": args.out,
    }


def _show(result: dict[str, Any], args: argparse.Namespace, rows: list[tuple[str, Any]]) -> None:
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(f"{result['backbone']} from {result['source']} on {result['data']} "
          f"({result['image_size']} px)")
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        text = f"{value:.2f}" if isinstance(value, float) else ("—" if value is None else value)
        print(f"  {name:<{width}}  {text}")
    print(f"written: {result['output']}")


# --------------------------------------------------------------------------- handlers
def _cmd_linear(args: argparse.Namespace) -> int:
    from s2bnn.eval.runs import run_linear

    if args.mode == "fast":
        from s2bnn.eval.linear_sweep import DEFAULT_EPOCHS

        if args.sgd_lrs == [] and args.adam_lrs == []:
            raise UserError("--sgd-lrs and --adam-lrs are both empty; give at least one LR")
        if not 0.0 < args.val_fraction < 1.0:
            raise UserError(f"--val-fraction must be in (0, 1), got {args.val_fraction}")
        sweep: dict[str, Any] = {"epochs": args.epochs or DEFAULT_EPOCHS,
                                 "val_fraction": args.val_fraction}
        if args.sweep_batch_size:
            sweep["batch_size"] = args.sweep_batch_size
        sweep["num_threads"] = args.sweep_threads or None
        if args.sgd_lrs is not None:
            sweep["sgd_lrs"] = args.sgd_lrs
        if args.adam_lrs is not None:
            sweep["adam_lrs"] = args.adam_lrs
        res = run_linear(args.checkpoint, mode="fast", sweep_kwargs=sweep,
                         save_head=args.save_head, **_common(args))
        if args.json:
            _show(res, args, [])
            return 0
        lin = res["linear"]
        rows: list[tuple[str, Any]] = [("kNN top-1", res["knn_top1"])]
        for opt in ("sgd", "adam"):
            if opt in lin:
                top5 = lin[opt]["top5"]
                extra = f"top-5 {top5:.2f}, " if top5 is not None else ""
                rows.append((f"linear {opt.upper() if opt == 'sgd' else 'Adam'} top-1",
                             f"{lin[opt]['top1']:.2f}  ({extra}lr {lin[opt]['best_lr']:g})"))
        rows.append(("linear top-1", res["linear_top1"]))
        if res.get("head_file"):
            rows.append(("head saved", res["head_file"]))
        _show(res, args, rows)
        print("  learning-rate sweep (held-out top-1 / test top-1):")
        for opt in ("sgd", "adam"):
            if opt in lin:
                cells = ", ".join(f"{lr:g}: {v:.1f}/{t:.1f}" for lr, v, t in
                                  zip(lin[opt]["lrs"], lin[opt]["val_top1"],
                                      lin[opt]["test_top1"]))
                print(f"    {opt:>4}: {cells}")
        return 0
    # The reference main_lincls.py: a bare fc (no normalisation before it) on 0.08-1 crops.
    protocol: dict[str, Any] = {"epochs": args.epochs or 100, "lr": args.lr,
                                "momentum": args.momentum, "weight_decay": args.weight_decay,
                                "feature_norm": bool(args.feature_norm)}
    if args.save_head:
        raise UserError("--save-head needs the fast linear mode (the default)")
    if args.milestones is not None:
        protocol["milestones"] = args.milestones
    lo, hi = args.crop_scale
    if not 0.0 < lo <= hi <= 1.0:
        raise UserError(f"--crop-scale must be MIN MAX with 0 < MIN <= MAX <= 1, got {lo} {hi}")
    res = run_linear(args.checkpoint, mode="protocol", protocol_kwargs=protocol,
                     crop_scale=(lo, hi), log=None if args.json else _log, **_common(args))
    _show(res, args, [("linear top-1", res["top1"]), ("linear top-5", res["top5"]),
                      ("backbone unchanged", "yes")])
    return 0


def _cmd_knn(args: argparse.Namespace) -> int:
    from s2bnn.eval.runs import run_knn

    res = run_knn(args.checkpoint, k=args.k, temperature=args.temperature, **_common(args))
    _show(res, args, [("kNN top-1", res["knn_top1"]), ("kNN top-5", res["knn_top5"]),
                      ("k / T", f"{res['knn']['k']} / {res['knn']['temperature']:g}")])
    return 0


def _cmd_finetune(args: argparse.Namespace) -> int:
    from s2bnn.eval.finetune import check_label_fraction
    from s2bnn.eval.runs import run_finetune

    fraction = check_label_fraction(args.label_fraction)  # fail before loading anything
    ft = {"epochs": args.epochs or 30, "lr": args.lr, "optimizer": args.optimizer,
          "weight_decay": args.weight_decay, "recalibrate_bn": not args.no_bn_recalibration}
    res = run_finetune(args.checkpoint, label_fraction=fraction, seed=args.seed,
                       finetune_kwargs=ft, log=None if args.json else _log, **_common(args))
    _show(res, args, [("labelled images", str(res["num_labelled"])),
                      ("fine-tune top-1", res["top1"]), ("fine-tune top-5", res["top5"])])
    return 0


def _cmd_eval_missing(args: argparse.Namespace) -> int:
    raise UserError("choose an evaluation: s2bnn eval linear | knn | finetune RUN_DIR")


# --------------------------------------------------------------------------- parsers
def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", metavar="RUN_DIR_OR_CHECKPOINT",
                   help="run dir, checkpoint .pt, or .safetensors from `s2bnn export`")
    p.add_argument("--data", default=None,
                   help="dataset (default: the run's data.name, else fashion-mnist)")
    p.add_argument("--root", default=None, help="directory holding the Fashion-MNIST idx files")
    p.add_argument("--image-size", type=positive_int, default=None,
                   help="evaluation resolution (default: the run's)")
    p.add_argument("--batch-size", type=positive_int, default=256)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--workers", type=int, default=0, help="DataLoader worker processes")
    p.add_argument("--threads", type=positive_int, default=None,
                   help="torch CPU threads (default: torch's choice; 1 is faster on a busy CPU)")
    p.add_argument("--limit", type=positive_int, default=None,
                   help="use only the first N training images")
    p.add_argument("--test-limit", type=positive_int, default=None,
                   help="use only the first N test images")
    p.add_argument("--out", default=None,
                   help="JSON output file (default: eval_<kind>.json in the run dir)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")


def add_eval_parsers(sub: argparse._SubParsersAction) -> None:
    """Register ``eval linear|knn|finetune``."""
    p = sub.add_parser("eval", help="evaluate a trained backbone: linear, knn, finetune")
    p.set_defaults(func=_cmd_eval_missing)
    esub = p.add_subparsers(dest="eval_command", metavar="SUBCOMMAND")

    q = esub.add_parser("linear", help="linear probe: fast LR sweep (default) or the paper's")
    _add_common(q)
    q.add_argument("--mode", choices=("fast", "protocol"), default="fast",
                   help="fast: cached features, SGD+Adam LR sweep; protocol: the reference "
                        "main_lincls.py (bare fc on a frozen eval-mode backbone, random crops "
                        "0.08-1 + flips, SGD lr 0.1, 100 epochs)")
    q.add_argument("--epochs", type=positive_int, default=None,
                   help="epochs (default: 30 fast, 100 protocol)")
    q.add_argument("--lr", type=positive_float, default=0.1, help="protocol learning rate")
    q.add_argument("--momentum", type=float, default=0.9, help="protocol SGD momentum")
    q.add_argument("--weight-decay", type=float, default=0.0, help="protocol weight decay")
    q.add_argument("--milestones", type=positive_int, nargs="+", default=None,
                   help="protocol epochs where lr drops x0.1 (default: 60 %% and 80 %% of epochs)")
    norm = q.add_mutually_exclusive_group()
    norm.add_argument("--feature-norm", action="store_true",
                      help="protocol: a parameter-free BatchNorm before the linear layer "
                           "(default: the bare fc of the reference main_lincls.py)")
    norm.add_argument("--no-feature-norm", action="store_false", dest="feature_norm",
                      help="protocol: the bare linear layer (the default)")
    q.add_argument("--crop-scale", type=positive_float, nargs=2, default=[0.08, 1.0],
                   metavar=("MIN", "MAX"),
                   help="protocol: RandomResizedCrop scale of the training crops (default "
                        "0.08 1, torchvision's, as main_lincls.py; the augmentation presets "
                        "use 0.2 1)")
    q.add_argument("--sgd-lrs", type=positive_float, nargs="*", default=None,
                   help="fast-mode SGD grid (default 0.01 ... 30); empty to skip SGD")
    q.add_argument("--adam-lrs", type=positive_float, nargs="*", default=None,
                   help="fast-mode Adam grid (default 1e-4 ... 0.1); empty to skip Adam")
    q.add_argument("--val-fraction", type=float, default=0.1,
                   help="fast mode: share of training features held out to choose the LR "
                        "(5-fold cross-validation instead where it would hold < 1000)")
    q.add_argument("--sweep-batch-size", type=positive_int, default=None,
                   help="fast mode: minibatch of the heads (default 1024)")
    q.add_argument("--sweep-threads", type=int, default=1,
                   help="fast mode: torch threads for the heads (default 1: robust on a busy "
                        "CPU; 0 keeps torch's setting)")
    q.add_argument("--save-head", action="store_true",
                   help="fast mode: save the chosen head as head.safetensors next to the JSON "
                        "(`s2bnn export` then includes the classifier)")
    q.set_defaults(func=_cmd_linear, feature_norm=False)

    q = esub.add_parser("knn", help="weighted kNN on L2-normalised features")
    _add_common(q)
    q.add_argument("--k", type=positive_int, default=200, help="neighbours (default 200)")
    q.add_argument("--temperature", type=positive_float, default=0.1,
                   help="vote temperature T, weights exp(sim/T) (default 0.1)")
    q.set_defaults(func=_cmd_knn)

    q = esub.add_parser("finetune", help="fine-tune the whole student on a labelled fraction")
    _add_common(q)
    q.add_argument("--label-fraction", type=float, required=True,
                   help="share of training labels used, in (0, 1], e.g. 0.01 or 0.1")
    q.add_argument("--epochs", type=positive_int, default=None, help="epochs (default 30)")
    q.add_argument("--lr", type=positive_float, default=2e-3,
                   help="Adam learning rate of backbone and head (default 2e-3)")
    q.add_argument("--optimizer", choices=("adam", "sgd"), default="adam")
    q.add_argument("--weight-decay", type=float, default=0.0)
    q.add_argument("--seed", type=int, default=0, help="seed of the labelled subset and init")
    q.add_argument("--no-bn-recalibration", action="store_true",
                   help="test with the running BatchNorm statistics left by training")
    q.set_defaults(func=_cmd_finetune)
