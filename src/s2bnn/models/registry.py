"""A registry from a model name to a builder (timm-style).

Every builder returns an ``nn.Module`` with an integer attribute ``feature_dim``: the size of the
pooled feature vector its ``forward`` returns when ``num_classes == 0``.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch.nn as nn

from s2bnn.errors import ModelError

Builder = Callable[..., nn.Module]
_REGISTRY: dict[str, Builder] = {}


def register_model(name: str) -> Callable[[Builder], Builder]:
    """Decorator: make ``fn`` buildable as ``build_model(name, **kwargs)``."""

    def deco(fn: Builder) -> Builder:
        if name in _REGISTRY:
            raise ValueError(f"model '{name}' registered twice")
        _REGISTRY[name] = fn
        return fn

    return deco


def list_models(include_private: bool = False) -> list[str]:
    """The names ``build_model`` accepts, sorted.

    Names starting with ``_`` are private (e.g. tiny models that tests register) and are listed
    only with ``include_private``, so test helpers never leak into user-facing lists.
    """
    return sorted(n for n in _REGISTRY if include_private or not n.startswith("_"))


def build_model(name: str, **kwargs: Any) -> nn.Module:
    """Build a registered model; unknown names and arguments raise :class:`ModelError`."""
    if name not in _REGISTRY:
        raise ModelError(f"unknown model '{name}'; known models: {', '.join(list_models())}")
    fn = _REGISTRY[name]
    params = inspect.signature(fn).parameters
    if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
        unknown = sorted(set(kwargs) - set(params))
        if unknown:
            raise ModelError(
                f"model '{name}' does not take argument(s) {', '.join(unknown)}; "
                f"it takes: {', '.join(params)}"
            )
    model = fn(**kwargs)
    if not isinstance(getattr(model, "feature_dim", None), int):
        raise TypeError(f"builder of '{name}' returned a model without an int feature_dim")
    return model
