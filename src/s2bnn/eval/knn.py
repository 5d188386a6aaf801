"""Weighted k-nearest-neighbour classification on L2-normalised features.

Each test sample takes its ``k`` most cosine-similar training samples; neighbour ``i`` votes for
its class with weight ``exp(s_i / T)`` (the weighted vote of InstDisc, also used by DINO), and the
class scores are the summed weights. Labels never touch the features: this is a monitor of
representation quality, not a trained classifier.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from s2bnn.eval.features import topk_accuracy

__all__ = ["knn_scores", "knn_eval"]


@torch.no_grad()
def knn_scores(
    train_feats: torch.Tensor,
    train_labels: torch.Tensor,
    test_feats: torch.Tensor,
    num_classes: int,
    k: int = 200,
    temperature: float = 0.1,
    chunk_size: int = 1024,
) -> torch.Tensor:
    """Class scores ``(N_test, num_classes)`` of the weighted kNN vote.

    The test set is processed in chunks of ``chunk_size`` so the similarity matrix never holds
    more than ``chunk_size x N_train`` entries. ``k`` is clipped to the training-set size.
    """
    if k <= 0:
        raise ValueError(f"k must be > 0, got {k}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    train = F.normalize(train_feats.float(), dim=1)
    test = F.normalize(test_feats.float(), dim=1)
    labels = train_labels.long().to(train.device)
    k = min(k, train.shape[0])
    out = torch.empty(test.shape[0], num_classes, dtype=torch.float32, device=train.device)
    for start in range(0, test.shape[0], chunk_size):
        sims = test[start:start + chunk_size] @ train.T
        top_sims, top_idx = sims.topk(k, dim=1)
        weights = (top_sims / temperature).exp()
        votes = torch.zeros(sims.shape[0], num_classes, device=train.device)
        votes.scatter_add_(1, labels[top_idx], weights)
        out[start:start + chunk_size] = votes
    return out


def knn_eval(
    train_feats: torch.Tensor,
    train_labels: torch.Tensor,
    test_feats: torch.Tensor,
    test_labels: torch.Tensor,
    num_classes: int | None = None,
    k: int = 200,
    temperature: float = 0.1,
    chunk_size: int = 1024,
) -> dict:
    """kNN top-1 (and top-5 when there are at least 5 classes) in percent, with its settings."""
    if num_classes is None:
        num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    scores = knn_scores(train_feats, train_labels, test_feats, num_classes, k, temperature,
                        chunk_size)
    acc = topk_accuracy(scores.cpu(), test_labels.cpu())
    return {
        "knn_top1": acc["top1"],
        "knn_top5": acc.get("top5"),
        "k": min(k, int(train_feats.shape[0])),
        "temperature": temperature,
        "num_train": int(train_feats.shape[0]),
        "num_test": int(test_feats.shape[0]),
    }
