// gemm CPU glue: checks, output, dispatch to the CPU kernel build for this machine.
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "common/cpu_dispatch.h"
#include "common/glue.h"
#include "ops/gemm/gemm.h"
#include "ops/gemm/gemm_glue.h"

FASTPT_DECLARE_CPU_KERNEL(gemm, fastpt::GemmArgs)

namespace fastpt {
namespace {

// A view the kernel can read: 2-D with unit stride along one dim. Returns the tensor to read
// (t, or a contiguous copy), whether it is read transposed, and its row stride.
struct Operand {
  at::Tensor t;
  bool trans;
  int64_t ld;
};

Operand operand(const at::Tensor& x, bool trans) {
  if (x.stride(1) == 1 && x.stride(0) >= std::max<int64_t>(1, x.size(1))) return {x, trans, x.stride(0)};
  // The transpose of a row-major matrix is column-major: read it as the other layout.
  if (x.stride(0) == 1 && x.stride(1) >= std::max<int64_t>(1, x.size(0))) return {x.t(), !trans, x.stride(1)};
  at::Tensor y = x.contiguous();
  return {y, trans, std::max<int64_t>(1, y.size(1))};
}

}  // namespace

at::Tensor gemm_tensors(const at::Tensor& a, const at::Tensor& b, bool trans_a, bool trans_b) {
  TORCH_CHECK_VALUE(a.dim() == 2 && b.dim() == 2, "gemm: a and b must be 2-D, got ", a.sizes(), " and ",
                    b.sizes());
  const at::ScalarType dt = a.scalar_type();
  TORCH_CHECK_TYPE(dt == at::kFloat || dt == at::kDouble || dt == at::kBFloat16,
                   "gemm: a must be float32, bfloat16 or float64, got ", dt);
  check_same_dtype(b, a, "gemm: b", "a");
  check_same_device(b, a, "gemm: b", "a");
  const int64_t m = trans_a ? a.size(1) : a.size(0), k = trans_a ? a.size(0) : a.size(1);
  const int64_t kb = trans_b ? b.size(1) : b.size(0), n = trans_b ? b.size(0) : b.size(1);
  TORCH_CHECK_VALUE(k == kb, "gemm: inner dimensions differ: op(a) is ", m, " x ", k, ", op(b) is ", kb,
                    " x ", n);
  // bf16: fp32 accumulation into an fp32 C, rounded once at the end (as torch's bf16 matmul).
  at::Tensor c = at::empty({m, n}, a.options().dtype(dt == at::kDouble ? at::kDouble : at::kFloat));
  if (m == 0 || n == 0 || k == 0) return c.zero_().to(dt);
  const Operand A = operand(a, trans_a), B = operand(b, trans_b);
  const DType dtype = dt == at::kDouble ? DType::kFloat64 : dt == at::kBFloat16 ? DType::kBFloat16 : DType::kFloat32;
  cpu::gemm({A.trans, B.trans, m, n, k, A.t.const_data_ptr(), A.ld, B.t.const_data_ptr(), B.ld,
             c.mutable_data_ptr(), dtype});
  return c.to(dt);
}

bool gemm_beats_blas(const at::Tensor& t) {
  return t.is_cpu() && t.scalar_type() == at::kFloat && cpu::own_gemm_active();
}

}  // namespace fastpt

TORCH_LIBRARY_IMPL(fastpt, CPU, m) { m.impl("gemm", &fastpt::gemm_tensors); }
