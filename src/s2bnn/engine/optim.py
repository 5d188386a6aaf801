"""Optimisers, parameter groups and per-step learning-rate schedules.

Plain arguments only (no ``Config``), so these pieces can be tested and reused on their own.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.nn as nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

from s2bnn.errors import ConfigError

__all__ = [
    "param_groups",
    "LARS",
    "build_optimizer",
    "lr_factor",
    "build_scheduler",
]

_NORM_TYPES = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)


def _is_binary_weight(module: nn.Module, name: str) -> bool:
    # Quantized layers (s2bnn.nn) say whether their weight is binarised; its latent real weights
    # only feed sign(), so decaying them towards 0 just makes signs flip more often.
    return name == "weight" and getattr(module, "binary_weight", False) is True


def param_groups(
    model: nn.Module,
    weight_decay: float,
    exclude_bn_bias: bool = True,
    exclude_binary: bool = False,
) -> list[dict[str, Any]]:
    """Split the trainable parameters of ``model`` into a decayed and a non-decayed group.

    With ``exclude_bn_bias``, normalisation parameters, biases and every parameter with fewer than
    two dimensions (scales, PReLU slopes, learnable thresholds) get no weight decay; with
    ``exclude_binary`` neither do the latent weights of binary layers. Frozen parameters
    (``requires_grad=False``, e.g. a teacher) are left out. The non-decayed group is marked
    ``lars_exclude`` so LARS does not adapt its learning rate either.
    """
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    seen: set[int] = set()
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            skip = exclude_bn_bias and (
                isinstance(module, _NORM_TYPES) or name.endswith("bias") or p.ndim <= 1
            )
            skip = skip or (exclude_binary and _is_binary_weight(module, name))
            (no_decay if skip else decay).append(p)
    groups: list[dict[str, Any]] = []
    if decay:
        groups.append({"params": decay, "weight_decay": weight_decay, "lars_exclude": False})
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0, "lars_exclude": True})
    return groups


class LARS(Optimizer):
    """SGD with momentum and layer-wise adaptive rate scaling (You et al., 2017).

    Each parameter's update is ``g + wd * w`` scaled by the trust ratio
    ``eta * ||w|| / ||g + wd * w||`` (1 when either norm is 0); groups marked ``lars_exclude``
    (biases, normalisation) use plain SGD with momentum.
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        eta: float = 0.001,
    ) -> None:
        if lr < 0 or momentum < 0 or weight_decay < 0 or eta <= 0:
            raise ValueError("LARS needs lr, momentum, weight_decay >= 0 and eta > 0")
        defaults = {
            "lr": lr, "momentum": momentum, "weight_decay": weight_decay, "eta": eta,
            "lars_exclude": False,
        }
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # noqa: D102
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                update = p.grad
                if group["weight_decay"]:
                    update = update.add(p, alpha=group["weight_decay"])
                if not group["lars_exclude"]:
                    w_norm = torch.linalg.vector_norm(p)
                    u_norm = torch.linalg.vector_norm(update)
                    trust = torch.where(
                        (w_norm > 0) & (u_norm > 0),
                        group["eta"] * w_norm / u_norm,
                        torch.ones_like(w_norm),
                    )
                    update = update.mul(trust)
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = update.clone()
                else:
                    state["momentum_buffer"].mul_(group["momentum"]).add_(update)
                p.add_(state["momentum_buffer"], alpha=-group["lr"])
        return loss


def _fusable(groups: list[dict]) -> bool | None:
    """True where torch's fused Adam takes every parameter (floating point, on CPU or CUDA),
    else None (torch's default implementation)."""
    params = [p for g in groups for p in g["params"]]
    ok = all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)
    return True if ok and params else None


def build_optimizer(
    model: nn.Module,
    name: str,
    lr: float,
    weight_decay: float = 0.0,
    momentum: float = 0.9,
    betas: tuple[float, float] | list[float] = (0.9, 0.999),
    exclude_bn_bias: bool = True,
    exclude_binary: bool = False,
    lars_eta: float = 0.001,
) -> Optimizer:
    """``adam`` (Adam with L2 weight decay, as S2-BNN), ``sgd`` (momentum) or ``lars``."""
    groups = param_groups(model, weight_decay, exclude_bn_bias, exclude_binary)
    if not groups:
        raise ConfigError("the model has no trainable parameters; check the method/model config")
    if name == "adam":
        if len(betas) != 2:
            raise ConfigError(f"config key 'optim.betas' must hold two numbers, got {list(betas)}")
        # One fused kernel for every parameter instead of a handful of torch ops per tensor:
        # 2.7x as fast for the demo student's 91 tensors on 2 CPU cores, about 3 % of its step
        # (benchmarks/bench_kernels.py); the same Adam update.
        return torch.optim.Adam(groups, lr=lr, betas=(float(betas[0]), float(betas[1])),
                                fused=_fusable(groups))
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum)
    if name == "lars":
        return LARS(groups, lr=lr, momentum=momentum, eta=lars_eta)
    raise ConfigError(f"config key 'optim.name' is '{name}'; allowed values: adam, sgd, lars")


def lr_factor(
    step: int, total_steps: int, warmup_steps: int, schedule: str, min_ratio: float = 0.0
) -> float:
    """Multiplier of the base learning rate before optimiser step ``step`` (0-based).

    Linear warm-up from ``1/warmup_steps`` to 1 over ``warmup_steps``, then ``linear`` decay
    (S2-BNN's schedule), half-``cosine`` decay, or ``constant``, reaching ``min_ratio``
    (min_lr / lr) at ``total_steps``.
    """
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, max(0.0, (step - warmup_steps) / span))
    if schedule == "linear":
        shape = 1.0 - progress
    elif schedule == "cosine":
        shape = 0.5 * (1.0 + math.cos(math.pi * progress))
    else:
        raise ConfigError(
            f"config key 'optim.schedule' is '{schedule}'; allowed values: linear, cosine, constant"
        )
    return min_ratio + (1.0 - min_ratio) * shape


def build_scheduler(
    optimizer: Optimizer,
    total_steps: int,
    warmup_steps: int,
    schedule: str,
    base_lr: float,
    min_lr: float = 0.0,
) -> LambdaLR:
    """A per-step ``LambdaLR`` following :func:`lr_factor`; call ``.step()`` after each step."""
    lr_factor(0, total_steps, warmup_steps, schedule)  # validate the name now, not mid-run
    return LambdaLR(optimizer, _factor_of(total_steps, warmup_steps, schedule, base_lr, min_lr))


def stretch_scheduler(scheduler: LambdaLR, total_steps: int, warmup_steps: int, schedule: str,
                      base_lr: float, min_lr: float = 0.0) -> None:
    """Make ``scheduler`` (from :func:`build_scheduler`) end at ``total_steps`` from its current
    step on. The factors are plain functions, so a checkpoint does not keep them: a resumed run
    rebuilds them from its own total, as here."""
    factor = _factor_of(total_steps, warmup_steps, schedule, base_lr, min_lr)
    scheduler.lr_lambdas = [factor for _ in scheduler.lr_lambdas]


def _factor_of(total_steps: int, warmup_steps: int, schedule: str, base_lr: float,
               min_lr: float) -> Callable[[int], float]:
    min_ratio = min_lr / base_lr if base_lr > 0 else 0.0
    return lambda step: lr_factor(step, total_steps, warmup_steps, schedule, min_ratio)
