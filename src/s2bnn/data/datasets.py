"""Datasets: Fashion-MNIST, a synthetic set for tests, and any ImageFolder tree.

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

import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, Subset, TensorDataset

from s2bnn.data.augment import eval_resize_size
from s2bnn.data.fashion_mnist import (
    FASHION_MNIST_CLASSES,
    FASHION_MNIST_MEAN,
    FASHION_MNIST_STD,
    fashion_mnist_counts,
    load_fashion_mnist,
)
from s2bnn.errors import DataError

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "IMAGE_EXTENSIONS",
    "InMemoryDataset",
    "ImageFolderDataset",
    "build_dataset",
    "dataset_info",
    "default_image_size",
    "dataset_stats",
    "labelled_subset",
    "get_targets",
    "parse_synthetic",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Grey images of a colour-photo tree: the ImageNet statistics of the luma channel.
IMAGENET_GREY_MEAN = (0.449,)
IMAGENET_GREY_STD = (0.226,)
IMAGE_EXTENSIONS = (
    ".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".pbm",
)
SPLITS = ("train", "test")
# ImageFolder trees whose images are at most this large train at their own size, not at 224.
SMALL_IMAGE_MAX = 64
_FASHION_NAMES = ("fashion-mnist", "fashion_mnist", "fashionmnist", "fmnist")
_SYNTHETIC_DEFAULTS = (3, 32, 500, 10)  # channels, size, train images, classes
_GREY_MODES = ("1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F")


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise DataError(f"unknown split '{split}': use train or test")


def _check_limit(limit: int | None) -> None:
    if limit is not None and limit <= 0:
        raise DataError(f"data.limit must be a positive number of images, got {limit}")


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


# --------------------------------------------------------------------------- in-memory datasets
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


def parse_synthetic(name: str) -> tuple[int, int, int, int]:
    """``synthetic[:C[:H[:N[:K]]]]`` -> ``(channels, size, num_train, num_classes)``."""
    fields = name.split(":")[1:]
    if len(fields) > 4:
        raise DataError(f"bad synthetic spec '{name}': use synthetic[:C[:H[:N[:K]]]]")
    values = list(_SYNTHETIC_DEFAULTS)
    for i, text in enumerate(fields):
        if text == "":
            continue
        try:
            values[i] = int(text)
        except ValueError:
            raise DataError(
                f"bad synthetic spec '{name}': fields are integers, synthetic[:C[:H[:N[:K]]]]"
            ) from None
    chans, size, num_train, num_classes = values
    if chans not in (1, 3) or size < 4 or num_train < 1 or num_classes < 2:
        raise DataError(
            f"bad synthetic spec '{name}': need C in (1, 3), H >= 4, N >= 1 and K >= 2"
        )
    return chans, size, num_train, num_classes


def _synthetic_counts(name: str) -> tuple[int, int]:
    _, _, num_train, num_classes = parse_synthetic(name)
    return num_train, max(num_classes, num_train // 5)


def _make_synthetic(name: str, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Class prototypes (smooth random fields), each image a shifted, rescaled, noisy copy.

    Prototypes depend only on the spec; train and test draw their variations from different seeds,
    so the test set is new images of the same classes.
    """
    chans, size, _, num_classes = parse_synthetic(name)
    num_train, num_test = _synthetic_counts(name)
    n = num_train if split == "train" else num_test
    gen = torch.Generator().manual_seed(1234)
    coarse = torch.rand(num_classes, chans, 4, 4, generator=gen)
    protos = torch.nn.functional.interpolate(
        coarse, size=(size, size), mode="bicubic", align_corners=False
    )
    # Shrink what tells classes apart towards the mean pattern, so the task is not trivial
    # (1-NN on pixels: roughly 60-90 % depending on the spec, not 100 %).
    mean = protos.mean(0, keepdim=True)
    protos = (mean + 0.25 * (protos - mean)).clamp(0, 1)
    gen.manual_seed(1 if split == "train" else 2)
    # Balanced labels in a shuffled order, so `limit` (first N) keeps every class.
    labels = torch.arange(n) % num_classes
    labels = labels[torch.randperm(n, generator=gen)]
    shift = max(1, size // 4)
    dy = torch.randint(-shift, shift + 1, (n,), generator=gen)
    dx = torch.randint(-shift, shift + 1, (n,), generator=gen)
    contrast = 0.7 + 0.6 * torch.rand(n, 1, 1, 1, generator=gen)
    images = protos[labels]
    images = torch.stack(
        [torch.roll(img, (int(a), int(b)), dims=(1, 2)) for img, a, b in zip(images, dy, dx)]
    )
    images = (images - 0.5) * contrast + 0.5 + 0.2 * torch.randn(images.shape, generator=gen)
    images = (images.clamp(0, 1) * 255).round().to(torch.uint8)
    return images, labels.to(torch.int64)


# --------------------------------------------------------------------------- ImageFolder
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


def _class_names(root: Path) -> list[str]:
    train = _split_dir(root, "train")
    classes = sorted(p.name for p in train.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise DataError(f"no class folders in {train}: put images in {train}/<class>/<image>")
    return classes


def _scan(root: Path, split: str, classes: list[str]) -> list[tuple[Path, int]]:
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


def _open_image(path: Path):
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


def _mode_of(path: Path) -> str:
    """``L`` for a grey first image, ``RGB`` otherwise (palette images count as colour)."""
    return "L" if _open_image(path).mode in _GREY_MODES else "RGB"


def _to_tensor(img, mode: str) -> torch.Tensor:
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
        _check_split(split)
        _check_limit(limit)
        self.root = Path(root).expanduser()
        if not self.root.is_dir():
            raise DataError(f"dataset directory {self.root} does not exist: check the path")
        self.classes = _class_names(self.root)
        samples = _scan(self.root, split, self.classes)
        if limit is not None and limit < len(samples):
            samples = [samples[i] for i in _round_robin([t for _, t in samples], limit)]
        self.samples = samples
        self.targets = torch.tensor([t for _, t in samples], dtype=torch.int64)
        self.transform = transform
        self.skip_corrupt = skip_corrupt
        self.split = split
        first_train = _scan(self.root, "train", self.classes)[0][0] if split != "train" else None
        self.mode = _mode_of(first_train or samples[0][0])
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
        return _to_tensor(_open_image(self.samples[index][0]), self.mode)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        n = len(self.samples)
        for step in range(n):
            i = (index + step) % n
            if self.skip_corrupt and bool(self._bad[i]):
                continue
            try:
                image = self.load(i)
            except DataError:
                if not self.skip_corrupt:
                    raise
                self._bad[i] = True
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
        try:
            img = dataset.load(i)
        except DataError:
            if not dataset.skip_corrupt:
                raise
            dataset._bad[i] = True
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


# --------------------------------------------------------------------------- public API
def build_dataset(
    name: str, split: str = "train", transform: Callable[[torch.Tensor], Any] | None = None,
    root: str | None = None, limit: int | None = None, skip_corrupt: bool = False,
) -> Dataset:
    """A dataset of ``(image, label)`` by name: ``fashion-mnist``, ``synthetic[...]`` or a path.

    ``split`` is ``train`` or ``test`` (``val/`` of an ImageFolder tree); ``root`` is where the
    Fashion-MNIST idx files are (searched elsewhere too, see :mod:`s2bnn.data.fashion_mnist`);
    ``limit`` keeps the first N images; ``skip_corrupt`` skips undecodable ImageFolder files.
    """
    _check_split(split)
    _check_limit(limit)
    kind = _kind(name)
    if kind == "folder":
        return ImageFolderDataset(
            name, split, transform=transform, limit=limit, skip_corrupt=skip_corrupt
        )
    if kind == "fashion-mnist":
        images, targets = load_fashion_mnist(split, root)
        classes: Sequence[str] = FASHION_MNIST_CLASSES
    else:
        images, targets = _make_synthetic(name, split)
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
        num_train, num_test = _synthetic_counts(name)
        return {
            "name": name, "num_train": num_train, "num_test": num_test,
            "num_classes": num_classes, "image_shape": [chans, size, size],
        }
    path = Path(name).expanduser()
    classes = _class_names(path)
    train = _scan(path, "train", classes)
    has_val = any((path / s).is_dir() for s in ("val", "test"))
    num_test = len(_scan(path, "test", classes)) if has_val else 0
    first = train[0][0]
    shape = list(_to_tensor(_open_image(first), _mode_of(first)).shape)
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
    first = _scan(path, "train", _class_names(path))[0][0]
    side = max(_open_image(first).size)
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
    first = _scan(path, "train", _class_names(path))[0][0]
    if _mode_of(first) == "L":
        return IMAGENET_GREY_MEAN, IMAGENET_GREY_STD
    return IMAGENET_MEAN, IMAGENET_STD


def get_targets(dataset: Dataset) -> torch.Tensor:
    """Labels of a dataset as an int64 tensor, read without decoding images where possible.

    ``targets`` first, then a ``Subset``'s parent labels and a ``TensorDataset``'s label tensor;
    only a dataset that exposes none of them is iterated.
    """
    targets = getattr(dataset, "targets", None)
    if targets is None and isinstance(dataset, Subset):
        indices = torch.as_tensor(list(dataset.indices), dtype=torch.long)
        return get_targets(dataset.dataset)[indices]
    if targets is None and isinstance(dataset, TensorDataset) and len(dataset.tensors) > 1:
        targets = dataset.tensors[1]  # (image, label) pairs, like every dataset here
    if targets is None:
        targets = [int(dataset[i][1]) for i in range(len(dataset))]  # type: ignore[arg-type]
    return torch.as_tensor(targets, dtype=torch.int64)


def labelled_subset(dataset: Dataset, fraction: float, seed: int = 0) -> Subset:
    """A stratified, seeded subset with ``fraction`` of each class's images (at least one each).

    The same ``(dataset, fraction, seed)`` always gives the same indices (sorted), so the 1 % and
    10 % semi-supervised splits are reproducible across runs and machines.
    """
    if not isinstance(fraction, (int, float)) or not 0.0 < float(fraction) <= 1.0:
        raise DataError(f"labelled fraction must be in (0, 1], got {fraction}: e.g. 0.01 or 0.1")
    targets = get_targets(dataset)
    gen = torch.Generator().manual_seed(int(seed))
    chosen: list[torch.Tensor] = []
    for cls in torch.unique(targets).tolist():
        idx = torch.nonzero(targets == cls).flatten()
        k = max(1, int(math.floor(fraction * len(idx) + 0.5)))
        chosen.append(idx[torch.randperm(len(idx), generator=gen)[:k]])
    indices = torch.sort(torch.cat(chosen)).values.tolist() if chosen else []
    subset = Subset(dataset, indices)
    # Same attributes as the full dataset, so evaluation code can treat both alike.
    subset.targets = targets[torch.as_tensor(indices, dtype=torch.long)]
    for attr in ("classes", "num_classes", "in_chans"):
        if hasattr(dataset, attr):
            setattr(subset, attr, getattr(dataset, attr))
    return subset
