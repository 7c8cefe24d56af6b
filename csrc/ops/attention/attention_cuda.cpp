// Attention CUDA glue: the CPU glue's checks (attention_checks.h) plus device checks, launch on
// the current stream. bf16 / fp16 go to the tensor-core kernels (attention_wmma_kernels.cu),
// fp32 / fp64 to the SIMT kernels (attention_kernels.cu). The backward's dK, dV come in
// compute-type buffers (fp32 for bf16 / fp16) and are cast to the inputs' dtype here.
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "common/cuda_glue.h"
#include "common/glue.h"
#include "ops/attention/attention_checks.h"
#include "ops/attention/attention_cuda.h"

namespace fastpt {
namespace {

using attention_glue::Inputs;

Inputs check_inputs_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                         const std::optional<at::Tensor>& key_padding_mask,
                         const std::optional<at::Tensor>& attn_bias, bool causal, double scale, double dropout_p,
                         const std::optional<at::Tensor>& dropout_seed) {
  Inputs in = attention_glue::check_inputs(q, k, v, key_padding_mask, attn_bias, causal, scale, dropout_p,
                                           dropout_seed);
  check_cuda(q, "q");
  TORCH_CHECK_VALUE(in.shape.D <= kAttentionCudaMaxHeadDim, "head dim D must be at most ", kAttentionCudaMaxHeadDim,
                    " on CUDA, got ", in.shape.D);
  return in;
}

std::tuple<at::Tensor, at::Tensor> attention_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                  const std::optional<at::Tensor>& key_padding_mask,
                                                  const std::optional<at::Tensor>& attn_bias, bool causal,
                                                  double scale, double dropout_p,
                                                  const std::optional<at::Tensor>& dropout_seed) {
  const Inputs in = check_inputs_cuda(q, k, v, key_padding_mask, attn_bias, causal, scale, dropout_p, dropout_seed);
  const c10::cuda::CUDAGuard guard(q.device());
  at::Tensor out = at::empty(q.sizes(), q.options());
  at::Tensor lse = attention_glue::new_lse(q);
  const AttentionFwdArgs args{in.shape, in.q.const_data_ptr(), in.k.const_data_ptr(), in.v.const_data_ptr(),
                              out.mutable_data_ptr(), lse.mutable_data_ptr()};
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  check_launch(attention_wmma_supported(in.shape) ? attention_wmma_fwd_cuda(args, stream)
                                                  : attention_fwd_cuda(args, stream),
               "attention");
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> attention_backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, const std::optional<at::Tensor>& key_padding_mask,
    const std::optional<at::Tensor>& attn_bias, bool causal, double scale, double dropout_p,
    const std::optional<at::Tensor>& dropout_seed, bool bias_grad) {
  const Inputs in = check_inputs_cuda(q, k, v, key_padding_mask, attn_bias, causal, scale, dropout_p, dropout_seed);
  attention_glue::check_backward(in, grad_out, out, lse);
  TORCH_CHECK_VALUE(!bias_grad || attn_bias.has_value(), "bias_grad needs attn_bias");
  const c10::cuda::CUDAGuard guard(q.device());
  const auto& s = in.shape;
  const auto acc = q.options().dtype(compute_type(q.scalar_type()));
  at::Tensor gq = at::empty(q.sizes(), q.options()), gk = at::zeros(k.sizes(), acc), gv = at::zeros(v.sizes(), acc);
  at::Tensor gbias_full = bias_grad ? at::zeros({s.B, s.H, s.T, s.S}, acc) : at::Tensor();
  const at::Tensor dout = grad_out.contiguous(), o = out.contiguous(), l = lse.contiguous();
  const AttentionBwdArgs args{s, in.q.const_data_ptr(), in.k.const_data_ptr(), in.v.const_data_ptr(),
                              o.const_data_ptr(), dout.const_data_ptr(), l.const_data_ptr(), gq.mutable_data_ptr(),
                              gk.mutable_data_ptr(), gv.mutable_data_ptr(),
                              bias_grad ? gbias_full.mutable_data_ptr() : nullptr};
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  check_launch(attention_wmma_supported(s) ? attention_wmma_bwd_cuda(args, stream) : attention_bwd_cuda(args, stream),
               "attention_backward");
  at::Tensor gb = bias_grad ? attention_glue::reduce_bias_grad(gbias_full, *attn_bias) : at::empty({0}, q.options());
  return {gq, gk.to(k.scalar_type()), gv.to(v.scalar_type()), gb};
}

}  // namespace
}  // namespace fastpt

TORCH_LIBRARY_IMPL(fastpt, CUDA, m) {
  m.impl("attention", &fastpt::attention_cuda);
  m.impl("attention_backward", &fastpt::attention_backward_cuda);
}
