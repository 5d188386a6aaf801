"""Straightforward reference quantizers, for tests and benchmarks only.

They are written the way binary-network code is usually written: masks turned into floats,
piecewise polynomials assembled from them, the detach trick for straight-through gradients and
the weight scale recomputed with separate reductions. Mathematically they equal the fused
functions in :mod:`s2bnn.nn.quantizers`; they are kept to check those and to measure the speed-up.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch import Tensor

__all__ = [
    "reference_react_sign",
    "reference_ste_sign",
    "reference_scaled_sign",
    "use_reference_ops",
]


def _sign_pm(x: Tensor) -> Tensor:
    pos = (x >= 0).float()
    return pos * 2.0 - 1.0


def reference_react_sign(x: Tensor) -> Tensor:
    """sign(x) forward, gradient of the piecewise quadratic approximation backward."""
    below = (x < -1).float()
    neg = (x < 0).float()
    below_one = (x < 1).float()
    left = -1.0 * below + (x * x + 2.0 * x) * (1.0 - below)
    mid = left * neg + (-x * x + 2.0 * x) * (1.0 - neg)
    approx = mid * below_one + 1.0 * (1.0 - below_one)
    return _sign_pm(x).detach() - approx.detach() + approx


def reference_ste_sign(x: Tensor) -> Tensor:
    """sign(x) forward, gradient of hardtanh backward."""
    clipped = torch.clamp(x, -1.0, 1.0)
    return _sign_pm(x).detach() - clipped.detach() + clipped


def reference_scaled_sign(w: Tensor) -> Tensor:
    """alpha * sign(w) with alpha = mean |w| per output channel; gradient of clamp(w, -1, 1)."""
    scale = torch.abs(w)
    for dim in range(w.dim() - 1, 0, -1):
        scale = torch.mean(scale, dim=dim, keepdim=True)
    binary = (scale * _sign_pm(w)).detach()
    clipped = torch.clamp(w, -1.0, 1.0)
    return binary - clipped.detach() + clipped


class _Ref(nn.Module):
    def __init__(self, fn, binary: bool) -> None:  # noqa: ANN001 - private helper
        super().__init__()
        self.fn = fn
        self.binary = binary

    def forward(self, x: Tensor) -> Tensor:
        return self.fn(x)


def use_reference_ops(model: nn.Module) -> nn.Module:
    """Swap every fused sign/scaled-sign quantizer in ``model`` for its reference version and run
    every RPReLU as a plain chain of ops (in place; returns ``model``). Parameters and state-dict
    keys are unchanged, so a fused and a reference copy of a model compute the same function."""
    from s2bnn.nn.layers import RPReLU
    from s2bnn.nn.quantizers import ReActSign, ScaledSign, SteSign

    swap = {
        ReActSign: reference_react_sign,
        SteSign: reference_ste_sign,
        ScaledSign: reference_scaled_sign,
    }
    for module in list(model.modules()):
        if isinstance(module, RPReLU):
            module.fused = False
        for name, child in list(module.named_children()):
            fn = swap.get(type(child))
            if fn is not None:
                setattr(module, name, _Ref(fn, binary=True))
    return model
