"""One evaluation for every row of a results table: a backbone, raw pixels, untrained nets.

All three go through :func:`evaluate_features` (weighted kNN + the fast linear LR sweep), so a
trained student, the same architecture at random init and the flattened images are compared
under exactly the same probe.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn as nn
from torch.utils.data import Dataset

from s2bnn.devices import resolve_device
from s2bnn.eval.features import (
    extract_features,
    extract_pixels,
    make_loader,
    num_classes_of,
    standardize,
)
from s2bnn.eval.knn import knn_eval
from s2bnn.eval.linear_sweep import fast_linear_sweep

# A backbone -> a function computing its eval forward faster, or None (use the module).
FastForward = Callable[[nn.Module], Callable[[torch.Tensor], torch.Tensor] | None]

__all__ = [
    "FastForward",
    "evaluate_features",
    "evaluate_backbone",
    "evaluate_pixels",
    "evaluate_untrained",
    "embedding_sample",
]


def embedding_sample(
    feats: torch.Tensor, labels: torch.Tensor, size: int = 2000, seed: int = 0
) -> dict[str, torch.Tensor]:
    """A seeded random subset of test features for 2-D maps: ``{"features", "labels"}``."""
    gen = torch.Generator()
    gen.manual_seed(seed)
    idx = torch.randperm(len(labels), generator=gen)[:size]
    return {"features": feats[idx].clone(), "labels": labels[idx].clone()}


def evaluate_features(
    train_feats: torch.Tensor,
    train_labels: torch.Tensor,
    test_feats: torch.Tensor,
    test_labels: torch.Tensor,
    *,
    num_classes: int | None = None,
    knn_k: int = 200,
    knn_temperature: float = 0.1,
    linear: bool = True,
    sweep_kwargs: dict[str, Any] | None = None,
    sample_size: int = 0,
    device: str | torch.device = "cpu",
) -> dict[str, Any]:
    """kNN and (optionally) the fast linear sweep on given features.

    Returns ``knn_top1``, ``knn_top5``, ``knn``; with ``linear``: ``linear_top1``,
    ``linear_top5``, ``linear_top1_sgd``, ``linear_top1_adam`` and ``linear`` (the whole sweep).
    With ``sample_size > 0`` also ``embedding_sample`` (tensors, not JSON: pop it before dumping).
    """
    if num_classes is None:
        num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    dev = resolve_device(device)
    knn = knn_eval(train_feats.to(dev), train_labels.to(dev), test_feats.to(dev),
                   test_labels.to(dev), num_classes=num_classes, k=knn_k,
                   temperature=knn_temperature)
    out: dict[str, Any] = {
        "knn_top1": knn["knn_top1"],
        "knn_top5": knn["knn_top5"],
        "knn": knn,
        "feature_dim": int(train_feats.shape[1]),
        "num_train": int(train_feats.shape[0]),
        "num_test": int(test_feats.shape[0]),
    }
    if linear:
        sweep = fast_linear_sweep(train_feats, train_labels, test_feats, test_labels,
                                  num_classes=num_classes, device=dev, **(sweep_kwargs or {}))
        out.update(
            linear_top1=sweep["linear_top1"],
            linear_top5=sweep["linear_top5"],
            linear_top1_sgd=sweep.get("linear_top1_sgd"),
            linear_top1_adam=sweep.get("linear_top1_adam"),
            linear=sweep,
        )
    if sample_size > 0:
        out["embedding_sample"] = embedding_sample(test_feats, test_labels, sample_size)
    return out


def evaluate_backbone(
    backbone: nn.Module,
    train_ds: Dataset,
    test_ds: Dataset,
    *,
    num_classes: int | None = None,
    batch_size: int = 256,
    num_workers: int = 0,
    device: str | torch.device = "auto",
    fast_forward: FastForward | None = None,
    **kwargs: Any,
) -> dict[str, Any]:
    """Extract frozen features of both splits (eval transform expected) and evaluate them.

    ``fast_forward(backbone)`` may return a faster function computing the same eval forward
    (the demo passes the packed 1-bit runtime); ``None`` from it, or no ``fast_forward``, runs
    the module. The result says which ran (``features_by``: ``module`` or ``fast``). Extra
    keyword arguments go to :func:`evaluate_features` (``knn_k``, ``linear``, ``sweep_kwargs``,
    ``sample_size``, ...).
    """
    dev = resolve_device(device)
    backbone = backbone.to(dev)
    forward = fast_forward(backbone) if fast_forward is not None else None
    tr_f, tr_y = extract_features(
        backbone, make_loader(train_ds, batch_size, num_workers=num_workers, device=dev), dev,
        forward)
    te_f, te_y = extract_features(
        backbone, make_loader(test_ds, batch_size, num_workers=num_workers, device=dev), dev,
        forward)
    if num_classes is None:
        num_classes = num_classes_of(train_ds, tr_y, te_y)
    out = evaluate_features(tr_f, tr_y, te_f, te_y, num_classes=num_classes, device=dev,
                            **kwargs)
    out["features_by"] = "module" if forward is None else "fast"
    return out


def _pixels(dataset: Dataset, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    images = getattr(dataset, "images", None)
    targets = getattr(dataset, "targets", None)
    if (isinstance(images, torch.Tensor) and targets is not None
            and getattr(dataset, "transform", None) is None):
        # In-memory uint8 images: skip the per-item path (60k items cost seconds otherwise).
        x = images.flatten(1)
        x = x.float().div_(255.0) if x.dtype == torch.uint8 else x.float()
        return x, torch.as_tensor(targets).long()
    return extract_pixels(make_loader(dataset, batch_size))


def evaluate_pixels(
    train_ds: Dataset,
    test_ds: Dataset,
    *,
    num_classes: int | None = None,
    batch_size: int = 1024,
    device: str | torch.device = "auto",
    **kwargs: Any,
) -> dict[str, Any]:
    """The raw-pixel baseline: flattened images, every pixel standardised with training stats.

    Both kNN and the linear sweep see the standardised pixels (for kNN, centring matters: raw
    [0, 1] pixel vectors all point the same way, and Fashion-MNIST kNN loses ~4 points).
    """
    tr_f, tr_y = _pixels(train_ds, batch_size)
    te_f, te_y = _pixels(test_ds, batch_size)
    tr_f, te_f = standardize(tr_f, te_f)
    if num_classes is None:
        num_classes = num_classes_of(train_ds, tr_y, te_y)
    return evaluate_features(tr_f, tr_y, te_f, te_y, num_classes=num_classes, device=device,
                             **kwargs)


def evaluate_untrained(
    name: str,
    model_kwargs: dict[str, Any],
    train_ds: Dataset,
    test_ds: Dataset,
    *,
    seeds: Sequence[int] = (0, 1, 2),
    **kwargs: Any,
) -> dict[str, Any]:
    """The same architecture at random init, one evaluation per seed, with mean and std.

    Random-init features differ by several points between seeds, so one seed is not a baseline.
    Returns ``seeds``, ``per_seed`` (one :func:`evaluate_backbone` dict each, sweep included) and
    ``knn_top1``/``linear_top1``/``linear_top1_sgd``/``linear_top1_adam`` as means, each with a
    ``*_std``. The first seed's ``embedding_sample`` and ``linear`` sweep are kept for plots.
    """
    from s2bnn.models import build_model

    if not seeds:
        raise ValueError("evaluate_untrained needs at least one seed")
    per_seed = []
    for seed in seeds:
        torch.manual_seed(seed)
        model = build_model(name, **{**model_kwargs, "num_classes": 0})
        per_seed.append(evaluate_backbone(model, train_ds, test_ds, **kwargs))
    out: dict[str, Any] = {"seeds": list(seeds)}
    for key in ("knn_top1", "linear_top1", "linear_top1_sgd", "linear_top1_adam"):
        values = [r[key] for r in per_seed if r.get(key) is not None]
        if not values:
            continue
        mean = sum(values) / len(values)
        out[key] = mean
        out[f"{key}_std"] = math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))
    first = per_seed[0]
    for key in ("linear", "embedding_sample", "feature_dim", "num_train", "num_test",
                "features_by"):
        if key in first:
            out[key] = first[key]
    out["per_seed"] = [{k: v for k, v in r.items() if k != "embedding_sample"} for r in per_seed]
    return out
