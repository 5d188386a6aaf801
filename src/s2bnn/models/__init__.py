"""Backbones: binary and real-valued, built by name through the registry."""

from s2bnn.models.registry import build_model, list_models, register_model

__all__ = ["build_model", "list_models", "register_model"]
