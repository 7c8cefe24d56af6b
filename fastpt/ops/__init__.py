"""fastpt's fused operators: one file per op holds the public function, its fake kernel
(for torch.compile) and its autograd. ``reference`` holds the pure-PyTorch references
that tests and benchmarks compare against."""

from fastpt.ops import reference
from fastpt.ops.attention import attention
from fastpt.ops.rms_norm import rms_norm
from fastpt.ops.rope import rope, rope_
from fastpt.ops.swiglu import swiglu

__all__ = ["attention", "reference", "rms_norm", "rope", "rope_", "swiglu"]
