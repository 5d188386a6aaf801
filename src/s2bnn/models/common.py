"""Helpers shared by the backbones: input checks and strict state-dict loading."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn as nn

from s2bnn.errors import CheckpointError, ModelError, few

__all__ = ["attach_input_check", "model_in_chans", "load_backbone_state", "act_weight_quantizers"]


def _check_input(module: nn.Module, args: tuple[Any, ...]) -> None:
    x = args[0] if args else None
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ModelError(f"expected images of shape (N, C, H, W), got {shape}")
    in_chans = module.in_chans
    if x.shape[1] != in_chans:
        raise ModelError(
            f"model takes {in_chans}-channel images but got {x.shape[1]} channels; "
            f"build it with in_chans={x.shape[1]} or convert the images"
        )
    size = min(x.shape[2], x.shape[3])
    if size < module.min_image_size:
        raise ModelError(
            f"image size {x.shape[2]}x{x.shape[3]} is too small for this model; "
            f"the minimum is {module.min_image_size} px"
        )


def attach_input_check(model: nn.Module, in_chans: int, min_image_size: int = 1) -> nn.Module:
    """Record ``in_chans`` / ``min_image_size`` on ``model`` and check every input against them
    (a forward pre-hook, so state-dict keys are unchanged). Bad inputs raise ModelError."""
    model.in_chans = int(in_chans)
    model.min_image_size = int(min_image_size)
    model.register_forward_pre_hook(_check_input)
    return model


def model_in_chans(model: nn.Module, kwargs: Mapping[str, Any] | None = None) -> int | None:
    """Input channels a model takes: its ``in_chans``, its build ``kwargs``, or its first conv.

    ``None`` when none of them says (a model without a convolution).
    """
    value = getattr(model, "in_chans", None)
    if isinstance(value, int):
        return value
    if kwargs and isinstance(kwargs.get("in_chans"), int):
        return int(kwargs["in_chans"])
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            return int(module.in_channels)
    return None


def act_weight_quantizers(
    binary_act: bool, binary_weight: bool, act: str = "react_sign", real_act: str | None = None
) -> tuple[str | None, str | None]:
    """The (activation, weight) quantizer names for a binary net's mode.

    Step 1 of two-step binarization is ``binary_act=True, binary_weight=False``; step 2 (or one-step
    training) is both True; the real-valued counterpart is both False.
    """
    return (act if binary_act else real_act), ("scaled_sign" if binary_weight else None)


def load_backbone_state(
    model: nn.Module, state_dict: Mapping[str, torch.Tensor], source: str
) -> None:
    """Load ``state_dict`` into ``model`` strictly (every key, every shape).

    A DDP ``module.`` prefix on every key is dropped. Anything else that does not match raises
    :class:`CheckpointError` naming a few missing / unexpected keys and shape mismatches, so e.g. a
    step-2 run pointed at another architecture's step-1 checkpoint fails in one line.
    """
    state = dict(state_dict)
    own = model.state_dict()
    if state and all(k.startswith("module.") for k in state) and not any(
        k.startswith("module.") for k in own
    ):
        state = {k[len("module."):]: v for k, v in state.items()}
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    mismatched = [
        f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}"
        for k, v in own.items()
        if k in state and tuple(state[k].shape) != tuple(v.shape)
    ]
    if missing or unexpected or mismatched:
        parts = []
        # Three names each, in the model's key order: the message names where loading broke.
        for label, names in (("missing key(s)", missing), ("unexpected key(s)", unexpected),
                             ("shape mismatch(es) (file vs model)", mismatched)):
            if names:
                parts.append(f"{len(names)} {label}: {few(names, 3, sort=False)}")
        raise CheckpointError(
            f"weights from {source} do not fit this model ({'; '.join(parts)}); "
            "check that the architecture and its arguments match the checkpoint"
        )
    model.load_state_dict(state, strict=True)


class PooledBackbone(nn.Module):
    """``stem -> blocks -> global average pool [-> fc]``, the shape of every small backbone here.

    Subclasses build ``self.stem`` and ``self.blocks``, then call :meth:`_finish`, which adds the
    pool and the optional classifier and sets ``feature_dim``.
    """

    stem: nn.Module
    blocks: nn.Module

    def _finish(self, feature_dim: int, num_classes: int, in_chans: int,
                channels_last: bool) -> None:
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.feature_dim = feature_dim
        self.fc = nn.Linear(feature_dim, num_classes) if num_classes > 0 else None
        if channels_last:
            # Conv weights in NHWC make every activation NHWC too: oneDNN convolutions and
            # BatchNorm are markedly faster on CPU in that layout (same results, same state dict).
            self.to(memory_format=torch.channels_last)
        attach_input_check(self, in_chans)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled features ``(N, feature_dim)``."""
        return self.pool(self.blocks(self.stem(x))).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = self.forward_features(x)
        return feats if self.fc is None else self.fc(feats)
