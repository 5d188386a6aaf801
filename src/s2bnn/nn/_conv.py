"""bf16 CPU convolutions whose weight gradient is one matrix product (a training fast path).

oneDNN's bf16 weight gradient is slow on the small maps with many channels that end a network
at 28-32 px: on a 2-core Xeon with AMX, for the demo student's convolutions with 4x4 and 2x2
output maps the GEMM below took 1.6-12x less time (a 1x1 convolution from 192 to 384 channels on
a 2x2 map: 0.21 ms against 2.50 ms), and for 3x3 ones with 7x7 and 14x14 maps 1.4-5x more
(``benchmarks/bench_kernels.py`` times both for every layer; docs/BENCHMARKS.md).

The weight gradient is ``grad^T @ im2col(x)``: one GEMM of the ``[N*Ho*Wo, Co]`` output gradient
against the ``[N*Ho*Wo, kh*kw*Ci]`` patches, which a channels-last input gives as views (1x1) or
as ``kh*kw`` strided slices put side by side. The forward and the input gradient stay oneDNN's.

:func:`takes_gemm_grad` says where the path applies; it honours the training-kernels switch
(``S2BNN_TRAIN_KERNELS=0`` or :func:`s2bnn.nn._kernels.switched`) like the compiled kernels.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from s2bnn.nn import _kernels

__all__ = ["bf16_on_cpu", "takes_gemm_grad", "conv2d_gemm_grad", "weight_grad"]

# The GEMM takes output maps of at most this many pixels: where the map is larger its reduction
# over N*Ho*Wo rows runs longer than oneDNN's gradient (see the module docstring; batch 128).
MAX_GEMM_MAP = 16
# Patches larger than this (elements) are left to oneDNN: nine copies of a large activation
# would cost the memory traffic they save time in.
MAX_PATCH_ELEMENTS = 1 << 24


def bf16_on_cpu(x: Tensor, w: Tensor) -> bool:
    """Whether the convolution of ``x`` with ``w`` runs in bf16 on the CPU: both bf16, or bf16
    autocast over float32/bf16 tensors."""
    if x.device.type != "cpu" or w.device.type != "cpu":
        return False
    if x.dtype == w.dtype == torch.bfloat16:
        return True
    return ({x.dtype, w.dtype} <= {torch.float32, torch.bfloat16}
            and torch.is_autocast_enabled("cpu")
            and torch.get_autocast_dtype("cpu") == torch.bfloat16)


def takes_gemm_grad(conv: nn.Conv2d, x: Tensor, weight: Tensor) -> bool:
    """Whether ``conv`` on ``x`` (its quantized input) with ``weight`` should train through
    :func:`conv2d_gemm_grad`: a bf16 (or bf16-autocast) CPU convolution whose weight needs a
    gradient, without groups, dilation or bias, zero-padded by numbers (not ``'same'``),
    outside compile and tracing, with the switch on, of a shape where the GEMM wins (see the
    module constants)."""
    if not (torch.is_grad_enabled() and weight.requires_grad and x.dim() == 4
            and bf16_on_cpu(x, weight) and conv.groups == 1 and conv.dilation == (1, 1)
            and conv.bias is None and conv.padding_mode == "zeros"
            and not isinstance(conv.padding, str)):
        return False
    if torch.compiler.is_compiling() or torch.jit.is_tracing() or not _kernels.switched_on():
        return False
    kh, kw = conv.kernel_size
    n, _, h, w = x.shape
    ho = (h + 2 * conv.padding[0] - kh) // conv.stride[0] + 1
    wo = (w + 2 * conv.padding[1] - kw) // conv.stride[1] + 1
    return (ho * wo <= MAX_GEMM_MAP
            and n * ho * wo * kh * kw * conv.in_channels <= MAX_PATCH_ELEMENTS)


def weight_grad(grad: Tensor, x: Tensor, kernel: tuple[int, int], stride: tuple[int, int],
                padding: tuple[int, int]) -> Tensor:
    """Gradient of ``conv2d(x, w, stride, padding)`` for ``w`` (shape ``[Co, Ci, kh, kw]``),
    given the output gradient ``grad``, as one GEMM over im2col patches of ``x``."""
    n, co, ho, wo = grad.shape
    ci = x.shape[1]
    kh, kw = kernel
    g = grad.permute(0, 2, 3, 1).reshape(-1, co)  # a view for channels-last gradients
    xn = x.permute(0, 2, 3, 1)
    if (kh, kw) == (1, 1) and padding == (0, 0) and stride == (1, 1):
        return (g.t() @ xn.reshape(-1, ci)).view(co, ci, 1, 1)
    if padding != (0, 0):
        xn = F.pad(xn, (0, 0, padding[1], padding[1], padding[0], padding[0]))
    sh, sw = stride
    # tap (i, j) of output pixel (p, q) reads padded input (p*sh + i, q*sw + j)
    cols = torch.cat([xn[:, i:i + sh * (ho - 1) + 1:sh, j:j + sw * (wo - 1) + 1:sw, :]
                      for i in range(kh) for j in range(kw)], dim=3)
    gw = g.t() @ cols.reshape(-1, kh * kw * ci)
    return gw.view(co, kh, kw, ci).permute(0, 3, 1, 2)


class _GemmGradConv(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, w: Tensor, stride: tuple[int, int],
                padding: tuple[int, int]) -> Tensor:
        ctx.save_for_backward(x, w)
        ctx.geometry = stride, padding
        return F.conv2d(x, w, None, stride, padding)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        x, w = ctx.saved_tensors
        stride, padding = ctx.geometry
        grad = grad.to(x.dtype)
        gx = None
        if ctx.needs_input_grad[0]:
            gx = torch.ops.aten.convolution_backward(
                grad, x, w, None, list(stride), list(padding), [1, 1], False, [0, 0], 1,
                [True, False, False])[0]
        gw = weight_grad(grad, x, tuple(w.shape[2:]), stride, padding)
        return gx, gw, None, None


def conv2d_gemm_grad(conv: nn.Conv2d, x: Tensor, weight: Tensor) -> Tensor:
    """``conv``'s convolution of ``x`` with ``weight`` in bf16, its weight gradient by
    :func:`weight_grad` (where :func:`takes_gemm_grad` holds)."""
    xb, wb = x.to(torch.bfloat16), weight.to(torch.bfloat16)
    return _GemmGradConv.apply(xb, wb, tuple(conv.stride), tuple(conv.padding))
