// RMSNorm CPU glue: checks, allocation, dispatch to the CPU kernel build for this machine.
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/zeros_like.h>
#include <torch/library.h>

#include "common/cpu_dispatch.h"
#include "common/cpu_alloc.h"
#include "common/glue.h"
#include "ops/rms_norm/rms_norm.h"
#include "ops/rms_norm/rms_norm_checks.h"

FASTPT_DECLARE_CPU_KERNEL(rms_norm_fwd, fastpt::RmsNormFwdArgs)
FASTPT_DECLARE_CPU_KERNEL(rms_norm_bwd, fastpt::RmsNormBwdArgs)

namespace fastpt {
namespace {

std::tuple<at::Tensor, at::Tensor> rms_norm_cpu(const at::Tensor& x_in, const at::Tensor& weight_in,
                                                double eps) {
  rms_norm_check_inputs(x_in, weight_in);
  rms_norm_check_eps(eps);
  const at::Tensor x = x_in.contiguous(), weight = weight_in.contiguous();
  const int64_t n = x.size(-1), rows = leading_rows(x);
  at::Tensor y = new_output_like(x);
  at::Tensor rstd =
      at::zeros(x.sizes().slice(0, x.dim() - 1), x.options().dtype(rms_norm_stats_dtype(x)));
  if (rows == 0 || n == 0) return {y, rstd};
  cpu::rms_norm_fwd({x.const_data_ptr(), weight.const_data_ptr(), y.mutable_data_ptr(),
                     rstd.mutable_data_ptr(), rows, n, eps,
                     float_dtype(x, "x")});
  return {y, rstd};
}

std::tuple<at::Tensor, at::Tensor> rms_norm_backward_cpu(const at::Tensor& grad_y_in,
                                                         const at::Tensor& x_in,
                                                         const at::Tensor& weight_in,
                                                         const at::Tensor& rstd_in) {
  rms_norm_check_backward(grad_y_in, x_in, weight_in, rstd_in);
  const at::Tensor x = x_in.contiguous(), weight = weight_in.contiguous();
  const at::Tensor grad_y = grad_y_in.contiguous(), rstd = rstd_in.contiguous();
  const int64_t n = x.size(-1), rows = leading_rows(x);
  at::Tensor grad_x = new_output_like(x);
  if (rows == 0 || n == 0) return {grad_x, at::zeros_like(weight)};
  const int64_t num_partials = std::min<int64_t>(at::get_num_threads(), rows);
  at::Tensor dw_partial = at::empty({num_partials, n}, x.options().dtype(rms_norm_stats_dtype(x)));
  cpu::rms_norm_bwd({grad_y.const_data_ptr(), x.const_data_ptr(), weight.const_data_ptr(),
                     rstd.const_data_ptr(), grad_x.mutable_data_ptr(),
                     dw_partial.mutable_data_ptr(), rows, n, num_partials,
                     float_dtype(x, "x")});
  return {grad_x, dw_partial.sum(0).to(weight.scalar_type())};
}

}  // namespace
}  // namespace fastpt

TORCH_LIBRARY_IMPL(fastpt, CPU, m) {
  m.impl("rms_norm", &fastpt::rms_norm_cpu);
  m.impl("rms_norm_backward", &fastpt::rms_norm_backward_cpu);
}
