// RMSNorm: y = x * rstd * w, rstd = 1 / sqrt(mean(x^2) + eps) over the last dim, in fp32.
// Argument structs shared by the CPU kernel file, the CUDA kernel file and the glue.
#pragma once
#include <cstdint>

#include "common/portable.h"

namespace fastpt {

struct RmsNormFwdArgs {
  const void* x;  // (rows, n) contiguous
  const void* w;  // (n)
  void* y;        // (rows, n) contiguous
  void* rstd;     // (rows) float32; float64 when dtype is kFloat64
  int64_t rows, n;
  double eps;
  DType dtype;
};

struct RmsNormBwdArgs {
  const void* dy;  // (rows, n) contiguous
  const void* x;   // (rows, n) contiguous
  const void* w;   // (n)
  const void* rstd;   // (rows) float32; float64 when dtype is kFloat64
  void* dx;        // (rows, n) contiguous
  void* dw_partial;   // (num_partials, n) scratch of rstd's dtype, one row per parallel chunk
  int64_t rows, n, num_partials;
  DType dtype;
};

// dx = rstd * (dy*w - xhat * mean(dy*w*xhat)),  dw = sum_rows dy * xhat,  xhat = x * rstd
FASTPT_HOST_DEVICE float rms_norm_rstd(float sum_sq, int64_t n, float eps) {
#if defined(__CUDA_ARCH__)
  return rsqrtf(sum_sq / static_cast<float>(n) + eps);
#else
  return 1.0f / __builtin_sqrtf(sum_sq / static_cast<float>(n) + eps);
#endif
}

}  // namespace fastpt
