"""scikit-learn's 8x8 digits (1,797 images, shipped with the package) as the small MNIST-like
set for the autoencoder pre-training experiment: a few labelled images, many unlabelled."""

from __future__ import annotations

import torch


def load_digits_split(n_labeled: int = 100, n_test: int = 597, seed: int = 0) -> dict:
    """Pixels scaled to [0, 1] as float32 (N, 64); a stratified labelled subset of the training
    part. Returns ``{"unlabeled", "x_labeled", "y_labeled", "x_test", "y_test"}``."""
    from sklearn.datasets import load_digits
    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target, dtype=torch.long)
    if not 10 <= n_labeled <= len(x) - n_test:
        raise ValueError(f"n_labeled must be in [10, {len(x) - n_test}], got {n_labeled}")
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(x), generator=g)
    test, train = order[:n_test], order[n_test:]
    per_class = n_labeled // 10
    labeled = torch.cat([train[y[train] == c][:per_class] for c in range(10)])
    return {"unlabeled": x[train], "x_labeled": x[labeled], "y_labeled": y[labeled],
            "x_test": x[test], "y_test": y[test]}
