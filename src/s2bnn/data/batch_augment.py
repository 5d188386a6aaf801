"""The same augmentation recipes applied to a whole batch at once (CPU or GPU).

Per-sample ``transforms.v2`` pipelines pay tens of microseconds of Python and dispatch per op
per image; on 28 px images that overhead is nearly all of the cost. Here every op runs once per
batch with per-image random parameters, so a batch of 256 uint8 images becomes its views in a
few milliseconds, on the device the batch lives on. Use it with a dataset built with
``transform=None`` (uint8 images of one size) and call it on each batch in the training loop::

    aug = build_batch_train_transform(**asdict(cfg.data.augment), image_size=28, in_chans=1)
    for images, _ in loader:                      # uint8 (B, C, H, W)
        views = aug(images.to(device))            # list of float (B, C, size, size)

Differences from the per-sample pipeline, all deliberate and small: crops are resampled with
``roi_align`` (bilinear, adaptive sampling, which also anti-aliases when shrinking); the four
colour-jitter ops run in one random order per batch, not per image; hue is shifted by rotating
the chroma plane in YIQ space (a linear map, exact for greys, close to the HSV shift elsewhere).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torchvision.ops import roi_align
from torchvision.transforms.v2 import functional as TF

from s2bnn.data.augment import eval_resize_size, view_specs

__all__ = ["BatchView", "BatchMultiView", "build_batch_train_transform"]

_LUMA = (0.299, 0.587, 0.114)
_RATIO = (3.0 / 4.0, 4.0 / 3.0)


def _uniform(lo: float, hi: float, n: int, device) -> torch.Tensor:
    return torch.empty(n, device=device).uniform_(lo, hi)


def _coin(p: float, n: int, device) -> torch.Tensor:
    return torch.rand(n, device=device) < p


def _grey(x: torch.Tensor) -> torch.Tensor:
    if x.shape[1] == 1:
        return x
    w = torch.tensor(_LUMA, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    return (x * w).sum(1, keepdim=True)


def crop_boxes(n: int, height: int, width: int, scale: Sequence[float], device) -> torch.Tensor:
    """RandomResizedCrop boxes ``(n, 4)`` as x1, y1, x2, y2: 10 tries each, else a centre crop."""
    tries = 10
    area = height * width
    target = area * _uniform(scale[0], scale[1], n * tries, device)
    log_ratio = _uniform(math.log(_RATIO[0]), math.log(_RATIO[1]), n * tries, device)
    ratio = torch.exp(log_ratio)
    w = torch.sqrt(target * ratio).round().view(n, tries)
    h = torch.sqrt(target / ratio).round().view(n, tries)
    ok = (w > 0) & (h > 0) & (w <= width) & (h <= height)
    first = ok.float().argmax(1)  # the first try that fits (rows with none: replaced below)
    w = w.gather(1, first[:, None]).squeeze(1)
    h = h.gather(1, first[:, None]).squeeze(1)
    # Fallback as in torchvision: the whole image, clipped to the ratio range, centred.
    in_ratio = width / height
    if in_ratio < _RATIO[0]:
        fw, fh = float(width), round(width / _RATIO[0])
    elif in_ratio > _RATIO[1]:
        fw, fh = round(height * _RATIO[1]), float(height)
    else:
        fw, fh = float(width), float(height)
    none = ~ok.any(1)
    w = torch.where(none, torch.full_like(w, fw), w)
    h = torch.where(none, torch.full_like(h, fh), h)
    top = torch.floor(torch.rand(n, device=device) * (height - h + 1))
    left = torch.floor(torch.rand(n, device=device) * (width - w + 1))
    top = torch.where(none, (height - h) // 2, top)
    left = torch.where(none, (width - w) // 2, left)
    return torch.stack([left, top, left + w, top + h], dim=1)


def _blur(x: torch.Tensor, sigma: torch.Tensor, kernel: int) -> torch.Tensor:
    """Separable Gaussian blur with one sigma per image (sigma 0: unchanged)."""
    b, c, hgt, wid = x.shape
    r = kernel // 2
    taps = torch.arange(-r, r + 1, device=x.device, dtype=x.dtype)
    s = sigma.clamp_min(1e-3).to(x.dtype)[:, None]
    k = torch.exp(-(taps[None] ** 2) / (2 * s * s))
    k = k / k.sum(1, keepdim=True)
    k = torch.where(sigma[:, None] > 0, k, (taps == 0).to(x.dtype)[None].expand_as(k))
    k = k.repeat_interleave(c, 0)  # one kernel per (image, channel) group
    pad_mode = "reflect" if min(hgt, wid) > r else "replicate"
    y = F.pad(x.reshape(1, b * c, hgt, wid), (r, r, r, r), mode=pad_mode)
    y = F.conv2d(y, k.view(b * c, 1, kernel, 1), groups=b * c)
    y = F.conv2d(y, k.view(b * c, 1, 1, kernel), groups=b * c)
    return y.view(b, c, hgt, wid)


class BatchView:
    """One view of a batch: crop, colour, blur, solarise, flip, normalise (same spec as v2)."""

    def __init__(self, **spec: Any) -> None:
        self.spec = spec

    def _jitter(self, x: torch.Tensor, apply: torch.Tensor) -> torch.Tensor:
        n, dev = x.shape[0], x.device
        bri, con, sat, hue = self.spec["jitter"]
        if x.shape[1] != 3:
            sat, hue = 0.0, 0.0

        def factors(strength: float) -> torch.Tensor:
            f = _uniform(max(0.0, 1 - strength), 1 + strength, n, dev)
            return torch.where(apply, f, torch.ones_like(f)).view(n, 1, 1, 1)

        for op in torch.randperm(4).tolist():
            if op == 0 and bri > 0:
                x = (x * factors(bri)).clamp(0, 1)
            elif op == 1 and con > 0:
                mean = _grey(x).mean(dim=(1, 2, 3), keepdim=True)
                f = factors(con)
                x = (f * x + (1 - f) * mean).clamp(0, 1)
            elif op == 2 and sat > 0:
                f = factors(sat)
                x = (f * x + (1 - f) * _grey(x)).clamp(0, 1)
            elif op == 3 and hue > 0:
                x = self._hue(x, torch.where(apply, _uniform(-hue, hue, n, dev), 0.0))
        return x

    @staticmethod
    def _hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
        to_yiq = torch.tensor(
            [[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]],
            device=x.device, dtype=x.dtype,
        )
        angle = (shift * 2 * math.pi).to(x.dtype)
        cos, sin = torch.cos(angle), torch.sin(angle)
        rot = torch.zeros(len(shift), 3, 3, device=x.device, dtype=x.dtype)
        rot[:, 0, 0] = 1
        rot[:, 1, 1], rot[:, 1, 2], rot[:, 2, 1], rot[:, 2, 2] = cos, -sin, sin, cos
        m = torch.linalg.inv(to_yiq) @ rot @ to_yiq  # (n, 3, 3)
        return torch.einsum("nij,njhw->nihw", m, x).clamp(0, 1)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        s = self.spec
        n, _, hgt, wid = images.shape
        dev = images.device
        x = images.float().div_(255) if images.dtype == torch.uint8 else images.float()
        if s.get("eval"):
            x = TF.resize(x, eval_resize_size(s["size"]), antialias=True)
            x = TF.center_crop(x, [s["size"], s["size"]])
            return TF.normalize(x, s["mean"], s["std"])
        boxes = crop_boxes(n, hgt, wid, s["scale"], dev).to(x.dtype)
        rois = torch.cat([torch.arange(n, device=dev, dtype=x.dtype)[:, None], boxes], dim=1)
        x = roi_align(x, rois, output_size=s["size"], spatial_scale=1.0, sampling_ratio=-1,
                      aligned=True)
        if s["color"]:
            if s["jitter_p"] > 0:
                x = self._jitter(x, _coin(s["jitter_p"], n, dev))
            if x.shape[1] == 3 and s["gray_p"] > 0:
                x = torch.where(_coin(s["gray_p"], n, dev).view(n, 1, 1, 1), _grey(x), x)
        if s["blur"] and s["blur_p"] > 0:
            lo, hi = s["blur_sigma"]
            sigma = torch.where(_coin(s["blur_p"], n, dev), _uniform(lo, hi, n, dev), 0.0)
            x = _blur(x, sigma, s["blur_kernel"])
        if s.get("solarize_p", 0.0) > 0:
            sol = _coin(s["solarize_p"], n, dev).view(n, 1, 1, 1)
            x = torch.where(sol & (x >= 0.5), 1 - x, x)
        flip = _coin(0.5, n, dev).view(n, 1, 1, 1)
        x = torch.where(flip, x.flip(-1), x)
        mean = torch.tensor(s["mean"], device=dev, dtype=x.dtype).view(1, -1, 1, 1)
        std = torch.tensor(s["std"], device=dev, dtype=x.dtype).view(1, -1, 1, 1)
        return (x - mean) / std


class BatchMultiView:
    """Applies each view to a uint8 batch ``(B, C, H, W)``; returns the list of view batches."""

    def __init__(self, views: Sequence[BatchView]) -> None:
        self.views = list(views)

    def __call__(self, images: torch.Tensor) -> list[torch.Tensor]:
        return [v(images) for v in self.views]

    def __len__(self) -> int:
        return len(self.views)


def build_batch_train_transform(
    preset: str, image_size: int, in_chans: int, num_views: int = 2,
    crop_scale: Sequence[float] | None = None, color: bool | None = None,
    blur: bool | None = None, local_crops: int = 0, local_size: int | None = None,
    local_crop_scale: Sequence[float] | None = None, mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> BatchMultiView:
    """Batched twin of :func:`s2bnn.data.build_train_transform` (same arguments and recipes)."""
    specs = view_specs(
        preset, image_size, in_chans, num_views, crop_scale, color, blur, local_crops,
        local_size, local_crop_scale, mean, std,
    )
    return BatchMultiView([BatchView(**spec) for spec in specs])
