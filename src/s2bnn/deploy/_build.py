"""Compile ``kernels.c`` once into a cache and load it with ctypes.

The library is built with the system C compiler (``$CC``, else ``cc``/``gcc``/``clang``) at
``-O3 -fopenmp -ffp-contract=off`` (no FMA contraction, so the float epilogue rounds exactly as
the pure-torch path) into ``$S2BNN_CACHE`` (default ``~/.cache/s2bnn``), under a name keyed by a
hash of the source, the flags and the compiler, so a changed source or compiler rebuilds and a
second process reuses the file. With no compiler, one line on stderr says so and how to fix it,
and :func:`kernels` returns ``None``: the runtime then runs its pure-torch path.

ISA levels: ``portable`` (plain C), ``popcnt`` (scalar 64-bit POPCNT), ``avx2`` (pshufb nibble
table), ``avx512`` (AVX-512 VPOPCNTDQ). ``$S2BNN_DEPLOY_ISA`` forces one (``torch`` forces the
pure-torch path); by default the fastest this CPU has.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

__all__ = ["kernels", "ISA_LEVELS", "available_isas", "default_isa", "build", "BconvArgs"]

SOURCE = Path(__file__).with_name("kernels.c")
FLAGS = ["-O3", "-std=c11", "-fPIC", "-shared", "-fopenmp", "-ffp-contract=off"]
ABI_VERSION = 6
ISA_LEVELS = {"portable": 0, "popcnt": 1, "avx2": 2, "avx512": 3}
ISA_ENV = "S2BNN_DEPLOY_ISA"

_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_tried = False


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


def cache_dir() -> Path:
    root = os.environ.get("S2BNN_CACHE")
    return Path(root).expanduser() if root else Path.home() / ".cache" / "s2bnn"


def find_compiler() -> str | None:
    for cand in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if cand and shutil.which(cand):
            return shutil.which(cand)
    return None


def _compiler_id(cc: str) -> str:
    try:
        out = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30)
        return out.stdout.splitlines()[0] if out.stdout else cc
    except (OSError, subprocess.SubprocessError):
        return cc


def library_path(cc: str) -> Path:
    key = hashlib.sha256(
        SOURCE.read_bytes() + " ".join(FLAGS).encode() + _compiler_id(cc).encode()
    ).hexdigest()[:16]
    return cache_dir() / f"s2bnn_kernels_{key}.so"


def build(verbose: bool = False) -> Path | None:
    """Compile the kernels into the cache if needed; the library's path, or ``None``."""
    cc = find_compiler()
    if cc is None:
        print("s2bnn: no C compiler found (cc/gcc/clang): the packed runtime uses its slow "
              "pure-torch path; install one (e.g. `apt-get install gcc`) or set CC",
              file=sys.stderr)
        return None
    target = library_path(cc)
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=target.name + ".", suffix=".tmp", dir=target.parent)
    os.close(fd)
    cmd = [cc, *FLAGS, "-o", tmp, str(SOURCE)]
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    except (OSError, subprocess.SubprocessError) as err:
        res = None
        msg = str(err)
    if res is None or res.returncode != 0:
        if res is not None:
            msg = (res.stderr.strip().splitlines() or ["failed"])[-1]
        Path(tmp).unlink(missing_ok=True)
        print(f"s2bnn: compiling the packed-runtime kernels failed ({msg}): using the slow "
              f"pure-torch path; check that `{cc} -fopenmp` works", file=sys.stderr)
        return None
    os.replace(tmp, target)  # atomic: a concurrent build of the same source is harmless
    if verbose:
        print(f"s2bnn: built {target}", file=sys.stderr)
    return target


def _load(path: Path) -> ctypes.CDLL | None:
    try:
        lib = ctypes.CDLL(str(path))
    except OSError as err:
        print(f"s2bnn: cannot load {path} ({err}); delete it to rebuild. Using the pure-torch "
              "path", file=sys.stderr)
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


def kernels() -> ctypes.CDLL | None:
    """The loaded kernel library (built on first use), or ``None`` where it cannot be built."""
    global _lib, _tried
    with _lock:
        if not _tried:
            _tried = True
            path = build()
            _lib = _load(path) if path is not None else None
        return _lib


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
