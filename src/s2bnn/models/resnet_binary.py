"""Binary ResNet-18s: Bi-Real-Net-18 (Liu et al., ECCV 2018), XNOR-Net's ResNet-18 (Rastegari et
al., ECCV 2016) and a plain binary ResNet-18.

All keep the first conv and the fc real, binarize every 3x3 conv and downsample the shortcut with a
real 1x1 conv + BN.

- Bi-Real-Net-18: a real shortcut around *every* binary conv, ``x -> BN(conv3x3(sign(x))) + sc(x)``,
  with ``sc`` = identity, or AvgPool2d(2) -> real conv1x1 -> BN where the shape changes.
  Activations use the polynomial ApproxSign gradient of the Bi-Real paper (``act="react_sign"``);
  ``act="ste_sign"`` gives the hardtanh straight-through gradient instead.
- XNOR-Net ResNet-18: the ResNet basic block (shortcut around *two* convs) built from XNOR-Net's
  block, BNorm -> BinActiv -> BinConv (-> Pool, where there is one: ResNet downsamples by stride
  instead). With ``I = BN(x)`` (``c`` input channels) and a ``k x k`` binary conv of stride ``s``:

      A = sum_c |I_c| / c                     (mean |I| over channels, one map per image)
      K = A * k_box,  k_box = 1/(k*k) everywhere   (k x k box filter, same stride and zero padding
                                                     as the conv: one scale per output position)
      out = (sign(I) (*) sign(W)) . K . alpha,   alpha = mean |W| per output channel

  Each binary conv's input is batch-normalised first (its own BN over its ``c`` input channels);
  there is no ReLU: the sign is the non-linearity. The sign has the hardtanh straight-through
  gradient ``1_{|I| <= 1}`` of the paper; gradients flow through ``K`` as through any function of
  ``I``; ``alpha`` is detached, as everywhere in this project (``ScaledSign``).
  With ``binary_act=False`` there is no ``K`` (binary weights only: the paper's BWN).
- Plain binary ResNet-18 (``binary_resnet18_plain``): the standard basic block with a sign before
  each conv, ``BN(conv(sign(BN(conv(sign(x)))))) + shortcut``: alpha-scaled weights but no
  activation scale and no BN before the sign, so not XNOR-Net.

Real-valued counterparts (``binary_act=False``) replace each sign by hardtanh, its gradient's own
forward function, so the network stays non-linear and keeps the same parameter names.
Stems (no ReLU: a sign follows): ``stem_stride=4`` (default) is the ImageNet 7x7 stride-2
conv + BN + 3x3 max-pool;
``stem_stride`` 1 or 2 is a 3x3 conv + BN with that stride and no pooling, for small images.
"""

from __future__ import annotations

import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from s2bnn.errors import ModelError
from s2bnn.models.common import PooledBackbone, act_weight_quantizers
from s2bnn.models.registry import register_model
from s2bnn.nn import QuantConv2d

__all__ = [
    "BinaryResNet", "XnorConv", "activation_scale", "binary_resnet18_plain", "birealnet18",
    "xnor_resnet18",
]


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


class PlainBlock(nn.Module):
    """ResNet basic block with binary convs (not XNOR-Net: no K, no BN before the sign):
    ``BN(conv(sign(BN(conv(sign(x)))))) + shortcut``."""

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


def activation_scale(x: Tensor, kernel_size: int, stride: int = 1, padding: int = 0) -> Tensor:
    """XNOR-Net's activation scale ``K`` of a ``kernel_size`` conv over ``x`` (N, C, H, W).

    ``A`` = mean of ``|x|`` over channels, then ``K = A * k`` with ``k`` the ``kernel_size`` box
    filter of weights ``1/kernel_size**2``, at the conv's stride and zero padding: (N, 1, H', W'),
    one scale per output position of the conv.
    """
    a = x.abs().mean(dim=1, keepdim=True)
    return F.avg_pool2d(a, kernel_size, stride, padding, count_include_pad=True)


class XnorConv(nn.Module):
    """XNOR-Net's block: ``BN -> sign -> binary conv (alpha) -> times K``.

    ``scale_act`` multiplies by :func:`activation_scale` of the BN output (on when the input is
    binarized).
    """

    def __init__(self, cin: int, cout: int, stride: int, act_q: str | None, w_q: str | None,
                 scale_act: bool) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(cin)
        self.conv = QuantConv2d(
            cin, cout, 3, stride, 1, input_quantizer=act_q, weight_quantizer=w_q
        )
        self.scale_act = scale_act

    def forward(self, x: Tensor) -> Tensor:
        x = self.bn(x)
        y = self.conv(x)
        if self.scale_act:
            y = y * activation_scale(x, 3, self.conv.stride[0], self.conv.padding[0])
        return y


class XnorBlock(nn.Module):
    """ResNet basic block of two XNOR-Net blocks: ``XnorConv(XnorConv(x)) + shortcut(x)``."""

    def __init__(self, cin: int, cout: int, stride: int, act_q: str | None, w_q: str | None,
                 scale_act: bool) -> None:
        super().__init__()
        self.conv1 = XnorConv(cin, cout, stride, act_q, w_q, scale_act)
        self.conv2 = XnorConv(cout, cout, 1, act_q, w_q, scale_act)
        self.shortcut: nn.Module | None = None
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: Tensor) -> Tensor:
        sc = x if self.shortcut is None else self.shortcut(x)
        return self.conv2(self.conv1(x)) + sc


class BinaryResNet(PooledBackbone):
    """A binary ResNet-18-like backbone (``style`` "bireal", "xnor" or "plain"); see the module
    docstring.

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
        if style not in ("bireal", "xnor", "plain"):
            raise ModelError(f"binary ResNet style must be bireal, xnor or plain, got '{style}'")
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
                elif style == "xnor":
                    blocks.append(XnorBlock(cin, cout, stride, act_q, w_q, binary_act))
                else:
                    blocks.append(PlainBlock(cin, cout, stride, act_q, w_q))
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
    """XNOR-Net ResNet-18: BN -> sign (hardtanh STE) -> binary conv, scaled by K and alpha."""
    return BinaryResNet(
        "xnor", num_classes, in_chans, binary_act, binary_weight, width_mult, stem_stride,
        layers, act, channels_last,
    )


@register_model("binary_resnet18_plain")
def binary_resnet18_plain(
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
    """Plain binary ResNet-18: sign (hardtanh STE) -> alpha-scaled binary conv -> BN; no K."""
    return BinaryResNet(
        "plain", num_classes, in_chans, binary_act, binary_weight, width_mult, stem_stride,
        layers, act, channels_last,
    )
