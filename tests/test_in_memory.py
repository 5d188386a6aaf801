"""Small ImageFolders held in memory: decoded once, then augmented per batch like Fashion-MNIST."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from s2bnn.config import config_from_dict
from s2bnn.data import ImageFolderDataset, InMemoryDataset, cached_size, to_memory
from s2bnn.engine import build_parts
from s2bnn.errors import DataError


def _folder(root: Path, sizes=((12, 12), (12, 20), (30, 16)), mode: str = "L") -> Path:
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in ("a", "b"):
            d = root / split / c
            d.mkdir(parents=True)
            for i, (h, w) in enumerate(sizes):
                shape = (h, w) if mode == "L" else (h, w, 3)
                Image.fromarray(rng.integers(0, 255, shape, dtype=np.uint8), mode=mode).save(
                    d / f"{i}.png")
    return root


def test_to_memory_keeps_labels_and_resizes_like_the_eval_transform(tmp_path: Path) -> None:
    from torchvision.transforms.v2 import functional as TF

    ds = ImageFolderDataset(_folder(tmp_path / "d"), "train")
    mem = to_memory(ds, image_size=12, progress=False)
    assert isinstance(mem, InMemoryDataset)
    assert mem.images.shape == (6, 1, 12, 12) and mem.images.dtype == torch.uint8
    assert torch.equal(mem.targets, ds.targets) and mem.classes == ds.classes
    assert torch.equal(mem.images[0], ds.load(0))  # already 12x12: kept as it is
    # A 12x20 image: short side 12 already, centre 12x12 crop; a 30x16 one: resized, cropped.
    assert torch.equal(mem.images[1], TF.center_crop(ds.load(1), [12, 12]))
    expect = TF.center_crop(TF.resize(ds.load(2), 12, antialias=True), [12, 12])
    assert torch.equal(mem.images[2], expect)
    assert cached_size(ds, 12) == mem.images.numel()


def test_to_memory_colour_and_large_sizes(tmp_path: Path) -> None:
    ds = ImageFolderDataset(_folder(tmp_path / "d", sizes=((40, 50),), mode="RGB"), "train")
    mem = to_memory(ds, image_size=96, progress=False)
    assert mem.images.shape == (2, 3, 110, 110)  # 96 / 0.875: room for the random crops


def test_corrupt_file_raises_or_is_skipped(tmp_path: Path) -> None:
    root = _folder(tmp_path / "d")
    (root / "train" / "a" / "bad.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match="bad.png"):
        to_memory(ImageFolderDataset(root, "train"), 12, progress=False)
    ds = ImageFolderDataset(root, "train", skip_corrupt=True)
    mem = to_memory(ds, 12, progress=False)
    assert len(mem) == len(ds) - 1 and ds.num_skipped == 1


@pytest.mark.parametrize("in_memory, held", [(None, True), (True, True), (False, False)])
def test_training_holds_small_folders_in_memory(tmp_path: Path, in_memory, held) -> None:
    root = _folder(tmp_path / "d")
    cfg = config_from_dict({"output_dir": str(tmp_path / "run"), "progress": False,
                            "data": {"name": str(root), "image_size": 12,
                                     "in_memory": in_memory}})
    parts = build_parts(cfg)
    assert isinstance(parts.train_set, InMemoryDataset) is held
    assert (parts.batch_transform is not None) is held
    if held:
        views = parts.batch_transform(parts.train_set.images[:4])
        assert len(views) == 2 and views[0].shape == (4, 1, 12, 12)
