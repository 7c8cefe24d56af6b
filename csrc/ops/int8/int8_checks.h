// Int8 op input checks, shared by the CPU glue (int8_cpu.cpp) and the CUDA glue
// (int8_cuda.cpp) so both devices reject the same inputs with the same messages.
#pragma once

#include <ATen/ops/constant_pad_nd.h>

#include <cmath>
#include <optional>

#include "common/glue.h"
#include "ops/int8/int8.h"

namespace fastpt {

// Sums of |a * b| <= 2^14 stay exact in int32 for K < 2^17.
constexpr int64_t kMaxInt8K = (int64_t(1) << 17) - 1;

inline void check_int8(const at::Tensor& t, const char* name) {
  TORCH_CHECK_TYPE(t.scalar_type() == at::kChar, name, " must be int8, got ", t.scalar_type());
}

inline void check_scale(const std::optional<at::Tensor>& s, int64_t n, const char* name,
                        const at::Tensor& ref) {
  TORCH_CHECK_VALUE(s.has_value(), name, " is required unless out_dtype is int32");
  TORCH_CHECK_TYPE(s->scalar_type() == at::kFloat, name, " must be float32, got ", s->scalar_type());
  check_same_device(*s, ref, name, "a");
  TORCH_CHECK_VALUE(s->dim() == 1 && s->size(0) == n, name, " must have shape (", n, "), got ",
                    s->sizes());
}

inline void check_bias(const std::optional<at::Tensor>& bias, int64_t n, const at::Tensor& ref,
                       const char* ref_name) {
  if (!bias.has_value()) return;
  float_dtype(*bias, "bias", false);
  check_same_device(*bias, ref, "bias", ref_name);
  TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == n, "bias must have shape (", n, "), got ",
                    bias->sizes());
}

struct Int8MatmulPlan {
  int64_t m, n, k;
  bool out_int32;
  at::ScalarType out_dtype;
};

inline Int8MatmulPlan int8_matmul_check(const at::Tensor& a, const at::Tensor& b,
                                        const std::optional<at::Tensor>& scale_a,
                                        const std::optional<at::Tensor>& scale_b,
                                        std::optional<at::ScalarType> out_dtype,
                                        const std::optional<at::Tensor>& bias) {
  check_int8(a, "a");
  check_int8(b, "b");
  check_same_device(b, a, "b", "a");
  TORCH_CHECK_VALUE(a.dim() == 2, "a must be 2-D (M, K), got shape ", a.sizes());
  TORCH_CHECK_VALUE(b.dim() == 2, "b must be 2-D (N, K) (nn.Linear weight layout), got shape ", b.sizes());
  TORCH_CHECK_VALUE(a.size(1) == b.size(1), "a and b must have the same inner dim K: a is ", a.sizes(),
                    ", b is ", b.sizes(), " (b is (N, K): out = a @ b.T)");
  TORCH_CHECK_VALUE(a.size(1) <= kMaxInt8K, "K must be < 2^17 for exact int32 sums, got ", a.size(1));
  const bool scaled = scale_a.has_value() || scale_b.has_value();
  const at::ScalarType dt = out_dtype.value_or(scaled ? at::kFloat : at::kInt);
  Int8MatmulPlan plan{a.size(0), b.size(0), a.size(1), dt == at::kInt, dt};
  if (plan.out_int32) {
    TORCH_CHECK_VALUE(!scaled && !bias.has_value(),
                      "out_dtype int32 returns the exact integer sums: scale_a, scale_b and bias must be None");
  } else {
    TORCH_CHECK_TYPE(dt == at::kFloat || dt == at::kBFloat16 || dt == at::kHalf,
                     "out_dtype must be int32, float32, bfloat16 or float16, got ", dt);
    check_scale(scale_a, plan.m, "scale_a", a);
    check_scale(scale_b, plan.n, "scale_b", a);
    check_bias(bias, plan.n, a, "a");
  }
  return plan;
}

// Packed weight of an (n, k) int8 weight: (round_up(n, 32) / 16, round_up(k, 64) / 4, 16, 4).
inline void check_packed(const at::Tensor& packed, const at::Tensor& colsum, const at::Tensor& scale,
                         int64_t n, int64_t k, const at::Tensor& x) {
  check_int8(packed, "weight_packed");
  check_same_device(packed, x, "weight_packed", "x");
  check_same_device(colsum, x, "weight_colsum", "x");
  check_same_device(scale, x, "weight_scale", "x");
  const int64_t n_pad = round_up(n, kPadN), k_pad = round_up(k, kPadK);
  TORCH_CHECK_VALUE(packed.dim() == 4 && packed.size(0) == n_pad / kPanelN &&
                        packed.size(1) == k_pad / 4 && packed.size(2) == kPanelN && packed.size(3) == 4,
                    "weight_packed must be the packed (", n, ", ", k, ") weight of shape (",
                    n_pad / kPanelN, ", ", k_pad / 4, ", 16, 4) (fastpt.ops.pack_int8_weight), got ",
                    packed.sizes(), " (does x's last dim match in_features?)");
  TORCH_CHECK_TYPE(colsum.scalar_type() == at::kInt, "weight_colsum must be int32, got ", colsum.scalar_type());
  TORCH_CHECK_VALUE(colsum.dim() == 1 && colsum.size(0) == n_pad, "weight_colsum must have shape (",
                    n_pad, "), got ", colsum.sizes());
  // The GEMM streams the panels by pointer (a copy per call would hide a slow path).
  TORCH_CHECK_VALUE(packed.is_contiguous() && colsum.is_contiguous(),
                    "weight_packed and weight_colsum must be contiguous, as pack_int8_weight returns "
                    "them (got strides ", packed.strides(), " and ", colsum.strides(), ")");
  TORCH_CHECK_TYPE(scale.scalar_type() == at::kFloat, "weight_scale must be float32, got ", scale.scalar_type());
  TORCH_CHECK_VALUE(scale.dim() == 1 && scale.size(0) == n, "weight_scale must have shape (", n,
                    "), got ", scale.sizes());
}

inline void int8_linear_check(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& colsum,
                              const at::Tensor& scale, int64_t n,
                              const std::optional<at::Tensor>& bias, double threshold) {
  float_dtype(x, "x", false);
  TORCH_CHECK_VALUE(x.dim() >= 1, "x must have at least 1 dim, got a 0-dim tensor");
  TORCH_CHECK_VALUE(n >= 1, "out_features must be >= 1, got ", n);
  TORCH_CHECK_VALUE(threshold > 0, "threshold must be > 0 (inf: no outlier columns), got ", threshold);
  TORCH_CHECK_VALUE(x.size(-1) >= 1 && x.size(-1) <= kMaxInt8K, "in_features must be in [1, 2^17), got ",
                    x.size(-1));
  check_packed(packed, colsum, scale, n, x.size(-1), x);
  check_bias(bias, n, x, "x");
}

// a zero-padded to (round_up(m, row_multiple), round_up(k, 64)), contiguous.
inline at::Tensor pad_a(const at::Tensor& a, int64_t row_multiple) {
  const int64_t m = a.size(0), k = a.size(1);
  const int64_t pm = round_up(m, row_multiple) - m, pk = round_up(k, kPadK) - k;
  return pm || pk ? at::constant_pad_nd(a, {0, pk, 0, pm}, 0) : a.contiguous();
}

}  // namespace fastpt
