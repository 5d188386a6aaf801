"""Self-supervised methods: one small class per method over :class:`Method`, in a registry.

* ``mocov2`` -- strategy 1: MoCo v2 on the student itself (:mod:`.mocov2`).
* ``s2bnn`` -- strategy 3: distillation from a frozen (or online) real-valued teacher;
  strategy 2 with ``contrastive_weight > 0`` (:mod:`.s2bnn`).
* ``seed`` -- SEED (:mod:`.seed`); ``dino`` -- DINO (:mod:`.dino`).

Each class validates its own ``method.*`` keys and builds itself from them
(:mod:`.registry`); :func:`build_method` turns a :class:`s2bnn.config.MethodConfig` into a
method. Momentum encoders are :mod:`.momentum`'s, the multi-view distillation average
:func:`~s2bnn.methods.base.distill_over_views`.
"""

from __future__ import annotations

from s2bnn.methods.base import Method, mlp_head, queue_length
from s2bnn.methods.dino import DINO
from s2bnn.methods.mocov2 import MoCoV2
from s2bnn.methods.registry import (
    build_method,
    check_method_config,
    method_names,
    register_method,
    views_needed,
)
from s2bnn.methods.s2bnn import S2BNN
from s2bnn.methods.seed import SEED

__all__ = ["Method", "MoCoV2", "S2BNN", "SEED", "DINO", "METHODS", "build_method",
           "check_method_config", "method_names", "register_method", "views_needed",
           "mlp_head", "queue_length"]

# Registration order: the order methods are listed in messages.
METHODS = method_names()
