"""What the datasets share: the split names, the ``limit`` check and :class:`InMemoryDataset`.

Fashion-MNIST, the synthetic sets and an ImageFolder tree decoded by
:func:`~s2bnn.data.folder.to_memory` are all an :class:`InMemoryDataset`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch.utils.data import Dataset

from s2bnn.errors import DataError

__all__ = ["SPLITS", "InMemoryDataset", "check_split", "check_limit"]

SPLITS = ("train", "test")


def check_split(split: str) -> None:
    """Raise :class:`DataError` unless ``split`` is ``train`` or ``test``."""
    if split not in SPLITS:
        raise DataError(f"unknown split '{split}': use train or test")


def check_limit(limit: int | None) -> None:
    """Raise :class:`DataError` unless ``limit`` is ``None`` or a positive number of images."""
    if limit is not None and limit <= 0:
        raise DataError(f"data.limit must be a positive number of images, got {limit}")


class InMemoryDataset(Dataset):
    """Images held as one uint8 tensor ``(N, C, H, W)``; indexing returns views, not copies.

    ``images`` is public so evaluation can read whole batches without the per-item path.
    """

    def __init__(
        self, images: torch.Tensor, targets: torch.Tensor, classes: Sequence[str],
        transform: Callable[[torch.Tensor], Any] | None = None, name: str = "",
    ) -> None:
        self.images = images
        self.targets = targets
        self.classes = list(classes)
        self.transform = transform
        self.name = name

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def in_chans(self) -> int:
        return int(self.images.shape[1])

    @property
    def image_shape(self) -> list[int]:
        return [int(s) for s in self.images.shape[1:]]

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def __getitem__(self, index: int) -> tuple[Any, int]:
        image = self.images[index]
        if self.transform is not None:
            image = self.transform(image)
        return image, int(self.targets[index])

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, n={len(self)}, shape={self.image_shape})"
