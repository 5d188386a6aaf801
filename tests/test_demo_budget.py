"""benchmarks/demo_budget.py's summary of recipes run on several seeds."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

# As tests/test_recipes.py does: benchmarks/ is on the path only while the module is imported,
# so its script names cannot shadow anything for the tests that run after.
_BENCHMARKS = str(Path(__file__).resolve().parents[1] / "benchmarks")
sys.path.insert(0, _BENCHMARKS)
try:
    from demo_budget import FOLDER_GOAL, mean_interval, seed_summary
finally:
    sys.path.remove(_BENCHMARKS)


def test_mean_interval_is_students_t() -> None:
    # mean 2, sd 1, n 3: t(0.975, 2) = 4.3027, so the half-width is 4.3027 / sqrt(3) = 2.4842
    lo, hi = mean_interval([1.0, 2.0, 3.0])
    assert lo == pytest.approx(2 - 2.4842, abs=1e-4) and hi == pytest.approx(2 + 2.4842, abs=1e-4)
    assert mean_interval([5.0, 5.0]) == (5.0, 5.0)
    with pytest.raises(ValueError, match="at least two"):
        mean_interval([1.0])


def _row(s2bnn: float, untrained: float) -> dict:
    return {"runs": [{"name": "s2bnn", "linear_top1": s2bnn},
                     {"name": "random_init", "linear_top1": untrained}]}


def test_seed_summary_groups_seeds_and_counts_the_goal() -> None:
    rows = {"r": _row(80.0, 64.0), "r-seed1": _row(79.0, 64.0), "r-seed2": _row(78.0, 64.0),
            "two-only": _row(90.0, 10.0), "two-only-seed1": _row(91.0, 10.0)}
    lines = seed_summary(rows)
    assert len(lines) == 3  # header, rule, one recipe: two seeds are too few for a line
    cells = [c.strip() for c in lines[2].strip("|").split("|")]
    assert cells[:4] == ["r", "3", "79.00 ± 1.00", "15.00"]
    lo, hi = mean_interval([16.0, 15.0, 14.0])
    assert cells[4] == f"{lo:.2f} to {hi:.2f}"
    assert cells[5] == "14.00-16.00"
    reached = sum(m >= FOLDER_GOAL for m in (16.0, 15.0, 14.0))  # the goal, 15: two of them
    assert cells[6] == f"{reached} of 3"
