"""Fashion-MNIST from its four idx files, held in memory as uint8 tensors.

Where the files are looked for, in order (the first directory holding all four wins):

1. the ``root`` argument (``data.root`` in a recipe, ``--root`` on the command line);
2. the directory in the environment variable ``S2BNN_FASHION_MNIST``;
3. ``/usr/share/datasets/fashion-mnist`` (Debian package ``dataset-fashion-mnist``);
4. the cache directory ``$XDG_CACHE_HOME/s2bnn/fashion-mnist`` (default ``~/.cache/...``).

Each may hold the files directly or in torchvision's ``FashionMNIST/raw`` layout, gzipped or not.
Only when none has them, torchvision's downloader fills the cache directory, and only if the
download host answers within a few seconds (``S2BNN_NO_DOWNLOAD=1`` turns this off). If that fails
too, a :class:`DataError` says how to get the data.
"""

from __future__ import annotations

import gzip
import os
import socket
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import torch

from s2bnn.errors import DataError

__all__ = [
    "FASHION_MNIST_CLASSES",
    "FASHION_MNIST_MEAN",
    "FASHION_MNIST_STD",
    "ENV_VAR",
    "SYSTEM_DIR",
    "cache_dir",
    "find_fashion_mnist",
    "load_fashion_mnist",
    "fashion_mnist_counts",
]

ENV_VAR = "S2BNN_FASHION_MNIST"
SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")

FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
# Per-pixel mean and std of the 60,000 training images, scaled to [0, 1] (tests recompute them).
FASHION_MNIST_MEAN = (0.2860,)
FASHION_MNIST_STD = (0.3530,)

_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_IDX_DTYPE = {0x08: np.uint8}
_HOW_TO_GET = (
    "install it with `apt-get install dataset-fashion-mnist` or point S2BNN_FASHION_MNIST (or "
    "data.root) at a directory holding the four idx files (train-images-idx3-ubyte.gz, ...)"
)
# Loaded arrays, keyed by (file path, split): training, evaluation and info share one copy.
_CACHE: dict[tuple[str, str], tuple[torch.Tensor, torch.Tensor]] = {}


def cache_dir() -> Path:
    """The per-user directory the downloader writes to."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "s2bnn" / "fashion-mnist"


def _candidates(root: str | os.PathLike | None) -> list[Path]:
    dirs: list[Path] = []
    if root is not None:
        dirs.append(Path(root).expanduser())
    env = os.environ.get(ENV_VAR)
    if env:
        dirs.append(Path(env).expanduser())
    dirs += [SYSTEM_DIR, cache_dir()]
    # torchvision's own layout, so a directory it downloaded into works as is.
    out: list[Path] = []
    for d in dirs:
        out += [d, d / "FashionMNIST" / "raw", d / "raw"]
    return out


def _file_in(directory: Path, stem: str) -> Path | None:
    for name in (stem + ".gz", stem):
        path = directory / name
        if path.is_file():
            return path
    return None


def _complete(directory: Path) -> bool:
    return all(_file_in(directory, s) is not None for pair in _FILES.values() for s in pair)


def _network_answers(url: str, timeout: float = 3.0) -> bool:
    parsed = urlparse(url)
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        with socket.create_connection((parsed.hostname, port), timeout=timeout):
            return True
    except OSError:
        return False


def _download(target: Path) -> bool:
    """Try torchvision's downloader into ``target``; any failure returns False."""
    if os.environ.get("S2BNN_NO_DOWNLOAD", "") not in ("", "0"):
        return False
    try:
        from torchvision.datasets import FashionMNIST

        if not any(_network_answers(m) for m in FashionMNIST.mirrors):
            return False
        old = socket.getdefaulttimeout()
        socket.setdefaulttimeout(30.0)  # urllib has no timeout of its own here
        try:
            FashionMNIST(root=str(target), train=True, download=True)
        finally:
            socket.setdefaulttimeout(old)
        return True
    except Exception:  # noqa: BLE001 - any failure means "no download", reported below
        return False


def find_fashion_mnist(root: str | os.PathLike | None = None, download: bool = True) -> Path:
    """The directory holding the four idx files, downloading into the cache as a last resort."""
    searched = _candidates(root)
    for d in searched:
        if _complete(d):
            return d
    if download and _download(cache_dir()):
        for d in _candidates(None)[-3:]:
            if _complete(d):
                return d
    where = ", ".join(str(d) for d in searched[::3])
    raise DataError(f"Fashion-MNIST not found (looked in {where}): {_HOW_TO_GET}")


def _open(path: Path):
    return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")


def _read_header(fh, path: Path) -> tuple[int, tuple[int, ...]]:
    head = fh.read(4)
    if len(head) < 4 or head[0] != 0 or head[1] != 0 or head[2] not in _IDX_DTYPE:
        raise DataError(f"{path} is not an idx file of uint8: re-download it ({_HOW_TO_GET})")
    ndim = head[3]
    dims = np.frombuffer(fh.read(4 * ndim), dtype=">u4")
    if len(dims) != ndim:
        raise DataError(f"{path} is truncated: re-download it ({_HOW_TO_GET})")
    return head[2], tuple(int(d) for d in dims)


def _read_idx(path: Path) -> np.ndarray:
    try:
        with _open(path) as fh:
            code, shape = _read_header(fh, path)
            data = fh.read()
    except (OSError, EOFError, gzip.BadGzipFile) as err:
        raise DataError(f"cannot read {path} ({err}): re-download it ({_HOW_TO_GET})") from None
    expected = int(np.prod(shape))
    if len(data) < expected:
        raise DataError(
            f"{path} is truncated ({len(data)} of {expected} bytes): re-download it ({_HOW_TO_GET})"
        )
    return np.frombuffer(data[:expected], dtype=_IDX_DTYPE[code]).reshape(shape)


def load_fashion_mnist(
    split: str = "train", root: str | os.PathLike | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(images, labels)``: uint8 ``(N, 1, 28, 28)`` and int64 ``(N,)``, cached per process."""
    if split not in _FILES:
        raise DataError(f"unknown split '{split}': use train or test")
    directory = find_fashion_mnist(root)
    img_file = _file_in(directory, _FILES[split][0])
    lbl_file = _file_in(directory, _FILES[split][1])
    assert img_file is not None and lbl_file is not None
    key = (str(img_file.resolve()), split)
    if key not in _CACHE:
        images = _read_idx(img_file)
        labels = _read_idx(lbl_file)
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise DataError(
                f"{img_file} and {lbl_file} do not match (shapes {images.shape} and "
                f"{labels.shape}): re-download them ({_HOW_TO_GET})"
            )
        if labels.size and int(labels.max()) >= len(FASHION_MNIST_CLASSES):
            raise DataError(f"{lbl_file} holds labels above 9: it is not Fashion-MNIST")
        # np.frombuffer arrays are read-only; copy into tensors we own.
        _CACHE[key] = (
            torch.from_numpy(images.copy()).unsqueeze(1),
            torch.from_numpy(labels.astype(np.int64)),
        )
    return _CACHE[key]


def fashion_mnist_counts(root: str | os.PathLike | None = None) -> dict[str, int | list[int]]:
    """Counts and image shape from the idx headers alone (no decompression of the pixels)."""
    directory = find_fashion_mnist(root)
    counts: dict[str, int | list[int]] = {}
    for split, (img_stem, _) in _FILES.items():
        path = _file_in(directory, img_stem)
        assert path is not None
        try:
            with _open(path) as fh:
                _, shape = _read_header(fh, path)
        except (OSError, EOFError, gzip.BadGzipFile) as err:
            raise DataError(f"cannot read {path} ({err}): re-download it ({_HOW_TO_GET})") from None
        if len(shape) != 3:
            raise DataError(f"{path} does not hold a stack of 2-D images (shape {shape})")
        counts[f"num_{split}"] = shape[0]
        counts["image_shape"] = [1, shape[1], shape[2]]
    return counts
