// RMSNorm: y = x * rstd * w, rstd = 1 / sqrt(mean(x^2) + eps) over the last dim (fp32 math;
// double for float64).
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

// Backward: dx = rstd * (dy*w - xhat * mean(dy*w*xhat)), dw = sum_rows dy * xhat, xhat = x * rstd.

}  // namespace fastpt
