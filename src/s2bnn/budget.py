"""Training budgets: durations, steps from a wall-clock budget, and a budget split between stages.

Pure arithmetic, no torch: the config checks durations with it, the engine turns a measured step
time into a number of optimiser steps, and the demo divides its total budget between its stages.
"""

from __future__ import annotations

import math
import re

__all__ = [
    "BudgetError",
    "parse_duration",
    "format_duration",
    "steps_for_budget",
    "split_budget",
]

_UNITS = {"": 1.0, "s": 1.0, "sec": 1.0, "m": 60.0, "min": 60.0, "h": 3600.0}
_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)\s*(h|min|m|sec|s|)")


class BudgetError(ValueError):
    """A budget that cannot be used: unparseable, not positive, or too small to train."""


def parse_duration(value: str | float | int) -> float:
    """Seconds in ``value``: a number of seconds, or text such as ``90s``, ``10m``, ``1.5h``,
    ``1h30m``. Raises :class:`BudgetError` for anything else and for values that are not > 0."""
    if isinstance(value, bool):
        raise BudgetError(f"expected a duration such as 600, 90s, 10m or 1h, got {value!r}")
    if isinstance(value, str):
        try:
            value = float(value)  # plain seconds, negative ones included (refused below)
        except ValueError:
            pass
    if isinstance(value, (int, float)):
        seconds = float(value)
    else:
        text = str(value).strip().lower()
        pos, seconds, parts = 0, 0.0, 0
        while pos < len(text):
            match = _PART.match(text, pos)
            if match is None or match.end() == pos:
                raise BudgetError(
                    f"expected a duration such as 600, 90s, 10m or 1h30m, got {value!r}")
            seconds += float(match.group(1)) * _UNITS[match.group(2)]
            pos, parts = match.end(), parts + 1
            while pos < len(text) and text[pos] == " ":
                pos += 1
        if parts == 0:
            raise BudgetError(f"expected a duration such as 600, 90s, 10m or 1h, got {value!r}")
    if not math.isfinite(seconds) or seconds <= 0:
        raise BudgetError(f"a duration must be > 0 seconds, got {value!r}")
    return seconds


def format_duration(seconds: float) -> str:
    """``754.2`` -> ``'12m34s'``; under a minute, ``'41.3s'``."""
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, sec = divmod(round(seconds), 60)
    return f"{minutes}m{sec:02d}s"


def steps_for_budget(budget_s: float, step_s: float, spent_s: float = 0.0) -> int:
    """Optimiser steps that fit in what is left of ``budget_s`` after ``spent_s`` (set-up so far),
    at ``step_s`` seconds a step. Raises :class:`BudgetError` when not even one step fits."""
    if not step_s > 0:
        raise ValueError(f"step time must be > 0, got {step_s}")
    left = budget_s - spent_s
    steps = math.floor(left / step_s) if left > 0 else 0
    if steps < 1:
        raise BudgetError(
            f"a budget of {format_duration(budget_s)} leaves {format_duration(max(left, 0.0))} "
            f"after set-up ({format_duration(spent_s)}), less than one optimiser step "
            f"({format_duration(step_s)} here)")
    return steps


def split_budget(left_s: float, shares: dict[str, float]) -> dict[str, float]:
    """Seconds for each stage still to run, in proportion to ``shares`` (any positive weights).

    Called again after every stage with what is really left, so a stage that ran long or short
    is made up for by the ones after it instead of overrunning the total.
    """
    if any(w <= 0 for w in shares.values()):
        raise ValueError(f"shares must be > 0, got {shares}")
    total = sum(shares.values())
    left = max(left_s, 0.0)
    return {name: left * w / total for name, w in shares.items()}
