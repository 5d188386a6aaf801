"""Helpers shared by test modules (tests/ is on sys.path under pytest's default import mode)."""

from __future__ import annotations

import torch


def assert_identical(a, b, where: str = "") -> None:
    """Nested dicts/lists of tensors and numbers are equal, tensors bit for bit."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype, where
        assert torch.equal(a, b), f"tensor differs at {where}"
    elif isinstance(a, dict):
        assert set(a) == set(b), f"keys differ at {where}: {set(a) ^ set(b)}"
        for key in a:
            assert_identical(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_identical(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"
