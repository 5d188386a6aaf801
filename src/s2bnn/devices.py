"""Where and in what precision to compute: the device a config names, and its autocast policy."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch

from s2bnn import distributed as D
from s2bnn.errors import ConfigError

__all__ = ["resolve_device", "autocast_context"]


def resolve_device(pref: str | torch.device | None = "auto") -> torch.device:
    """The device ``pref`` names: ``auto`` (or ``None``) -> this rank's GPU when CUDA is
    available, else the CPU; ``cuda`` -> this rank's GPU; ``cuda:N``, ``cpu`` or a
    ``torch.device`` as given. An unknown or absent device is a one-line :class:`ConfigError`."""
    if isinstance(pref, torch.device):
        pref = str(pref)
    if pref is None or pref == "auto":
        pref = "cuda" if torch.cuda.is_available() else "cpu"
    if pref == "cpu":
        return torch.device("cpu")
    if pref.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(
                f"device={pref} but no CUDA device is visible; use device=cpu or device=auto"
            )
        if pref == "cuda":
            return torch.device("cuda", D.local_rank())
        try:
            dev = torch.device(pref)
        except RuntimeError:
            raise ConfigError(
                f"config key 'device' is '{pref}'; use auto, cpu, cuda or cuda:N"
            ) from None
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ConfigError(
                f"device={pref} but only {torch.cuda.device_count()} CUDA device(s) are visible"
            )
        return dev
    raise ConfigError(f"config key 'device' is '{pref}'; allowed values: auto, cpu, cuda, cuda:N")


def autocast_context(
    precision: str, device: torch.device, cpu_flags: frozenset[str] | set[str] | None = None
) -> Callable[[], Any]:
    """A factory of the autocast context for ``precision`` on ``device`` (bf16 needs no scaler).

    ``auto`` trains under bf16 autocast only where the hardware computes bf16 natively: a GPU
    with bf16, or a CPU whose flags (``/proc/cpuinfo``; ``cpu_flags`` injects them, for tests)
    include ``avx512_bf16`` or ``amx_bf16``. Elsewhere (e.g. AVX2-only CPUs, where bf16 is
    emulated and slower) it is fp32, the reference's precision.
    """
    if precision == "bf16":
        if device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise ConfigError("precision=bf16 but this GPU has no bf16 support; use precision=fp32")
        return lambda: torch.autocast(device.type, dtype=torch.bfloat16)
    if precision == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported():
        return lambda: torch.autocast("cuda", dtype=torch.bfloat16)
    if precision == "auto" and device.type == "cpu":
        if cpu_flags is None:
            try:
                with open("/proc/cpuinfo") as fh:
                    line = next((ln for ln in fh if ln.startswith("flags")), "")
                cpu_flags = frozenset(line.partition(":")[2].split())
            except OSError:
                cpu_flags = frozenset()
        if {"avx512_bf16", "amx_bf16"} & set(cpu_flags):
            return lambda: torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext
