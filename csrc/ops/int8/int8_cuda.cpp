// Int8 CUDA glue: the CPU glue's checks, allocation on the input's device, launches on the
// current stream (kernels in int8_kernels.cu). The weight is packed with the ATen-based
// pack_int8_weight (int8_weight.cpp). int8_linear reads the number of outlier columns on
// the host (one synchronisation per call), like bitsandbytes' LLM.int8.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/nonzero.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cmath>

#include "common/cuda_glue.h"
#include "common/glue.h"
#include "ops/int8/int8_checks.h"
#include "ops/int8/int8_cuda.h"
#include "ops/int8/int8_weight.h"

namespace fastpt {
namespace {

cudaStream_t stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

DType out_kernel_dtype(at::ScalarType t) {
  return t == at::kBFloat16 ? DType::kBFloat16 : t == at::kHalf ? DType::kFloat16 : DType::kFloat32;
}

void run_gemm(const at::Tensor& a_pad, int64_t m, const at::Tensor& packed, const at::Tensor& colsum,
              int64_t n, const float* scale_a, const float* scale_b, const at::Tensor& bias_f32,
              at::Tensor& out, bool out_int32) {
  if (m == 0 || n == 0) return;
  check_launch(int8_gemm_cuda({a_pad.const_data_ptr<int8_t>(), a_pad.size(1), packed.const_data_ptr<int8_t>(),
                               colsum.const_data_ptr<int32_t>(), m, n, a_pad.size(1), scale_a, scale_b,
                               bias_f32.defined() ? bias_f32.const_data_ptr<float>() : nullptr,
                               out.mutable_data_ptr(), out.size(1), out_int32,
                               out_kernel_dtype(out.scalar_type()), Int8Path::kScalar},
                              stream()),
               "int8_matmul");
}

at::Tensor float_bias(const std::optional<at::Tensor>& bias) {
  return bias.has_value() ? bias->to(at::kFloat).contiguous() : at::Tensor();
}

at::Tensor int8_matmul_cuda(const at::Tensor& a, const at::Tensor& b, const std::optional<at::Tensor>& scale_a,
                            const std::optional<at::Tensor>& scale_b, std::optional<at::ScalarType> out_dtype,
                            const std::optional<at::Tensor>& bias) {
  const Int8MatmulPlan plan = int8_matmul_check(a, b, scale_a, scale_b, out_dtype, bias);
  check_cuda(a, "a");
  const c10::cuda::CUDAGuard guard(a.device());
  at::Tensor out = at::empty({plan.m, plan.n}, a.options().dtype(plan.out_dtype));
  if (plan.m == 0 || plan.n == 0) return out;
  if (plan.k == 0) {
    out.zero_();
    if (bias.has_value()) out.add_(*bias);
    return out;
  }
  const auto [packed, colsum] = pack_int8_weight(b);
  const at::Tensor a_pad = pad_a(a, 1);
  const at::Tensor sa = plan.out_int32 ? at::Tensor() : scale_a->contiguous();
  const at::Tensor sb = plan.out_int32 ? at::Tensor() : scale_b->contiguous();
  run_gemm(a_pad, plan.m, packed, colsum, plan.n, sa.defined() ? sa.const_data_ptr<float>() : nullptr,
           sb.defined() ? sb.const_data_ptr<float>() : nullptr, float_bias(bias), out, plan.out_int32);
  return out;
}

at::Tensor outlier_mask(const at::Tensor& x2, DType dtype, double threshold) {
  at::Tensor mask = at::empty({x2.size(1)}, x2.options().dtype(at::kBool));
  if (x2.size(1) == 0) return mask;
  if (x2.size(0) == 0) return mask.zero_();
  check_launch(int8_outlier_cols_cuda({x2.const_data_ptr(), x2.size(0), x2.size(1), x2.size(1), dtype,
                                       static_cast<float>(threshold),
                                       reinterpret_cast<uint8_t*>(mask.mutable_data_ptr<bool>())},
                                      stream()),
               "outlier_columns");
  return mask;
}

void quantize_into(const at::Tensor& x2, DType dtype, const at::Tensor& skip_mask, at::Tensor& q, float* scale) {
  if (x2.size(0) == 0) return;
  check_launch(int8_quantize_rows_cuda({x2.const_data_ptr(), x2.size(0), x2.size(1), x2.size(1), dtype, nullptr, 0,
                                        skip_mask.defined()
                                            ? reinterpret_cast<const uint8_t*>(skip_mask.const_data_ptr<bool>())
                                            : nullptr,
                                        q.mutable_data_ptr<int8_t>(), q.size(1), scale},
                                       stream()),
               "quantize_rowwise");
}

std::tuple<at::Tensor, at::Tensor> quantize_rowwise_cuda(const at::Tensor& x,
                                                         const std::optional<at::Tensor>& skip_cols) {
  const DType dtype = float_dtype(x, "x", false);
  TORCH_CHECK_VALUE(x.dim() >= 1, "x must have at least 1 dim, got a 0-dim tensor");
  check_cuda(x, "x");
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t cols = x.size(-1);
  at::Tensor skip;
  if (skip_cols.has_value()) {
    TORCH_CHECK_TYPE(skip_cols->scalar_type() == at::kBool, "skip_cols must be bool, got ", skip_cols->scalar_type());
    check_same_device(*skip_cols, x, "skip_cols", "x");
    TORCH_CHECK_VALUE(skip_cols->dim() == 1 && skip_cols->size(0) == cols, "skip_cols must have shape (",
                      cols, "), got ", skip_cols->sizes());
    skip = skip_cols->contiguous();
  }
  const at::Tensor x2 = x.reshape({leading_rows(x), cols}).contiguous();
  at::Tensor q = at::empty(x.sizes(), x.options().dtype(at::kChar));
  at::Tensor scale = at::empty(x.sizes().slice(0, x.dim() - 1), x.options().dtype(at::kFloat));
  if (cols == 0) return {q, scale.zero_()};
  at::Tensor q2 = q.view({x2.size(0), cols});
  quantize_into(x2, dtype, skip, q2, scale.mutable_data_ptr<float>());
  return {q, scale};
}

at::Tensor outlier_columns_cuda(const at::Tensor& x, double threshold) {
  const DType dtype = float_dtype(x, "x", false);
  TORCH_CHECK_VALUE(x.dim() >= 1, "x must have at least 1 dim, got a 0-dim tensor");
  TORCH_CHECK_VALUE(threshold > 0, "threshold must be > 0, got ", threshold);
  check_cuda(x, "x");
  const c10::cuda::CUDAGuard guard(x.device());
  return outlier_mask(x.reshape({leading_rows(x), x.size(-1)}).contiguous(), dtype, threshold);
}

at::Tensor int8_linear_cuda(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& colsum,
                            const at::Tensor& w_scale, int64_t n, const std::optional<at::Tensor>& bias,
                            double threshold) {
  int8_linear_check(x, packed, colsum, w_scale, n, bias, threshold);
  check_cuda(x, "x");
  const c10::cuda::CUDAGuard guard(x.device());
  const DType dtype = float_dtype(x, "x", false);
  const int64_t k = x.size(-1), m = leading_rows(x);
  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end());
  out_shape.back() = n;
  at::Tensor out = at::empty(out_shape, x.options());
  if (m == 0) return out;
  const at::Tensor x2 = x.reshape({m, k}).contiguous();
  at::Tensor mask, outliers;
  if (std::isfinite(threshold)) {
    mask = outlier_mask(x2, dtype, threshold);
    outliers = at::nonzero(mask).view({-1});
  }
  at::Tensor q = at::empty({m, round_up(k, kPadK)}, x.options().dtype(at::kChar));
  at::Tensor scale = at::empty({m}, x.options().dtype(at::kFloat));
  quantize_into(x2, dtype, outliers.defined() && outliers.numel() ? mask : at::Tensor(), q,
                scale.mutable_data_ptr<float>());
  at::Tensor out2 = out.view({m, n});
  const at::Tensor ws = w_scale.contiguous();
  run_gemm(q, m, packed, colsum, n, scale.const_data_ptr<float>(), ws.const_data_ptr<float>(), float_bias(bias),
           out2, false);
  if (outliers.defined() && outliers.numel() > 0) {
    const at::Tensor w_cols = dequantize_weight_columns(packed, ws, n, k, outliers, x.scalar_type());
    out2.addmm_(x2.index_select(1, outliers), w_cols.t());
  }
  return out;
}

at::Tensor hash_dropout_cuda(const at::Tensor& x, double p, const std::optional<at::Tensor>& seed) {
  const DType dtype = float_dtype(x, "x");
  const uint64_t s = dropout_seed(seed, p);  // the seed tensor may live on the host
  check_cuda(x, "x");
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor xc = x.contiguous();
  at::Tensor out = at::empty_like(xc);
  if (x.numel() == 0) return out;
  check_launch(int8_dropout_cuda({xc.const_data_ptr(), out.mutable_data_ptr(), x.numel(), dtype,
                                  static_cast<float>(p), s},
                                 stream()),
               "hash_dropout");
  return out;
}

}  // namespace
}  // namespace fastpt

TORCH_LIBRARY_IMPL(fastpt, CUDA, m) {
  m.impl("quantize_rowwise", &fastpt::quantize_rowwise_cuda);
  m.impl("outlier_columns", &fastpt::outlier_columns_cuda);
  m.impl("int8_matmul", &fastpt::int8_matmul_cuda);
  m.impl("int8_linear", &fastpt::int8_linear_cuda);
  m.impl("hash_dropout", &fastpt::hash_dropout_cuda);
}
