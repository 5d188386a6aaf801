"""Test-only stand-ins for the reference networks, written from their published structure and
maths (szq0214/S2-BNN ``ReActNet.py``, liuzechun/ReActNet ``mobilenet/2_step2/reactnet.py``) to
produce state dicts with their exact module names and tensor shapes, and to compute what their
forward pass computes. Nothing here is used by the library.

Structure of the reference ReActNet-A: ``feature`` is a ModuleList; ``feature.0`` a real 3x3
stride-2 conv ``conv1`` + ``bn1``; every later entry a block whose forward is

    a = bn1(conv3x3(sign(x + move11)));  a += avgpool2(x) if stride 2 else x
    a = prelu1(a + move12) + move13
    b = sign(a + move21)
    b = bn2(pw(b)) + a                          if cin == cout
    b = cat(bn2_1(pw1(b)) + a, bn2_2(pw2(b)) + a)  if cout == 2 cin
    out = prelu2(b + move22) + move23

then global average pooling (``pool1``) and ``fc``. Binary convolutions use alpha * sign(W) with
alpha the mean |W| per output channel. S2-BNN's file creates the plain *and* the downsampling
1x1 layers in every block (one pair unused); ReActNet's creates only the used pair and stores
binary weights flat, as ``weights`` of shape (numel, 1).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class Shift(nn.Module):
    """A learnable per-channel offset stored as ``bias`` of shape (1, C, 1, 1)."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(1, c, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.bias


def poly_sign(x: torch.Tensor) -> torch.Tensor:
    """sign(x) forward; backward the derivative of the piecewise quadratic (2 + 2x on [-1, 0),
    2 - 2x on [0, 1), 0 outside), written with a straight-through detach."""
    soft = torch.where(x < -1, -torch.ones_like(x),
                       torch.where(x < 0, x * x + 2 * x,
                                   torch.where(x < 1, 2 * x - x * x, torch.ones_like(x))))
    return soft + (torch.sign(x) - soft).detach()


class BinConv(nn.Module):
    """A bias-free conv whose weight is binarised (or not); ``flat`` stores it as ``weights``."""

    def __init__(self, cin: int, cout: int, k: int, stride: int, binary: bool,
                 flat: bool) -> None:
        super().__init__()
        self.shape = (cout, cin, k, k)
        self.stride, self.pad, self.binary, self.flat = stride, k // 2, binary, flat
        if flat:
            self.weights = nn.Parameter(torch.randn(cout * cin * k * k, 1) * 0.1)
        else:
            self.weight = nn.Parameter(torch.randn(self.shape) * 0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weights.view(self.shape) if self.flat else self.weight
        if self.binary:
            alpha = w.abs().mean(dim=(1, 2, 3), keepdim=True).detach()
            clipped = w.clamp(-1, 1)
            w = clipped + (alpha * torch.sign(w) - clipped).detach()
        return F.conv2d(x, w, stride=self.stride, padding=self.pad)


class Stem(nn.Module):
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, 2, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn1(self.conv1(x))


class Block(nn.Module):
    """One reference block; ``both_pairs`` as S2-BNN's file (all 1x1 layers created)."""

    def __init__(self, cin: int, cout: int, stride: int, binary: bool, both_pairs: bool,
                 flat: bool) -> None:
        super().__init__()
        self.move11 = Shift(cin)
        self.binary_3x3 = BinConv(cin, cin, 3, stride, binary, flat)
        self.bn1 = nn.BatchNorm2d(cin)
        self.move12, self.prelu1, self.move13 = Shift(cin), nn.PReLU(cin), Shift(cin)
        self.move21 = Shift(cin)
        if both_pairs or cin == cout:
            self.binary_pw = BinConv(cin, cout, 1, 1, binary, flat)
            self.bn2 = nn.BatchNorm2d(cout)
        if both_pairs or cout != cin:
            self.binary_pw_down1 = BinConv(cin, cin, 1, 1, binary, flat)
            self.binary_pw_down2 = BinConv(cin, cin, 1, 1, binary, flat)
            self.bn2_1, self.bn2_2 = nn.BatchNorm2d(cin), nn.BatchNorm2d(cin)
        self.move22, self.prelu2, self.move23 = Shift(cout), nn.PReLU(cout), Shift(cout)
        self.cin, self.cout, self.stride = cin, cout, stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.bn1(self.binary_3x3(poly_sign(self.move11(x))))
        a = a + (F.avg_pool2d(x, 2, 2) if self.stride == 2 else x)
        a = self.move13(self.prelu1(self.move12(a)))
        b = poly_sign(self.move21(a))
        if self.cin == self.cout:
            b = self.bn2(self.binary_pw(b)) + a
        else:
            b = torch.cat((self.bn2_1(self.binary_pw_down1(b)) + a,
                           self.bn2_2(self.binary_pw_down2(b)) + a), dim=1)
        return self.move23(self.prelu2(self.move22(b)))


def reactnet_plan(width_mult: float = 1.0) -> list[tuple[int, int, int]]:
    """(cin, cout, stride) of the 13 blocks: 64, 128, 128, 256, 256, 512 x 6, 1024, 1024 at
    ``width_mult`` 1, stride 2 where the channels change, except at 32 -> 64."""
    c = max(1, round(32 * width_mult))
    outs = [2 * c, 4 * c, 4 * c, 8 * c, 8 * c] + [16 * c] * 6 + [32 * c] * 2
    plan, cin = [], c
    for i, cout in enumerate(outs):
        plan.append((cin, cout, 2 if cout != cin and i > 0 else 1))
        cin = cout
    return plan


class RefReActNet(nn.Module):
    """Reference ReActNet-A; ``head`` "mlp" (S2-BNN: fc = Linear, ReLU, Linear) or "fc"."""

    def __init__(self, width_mult: float = 1.0, binary: bool = True, layout: str = "s2bnn",
                 head: str = "mlp", dim: int = 128, num_classes: int = 1000,
                 in_chans: int = 3) -> None:
        super().__init__()
        plan = reactnet_plan(width_mult)
        both, flat = layout == "s2bnn", layout == "reactnet" and binary
        self.feature = nn.ModuleList([Stem(in_chans, plan[0][0])])
        for cin, cout, stride in plan:
            self.feature.append(Block(cin, cout, stride, binary, both, flat))
        self.pool1 = nn.AdaptiveAvgPool2d(1)
        feat = plan[-1][1]
        self.fc = (nn.Sequential(nn.Linear(feat, feat), nn.ReLU(), nn.Linear(feat, dim))
                   if head == "mlp" else nn.Linear(feat, num_classes))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.feature:
            x = layer(x)
        return self.pool1(x).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))


def randomize(module: nn.Module, seed: int = 0) -> nn.Module:
    """Every parameter and BN statistic random (variances positive), so no mapping error hides."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in module.state_dict().items():
            if not t.is_floating_point():
                t.fill_(7)
            elif name.endswith("running_var"):
                t.copy_(torch.rand(t.shape, generator=gen) + 0.5)
            elif name.endswith("bn1.weight") or ".bn2" in name and name.endswith("weight"):
                t.copy_(torch.rand(t.shape, generator=gen) + 0.5)
            else:
                t.copy_(torch.randn(t.shape, generator=gen) * 0.3)
    return module


def s2bnn_checkpoint(net: RefReActNet, key_net: RefReActNet | None = None, dim: int = 128,
                     queue: int = 16) -> dict:
    """``net`` saved as S2-BNN's main_moco.py saves its DDP-wrapped MoCo model."""
    key_net = key_net or net
    sd = {f"module.encoder_q.{k}": v.clone() for k, v in net.state_dict().items()}
    sd.update({f"module.encoder_k.{k}": v.clone() for k, v in key_net.state_dict().items()})
    gen = torch.Generator().manual_seed(1)
    sd["module.queue"] = F.normalize(torch.randn(dim, queue, generator=gen), dim=0)
    sd["module.queue_ptr"] = torch.tensor([4])
    return {"epoch": 200, "arch": "resnet50", "state_dict": sd, "optimizer": {}}


def reactnet_checkpoint(net: RefReActNet) -> dict:
    """``net`` saved as ReActNet's train.py saves its DataParallel student."""
    sd = {f"module.{k}": v.clone() for k, v in net.state_dict().items()}
    return {"epoch": 255, "state_dict": sd, "best_top1_acc": 69.5, "optimizer": {}}
