"""The training engine: one loop for every method (``train``), optimisers and schedules."""

from s2bnn.engine.trainer import Parts, backbone_kwargs, build_parts, train

__all__ = ["Parts", "backbone_kwargs", "build_parts", "train"]
