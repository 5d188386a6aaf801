"""Command-line interface: ``s2bnn train | eval | demo | profile | data | report | export |
convert | predict``.

This module only parses arguments and dispatches; each command's work lives in the package it
belongs to and is imported lazily, so ``s2bnn --help`` stays fast. A :class:`UserError` anywhere
below becomes a one-line message on stderr and exit status 2, without a traceback.
``s2bnn eval`` is registered by :mod:`s2bnn.cli.evaluate`, ``s2bnn demo`` by :mod:`s2bnn.cli.demo`;
shared argument types are in :mod:`s2bnn.cli.args`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence

from s2bnn import __version__
from s2bnn.cli.args import positive_int, print_json
from s2bnn.errors import UserError


# --------------------------------------------------------------------------- train
def _cmd_train(args: argparse.Namespace) -> int:
    from s2bnn.config import load_config

    cfg = load_config(args.config, args.overrides)  # validate before importing the heavy parts
    from s2bnn.engine import train
    from s2bnn.eval.monitor import monitors

    run_dir = train(cfg, callbacks=monitors(cfg))
    if os.environ.get("RANK", "0") == "0":  # under torchrun, only the first process reports
        print(f"run dir: {run_dir}")
    return 0


# --------------------------------------------------------------------------- data
def _cmd_data_info(args: argparse.Namespace) -> int:
    from s2bnn.data import dataset_info

    info = dataset_info(args.name, root=args.root)
    if args.json:
        print_json(info)
    else:
        for key, value in info.items():
            print(f"{key:>12}: {value}")
    return 0


# --------------------------------------------------------------------------- profile
def _cmd_profile(args: argparse.Namespace) -> int:
    from s2bnn.models import build_model
    from s2bnn.models.profile import format_profile, profile_model

    kwargs = {"num_classes": args.num_classes, "in_chans": args.in_chans}
    for item in args.model_args:
        key, sep, value = item.partition("=")
        if not sep:
            raise UserError(f"model argument '{item}' is not of the form key=value")
        kwargs[key] = json.loads(value) if value[:1] in "0123456789-[{tf" else value
    model = build_model(args.name, **kwargs)
    prof = profile_model(model, image_size=args.image_size, in_chans=args.in_chans)
    if args.json:
        print_json(prof)
    else:
        print(format_profile(args.name, prof))
    return 0


# --------------------------------------------------------------------------- convert
def _cmd_convert(args: argparse.Namespace) -> int:
    from s2bnn.models.reference import convert_reference_checkpoint

    binary = {"auto": None, "true": True, "false": False}[args.binary_weight]
    info = convert_reference_checkpoint(args.src, args.out, args.arch, binary_weight=binary,
                                        force=args.force)
    if args.json:
        print_json(info)
    else:
        parts = ["backbone"] + (["projection head"] if info["head"] else []) + (
            ["classifier"] if info["classifier"] else []) + (
            ["key encoder and queue"] if info["key_encoder"] else [])
        print(f"{args.src} ({info['layout']} layout) -> {info['out']}: {', '.join(parts)}")
    return 0


# --------------------------------------------------------------------------- predict
def _cmd_predict(args: argparse.Namespace) -> int:
    from s2bnn.deploy.export import predict_files, print_predictions

    results = predict_files(args.file, args.images, top=args.top)
    if args.json:
        print_json(results)
    else:
        print_predictions(results)
    return 0


# --------------------------------------------------------------------------- report, export
def _cmd_report(args: argparse.Namespace) -> int:
    from s2bnn.report import collect_run, write_report

    runs = [collect_run(path, profile=not args.no_profile) for path in args.run_dirs]
    datasets = {r.get("dataset") for r in runs if r.get("dataset")}
    class_names = None
    if datasets == {"fashion-mnist"}:
        from s2bnn.data import FASHION_MNIST_CLASSES

        class_names = list(FASHION_MNIST_CLASSES)
    report = write_report(runs, args.out, title=args.title,
                          dataset=", ".join(sorted(datasets)) or None,
                          embedding=args.embedding, class_names=class_names)
    print(f"report: {report}")
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    if args.format == "safetensors":
        from s2bnn.eval.loading import export_backbone

        out = export_backbone(args.run_dir, args.out, force=args.force)
    elif args.format == "packed":
        from s2bnn.deploy.export import export_packed

        out = export_packed(args.run_dir, args.out, force=args.force)
    else:
        from s2bnn.deploy.export import export_onnx

        out = export_onnx(args.run_dir, args.out, force=args.force, image_size=args.image_size)
    print(f"exported: {out}")
    return 0


# --------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="s2bnn",
        description="Train small and 1-bit networks without labels by distilling a "
        "self-supervised teacher (S2-BNN).",
    )
    parser.add_argument("--version", action="version", version=f"s2bnn {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("train", help="train one recipe: s2bnn train CONFIG.yaml [key=value ...]")
    p.add_argument("config", help="recipe YAML, e.g. configs/fashion_mnist/s2bnn.yaml")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. output_dir=runs/x epochs=5")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("data", help="dataset tools")
    dsub = p.add_subparsers(dest="data_command", required=True, metavar="SUBCOMMAND")
    q = dsub.add_parser("info", help="counts, classes and image shape of a dataset")
    q.add_argument("name", help="fashion-mnist, synthetic, or an ImageFolder directory")
    q.add_argument("--root", default=None, help="directory holding the Fashion-MNIST idx files")
    q.add_argument("--json", action="store_true", help="print JSON")
    q.set_defaults(func=_cmd_data_info)

    p = sub.add_parser("profile", help="parameters, FLOPs, BOPs, OPs and size of a model")
    p.add_argument("name", help="registry name, e.g. reactnet_a")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--num-classes", type=int, default=1000)
    p.add_argument("--in-chans", type=int, default=3)
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("model_args", nargs="*",
                   help="extra builder arguments right after NAME, e.g. width_mult=0.25")
    p.set_defaults(func=_cmd_profile)

    p = sub.add_parser(
        "convert", help="a published S2-BNN / ReActNet checkpoint -> an s2bnn checkpoint",
        description="Convert a reference checkpoint (szq0214/S2-BNN main_moco.py or "
        "liuzechun/ReActNet train.py) into an s2bnn checkpoint usable as model.init_from, in "
        "s2bnn eval and in s2bnn export.")
    p.add_argument("src", help="the reference .pth.tar")
    p.add_argument("--arch", required=True, help="our architecture: reactnet_a")
    p.add_argument("--out", required=True, help="output .pt file")
    p.add_argument("--binary-weight", choices=("auto", "true", "false"), default="auto",
                   help="binary weights (step 2, the published models; auto: true) or "
                   "real-valued (a step-1 checkpoint)")
    p.add_argument("--force", action="store_true", help="overwrite --out")
    p.add_argument("--json", action="store_true", help="print a JSON summary")
    p.set_defaults(func=_cmd_convert)

    p = sub.add_parser("predict", help="top-5 classes of image files from a packed network")
    p.add_argument("file", metavar="FILE", help="packed network from `s2bnn export --format "
                                                "packed` (with a saved head)")
    p.add_argument("images", nargs="+", metavar="IMAGE")
    p.add_argument("--top", type=int, default=5, help="classes shown per image (default 5)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=_cmd_predict)

    from s2bnn.cli.evaluate import add_eval_parsers

    add_eval_parsers(sub)

    p = sub.add_parser("report", help="Markdown table and PNG plots from run dirs")
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    p.add_argument("--out", required=True, help="output directory for report.md and PNGs")
    p.add_argument("--title", default="s2bnn report")
    p.add_argument("--embedding", choices=("pca", "tsne"), default="pca",
                   help="2-D map of test features (t-SNE takes longer)")
    p.add_argument("--no-profile", action="store_true",
                   help="skip rebuilding models to count parameters and OPs")
    p.set_defaults(func=_cmd_report)

    p = sub.add_parser("export", help="backbone weights as .safetensors, a bit-packed network "
                                      "(.s2bnn) or ONNX")
    p.add_argument("run_dir", metavar="RUN_DIR_OR_CHECKPOINT")
    p.add_argument("--format", choices=("safetensors", "packed", "onnx"), default="safetensors",
                   help="safetensors: latent float weights + metadata; packed: 1-bit weights "
                        "for the s2bnn CPU runtime (FILE.s2bnn); onnx: the same network as "
                        "float ONNX (FILE.onnx). See docs/DEPLOY.md")
    p.add_argument("--image-size", type=positive_int, default=None,
                   help="onnx: example input size (default: the run's)")
    p.add_argument("--out", required=True, help="target FILE.safetensors | FILE.s2bnn | "
                                                "FILE.onnx")
    p.add_argument("--force", action="store_true", help="overwrite an existing file")
    p.set_defaults(func=_cmd_export)

    from s2bnn.cli.demo import add_demo_parser

    add_demo_parser(sub)
    return parser


def one_line(err: UserError) -> str:
    """The error's message on one line.

    A ``UserError`` raised in a DataLoader worker comes back re-raised with the worker's
    traceback in its message ("Caught DataError in DataLoader worker process 0. Original
    Traceback ..."); its own message is the last line, after ``module.ClassName: ``.
    """
    text = str(err).strip()
    if "\n" not in text:
        return text
    last = text.splitlines()[-1]
    _, sep, message = last.partition(f"{type(err).__name__}: ")
    return message.strip() if sep and message.strip() else " ".join(text.split())


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from s2bnn.runtime import tune_malloc

    tune_malloc()  # cheap element-wise ops cost ~3x more when glibc trims freed memory each step
    try:
        return int(args.func(args) or 0)
    except UserError as err:
        print(f"s2bnn: error: {one_line(err)}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print("s2bnn: interrupted", file=sys.stderr)
        return 130
