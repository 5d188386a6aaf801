"""`s2bnn demo` (argument parsing only)."""

from __future__ import annotations

import argparse


def add_demo_parser(sub: argparse._SubParsersAction) -> None:
    """Register the demo sub-command (filled in by the demo work)."""
