"""`s2bnn demo` (argument parsing only; the pipeline is :mod:`s2bnn.demo`)."""

from __future__ import annotations

import argparse


def _cmd_demo(args: argparse.Namespace) -> int:
    from s2bnn.demo import load_demo_config, run_demo

    overrides = list(args.overrides)
    if args.data is not None:
        overrides.append(f"data={args.data}")
    plan = load_demo_config(args.config, overrides)
    run_demo(plan, args.out, force=args.force)
    return 0


def add_demo_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``s2bnn demo [--data NAME_OR_PATH] --out DIR [key=value ...]``."""
    p = sub.add_parser(
        "demo",
        help="the whole S2-BNN pipeline: teacher, S2-BNN and MoCo v2 students, evaluation, report",
        description="Pretrain a MoCo v2 teacher, distil a binary student with S2-BNN, train the "
        "same student with MoCo v2, evaluate everything against raw pixels and untrained "
        "networks, and write report.md, PNG plots and results.json into --out.",
    )
    p.add_argument("--data", default=None,
                   help="fashion-mnist (default), synthetic, or an ImageFolder dir (train/, val/)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--config", default=None,
                   help="YAML with demo sizes (fields of s2bnn.demo.DemoConfig)")
    p.add_argument("--force", action="store_true",
                   help="run again into an --out that holds a finished demo, replacing its runs")
    p.add_argument("overrides", nargs="*",
                   help="demo sizes as key=value, e.g. teacher_epochs=1 limit=2000")
    p.set_defaults(func=_cmd_demo)
