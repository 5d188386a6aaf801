"""Backbones: binary and real-valued, built by name through the registry.

Importing this package registers every built-in model.
"""

from s2bnn.models import reactnet, real, resnet_binary  # noqa: F401  (registers models)
from s2bnn.models.common import load_backbone_state
from s2bnn.models.reference import convert_reference_checkpoint, load_reference_checkpoint
from s2bnn.models.registry import build_model, list_models, register_model

__all__ = ["build_model", "list_models", "load_backbone_state", "register_model",
           "load_reference_checkpoint", "convert_reference_checkpoint"]
