"""Labels of any dataset, and seeded class-balanced labelled subsets (the 1 % / 10 % splits)."""

from __future__ import annotations

import math

import torch
from torch.utils.data import Dataset, Subset, TensorDataset

from s2bnn.errors import DataError

__all__ = ["get_targets", "labelled_subset"]


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
