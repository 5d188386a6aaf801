"""Quantized layers in larq's style, plus ReActNet's RSign and RPReLU.

A real conv, a binary-activation conv and a fully binary conv are the same :class:`QuantConv2d`
with different ``input_quantizer`` / ``weight_quantizer`` arguments, so two-step binarization
(binary activations first, then binary weights) changes arguments, never parameter names.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from s2bnn.nn import _conv, _kernels
from s2bnn.nn.quantizers import ReActSign, get_quantizer, is_binary

__all__ = ["Conv2d", "QuantConv2d", "QuantLinear", "RSign", "RPReLU"]



class _Quantized:
    """What a layer with an input and a weight quantizer reports about itself."""

    input_quantizer: nn.Module
    weight_quantizer: nn.Module

    @property
    def binary_input(self) -> bool:
        return is_binary(self.input_quantizer)

    @property
    def binary_weight(self) -> bool:
        return is_binary(self.weight_quantizer)


class QuantConv2d(_Quantized, nn.Conv2d):
    """``nn.Conv2d`` whose input and weight pass through quantizers before the convolution.

    ``input_quantizer`` / ``weight_quantizer``: a quantizer name (see
    :func:`s2bnn.nn.quantizers.get_quantizer`), a module (e.g. :class:`RSign`) or ``None`` (real).
    Zero padding is applied after the input quantizer, as in ReActNet and Bi-Real.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int = 1,
        padding: int = 0,
        dilation: int = 1,
        groups: int = 1,
        bias: bool = False,
        *,
        input_quantizer: str | nn.Module | None = None,
        weight_quantizer: str | nn.Module | None = None,
    ) -> None:
        super().__init__(
            in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias
        )
        self.input_quantizer = get_quantizer(input_quantizer)
        self.weight_quantizer = get_quantizer(weight_quantizer)

    def forward(self, x: Tensor) -> Tensor:
        xq, wq = self.input_quantizer(x), self.weight_quantizer(self.weight)
        if _centre_only(self, xq, wq):
            # On a 1x1 map with 'same' zero padding only the kernel's centre meets data, so this
            # is the same convolution. It avoids oneDNN's bf16 weight gradient for that shape on
            # CPUs, which returns NaN/Inf at random in the taps that meet only padding (seen
            # with torch 2.14.1 on AVX512-BF16; tests/test_quantizers.py reproduces it).
            kh, kw = self.kernel_size[0] // 2, self.kernel_size[1] // 2
            return F.conv2d(xq, wq[:, :, kh:kh + 1, kw:kw + 1], self.bias, 1, 0, 1, self.groups)
        if _conv.takes_gemm_grad(self, xq, wq):
            return _conv.conv2d_gemm_grad(self, xq, wq)
        return self._conv_forward(xq, wq, self.bias)


class Conv2d(nn.Conv2d):
    """``nn.Conv2d`` (same parameters and results) that trains through the GEMM weight
    gradient of :mod:`s2bnn.nn._conv` where that is faster: a real network's small late maps."""

    def forward(self, x: Tensor) -> Tensor:
        if _conv.takes_gemm_grad(self, x, self.weight):
            return _conv.conv2d_gemm_grad(self, x, self.weight)
        return super().forward(x)


def _centre_only(conv: nn.Conv2d, x: Tensor, weight: Tensor) -> bool:
    """Whether ``conv`` on ``x`` with ``weight`` is a bf16 CPU convolution of a 1x1 map in which
    only the kernel's centre tap meets the input (odd kernel, padding k // 2 of zeros, no
    dilation)."""
    if not _conv.bf16_on_cpu(x, weight) or x.shape[-2:] != (1, 1) or conv.padding_mode != "zeros":
        return False
    return conv.dilation == (1, 1) and all(
        k % 2 == 1 and p == k // 2 for k, p in zip(conv.kernel_size, conv.padding))


class QuantLinear(_Quantized, nn.Linear):
    """``nn.Linear`` with input and weight quantizers (see :class:`QuantConv2d`)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        input_quantizer: str | nn.Module | None = None,
        weight_quantizer: str | nn.Module | None = None,
    ) -> None:
        super().__init__(in_features, out_features, bias)
        self.input_quantizer = get_quantizer(input_quantizer)
        self.weight_quantizer = get_quantizer(weight_quantizer)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(self.input_quantizer(x), self.weight_quantizer(self.weight), self.bias)


class RSign(nn.Module):
    """ReActNet's RSign: sign(x + beta) with a learnable per-channel threshold ``beta``.

    Use it as a conv's ``input_quantizer``. With ``quantizer=None`` (the real-valued
    counterpart) it only shifts, so the parameter ``beta`` exists in every mode.
    """

    def __init__(self, channels: int, quantizer: str | nn.Module | None = "react_sign") -> None:
        super().__init__()
        self.beta = nn.Parameter(torch.zeros(channels))
        self.quantizer = get_quantizer(quantizer)

    @property
    def binary(self) -> bool:
        return is_binary(self.quantizer)

    def forward(self, x: Tensor) -> Tensor:
        if type(self.quantizer) is ReActSign:
            # One node (and, on CPU, one compiled pass) for the shift and the sign.
            return self.quantizer(x, self.beta)
        return self.quantizer(x + self.beta.view(1, -1, 1, 1))


class _RPReLUFn(torch.autograd.Function):
    """PReLU(x - gamma) + zeta as one node: autograd's chain (sub, prelu, add) spends most of its
    time in PReLU's generic backward and in negating a full-size gradient for gamma."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, shift_in: Tensor, slope: Tensor, shift_out: Tensor) -> Tensor:
        t = x - shift_in.view(1, -1, 1, 1)
        ctx.save_for_backward(t, slope)
        return F.prelu(t, slope).add_(shift_out.view(1, -1, 1, 1))

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        t, slope = ctx.saved_tensors
        g_pos = torch.ops.aten.threshold_backward(grad, t, 0.0)  # grad where t > 0
        g_neg = grad - g_pos
        dims = (0, 2, 3)
        g_x = torch.addcmul(g_pos, g_neg, slope.view(1, -1, 1, 1))
        g_slope = (g_neg * t).sum(dims)
        return g_x, -g_x.sum(dims), g_slope, grad.sum(dims)


class _RPReLUKernelFn(torch.autograd.Function):
    """:class:`_RPReLUFn` on the compiled CPU kernels (one pass forward, one backward)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, shift_in: Tensor, slope: Tensor, shift_out: Tensor) -> Tensor:
        ctx.save_for_backward(x, shift_in, slope)
        return _kernels.rprelu_forward(x, shift_in, slope, shift_out)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        x, shift_in, slope = ctx.saved_tensors
        return _kernels.rprelu_backward(grad, x, shift_in, slope)


class RPReLU(nn.Module):
    """ReActNet's RPReLU: PReLU(x - gamma) + zeta with per-channel gamma, slope and zeta.

    ``fused`` (default) runs it as one autograd node, on CPU float32/bfloat16 tensors through
    the compiled kernels of :mod:`s2bnn.nn._kernels` (in the input's dtype, computed in float32);
    ``fused=False`` is the plain chain of torch ops, kept as the reference for tests and
    benchmarks.
    """

    def __init__(self, channels: int, init_slope: float = 0.25, fused: bool = True) -> None:
        super().__init__()
        self.shift_in = nn.Parameter(torch.zeros(channels))
        self.slope = nn.Parameter(torch.full((channels,), init_slope))
        self.shift_out = nn.Parameter(torch.zeros(channels))
        self.fused = fused

    def forward(self, x: Tensor) -> Tensor:
        if self.fused and x.dim() == 4:
            fn = _RPReLUKernelFn if _kernels.usable(x) else _RPReLUFn
            return fn.apply(x, self.shift_in, self.slope, self.shift_out)
        shape = (1, -1) + (1,) * (x.dim() - 2)
        y = F.prelu(x - self.shift_in.view(shape), self.slope)
        return y + self.shift_out.view(shape)
