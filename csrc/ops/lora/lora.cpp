// Fused LoRA linear (Hu et al. 2021): out = x W^T + bias + scale * dropout(x) A^T B^T with W
// frozen, or out = base_out + scale * dropout(x) A^T B^T over another base (Int8Linear).
// Glue over ATen GEMMs, registered for every device (CompositeExplicitAutograd); the gains
// over eager PyTorch come from the order of operations, not from a new GEMM:
// - the low-rank update is accumulated into the base GEMM's output (addmm_ with beta = 1),
//   never materialised as an (M, N) tensor, and scale is applied to the (M, r) factor;
// - grad_x = g W + (scale g B) A is one GEMM plus one in-place rank-r update;
// - saved for backward: x (needed for grad_A anyway), W, A, B, nothing (M, N)- or
//   (M, K)-sized of its own: the (M, r) factor xa = dropout(x) A^T is recomputed (one thin
//   GEMM) and dropout(x) is regenerated from its seed (hash mask, no mask tensor).
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include "common/glue.h"
#include "ops/int8/int8_weight.h"

namespace fastpt {
namespace {

at::Tensor hash_dropout(const at::Tensor& x, double p, const std::optional<at::Tensor>& seed) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("fastpt::hash_dropout", "")
                             .typed<at::Tensor(const at::Tensor&, double, const std::optional<at::Tensor>&)>();
  return op.call(x, p, seed);
}

struct LoraDims {
  int64_t m, k, n, r;
};

LoraDims lora_check(const at::Tensor& x, const std::optional<at::Tensor>& weight,
                    const std::optional<at::Tensor>& base_out, const at::Tensor& a, const at::Tensor& b,
                    const std::optional<at::Tensor>& bias, double dropout_p,
                    const std::optional<at::Tensor>& seed) {
  float_dtype(x, "x");
  TORCH_CHECK_VALUE(x.dim() >= 1, "x must have at least 1 dim, got a 0-dim tensor");
  TORCH_CHECK_VALUE(weight.has_value() != base_out.has_value(), "give exactly one of weight and base_out");
  check_same_dtype(a, x, "lora_a", "x");
  check_same_dtype(b, x, "lora_b", "x");
  check_same_device(a, x, "lora_a", "x");
  check_same_device(b, x, "lora_b", "x");
  const int64_t k = x.size(-1);
  TORCH_CHECK_VALUE(a.dim() == 2 && a.size(1) == k, "lora_a must be (r, in_features) = (r, ", k, "), got ",
                    a.sizes());
  const int64_t r = a.size(0);
  TORCH_CHECK_VALUE(b.dim() == 2 && b.size(1) == r, "lora_b must be (out_features, r) with r = ", r,
                    " (lora_a's rows), got ", b.sizes());
  const int64_t n = b.size(0);
  TORCH_CHECK_VALUE(r >= 1 && r <= std::min(k, n), "rank r must be in [1, min(in_features, out_features)] = [1, ",
                    std::min(k, n), "], got ", r);
  if (weight.has_value()) {
    check_same_dtype(*weight, x, "weight", "x");
    check_same_device(*weight, x, "weight", "x");
    TORCH_CHECK_VALUE(weight->dim() == 2 && weight->size(0) == n && weight->size(1) == k,
                      "weight must be (out_features, in_features) = (", n, ", ", k, "), got ", weight->sizes());
  } else {
    check_same_dtype(*base_out, x, "base_out", "x");
    check_same_device(*base_out, x, "base_out", "x");
    std::vector<int64_t> want(x.sizes().begin(), x.sizes().end());
    want.back() = n;
    TORCH_CHECK_VALUE(base_out->sizes() == at::IntArrayRef(want), "base_out must have shape ", want, ", got ",
                      base_out->sizes());
    TORCH_CHECK_VALUE(!bias.has_value(), "bias goes with weight; with base_out it is the base's own");
  }
  if (bias.has_value()) {
    check_same_dtype(*bias, x, "bias", "x");
    check_same_device(*bias, x, "bias", "x");
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == n, "bias must have shape (", n, "), got ", bias->sizes());
  }
  check_dropout(seed, dropout_p);
  return {leading_rows(x), k, n, r};
}

at::Tensor lora_linear(const at::Tensor& x, const std::optional<at::Tensor>& weight,
                                               const std::optional<at::Tensor>& base_out, const at::Tensor& a,
                                               const at::Tensor& b, double scale,
                                               const std::optional<at::Tensor>& bias, double dropout_p,
                                               const std::optional<at::Tensor>& seed) {
  const LoraDims d = lora_check(x, weight, base_out, a, b, bias, dropout_p, seed);
  const at::Tensor x2 = x.reshape({d.m, d.k});
  const at::Tensor xd = dropout_p > 0 ? hash_dropout(x2, dropout_p, seed) : x2;
  const at::Tensor xa = at::mm(xd, a.t());  // (m, r)
  at::Tensor out;
  if (weight.has_value()) {
    out = bias.has_value() ? at::addmm(*bias, x2, weight->t()) : at::mm(x2, weight->t());
    out.addmm_(xa, b.t(), 1, scale);
  } else {
    out = at::addmm(base_out->reshape({d.m, d.n}), xa, b.t(), 1, scale);
  }
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = d.n;
  return out.view(shape);
}

// (grad_x or an empty tensor when !need_grad_x, grad_a, grad_b). grad_x holds only the LoRA
// path when weight is None (the base's own backward adds its part).
std::tuple<at::Tensor, at::Tensor, at::Tensor> lora_linear_backward(
    const at::Tensor& grad_out, const at::Tensor& x, const std::optional<at::Tensor>& weight,
    const at::Tensor& a, const at::Tensor& b, double scale, double dropout_p,
    const std::optional<at::Tensor>& seed, bool need_grad_x) {
  const int64_t k = x.size(-1), m = leading_rows(x), n = b.size(0);
  const at::Tensor g = grad_out.reshape({m, n}), x2 = x.reshape({m, k});
  const at::Tensor gb = at::mm(g, b).mul_(scale);  // (m, r) = scale g B
  const at::Tensor xd = dropout_p > 0 ? hash_dropout(x2, dropout_p, seed) : x2;
  const at::Tensor grad_b = at::mm(g.t(), at::mm(xd, a.t())).mul_(scale);
  const at::Tensor grad_a = at::mm(gb.t(), xd);
  at::Tensor grad_x = at::empty({0}, x.options());
  if (need_grad_x) {
    if (dropout_p > 0) {
      grad_x = hash_dropout(at::mm(gb, a), dropout_p, seed);
      if (weight.has_value()) grad_x.addmm_(g, *weight);
    } else if (weight.has_value()) {
      grad_x = at::mm(g, *weight).addmm_(gb, a);
    } else {
      grad_x = at::mm(gb, a);
    }
    grad_x = grad_x.view(x.sizes());
  }
  return {grad_x, grad_a, grad_b};
}

}  // namespace
}  // namespace fastpt

TORCH_LIBRARY_IMPL(fastpt, CompositeExplicitAutograd, m) {
  m.impl("lora_linear", &fastpt::lora_linear);
  m.impl("lora_linear_backward", &fastpt::lora_linear_backward);
}
