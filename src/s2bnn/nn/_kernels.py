"""Compiled CPU kernels for RSign and RPReLU in training (``kernels.c`` next to this file).

Under bf16 autocast on CPU these layers meet a bf16 activation and float32 per-channel
parameters; PyTorch then runs its slow mixed-dtype element-wise path, several passes per layer.
The kernels read each element once, compute in float32, write once, and reduce the parameter
gradients in the same pass (``benchmarks/bench_kernels.py`` measures both paths).

:func:`usable` says whether a tensor can take them: a CPU tensor, float32 or bfloat16, contiguous
as NCHW, channels-last or [N, C], outside ``torch.compile`` and ``torch.jit.trace`` (which need
torch ops to record), with the library built. Set
``S2BNN_TRAIN_KERNELS=0`` to run the pure-torch path everywhere. :func:`prebuild` builds the
library ahead of first use (``make setup`` calls it).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import Tensor

from s2bnn import _cbuild

__all__ = ["library", "usable", "enabled", "switched", "switched_on", "rsign_forward",
           "rsign_backward", "rprelu_forward", "rprelu_backward", "ENV"]

SOURCE = Path(__file__).with_name("kernels.c")
FLAGS = ["-O3", "-std=c11", "-fPIC", "-shared", "-fopenmp", "-ffp-contract=off"]
ABI_VERSION = 2
ENV = "S2BNN_TRAIN_KERNELS"
WHAT = "RSign and RPReLU train on their slower pure-torch path"
_DTYPES = {torch.float32: 0, torch.bfloat16: 1}

_switch: bool | None = None  # set by switched(); None: the environment decides


def _build(verbose: bool = False) -> Path | None:
    if _cbuild.find_compiler() is None:
        return _cbuild.compile_cached(SOURCE, FLAGS, "s2bnn_train", WHAT)  # says so, once
    path = _cbuild.compile_cached(SOURCE, FLAGS, "s2bnn_train", WHAT, verbose, quiet=True)
    if path is None:
        # target_clones (x86-64-v4) needs GCC >= 11: one plain build for the baseline ISA.
        flags = [*FLAGS, "-DS2T_NO_CLONES"]
        path = _cbuild.compile_cached(SOURCE, flags, "s2bnn_train", WHAT, verbose)
    return path


def _load(path: Path) -> ctypes.CDLL | None:
    lib = _cbuild.load_library(path, WHAT)
    if lib is None or lib.s2t_abi_version() != ABI_VERSION:
        return None
    P, I, L = ctypes.c_void_p, ctypes.c_int, ctypes.c_int64
    sig = {
        "s2t_rsign_fwd": [P, I, P, I, L, I, L, P],
        "s2t_rsign_bwd": [P, P, P, I, L, I, L, P, P],
        "s2t_rprelu_fwd": [P, I, P, I, L, I, L, P, P, P],
        "s2t_rprelu_bwd": [P, P, P, I, L, I, L, P, P, P, P, P],
    }
    for name, args in sig.items():
        fn = getattr(lib, name)
        fn.argtypes = args
        fn.restype = ctypes.c_int
    return lib


_once = _cbuild.OnceLoaded(_build, _load)


def library() -> ctypes.CDLL | None:
    """The loaded kernel library (built on first use), or ``None`` where it cannot be built."""
    return _once()


def enabled() -> bool:
    """Whether the kernels may run: the library loads, and neither :func:`switched` (off) nor
    ``S2BNN_TRAIN_KERNELS=0`` turns them off."""
    return switched_on() and library() is not None


def switched_on() -> bool:
    """Whether :func:`switched` or else ``S2BNN_TRAIN_KERNELS`` lets the training fast paths
    run (the compiled kernels here, the GEMM weight gradient of :mod:`s2bnn.nn._conv`)."""
    return _switch if _switch is not None else _env_switch(os.environ.get(ENV, "1"))


_ON, _OFF = ("1", "true", "yes", "on", ""), ("0", "false", "no", "off")
_warned: set[str] = set()


def _env_switch(value: str) -> bool:
    """``S2BNN_TRAIN_KERNELS`` as a bool; any other value says so once on stderr and counts as
    on (the layer cannot stop a run that has started, and the kernels compute the same)."""
    v = value.strip().lower()
    if v not in _ON + _OFF and v not in _warned:
        _warned.add(v)
        print(f"s2bnn: {ENV}={value!r} is not one of 0/1, true/false, yes/no, on/off: the "
              "training kernels stay on; set it to 0 to turn them off", file=sys.stderr)
    return v not in _OFF


@contextlib.contextmanager
def switched(on: bool) -> Iterator[None]:
    """Run the enclosed code with the kernels on or off (tests and A/B benchmarks)."""
    global _switch
    before, _switch = _switch, on
    try:
        yield
    finally:
        _switch = before


def _geometry(x: Tensor) -> tuple[int, int, int] | None:
    """(outer, C, inner) of a contiguous NCHW, channels-last or [N, C] tensor, else None."""
    if x.dim() == 2 and x.is_contiguous():
        return x.shape[0], x.shape[1], 1
    if x.dim() == 4:
        n, c, h, w = x.shape
        if x.is_contiguous():
            return n, c, h * w
        if x.is_contiguous(memory_format=torch.channels_last):
            return n * h * w, c, 1
    return None


def usable(x: Tensor) -> bool:
    """Whether ``x`` can go through the compiled kernels (see the module docstring)."""
    return (x.device.type == "cpu" and x.dtype in _DTYPES and x.numel() > 0
            and not torch.compiler.is_compiling() and not torch.jit.is_tracing()
            and _geometry(x) is not None and enabled())


def _like(grad: Tensor, x: Tensor) -> Tensor:
    """``grad`` in ``x``'s dtype and memory layout (the backward kernels index both alike)."""
    grad = grad.to(x.dtype)
    if x.dim() == 4 and not x.is_contiguous():
        return grad.contiguous(memory_format=torch.channels_last)
    return grad.contiguous()


def _vec(p: Tensor) -> Tensor:
    return p.detach().to(torch.float32).contiguous()


def _check(rc: int, name: str) -> None:
    if rc != 0:
        raise MemoryError(f"s2bnn training kernel {name}: out of memory for its buffers")


def rsign_forward(x: Tensor, beta: Tensor, out_dtype: torch.dtype) -> Tensor:
    """+1 where ``x + beta >= 0`` (per channel), else -1, as ``out_dtype`` (float32/bfloat16)."""
    outer, c, inner = _geometry(x)
    y = torch.empty_like(x, dtype=out_dtype)
    b = _vec(beta)
    _check(library().s2t_rsign_fwd(x.data_ptr(), _DTYPES[x.dtype], y.data_ptr(),
                                   _DTYPES[out_dtype], outer, c, inner, b.data_ptr()), "rsign")
    return y


def rsign_backward(grad: Tensor, x: Tensor, beta: Tensor) -> tuple[Tensor, Tensor]:
    """ReActNet's polynomial STE at ``x + beta``: (grad of x, grad of beta)."""
    outer, c, inner = _geometry(x)
    grad = _like(grad, x)
    gx = torch.empty_like(x)
    g_beta = torch.empty(c, dtype=torch.float32)
    b = _vec(beta)
    _check(library().s2t_rsign_bwd(grad.data_ptr(), x.data_ptr(), gx.data_ptr(),
                                   _DTYPES[x.dtype], outer, c, inner, b.data_ptr(),
                                   g_beta.data_ptr()), "rsign backward")
    return gx, g_beta.to(beta.dtype)


def rprelu_forward(x: Tensor, shift_in: Tensor, slope: Tensor, shift_out: Tensor) -> Tensor:
    """``PReLU(x - shift_in) + shift_out`` per channel, in ``x``'s dtype."""
    outer, c, inner = _geometry(x)
    y = torch.empty_like(x)
    si, k, so = _vec(shift_in), _vec(slope), _vec(shift_out)
    _check(library().s2t_rprelu_fwd(x.data_ptr(), _DTYPES[x.dtype], y.data_ptr(),
                                    _DTYPES[x.dtype], outer, c, inner, si.data_ptr(),
                                    k.data_ptr(), so.data_ptr()), "rprelu")
    return y


def rprelu_backward(grad: Tensor, x: Tensor, shift_in: Tensor, slope: Tensor
                    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Gradients of :func:`rprelu_forward` for x, shift_in, slope and shift_out."""
    outer, c, inner = _geometry(x)
    grad = _like(grad, x)
    gx = torch.empty_like(x)
    outs = [torch.empty(c, dtype=torch.float32) for _ in range(3)]
    si, k = _vec(shift_in), _vec(slope)
    _check(library().s2t_rprelu_bwd(grad.data_ptr(), x.data_ptr(), gx.data_ptr(),
                                    _DTYPES[x.dtype], outer, c, inner, si.data_ptr(),
                                    k.data_ptr(), *(o.data_ptr() for o in outs)),
           "rprelu backward")
    g_si, g_slope, g_so = (o.to(shift_in.dtype) for o in outs)
    return gx, g_si, g_slope, g_so


def prebuild() -> None:
    """Build the library into the cache now and say where (``make setup`` calls this)."""
    built = _build(verbose=True)
    print(f"s2bnn training kernels: {built if built else 'not built (pure-torch path)'}")
