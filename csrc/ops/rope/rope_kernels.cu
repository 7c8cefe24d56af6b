// RoPE CUDA kernel: rotates the first 2R features of every row of x, viewed as (B, M, T, D)
// with element strides and a contiguous last dim, by the angles of the row's position p
// (cos/sin tables (P, R), float32 or x's dtype), and copies features 2R..D unchanged when
// out != x (partial rotary); out == x rotates in place. Same semantics as rope_kernel.cpp:
//   half layout: pairs (i, i + R);  interleaved: pairs (2i, 2i + 1);
//   (x1, x2) -> (x1 c - x2 s, x2 c + x1 s), with -s when conjugate (the backward).
// p = t, or pos[b * pos_sb + t]; a p outside [0, P) turns the row's rotated features into
// NaN (see rope_cuda.h). fp32 arithmetic (double for float64).
//
// Parallel split: a row is cut into "units", each one V-wide access (V = 16 / sizeof(T)):
// half layout, pairs [i, i + V) (two x packs and one pack each of cos and sin); interleaved,
// features [2i, 2i + V) (one x pack, V/2 cos and sin values); then the pass-through packs.
// A 256-thread block is (tx, 256 / tx): tx threads (the power of two >= units per row, at
// most 128) loop over the units of one row, and the block's rows advance grid-stride. Every
// unit reads and writes only its own elements, so in-place needs no barrier. V = 1 (scalar
// pairs) whenever D, R, a stride or a pointer does not fit the vector width.
//
// Bytes moved, s = sizeof(T): reads x and writes out, 2 * B*M*T*D * s (2 * B*M*T*2R * s in
// place), plus the table rows, which all M heads of a (b, t) share through L1/L2.
#include "common/cuda_compat.h"
#include "common/portable.h"
#include "ops/rope/rope.h"
#include "ops/rope/rope_cuda.h"

namespace fastpt {
namespace {

using cuda::acc_t;
using cuda::aligned_to;
using cuda::from_acc;
using cuda::load_acc;
using cuda::quiet_nan;
using cuda::store_acc;
using cuda::to_acc;
using cuda::vec_width;

constexpr int kThreads = 256;
constexpr int kMaxThreadsPerRow = 128;

// W table values from row pointer `tab` at pair i, or NaN for a bad position (the table
// is then not read at all, so P may even be 0).
template <int W, typename C, typename A>
FASTPT_DEVICE void load_table(const C* tab, int64_t i, bool bad, A (&v)[W]) {
  if (bad) {
#pragma unroll
    for (int k = 0; k < W; ++k) v[k] = quiet_nan<A>();
  } else {
    load_acc<W>(tab + i, v);
  }
}

// Half layout, pairs [i, i + V).
template <typename T, typename C, int V>
FASTPT_DEVICE void rotate_half(const T* x, T* o, const C* cs, const C* sn, int64_t R, int64_t i,
                               acc_t<T> sign, bool bad) {
  using A = acc_t<T>;
  A x1[V], x2[V], c[V], s[V];
  load_acc<V>(x + i, x1);
  load_acc<V>(x + R + i, x2);
  load_table<V>(cs, i, bad, c);
  load_table<V>(sn, i, bad, s);
#pragma unroll
  for (int k = 0; k < V; ++k) {
    const A sv = s[k] * sign, a = x1[k], b = x2[k];
    x1[k] = a * c[k] - b * sv;
    x2[k] = b * c[k] + a * sv;
  }
  store_acc<V>(o + i, x1);
  store_acc<V>(o + R + i, x2);
}

// Interleaved layout, features [2i, 2i + V) = pairs [i, i + V/2); V = 1 means one pair.
template <typename T, typename C, int V>
FASTPT_DEVICE void rotate_interleaved(const T* x, T* o, const C* cs, const C* sn, int64_t i,
                                      acc_t<T> sign, bool bad) {
  using A = acc_t<T>;
  constexpr int F = V > 1 ? V : 2;  // features per unit
  constexpr int W = F / 2;          // pairs per unit
  A f[F], c[W], s[W];
  if constexpr (V > 1) {
    load_acc<V>(x + 2 * i, f);
  } else {
    f[0] = to_acc(x[2 * i]);
    f[1] = to_acc(x[2 * i + 1]);
  }
  load_table<W>(cs, i, bad, c);
  load_table<W>(sn, i, bad, s);
#pragma unroll
  for (int k = 0; k < W; ++k) {
    const A sv = s[k] * sign, a = f[2 * k], b = f[2 * k + 1];
    f[2 * k] = a * c[k] - b * sv;
    f[2 * k + 1] = b * c[k] + a * sv;
  }
  if constexpr (V > 1) {
    store_acc<V>(o + 2 * i, f);
  } else {
    o[2 * i] = from_acc<T>(f[0]);
    o[2 * i + 1] = from_acc<T>(f[1]);
  }
}

template <typename T, int V>
FASTPT_DEVICE void copy_pack(const T* x, T* o, int64_t j) {
  *reinterpret_cast<cuda::Pack<T, V>*>(o + j) = *reinterpret_cast<const cuda::Pack<T, V>*>(x + j);
}

// Units [0, rot_units) rotate; units [rot_units, units) copy the pass-through features.
template <typename T, typename C, int V>
__global__ void rope_kernel(const RopeArgs a, int64_t rot_units, int64_t units) {
  static_assert(std::is_same_v<acc_t<T>, acc_t<C>>, "tables share the compute type of x");
  using A = acc_t<T>;
  const T* x = static_cast<const T*>(a.x);
  T* out = static_cast<T*>(a.out);
  const C* cos = static_cast<const C*>(a.cos);
  const C* sin = static_cast<const C*>(a.sin);
  const A sign = a.conjugate ? A(-1) : A(1);
  const int64_t pairs_per_unit = V == 1 ? 1 : (a.interleaved ? V / 2 : V);
  const int64_t rows = a.B * a.M * a.T;
  for (int64_t r = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y; r < rows;
       r += static_cast<int64_t>(gridDim.x) * blockDim.y) {
    const int64_t t = r % a.T, m = (r / a.T) % a.M, b = r / (a.T * a.M);
    const int64_t p = a.pos ? a.pos[b * a.pos_sb + t] : t;
    const bool bad = p < 0 || p >= a.P;
    const T* xr = x + b * a.x_sb + m * a.x_sm + t * a.x_st;
    T* orow = out + b * a.o_sb + m * a.o_sm + t * a.o_st;
    const C* cr = cos + (bad ? 0 : p * a.R);
    const C* sr = sin + (bad ? 0 : p * a.R);
    for (int64_t u = threadIdx.x; u < units; u += blockDim.x) {
      if (u < rot_units) {
        const int64_t i = u * pairs_per_unit;
        if (a.interleaved) rotate_interleaved<T, C, V>(xr, orow, cr, sr, i, sign, bad);
        else rotate_half<T, C, V>(xr, orow, cr, sr, a.R, i, sign, bad);
      } else {
        copy_pack<T, V>(xr, orow, 2 * a.R + (u - rot_units) * V);
      }
    }
  }
}

template <typename T, typename C, int V>
cudaError_t launch(const RopeArgs& a, cudaStream_t stream) {
  const int64_t pairs_per_unit = V == 1 ? 1 : (a.interleaved ? V / 2 : V);
  const int64_t rot_units = a.R / pairs_per_unit;
  const int64_t units = rot_units + (a.out != a.x ? (a.D - 2 * a.R) / V : 0);
  int tx = 1;
  while (tx < units && tx < kMaxThreadsPerRow) tx *= 2;
  const int ty = kThreads / tx;
  auto kernel = &rope_kernel<T, C, V>;
  FASTPT_LAUNCH(kernel, cuda::grid_for(a.B * a.M * a.T, ty), dim3(tx, ty), 0, stream, a,
                rot_units, units);
  return cudaSuccess;
}

// The vector path needs every row, pair group and table row to start on a pack boundary.
template <typename T, typename C>
cudaError_t launch_any_width(const RopeArgs& a, cudaStream_t stream) {
  constexpr int V = vec_width<T>();
  const int64_t pairs_per_unit = a.interleaved ? V / 2 : V;
  const bool vec = a.D % V == 0 && a.R % pairs_per_unit == 0 && a.x_sb % V == 0 &&
                   a.x_sm % V == 0 && a.x_st % V == 0 && a.o_sb % V == 0 && a.o_sm % V == 0 &&
                   a.o_st % V == 0 && aligned_to(16, a.x, a.out) &&
                   aligned_to(sizeof(C) * pairs_per_unit, a.cos, a.sin);
  return vec ? launch<T, C, V>(a, stream) : launch<T, C, 1>(a, stream);
}

}  // namespace

cudaError_t rope_apply_cuda(const RopeArgs& a, cudaStream_t stream) {
  if (a.B * a.M * a.T <= 0 || a.D <= 0) return cudaSuccess;
  if (a.R < 1 || 2 * a.R > a.D) return cudaErrorInvalidValue;
  return cuda::dispatch_float_types(a.dtype, [&](auto tag) {
    using T = decltype(tag);
    if constexpr (std::is_same_v<T, double>) return launch_any_width<T, T>(a, stream);
    else if (a.cs_dtype == DType::kFloat32) return launch_any_width<T, float>(a, stream);
    else return launch_any_width<T, T>(a, stream);
  });
}

}  // namespace fastpt
