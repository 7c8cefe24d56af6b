"""scikit-learn's 8x8 digits (1,797 images, shipped with the package) as the small MNIST-like
set for the autoencoder pre-training experiment: a few labelled images, many unlabelled."""

from __future__ import annotations

import torch


def load_digits_split(n_labeled: int = 100, n_test: int = 597, seed: int = 0) -> dict:
    """Pixels scaled to [0, 1] as float32 (N, 64); a stratified labelled subset of exactly
    ``n_labeled`` images of the training part: ``n_labeled // 10`` per digit, and one more for
    each of the first ``n_labeled % 10`` digits. Returns ``{"unlabeled", "x_labeled",
    "y_labeled", "x_test", "y_test"}``. Raises ``ValueError`` where the training part has too
    few images of a digit."""
    from sklearn.datasets import load_digits
    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target, dtype=torch.long)
    # n_test first, on its own: a negative one sliced from the end, and one too large was
    # reported as a bad n_labeled range.
    if not _is_int(n_test) or not 0 <= n_test <= len(x) - 10:
        raise ValueError(f"n_test must be an integer in [0, {len(x) - 10}] (leaving at least 10 training "
                         f"images), got {n_test!r}")
    if not _is_int(n_labeled) or not 10 <= n_labeled <= len(x) - n_test:
        raise ValueError(f"n_labeled must be an integer in [10, {len(x) - n_test}], got {n_labeled!r}")
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(x), generator=g)
    test, train = order[:n_test], order[n_test:]
    labeled = []
    for c in range(10):
        of_class = train[y[train] == c]
        need = n_labeled // 10 + (c < n_labeled % 10)
        if len(of_class) < need:
            raise ValueError(f"n_labeled={n_labeled} needs {need} labelled images of digit {c}, but the "
                             f"training part (n_test={n_test}, seed={seed}) has {len(of_class)}")
        labeled.append(of_class[:need])
    labeled = torch.cat(labeled)
    return {"unlabeled": x[train], "x_labeled": x[labeled], "y_labeled": y[labeled],
            "x_test": x[test], "y_test": y[test]}


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)
