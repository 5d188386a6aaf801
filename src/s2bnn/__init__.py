"""s2bnn: train small and 1-bit networks without labels by distilling a self-supervised teacher."""

__version__ = "0.1.0"
