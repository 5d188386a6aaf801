"""Quantizers and quantized layers for binary networks."""

from s2bnn.nn.layers import Conv2d, QuantConv2d, QuantLinear, RPReLU, RSign
from s2bnn.nn.quantizers import (
    QUANTIZERS,
    HardTanh,
    Identity,
    Quantizer,
    ReActSign,
    ScaledSign,
    SteSign,
    get_quantizer,
    is_binary,
    react_sign,
    scaled_sign,
    ste_sign,
)

__all__ = [
    "QUANTIZERS",
    "Conv2d",
    "HardTanh",
    "Identity",
    "QuantConv2d",
    "QuantLinear",
    "Quantizer",
    "RPReLU",
    "RSign",
    "ReActSign",
    "ScaledSign",
    "SteSign",
    "get_quantizer",
    "is_binary",
    "react_sign",
    "scaled_sign",
    "ste_sign",
]
