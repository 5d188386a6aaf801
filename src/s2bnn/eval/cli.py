"""`s2bnn eval ...`, `s2bnn report` and `s2bnn export` (argument parsing only)."""

from __future__ import annotations

import argparse


def add_eval_parsers(sub: argparse._SubParsersAction) -> None:
    """Register the eval, report and export sub-commands (filled in by the evaluation work)."""
