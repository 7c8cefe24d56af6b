"""fastpt's fused operators: one file per op holds the public function, its fake kernel
(for torch.compile) and its autograd. ``reference`` holds the pure-PyTorch references
that tests and benchmarks compare against."""

from fastpt.ops import reference
from fastpt.ops.attention import attention
from fastpt.ops.cross_entropy import cross_entropy, softmax_cross_entropy_
from fastpt.ops.gemm import gemm, gemm_into_, linear
from fastpt.ops.int8 import (dequantize_rowwise, int8_linear, int8_matmul, outlier_columns, pack_int8_weight,
                             quantize_rowwise, quantize_weight, unpack_int8_weight)
from fastpt.ops.lora import lora_linear
from fastpt.ops.rms_norm import rms_norm
from fastpt.ops.rope import rope, rope_
from fastpt.ops.swiglu import swiglu
from fastpt.ops.value_iteration import value_iteration

__all__ = ["attention", "dequantize_rowwise", "gemm", "gemm_into_", "linear", "int8_linear", "int8_matmul",
           "lora_linear", "outlier_columns", "pack_int8_weight", "quantize_rowwise", "quantize_weight",
           "reference", "rms_norm", "rope", "rope_", "softmax_cross_entropy_", "swiglu", "unpack_int8_weight",
           "value_iteration"]
