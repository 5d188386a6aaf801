"""The training engine: one loop for every method (``train``), optimisers and schedules."""

from s2bnn.engine.trainer import Parts, build_parts, train

__all__ = ["Parts", "build_parts", "train"]
