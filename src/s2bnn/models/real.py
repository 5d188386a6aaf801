"""Real-valued backbones: torchvision models by name and a small ResNet for 28-32 px images.

torchvision models are built with ``weights=None`` (nothing is ever downloaded) and keep
torchvision's parameter names, so torchvision / MoCo state dicts load into them. ``num_classes=0``
replaces the classifier by an identity: ``forward`` then returns the globally pooled last feature
map (``feature_dim``: 512 / 2048 for ResNet-18,34 / 50, 1280 for MobileNetV2, 576 / 960 for
MobileNetV3 small / large). ``small_input=True`` makes the stem a 3x3 stride-1 conv without
max-pooling (CIFAR-style), ``in_chans`` replaces the first conv for 1-channel images.
"""

from __future__ import annotations

from collections.abc import Callable

import torch.nn as nn
from torch import Tensor

from s2bnn.errors import ModelError
from s2bnn.models.common import PooledBackbone, attach_input_check
from s2bnn.models.registry import register_model
from s2bnn.nn import Conv2d

__all__ = ["ResNetSmall", "resnet_small", "torchvision_model"]


def _replace_conv(conv: nn.Conv2d, in_chans: int, kernel: int | None, stride: int | None):
    k = conv.kernel_size[0] if kernel is None else kernel
    s = conv.stride[0] if stride is None else stride
    return nn.Conv2d(in_chans, conv.out_channels, k, s, k // 2, bias=conv.bias is not None)


def torchvision_model(
    arch: str, num_classes: int = 0, in_chans: int = 3, small_input: bool = False
) -> nn.Module:
    """A torchvision classification model by name, adapted as described in the module docstring."""
    import torchvision.models as tvm  # lazily: importing torchvision costs seconds

    ctor: Callable[..., nn.Module] = getattr(tvm, arch)
    if num_classes < 0 or in_chans < 1:
        raise ModelError(f"{arch} needs num_classes >= 0 and in_chans >= 1")
    model = ctor(weights=None, num_classes=max(num_classes, 1))
    if arch.startswith("resnet"):
        if small_input or in_chans != 3:
            model.conv1 = _replace_conv(
                model.conv1, in_chans, 3 if small_input else None, 1 if small_input else None
            )
        if small_input:
            model.maxpool = nn.Identity()
        feature_dim = model.fc.in_features
        if num_classes == 0:
            model.fc = nn.Identity()
    else:  # mobilenets: features[0] is Conv2dNormActivation(conv, bn, act)
        first = model.features[0][0]
        if small_input or in_chans != 3:
            model.features[0][0] = _replace_conv(first, in_chans, None, 1 if small_input else None)
        feature_dim = next(m for m in model.classifier if isinstance(m, nn.Linear)).in_features
        if num_classes == 0:
            model.classifier = nn.Identity()
    model.feature_dim = int(feature_dim)
    return attach_input_check(model, in_chans)


def _register_torchvision(arch: str) -> None:
    def builder(num_classes: int = 0, in_chans: int = 3, small_input: bool = False) -> nn.Module:
        return torchvision_model(arch, num_classes, in_chans, small_input)

    builder.__doc__ = f"torchvision {arch} (weights=None)."
    register_model(arch)(builder)


for _arch in (
    "resnet18", "resnet34", "resnet50", "mobilenet_v2", "mobilenet_v3_small", "mobilenet_v3_large"
):
    _register_torchvision(_arch)


class BasicBlock(nn.Module):
    """ResNet basic block with torchvision's parameter names."""

    def __init__(self, cin: int, cout: int, stride: int, downsample: nn.Module | None) -> None:
        super().__init__()
        self.conv1 = Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        sc = x if self.downsample is None else self.downsample(x)
        return self.relu(out + sc)


class ResNetSmall(PooledBackbone):
    """A small real ResNet for 28-32 px images: 3x3 stem conv (``stem_stride``) + BN + ReLU, then
    stages of basic blocks with widths ``base * (1, 2, 4, 8)`` (``base`` = 24 x
    ``width_mult``), stride 2 from the second stage on, global average pooling and an optional fc.
    ``channels_last`` keeps weights and activations NHWC (faster on CPU).
    """

    def __init__(
        self,
        num_classes: int = 0,
        in_chans: int = 1,
        width_mult: float = 1.0,
        stem_stride: int = 2,
        layers: tuple[int, ...] | list[int] = (1, 1, 1, 1),
        channels_last: bool = True,
    ) -> None:
        super().__init__()
        if width_mult <= 0 or stem_stride not in (1, 2) or not layers or min(layers) < 1:
            raise ModelError(
                "resnet_small needs width_mult > 0, stem_stride 1 or 2 and >= 1 block per stage"
            )
        base = max(1, round(24 * width_mult))
        self.stem = nn.Sequential(
            Conv2d(in_chans, base, 3, stem_stride, 1, bias=False),
            nn.BatchNorm2d(base),
            nn.ReLU(inplace=True),
        )
        blocks: list[nn.Module] = []
        cin = base
        for stage, n in enumerate(layers):
            cout = base * 2**stage
            for i in range(n):
                stride = 2 if stage > 0 and i == 0 else 1
                down = None
                if stride != 1 or cin != cout:
                    down = nn.Sequential(
                        Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
                    )
                blocks.append(BasicBlock(cin, cout, stride, down))
                cin = cout
        self.blocks = nn.Sequential(*blocks)
        self._finish(cin, num_classes, in_chans, channels_last)


@register_model("resnet_small")
def resnet_small(
    num_classes: int = 0,
    in_chans: int = 1,
    width_mult: float = 1.0,
    stem_stride: int = 2,
    layers: tuple[int, ...] | list[int] = (1, 1, 1, 1),
    channels_last: bool = True,
) -> ResNetSmall:
    """Small real ResNet (widths 24/48/96/192, one block per stage): the Fashion-MNIST teacher."""
    return ResNetSmall(num_classes, in_chans, width_mult, stem_stride, layers, channels_last)


def _wide_resnet50(widen: int, num_classes: int = 0, in_chans: int = 3,
                   layers: tuple[int, ...] | list[int] = (3, 4, 6, 3),
                   width_mult: float = 1.0) -> nn.Module:
    """SwAV's uniformly widened ResNet-50 (facebookresearch/swav ``src/resnet50.py``): stem and
    every stage ``widen`` times wider (``resnet50w2`` 4096-d, ``w4`` 8192-d, ``w5`` 10240-d
    features), torchvision's Bottleneck and key names. Not torchvision's ``wide_resnet50_2``,
    which widens only the bottleneck. SwAV pads by 1 then convolves with padding 2, the same as
    the padding 3 here. ``width_mult`` (1 as published) and ``layers`` shrink it for tests."""
    import torchvision.models.resnet as tvr

    if widen < 1 or num_classes < 0 or in_chans < 1 or width_mult <= 0:
        raise ModelError("a widened ResNet-50 needs widen >= 1, num_classes >= 0, in_chans >= 1")

    class WideResNet(tvr.ResNet):
        def __init__(self) -> None:  # torchvision's layout, SwAV's widths
            nn.Module.__init__(self)
            self._norm_layer = nn.BatchNorm2d
            self.dilation, self.groups, self.base_width = 1, 1, 64
            width = max(1, round(64 * widen * width_mult))
            self.inplanes = width
            self.conv1 = nn.Conv2d(in_chans, width, 7, 2, 3, bias=False)
            self.bn1 = nn.BatchNorm2d(width)
            self.relu = nn.ReLU(inplace=True)
            self.maxpool = nn.MaxPool2d(3, 2, 1)
            self.layer1 = self._make_layer(tvr.Bottleneck, width, layers[0])
            self.layer2 = self._make_layer(tvr.Bottleneck, 2 * width, layers[1], stride=2)
            self.layer3 = self._make_layer(tvr.Bottleneck, 4 * width, layers[2], stride=2)
            self.layer4 = self._make_layer(tvr.Bottleneck, 8 * width, layers[3], stride=2)
            self.avgpool = nn.AdaptiveAvgPool2d(1)
            feat = 8 * width * tvr.Bottleneck.expansion
            self.fc = nn.Linear(feat, num_classes) if num_classes > 0 else nn.Identity()
            self.feature_dim = feat

    return attach_input_check(WideResNet(), in_chans)


def _register_wide(widen: int) -> None:
    def builder(num_classes: int = 0, in_chans: int = 3,
                layers: tuple[int, ...] | list[int] = (3, 4, 6, 3),
                width_mult: float = 1.0) -> nn.Module:
        return _wide_resnet50(widen, num_classes, in_chans, layers, width_mult)

    builder.__doc__ = f"SwAV's ResNet-50-w{widen} (every width x{widen})."
    register_model(f"resnet50w{widen}")(builder)


for _widen in (2, 4, 5):
    _register_wide(_widen)
