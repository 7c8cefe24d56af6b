// RMSNorm input checks, shared by the CPU glue (rms_norm_cpu.cpp) and the CUDA glue
// (rms_norm_cuda.cpp) so both devices reject the same inputs with the same messages.
#pragma once

#include <cmath>

#include "common/glue.h"

namespace fastpt {

// rstd and the dw partial sums are kept in the compute type: float32, float64 for float64 x.
inline at::ScalarType rms_norm_stats_dtype(const at::Tensor& x) {
  return compute_type(x.scalar_type());
}

inline void rms_norm_check_inputs(const at::Tensor& x, const at::Tensor& weight) {
  float_dtype(x, "x");
  check_same_dtype(weight, x, "weight", "x");
  check_same_device(weight, x, "weight", "x");
  TORCH_CHECK_VALUE(x.dim() >= 1, "x must have at least 1 dimension, got a scalar");
  TORCH_CHECK_VALUE(weight.dim() == 1 && weight.size(0) == x.size(-1),
                    "weight must have shape (", x.size(-1), ",) to match the last dim of x, got ",
                    weight.sizes());
}

inline void rms_norm_check_eps(double eps) {
  TORCH_CHECK_VALUE(std::isfinite(eps) && eps > 0, "eps must be a positive finite number, got ", eps);
}

inline void rms_norm_check_backward(const at::Tensor& grad_y, const at::Tensor& x,
                                    const at::Tensor& weight, const at::Tensor& rstd) {
  rms_norm_check_inputs(x, weight);
  check_same_dtype(grad_y, x, "grad_y", "x");
  check_same_shape(grad_y, x, "grad_y", "x");
  TORCH_CHECK_TYPE(rstd.scalar_type() == rms_norm_stats_dtype(x), "rstd must be ",
                   rms_norm_stats_dtype(x), " for x of dtype ", x.scalar_type(), ", got ",
                   rstd.scalar_type());
  TORCH_CHECK_VALUE(rstd.numel() == leading_rows(x), "rstd must have one value per row of x");
}

}  // namespace fastpt
