"""Argument types and output helpers shared by the CLI modules."""

from __future__ import annotations

import argparse
import json

__all__ = ["positive_int", "positive_float", "print_json"]


def print_json(obj: object) -> None:
    """``obj`` as indented JSON on stdout."""
    print(json.dumps(obj, indent=2))


def positive_int(text: str) -> int:
    """An argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got '{text}'") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def positive_float(text: str) -> float:
    """An argparse type: a number > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got '{text}'") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {value}")
    return value
