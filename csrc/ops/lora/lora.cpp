// Fused LoRA linear (Hu et al. 2021): out = x W^T + bias + scale * dropout(x) A^T B^T with W
// frozen, or out = base_out + scale * dropout(x) A^T B^T over another base (Int8Linear).
// Glue over GEMMs, registered for every device (CompositeExplicitAutograd); the gains over
// eager PyTorch come from the order of operations:
// - the low-rank update is accumulated into the base GEMM's output, never materialised as an
//   (M, N) tensor, and scale is applied to the (M, r) factor;
// - float32 where fastpt's gemm beats BLAS (AVX-512, non-Intel CPUs): the update is the
//   gemm's second product (gemm2_tensors), added to each block of the output while it is in
//   cache: x W^T + (scale xa) B^T forward and g W + (scale g B) A backward are one pass each;
//   the thin products (x A^T, g B, g^T xa, u^T x) are fastpt gemms too.
//   NOTE: 4096 x 512 -> 1408, r = 16, 2 threads: forward 17 -> ~15.5 ms, backward 19.4 ->
//   ~17.8 ms (the base products alone: 13 and 14 ms); Llama LoRA step 1.98 -> 1.74 s.
// - other CPU float32/float64: the thin GEMMs (x A^T, g B, g^T xa, u^T x, u A) run in one pass
//   over blocks of 32 rows, one block per thread at a time, while the rows of x, g and
//   grad_x are in L2, instead of six multi-threaded GEMMs each streaming an (M, 4096)
//   operand from memory. Not for bf16/fp16: oneDNN's per-call cost on small bf16 GEMMs and
//   the float32 partial sums outweigh it.
//   NOTE: 4096 x 4096, r = 16, forward+backward, A/B alternating in one process on the
//   shared 2-core VM: fp32 1753 vs 1799 ms (blocked faster); bf16 687 vs 611, 828 vs 723
//   ms on 2 threads and 584 vs 540 ms on 1 (blocked slower).
// - grad_x = g W + (scale g B) A is one GEMM plus one rank-r update;
// - saved for backward: x (needed for grad_A anyway), W, A, B, nothing (M, N)- or
//   (M, K)-sized of its own: the (M, r) factor xa = dropout(x) A^T is recomputed (one thin
//   GEMM) and dropout(x) is regenerated from its seed (hash mask, no mask tensor).
#include <ATen/Parallel.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include "common/glue.h"
#include "ops/gemm/gemm_glue.h"
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
  // in_features from x, out_features from the base (weight or base_out), then the factors
  // against both: a wrong factor is named, not the base it would otherwise be measured by.
  const int64_t k = x.size(-1);
  int64_t n;
  if (weight.has_value()) {
    check_same_dtype(*weight, x, "weight", "x");
    check_same_device(*weight, x, "weight", "x");
    TORCH_CHECK_VALUE(weight->dim() == 2, "weight must be (out_features, in_features), got ", weight->sizes());
    TORCH_CHECK_VALUE(weight->size(1) == k, "x's last dim is ", k, " but weight is (out_features, in_features) = ",
                      weight->sizes(), ": they must match");
    n = weight->size(0);
  } else {
    check_same_dtype(*base_out, x, "base_out", "x");
    check_same_device(*base_out, x, "base_out", "x");
    TORCH_CHECK_VALUE(base_out->dim() == x.dim() &&
                          base_out->sizes().slice(0, x.dim() - 1) == x.sizes().slice(0, x.dim() - 1),
                      "base_out must be x's shape with the last dim out_features, got ", base_out->sizes(),
                      " for x ", x.sizes());
    TORCH_CHECK_VALUE(!bias.has_value(), "bias goes with weight; with base_out it is the base's own");
    n = base_out->size(-1);
  }
  TORCH_CHECK_VALUE(a.dim() == 2 && a.size(1) == k, "lora_a must be (r, in_features) = (r, ", k, "), got ",
                    a.sizes());
  const int64_t r = a.size(0);
  TORCH_CHECK_VALUE(b.dim() == 2 && b.size(0) == n && b.size(1) == r, "lora_b must be (out_features, r) = (", n,
                    ", ", r, ") (r: lora_a's rows), got ", b.sizes());
  TORCH_CHECK_VALUE(r >= 1 && r <= std::min(k, n), "rank r must be in [1, min(in_features, out_features)] = [1, ",
                    std::min(k, n), "], got ", r);
  if (bias.has_value()) {
    check_same_dtype(*bias, x, "bias", "x");
    check_same_device(*bias, x, "bias", "x");
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == n, "bias must have shape (", n, "), got ", bias->sizes());
  }
  check_dropout(seed, dropout_p);
  return {leading_rows(x), k, n, r};
}

constexpr int64_t kRowBlock = 32;

// Calls fn(thread, begin, end) for blocks of kRowBlock rows of [0, m), spread over torch's
// threads. ATen ops inside run single-threaded (nested parallelism is off).
template <typename Fn>
void for_row_blocks(int64_t m, Fn&& fn) {
  at::parallel_for(0, m, kRowBlock, [&](int64_t begin, int64_t end) {
    const int t = at::get_thread_num();
    for (int64_t r0 = begin; r0 < end; r0 += kRowBlock) fn(t, r0, std::min(end, r0 + kRowBlock));
  });
}

// The base product x W^T (forward) or g W (backward): fastpt's gemm where it beats BLAS.
at::Tensor base_mm(const at::Tensor& x, const at::Tensor& w, bool trans_w) {
  if (gemm_beats_blas(x)) return gemm_tensors(x, w, false, trans_w);
  return at::mm(x, trans_w ? w.t() : w);
}

bool blocked_cpu_path(const at::Tensor& x) {
  return x.is_cpu() && (x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble);
}

at::Tensor lora_linear(const at::Tensor& x, const std::optional<at::Tensor>& weight,
                                               const std::optional<at::Tensor>& base_out, const at::Tensor& a,
                                               const at::Tensor& b, double scale,
                                               const std::optional<at::Tensor>& bias, double dropout_p,
                                               const std::optional<at::Tensor>& seed) {
  const LoraDims d = lora_check(x, weight, base_out, a, b, bias, dropout_p, seed);
  const at::Tensor x2 = x.reshape({d.m, d.k});
  const at::Tensor xd = dropout_p > 0 ? hash_dropout(x2, dropout_p, seed) : x2;
  at::Tensor out;
  if (gemm_beats_blas(x2) && weight.has_value()) {
    // x W^T + (scale xa) B^T in one pass of fastpt's gemm over the output
    const at::Tensor xa = gemm_tensors(xd, a, false, true).mul_(scale);  // (m, r)
    out = gemm2_tensors(x2, *weight, false, true, xa, b, false, true);
    if (bias.has_value()) out.add_(*bias);
  } else if (blocked_cpu_path(x) && weight.has_value()) {
    out = base_mm(x2, *weight, true);
    if (bias.has_value()) out.add_(*bias);
    for_row_blocks(d.m, [&](int, int64_t r0, int64_t r1) {
      out.slice(0, r0, r1).addmm_(at::mm(xd.slice(0, r0, r1), a.t()), b.t(), 1, scale);
    });
  } else if (weight.has_value()) {
    const at::Tensor xa = at::mm(xd, a.t());  // (m, r)
    out = bias.has_value() ? at::addmm(*bias, x2, weight->t()) : at::mm(x2, weight->t());
    out.addmm_(xa, b.t(), 1, scale);
  } else {
    out = at::addmm(base_out->reshape({d.m, d.n}), at::mm(xd, a.t()), b.t(), 1, scale);
  }
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = d.n;
  return out.view(shape);
}

// The backward's thin GEMMs in one pass over row blocks (see the top of the file), float32
// or float64; grad_A and grad_B are summed per thread and reduced at the end.
std::tuple<at::Tensor, at::Tensor, at::Tensor> lora_backward_cpu(
    const at::Tensor& g, const at::Tensor& x, const at::Tensor& x2, const std::optional<at::Tensor>& weight,
    const at::Tensor& a, const at::Tensor& b, double scale, double dropout_p,
    const std::optional<at::Tensor>& seed, bool need_grad_x) {
  const int64_t m = x2.size(0), k = x2.size(1), n = b.size(0), r = a.size(0);
  const at::Tensor xd = dropout_p > 0 ? hash_dropout(x2, dropout_p, seed) : x2;
  at::Tensor grad_x = at::empty({0}, x.options());
  if (need_grad_x) grad_x = weight.has_value() ? base_mm(g, *weight, false) : at::zeros({m, k}, x.options());
  // With dropout the input gradient of the LoRA path is dropout(u A): added after the pass.
  const bool fuse_grad_x = need_grad_x && dropout_p == 0;
  at::Tensor u = fuse_grad_x ? at::Tensor() : at::empty({m, r}, x.options());
  const int threads = at::get_num_threads();
  at::Tensor acc_a = at::zeros({threads, r, k}, x.options()), acc_b = at::zeros({threads, n, r}, x.options());
  for_row_blocks(m, [&](int t, int64_t r0, int64_t r1) {
    const at::Tensor xb = xd.slice(0, r0, r1), gblk = g.slice(0, r0, r1);
    const at::Tensor ub = at::mm(gblk, b).mul_(scale);  // scale g B
    acc_b[t].addmm_(gblk.t(), at::mm(xb, a.t()));
    acc_a[t].addmm_(ub.t(), xb);
    if (fuse_grad_x) grad_x.slice(0, r0, r1).addmm_(ub, a);
    else if (u.defined()) u.slice(0, r0, r1).copy_(ub);
  });
  if (need_grad_x && !fuse_grad_x) grad_x.add_(hash_dropout(at::mm(u, a), dropout_p, seed));
  if (need_grad_x) grad_x = grad_x.view(x.sizes());
  return {grad_x, acc_a.sum(0), acc_b.sum(0).mul_(scale)};
}

// float32 where fastpt's gemm beats BLAS: five products of fastpt's gemm, the rank-r update of
// grad_x added in the same pass as the base product g W.
std::tuple<at::Tensor, at::Tensor, at::Tensor> lora_backward_gemm(
    const at::Tensor& g, const at::Tensor& x, const at::Tensor& x2, const at::Tensor& weight, const at::Tensor& a,
    const at::Tensor& b, double scale, double dropout_p, const std::optional<at::Tensor>& seed, bool need_grad_x) {
  const at::Tensor xd = dropout_p > 0 ? hash_dropout(x2, dropout_p, seed) : x2;
  const at::Tensor u = gemm_tensors(g, b, false, false).mul_(scale);       // (m, r) = scale g B
  const at::Tensor xa = gemm_tensors(xd, a, false, true);                  // (m, r), recomputed
  const at::Tensor grad_b = gemm_tensors(g, xa, true, false).mul_(scale);  // scale g^T xa
  const at::Tensor grad_a = gemm_tensors(u, xd, true, false);              // u^T dropout(x)
  at::Tensor grad_x = at::empty({0}, x.options());
  if (need_grad_x) {
    // With dropout the update's input gradient is dropout(u A), added on its own.
    grad_x = dropout_p > 0 ? gemm_tensors(g, weight, false, false).add_(hash_dropout(gemm_tensors(u, a, false, false),
                                                                                         dropout_p, seed))
                           : gemm2_tensors(g, weight, false, false, u, a, false, false);
    grad_x = grad_x.view(x.sizes());
  }
  return {grad_x, grad_a, grad_b};
}

// The forward's checks, and grad_out of the forward's output shape: a grad_out of another
// shape but the same number of elements was reshaped to (m, n) and gave wrong gradients.
LoraDims lora_backward_check(const at::Tensor& grad_out, const at::Tensor& x,
                             const std::optional<at::Tensor>& weight, const at::Tensor& a, const at::Tensor& b,
                             double dropout_p, const std::optional<at::Tensor>& seed) {
  TORCH_CHECK_VALUE(x.dim() >= 1, "x must have at least 1 dim, got a 0-dim tensor");
  check_same_dtype(grad_out, x, "grad_out", "x");
  check_same_device(grad_out, x, "grad_out", "x");
  TORCH_CHECK_VALUE(grad_out.dim() == x.dim() &&
                        grad_out.sizes().slice(0, x.dim() - 1) == x.sizes().slice(0, x.dim() - 1),
                    "grad_out must be x's shape with the last dim out_features, got ", grad_out.sizes(),
                    " for x ", x.sizes());
  // Without weight, grad_out stands where the forward's base_out stood: it gives out_features.
  const std::optional<at::Tensor> base_out = weight.has_value() ? std::nullopt : std::optional<at::Tensor>(grad_out);
  const LoraDims d = lora_check(x, weight, base_out, a, b, std::nullopt, dropout_p, seed);
  TORCH_CHECK_VALUE(grad_out.size(-1) == d.n, "grad_out's last dim must be out_features = ", d.n, ", got ",
                    grad_out.sizes());
  return d;
}

// (grad_x or an empty tensor when !need_grad_x, grad_a, grad_b). grad_x holds only the LoRA
// path when weight is None (the base's own backward adds its part).
std::tuple<at::Tensor, at::Tensor, at::Tensor> lora_linear_backward(
    const at::Tensor& grad_out, const at::Tensor& x, const std::optional<at::Tensor>& weight,
    const at::Tensor& a, const at::Tensor& b, double scale, double dropout_p,
    const std::optional<at::Tensor>& seed, bool need_grad_x) {
  const LoraDims d = lora_backward_check(grad_out, x, weight, a, b, dropout_p, seed);
  const int64_t k = d.k, m = d.m, n = d.n;
  const at::Tensor g = grad_out.reshape({m, n}), x2 = x.reshape({m, k});
  if (gemm_beats_blas(x2) && weight.has_value()) {
    return lora_backward_gemm(g, x, x2, *weight, a, b, scale, dropout_p, seed, need_grad_x);
  }
  if (blocked_cpu_path(x)) return lora_backward_cpu(g, x, x2, weight, a, b, scale, dropout_p, seed, need_grad_x);
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
