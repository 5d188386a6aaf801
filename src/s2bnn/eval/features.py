"""Feature extraction from a frozen backbone, and the small tensor helpers evaluation shares."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from s2bnn.data.base import InMemoryDataset
from s2bnn.data.labels import get_targets
from s2bnn.devices import resolve_device

__all__ = [
    "to_float_images",
    "make_loader",
    "extract_features",
    "extract_pixels",
    "standardize",
    "topk_accuracy",
    "accuracy_stderr",
    "num_classes_of",
    "supervised_epoch",
    "cache_dataset",
]


def to_float_images(x: Any) -> torch.Tensor:
    """A batch as float: uint8 images are scaled to [0, 1]; a list of views keeps the first."""
    if isinstance(x, (list, tuple)):
        # A train transform returns a list of views; evaluation uses one.
        x = x[0]
    if not isinstance(x, torch.Tensor):
        x = torch.as_tensor(x)
    if x.dtype == torch.uint8:
        return x.float().div_(255.0)
    return x.float()


def make_loader(
    dataset: Dataset, batch_size: int = 256, shuffle: bool = False, num_workers: int = 0,
    drop_last: bool = False, seed: int = 0, device: torch.device | None = None,
) -> DataLoader:
    """A ``DataLoader`` with a seeded shuffle and pinned memory when feeding a GPU."""
    gen = torch.Generator()
    gen.manual_seed(seed)
    return DataLoader(
        dataset, batch_size=batch_size, shuffle=shuffle, num_workers=num_workers,
        drop_last=drop_last, generator=gen,
        pin_memory=device is not None and device.type == "cuda",
        persistent_workers=False,
    )


@torch.no_grad()
def extract_features(
    backbone: nn.Module, loader: Iterable, device: str | torch.device = "cpu",
    forward: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run ``backbone`` over ``loader`` in eval mode without gradients.

    Returns ``(features, labels)`` on the CPU: float32 ``(N, D)`` and int64 ``(N,)``. The module's
    train/eval mode is restored afterwards. ``forward``, when given, computes the features
    instead of the module (e.g. the packed 1-bit runtime of the same network).
    """
    device = resolve_device(device)
    was_training = backbone.training
    backbone.eval()
    run = forward if forward is not None else backbone
    feats: list[torch.Tensor] = []
    labels: list[torch.Tensor] = []
    try:
        for x, y in loader:
            x = to_float_images(x).to(device, non_blocking=True)
            out = run(x)
            if isinstance(out, (tuple, list)):
                out = out[0]
            feats.append(out.flatten(1).float().cpu())
            labels.append(torch.as_tensor(y).long().cpu())
    finally:
        backbone.train(was_training)
    if not feats:
        return torch.zeros(0, 0), torch.zeros(0, dtype=torch.long)
    return torch.cat(feats), torch.cat(labels)


def cache_dataset(dataset: Dataset, max_bytes: int = 1 << 30,
                  batch_size: int = 512) -> Dataset:
    """``dataset``'s transformed images held in memory as one float tensor, when they fit.

    Evaluation reads the same deterministic eval view once per network; decoding and
    transforming it image by image each time costs more than a small network's forward (2.7 s
    per 10,000 Fashion-MNIST images here). Larger than ``max_bytes``: ``dataset`` unchanged.
    """
    n = len(dataset)  # type: ignore[arg-type]
    if n == 0:
        return dataset
    first = to_float_images(dataset[0][0])
    if n * first.numel() * first.element_size() > max_bytes:
        return dataset
    images, labels = extract_pixels(make_loader(dataset, batch_size))
    classes = getattr(dataset, "classes", None)
    if classes is None:
        classes = [str(c) for c in range(num_classes_of(dataset, labels))]
    return InMemoryDataset(images.view(n, *first.shape), labels, classes,
                           name=getattr(dataset, "name", type(dataset).__name__))


def extract_pixels(loader: Iterable) -> tuple[torch.Tensor, torch.Tensor]:
    """Flattened images as features (the raw-pixel baseline): float32 ``(N, C*H*W)``."""
    feats: list[torch.Tensor] = []
    labels: list[torch.Tensor] = []
    for x, y in loader:
        feats.append(to_float_images(x).flatten(1))
        labels.append(torch.as_tensor(y).long())
    if not feats:
        return torch.zeros(0, 0), torch.zeros(0, dtype=torch.long)
    return torch.cat(feats), torch.cat(labels)


def standardize(
    train: torch.Tensor, *others: torch.Tensor, eps: float = 1e-6
) -> tuple[torch.Tensor, ...]:
    """Z-score every column with the mean and std of ``train`` only (no test statistics leak)."""
    mean = train.mean(0, keepdim=True)
    std = train.std(0, keepdim=True, unbiased=False).clamp_min(eps)
    return tuple((t - mean) / std for t in (train, *others))


def accuracy_stderr(accuracy: float, n: int) -> float:
    """The binomial standard error, in points, of an ``accuracy`` in percent measured on ``n``
    test items: how far another draw of as many items would typically move it (about 1.2 points
    at 83 % on 1,000 images, 0.4 on 10,000)."""
    if n <= 0:
        raise ValueError(f"accuracy_stderr needs n >= 1, got {n}")
    p = min(max(accuracy / 100.0, 0.0), 1.0)
    return 100.0 * (p * (1.0 - p) / n) ** 0.5


def topk_accuracy(scores: torch.Tensor, labels: torch.Tensor, ks: tuple[int, ...] = (1, 5)) -> dict:
    """Top-k accuracies in percent; ``k`` larger than the number of classes is skipped."""
    out: dict[str, float] = {}
    n = max(len(labels), 1)
    num_classes = scores.shape[-1]
    for k in ks:
        if k > num_classes:
            continue
        top = scores.topk(k, dim=-1).indices
        hit = (top == labels.view(-1, 1)).any(dim=-1)
        out[f"top{k}"] = 100.0 * hit.sum().item() / n
    return out


def num_classes_of(dataset: Dataset, *labels: torch.Tensor) -> int:
    """``dataset.num_classes`` when present, else one more than the largest label seen."""
    n = getattr(dataset, "num_classes", None)
    if n is None and hasattr(dataset, "dataset"):
        n = getattr(dataset.dataset, "num_classes", None)
    if n is not None:
        return int(n)
    seen = [int(t.max()) + 1 for t in labels if t.numel()]
    if not seen:
        targets = get_targets(dataset)
        if targets.numel():
            seen.append(int(targets.max()) + 1)
    return max(seen) if seen else 0


def supervised_epoch(
    logits_of: Callable[[torch.Tensor], torch.Tensor],
    loader: Iterable,
    optimizer: torch.optim.Optimizer,
    device: torch.device,
    before_step: Callable[[], None] | None = None,
) -> float:
    """One epoch of cross-entropy training over labelled ``loader``; the mean loss per image.

    ``logits_of`` maps a float image batch (on ``device``) to class scores: a frozen backbone and
    a head for the linear probe, the whole classifier for fine-tuning. ``before_step`` runs before
    each batch (a per-step LR schedule).
    """
    total, count = 0.0, 0
    for x, y in loader:
        if before_step is not None:
            before_step()
        x = to_float_images(x).to(device, non_blocking=True)
        y = torch.as_tensor(y).long().to(device)
        loss = F.cross_entropy(logits_of(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total += loss.item() * len(y)
        count += len(y)
    return total / max(count, 1)
