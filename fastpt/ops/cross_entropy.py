"""Softmax cross-entropy over rows of logits with the gradient written in place:
``fastpt::softmax_cross_entropy_`` (CPU; float32, bfloat16, float16, float64).

It is the non-GEMM half of ``fastpt.models.loss.linear_cross_entropy``: for a chunk of
logits it returns each row's loss and overwrites the logits with (softmax - one-hot), the
gradient the head's two backward products need. One kernel reads each row once from memory
and writes it once (``csrc/ops/cross_entropy/``), where eager PyTorch's log_softmax, gather,
exp, scatter and scaling pass over the chunk four to six times.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fastpt.ops._checks import check_same_device


def softmax_cross_entropy_(logits: Tensor, labels: Tensor, *, grad_scale: float = 1.0,
                           ignore_index: int = -100, write_grad: bool = True) -> Tensor:
    """Row losses logsumexp(logits[r]) - logits[r, labels[r]] (0 where labels[r] ==
    ignore_index), in float32 (float64 for float64 logits).

    With ``write_grad``, ``logits`` is overwritten with the gradient of
    ``grad_scale * loss.sum()``: (softmax(logits[r]) - one_hot(labels[r])) * grad_scale, and
    zeros in ignored rows. Arithmetic in float32 (float64 for float64), written back in
    logits' dtype. No autograd (it is a building block of ``linear_cross_entropy``).

    logits: (N, C) CPU tensor with unit stride along C; labels: (N,) int64.

    Raises:
        ValueError: shapes or devices wrong, a label outside [0, C) other than
            ignore_index, C == 0 with rows present.
        TypeError: logits not a float dtype, labels not int64.
    """
    if torch.is_grad_enabled() and logits.requires_grad:
        raise RuntimeError("softmax_cross_entropy_ works in place and has no autograd; "
                           "use fastpt.models.loss.linear_cross_entropy or F.cross_entropy for training")
    return torch.ops.fastpt.softmax_cross_entropy_(logits, labels, grad_scale, ignore_index, write_grad)


@torch.library.register_fake("fastpt::softmax_cross_entropy_")
def _softmax_cross_entropy_fake(logits, labels, grad_scale, ignore_index, write_grad):
    check_same_device("logits", logits, labels=labels)
    torch._check(logits.dim() == 2, lambda: f"logits must be 2-D, got {tuple(logits.shape)}")
    torch._check(labels.dim() == 1 and labels.shape[0] == logits.shape[0],
                 lambda: "labels must have shape (rows,)")
    loss_dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    return logits.new_empty((logits.shape[0],), dtype=loss_dtype)
