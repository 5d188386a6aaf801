"""2-D maps of feature vectors (PCA or t-SNE) for the report's feature plot."""

from __future__ import annotations

from typing import Any

import numpy as np

from s2bnn.errors import UserError

__all__ = ["embed_2d"]


def embed_2d(features: Any, method: str = "pca", seed: int = 0) -> np.ndarray:
    """A 2-D embedding of ``(N, D)`` features: ``pca`` (SVD) or ``tsne`` (scikit-learn)."""
    x = np.asarray(features, dtype=np.float64)
    x = x - x.mean(0, keepdims=True)
    if method == "pca":
        if x.shape[1] < 2:
            return np.concatenate([x, np.zeros((len(x), 2 - x.shape[1]))], axis=1)
        _, _, vt = np.linalg.svd(x, full_matrices=False)
        return x @ vt[:2].T
    if method == "tsne":
        from sklearn.manifold import TSNE

        perplexity = float(min(30.0, max(2.0, (len(x) - 1) / 3)))
        return TSNE(n_components=2, init="pca", perplexity=perplexity,
                    random_state=seed).fit_transform(x)
    raise UserError(f"unknown embedding '{method}'; use pca or tsne")
