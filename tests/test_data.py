"""Datasets: Fashion-MNIST (real files and fakes), synthetic, ImageFolder, subsets, data info."""

from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

import s2bnn.data.fashion_mnist as fm
from s2bnn.cli import main
from s2bnn.data import (
    build_dataset,
    dataset_info,
    dataset_stats,
    default_image_size,
    get_targets,
    labelled_subset,
)
from s2bnn.errors import DataError

SYSTEM_FILES = [fm.SYSTEM_DIR / f"{s}.gz" for pair in fm._FILES.values() for s in pair]
needs_fmnist = pytest.mark.skipif(
    not all(p.is_file() for p in SYSTEM_FILES),
    reason=f"no Fashion-MNIST idx files in {fm.SYSTEM_DIR} (apt-get install dataset-fashion-mnist)",
)


# --------------------------------------------------------------------------- helpers
def write_idx(path: Path, array: np.ndarray, gz: bool = True) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + np.array(array.shape, dtype=">u4").tobytes()
    data = header + array.astype(np.uint8).tobytes()
    if gz:
        with gzip.open(path.with_name(path.name + ".gz"), "wb") as fh:
            fh.write(data)
    else:
        path.write_bytes(data)


def fake_fmnist(directory: Path, n_train: int = 30, n_test: int = 10, gz: bool = True) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("test", n_test)):
        img_stem, lbl_stem = fm._FILES[split]
        write_idx(directory / img_stem, rng.integers(0, 256, (n, 28, 28)), gz)
        write_idx(directory / lbl_stem, np.arange(n) % 10, gz)
    return directory


@pytest.fixture
def isolated(monkeypatch, tmp_path):
    """No system data, an empty cache, no env var, no network: only what a test provides."""
    monkeypatch.setattr(fm, "SYSTEM_DIR", tmp_path / "system")
    monkeypatch.setattr(fm, "cache_dir", lambda: tmp_path / "cache")
    monkeypatch.delenv(fm.ENV_VAR, raising=False)
    calls: list[Path] = []

    def no_download(target: Path) -> bool:
        calls.append(target)
        return False

    monkeypatch.setattr(fm, "_download", no_download)
    monkeypatch.setattr(fm, "_CACHE", {})
    return calls


def make_tree(root: Path, mode: str = "RGB", classes=("cat", "dog", "emu"), n_train: int = 4,
              n_val: int = 2, size=(20, 18)) -> Path:
    rng = np.random.default_rng(1)
    for split, n in (("train", n_train), ("val", n_val)):
        for cls in classes:
            d = root / split / cls
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                shape = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])
                Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(
                    d / f"{i}.png"
                )
    return root


# --------------------------------------------------------------------------- Fashion-MNIST
@needs_fmnist
def test_fashion_mnist_counts_shapes_labels():
    train = build_dataset("fashion-mnist", "train")
    test = build_dataset("fashion_mnist", "test")
    assert (len(train), len(test)) == (60000, 10000)
    image, label = train[0]
    assert image.shape == (1, 28, 28) and image.dtype == torch.uint8
    assert isinstance(label, int)
    for ds in (train, test):
        assert ds.num_classes == 10 and ds.in_chans == 1 and len(ds.classes) == 10
        assert int(ds.targets.min()) == 0 and int(ds.targets.max()) == 9
        assert torch.bincount(ds.targets).min() > 0
    # The normalisation constants are the training set's own statistics.
    mean, std = dataset_stats("fashion-mnist")
    pixels = train.images.float() / 255
    assert abs(pixels.mean().item() - mean[0]) < 1e-3
    assert abs(pixels.std().item() - std[0]) < 1e-3


@needs_fmnist
def test_fashion_mnist_info_and_limit():
    assert dataset_info("fashion-mnist") == {
        "name": "fashion-mnist", "num_train": 60000, "num_test": 10000, "num_classes": 10,
        "image_shape": [1, 28, 28],
    }
    small = build_dataset("fmnist", limit=100)
    assert len(small) == 100 and len(small.targets) == 100
    assert torch.equal(small.images, build_dataset("fashion-mnist").images[:100])
    assert default_image_size("fashion-mnist") == 28


def test_fashion_mnist_from_root_and_env(isolated, tmp_path, monkeypatch):
    root = fake_fmnist(tmp_path / "mine", n_train=30, n_test=10)
    ds = build_dataset("fashion-mnist", "train", root=str(root))
    assert len(ds) == 30 and ds.images.shape == (30, 1, 28, 28)
    assert dataset_info("fashion-mnist", root=str(root))["num_test"] == 10
    # The env var is used when no root is given; an explicit root comes first.
    env = fake_fmnist(tmp_path / "env", n_train=12, n_test=4, gz=False)
    monkeypatch.setenv(fm.ENV_VAR, str(env))
    assert len(build_dataset("fashion-mnist", "test")) == 4
    assert len(build_dataset("fashion-mnist", "test", root=str(root))) == 10
    assert isolated == []  # nothing was downloaded


def test_fashion_mnist_torchvision_layout(isolated, tmp_path):
    fake_fmnist(tmp_path / "tv" / "FashionMNIST" / "raw", n_train=5, n_test=5)
    assert len(build_dataset("fashion-mnist", root=str(tmp_path / "tv"))) == 5


def test_fashion_mnist_missing_message(isolated, capsys):
    with pytest.raises(DataError) as err:
        build_dataset("fashion-mnist")
    msg = str(err.value)
    assert "\n" not in msg
    assert "apt-get install dataset-fashion-mnist" in msg and fm.ENV_VAR in msg
    assert len(isolated) == 1  # the download was tried once, as a last resort
    assert main(["data", "info", "fashion-mnist", "--json"]) == 2
    stderr = capsys.readouterr().err
    assert stderr.startswith("s2bnn: error: Fashion-MNIST not found") and stderr.count("\n") == 1


def test_fashion_mnist_download_fills_cache(isolated, tmp_path, monkeypatch):
    def fake_download(target: Path) -> bool:
        fake_fmnist(target / "FashionMNIST" / "raw", n_train=7, n_test=3)
        return True

    monkeypatch.setattr(fm, "_download", fake_download)
    assert len(build_dataset("fashion-mnist")) == 7
    assert (tmp_path / "cache" / "FashionMNIST" / "raw").is_dir()


def test_fashion_mnist_truncated_file(isolated, tmp_path):
    root = fake_fmnist(tmp_path / "bad", n_train=20, n_test=5)
    path = root / "train-images-idx3-ubyte.gz"
    data = gzip.decompress(path.read_bytes())
    path.write_bytes(gzip.compress(data[: len(data) // 2]))
    with pytest.raises(DataError, match="train-images-idx3-ubyte.gz is truncated"):
        build_dataset("fashion-mnist", root=str(root))


# --------------------------------------------------------------------------- synthetic
def test_synthetic_default_and_spec():
    a, b = build_dataset("synthetic"), build_dataset("synthetic")
    assert torch.equal(a.images, b.images) and torch.equal(a.targets, b.targets)
    assert a.images.shape == (500, 3, 32, 32) and a.images.dtype == torch.uint8
    assert a.num_classes == 10 and a.in_chans == 3
    test = build_dataset("synthetic", "test")
    assert len(test) == 100 and not torch.equal(test.images[:5], a.images[:5])
    grey = build_dataset("synthetic:1:16:40:4", limit=8)
    assert grey.images.shape == (8, 1, 16, 16)
    assert set(grey.targets.tolist()) == {0, 1, 2, 3}  # shuffled labels: a limit sees all classes
    info = dataset_info("synthetic:1:16:40:4")
    assert info == {"name": "synthetic:1:16:40:4", "num_train": 40, "num_test": 8,
                    "num_classes": 4, "image_shape": [1, 16, 16]}
    assert default_image_size("synthetic:1:16") == 16
    assert dataset_stats("synthetic:1")[0] == (0.5,)


def test_synthetic_is_learnable_from_pixels():
    train, test = build_dataset("synthetic"), build_dataset("synthetic", "test")
    a, b = train.images.flatten(1).float(), test.images.flatten(1).float()
    centre = a.mean(0)
    a = torch.nn.functional.normalize(a - centre, dim=1)
    b = torch.nn.functional.normalize(b - centre, dim=1)
    acc = (train.targets[(b @ a.T).argmax(1)] == test.targets).float().mean().item()
    assert acc > 3 / train.num_classes  # well above chance (0.1)


@pytest.mark.parametrize("spec", ["synthetic:2", "synthetic:x", "synthetic:3:32:0",
                                  "synthetic:1:2:3:4:5"])
def test_synthetic_bad_spec(spec):
    with pytest.raises(DataError, match="synthetic"):
        build_dataset(spec)


# --------------------------------------------------------------------------- ImageFolder
@pytest.mark.parametrize("mode,chans", [("RGB", 3), ("L", 1)])
def test_imagefolder(tmp_path, mode, chans):
    root = make_tree(tmp_path / "tree", mode)
    train = build_dataset(str(root), "train")
    test = build_dataset(str(root), "test")
    assert (len(train), len(test)) == (12, 6)
    assert train.classes == ["cat", "dog", "emu"] and train.num_classes == 3
    assert train.in_chans == chans and test.in_chans == chans
    image, label = train[5]
    assert image.shape == (chans, 18, 20) and image.dtype == torch.uint8
    assert label == 1 and train.targets.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    assert dataset_info(str(root)) == {
        "name": str(root), "num_train": 12, "num_test": 6, "num_classes": 3,
        "image_shape": [chans, 18, 20],
    }
    assert default_image_size(str(root)) == 20  # small images train at their own size
    mean, std = dataset_stats(str(root))
    assert len(mean) == len(std) == chans


def test_imagefolder_limit_covers_classes_and_large_default(tmp_path):
    root = make_tree(tmp_path / "t", classes=("a", "b", "c"), n_train=5, size=(80, 70))
    ds = build_dataset(str(root), limit=4)
    assert len(ds) == 4 and set(ds.targets.tolist()) == {0, 1, 2}
    assert default_image_size(str(root)) == 224


def test_imagefolder_mixed_modes_follow_first_image(tmp_path):
    root = make_tree(tmp_path / "t", "L", classes=("a",), n_train=2, n_val=1)
    Image.new("RGB", (20, 18), (255, 0, 0)).save(root / "train" / "a" / "9.png")
    ds = build_dataset(str(root))
    assert all(ds[i][0].shape == (1, 18, 20) for i in range(len(ds)))


def test_imagefolder_bad_input(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        build_dataset(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no train/ folder"):
        build_dataset(str(tmp_path / "empty"))
    (tmp_path / "noclass" / "train").mkdir(parents=True)
    with pytest.raises(DataError, match="no class folders"):
        dataset_info(str(tmp_path / "noclass"))
    (tmp_path / "noimg" / "train" / "a").mkdir(parents=True)
    (tmp_path / "noimg" / "train" / "a" / "notes.txt").write_text("x")
    with pytest.raises(DataError, match="has no images"):
        build_dataset(str(tmp_path / "noimg"))
    root = make_tree(tmp_path / "noval", classes=("a",))
    shutil.rmtree(root / "val")
    assert dataset_info(str(root))["num_test"] == 0
    with pytest.raises(DataError, match="no val/ folder"):
        build_dataset(str(root), "test")
    extra = make_tree(tmp_path / "extra", classes=("a",))
    (extra / "val" / "zzz").mkdir()
    shutil.copy(extra / "val" / "a" / "0.png", extra / "val" / "zzz" / "0.png")
    with pytest.raises(DataError, match="zzz"):
        build_dataset(str(extra), "test")
    afile = tmp_path / "file.txt"
    afile.write_text("x")
    with pytest.raises(DataError, match="is a file"):
        build_dataset(str(afile))


@pytest.mark.parametrize("name", ["imagenett", "cifar10"])
def test_unknown_dataset_name(name):
    with pytest.raises(DataError, match="unknown dataset") as err:
        build_dataset(name)
    assert "\n" not in str(err.value)


def test_bad_split_and_limit():
    with pytest.raises(DataError, match="split"):
        build_dataset("synthetic", "validation")
    with pytest.raises(DataError, match="limit"):
        build_dataset("synthetic", limit=0)


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_corrupt_image_error_and_skip(tmp_path):
    root = make_tree(tmp_path / "t", classes=("a", "b"), n_train=3, n_val=1)
    bad = root / "train" / "a" / "1.png"
    truncate(bad)
    ds = build_dataset(str(root))
    with pytest.raises(DataError, match="1.png") as err:
        ds[1]
    assert "skip_corrupt" in str(err.value) and "\n" not in str(err.value)
    ds = build_dataset(str(root), skip_corrupt=True)
    images = [ds[i] for i in range(len(ds))]
    assert ds.num_skipped == 1 and ds.corrupt_files == [bad]
    assert images[1][1] == 0 and torch.equal(images[1][0], images[2][0])  # the next image


def test_corrupt_count_seen_across_workers(tmp_path):
    root = make_tree(tmp_path / "t", classes=("a", "b"), n_train=3, n_val=1)
    truncate(root / "train" / "b" / "0.png")
    ds = build_dataset(str(root), skip_corrupt=True)
    batches = list(DataLoader(ds, batch_size=3, num_workers=1))
    assert sum(len(b[1]) for b in batches) == 6
    assert ds.num_skipped == 1


# --------------------------------------------------------------------------- subsets
def test_labelled_subset_balanced_and_reproducible():
    ds = build_dataset("synthetic:1:8:400:4")
    sub = labelled_subset(ds, 0.1, seed=3)
    counts = torch.bincount(get_targets(sub), minlength=4)
    assert counts.tolist() == [10, 10, 10, 10]
    assert torch.equal(sub.targets, get_targets(sub))
    assert sub.num_classes == 4 and sub.in_chans == 1
    again = labelled_subset(ds, 0.1, seed=3)
    assert list(sub.indices) == list(again.indices)
    other = labelled_subset(ds, 0.1, seed=4)
    assert list(sub.indices) != list(other.indices)
    assert len(labelled_subset(ds, 1.0)) == 400
    tiny = labelled_subset(ds, 0.001)  # at least one image per class
    assert sorted(get_targets(tiny).tolist()) == [0, 1, 2, 3]


@pytest.mark.parametrize("fraction", [0.0, -0.1, 1.5])
def test_labelled_subset_bad_fraction(fraction):
    with pytest.raises(DataError, match="fraction"):
        labelled_subset(build_dataset("synthetic:1:8:40:4"), fraction)


# --------------------------------------------------------------------------- CLI
def test_data_info_cli_json(tmp_path, capsys):
    root = make_tree(tmp_path / "tree", "L")
    assert main(["data", "info", str(root), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["num_train"] == 12 and info["num_test"] == 6 and info["image_shape"] == [1, 18, 20]
    assert main(["data", "info", "synthetic:3:16:50:5"]) == 0
    assert "num_train: 50" in capsys.readouterr().out


@needs_fmnist
def test_data_info_cli_fashion_mnist(capsys):
    assert main(["data", "info", "fashion-mnist", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info == {"name": "fashion-mnist", "num_train": 60000, "num_test": 10000,
                    "num_classes": 10, "image_shape": [1, 28, 28]}


def test_data_info_cli_errors(tmp_path, capsys):
    assert main(["data", "info", str(tmp_path / "missing"), "--json"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("s2bnn: error: dataset directory") and err.count("\n") == 1
    assert main(["data", "info", "mnist"]) == 2
    assert "unknown dataset 'mnist'" in capsys.readouterr().err
