// RMSNorm CUDA glue: the CPU glue's checks plus device checks, allocation on x's device,
// launch on the current stream (kernels in rms_norm_kernels.cu).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/zeros_like.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "common/cuda_glue.h"
#include "common/glue.h"
#include "ops/rms_norm/rms_norm_checks.h"
#include "ops/rms_norm/rms_norm_cuda.h"

namespace fastpt {
namespace {

std::tuple<at::Tensor, at::Tensor> rms_norm_cuda(const at::Tensor& x_in, const at::Tensor& weight_in,
                                                 double eps) {
  rms_norm_check_inputs(x_in, weight_in);
  check_cuda(x_in, "x");
  rms_norm_check_eps(eps);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous(), weight = weight_in.contiguous();
  const int64_t n = x.size(-1), rows = leading_rows(x);
  at::Tensor y = at::empty_like(x, at::MemoryFormat::Contiguous);
  const auto rstd_opts = x.options().dtype(rms_norm_stats_dtype(x));
  if (rows == 0 || n == 0) return {y, at::zeros(x.sizes().slice(0, x.dim() - 1), rstd_opts)};
  at::Tensor rstd = at::empty(x.sizes().slice(0, x.dim() - 1), rstd_opts);  // every row written
  check_launch(rms_norm_fwd_cuda({x.const_data_ptr(), weight.const_data_ptr(), y.mutable_data_ptr(),
                                  rstd.mutable_data_ptr(), rows, n, eps, float_dtype(x, "x")},
                                 c10::cuda::getCurrentCUDAStream().stream()),
               "rms_norm");
  return {y, rstd};
}

std::tuple<at::Tensor, at::Tensor> rms_norm_backward_cuda(const at::Tensor& grad_y_in,
                                                          const at::Tensor& x_in,
                                                          const at::Tensor& weight_in,
                                                          const at::Tensor& rstd_in) {
  rms_norm_check_backward(grad_y_in, x_in, weight_in, rstd_in);
  check_cuda(x_in, "x");
  check_same_device(grad_y_in, x_in, "grad_y", "x");
  check_same_device(rstd_in, x_in, "rstd", "x");
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous(), weight = weight_in.contiguous();
  const at::Tensor grad_y = grad_y_in.contiguous(), rstd = rstd_in.contiguous();
  const int64_t n = x.size(-1), rows = leading_rows(x);
  at::Tensor grad_x = at::empty_like(x, at::MemoryFormat::Contiguous);
  if (rows == 0 || n == 0) return {grad_x, at::zeros_like(weight)};
  // One partial row per row-block of the kernel; summed here like the CPU glue does.
  const int64_t num_partials = rms_norm_bwd_cuda_num_partials(rows, n, sm_count(x.device()));
  at::Tensor dw_partial = at::empty({num_partials, n}, x.options().dtype(rms_norm_stats_dtype(x)));
  check_launch(rms_norm_bwd_cuda({grad_y.const_data_ptr(), x.const_data_ptr(), weight.const_data_ptr(),
                                  rstd.const_data_ptr(), grad_x.mutable_data_ptr(),
                                  dw_partial.mutable_data_ptr(), rows, n, num_partials,
                                  float_dtype(x, "x")},
                                 c10::cuda::getCurrentCUDAStream().stream()),
               "rms_norm_backward");
  return {grad_x, dw_partial.sum(0).to(weight.scalar_type())};
}

}  // namespace
}  // namespace fastpt

TORCH_LIBRARY_IMPL(fastpt, CUDA, m) {
  m.impl("rms_norm", &fastpt::rms_norm_cuda);
  m.impl("rms_norm_backward", &fastpt::rms_norm_backward_cuda);
}
