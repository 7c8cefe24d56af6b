// Int8 CPU glue: checks, allocation, the LLM.int8 pipeline of int8_linear, dispatch to the
// CPU kernel build and int8 GEMM path for this machine.
#include <ATen/ops/empty.h>
#include <ATen/ops/nonzero.h>
#include <torch/library.h>

#include <cmath>
#include <cstring>

#include "common/cpu_alloc.h"
#include "common/cpu_dispatch.h"
#include "common/glue.h"
#include "ops/int8/int8.h"
#include "ops/int8/int8_checks.h"
#include "ops/int8/int8_path.h"
#include "ops/int8/int8_weight.h"

FASTPT_DECLARE_CPU_KERNEL(int8_gemm, fastpt::Int8GemmArgs)
FASTPT_DECLARE_CPU_KERNEL(int8_quantize_rows, fastpt::Int8QuantArgs)
FASTPT_DECLARE_CPU_KERNEL(int8_outlier_cols, fastpt::Int8OutlierArgs)
FASTPT_DECLARE_CPU_KERNEL(hash_dropout, fastpt::DropoutArgs)
FASTPT_DECLARE_CPU_KERNEL(int8_pack, fastpt::Int8PackArgs)

namespace fastpt {
namespace {

// The CPU kernels compute 32 x 32 blocks: A gets rows up to a multiple of 32.
constexpr int64_t kRowPad = 32;

DType out_kernel_dtype(at::ScalarType t) {
  return t == at::kBFloat16 ? DType::kBFloat16 : t == at::kHalf ? DType::kFloat16 : DType::kFloat32;
}

// Up to this many outlier columns are added in the GEMM's epilogue (a few multiply-adds
// per output, while the block is in cache); more go to one addmm pass over the output.
// NOTE: 4096 x 4096 x 4096 with 4 outlier columns (2 threads, steady allocator): the
// separate addmm (with index_select and its output pass) cost ~9 ms of the 84 ms layer.
constexpr int64_t kEpilogueOutliersMax = 16;

// out (m, n) = a_pad (rows padded) x packed weight, through the dequantization epilogue,
// plus outlier_x (m, r) outlier_wt (r, n) when given (float32).
void run_gemm(const at::Tensor& a_pad, int64_t m, const at::Tensor& packed, const at::Tensor& colsum,
              int64_t n, const float* scale_a, const float* scale_b, const at::Tensor& bias_f32,
              at::Tensor& out, bool out_int32, const at::Tensor& outlier_x = at::Tensor(),
              const at::Tensor& outlier_wt = at::Tensor()) {
  if (m == 0 || n == 0) return;
  Int8GemmArgs g{a_pad.const_data_ptr<int8_t>(), a_pad.size(1), packed.const_data_ptr<int8_t>(),
                 colsum.const_data_ptr<int32_t>(), m, n, a_pad.size(1), scale_a, scale_b,
                 bias_f32.defined() ? bias_f32.const_data_ptr<float>() : nullptr,
                 out.mutable_data_ptr(), out.size(1), out_int32, out_kernel_dtype(out.scalar_type()),
                 cpu::int8_path()};
  if (outlier_x.defined()) {
    g.outlier_x = outlier_x.const_data_ptr<float>();
    g.outlier_wt = outlier_wt.const_data_ptr<float>();
    g.outlier_rank = outlier_x.size(1);
  }
  cpu::int8_gemm(g);
}

// The CPU kernel for pack_int8_weight (ATen's permute + copy is ~8x slower on int8).
std::tuple<at::Tensor, at::Tensor> pack_int8_weight_cpu(const at::Tensor& w_in) {
  check_int8(w_in, "weight");
  TORCH_CHECK_VALUE(w_in.dim() == 2, "weight must be 2-D (out_features, in_features), got shape ", w_in.sizes());
  const at::Tensor w = w_in.contiguous();
  const int64_t n = w.size(0), k = w.size(1), n_pad = round_up(n, kPadN), k_pad = round_up(k, kPadK);
  at::Tensor packed = at::empty({n_pad / kPanelN, k_pad / 4, kPanelN, 4}, w.options());
  at::Tensor colsum = at::empty({n_pad}, w.options().dtype(at::kInt));
  cpu::int8_pack({w.const_data_ptr<int8_t>(), n, k, packed.mutable_data_ptr<int8_t>(),
                  colsum.mutable_data_ptr<int32_t>()});
  return {packed, colsum};
}

at::Tensor float_bias(const std::optional<at::Tensor>& bias) {
  return bias.has_value() ? bias->to(at::kFloat).contiguous() : at::Tensor();
}

at::Tensor int8_matmul_cpu(const at::Tensor& a, const at::Tensor& b, const std::optional<at::Tensor>& scale_a,
                           const std::optional<at::Tensor>& scale_b, std::optional<at::ScalarType> out_dtype,
                           const std::optional<at::Tensor>& bias) {
  const Int8MatmulPlan plan = int8_matmul_check(a, b, scale_a, scale_b, out_dtype, bias);
  at::Tensor out = advise_huge_pages(at::empty({plan.m, plan.n}, a.options().dtype(plan.out_dtype)));
  if (plan.m == 0 || plan.n == 0) return out;
  if (plan.k == 0) {
    out.zero_();
    if (bias.has_value()) out.add_(*bias);
    return out;
  }
  const auto [packed, colsum] = pack_int8_weight_cpu(b);
  const at::Tensor a_pad = pad_a(a, kRowPad);
  const at::Tensor sa = plan.out_int32 ? at::Tensor() : scale_a->contiguous();
  const at::Tensor sb = plan.out_int32 ? at::Tensor() : scale_b->contiguous();
  run_gemm(a_pad, plan.m, packed, colsum, plan.n, sa.defined() ? sa.const_data_ptr<float>() : nullptr,
           sb.defined() ? sb.const_data_ptr<float>() : nullptr, float_bias(bias), out, plan.out_int32);
  return out;
}

// Outlier mask (cols) of the rows x (rows, cols) contiguous.
at::Tensor outlier_mask(const at::Tensor& x2, DType dtype, double threshold) {
  at::Tensor mask = at::empty({x2.size(1)}, x2.options().dtype(at::kBool));
  if (x2.size(1) == 0) return mask;
  if (x2.size(0) == 0) return mask.zero_();
  cpu::int8_outlier_cols({x2.const_data_ptr(), x2.size(0), x2.size(1), x2.size(1), dtype,
                          static_cast<float>(threshold), reinterpret_cast<uint8_t*>(mask.mutable_data_ptr<bool>())});
  return mask;
}

// Quantizes x2 (rows, cols) into q (>= rows, ldq), skipping the columns skip (int64 indices).
void quantize_into(const at::Tensor& x2, DType dtype, const at::Tensor& skip, at::Tensor& q, float* scale) {
  if (x2.size(0) == 0) return;
  cpu::int8_quantize_rows({x2.const_data_ptr(), x2.size(0), x2.size(1), x2.size(1), dtype,
                           skip.defined() && skip.numel() ? skip.const_data_ptr<int64_t>() : nullptr,
                           skip.defined() ? skip.numel() : 0, nullptr, q.mutable_data_ptr<int8_t>(), q.size(1),
                           scale});
}

std::tuple<at::Tensor, at::Tensor> quantize_rowwise_cpu(const at::Tensor& x, const std::optional<at::Tensor>& skip_cols) {
  const DType dtype = float_dtype(x, "x", false);
  TORCH_CHECK_VALUE(x.dim() >= 1, "x must have at least 1 dim, got a 0-dim tensor");
  const int64_t cols = x.size(-1);
  at::Tensor skip;
  if (skip_cols.has_value()) {
    TORCH_CHECK_TYPE(skip_cols->scalar_type() == at::kBool, "skip_cols must be bool, got ", skip_cols->scalar_type());
    check_same_device(*skip_cols, x, "skip_cols", "x");
    TORCH_CHECK_VALUE(skip_cols->dim() == 1 && skip_cols->size(0) == cols, "skip_cols must have shape (",
                      cols, "), got ", skip_cols->sizes());
    skip = at::nonzero(*skip_cols).view({-1});
  }
  const at::Tensor x2 = x.reshape({leading_rows(x), cols}).contiguous();
  at::Tensor q = at::empty(x.sizes(), x.options().dtype(at::kChar));
  at::Tensor scale = at::empty(x.sizes().slice(0, x.dim() - 1), x.options().dtype(at::kFloat));
  if (cols == 0) return {q, scale.zero_()};
  at::Tensor q2 = q.view({x2.size(0), cols});
  quantize_into(x2, dtype, skip, q2, scale.mutable_data_ptr<float>());
  return {q, scale};
}

at::Tensor outlier_columns_cpu(const at::Tensor& x, double threshold) {
  const DType dtype = float_dtype(x, "x", false);
  TORCH_CHECK_VALUE(x.dim() >= 1, "x must have at least 1 dim, got a 0-dim tensor");
  TORCH_CHECK_VALUE(threshold > 0, "threshold must be > 0, got ", threshold);
  return outlier_mask(x.reshape({leading_rows(x), x.size(-1)}).contiguous(), dtype, threshold);
}

// LLM.int8 forward: outlier columns (any |x| > threshold) in x's precision against the
// dequantized weight columns; the rest row-wise int8 x per-channel int8 weight.
at::Tensor int8_linear_cpu(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& colsum,
                           const at::Tensor& w_scale, int64_t n, const std::optional<at::Tensor>& bias,
                           double threshold) {
  int8_linear_check(x, packed, colsum, w_scale, n, bias, threshold);
  const DType dtype = float_dtype(x, "x", false);
  const int64_t k = x.size(-1), m = leading_rows(x);
  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end());
  out_shape.back() = n;
  at::Tensor out = advise_huge_pages(at::empty(out_shape, x.options()));
  if (m == 0) return out;
  const at::Tensor x2 = x.reshape({m, k}).contiguous();
  at::Tensor outliers;
  if (std::isfinite(threshold)) outliers = at::nonzero(outlier_mask(x2, dtype, threshold)).view({-1});
  // Rows past m (padding) stay zero: the kernel reads whole 32-row blocks.
  const int64_t m_pad = round_up(m, kRowPad);
  at::Tensor q = at::empty({m_pad, round_up(k, kPadK)}, x.options().dtype(at::kChar));
  if (m_pad > m) q.narrow(0, m, m_pad - m).zero_();
  at::Tensor scale = at::empty({m_pad}, x.options().dtype(at::kFloat));
  quantize_into(x2, dtype, outliers, q, scale.mutable_data_ptr<float>());
  at::Tensor out2 = out.view({m, n});
  const at::Tensor ws = w_scale.contiguous();
  const int64_t n_out = outliers.defined() ? outliers.numel() : 0;
  at::Tensor outlier_x, outlier_wt;
  if (n_out > 0 && n_out <= kEpilogueOutliersMax) {
    outlier_x = x2.index_select(1, outliers).to(at::kFloat).contiguous();
    outlier_wt = dequantize_weight_columns(packed, ws, n, k, outliers, at::kFloat).t().contiguous();
  }
  run_gemm(q, m, packed, colsum, n, scale.const_data_ptr<float>(), ws.const_data_ptr<float>(),
           float_bias(bias), out2, false, outlier_x, outlier_wt);
  if (n_out > kEpilogueOutliersMax) {
    const at::Tensor w_cols = dequantize_weight_columns(packed, ws, n, k, outliers, x.scalar_type());
    out2.addmm_(x2.index_select(1, outliers), w_cols.t());
  }
  return out;
}

at::Tensor hash_dropout_cpu(const at::Tensor& x, double p, const std::optional<at::Tensor>& seed) {
  const DType dtype = float_dtype(x, "x");
  const uint64_t s = dropout_seed(seed, p);
  const at::Tensor xc = x.contiguous();
  at::Tensor out = new_output_like(xc);
  if (x.numel() == 0) return out;
  cpu::hash_dropout({xc.const_data_ptr(), out.mutable_data_ptr(), x.numel(), dtype, static_cast<float>(p), s});
  return out;
}

}  // namespace
}  // namespace fastpt

TORCH_LIBRARY_IMPL(fastpt, CPU, m) {
  m.impl("quantize_rowwise", &fastpt::quantize_rowwise_cpu);
  m.impl("pack_int8_weight", &fastpt::pack_int8_weight_cpu);
  m.impl("outlier_columns", &fastpt::outlier_columns_cpu);
  m.impl("int8_matmul", &fastpt::int8_matmul_cpu);
  m.impl("int8_linear", &fastpt::int8_linear_cpu);
  m.impl("hash_dropout", &fastpt::hash_dropout_cpu);
}
