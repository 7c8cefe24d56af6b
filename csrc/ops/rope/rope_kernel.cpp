// RoPE CPU kernel (compiled once per CPU capability, see common/cpu_dispatch.h).
//
// Parallel over the B*M*T rows; each row reads its cos/sin table row (R floats, shared by
// all heads, so it stays in cache) and rotates D features. Traffic: read x, write out.
// The interleaved layout de-interleaves 2 vectors into (even, odd) lanes, rotates, and
// re-interleaves, so both layouts run at vector width.
#include <ATen/Parallel.h>

#include "common/cpu_vec.h"
#include "ops/rope/rope.h"

namespace fastpt::cpu {
inline namespace CPU_CAPABILITY {
namespace {

// cos/sin of type C share T's compute type (the glue casts tables for float64 inputs).
template <bool kStream, typename T, typename C>
void half_row(const T* x, T* o, const C* cs, const C* sn, int64_t R, float sgn) {
  static_assert(std::is_same_v<acc_t<T>, acc_t<C>>);
  using V = aVec<T>;
  constexpr int64_t K = kChunk<T>;
  const V sign(sgn);
  V a0, a1, b0, b1, c0, c1, s0, s1;
  // Full chunks in lane order (cpu_vec.h) when the tables have x's type; fp32 tables with
  // bf16 x keep memory order, the tables' own.
  constexpr bool kLanes = std::is_same_v<T, C>;
  auto step = [&](int64_t i, int64_t len) {
    if (len == K && kLanes) {
      load2_lanes(x + i, a0, a1); load2_lanes(x + R + i, b0, b1);
      load2_lanes(cs + i, c0, c1); load2_lanes(sn + i, s0, s1);
    } else if (len == K) {
      load2(x + i, a0, a1); load2(x + R + i, b0, b1); load2(cs + i, c0, c1); load2(sn + i, s0, s1);
    } else {
      load2(x + i, a0, a1, len); load2(x + R + i, b0, b1, len);
      load2(cs + i, c0, c1, len); load2(sn + i, s0, s1, len);
    }
    s0 = s0 * sign;
    s1 = s1 * sign;
    const V o10 = a0 * c0 - b0 * s0, o11 = a1 * c1 - b1 * s1;
    const V o20 = b0 * c0 + a0 * s0, o21 = b1 * c1 + a1 * s1;
    if (len == K && kLanes) { store2_lanes<kStream>(o + i, o10, o11); store2_lanes<kStream>(o + R + i, o20, o21); }
    else if (len == K) { store2<kStream>(o + i, o10, o11); store2<kStream>(o + R + i, o20, o21); }
    else { store2(o + i, o10, o11, len); store2(o + R + i, o20, o21, len); }
  };
  int64_t i = 0;
  for (; i + K <= R; i += K) step(i, K);
  if (i < R) step(i, R - i);
}

template <bool kStream, typename T, typename C>
void interleaved_row(const T* x, T* o, const C* cs, const C* sn, int64_t R, float sgn) {
  using V = aVec<T>;
  using A = acc_t<T>;
  constexpr int64_t K = kChunk<T>;
  const V sign(sgn);
  V a, b, c, d, c0, c1, s0, s1;
  int64_t i = 0;  // pair index; K pairs (2K features) per step
  for (; i + K <= R; i += K) {
    load2(x + 2 * i, a, b);
    load2(x + 2 * i + K, c, d);
    load2(cs + i, c0, c1);
    load2(sn + i, s0, s1);
    s0 = s0 * sign;
    s1 = s1 * sign;
    auto [e0, d0] = at::vec::deinterleave2(a, b);  // even / odd features of pairs i .. i+V
    auto [e1, d1] = at::vec::deinterleave2(c, d);
    auto [p, q] = at::vec::interleave2(e0 * c0 - d0 * s0, d0 * c0 + e0 * s0);
    auto [r, t] = at::vec::interleave2(e1 * c1 - d1 * s1, d1 * c1 + e1 * s1);
    store2<kStream>(o + 2 * i, p, q);
    store2<kStream>(o + 2 * i + K, r, t);
  }
  for (; i < R; ++i) {  // scalar tail (fewer than K pairs)
    const A x1 = A(x[2 * i]), x2 = A(x[2 * i + 1]), cv = A(cs[i]), sv = A(sgn) * A(sn[i]);
    o[2 * i] = T(x1 * cv - x2 * sv);
    o[2 * i + 1] = T(x2 * cv + x1 * sv);
  }
}

template <typename T, typename C>
void run(const RopeArgs& a) {
  const T* x = static_cast<const T*>(a.x);
  T* out = static_cast<T*>(a.out);
  const C* cos = static_cast<const C*>(a.cos);
  const C* sin = static_cast<const C*>(a.sin);
  const float sign = a.conjugate ? -1.f : 1.f;
  const int64_t rows = a.B * a.M * a.T;
  const int64_t grain = std::max<int64_t>(1, (1 << 14) / std::max<int64_t>(a.D, 1));
  with_stream(rows * a.D * int64_t(sizeof(T)) >= stream_min_bytes(), [&](auto stream) {
    at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
      // (b, m, t) of row `begin`, then stepped like an odometer: three integer divisions
      // per row cost as much as rotating a 128-wide bf16 row.
      int64_t t = begin % a.T, m = (begin / a.T) % a.M, b = begin / (a.T * a.M);
      for (int64_t r = begin; r < end; ++r) {
        const int64_t p = a.pos ? a.pos[b * a.pos_sb + t] : t;
        const T* xr = x + b * a.x_sb + m * a.x_sm + t * a.x_st;
        T* orow = out + b * a.o_sb + m * a.o_sm + t * a.o_st;
        if (a.interleaved) interleaved_row<stream()>(xr, orow, cos + p * a.R, sin + p * a.R, a.R, sign);
        else half_row<stream()>(xr, orow, cos + p * a.R, sin + p * a.R, a.R, sign);
        if (orow != xr) std::copy(xr + 2 * a.R, xr + a.D, orow + 2 * a.R);
        if (++t == a.T) {
          t = 0;
          if (++m == a.M) m = 0, ++b;
        }
      }
      stream_fence();
    });
  });
}

}  // namespace

void rope_apply(const RopeArgs& a) {
  dispatch_float_types(a.dtype, [&](auto tag) {
    using T = decltype(tag);
    if constexpr (std::is_same_v<T, double>) run<T, T>(a);  // tables cast to float64 by the glue
    else if (a.cs_dtype == DType::kFloat32) run<T, float>(a);
    else run<T, T>(a);
  });
}

}  // namespace CPU_CAPABILITY
}  // namespace fastpt::cpu
