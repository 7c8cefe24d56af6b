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

struct Dims {
  int64_t m, n, k;
};

// Shapes of op(a) (m x k) and op(b) (k x n), checked; `what` names the pair in messages.
Dims product_dims(const at::Tensor& a, const at::Tensor& b, bool trans_a, bool trans_b, const char* what) {
  TORCH_CHECK_VALUE(a.dim() == 2 && b.dim() == 2, what, ": a and b must be 2-D, got ", a.sizes(), " and ",
                    b.sizes());
  const at::ScalarType dt = a.scalar_type();
  TORCH_CHECK_TYPE(dt == at::kFloat || dt == at::kDouble || dt == at::kBFloat16, what,
                   ": a must be float32, bfloat16 or float64, got ", dt);
  check_same_dtype(b, a, "gemm: b", "a");
  check_same_device(b, a, "gemm: b", "a");
  const int64_t m = trans_a ? a.size(1) : a.size(0), k = trans_a ? a.size(0) : a.size(1);
  const int64_t kb = trans_b ? b.size(1) : b.size(0), n = trans_b ? b.size(0) : b.size(1);
  TORCH_CHECK_VALUE(k == kb, what, ": inner dimensions differ: op(a) is ", m, " x ", k, ", op(b) is ", kb,
                    " x ", n);
  return {m, n, k};
}

at::Tensor gemm_impl(const at::Tensor& a, const at::Tensor& b, bool trans_a, bool trans_b, const at::Tensor* a2,
                     const at::Tensor* b2, bool trans_a2, bool trans_b2) {
  const Dims d = product_dims(a, b, trans_a, trans_b, "gemm");
  Dims d2{d.m, d.n, 0};
  if (a2 != nullptr) {
    d2 = product_dims(*a2, *b2, trans_a2, trans_b2, "gemm (second product)");
    check_same_dtype(*a2, a, "gemm: a2", "a");
    check_same_device(*a2, a, "gemm: a2", "a");
    TORCH_CHECK_VALUE(d2.m == d.m && d2.n == d.n, "gemm: the second product is ", d2.m, " x ", d2.n,
                      ", the first ", d.m, " x ", d.n);
  }
  const at::ScalarType dt = a.scalar_type();
  // bf16: fp32 accumulation into an fp32 C, rounded once at the end (as torch's bf16 matmul).
  at::Tensor c = at::empty({d.m, d.n}, a.options().dtype(compute_type(dt)));
  if (d.m == 0 || d.n == 0 || d.k + d2.k == 0) return c.zero_().to(dt);
  const DType dtype = float_dtype(a, "gemm: a");  // float32, bfloat16 or float64 (product_dims)
  const Operand A = operand(a, trans_a), B = operand(b, trans_b);
  GemmArgs args{A.trans, B.trans, d.m, d.n, d.k, A.t.const_data_ptr(), A.ld, B.t.const_data_ptr(), B.ld,
                c.mutable_data_ptr(), dtype};
  Operand A2, B2;  // kept alive until the kernel returns
  if (d2.k > 0) {
    A2 = operand(*a2, trans_a2);
    B2 = operand(*b2, trans_b2);
    args.trans_a2 = A2.trans;
    args.trans_b2 = B2.trans;
    args.k2 = d2.k;
    args.a2 = A2.t.const_data_ptr();
    args.lda2 = A2.ld;
    args.b2 = B2.t.const_data_ptr();
    args.ldb2 = B2.ld;
  }
  cpu::gemm(args);
  return c.to(dt);
}

}  // namespace

at::Tensor gemm_tensors(const at::Tensor& a, const at::Tensor& b, bool trans_a, bool trans_b) {
  return gemm_impl(a, b, trans_a, trans_b, nullptr, nullptr, false, false);
}

at::Tensor gemm2_tensors(const at::Tensor& a, const at::Tensor& b, bool trans_a, bool trans_b, const at::Tensor& a2,
                         const at::Tensor& b2, bool trans_a2, bool trans_b2) {
  return gemm_impl(a, b, trans_a, trans_b, &a2, &b2, trans_a2, trans_b2);
}

// c = op(a) op(b), or c += with accumulate: c float32 (float64 for float64 a, b), contiguous
// (m, n). For a product's output reused across calls (no new allocation) and for sums of
// products (a weight gradient over chunks of rows) without a temporary.
void gemm_into_cpu(at::Tensor& c, const at::Tensor& a, const at::Tensor& b, bool trans_a, bool trans_b,
                   bool accumulate) {
  const Dims d = product_dims(a, b, trans_a, trans_b, "gemm_into_");
  const at::ScalarType dt = a.scalar_type(), acc = compute_type(dt);
  TORCH_CHECK_TYPE(c.scalar_type() == acc, "gemm_into_: c must be ", acc, " for ", dt, " a and b, got ",
                   c.scalar_type());
  check_same_device(c, a, "gemm_into_: c", "a");
  TORCH_CHECK_VALUE(c.dim() == 2 && c.size(0) == d.m && c.size(1) == d.n, "gemm_into_: c must have shape (", d.m,
                    ", ", d.n, "), got ", c.sizes());
  TORCH_CHECK_VALUE(c.is_contiguous(), "gemm_into_: c must be contiguous (it is written in place)");
  TORCH_CHECK_VALUE(!c.is_alias_of(a) && !c.is_alias_of(b), "gemm_into_: c must not share memory with a or b");
  if (d.m == 0 || d.n == 0) return;
  if (d.k == 0) {
    if (!accumulate) c.zero_();
    return;
  }
  const Operand A = operand(a, trans_a), B = operand(b, trans_b);
  GemmArgs args{A.trans, B.trans, d.m, d.n, d.k, A.t.const_data_ptr(), A.ld, B.t.const_data_ptr(), B.ld,
                c.mutable_data_ptr(), float_dtype(a, "gemm_into_: a")};
  args.accumulate = accumulate;
  cpu::gemm(args);
}

bool gemm_beats_blas(const at::Tensor& t) {
  return t.is_cpu() && t.scalar_type() == at::kFloat && cpu::own_gemm_active();
}

}  // namespace fastpt

TORCH_LIBRARY_IMPL(fastpt, CPU, m) {
  m.impl("gemm", &fastpt::gemm_tensors);
  m.impl("gemm_into_", &fastpt::gemm_into_cpu);
}
