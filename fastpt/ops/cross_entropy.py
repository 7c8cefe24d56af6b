"""Softmax cross-entropy over rows of logits with the gradient written in place:
``fastpt::softmax_cross_entropy_`` (CPU; float32, bfloat16, float16, float64), and
:func:`cross_entropy`, ``F.cross_entropy`` for class logits built on it.

It is the non-GEMM half of ``fastpt.models.loss.linear_cross_entropy``: for a chunk of
logits it returns each row's loss and overwrites the logits with (softmax - one-hot), the
gradient the head's two backward products need. One kernel reads each row once from memory
and writes it once (``csrc/ops/cross_entropy/``), where eager PyTorch's log_softmax, gather,
exp, scatter and scaling pass over the chunk four to six times.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from torch.autograd.function import once_differentiable

from fastpt.ops._checks import check_float, check_same_device, check_type, check_value, compute_dtype, dtype_name, sizes

_REDUCTIONS = ("mean", "sum")


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


class _CrossEntropy(torch.autograd.Function):
    """loss_scale * sum_r loss_r with gradient grad_scale * d(sum_r loss_r)/dlogits (the two
    differ only without rows to average: NaN and 0). The forward keeps the gradient (one
    kernel pass over a copy of the logits)."""

    @staticmethod
    def forward(ctx, logits: Tensor, labels: Tensor, ignore_index: int, grad_scale: float,
                loss_scale: float) -> Tensor:
        # The gradient for grad_output 1 is written into a copy of the logits, in their dtype:
        # no float32 upcast of the (N, C) logits, no log-softmax kept for backward.
        grad = logits.detach().clone(memory_format=torch.contiguous_format)
        rows = torch.ops.fastpt.softmax_cross_entropy_(grad, labels, grad_scale, ignore_index, True)
        ctx.save_for_backward(grad)
        return rows.sum() * loss_scale

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor):
        (grad,) = ctx.saved_tensors
        # loss.backward() passes 1: the saved gradient is the answer (no pass over it, no new
        # (N, C) tensor). Never scaled in place, so a second backward (retain_graph) reads it
        # unchanged. The product keeps grad's dtype, computed in float32 (a GradScaler's
        # 65536 would overflow float16 if cast first).
        if torch.compiler.is_compiling() or grad_out.item() != 1.0:
            grad = grad * grad_out
        return grad, None, None, None, None


def cross_entropy(logits: Tensor, labels: Tensor, *, ignore_index: int = -100,
                  reduction: str = "mean", num_items: int | Tensor | None = None) -> Tensor:
    """``F.cross_entropy(logits.float(), labels, ignore_index=, reduction=)`` for (N, C) class
    logits, differentiable, without the float32 copies: on CPU one kernel pass computes the
    row losses in float32 and the gradient (softmax - one-hot) in the logits' dtype
    (:func:`softmax_cross_entropy_` on a copy), which backward returns as it is. Without
    autograd (``no_grad``, or logits that do not require grad) only the losses: one read of
    the logits, no copy. Elsewhere (CUDA) it is that ``F.cross_entropy`` call.

    reduction: "mean" over the rows whose label is not ``ignore_index`` (NaN when there are
    none, as ``F.cross_entropy``; the gradient is then zero) or "sum". ``num_items``: divide
    the sum by it instead (transformers' ``num_items_in_batch`` for gradient accumulation).
    The loss is float32 (float64 for float64 logits).

    Raises:
        ValueError: logits not (N, C), labels not (N,), a label outside [0, C) other than
            ignore_index, unknown reduction, num_items <= 0, devices differ.
        TypeError: logits not a float dtype, labels not an integer dtype.
    """
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    if not isinstance(logits, Tensor) or not logits.dtype.is_floating_point:
        raise TypeError(f"logits must be a float tensor, got {getattr(logits, 'dtype', type(logits).__name__)}")
    if not isinstance(labels, Tensor) or labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise TypeError(f"labels must be an integer tensor, got {getattr(labels, 'dtype', type(labels).__name__)}")
    check_same_device("logits", logits, labels=labels)
    if logits.dim() != 2 or labels.shape != logits.shape[:1]:
        raise ValueError(f"logits must be (N, C) and labels (N,), got {tuple(logits.shape)} and {tuple(labels.shape)}")
    labels = labels.long()
    if num_items is not None and not (isinstance(num_items, Tensor) and num_items.device.type != "cpu"):
        if not float(num_items) > 0:  # (a CUDA tensor is not read here: no host synchronisation)
            raise ValueError(f"num_items must be > 0 (the count the summed loss is divided by), "
                             f"got {float(num_items)}")
    if logits.device.type != "cpu":
        acc = logits if logits.dtype == torch.float64 else logits.float()
        loss = F.cross_entropy(acc, labels, ignore_index=ignore_index,
                               reduction="sum" if num_items is not None else reduction)
        return loss / num_items if num_items is not None else loss
    if num_items is not None:
        scale = 1.0 / float(num_items)
    elif reduction == "sum":
        scale = 1.0
    elif torch.compiler.is_compiling():  # the count stays a tensor: reading it would break the graph
        count = (labels != ignore_index).sum()
        total = cross_entropy(logits, labels, ignore_index=ignore_index, reduction="sum")
        # nothing to average: a NaN loss with a zero gradient, as F.cross_entropy
        return total / count.clamp(min=1) + torch.where(count > 0, 0.0, float("nan"))
    else:
        count = int((labels != ignore_index).sum())
        scale = 1.0 / count if count else float("nan")  # nothing to average: NaN, as F.cross_entropy
    if not (torch.is_grad_enabled() and logits.requires_grad):  # evaluation: one read, no copy
        rows_in = logits if logits.stride(-1) == 1 else logits.contiguous()
        return torch.ops.fastpt.softmax_cross_entropy_(rows_in, labels, 1.0, ignore_index, False).sum() * scale
    # (the gradient without rows to average is zero, as F.cross_entropy's)
    return _CrossEntropy.apply(logits, labels, ignore_index, 0.0 if scale != scale else scale, scale)


@torch.library.register_fake("fastpt::softmax_cross_entropy_")
def _softmax_cross_entropy_fake(logits, labels, grad_scale, ignore_index, write_grad):
    # The checks of csrc/ops/cross_entropy/cross_entropy_cpu.cpp (labels in [0, C) need the data: real op only)
    what = "softmax_cross_entropy_"
    check_float(logits, f"{what}: logits")
    check_value(logits.dim() == 2, lambda: f"{what}: logits must be 2-D (rows, classes), got {sizes(logits)}")
    rows, cols = logits.shape
    check_value(logits.stride(1) == 1 or cols <= 1, lambda: f"{what}: logits must have unit stride along classes "
                f"(it is written in place), got strides {list(logits.stride())}")
    check_value(not write_grad or rows <= 1 or logits.stride(0) >= cols, lambda: f"{what}: logits rows overlap "
                f"(row stride {logits.stride(0)} < {cols} classes); with write_grad it is written in place")
    check_type(labels.dtype == torch.int64, lambda: f"{what}: labels must be int64, got {dtype_name(labels.dtype)}")
    check_value(labels.dim() == 1 and labels.shape[0] == rows,
                lambda: f"{what}: labels must have shape ({rows}), got {sizes(labels)}")
    check_same_device("logits", logits, **{f"{what}: labels": labels})
    check_value(rows == 0 or cols > 0, lambda: f"{what}: logits has no classes (shape {sizes(logits)})")
    return logits.new_empty((rows,), dtype=compute_dtype(logits.dtype))
