"""``fastpt.nn.Linear``: ``torch.nn.Linear`` (same constructor, parameters and state-dict keys)
whose forward is ``fastpt.ops.linear``: fastpt's GEMM where it beats torch's BLAS (float32 on
non-Intel x86 CPUs with AVX-512), ``F.linear`` everywhere else. ``use_fused = False`` (set by
the models' ``use_fused`` switch) runs ``F.linear`` always.

Inference under autocast (grad mode off) keeps the weight's copy in the autocast dtype across
calls instead of casting the weight on every call as autocast does: for a BERT-base forward
in bf16 that cast is ~9% of the time. The copy is the tensor autocast would make (same
rounding); it is remade when the weight changes (an optimizer step or load_state_dict bumps
its version counter, ``.to()`` gives new storage) and costs one extra copy of the weight in
that dtype (``del module._autocast_weight`` frees it)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastpt.ops.gemm import linear


class Linear(nn.Linear):
    use_fused = True

    def forward(self, x: Tensor) -> Tensor:
        if self.use_fused:
            return linear(x, self._inference_weight(x), self.bias)
        return F.linear(x, self.weight, self.bias)

    def _inference_weight(self, x: Tensor) -> Tensor:
        """The weight, or in inference under autocast its cached copy in the autocast dtype."""
        w, device = self.weight, x.device.type
        if torch.is_grad_enabled() or not torch.is_autocast_enabled(device) or torch.compiler.is_compiling():
            return w
        dtype = torch.get_autocast_dtype(device)
        if w.dtype == dtype or w.dtype != torch.float32 or w.device != x.device:
            return w
        stamp = (w.data_ptr(), w._version, dtype)
        hit = self.__dict__.get("_autocast_weight")
        if hit is not None and hit[0] == stamp:
            return hit[1]
        self.__dict__.pop("_autocast_weight", None)  # free the stale copy before making the new one
        copy = w.detach().to(dtype)
        self.__dict__["_autocast_weight"] = (stamp, copy)
        return copy
