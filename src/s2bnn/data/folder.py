"""ImageFolder trees: ``DIR/train/<class>/<image>`` and ``DIR/val/<class>/<image>``.

``DIR/test`` stands in when there is no ``val``; split ``test`` reads it. Classes come from
``train``. All images are decoded to the mode of the first training image: 1 channel if it is
grey, else 3. :func:`to_memory` decodes a tree once into an :class:`InMemoryDataset`.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from s2bnn.data.augment import eval_resize_size
from s2bnn.data.base import InMemoryDataset, check_limit, check_split
from s2bnn.errors import DataError

__all__ = [
    "IMAGE_EXTENSIONS",
    "ImageFolderDataset",
    "cached_size",
    "to_memory",
    "class_names",
    "scan",
    "first_train_image",
    "open_image",
    "mode_of",
    "to_tensor",
]

IMAGE_EXTENSIONS = (
    ".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".pbm",
)
_GREY_MODES = ("1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F")


def _list_images(directory: Path) -> list[Path]:
    return sorted(
        p for p in directory.iterdir()
        if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_EXTENSIONS
    )


def _split_dir(root: Path, split: str) -> Path:
    if split == "train":
        path = root / "train"
        if not path.is_dir():
            raise DataError(
                f"{root} has no train/ folder: an ImageFolder tree needs "
                f"{root}/train/<class>/<image>"
            )
        return path
    for sub in ("val", "test"):
        if (root / sub).is_dir():
            return root / sub
    raise DataError(f"{root} has no val/ folder: put evaluation images in {root}/val/<class>/")


def class_names(root: Path) -> list[str]:
    """The class folders of ``root/train``, sorted (label ``i`` is the ``i``-th)."""
    train = _split_dir(root, "train")
    classes = sorted(p.name for p in train.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise DataError(f"no class folders in {train}: put images in {train}/<class>/<image>")
    return classes


def scan(root: Path, split: str, classes: list[str]) -> list[tuple[Path, int]]:
    """``(file, label)`` of every image of ``split``, by class then name; bad trees raise."""
    directory = _split_dir(root, split)
    found = sorted(p.name for p in directory.iterdir() if p.is_dir() and not p.name.startswith("."))
    extra = sorted(set(found) - set(classes))
    if extra:
        raise DataError(
            f"{directory} has class folders that train/ lacks ({', '.join(extra[:5])}): "
            "every evaluation class needs a train/ folder"
        )
    samples: list[tuple[Path, int]] = []
    for label, cls in enumerate(classes):
        cdir = directory / cls
        if not cdir.is_dir():
            continue
        files = _list_images(cdir)
        if not files and split == "train":
            raise DataError(
                f"class folder {cdir} has no images ({', '.join(IMAGE_EXTENSIONS[:5])}, ...): "
                "add images or remove the folder"
            )
        samples += [(f, label) for f in files]
    if not samples:
        raise DataError(
            f"no images in {directory}/<class>/ (extensions {', '.join(IMAGE_EXTENSIONS)})"
        )
    return samples


def open_image(path: Path):
    """The decoded PIL image at ``path``; an unreadable file raises :class:`DataError`."""
    from PIL import Image, UnidentifiedImageError

    try:
        img = Image.open(path)
        img.load()  # decode now: a truncated file fails here, not later
        return img
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as err:
        raise DataError(
            f"cannot decode image {path} ({err}): delete or replace it, or set "
            "data.skip_corrupt=true to skip unreadable images"
        ) from None


def mode_of(path: Path) -> str:
    """``L`` for a grey first image, ``RGB`` otherwise (palette images count as colour)."""
    return "L" if open_image(path).mode in _GREY_MODES else "RGB"


def to_tensor(img, mode: str) -> torch.Tensor:
    """A PIL image converted to ``mode`` as a uint8 ``(C, H, W)`` tensor."""
    if img.mode != mode:
        img = img.convert(mode)
    array = np.asarray(img, dtype=np.uint8)
    if array.ndim == 2:
        array = array[:, :, None]
    return torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous()


def _round_robin(targets: list[int], limit: int) -> list[int]:
    """The first ``limit`` indices when classes are visited in turn (class 0, 1, ..., 0, 1, ...)."""
    by_class: dict[int, list[int]] = {}
    for i, t in enumerate(targets):
        by_class.setdefault(t, []).append(i)
    order: list[int] = []
    queues = [by_class[c] for c in sorted(by_class)]
    depth = 0
    while len(order) < limit and any(depth < len(q) for q in queues):
        order += [q[depth] for q in queues if depth < len(q)]
        depth += 1
    return sorted(order[:limit])


class ImageFolderDataset(Dataset):
    """``DIR/<split>/<class>/<image>``, decoded with PIL on access to uint8 ``(C, H, W)``.

    A corrupt image raises :class:`DataError` naming the file; with ``skip_corrupt=True`` it is
    replaced by the next readable image and counted. The flags live in shared memory, so
    ``num_skipped`` and ``corrupt_files`` also count what DataLoader workers skipped.
    ``limit`` keeps the first N images in a class-interleaved order, so a smoke run still sees
    every class (the tree itself is sorted by class).
    """

    def __init__(
        self, root: str | os.PathLike, split: str = "train",
        transform: Callable[[torch.Tensor], Any] | None = None, limit: int | None = None,
        skip_corrupt: bool = False,
    ) -> None:
        check_split(split)
        check_limit(limit)
        self.root = Path(root).expanduser()
        if not self.root.is_dir():
            raise DataError(f"dataset directory {self.root} does not exist: check the path")
        self.classes = class_names(self.root)
        samples = scan(self.root, split, self.classes)
        if limit is not None and limit < len(samples):
            samples = [samples[i] for i in _round_robin([t for _, t in samples], limit)]
        self.samples = samples
        self.targets = torch.tensor([t for _, t in samples], dtype=torch.int64)
        self.transform = transform
        self.skip_corrupt = skip_corrupt
        self.split = split
        first_train = scan(self.root, "train", self.classes)[0][0] if split != "train" else None
        self.mode = mode_of(first_train or samples[0][0])
        self._bad = torch.zeros(len(samples), dtype=torch.bool).share_memory_()

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def in_chans(self) -> int:
        return 1 if self.mode == "L" else 3

    @property
    def num_skipped(self) -> int:
        """How many corrupt images were skipped so far (all workers)."""
        return int(self._bad.sum())

    @property
    def corrupt_files(self) -> list[Path]:
        return [self.samples[i][0] for i in torch.nonzero(self._bad).flatten().tolist()]

    def __len__(self) -> int:
        return len(self.samples)

    def load(self, index: int) -> torch.Tensor:
        """The decoded image at ``index`` (uint8 ``(C, H, W)``), without the transform."""
        return to_tensor(open_image(self.samples[index][0]), self.mode)

    def load_or_skip(self, index: int) -> torch.Tensor | None:
        """:meth:`load`, or ``None`` for a file that does not decode when corrupt files are
        skipped (it is then marked bad); without ``skip_corrupt`` the error is raised."""
        try:
            return self.load(index)
        except DataError:
            if not self.skip_corrupt:
                raise
            self._bad[index] = True
            return None

    def __getitem__(self, index: int) -> tuple[Any, int]:
        n = len(self.samples)
        for step in range(n):
            i = (index + step) % n
            if self.skip_corrupt and bool(self._bad[i]):
                continue
            image = self.load_or_skip(i)
            if image is None:
                continue
            if self.transform is not None:
                image = self.transform(image)
            # After a skip this is another image, so it carries its own label.
            return image, int(self.targets[i])
        raise DataError(
            f"no readable image in {self.root}/{self.split}: every file failed to decode"
        )

    def __repr__(self) -> str:
        return f"ImageFolderDataset({str(self.root)!r}, split={self.split!r}, n={len(self)})"


def cached_size(dataset: ImageFolderDataset, image_size: int) -> int:
    """Bytes :func:`to_memory` would hold for ``dataset`` at ``image_size``."""
    side = eval_resize_size(image_size)
    return len(dataset) * dataset.in_chans * side * side


def to_memory(dataset: ImageFolderDataset, image_size: int,
              progress: bool = True) -> InMemoryDataset:
    """Decode a folder once into one uint8 tensor, each image resized so its short side is
    :func:`~s2bnn.data.augment.eval_resize_size` and centre-cropped square.

    Training then augments whole batches on the device instead of decoding and transforming
    image by image (for small images several times faster). Random crops see the centre square
    of non-square images. Corrupt files are skipped when the dataset skips them, else raise.
    """
    from torchvision.transforms.v2 import functional as TF
    from tqdm import tqdm

    side = eval_resize_size(image_size)
    images = torch.empty(len(dataset), dataset.in_chans, side, side, dtype=torch.uint8)
    keep = torch.ones(len(dataset), dtype=torch.bool)
    bar = tqdm(range(len(dataset)), desc=f"decoding {dataset.root.name} into memory",
               disable=not progress or len(dataset) < 2000, leave=False, unit="img")
    for i in bar:
        img = dataset.load_or_skip(i)
        if img is None:
            keep[i] = False
            continue
        if img.shape[-2:] != (side, side):
            img = TF.center_crop(TF.resize(img, side, antialias=True), [side, side])
        images[i] = img
    if not bool(keep.any()):
        raise DataError(f"no readable image in {dataset.root}/{dataset.split}: every file "
                        "failed to decode")
    return InMemoryDataset(images[keep], dataset.targets[keep], dataset.classes,
                           name=str(dataset.root))


def first_train_image(root: Path) -> Path:
    """The first image of the first class under ``root/train``: it sets the mode and size rules."""
    return scan(root, "train", class_names(root))[0][0]
