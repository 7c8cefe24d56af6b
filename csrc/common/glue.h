// Helpers for the small glue files that turn tensors into kernel arguments.
// Only glue (*_cpu.cpp, *_cuda.cpp, fastpt.cpp) includes torch headers.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include "common/portable.h"

namespace fastpt {

// TypeError naming `name` unless t is float32 / bfloat16 / float16 (or float64 where allowed).
inline DType float_dtype(const at::Tensor& t, const char* name, bool allow_float64 = true) {
  switch (t.scalar_type()) {
    case at::kFloat: return DType::kFloat32;
    case at::kBFloat16: return DType::kBFloat16;
    case at::kHalf: return DType::kFloat16;
    case at::kDouble:
      if (allow_float64) return DType::kFloat64;
      [[fallthrough]];
    default:
      TORCH_CHECK_TYPE(false, name, " must be float32, bfloat16 or float16",
                       allow_float64 ? " (or float64)" : "", ", got ", t.scalar_type());
  }
}

// The compute type of kernels reading t: float64 for float64, float32 for every other float
// dtype (the type of accumulators, statistics and lse outputs).
inline at::ScalarType compute_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

inline void check_same_dtype(const at::Tensor& t, const at::Tensor& ref, const char* name,
                             const char* ref_name) {
  // (None for a Tensor argument arrives undefined: its dtype would read "UNKNOWN_SCALAR")
  TORCH_CHECK_TYPE(t.defined(), name, " must be a tensor, got None");
  TORCH_CHECK_TYPE(t.scalar_type() == ref.scalar_type(), name, " must have the dtype of ", ref_name,
                   " (", ref.scalar_type(), "), got ", t.scalar_type());
}

inline void check_same_device(const at::Tensor& t, const at::Tensor& ref, const char* name,
                              const char* ref_name) {
  TORCH_CHECK_VALUE(t.device() == ref.device(), name, " must be on the device of ", ref_name, " (",
                    ref.device(), "), got ", t.device());
}

inline void check_same_shape(const at::Tensor& t, const at::Tensor& ref, const char* name,
                             const char* ref_name) {
  TORCH_CHECK_VALUE(t.sizes() == ref.sizes(), name, " must have the shape of ", ref_name, " ",
                    ref.sizes(), ", got ", t.sizes());
}

// Rows of the last dim: product of all leading dims (1 for a 1-D tensor).
inline int64_t leading_rows(const at::Tensor& t) {
  int64_t rows = 1;
  for (int64_t d = 0; d + 1 < t.dim(); ++d) rows *= t.size(d);
  return rows;
}

}  // namespace fastpt
