"""``fastpt.nn.Linear``: ``torch.nn.Linear`` (same constructor, parameters and state-dict keys)
whose forward is ``fastpt.ops.linear``: fastpt's GEMM where it beats torch's BLAS (float32 on
non-Intel x86 CPUs with AVX-512), ``F.linear`` everywhere else. ``use_fused = False`` (set by
the models' ``use_fused`` switch) runs ``F.linear`` always."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from fastpt.ops.gemm import linear


class Linear(nn.Linear):
    use_fused = True

    def forward(self, x: Tensor) -> Tensor:
        if self.use_fused:
            return linear(x, self.weight, self.bias)
        return F.linear(x, self.weight, self.bias)
