"""Input checks for the fake kernels: the C++ glue checks real tensors, but a tensor on
another device (e.g. "meta") sends the call to the fake kernel instead, so it checks too."""

from __future__ import annotations

from torch import Tensor


def check_same_device(ref_name: str, ref: Tensor, **others: Tensor | None) -> None:
    """ValueError naming the first of ``others`` that is not on ``ref``'s device."""
    for name, t in others.items():
        if t is not None and t.device != ref.device:
            raise ValueError(f"{name} must be on the device of {ref_name} ({ref.device}), got {t.device}")
