"""Deploy a trained binary network: bit-packed CPU inference, a packed file, ONNX export.

``pack(model) -> PackedModel``; ``PackedModel(x)`` returns what ``model.eval()(x)`` returns;
``PackedModel.save(path)`` / ``load(path)``. See docs/DEPLOY.md. Only the CLI and the demo
import this package; the runtime (:mod:`s2bnn.deploy.runtime`) needs nothing of the training
code.
"""

from __future__ import annotations

from typing import Any

import torch.nn as nn

from s2bnn.deploy.runtime import FORMAT, VERSION, PackedModel, load

__all__ = ["pack", "load", "PackedModel", "FORMAT", "VERSION"]


def pack(model: nn.Module, *, isa: str = "auto", num_threads: int | None = None,
         meta: dict[str, Any] | None = None) -> PackedModel:
    """Lower ``model`` (its eval forward) to a :class:`PackedModel`.

    Binary convolutions (binary input and weights) become XNOR/popcount kernels with sign bits
    packed along input channels; BatchNorm, the weight scale, RSign thresholds, RPReLU and residual
    adds fold into their per-channel epilogues; everything else stays float. ``meta`` (JSON-able:
    preprocessing, class names, source) is stored in the file.
    """
    from s2bnn.deploy.lower import lower_model

    graph, tensors = lower_model(model)
    graph["meta"] = dict(meta or {})
    return PackedModel(graph, tensors, isa=isa, num_threads=num_threads)
