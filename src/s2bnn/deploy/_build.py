"""Compile ``kernels.c`` once into a cache and load it with ctypes.

The library is built by :mod:`s2bnn._cbuild` (the system C compiler, a cache keyed by source,
flags and compiler) at ``-O3 -fopenmp -ffp-contract=off`` (no FMA contraction, so the float
epilogue rounds exactly as the pure-torch path). With no compiler, one line on stderr says so and
how to fix it, and :func:`kernels` returns ``None``: the runtime then runs its pure-torch path.

ISA levels: ``portable`` (plain C), ``popcnt`` (scalar 64-bit POPCNT), ``avx2`` (pshufb nibble
table), ``avx512`` (AVX-512 VPOPCNTDQ). ``$S2BNN_DEPLOY_ISA`` forces one (``torch`` forces the
pure-torch path); by default the fastest this CPU has.
"""

from __future__ import annotations

import ctypes
import os
from pathlib import Path

from s2bnn import _cbuild

__all__ = ["kernels", "ISA_LEVELS", "available_isas", "default_isa", "build", "BconvArgs"]

SOURCE = Path(__file__).with_name("kernels.c")
FLAGS = ["-O3", "-std=c11", "-fPIC", "-shared", "-fopenmp", "-ffp-contract=off"]
ABI_VERSION = 6
ISA_LEVELS = {"portable": 0, "popcnt": 1, "avx2": 2, "avx512": 3}
ISA_ENV = "S2BNN_DEPLOY_ISA"


class BconvArgs(ctypes.Structure):
    _fields_ = [
        ("x", ctypes.c_void_p), ("w", ctypes.c_void_p), ("wpc", ctypes.c_void_p),
        *[(k, ctypes.c_int) for k in ("n", "h", "w_", "wd", "cin", "cout", "kh", "kw", "stride",
                                      "pad", "oh", "ow", "lp")],
        ("scale", ctypes.c_void_p), ("bias", ctypes.c_void_p),
        ("res", ctypes.c_void_p), ("res_c", ctypes.c_int),
        ("si", ctypes.c_void_p), ("slope", ctypes.c_void_p), ("so", ctypes.c_void_p),
        ("out", ctypes.c_void_p), ("thr", ctypes.c_void_p), ("out_bits", ctypes.c_void_p),
        ("dot_out", ctypes.c_void_p), ("isa", ctypes.c_int), ("nthreads", ctypes.c_int),
        ("tap2", ctypes.c_int), ("res_pool", ctypes.c_int), ("out_pool", ctypes.c_int),
    ]


WHAT = "the packed runtime uses its slow pure-torch path"


def library_path(cc: str) -> Path:
    return _cbuild.library_path(SOURCE, FLAGS, cc, "s2bnn_kernels")


def build(verbose: bool = False) -> Path | None:
    """Compile the kernels into the cache if needed; the library's path, or ``None``."""
    return _cbuild.compile_cached(SOURCE, FLAGS, "s2bnn_kernels", WHAT, verbose)


def _load(path: Path) -> ctypes.CDLL | None:
    lib = _cbuild.load_library(path, "Using the pure-torch path")
    if lib is None:
        return None
    if lib.s2d_abi_version() != ABI_VERSION:
        return None
    lib.s2d_cpu_features.restype = ctypes.c_int
    lib.s2d_max_isa.restype = ctypes.c_int
    lib.s2d_sign_pack.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int,
                                  ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_int]
    lib.s2d_sign_pack.restype = None
    lib.s2d_gemm_l1.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int]
    lib.s2d_gemm_l1.restype = ctypes.c_int64
    lib.s2d_lp_align.argtypes = [ctypes.c_int]
    lib.s2d_lp_align.restype = ctypes.c_int
    lib.s2d_bconv.argtypes = [ctypes.POINTER(BconvArgs)]
    lib.s2d_bconv.restype = ctypes.c_int
    lib.s2d_bconv_chain.argtypes = [ctypes.POINTER(ctypes.POINTER(BconvArgs)), ctypes.c_int]
    lib.s2d_bconv_chain.restype = ctypes.c_int
    return lib


_once = _cbuild.OnceLoaded(build, _load)


def kernels() -> ctypes.CDLL | None:
    """The loaded kernel library (built on first use), or ``None`` where it cannot be built."""
    return _once()


def available_isas() -> list[str]:
    """The ISA levels this machine can run, lowest first (``torch`` is always there)."""
    lib = kernels()
    if lib is None:
        return ["torch"]
    top = lib.s2d_max_isa()
    feats = lib.s2d_cpu_features()
    names = ["torch", "portable"]
    if feats & 1:
        names.append("popcnt")
    if feats & 2:
        names.append("avx2")
    if top >= 3:
        names.append("avx512")
    return names


def default_isa() -> str:
    """``$S2BNN_DEPLOY_ISA`` if set, else the fastest level available."""
    forced = os.environ.get(ISA_ENV, "").strip().lower()
    if forced:
        return forced
    names = available_isas()
    for name in ("avx512", "avx2", "popcnt", "portable"):
        if name in names:
            return name
    return "torch"


if __name__ == "__main__":  # `python -m s2bnn.deploy._build`: prebuild (make setup)
    path = build(verbose=True)
    print(f"s2bnn kernels: {path if path else 'not built (pure-torch path)'}")
