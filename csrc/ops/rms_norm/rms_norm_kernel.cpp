// RMSNorm CPU kernels (compiled once per CPU capability, see common/cpu_dispatch.h).
//
// Forward: one row per task, two passes over the row (sum of squares, then scale); a row
// of up to ~16K fp32 stays in L1/L2, so memory traffic is the minimum: read x, write y.
// Backward: each parallel chunk of rows owns one fp32 row of dw partial sums, so no
// atomics; the glue sums the partials (num_partials x n, tiny). Traffic: read dy and x,
// write dx. All arithmetic in fp32 whatever the storage type.
#include <ATen/Parallel.h>

#include "common/cpu_vec.h"
#include "ops/rms_norm/rms_norm.h"

namespace fastpt::cpu {
inline namespace CPU_CAPABILITY {
namespace {

// Rows per parallel task: enough work per task to amortise scheduling (~64K elements).
int64_t grain_rows(int64_t n) { return std::max<int64_t>(1, (1 << 16) / std::max<int64_t>(n, 1)); }

template <typename T>
void fwd_row(const T* x, const T* w, T* y, float* rstd_out, int64_t n, float eps) {
  fVec acc0(0.f), acc1(0.f), a, b;
  int64_t j = 0;
  for (; j + kChunk <= n; j += kChunk) {
    load2(x + j, a, b);
    acc0 = at::vec::fmadd(a, a, acc0);
    acc1 = at::vec::fmadd(b, b, acc1);
  }
  if (j < n) {
    load2(x + j, a, b, n - j);
    acc0 = at::vec::fmadd(a, a, acc0);
    acc1 = at::vec::fmadd(b, b, acc1);
  }
  const float rstd = rms_norm_rstd(at::vec::vec_reduce_all<float>(std::plus<fVec>(), acc0 + acc1), n, eps);
  *rstd_out = rstd;
  const fVec r(rstd);
  fVec wa, wb;
  for (j = 0; j + kChunk <= n; j += kChunk) {
    load2(x + j, a, b);
    load2(w + j, wa, wb);
    store2(y + j, a * r * wa, b * r * wb);
  }
  if (j < n) {
    load2(x + j, a, b, n - j);
    load2(w + j, wa, wb, n - j);
    store2(y + j, a * r * wa, b * r * wb, n - j);
  }
}

// dx for one row, accumulating dy * xhat into dw (fp32).
template <typename T>
void bwd_row(const T* dy, const T* x, const T* w, float rstd, T* dx, float* dw, int64_t n) {
  const fVec r(rstd);
  fVec acc0(0.f), acc1(0.f), ga, gb, xa, xb, wa, wb;
  int64_t j = 0;
  auto pass1 = [&](int64_t len) {
    if (len == kChunk) {
      load2(dy + j, ga, gb); load2(x + j, xa, xb); load2(w + j, wa, wb);
    } else {
      load2(dy + j, ga, gb, len); load2(x + j, xa, xb, len); load2(w + j, wa, wb, len);
    }
    xa = xa * r;
    xb = xb * r;
    acc0 = at::vec::fmadd(ga * wa, xa, acc0);
    acc1 = at::vec::fmadd(gb * wb, xb, acc1);
    const int64_t na = std::min<int64_t>(len, fVec::size());
    at::vec::fmadd(ga, xa, fVec::loadu(dw + j, na)).store(dw + j, na);
    if (len > na) at::vec::fmadd(gb, xb, fVec::loadu(dw + j + na, len - na)).store(dw + j + na, len - na);
  };
  for (; j + kChunk <= n; j += kChunk) pass1(kChunk);
  if (j < n) pass1(n - j);
  const fVec c(at::vec::vec_reduce_all<float>(std::plus<fVec>(), acc0 + acc1) / static_cast<float>(n));
  auto pass2 = [&](int64_t len) {
    if (len == kChunk) {
      load2(dy + j, ga, gb); load2(x + j, xa, xb); load2(w + j, wa, wb);
      store2(dx + j, r * (ga * wa - xa * r * c), r * (gb * wb - xb * r * c));
    } else {
      load2(dy + j, ga, gb, len); load2(x + j, xa, xb, len); load2(w + j, wa, wb, len);
      store2(dx + j, r * (ga * wa - xa * r * c), r * (gb * wb - xb * r * c), len);
    }
  };
  for (j = 0; j + kChunk <= n; j += kChunk) pass2(kChunk);
  if (j < n) pass2(n - j);
}

}  // namespace

void rms_norm_fwd(const RmsNormFwdArgs& a) {
  dispatch_float_types(a.dtype, [&](auto tag) {
    using T = decltype(tag);
    const T* x = static_cast<const T*>(a.x);
    const T* w = static_cast<const T*>(a.w);
    T* y = static_cast<T*>(a.y);
    at::parallel_for(0, a.rows, grain_rows(a.n), [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i)
        fwd_row(x + i * a.n, w, y + i * a.n, a.rstd + i, a.n, a.eps);
    });
  });
}

void rms_norm_bwd(const RmsNormBwdArgs& a) {
  dispatch_float_types(a.dtype, [&](auto tag) {
    using T = decltype(tag);
    const T* dy = static_cast<const T*>(a.dy);
    const T* x = static_cast<const T*>(a.x);
    const T* w = static_cast<const T*>(a.w);
    T* dx = static_cast<T*>(a.dx);
    // Fixed split into num_partials chunks (not parallel_for's own split) so that each
    // chunk owns exactly one partial row, whatever the thread count.
    const int64_t per = (a.rows + a.num_partials - 1) / a.num_partials;
    at::parallel_for(0, a.num_partials, 1, [&](int64_t pb, int64_t pe) {
      for (int64_t p = pb; p < pe; ++p) {
        float* dw = a.dw_partial + p * a.n;
        std::fill(dw, dw + a.n, 0.f);
        const int64_t end = std::min(a.rows, (p + 1) * per);
        for (int64_t i = p * per; i < end; ++i)
          bwd_row(dy + i * a.n, x + i * a.n, w, a.rstd[i], dx + i * a.n, dw, a.n);
      }
    });
  });
}

}  // namespace CPU_CAPABILITY
}  // namespace fastpt::cpu
