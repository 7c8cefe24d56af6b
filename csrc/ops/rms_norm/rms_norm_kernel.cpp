// RMSNorm CPU kernels (compiled once per CPU capability, see common/cpu_dispatch.h).
//
// Forward: one row per task, two passes over the row (sum of squares, then scale); a row
// of up to ~16K fp32 stays in L1/L2, so memory traffic is the minimum: read x, write y.
// Backward: each parallel chunk of rows owns one fp32 row of dw partial sums, so no
// atomics; the glue sums the partials (num_partials x n, tiny). Traffic: read dy and x,
// write dx. Arithmetic in fp32 whatever the storage type (double for float64).
#include <ATen/Parallel.h>

#include "common/cpu_vec.h"
#include "ops/rms_norm/rms_norm.h"

namespace fastpt::cpu {
inline namespace CPU_CAPABILITY {
namespace {

// Rows per parallel task: enough work per task to amortise scheduling (~64K elements).
int64_t grain_rows(int64_t n) { return std::max<int64_t>(1, (1 << 16) / std::max<int64_t>(n, 1)); }

template <bool kStream, typename T>
void fwd_row(const T* x, const T* w, T* y, acc_t<T>* rstd_out, int64_t n, double eps) {
  using V = aVec<T>;
  using A = acc_t<T>;
  constexpr int64_t C = kChunk<T>;
  V acc0(0), acc1(0), a, b;
  int64_t j = 0;
  for (; j + C <= n; j += C) {
    load2_lanes(x + j, a, b);
    acc0 = at::vec::fmadd(a, a, acc0);
    acc1 = at::vec::fmadd(b, b, acc1);
  }
  if (j < n) {
    load2(x + j, a, b, n - j);
    acc0 = at::vec::fmadd(a, a, acc0);
    acc1 = at::vec::fmadd(b, b, acc1);
  }
  const A sum_sq = at::vec::vec_reduce_all<A>(std::plus<V>(), acc0 + acc1);
  const A rstd = A(1) / std::sqrt(sum_sq / static_cast<A>(n) + static_cast<A>(eps));
  *rstd_out = rstd;
  const V r(rstd);
  V wa, wb;
  for (j = 0; j + C <= n; j += C) {
    load2_lanes(x + j, a, b);
    load2_lanes(w + j, wa, wb);
    store2_lanes<kStream>(y + j, a * r * wa, b * r * wb);
  }
  if (j < n) {
    load2(x + j, a, b, n - j);
    load2(w + j, wa, wb, n - j);
    store2(y + j, a * r * wa, b * r * wb, n - j);
  }
}

// dx for one row, accumulating dy * xhat into dw.
template <bool kStream, typename T>
void bwd_row(const T* dy, const T* x, const T* w, acc_t<T> rstd, T* dx, acc_t<T>* dw, int64_t n) {
  using V = aVec<T>;
  using A = acc_t<T>;
  constexpr int64_t C = kChunk<T>, VS = V::size();
  const V r(rstd);
  V acc0(0), acc1(0), ga, gb, xa, xb, wa, wb;
  int64_t j = 0;
  auto load_all = [&](int64_t len) {
    if (len == C) {  // lane order; dw follows it, see rms_norm_bwd
      load2_lanes(dy + j, ga, gb); load2_lanes(x + j, xa, xb); load2_lanes(w + j, wa, wb);
    } else {
      load2(dy + j, ga, gb, len); load2(x + j, xa, xb, len); load2(w + j, wa, wb, len);
    }
  };
  auto pass1 = [&](int64_t len) {
    load_all(len);
    xa = xa * r;
    xb = xb * r;
    acc0 = at::vec::fmadd(ga * wa, xa, acc0);
    acc1 = at::vec::fmadd(gb * wb, xb, acc1);
    const int64_t na = std::min<int64_t>(len, VS);
    at::vec::fmadd(ga, xa, V::loadu(dw + j, na)).store(dw + j, na);
    if (len > na) at::vec::fmadd(gb, xb, V::loadu(dw + j + na, len - na)).store(dw + j + na, len - na);
  };
  for (; j + C <= n; j += C) pass1(C);
  if (j < n) pass1(n - j);
  const V c(at::vec::vec_reduce_all<A>(std::plus<V>(), acc0 + acc1) / static_cast<A>(n));
  auto pass2 = [&](int64_t len) {
    load_all(len);
    const V da = r * (ga * wa - xa * r * c), db = r * (gb * wb - xb * r * c);
    if (len == C) store2_lanes<kStream>(dx + j, da, db); else store2(dx + j, da, db, len);
  };
  for (j = 0; j + C <= n; j += C) pass2(C);
  if (j < n) pass2(n - j);
}

}  // namespace

void rms_norm_fwd(const RmsNormFwdArgs& a) {
  dispatch_float_types(a.dtype, [&](auto tag) {
    using T = decltype(tag);
    const T* x = static_cast<const T*>(a.x);
    const T* w = static_cast<const T*>(a.w);
    T* y = static_cast<T*>(a.y);
    auto* rstd = static_cast<acc_t<T>*>(a.rstd);
    with_stream(a.rows * a.n * int64_t(sizeof(T)) >= stream_min_bytes(), [&](auto stream) {
      at::parallel_for(0, a.rows, grain_rows(a.n), [&](int64_t begin, int64_t end) {
        for (int64_t i = begin; i < end; ++i)
          fwd_row<stream()>(x + i * a.n, w, y + i * a.n, rstd + i, a.n, a.eps);
        stream_fence();
      });
    });
  });
}

void rms_norm_bwd(const RmsNormBwdArgs& a) {
  dispatch_float_types(a.dtype, [&](auto tag) {
    using T = decltype(tag);
    using A = acc_t<T>;
    const T* dy = static_cast<const T*>(a.dy);
    const T* x = static_cast<const T*>(a.x);
    const T* w = static_cast<const T*>(a.w);
    T* dx = static_cast<T*>(a.dx);
    const A* rstd = static_cast<const A*>(a.rstd);
    A* partials = static_cast<A*>(a.dw_partial);
    // Fixed split into num_partials chunks (not parallel_for's own split) so that each
    // chunk owns exactly one partial row, whatever the thread count.
    const int64_t per = (a.rows + a.num_partials - 1) / a.num_partials;
    with_stream(a.rows * a.n * int64_t(sizeof(T)) >= stream_min_bytes(), [&](auto stream) {
      at::parallel_for(0, a.num_partials, 1, [&](int64_t pb, int64_t pe) {
        for (int64_t p = pb; p < pe; ++p) {
          A* dw = partials + p * a.n;
          std::fill(dw, dw + a.n, A(0));
          const int64_t end = std::min(a.rows, (p + 1) * per);
          for (int64_t i = p * per; i < end; ++i)
            bwd_row<stream()>(dy + i * a.n, x + i * a.n, w, rstd[i], dx + i * a.n, dw, a.n);
          lanes_to_memory_order<T>(dw, a.n / kChunk<T> * kChunk<T>);
        }
        stream_fence();
      });
    });
  });
}

}  // namespace CPU_CAPABILITY
}  // namespace fastpt::cpu
