"""Compile a C source of this package once into a shared library cache, and load it with ctypes.

Used by the packed deploy runtime (:mod:`s2bnn.deploy._build`) and the training kernels
(:mod:`s2bnn.nn._kernels`). A library is built with the system C compiler (``$CC``, else
``cc``/``gcc``/``clang``) into ``$S2BNN_CACHE`` (default ``~/.cache/s2bnn``) under a name keyed by
a hash of the source, the flags and the compiler, so a changed source or compiler rebuilds and a
second process reuses the file. Where no library can be built, the caller gets ``None`` (with one
line on stderr saying why and how to fix it) and runs its pure-torch path.
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
from collections.abc import Callable
from pathlib import Path

__all__ = ["cache_dir", "find_compiler", "library_path", "compile_cached", "load_library",
           "OnceLoaded"]


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


def library_path(source: Path, flags: list[str], cc: str, stem: str) -> Path:
    """Where the library built from ``source`` with ``flags`` by ``cc`` lives in the cache."""
    key = hashlib.sha256(
        source.read_bytes() + " ".join(flags).encode() + _compiler_id(cc).encode()
    ).hexdigest()[:16]
    return cache_dir() / f"{stem}_{key}.so"


def compile_cached(source: Path, flags: list[str], stem: str, what: str,
                   verbose: bool = False, quiet: bool = False) -> Path | None:
    """Build ``source`` into the cache if needed; the library's path, or ``None``.

    ``what`` names the library and what runs without it, for the one-line messages; ``quiet``
    leaves out the message of a failed compile (for a first try that has a fallback).
    """
    cc = find_compiler()
    if cc is None:
        print(f"s2bnn: no C compiler found (cc/gcc/clang): {what}; install one "
              "(e.g. `apt-get install gcc`) or set CC", file=sys.stderr)
        return None
    target = library_path(source, flags, cc, stem)
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=target.name + ".", suffix=".tmp", dir=target.parent)
    os.close(fd)
    cmd = [cc, *flags, "-o", tmp, str(source)]
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    except (OSError, subprocess.SubprocessError) as err:
        res = None
        msg = str(err)
    if res is None or res.returncode != 0:
        if res is not None:
            msg = (res.stderr.strip().splitlines() or ["failed"])[-1]
        Path(tmp).unlink(missing_ok=True)
        if quiet:
            return None
        print(f"s2bnn: compiling {source.name} failed ({msg}): {what}; check that "
              f"`{cc} {' '.join(flags)}` works", file=sys.stderr)
        return None
    os.replace(tmp, target)  # atomic: a concurrent build of the same source is harmless
    if verbose:
        print(f"s2bnn: built {target}", file=sys.stderr)
    return target


def load_library(path: Path, what: str) -> ctypes.CDLL | None:
    """``ctypes.CDLL(path)``, or ``None`` with one line on stderr if it cannot be loaded."""
    try:
        return ctypes.CDLL(str(path))
    except OSError as err:
        print(f"s2bnn: cannot load {path} ({err}); delete it to rebuild. {what}",
              file=sys.stderr)
        return None


class OnceLoaded:
    """A library built (``build() -> path or None``) and loaded (``load(path) -> CDLL or None``)
    on the first call, once per process and thread-safely; every call returns that result."""

    def __init__(self, build: Callable[[], Path | None],
                 load: Callable[[Path], ctypes.CDLL | None]) -> None:
        self._build, self._load = build, load
        self._lock = threading.Lock()
        self._lib: ctypes.CDLL | None = None
        self._tried = False

    def __call__(self) -> ctypes.CDLL | None:
        with self._lock:
            if not self._tried:
                self._tried = True
                path = self._build()
                self._lib = self._load(path) if path is not None else None
            return self._lib
