"""Binary ResNet-18s: Bi-Real-Net-18 (Liu et al., ECCV 2018) and an XNOR-Net-style ResNet-18.

Both keep the first conv and the fc real, binarize every 3x3 conv (alpha * sign(W) weights, sign
activations) and downsample the shortcut with a real 1x1 conv + BN.

- Bi-Real-Net-18: a real shortcut around *every* binary conv, ``x -> BN(conv3x3(sign(x))) + sc(x)``,
  with ``sc`` = identity, or AvgPool2d(2) -> real conv1x1 -> BN where the shape changes.
  Activations use the polynomial ApproxSign gradient of the Bi-Real paper (``act="react_sign"``);
  ``act="ste_sign"`` gives the hardtanh straight-through gradient instead.
- XNOR ResNet-18: the standard ResNet basic block (shortcut around *two* convs, stride-2 real
  conv1x1 + BN downsample), each conv preceded by a sign with the hardtanh gradient.

Real-valued counterparts (``binary_act=False``) replace each sign by hardtanh, its gradient's own
forward function, so the network stays non-linear and keeps the same parameter names.
Stems (no ReLU: a sign follows): ``stem_stride=4`` (default) is the ImageNet 7x7 stride-2
conv + BN + 3x3 max-pool;
``stem_stride`` 1 or 2 is a 3x3 conv + BN with that stride and no pooling, for small images.
"""

from __future__ import annotations

import torch.nn as nn
from torch import Tensor

from s2bnn.errors import ModelError
from s2bnn.models.common import PooledBackbone, act_weight_quantizers
from s2bnn.models.registry import register_model
from s2bnn.nn import QuantConv2d

__all__ = ["BinaryResNet", "birealnet18", "xnor_resnet18"]


def _stem(in_chans: int, width: int, stem_stride: int) -> nn.Sequential:
    # No ReLU: the first binary conv signs the stem's output, and sign(relu(x)) is all +1.
    if stem_stride == 4:
        layers: list[nn.Module] = [nn.Conv2d(in_chans, width, 7, 2, 3, bias=False)]
    elif stem_stride in (1, 2):
        layers = [nn.Conv2d(in_chans, width, 3, stem_stride, 1, bias=False)]
    else:
        raise ModelError(f"stem_stride must be 1, 2 or 4, got {stem_stride}")
    layers.append(nn.BatchNorm2d(width))
    if stem_stride == 4:
        layers.append(nn.MaxPool2d(3, 2, 1))
    return nn.Sequential(*layers)


class BiRealUnit(nn.Module):
    """``BN(binary conv3x3(sign(x))) + shortcut(x)``."""

    def __init__(self, cin: int, cout: int, stride: int, act_q: str | None, w_q: str | None):
        super().__init__()
        self.conv = QuantConv2d(
            cin, cout, 3, stride, 1, input_quantizer=act_q, weight_quantizer=w_q
        )
        self.bn = nn.BatchNorm2d(cout)
        self.shortcut: nn.Module | None = None
        if stride != 1 or cin != cout:
            layers: list[nn.Module] = []
            if stride != 1:
                layers.append(nn.AvgPool2d(stride, stride, ceil_mode=True))
            layers += [nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout)]
            self.shortcut = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        sc = x if self.shortcut is None else self.shortcut(x)
        return self.bn(self.conv(x)) + sc


class XnorBlock(nn.Module):
    """ResNet basic block with binary convs: ``BN(conv(sign(BN(conv(sign(x)))))) + shortcut``."""

    def __init__(self, cin: int, cout: int, stride: int, act_q: str | None, w_q: str | None):
        super().__init__()
        self.conv1 = QuantConv2d(
            cin, cout, 3, stride, 1, input_quantizer=act_q, weight_quantizer=w_q
        )
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = QuantConv2d(cout, cout, 3, 1, 1, input_quantizer=act_q, weight_quantizer=w_q)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut: nn.Module | None = None
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: Tensor) -> Tensor:
        sc = x if self.shortcut is None else self.shortcut(x)
        return self.bn2(self.conv2(self.bn1(self.conv1(x)))) + sc


class BinaryResNet(PooledBackbone):
    """A binary ResNet-18-like backbone (``style`` "bireal" or "xnor"); see the module docstring.

    ``channels_last`` keeps weights and activations NHWC (faster on CPU). ``layers`` gives
    basic blocks per stage (2, 2, 2, 2 for ResNet-18); a Bi-Real basic block is
    two shortcut-wrapped units. ``forward`` returns logits, or pooled features if
    ``num_classes == 0``.
    """

    def __init__(
        self,
        style: str,
        num_classes: int = 0,
        in_chans: int = 3,
        binary_act: bool = True,
        binary_weight: bool = True,
        width_mult: float = 1.0,
        stem_stride: int = 4,
        layers: tuple[int, ...] | list[int] = (2, 2, 2, 2),
        act: str = "react_sign",
        channels_last: bool = True,
    ) -> None:
        super().__init__()
        if width_mult <= 0 or num_classes < 0 or not layers or min(layers) < 1:
            raise ModelError(
                f"{style} ResNet needs width_mult > 0, num_classes >= 0 and >= 1 block per stage "
                f"(got {width_mult}, {num_classes}, {list(layers)})"
            )
        act_q, w_q = act_weight_quantizers(binary_act, binary_weight, act, real_act="hardtanh")
        base = max(1, round(64 * width_mult))
        self.stem = _stem(in_chans, base, stem_stride)
        blocks: list[nn.Module] = []
        cin = base
        for stage, n in enumerate(layers):
            cout = base * 2**stage
            for i in range(n):
                stride = 2 if stage > 0 and i == 0 else 1
                if style == "bireal":
                    blocks.append(BiRealUnit(cin, cout, stride, act_q, w_q))
                    blocks.append(BiRealUnit(cout, cout, 1, act_q, w_q))
                else:
                    blocks.append(XnorBlock(cin, cout, stride, act_q, w_q))
                cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.binary_act, self.binary_weight = binary_act, binary_weight
        self._finish(cin, num_classes, in_chans, channels_last)


@register_model("birealnet18")
def birealnet18(
    num_classes: int = 0,
    in_chans: int = 3,
    binary_act: bool = True,
    binary_weight: bool = True,
    width_mult: float = 1.0,
    stem_stride: int = 4,
    layers: tuple[int, ...] | list[int] = (2, 2, 2, 2),
    act: str = "react_sign",
    channels_last: bool = True,
) -> BinaryResNet:
    """Bi-Real-Net-18."""
    return BinaryResNet(
        "bireal", num_classes, in_chans, binary_act, binary_weight, width_mult, stem_stride,
        layers, act, channels_last,
    )


@register_model("xnor_resnet18")
def xnor_resnet18(
    num_classes: int = 0,
    in_chans: int = 3,
    binary_act: bool = True,
    binary_weight: bool = True,
    width_mult: float = 1.0,
    stem_stride: int = 4,
    layers: tuple[int, ...] | list[int] = (2, 2, 2, 2),
    act: str = "ste_sign",
    channels_last: bool = True,
) -> BinaryResNet:
    """XNOR-Net-style ResNet-18 (hardtanh straight-through sign)."""
    return BinaryResNet(
        "xnor", num_classes, in_chans, binary_act, binary_weight, width_mult, stem_stride,
        layers, act, channels_last,
    )
