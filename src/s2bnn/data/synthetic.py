"""The synthetic datasets ``synthetic[:C[:H[:N[:K]]]]``: class patterns plus noise, for tests.

``C`` channels (3), ``H`` x ``H`` pixels (32), ``N`` training images (500), ``K`` classes (10) and
``max(K, N // 5)`` test images. Deterministic, learnable by kNN on pixels, fast.
"""

from __future__ import annotations

import torch

from s2bnn.errors import DataError

__all__ = ["parse_synthetic", "synthetic_counts", "make_synthetic"]

_SYNTHETIC_DEFAULTS = (3, 32, 500, 10)  # channels, size, train images, classes


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


def synthetic_counts(name: str) -> tuple[int, int]:
    """``(num_train, num_test)`` of a synthetic spec: ``N`` and ``max(K, N // 5)``."""
    _, _, num_train, num_classes = parse_synthetic(name)
    return num_train, max(num_classes, num_train // 5)


def make_synthetic(name: str, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Class prototypes (smooth random fields), each image a shifted, rescaled, noisy copy.

    Prototypes depend only on the spec; train and test draw their variations from different seeds,
    so the test set is new images of the same classes.
    """
    chans, size, _, num_classes = parse_synthetic(name)
    num_train, num_test = synthetic_counts(name)
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
