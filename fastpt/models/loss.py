"""Cross-entropy of a linear head without materialising the logits.

``linear_cross_entropy(x, weight, labels)`` = ``cross_entropy(x @ weight.T, labels)``
(mean over labels != -100), computed in chunks of rows: each chunk's logits exist only
while that chunk is processed, and the gradients w.r.t. x and weight are computed right
there (softmax - one-hot is known in the forward), so the backward is a scaling. For a
Llama step with B*T = 4096 tokens and V = 32000 that avoids two 500 MB fp32 tensors
(logits and their gradient) and their memory traffic, at the same GEMM count.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fastpt.models.common import IGNORE_INDEX

# Rows per chunk: chunk * V fp32 logits = 128 MB (1024 rows at V = 32000). Smaller chunks
# cost more float32 conversions of the (V, d) weight-gradient partial sums under autocast.
_CHUNK_ELEMENTS = 32 << 20


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, labels: Tensor) -> Tensor:
        N, V = x.shape[0], weight.shape[0]
        chunk = max(1, _CHUNK_ELEMENTS // V)
        acc = torch.promote_types(x.dtype, torch.float32)  # float32 math (float64 for float64)
        valid = labels != IGNORE_INDEX
        count = valid.sum().clamp(min=1).to(acc)
        need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_x = torch.empty_like(x) if need_x else None
        grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_w else None
        total = torch.zeros((), dtype=acc, device=x.device)
        for s in range(0, N, chunk):
            xs, ls, vs = x[s:s + chunk], labels[s:s + chunk], valid[s:s + chunk]
            logits = (xs @ weight.t()).to(acc)            # under autocast: a bf16 GEMM, as nn.Linear
            lse = logits.logsumexp(-1)
            target = ls.clamp(min=0).unsqueeze(1)
            total += ((lse - logits.gather(1, target).squeeze(1)) * vs).sum()
            if need_x or need_w:
                g = logits.sub_(lse.unsqueeze(1)).exp_()    # softmax, in place of the logits
                g.scatter_add_(1, target, torch.full_like(target, -1, dtype=g.dtype))
                g.mul_((vs / count).unsqueeze(1))
                g = g.to(x.dtype)
                if need_x:
                    grad_x[s:s + chunk] = g @ weight.to(x.dtype)
                if need_w:
                    grad_w += (g.t() @ xs).to(acc)
        ctx.save_for_backward(grad_x, grad_w.to(weight.dtype) if need_w else None)
        return total / count

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        grad_x, grad_w = ctx.saved_tensors
        return (None if grad_x is None else grad_x * grad_out.to(grad_x.dtype),
                None if grad_w is None else grad_w * grad_out.to(grad_w.dtype), None)


def linear_cross_entropy(x: Tensor, weight: Tensor, labels: Tensor) -> Tensor:
    """Mean cross-entropy of ``x @ weight.T`` against ``labels`` (-100 ignored).

    x: (..., d); weight: (V, d); labels: x.shape[:-1]. Differentiable in x and weight
    (first order only)."""
    return _LinearCrossEntropy.apply(x.reshape(-1, x.shape[-1]), weight, labels.reshape(-1))
