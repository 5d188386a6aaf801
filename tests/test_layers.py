"""The package's imports point one way, down (docs/DEVELOPING.md): a module imports nothing from
a layer above its own, lazily inside a function or at the top. Checked on the source, so a new
import against the direction fails here rather than in a reviewer's head."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "s2bnn"

# Each package or module, and the ones it must never import.
FORBIDDEN: dict[str, tuple[str, ...]] = {
    "eval": ("report", "cli", "demo", "deploy"),
    "report": ("cli", "demo"),
    "deploy": ("engine", "methods", "report", "cli", "demo"),
    "engine": ("eval", "report", "cli", "demo", "deploy"),
    "methods": ("engine", "eval", "report", "cli", "demo", "deploy"),
    "models": ("methods", "engine", "eval", "report", "cli", "demo", "teachers"),
    "nn": ("models", "methods", "engine", "eval", "report", "cli", "demo", "data", "teachers"),
    "data": ("models", "methods", "engine", "eval", "report", "cli", "demo", "teachers"),
    "losses.py": ("nn", "models", "methods", "engine", "eval", "data", "cli", "demo"),
    "checkpoint.py": ("nn", "models", "methods", "engine", "eval", "data", "cli", "demo"),
    "config.py": ("nn", "models", "methods", "engine", "eval", "data", "cli", "demo"),
    "devices.py": ("nn", "models", "methods", "engine", "eval", "data", "cli", "demo"),
    "budget.py": ("nn", "models", "methods", "engine", "eval", "data", "cli", "demo"),
}


def _imports(path: Path) -> set[str]:
    """The first-level s2bnn subpackages/modules ``path`` imports (``s2bnn.X...`` -> X)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
            if node.module == "s2bnn":
                names += [f"s2bnn.{a.name}" for a in node.names]
        for name in names:
            parts = name.split(".")
            if parts[0] == "s2bnn" and len(parts) > 1:
                found.add(parts[1])
    return found


@pytest.mark.parametrize("unit", sorted(FORBIDDEN))
def test_imports_point_down(unit: str) -> None:
    target = SRC / unit
    files = sorted(target.rglob("*.py")) if target.is_dir() else [target]
    assert files, f"{unit} not found"
    bad = {f"{f.relative_to(SRC)} imports s2bnn.{m}" for f in files
           for m in _imports(f) & set(FORBIDDEN[unit])}
    assert not bad, sorted(bad)


def test_the_checker_sees_lazy_imports(tmp_path: Path) -> None:
    f = tmp_path / "m.py"
    f.write_text("def g():\n    from s2bnn.eval.knn import knn_eval\n    import s2bnn.report\n"
                 "    from s2bnn import demo\n")
    assert _imports(f) == {"eval", "report", "demo"}
