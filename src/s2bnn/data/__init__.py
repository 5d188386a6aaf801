"""Datasets (Fashion-MNIST, synthetic, ImageFolder), augmentation presets and labelled subsets.

See :mod:`s2bnn.data.datasets` for dataset names and :mod:`s2bnn.data.augment` for the presets and
how they are sized for small images.
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
from s2bnn.data.batch_augment import BatchMultiView, build_batch_train_transform
from s2bnn.data.datasets import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ImageFolderDataset,
    InMemoryDataset,
    build_dataset,
    cached_size,
    dataset_info,
    dataset_stats,
    default_image_size,
    get_targets,
    labelled_subset,
    to_memory,
)
from s2bnn.data.fashion_mnist import FASHION_MNIST_CLASSES, find_fashion_mnist, load_fashion_mnist

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
