"""Helpers shared by test modules (tests/ is on sys.path under pytest's default import mode)."""

from __future__ import annotations

import torch
import torch.nn as nn


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


class TinyNet(nn.Module):
    """A tiny conv backbone with ``feature_dim`` (pooled features when num_classes == 0)."""

    def __init__(self, in_chans: int = 1, width: int = 8, num_classes: int = 0,
                 bn: bool = True) -> None:
        super().__init__()
        norm = nn.BatchNorm2d if bn else nn.Identity
        self.features = nn.Sequential(
            nn.Conv2d(in_chans, width, 3, 2, 1), norm(width), nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, 2, 1), norm(2 * width), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.feature_dim = 2 * width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)
