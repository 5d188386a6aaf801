"""Distributed data parallel: joining the process group, one plan for all ranks, the wrapper."""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn

from s2bnn import distributed as D
from s2bnn.engine.rundir import RunPlan
from s2bnn.errors import UserError

__all__ = ["init_distributed", "broadcast_plan", "convert_sync_bn", "wrap_ddp"]


def init_distributed(device: torch.device) -> bool:
    """Join the process group torchrun describes (WORLD_SIZE > 1); True when we created it."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or not dist.is_available():
        return False
    if dist.is_initialized():
        return False
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return True


def broadcast_plan(plan_fn: Callable[[], RunPlan]) -> RunPlan:
    """Rank 0 decides what to do with the run dir; every rank gets the same answer or error."""
    payload: list[Any] = [None]
    if D.is_main_process():
        try:
            payload[0] = ("ok", plan_fn())
        except UserError as err:
            payload[0] = ("error", (type(err), str(err)))
    if D.is_distributed():
        dist.broadcast_object_list(payload, src=0)
    kind, value = payload[0]
    if kind == "error":
        cls, msg = value
        raise cls(msg)
    return value


def convert_sync_bn(module: nn.Module) -> nn.Module:
    """SyncBatchNorm for every BatchNorm in training mode.

    The frozen teacher is kept in eval mode by its method, so it keeps plain BatchNorm (it
    uses running statistics and has nothing to synchronise); momentum encoders are in training
    mode and are converted too, as in MoCo's SyncBN variant.
    """
    for name, child in module.named_children():
        if not child.training:
            continue
        if isinstance(child, nn.modules.batchnorm._BatchNorm):
            setattr(module, name, nn.SyncBatchNorm.convert_sync_batchnorm(child))
        else:
            convert_sync_bn(child)
    return module


def wrap_ddp(method: nn.Module, device: torch.device) -> nn.Module:
    """``method`` under DDP, leaving alone what the method says no optimiser touches (frozen
    teacher, momentum copies, queues), which DDP would otherwise broadcast every step."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    ignored = list(getattr(method, "ddp_ignored_names", list)())
    if ignored:
        DDP._set_params_and_buffers_to_ignore_for_model(method, ignored)
    # channels_last 1x1 conv weights get canonically strided gradients; DDP then copies them
    # into its bucket (cheap, correct) and would warn about it on every run.
    warnings.filterwarnings("ignore", message="Grad strides do not match bucket view")
    return DDP(method, device_ids=[device.index] if device.type == "cuda" else None,
               gradient_as_bucket_view=True)
