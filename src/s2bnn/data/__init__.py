"""Datasets (Fashion-MNIST, synthetic, ImageFolder), augmentation presets and labelled subsets.

See :mod:`s2bnn.data.datasets` for dataset names (the registry behind :func:`build_dataset`),
:mod:`s2bnn.data.folder` for ImageFolder trees, :mod:`s2bnn.data.synthetic` for the test sets,
:mod:`s2bnn.data.labels` for labels and labelled subsets, and :mod:`s2bnn.data.augment` for the
presets and how they are sized for small images.
"""

from s2bnn.data.augment import (
    PRESETS,
    MultiView,
    build_eval_transform,
    build_train_transform,
    default_mean_std,
    preset_params,
    view_specs,
)
from s2bnn.data.base import InMemoryDataset
from s2bnn.data.batch_augment import BatchMultiView, build_batch_train_transform
from s2bnn.data.datasets import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    build_dataset,
    dataset_info,
    dataset_stats,
    default_image_size,
)
from s2bnn.data.fashion_mnist import FASHION_MNIST_CLASSES, find_fashion_mnist, load_fashion_mnist
from s2bnn.data.folder import ImageFolderDataset, cached_size, to_memory
from s2bnn.data.labels import get_targets, labelled_subset

__all__ = [
    "PRESETS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "FASHION_MNIST_CLASSES",
    "MultiView",
    "InMemoryDataset",
    "ImageFolderDataset",
    "build_dataset",
    "to_memory",
    "cached_size",
    "build_train_transform",
    "build_eval_transform",
    "dataset_info",
    "dataset_stats",
    "default_image_size",
    "default_mean_std",
    "find_fashion_mnist",
    "get_targets",
    "labelled_subset",
    "load_fashion_mnist",
    "preset_params",
    "view_specs",
    "BatchMultiView",
    "build_batch_train_transform",
]
