"""benchmarks/ab_commits.py refuses bad arguments in one line before it builds a worktree."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("args,says", [
    (["--base", "no-such-commit"], "--base no-such-commit: not a commit"),
    (["--base", "HEAD", "--stages", "s2bnn"], "--stages takes stage:steps pairs"),
    (["--base", "HEAD", "--run", "/nonexistent"], "no /nonexistent/runs/s2bnn/config.yaml"),
])
def test_bad_arguments_exit_non_zero_with_one_line(args, says, tmp_path) -> None:
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "ab_commits.py"), *args],
                          capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and says in lines[0]
