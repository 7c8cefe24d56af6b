// Attention input checks and kernel arguments, shared by the CPU glue (attention_cpu.cpp) and
// the CUDA glue (attention_cuda.cpp) so both devices accept the same inputs.
//
// Layout: q, k, v are read through their strides when the last dim is contiguous and rows do
// not overlap (a (B, T, H, D) tensor transposed to (B, H, T, D) is read in place); any other
// layout is copied to contiguous first. out, lse and the gradients are new contiguous tensors.
#pragma once

#include <ATen/ops/empty.h>
#include <cmath>
#include <optional>
#include <vector>

#include "common/glue.h"
#include "ops/attention/attention.h"

namespace fastpt::attention_glue {

constexpr int64_t kMaxHeadDim = 256;

// t with a contiguous last dim and rows at least D apart (BLAS needs ld >= D).
inline at::Tensor rows_view(const at::Tensor& t) {
  const bool ok = t.stride(3) == 1 && (t.size(2) <= 1 || t.stride(2) >= t.size(3));
  return ok ? t : t.contiguous();
}

// Row stride of dim `d`, with a size-1 dim given the dense stride (its stride is arbitrary).
inline int64_t stride_or(const at::Tensor& t, int64_t d, int64_t dense) {
  return t.size(d) <= 1 ? dense : t.stride(d);
}

struct Inputs {
  at::Tensor q, k, v, key_mask, bias;  // mask (B, S) uint8-compatible bool; bias expanded view
  AttentionShape shape;
};


inline Inputs check_inputs(const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
                           const std::optional<at::Tensor>& key_padding_mask,
                           const std::optional<at::Tensor>& attn_bias, bool causal, double scale,
                           double dropout_p, const std::optional<at::Tensor>& dropout_seed) {
  const DType dtype = float_dtype(q_in, "q");
  check_same_dtype(k_in, q_in, "k", "q");
  check_same_dtype(v_in, q_in, "v", "q");
  check_same_device(k_in, q_in, "k", "q");
  check_same_device(v_in, q_in, "v", "q");
  TORCH_CHECK_VALUE(q_in.dim() == 4 && k_in.dim() == 4 && v_in.dim() == 4,
                    "q must be (B, H, T, D) and k, v (B, Hkv, S, D), got shapes ", q_in.sizes(), ", ",
                    k_in.sizes(), ", ", v_in.sizes());
  TORCH_CHECK_VALUE(k_in.sizes() == v_in.sizes(), "k and v must have the same shape (B, Hkv, S, D), got ",
                    k_in.sizes(), " and ", v_in.sizes());
  const int64_t B = q_in.size(0), H = q_in.size(1), T = q_in.size(2), D = q_in.size(3);
  const int64_t Hkv = k_in.size(1), S = k_in.size(2);
  TORCH_CHECK_VALUE(k_in.size(0) == B, "k and v must have the batch size of q (", B, "), got ", k_in.size(0));
  TORCH_CHECK_VALUE(k_in.size(3) == D, "k and v must have the head dim of q (", D, "), got ", k_in.size(3));
  TORCH_CHECK_VALUE(Hkv >= 1 && H % Hkv == 0, "the number of query heads (", H,
                    ") must be a multiple of the number of key/value heads (", Hkv, ")");
  TORCH_CHECK_VALUE(D >= 1 && D <= kMaxHeadDim, "head dim D must be in [1, ", kMaxHeadDim, "], got ", D);
  TORCH_CHECK_VALUE(std::isfinite(scale), "scale must be finite, got ", scale);
  TORCH_CHECK_VALUE(dropout_p >= 0 && dropout_p < 1, "dropout_p must be in [0, 1), got ", dropout_p);
  Inputs in{rows_view(q_in), rows_view(k_in), rows_view(v_in), at::Tensor(), at::Tensor(), {}};
  AttentionShape& s = in.shape;
  s = AttentionShape{B, H, Hkv, T, S, D,
                     in.q.stride(0), in.q.stride(1), stride_or(in.q, 2, D),
                     in.k.stride(0), in.k.stride(1), stride_or(in.k, 2, D),
                     in.v.stride(0), in.v.stride(1), stride_or(in.v, 2, D),
                     0, 0, 0, 0, nullptr, nullptr, causal, scale, dropout_p, 0, dtype};
  if (key_padding_mask.has_value()) {
    const at::Tensor& m = *key_padding_mask;
    check_same_device(m, q_in, "key_padding_mask", "q");
    TORCH_CHECK_TYPE(m.scalar_type() == at::kBool, "key_padding_mask must be bool (True = attend), got ",
                     m.scalar_type());
    TORCH_CHECK_VALUE(m.dim() == 2 && m.size(0) == B && m.size(1) == S, "key_padding_mask must be (B, S) = (",
                      B, ", ", S, "), got ", m.sizes());
    in.key_mask = m.contiguous();
    s.key_mask = reinterpret_cast<const uint8_t*>(in.key_mask.const_data_ptr<bool>());
  }
  if (attn_bias.has_value()) {
    const at::Tensor& bias = *attn_bias;
    check_same_device(bias, q_in, "attn_bias", "q");
    TORCH_CHECK_TYPE(at::isFloatingType(bias.scalar_type()), "attn_bias must be a float tensor, got ",
                     bias.scalar_type());
    const int64_t full[4] = {B, H, T, S};
    bool ok = bias.dim() <= 4;
    for (int64_t d = 0; ok && d < bias.dim(); ++d) {
      const int64_t n = bias.size(bias.dim() - 1 - d), want = full[3 - d];
      ok = n == want || n == 1;
    }
    TORCH_CHECK_VALUE(ok, "attn_bias must broadcast to (B, H, T, S) = (", B, ", ", H, ", ", T, ", ", S,
                      "), got ", bias.sizes());
    in.bias = bias.to(compute_type(q_in.scalar_type())).expand({B, H, T, S});
    s.bias = in.bias.const_data_ptr();
    s.bias_sb = in.bias.stride(0), s.bias_sh = in.bias.stride(1);
    s.bias_st = in.bias.stride(2), s.bias_ss = in.bias.stride(3);
  }
  if (dropout_p > 0) {
    TORCH_CHECK_VALUE(dropout_seed.has_value() && dropout_seed->numel() == 1 &&
                          dropout_seed->scalar_type() == at::kLong,
                      "dropout_p > 0 needs dropout_seed, a one-element int64 tensor");
    s.seed = uint64_t(dropout_seed->cpu().item<int64_t>());
  }
  return in;
}

inline at::Tensor new_lse(const at::Tensor& q) {
  return at::empty({q.size(0), q.size(1), q.size(2)}, q.options().dtype(compute_type(q.scalar_type())));
}

// Checks the backward's extra inputs against the forward's.
inline void check_backward(const Inputs& in, const at::Tensor& grad_out, const at::Tensor& out,
                           const at::Tensor& lse) {
  const auto& s = in.shape;
  check_same_dtype(grad_out, in.q, "grad_out", "q");
  check_same_device(grad_out, in.q, "grad_out", "q");
  // The kernels read out as q's dtype and both out and lse on q's device.
  check_same_dtype(out, in.q, "out", "q");
  check_same_device(out, in.q, "out", "q");
  check_same_device(lse, in.q, "lse", "q");
  TORCH_CHECK_VALUE(grad_out.sizes() == in.q.sizes() && out.sizes() == in.q.sizes(),
                    "grad_out and out must have the shape of q ", in.q.sizes(), ", got ", grad_out.sizes(),
                    " and ", out.sizes());
  TORCH_CHECK_VALUE(lse.dim() == 3 && lse.size(0) == s.B && lse.size(1) == s.H && lse.size(2) == s.T &&
                        lse.scalar_type() == compute_type(in.q.scalar_type()),
                    "lse must be the forward's (B, H, T) log-sum-exp, got ", lse.sizes(), " ", lse.scalar_type());
}

// The bias gradient, (B, H, T, S) in the compute type, summed over the dims the bias was
// broadcast along, back to its own shape and dtype.
inline at::Tensor reduce_bias_grad(const at::Tensor& full, const at::Tensor& bias) {
  std::vector<int64_t> dims;
  const int64_t lead = 4 - bias.dim();
  for (int64_t d = 0; d < 4; ++d)
    if (d < lead || bias.size(d - lead) == 1) dims.push_back(d);
  const at::Tensor g = dims.empty() ? full : full.sum(dims, /*keepdim=*/true);
  return g.reshape(bias.sizes()).to(bias.scalar_type());
}

}  // namespace fastpt::attention_glue
