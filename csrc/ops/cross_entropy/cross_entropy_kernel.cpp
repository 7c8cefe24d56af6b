// Softmax cross-entropy CPU kernel (compiled once per CPU capability, see
// common/cpu_dispatch.h).
//
// Parallel over rows. A row (32000 fp32 logits = 125 KiB) stays in L2 across the three
// passes: max, sum of exp(x - max), then, with the gradient, one write of
// exp(x - max) * grad_scale / sum, the label's entry less grad_scale. One read of the row
// from memory and one write, where log_softmax, exp, scatter and a scaling mul in eager
// PyTorch read and write the whole chunk of rows four to six times (and twice more in fp32
// under bf16). Arithmetic in fp32 (double for float64).
#include <ATen/Parallel.h>

#include <cmath>
#include <limits>

#include "common/cpu_vec.h"
#include "ops/cross_entropy/cross_entropy.h"

namespace fastpt::cpu {
inline namespace CPU_CAPABILITY {
namespace {

template <typename T>
void row(T* x, int64_t n, int64_t label, double grad_scale, bool write_grad, acc_t<T>* loss) {
  using A = acc_t<T>;
  using V = aVec<T>;
  constexpr int64_t C = kChunk<T>;
  const int64_t full = n / C * C;
  V a, b;
  // Pass 1: max. The tail is scalar so padding lanes never enter the max.
  V vmax(-std::numeric_limits<A>::infinity());
  for (int64_t i = 0; i < full; i += C) {
    load2(x + i, a, b);
    vmax = at::vec::maximum(vmax, at::vec::maximum(a, b));
  }
  A m = at::vec::vec_reduce_all<A>([](V& p, V& q) { return at::vec::maximum(p, q); }, vmax);
  for (int64_t i = full; i < n; ++i) {
    const A v = static_cast<A>(x[i]);
    m = (v > m || std::isnan(v)) ? v : m;
  }
  // Pass 2: sum of exp(x - m).
  const V vm(m);
  V vsum(0);
  for (int64_t i = 0; i < full; i += C) {
    load2(x + i, a, b);
    vsum += exp_nonpos<A>(a - vm) + exp_nonpos<A>(b - vm);
  }
  A sum = at::vec::vec_reduce_all<A>([](V& p, V& q) { return p + q; }, vsum);
  for (int64_t i = full; i < n; ++i) sum += std::exp(static_cast<A>(x[i]) - m);
  const A lse = m + std::log(sum);
  *loss = lse - static_cast<A>(x[label]);
  if (!write_grad) return;
  // Pass 3: (softmax - one-hot) * grad_scale, over the logits.
  const A scale = static_cast<A>(grad_scale);
  const V vscale(scale / sum);
  for (int64_t i = 0; i < full; i += C) {
    load2(x + i, a, b);
    store2(x + i, exp_nonpos<A>(a - vm) * vscale, exp_nonpos<A>(b - vm) * vscale);
  }
  for (int64_t i = full; i < n; ++i) x[i] = static_cast<T>(std::exp(static_cast<A>(x[i]) - m) * (scale / sum));
  x[label] = static_cast<T>(static_cast<A>(x[label]) - scale);
}

}  // namespace

void softmax_xent(const SoftmaxXentArgs& a) {
  dispatch_float_types(a.dtype, [&](auto tag) {
    using T = decltype(tag);
    using A = acc_t<T>;
    T* logits = static_cast<T*>(a.logits);
    A* loss = static_cast<A*>(a.loss);
    at::parallel_for(0, a.rows, 1, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        T* x = logits + r * a.ld;
        if (a.labels[r] == a.ignore_index) {
          loss[r] = 0;
          if (a.write_grad) std::fill(x, x + a.cols, T(0));
          continue;
        }
        row(x, a.cols, a.labels[r], a.grad_scale, a.write_grad, loss + r);
      }
    });
  });
}

}  // namespace CPU_CAPABILITY
}  // namespace fastpt::cpu
