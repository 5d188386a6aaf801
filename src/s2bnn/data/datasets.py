"""Datasets by name: Fashion-MNIST, a synthetic set for tests, and any ImageFolder tree.

Every dataset yields ``(image, label)``. Without a transform the image is a uint8 tensor
``(C, H, W)``; with one, whatever the transform returns (a list of views for a train transform).
Every dataset has ``targets`` (int64 tensor), ``classes``, ``num_classes`` and ``in_chans``.

Dataset names (``data.name``):

- ``fashion-mnist`` (also ``fashion_mnist``, ``fashionmnist``, ``fmnist``): 60,000 / 10,000 grey
  28x28 images, 10 classes, in memory (see :mod:`s2bnn.data.fashion_mnist` for where from).
- ``synthetic[:C[:H[:N[:K]]]]``: deterministic class-dependent patterns plus noise, ``C`` channels
  (3), ``H`` x ``H`` pixels (32), ``N`` training images (500), ``K`` classes (10) and
  ``max(K, N // 5)`` test images; e.g. ``synthetic:1:28:200:4``. Learnable by kNN on pixels, fast.
- a directory ``DIR`` with ``DIR/train/<class>/<image>`` and ``DIR/val/<class>/<image>``
  (``DIR/test`` if there is no ``val``); split ``test`` reads ``val``. Classes come from ``train``.
  All images are decoded to the mode of the first training image: 1 channel if it is grey, else 3.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from s2bnn.data.base import InMemoryDataset, check_limit, check_split
from s2bnn.data.fashion_mnist import (
    FASHION_MNIST_CLASSES,
    FASHION_MNIST_MEAN,
    FASHION_MNIST_STD,
    fashion_mnist_counts,
    load_fashion_mnist,
)
from s2bnn.data.folder import (
    ImageFolderDataset,
    class_names,
    first_train_image,
    mode_of,
    open_image,
    scan,
    to_tensor,
)
from s2bnn.data.synthetic import make_synthetic, parse_synthetic, synthetic_counts
from s2bnn.errors import DataError

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "build_dataset",
    "dataset_info",
    "default_image_size",
    "dataset_stats",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Grey images of a colour-photo tree: the ImageNet statistics of the luma channel.
IMAGENET_GREY_MEAN = (0.449,)
IMAGENET_GREY_STD = (0.226,)
# ImageFolder trees whose images are at most this large train at their own size, not at 224.
SMALL_IMAGE_MAX = 64
_FASHION_NAMES = ("fashion-mnist", "fashion_mnist", "fashionmnist", "fmnist")


def _kind(name: str) -> str:
    """``fashion-mnist``, ``synthetic`` or ``folder`` for a dataset name or path."""
    if not isinstance(name, str) or not name:
        raise DataError(
            "no dataset name given: use fashion-mnist, synthetic or an ImageFolder path"
        )
    if name.lower() in _FASHION_NAMES:
        return "fashion-mnist"
    if name.lower() == "synthetic" or name.lower().startswith("synthetic:"):
        return "synthetic"
    path = Path(name).expanduser()
    if path.is_dir():
        return "folder"
    if path.exists():
        raise DataError(
            f"{name} is a file, not a dataset directory: give DIR with DIR/train/<class>/"
        )
    if os.sep in name or name.startswith((".", "~")) or (os.altsep and os.altsep in name):
        raise DataError(f"dataset directory {name} does not exist: check the path")
    raise DataError(
        f"unknown dataset '{name}': use fashion-mnist, synthetic[:C:H:N:K] or the path of an "
        "ImageFolder tree (DIR/train/<class>/<image>)"
    )


def build_dataset(
    name: str, split: str = "train", transform: Callable[[torch.Tensor], Any] | None = None,
    root: str | None = None, limit: int | None = None, skip_corrupt: bool = False,
) -> Dataset:
    """A dataset of ``(image, label)`` by name: ``fashion-mnist``, ``synthetic[...]`` or a path.

    ``split`` is ``train`` or ``test`` (``val/`` of an ImageFolder tree); ``root`` is where the
    Fashion-MNIST idx files are (searched elsewhere too, see :mod:`s2bnn.data.fashion_mnist`);
    ``limit`` keeps the first N images; ``skip_corrupt`` skips undecodable ImageFolder files.
    """
    check_split(split)
    check_limit(limit)
    kind = _kind(name)
    if kind == "folder":
        return ImageFolderDataset(
            name, split, transform=transform, limit=limit, skip_corrupt=skip_corrupt
        )
    if kind == "fashion-mnist":
        images, targets = load_fashion_mnist(split, root)
        classes: Sequence[str] = FASHION_MNIST_CLASSES
    else:
        images, targets = make_synthetic(name, split)
        classes = [f"class{i}" for i in range(parse_synthetic(name)[3])]
    if limit is not None:
        images, targets = images[:limit], targets[:limit]
    return InMemoryDataset(images, targets, classes, transform=transform, name=name)


def dataset_info(name: str, root: str | None = None) -> dict[str, Any]:
    """``name``, ``num_train``, ``num_test``, ``num_classes``, ``image_shape`` ([C, H, W]).

    For an ImageFolder tree the counts are files found under ``train/`` and ``val/`` (0 when
    there is no ``val/``) and ``image_shape`` is that of the first training image.
    """
    kind = _kind(name)
    if kind == "fashion-mnist":
        counts = fashion_mnist_counts(root)
        return {
            "name": "fashion-mnist", "num_train": counts["num_train"],
            "num_test": counts["num_test"], "num_classes": len(FASHION_MNIST_CLASSES),
            "image_shape": counts["image_shape"],
        }
    if kind == "synthetic":
        chans, size, _, num_classes = parse_synthetic(name)
        num_train, num_test = synthetic_counts(name)
        return {
            "name": name, "num_train": num_train, "num_test": num_test,
            "num_classes": num_classes, "image_shape": [chans, size, size],
        }
    path = Path(name).expanduser()
    classes = class_names(path)
    train = scan(path, "train", classes)
    has_val = any((path / s).is_dir() for s in ("val", "test"))
    num_test = len(scan(path, "test", classes)) if has_val else 0
    first = train[0][0]
    shape = list(to_tensor(open_image(first), mode_of(first)).shape)
    return {
        "name": str(path), "num_train": len(train), "num_test": num_test,
        "num_classes": len(classes), "image_shape": shape,
    }


def default_image_size(name: str) -> int:
    """Training resolution when ``data.image_size`` is unset.

    28 for Fashion-MNIST, ``H`` for a synthetic spec; for an ImageFolder tree the larger side of
    its first training image when that is at most 64 px (CIFAR-like trees train at their own
    size), else 224 (ImageNet-like photos, the paper's resolution).
    """
    kind = _kind(name)
    if kind == "fashion-mnist":
        return 28
    if kind == "synthetic":
        return parse_synthetic(name)[1]
    path = Path(name).expanduser()
    first = first_train_image(path)
    side = max(open_image(first).size)
    return side if side <= SMALL_IMAGE_MAX else 224


def dataset_stats(name: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel ``(mean, std)`` of pixels in [0, 1], used to normalise views.

    Fashion-MNIST: its own training-set statistics. Synthetic: 0.5 / 0.22 per channel (about its
    pixel statistics). ImageFolder: ImageNet's, or their luma equivalent for a grey tree.
    """
    kind = _kind(name)
    if kind == "fashion-mnist":
        return FASHION_MNIST_MEAN, FASHION_MNIST_STD
    if kind == "synthetic":
        chans = parse_synthetic(name)[0]
        return (0.5,) * chans, (0.22,) * chans
    path = Path(name).expanduser()
    first = first_train_image(path)
    if mode_of(first) == "L":
        return IMAGENET_GREY_MEAN, IMAGENET_GREY_STD
    return IMAGENET_MEAN, IMAGENET_STD
