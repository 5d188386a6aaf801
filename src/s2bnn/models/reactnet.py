"""ReActNet-A (Liu et al., ECCV 2020) and its small-image variant.

Layout (MobileNetV1 channels, full 3x3 convolutions): a real 3x3 stride-2 conv + BN, then 13
blocks with outputs 64, 128, 128, 256, 256, 512 x 6, 1024, 1024 (x ``width_mult``), stride 2 where
channels go 64->128, 128->256, 256->512, 512->1024; average pooling and a real fc.

Each block (``cin -> cout``)::

    y = RPReLU(BN(conv3x3(RSign(x))) + shortcut(x))   # shortcut: x, or AvgPool2d(2) if stride 2
    z = RPReLU(BN(conv1x1(RSign(y))) + y')            # y' = y, or cat(y, y) if cout == 2 cin

Where channels double, the published network runs two ``cin -> cin`` 1x1 convs, each with its own
BN and the shortcut ``y``, and concatenates them. One ``cin -> 2 cin`` conv followed by one BN over
``2 cin`` channels and the shortcut ``cat(y, y)`` is the same function with the same parameter count
(the scale alpha is per output channel, BN is per channel), and runs as one matrix product.
Average pooling uses ``ceil_mode`` so odd sizes (7x7 at 28 px) keep the conv's output shape; for the
even sizes of the 224 px network it is the published 2x2 pooling.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch import Tensor

from s2bnn.errors import ModelError
from s2bnn.models.common import PooledBackbone, act_weight_quantizers
from s2bnn.models.registry import register_model
from s2bnn.nn import QuantConv2d, RPReLU, RSign

__all__ = ["ReActNet", "ReActBlock", "reactnet_a", "reactnet_small", "reactnet_compact"]


class ReActBlock(nn.Module):
    """One ReActNet-A block; see the module docstring."""

    def __init__(
        self, cin: int, cout: int, stride: int, act_q: str | None, weight_q: str | None,
        prelu_init: float = 0.25,
    ) -> None:
        super().__init__()
        if cout not in (cin, 2 * cin):
            raise ModelError(f"ReActNet block needs cout == cin or 2*cin, got {cin}->{cout}")
        self.conv3 = QuantConv2d(
            cin, cin, 3, stride, 1,
            input_quantizer=RSign(cin, act_q), weight_quantizer=weight_q,
        )
        self.bn1 = nn.BatchNorm2d(cin)
        # Only created where the forward uses it.
        self.pool = nn.AvgPool2d(2, 2, ceil_mode=True) if stride == 2 else None
        self.act1 = RPReLU(cin, prelu_init)
        self.conv1 = QuantConv2d(
            cin, cout, 1, input_quantizer=RSign(cin, act_q), weight_quantizer=weight_q
        )
        self.bn2 = nn.BatchNorm2d(cout)
        self.act2 = RPReLU(cout, prelu_init)
        self.duplicate = cout == 2 * cin

    def forward(self, x: Tensor) -> Tensor:
        shortcut = x if self.pool is None else self.pool(x)
        y = self.act1(self.bn1(self.conv3(x)) + shortcut)
        shortcut = torch.cat((y, y), dim=1) if self.duplicate else y
        return self.act2(self.bn2(self.conv1(y)) + shortcut)


class ReActNet(PooledBackbone):
    """ReActNet-A backbone; ``forward`` returns logits, or pooled features if ``num_classes == 0``.

    Args:
        num_classes: size of the real fc head; 0 for a feature extractor (``feature_dim`` wide).
        in_chans: input channels.
        binary_act / binary_weight: quantize activations (RSign) / weights (alpha * sign).
            Step 1 of two-step training: (True, False); step 2: (True, True); real-valued
            counterpart: (False, False). Parameter names are the same in every mode.
        width_mult: multiplies every width (base 32 in the stem).
        stem_stride: stride of the first conv (2 as published; 1 keeps full resolution).
        mid_blocks: number of stride-1 blocks at 512 x ``width_mult`` channels (5 as published).
        channels_last: keep weights and activations NHWC (faster on CPU; same results).
        prelu_init: initial slope of every RPReLU (0.25, PyTorch's PReLU default, as published).
        tail_stride: stride of the last stage's first block (2 as published; 1 keeps the last
            stage at the previous stage's resolution, e.g. 2x2 instead of 1x1 at 28 px).
        tail_blocks: blocks in the last stage (2 as published; 0 ends the network on the
            previous stage, e.g. at 2x2 instead of 1x1 at 28 px).
        max_channels: cap on every block's width (None: none, as published). A stage whose
            doubling would pass it keeps its input width (its first block only downsamples), so
            a wide early network need not pay for 4x wider late stages.
    """

    def __init__(
        self,
        num_classes: int = 0,
        in_chans: int = 3,
        binary_act: bool = True,
        binary_weight: bool = True,
        width_mult: float = 1.0,
        stem_stride: int = 2,
        mid_blocks: int = 5,
        channels_last: bool = True,
        prelu_init: float = 0.25,
        tail_stride: int = 2,
        max_channels: int | None = None,
        tail_blocks: int = 2,
    ) -> None:
        super().__init__()
        if (max_channels is not None and max_channels < 1) or tail_blocks < 0:
            raise ModelError("ReActNet needs max_channels >= 1 or None and tail_blocks >= 0 "
                             f"(got {max_channels}, {tail_blocks})")
        if (width_mult <= 0 or stem_stride not in (1, 2) or tail_stride not in (1, 2)
                or mid_blocks < 0 or num_classes < 0):
            raise ModelError(
                "ReActNet needs width_mult > 0, stem_stride and tail_stride 1 or 2, mid_blocks "
                f">= 0 and num_classes >= 0 (got {width_mult}, {stem_stride}, {tail_stride}, "
                f"{mid_blocks}, {num_classes})"
            )
        act_q, weight_q = act_weight_quantizers(binary_act, binary_weight)
        c = max(1, round(32 * width_mult))
        # (multiple of c out, stride); each stage's first block doubles the channels (unless
        # max_channels holds them).
        plan = [(2, 1), (4, 2), (4, 1), (8, 2), (8, 1), (16, 2)]
        plan += [(16, 1)] * mid_blocks
        plan += [(32, tail_stride)] + [(32, 1)] * (tail_blocks - 1) if tail_blocks else []
        self.stem = nn.Sequential(
            nn.Conv2d(in_chans, c, 3, stem_stride, 1, bias=False), nn.BatchNorm2d(c)
        )
        blocks, cin = [], c
        for mult, stride in plan:
            cout = c * mult if max_channels is None or c * mult <= max_channels else cin
            blocks.append(ReActBlock(cin, cout, stride, act_q, weight_q, prelu_init))
            cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.binary_act, self.binary_weight = binary_act, binary_weight
        self._finish(cin, num_classes, in_chans, channels_last)


@register_model("reactnet_a")
def reactnet_a(
    num_classes: int = 0,
    in_chans: int = 3,
    binary_act: bool = True,
    binary_weight: bool = True,
    width_mult: float = 1.0,
    stem_stride: int = 2,
    mid_blocks: int = 5,
    channels_last: bool = True,
    prelu_init: float = 0.25,
    tail_stride: int = 2,
    max_channels: int | None = None,
    tail_blocks: int = 2,
) -> ReActNet:
    """ReActNet-A as published (224 px ImageNet layout)."""
    return ReActNet(
        num_classes, in_chans, binary_act, binary_weight, width_mult, stem_stride, mid_blocks,
        channels_last, prelu_init, tail_stride, max_channels, tail_blocks,
    )


@register_model("reactnet_small")
def reactnet_small(
    num_classes: int = 0,
    in_chans: int = 1,
    binary_act: bool = True,
    binary_weight: bool = True,
    width_mult: float = 0.25,
    stem_stride: int = 2,
    mid_blocks: int = 5,
    channels_last: bool = True,
    prelu_init: float = 1.0,
    tail_stride: int = 2,
    max_channels: int | None = None,
    tail_blocks: int = 2,
) -> ReActNet:
    """ReActNet-A layout at 1/4 width for 28-32 px images (the paper comparisons' student; 1 ch).

    Unlike ReActNet-A, its RPReLU slopes start at 1 (the identity), not PReLU's 0.25: with 0.25
    the untrained residual stream drifts positive and by the last blocks most sign inputs are +1
    (docs/TEACHER_STUDY.md, section 4); students distilled from the same teacher in the same time
    scored 0.6-1.1 points higher linear top-1 with slope 1 on each of three paired runs.
    """
    return ReActNet(
        num_classes, in_chans, binary_act, binary_weight, width_mult, stem_stride, mid_blocks,
        channels_last, prelu_init, tail_stride, max_channels, tail_blocks,
    )


@register_model("reactnet_compact")
def reactnet_compact(
    num_classes: int = 0,
    in_chans: int = 1,
    binary_act: bool = True,
    binary_weight: bool = True,
    width_mult: float = 0.75,
    stem_stride: int = 2,
    mid_blocks: int = 0,
    channels_last: bool = True,
    prelu_init: float = 1.0,
    tail_stride: int = 2,
    max_channels: int | None = None,
    tail_blocks: int = 0,
) -> ReActNet:
    """ReActNet-A's blocks re-proportioned for 28-32 px images on a CPU budget (the demo student).

    Three times ``reactnet_small``'s width at every resolution it keeps (24 ... 384 channels), no
    middle blocks and no last stage, so at 28 px it ends on the 2x2 map instead of running seven
    blocks on 2x2 and 1x1 maps, where a 3x3 convolution mostly multiplies padding. A training
    step costs about 1.5x ``reactnet_small``'s; distilled from the same teacher for the same
    150 s it scored 2.6-3.4 points higher linear top-1 on two seeds (docs/TEACHER_STUDY.md,
    round 4), with 57 % of the parameters (1.01 M at 1 input channel). RPReLU slopes start at
    1, as in ``reactnet_small``.
    """
    return ReActNet(
        num_classes, in_chans, binary_act, binary_weight, width_mult, stem_stride, mid_blocks,
        channels_last, prelu_init, tail_stride, max_channels, tail_blocks,
    )
