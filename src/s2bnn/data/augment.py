"""Augmentation presets that turn one image into N views (torchvision ``transforms.v2``).

Inputs are uint8 tensors ``(C, H, W)`` (what the datasets yield); outputs are float32 tensors
normalised with ``mean``/``std``. No PIL round trip.

Presets (``data.augment.preset``):

- ``mocov2``: RandomResizedCrop (scale 0.2-1), ColorJitter(0.4, 0.4, 0.4, 0.1) with p 0.8,
  grayscale p 0.2, Gaussian blur sigma 0.1-2 with p 0.5, horizontal flip (MoCo v2).
- ``s2bnn_lite``: the same with jitter p 0.6 and blur p 0.2 (S2-BNN's weaker augmentation, which
  suits a binary student distilled from a teacher).
- ``eval``: resize + centre crop, the same for every view (no augmentation).
- ``multicrop``: DINO's: ``num_views`` global crops (scale 0.4-1; the first always blurred, the
  second blurred with p 0.1 and solarised with p 0.2, repeating), then ``local_crops`` small crops
  (scale 0.05-0.4 at ``local_size`` 96, blur p 0.5); jitter (0.4, 0.4, 0.2, 0.1) p 0.8.

``local_crops`` small crops (``local_size``, ``local_crop_scale``) can follow the full views of
any training preset; outside ``multicrop`` they take the preset's own jitter and blur.

Sizing. At ImageNet resolution (``image_size`` > 64) the published values are used: blur kernel
23 at 224 (10 % of the image, odd), sigma 0.1-2. Small images (<= 64 px, e.g. Fashion-MNIST at 28)
get values that make sense there:

- crop scale 0.35-1 instead of 0.2-1: a 0.2 crop of a 28 px image is a 12 px patch blown up 2.3x,
  mostly blur and no garment; 0.35 keeps at least a ~17 px patch;
- blur kernel 3 (the same 10 %-of-the-image rule, rounded up to odd) with sigma 0.1-1: sigma 2 px
  would wash out the stitching and texture that tell shirts from pullovers;
- multicrop: global scale 0.4-1, local scale 0.15-0.4 at ``local_size`` = 3/7 of the image size
  (96/224), e.g. 12 px at 28: a 0.05 local crop of a 28 px image is a 6 px patch;
- colour (``color=None``): jitter and grayscale on for 3-channel images, off for 1-channel ones
  (saturation, hue and grayscale mean nothing there). ``color=True`` on grey images keeps only
  brightness and contrast jitter.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torchvision.transforms import v2

from s2bnn.errors import DataError

__all__ = [
    "eval_resize_size",
    "PRESETS",
    "SMALL_IMAGE_SIZE",
    "MultiView",
    "build_train_transform",
    "build_eval_transform",
    "default_mean_std",
    "preset_params",
    "view_specs",
]

PRESETS = ("mocov2", "s2bnn_lite", "eval", "multicrop")
# Images up to this size use the small-image crop scales and blur kernels.
SMALL_IMAGE_SIZE = 64
_RATIO = (3.0 / 4.0, 4.0 / 3.0)

# preset -> jitter (brightness, contrast, saturation, hue), jitter p, grayscale p, blur p
_COLOUR = {
    "mocov2": ((0.4, 0.4, 0.4, 0.1), 0.8, 0.2, 0.5),
    "s2bnn_lite": ((0.4, 0.4, 0.4, 0.1), 0.6, 0.2, 0.2),
    "multicrop": ((0.4, 0.4, 0.2, 0.1), 0.8, 0.2, 0.5),
}


def _small(image_size: int) -> bool:
    return image_size <= SMALL_IMAGE_SIZE


def eval_resize_size(image_size: int) -> int:
    """The short side an image is resized to before its centre ``image_size`` crop: the size
    itself for small images, ``image_size / 0.875`` (256 for 224) for larger ones."""
    return image_size if _small(image_size) else int(round(image_size / 0.875))


def _blur_kernel(image_size: int) -> int:
    k = max(3, int(round(0.1 * image_size)))
    return k if k % 2 == 1 else k + 1


def _blur_sigma(image_size: int) -> tuple[float, float]:
    return (0.1, 1.0) if _small(image_size) else (0.1, 2.0)


def default_mean_std(in_chans: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """ImageNet statistics (or their luma equivalent for 1 channel) when none are given."""
    if in_chans == 3:
        return (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    return (0.449,) * in_chans, (0.226,) * in_chans


def preset_params(preset: str, image_size: int) -> dict[str, object]:
    """The sized defaults of a preset: crop scales, blur kernel and sigma, local crop size."""
    _check_preset(preset)
    small = _small(image_size)
    if preset == "multicrop":
        crop_scale = (0.4, 1.0)
    else:
        crop_scale = (0.35, 1.0) if small else (0.2, 1.0)
    local_size = max(8, int(round(image_size * 3 / 7))) if small else 96
    if not small and image_size != 224:
        local_size = max(8, int(round(image_size * 96 / 224)))
    return {
        "crop_scale": crop_scale,
        "local_crop_scale": (0.15, 0.4) if small else (0.05, 0.4),
        "local_size": local_size,
        "blur_kernel": _blur_kernel(image_size),
        "blur_sigma": _blur_sigma(image_size),
    }


def _check_preset(preset: str) -> None:
    if preset not in PRESETS:
        raise DataError(f"unknown augmentation preset '{preset}': use one of {', '.join(PRESETS)}")


def _scale(value: Sequence[float] | None, default: tuple[float, float], key: str):
    if value is None:
        return default
    lo, hi = (float(v) for v in value) if len(value) == 2 else (None, None)
    if lo is None or not 0.0 < lo <= hi <= 1.0:
        raise DataError(
            f"data.augment.{key} must be [min, max] with 0 < min <= max <= 1, got {value}"
        )
    return (lo, hi)


def _mean_std(mean, std, in_chans: int) -> tuple[list[float], list[float]]:
    d_mean, d_std = default_mean_std(in_chans)
    mean = list(d_mean if mean is None else mean)
    std = list(d_std if std is None else std)
    if len(mean) != in_chans or len(std) != in_chans:
        raise DataError(
            f"normalisation mean/std have {len(mean)}/{len(std)} values for {in_chans}-channel "
            "images: give one per channel"
        )
    if any(s <= 0 for s in std):
        raise DataError(f"normalisation std must be positive, got {std}")
    return mean, std


class MultiView:
    """Applies each of its transforms to one image and returns the list of views."""

    def __init__(self, transforms: Sequence[Callable[[torch.Tensor], torch.Tensor]]) -> None:
        self.transforms = list(transforms)

    def __call__(self, image: torch.Tensor) -> list[torch.Tensor]:
        return [t(image) for t in self.transforms]

    def __len__(self) -> int:
        return len(self.transforms)

    def __repr__(self) -> str:
        inner = "\n".join(f"  {t!r}" for t in self.transforms)
        return f"MultiView(\n{inner}\n)"


def _view(
    size: int, in_chans: int, scale: tuple[float, float], color: bool, jitter, jitter_p: float,
    gray_p: float, blur: bool, blur_p: float, blur_kernel: int, blur_sigma, mean, std,
    solarize_p: float = 0.0,
) -> v2.Compose:
    # Crop first on uint8 (cheap on large photos), then work in float [0, 1].
    ops: list[Callable] = [
        v2.RandomResizedCrop(size, scale=scale, ratio=_RATIO, antialias=True),
        v2.ToDtype(torch.float32, scale=True),
    ]
    if color:
        b, c, s, h = jitter
        if in_chans != 3:
            s, h = 0.0, 0.0
        if jitter_p > 0:
            ops.append(v2.RandomApply([v2.ColorJitter(b, c, s, h)], p=jitter_p))
        if in_chans == 3 and gray_p > 0:
            ops.append(v2.RandomGrayscale(p=gray_p))
    if blur and blur_p > 0:
        gb = v2.GaussianBlur(blur_kernel, sigma=blur_sigma)
        ops.append(gb if blur_p >= 1.0 else v2.RandomApply([gb], p=blur_p))
    if solarize_p > 0:
        ops.append(v2.RandomSolarize(0.5, p=solarize_p))
    ops += [v2.RandomHorizontalFlip(), v2.Normalize(mean, std)]
    return v2.Compose(ops)


def build_eval_transform(
    image_size: int, in_chans: int, mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> v2.Compose:
    """Resize and centre-crop to ``image_size``, then normalise (uint8 ``(C,H,W)`` -> float).

    Small images (<= 64 px) are resized so the short side is ``image_size``; larger ones to
    ``image_size / 0.875`` first (256 for 224), the usual ImageNet evaluation crop.
    """
    if image_size < 1:
        raise DataError(f"image size must be positive, got {image_size}")
    mean_, std_ = _mean_std(mean, std, in_chans)
    return v2.Compose([
        v2.Resize(eval_resize_size(image_size), antialias=True),
        v2.CenterCrop(image_size),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(mean_, std_),
    ])


def view_specs(
    preset: str, image_size: int, in_chans: int, num_views: int = 2,
    crop_scale: Sequence[float] | None = None, color: bool | None = None,
    blur: bool | None = None, local_crops: int = 0, local_size: int | None = None,
    local_crop_scale: Sequence[float] | None = None, mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> list[dict[str, Any]]:
    """The checked, sized settings of every view, one dict each (``eval``: ``{"eval": True}``).

    Shared by the per-sample :func:`build_train_transform` and the batched
    :func:`s2bnn.data.batch_augment.build_batch_train_transform`, so both apply the same recipe.
    """
    _check_preset(preset)
    if num_views < 1:
        raise DataError(f"data.augment.num_views must be at least 1, got {num_views}")
    if image_size < 1:
        raise DataError(f"image size must be positive, got {image_size}")
    if in_chans not in (1, 3):
        raise DataError(f"augmentation takes 1- or 3-channel images, got {in_chans} channels")
    if local_crops < 0:
        raise DataError(f"data.augment.local_crops must be >= 0, got {local_crops}")
    if local_crops and preset == "eval":
        raise DataError(
            f"data.augment.local_crops={local_crops} needs a training preset (got 'eval')"
        )
    mean_, std_ = _mean_std(mean, std, in_chans)
    if preset == "eval":
        spec = dict(eval=True, size=image_size, in_chans=in_chans, mean=mean_, std=std_)
        return [spec] * num_views

    p = preset_params(preset, image_size)
    scale = _scale(crop_scale, p["crop_scale"], "crop_scale")
    use_color = (in_chans == 3) if color is None else bool(color)
    use_blur = True if blur is None else bool(blur)
    jitter, jitter_p, gray_p, blur_p = _COLOUR[preset]
    common = dict(
        in_chans=in_chans, color=use_color, jitter=jitter, jitter_p=jitter_p, gray_p=gray_p,
        blur=use_blur, blur_kernel=p["blur_kernel"], blur_sigma=p["blur_sigma"], mean=mean_,
        std=std_,
    )
    if preset != "multicrop":
        specs = [dict(common, size=image_size, scale=scale, blur_p=blur_p)] * num_views
        local_blur_p = blur_p
    else:
        # DINO: asymmetric global views (always blurred / rarely blurred + solarised).
        globals_ = [
            dict(common, size=image_size, scale=scale, blur_p=1.0),
            dict(common, size=image_size, scale=scale, blur_p=0.1, solarize_p=0.2),
        ]
        specs = [globals_[i % 2] for i in range(num_views)]
        local_blur_p = 0.5
    if local_crops:
        lsize = int(local_size) if local_size is not None else int(p["local_size"])
        if lsize < 1:
            raise DataError(f"data.augment.local_size must be positive, got {local_size}")
        lscale = _scale(local_crop_scale, p["local_crop_scale"], "local_crop_scale")
        specs += [
            dict(common, size=lsize, scale=lscale, blur_p=local_blur_p,
                 blur_kernel=_blur_kernel(lsize), blur_sigma=_blur_sigma(lsize))
        ] * local_crops
    return specs


def build_train_transform(
    preset: str, image_size: int, in_chans: int, num_views: int = 2,
    crop_scale: Sequence[float] | None = None, color: bool | None = None,
    blur: bool | None = None, local_crops: int = 0, local_size: int | None = None,
    local_crop_scale: Sequence[float] | None = None, mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> MultiView:
    """A callable image -> list of ``num_views`` (+ ``local_crops``) normalised float views.

    Arguments mirror ``AugmentConfig``; ``None`` means the preset's value for this image size
    (see the module docstring for the values and why). ``color=None``: on for 3 channels, off for
    1; ``blur=None``: the preset's blur. Pass ``mean``/``std`` from ``dataset_stats(name)``.
    """
    specs = view_specs(
        preset, image_size, in_chans, num_views, crop_scale, color, blur, local_crops,
        local_size, local_crop_scale, mean, std,
    )
    built: dict[int, Callable] = {}
    views = []
    for spec in specs:
        # Equal specs share one Compose: its randomness is drawn per call anyway.
        if id(spec) not in built:
            if spec.get("eval"):
                built[id(spec)] = build_eval_transform(
                    spec["size"], in_chans, spec["mean"], spec["std"]
                )
            else:
                built[id(spec)] = _view(**spec)
        views.append(built[id(spec)])
    return MultiView(views)
