// Attention CPU glue: checks (attention_checks.h), outputs, dispatch to the CPU kernel build.
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include "common/cpu_alloc.h"
#include "common/cpu_dispatch.h"
#include "common/glue.h"
#include "ops/attention/attention.h"
#include "ops/attention/attention_checks.h"

FASTPT_DECLARE_CPU_KERNEL(attention_fwd, fastpt::AttentionFwdArgs)
FASTPT_DECLARE_CPU_KERNEL(attention_bwd, fastpt::AttentionBwdArgs)

namespace fastpt {
namespace {

using attention_glue::check_inputs;
using attention_glue::Inputs;

std::tuple<at::Tensor, at::Tensor> attention_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                 const std::optional<at::Tensor>& key_padding_mask,
                                                 const std::optional<at::Tensor>& attn_bias, bool causal,
                                                 double scale, double dropout_p,
                                                 const std::optional<at::Tensor>& dropout_seed) {
  const Inputs in = check_inputs(q, k, v, key_padding_mask, attn_bias, causal, scale, dropout_p, dropout_seed);
  at::Tensor out = advise_huge_pages(at::empty(q.sizes(), q.options()));
  at::Tensor lse = attention_glue::new_lse(q);
  if (out.numel() > 0) {
    cpu::attention_fwd({in.shape, in.q.const_data_ptr(), in.k.const_data_ptr(), in.v.const_data_ptr(),
                        out.mutable_data_ptr(), lse.mutable_data_ptr()});
  } else {
    lse.fill_(-std::numeric_limits<double>::infinity());
  }
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> attention_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, const std::optional<at::Tensor>& key_padding_mask,
    const std::optional<at::Tensor>& attn_bias, bool causal, double scale, double dropout_p,
    const std::optional<at::Tensor>& dropout_seed, bool bias_grad) {
  const Inputs in = check_inputs(q, k, v, key_padding_mask, attn_bias, causal, scale, dropout_p, dropout_seed);
  attention_glue::check_backward(in, grad_out, out, lse);
  TORCH_CHECK_VALUE(!bias_grad || attn_bias.has_value(), "bias_grad needs attn_bias");
  const auto& s = in.shape;
  at::Tensor gq = at::empty(q.sizes(), q.options()), gk = at::empty(k.sizes(), k.options()),
             gv = at::empty(v.sizes(), v.options());
  at::Tensor gbias_full = bias_grad ? at::zeros({s.B, s.H, s.T, s.S}, in.bias.options()) : at::Tensor();
  const at::Tensor dout = grad_out.contiguous(), o = out.contiguous(), l = lse.contiguous();
  if (gk.numel() > 0 || gq.numel() > 0) {
    cpu::attention_bwd({s, in.q.const_data_ptr(), in.k.const_data_ptr(), in.v.const_data_ptr(),
                        o.const_data_ptr(), dout.const_data_ptr(), l.const_data_ptr(), gq.mutable_data_ptr(),
                        gk.mutable_data_ptr(), gv.mutable_data_ptr(),
                        bias_grad ? gbias_full.mutable_data_ptr() : nullptr});
  }
  if (!bias_grad) return {gq, gk, gv, at::empty({0}, q.options())};
  return {gq, gk, gv, attention_glue::reduce_bias_grad(gbias_full, *attn_bias)};
}

}  // namespace
}  // namespace fastpt

TORCH_LIBRARY_IMPL(fastpt, CPU, m) {
  m.impl("attention", &fastpt::attention_cpu);
  m.impl("attention_backward", &fastpt::attention_backward_cpu);
}
