"""Quantizers: the functions that turn real tensors into 1-bit ones, with their training gradients.

Each quantizer is a single :class:`torch.autograd.Function` (one forward expression, one backward
expression) wrapped in a tiny parameter-free module with a ``binary`` flag that the profiler reads.
Sign quantizers map ``x >= 0`` to +1 and ``x < 0`` to -1 (never 0), so a binary layer only ever sees
+-1. The deliberately naive versions used to check these live in ``tests/reference_ops.py``.

Names accepted by :func:`get_quantizer`:

- ``"react_sign"``: sign(x); gradient 2+2x on [-1, 0), 2-2x on [0, 1), 0 elsewhere (ReActNet;
  Bi-Real's ApproxSign).
- ``"ste_sign"``: sign(x); gradient 1 on [-1, 1], 0 elsewhere (hardtanh straight-through, XNOR).
- ``"scaled_sign"``: for weights: alpha * sign(W), alpha = mean |W| per output channel
  (detached); gradient of clamp(W, -1, 1).
- ``"hardtanh"``: clamp(x, -1, 1); the real-valued stand-in for a sign (not binary).
- ``"identity"`` (or ``None``): real values.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
from torch import Tensor
from torch.autograd.function import once_differentiable

from s2bnn.errors import ModelError
from s2bnn.nn import _kernels

__all__ = [
    "Quantizer",
    "ReActSign",
    "SteSign",
    "ScaledSign",
    "HardTanh",
    "Identity",
    "QUANTIZERS",
    "get_quantizer",
    "react_sign",
    "ste_sign",
    "scaled_sign",
]


def _signed(magnitude: Tensor, x: Tensor) -> Tensor:
    # magnitude where x >= 0, -magnitude where x < 0 (magnitude >= 0, broadcast to x's shape).
    # torch.sign would give 0 at 0, and copysign alone -magnitude at -0.0 (which ReLU / max-pool /
    # conv algorithms produce or not, depending on memory layout); adding +0.0 turns -0.0 into
    # +0.0 (IEEE round-to-nearest). Writing the result over that temporary keeps it to one
    # allocation: for a 1024x1024x3x3 weight a second 38 MB buffer costs more than the arithmetic.
    out = x + 0.0
    return torch.copysign(magnitude, out, out=out)


def _pm_one(x: Tensor) -> Tensor:
    """+1 for x >= 0 (including -0.0), -1 for x < 0."""
    return _signed(x.new_ones(()), x)


class _ReActSignFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor) -> Tensor:
        ctx.save_for_backward(x)
        return _pm_one(x)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        (x,) = ctx.saved_tensors
        # d/dx of the piecewise quadratic: 2 - 2|x| inside [-1, 1], 0 outside.
        return torch.rsub(x.abs(), 2.0, alpha=2.0).relu_().mul_(grad)


class _SteSignFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor) -> Tensor:
        ctx.save_for_backward(x)
        return _pm_one(x)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        (x,) = ctx.saved_tensors
        # One kernel: passes grad where -1 < x < 1 (the boundary itself has measure zero).
        return torch.ops.aten.hardtanh_backward(grad, x, -1.0, 1.0)


class _ScaledSignFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, w: Tensor) -> Tensor:
        ctx.save_for_backward(w)
        dims = tuple(range(1, w.dim()))
        alpha = w.abs().mean(dim=dims, keepdim=True)
        return _signed(alpha, w)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        (w,) = ctx.saved_tensors
        # Gradient of clamp(w, -1, 1) (alpha is treated as a constant; |w| = 1 itself, a set of
        # measure zero, gets 0), as one kernel: a mask built from w.abs() > 1 takes three passes
        # over weights of up to 38 MB.
        return torch.ops.aten.hardtanh_backward(grad, w, -1.0, 1.0)


def react_sign(x: Tensor) -> Tensor:
    """sign(x) in {-1, +1} with ReActNet's polynomial straight-through gradient."""
    return _ReActSignFn.apply(x)


def ste_sign(x: Tensor) -> Tensor:
    """sign(x) in {-1, +1} with the hardtanh straight-through gradient."""
    return _SteSignFn.apply(x)


def scaled_sign(w: Tensor) -> Tensor:
    """alpha * sign(w), alpha = mean |w| over all but the first dim; gradient of clamp(w,-1,1)."""
    return _ScaledSignFn.apply(w)


class Quantizer(nn.Module):
    """Base class: a parameter-free element-wise map; ``binary`` says whether outputs are 1-bit."""

    binary: bool = False

    def extra_repr(self) -> str:
        return f"binary={self.binary}"


def _sign_dtype(x: Tensor, shift: Tensor) -> torch.dtype:
    if torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16:
        return torch.bfloat16
    return torch.result_type(x, shift)


class _ShiftedReActSignKernelFn(torch.autograd.Function):
    """``react_sign(x + shift)`` (per-channel shift) on the compiled CPU kernels, one pass each
    way. The +-1 output is bfloat16 under CPU bf16 autocast (the convolution after it would cast
    it there anyway; +-1 is exact), else the dtype ``x + shift`` would have."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, shift: Tensor) -> Tensor:
        ctx.save_for_backward(x, shift)
        return _kernels.rsign_forward(x, shift, _sign_dtype(x, shift))

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, Tensor]:
        x, shift = ctx.saved_tensors
        return _kernels.rsign_backward(grad, x, shift)


class ReActSign(Quantizer):
    """Sign with ReActNet's polynomial gradient.

    ``forward(x, shift)`` is ``sign(x + shift)`` with a per-channel ``shift`` (RSign's beta) as
    one autograd node, on CPU float32/bfloat16 tensors through the compiled kernels of
    :mod:`s2bnn.nn._kernels`."""

    binary = True

    def forward(self, x: Tensor, shift: Tensor | None = None) -> Tensor:
        if shift is None:
            return _ReActSignFn.apply(x)
        if (x.dim() == 4 and _kernels.usable(x)
                and _sign_dtype(x, shift) in (torch.float32, torch.bfloat16)):
            return _ShiftedReActSignKernelFn.apply(x, shift)
        return _ReActSignFn.apply(x + shift.view(1, -1, 1, 1))


class SteSign(Quantizer):
    """Sign with the hardtanh straight-through gradient."""

    binary = True

    def forward(self, x: Tensor) -> Tensor:
        return _SteSignFn.apply(x)


class ScaledSign(Quantizer):
    """Weight binarization alpha * sign(W) with a per-output-channel, detached alpha."""

    binary = True

    def forward(self, w: Tensor) -> Tensor:
        return _ScaledSignFn.apply(w)


class HardTanh(Quantizer):
    """clamp(x, -1, 1): keeps a real-valued counterpart non-linear where a sign used to be."""

    def forward(self, x: Tensor) -> Tensor:
        return torch.nn.functional.hardtanh(x)


class Identity(Quantizer):
    """No quantization."""

    def forward(self, x: Tensor) -> Tensor:
        return x


QUANTIZERS: dict[str, type[Quantizer]] = {
    "react_sign": ReActSign,
    "ste_sign": SteSign,
    "scaled_sign": ScaledSign,
    "hardtanh": HardTanh,
    "identity": Identity,
}


def get_quantizer(spec: str | nn.Module | None) -> nn.Module:
    """A quantizer module from a name, a module (returned as is) or ``None`` (identity)."""
    if spec is None:
        return Identity()
    if isinstance(spec, nn.Module):
        return spec
    if spec not in QUANTIZERS:
        raise ModelError(f"unknown quantizer '{spec}'; known: {', '.join(sorted(QUANTIZERS))}")
    return QUANTIZERS[spec]()


def is_binary(module: nn.Module | None) -> bool:
    """Whether a quantizer (or RSign) produces 1-bit values."""
    return bool(getattr(module, "binary", False))
