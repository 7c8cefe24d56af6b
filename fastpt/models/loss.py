"""Cross-entropy of a linear head without materialising the logits.

``linear_cross_entropy(x, weight, labels)`` = ``cross_entropy(x @ weight.T, labels)``
(mean over labels != -100), computed in chunks of rows: each chunk's logits exist only
while that chunk is processed, and the gradients w.r.t. x and weight are computed right
there (softmax - one-hot is known in the forward), so the backward is a scaling. For a
Llama step with B*T = 4096 tokens and V = 32000 that avoids two 500 MB fp32 tensors
(logits and their gradient) and their memory traffic, at the same GEMM count.

On CPU the fused path turns each chunk's logits into their gradient in place with one
kernel (``fastpt.ops.softmax_cross_entropy_``); the eager path (``fused=False``, other
devices) does it with log_softmax, exp, scatter and a cast, as PyTorch would.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fastpt.models.common import IGNORE_INDEX, first_label_outside
from fastpt.ops.cross_entropy import softmax_cross_entropy_
from fastpt.ops.gemm import gemm, gemm_into_, uses_gemm

# Rows per chunk: chunk * V fp32 logits = 128 MB (1024 rows at V = 32000). Smaller chunks
# read the (V, d) weight and pass over its (V, d) gradient once more each.
# NOTE: F5 Llama step, 1048 vs 240 rows per chunk (the buffer under glibc's 32 MiB mmap
# threshold), before the in-place weight gradient: fp32 2.78 vs 3.27 s, bf16 1.58 vs 1.94 s.
_CHUNK_ELEMENTS = 32 << 20
_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
# GEMM dtypes fastpt.ops.gemm_into_ sums in float32 (float64) in place.
_ACCUMULATE_DTYPES = (torch.float32, torch.bfloat16, torch.float64)


def _torch_mm(a: Tensor, b: Tensor, trans_a: bool, trans_b: bool) -> Tensor:
    return (a.t() if trans_a else a) @ (b.t() if trans_b else b)


def _eager_softmax_xent_(logits: Tensor, labels: Tensor, valid: Tensor, acc: torch.dtype,
                         write_grad: bool) -> tuple[Tensor, Tensor | None]:
    """(row losses, softmax - one-hot in logits' dtype with ignored rows zero) in eager ops."""
    target = labels.clamp(min=0).unsqueeze(1)
    logp = torch.log_softmax(logits, dim=-1, dtype=acc)
    loss = -logp.gather(1, target).squeeze(1) * valid
    if not write_grad:
        return loss, None
    g = logp.exp_()                                               # softmax, in place
    g.scatter_add_(1, target, torch.full(target.shape, -1.0, dtype=acc, device=g.device))
    # masked and cast to the GEMM dtype in one pass
    return loss, torch.mul(g, valid.unsqueeze(1), out=torch.empty(g.shape, dtype=logits.dtype, device=g.device))


def _check_labels(labels: Tensor, n_rows: int, n_classes: int) -> None:
    """The fused kernel's label checks, over all rows at once, for every path: the eager path's
    clamp read a negative label other than ignore_index as class 0 silently, and its gather
    failed on a label >= V without naming it. One pass over N labels, next to N x V logits."""
    if labels.shape != (n_rows,):
        raise ValueError(f"linear_cross_entropy: labels must have shape ({n_rows}), got {list(labels.shape)}")
    # (On an accelerator, not read: gather's device-side assert still catches >= V.)
    row = first_label_outside(labels, n_classes)
    if row is not None:
        raise ValueError(f"linear_cross_entropy: label {int(labels[row])} in row {row} is outside "
                         f"[0, {n_classes}) and is not ignore_index ({IGNORE_INDEX})")


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, labels: Tensor, fused: bool) -> Tensor:
        N, V = x.shape[0], weight.shape[0]
        chunk = max(1, _CHUNK_ELEMENTS // V)
        device = x.device.type
        acc = torch.promote_types(x.dtype, torch.float32)  # float32 math (float64 for float64)
        # The GEMM dtype: autocast's (as nn.Linear would run) or x's. Cast x and the weight once
        # here, not once per matmul as autocast would.
        mm = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
        x_mm, w_mm = x.to(mm), weight.to(mm)
        mm_ = gemm if fused and uses_gemm(x_mm, w_mm) else _torch_mm
        use_kernel = fused and device == "cpu" and mm in _KERNEL_DTYPES
        valid = labels != IGNORE_INDEX
        count = valid.sum().clamp(min=1).to(acc)
        need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_grad = need_x or need_w
        grad_x = torch.empty(x.shape, dtype=x.dtype, device=x.device) if need_x else None
        grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_w else None
        total = torch.zeros((), dtype=acc, device=x.device)
        own_mm = mm_ is gemm  # float32 products on fastpt's kernel (gemm_dtype)
        logits_buf = None
        with torch.autocast(device, enabled=False):
            for s in range(0, N, chunk):
                xs, ls = x_mm[s:s + chunk], labels[s:s + chunk]
                if use_kernel:
                    # One logits buffer for every chunk: a new 100+ MB tensor per chunk would
                    # page-fault its memory in each time (glibc maps blocks over 32 MiB afresh).
                    if logits_buf is None:
                        logits_buf = torch.empty((min(chunk, N), V), dtype=mm, device=x.device)
                    logits = logits_buf[:xs.shape[0]]
                    if own_mm:
                        gemm_into_(logits, xs, w_mm, False, True)
                    else:
                        torch.mm(xs, w_mm.t(), out=logits)
                    # g is the logits buffer, overwritten with softmax - one-hot
                    loss = softmax_cross_entropy_(logits, ls, ignore_index=IGNORE_INDEX, write_grad=need_grad)
                    g = logits
                else:
                    loss, g = _eager_softmax_xent_(mm_(xs, w_mm, False, True), ls, valid[s:s + chunk], acc, need_grad)
                total += loss.sum()
                # g is the gradient of the summed loss; the mean's 1 / count is applied once,
                # to grad_x and grad_w, in backward.
                if need_x:
                    if own_mm:
                        gemm_into_(grad_x[s:s + chunk], g, w_mm, False, False)
                    else:
                        grad_x[s:s + chunk] = mm_(g, w_mm, False, False)
                if need_w:
                    if use_kernel and mm in _ACCUMULATE_DTYPES:
                        gemm_into_(grad_w, g, xs, True, False, accumulate=True)  # no (V, d) temporary
                    else:
                        grad_w += mm_(g, xs, True, False)
        ctx.save_for_backward(grad_x, grad_w.to(weight.dtype) if need_w else None, count)
        # No label token: NaN (0 / 0), as F.cross_entropy and HF's loss give, with zero gradients
        # (count is clamped to 1 above for those).
        return total / valid.sum().to(acc)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        grad_x, grad_w, count = ctx.saved_tensors
        scale = grad_out / count
        return (None if grad_x is None else grad_x * scale.to(grad_x.dtype),
                None if grad_w is None else grad_w * scale.to(grad_w.dtype), None, None)


def linear_cross_entropy(x: Tensor, weight: Tensor, labels: Tensor, *, fused: bool = True) -> Tensor:
    """Mean cross-entropy of ``x @ weight.T`` against ``labels`` (-100 ignored).

    x: (..., d); weight: (V, d); labels: x.shape[:-1]. Differentiable in x and weight
    (first order only). ``fused``: the products go through ``fastpt.ops.gemm`` where
    ``fastpt.ops.linear`` would, and on CPU each chunk's softmax and gradient through
    ``fastpt.ops.softmax_cross_entropy_`` (False: torch's matmul and eager ops, for the
    models' eager A/B path). With no label token the mean is NaN, as ``F.cross_entropy``'s,
    and the gradients are zero."""
    if not weight.is_floating_point():  # an int8 head's .weight read as if it held real weights
        raise TypeError(f"linear_cross_entropy needs a floating-point weight, got {weight.dtype}")
    x, labels = x.reshape(-1, x.shape[-1]), labels.reshape(-1)
    _check_labels(labels, x.shape[0], weight.shape[0])
    return _LinearCrossEntropy.apply(x, weight, labels, fused)
