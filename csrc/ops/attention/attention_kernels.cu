// Attention CUDA kernels (FlashAttention-2 algorithm, contract in attention.h), SIMT: every
// dtype computes in fp32 (double for float64). Tensor cores (WMMA) are not used yet.
//
// Forward: block = 4 warps = 16 query rows (4 per warp) of one (b, h); it walks key tiles of
// kBlockK keys (32; 16 for double), staged in shared memory with the block's queries. Lane j
// computes the logit of key j for a row; the row max and sum are warp shuffles; the online
// softmax rescales the row's accumulator, which lives in registers (lane owns features
// lane + 32 c); p_j is broadcast with a shuffle for the P V product.
// Backward: same split; per (row, key) it recomputes p from lse, dS = Pd * dP - P * Delta
// (Delta = dO . O per row, a warp sum), keeps dQ in registers and adds dK, dV into
// compute-type accumulators with atomicAdd (several query blocks share a key).
// Shared memory: (2 kBlockK + 16) x D compute-type values forward, (2 kBlockK + 32) x D
// backward (40 / 48 KiB at D = 128, fp32).
// FLOPs as on the CPU: 4 B H T S D forward, 2.5x that backward; traffic: q once, k and v once
// per 16-query block.
#include "common/cuda_compat.h"
#include "common/portable.h"
#include "ops/attention/attention.h"
#include "ops/attention/attention_cuda.h"

namespace fastpt {
namespace {

using cuda::acc_t;
using cuda::kFullMask;
using cuda::kWarp;

constexpr int kWarps = 4;
constexpr int kRowsPerWarp = 4;
constexpr int kBlockQ = kWarps * kRowsPerWarp;
constexpr int kChunks = int(kAttentionCudaMaxHeadDim / kWarp);  // features per lane
template <typename A>
constexpr int kBlockK = sizeof(A) == 8 ? 8 : 32;  // double: the backward's tiles fit 48 KiB at D = 128

template <typename A>
FASTPT_DEVICE A warp_max(A v) {
#pragma unroll
  for (int o = kWarp / 2; o > 0; o /= 2) {
    const A w = __shfl_xor_sync(kFullMask, v, o);
    v = w > v ? w : v;
  }
  return v;
}

template <typename A>
FASTPT_DEVICE A neg_inf() {
  return -A(INFINITY);
}

// Shared by both kernels: where the block's rows live and the tiles in shared memory.
template <typename T>
struct Tile {
  using A = acc_t<T>;
  const AttentionShape& s;
  int64_t b, h, hk, i0;
  const T *q, *k, *v;
  A *ks, *vs, *rows;  // kBlockK x D, kBlockK x D, kBlockQ x D (queries)

  // bh: the block's (b, h) as b H + h.
  FASTPT_DEVICE Tile(const AttentionShape& s_, int64_t bh, const void* q_, const void* k_, const void* v_, A* smem)
      : s(s_) {
    b = bh / s.H;
    h = bh % s.H;
    hk = h / (s.H / s.Hkv);
    i0 = int64_t(blockIdx.x) * kBlockQ;
    q = static_cast<const T*>(q_) + b * s.q_sb + h * s.q_sh;
    k = static_cast<const T*>(k_) + b * s.k_sb + hk * s.k_sh;
    v = static_cast<const T*>(v_) + b * s.v_sb + hk * s.v_sh;
    ks = smem;
    vs = ks + kBlockK<A> * s.D;
    rows = vs + kBlockK<A> * s.D;
  }

  // Stages rows [i0, i0 + kBlockQ) of x (row stride st) into `dst`, zeros past T.
  FASTPT_DEVICE void stage_rows(const T* x, int64_t st, A* dst) const {
    for (int64_t e = threadIdx.x; e < kBlockQ * s.D; e += blockDim.x) {
      const int64_t i = i0 + e / s.D;
      dst[e] = i < s.T ? cuda::to_acc(x[i * st + e % s.D]) : A(0);
    }
  }

  // Stages keys / values [j0, j0 + kBlockK), zeros past S. The caller syncs around it.
  FASTPT_DEVICE void stage_kv(int64_t j0) const {
    for (int64_t e = threadIdx.x; e < kBlockK<A> * s.D; e += blockDim.x) {
      const int64_t j = j0 + e / s.D, d = e % s.D;
      ks[e] = j < s.S ? cuda::to_acc(k[j * s.k_st + d]) : A(0);
      vs[e] = j < s.S ? cuda::to_acc(v[j * s.v_st + d]) : A(0);
    }
  }

  // Last key (exclusive) any row of the block sees.
  FASTPT_DEVICE int64_t key_end() const {
    if (!s.causal) return s.S;
    const int64_t last = (i0 + kBlockQ < s.T ? i0 + kBlockQ : s.T) - 1;
    const int64_t e = last + s.S - s.T + 1;
    return e < 0 ? 0 : (e < s.S ? e : s.S);
  }

  // The logit of query row r (i = i0 + r) and key j = j0 + lane, or -inf where masked.
  FASTPT_DEVICE A logit(int r, int64_t i, int64_t j, int lane) const {
    const bool seen = lane < kBlockK<A> && j < s.S && (!s.causal || j <= i + s.S - s.T) &&
                      (s.key_mask == nullptr || s.key_mask[b * s.S + j]);
    if (!seen) return neg_inf<A>();
    A dot = 0;
    for (int64_t d = 0; d < s.D; ++d) dot += rows[r * s.D + d] * ks[lane * s.D + d];
    A x = dot * A(s.scale);
    if (s.bias) {
      const A* bias = static_cast<const A*>(s.bias);
      x += bias[b * s.bias_sb + h * s.bias_sh + i * s.bias_st + j * s.bias_ss];
    }
    return x;
  }

  FASTPT_DEVICE bool kept(int64_t i, int64_t j) const {
    return dropout_keep(dropout_row_key(s.seed, uint64_t((b * s.H + h) * s.T + i)), uint32_t(j),
                        dropout_threshold(s.dropout_p));
  }
};

// bh0: the (b, h) of the launch's first row of blocks (launches take at most 65535 rows).
template <typename T>
__global__ void attention_fwd_kernel(AttentionFwdArgs a, int64_t bh0) {
  using A = acc_t<T>;
  constexpr int BK = kBlockK<A>;
  const AttentionShape& s = a.s;
  const Tile<T> t(s, bh0 + blockIdx.y, a.q, a.k, a.v, cuda::dynamic_smem<A>());
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  t.stage_rows(t.q, s.q_st, t.rows);
  A m[kRowsPerWarp], l[kRowsPerWarp], acc[kRowsPerWarp][kChunks];
  for (int rr = 0; rr < kRowsPerWarp; ++rr) {
    m[rr] = neg_inf<A>();
    l[rr] = 0;
    for (int c = 0; c < kChunks; ++c) acc[rr][c] = 0;
  }
  const int64_t kend = t.key_end();
  for (int64_t j0 = 0; j0 < kend; j0 += BK) {
    __syncthreads();  // previous tile consumed (and, the first time, the queries staged)
    t.stage_kv(j0);
    __syncthreads();
    for (int rr = 0; rr < kRowsPerWarp; ++rr) {
      const int r = warp * kRowsPerWarp + rr;
      const int64_t i = t.i0 + r, j = j0 + lane;
      if (i >= s.T) continue;  // uniform over the warp
      const A x = t.logit(r, i, j, lane);
      const A mx = warp_max(x), m_new = m[rr] > mx ? m[rr] : mx;
      const A m_use = m_new == neg_inf<A>() ? A(0) : m_new;  // no key seen yet: p = 0
      A p = exp(x - m_use);
      const A sum = cuda::warp_sum(p);
      const A alpha = exp(m[rr] - m_use);
      l[rr] = l[rr] * alpha + sum;
      m[rr] = m_new;
      if (s.dropout_p > 0 && j < s.S && !t.kept(i, j)) p = 0;
      for (int c = 0; c < kChunks; ++c) acc[rr][c] *= alpha;
      for (int jj = 0; jj < BK; ++jj) {
        const A pj = __shfl_sync(kFullMask, p, jj);
        if (pj == A(0)) continue;  // uniform: a broadcast value
        for (int c = 0; c < kChunks; ++c) {
          const int64_t d = lane + c * kWarp;
          if (d < s.D) acc[rr][c] += pj * t.vs[jj * s.D + d];
        }
      }
    }
  }
  const A keep_scale = A(1) / A(1 - s.dropout_p);
  for (int rr = 0; rr < kRowsPerWarp; ++rr) {
    const int64_t i = t.i0 + warp * kRowsPerWarp + rr;
    if (i >= s.T) continue;
    const int64_t row = (t.b * s.H + t.h) * s.T + i;
    const bool empty = l[rr] == A(0);
    const A f = empty ? A(0) : keep_scale / l[rr];
    T* out = static_cast<T*>(a.out) + row * s.D;
    for (int c = 0; c < kChunks; ++c) {
      const int64_t d = lane + c * kWarp;
      if (d < s.D) out[d] = cuda::from_acc<T>(acc[rr][c] * f);
    }
    if (lane == 0) static_cast<A*>(a.lse)[row] = empty ? neg_inf<A>() : m[rr] + log(l[rr]);
  }
}

template <typename T>
__global__ void attention_bwd_kernel(AttentionBwdArgs a, int64_t bh0) {
  using A = acc_t<T>;
  constexpr int BK = kBlockK<A>;
  const AttentionShape& s = a.s;
  A* smem = cuda::dynamic_smem<A>();
  const Tile<T> t(s, bh0 + blockIdx.y, a.q, a.k, a.v, smem);
  A* dos = t.rows + kBlockQ * s.D;  // the block's rows of dO
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  const int64_t bh = t.b * s.H + t.h;
  t.stage_rows(t.q, s.q_st, t.rows);
  t.stage_rows(static_cast<const T*>(a.grad_out) + bh * s.T * s.D, s.D, dos);
  __syncthreads();
  A lse[kRowsPerWarp], delta[kRowsPerWarp], dq[kRowsPerWarp][kChunks];
  const T* o = static_cast<const T*>(a.out) + bh * s.T * s.D;
  for (int rr = 0; rr < kRowsPerWarp; ++rr) {
    const int r = warp * kRowsPerWarp + rr;
    const int64_t i = t.i0 + r;
    A part = 0;
    for (int64_t d = lane; d < s.D && i < s.T; d += kWarp) part += dos[r * s.D + d] * cuda::to_acc(o[i * s.D + d]);
    delta[rr] = cuda::warp_sum(part);
    lse[rr] = i < s.T ? static_cast<const A*>(a.lse)[bh * s.T + i] : neg_inf<A>();
    for (int c = 0; c < kChunks; ++c) dq[rr][c] = 0;
  }
  A* gk = static_cast<A*>(a.grad_k) + (t.b * s.Hkv + t.hk) * s.S * s.D;
  A* gv = static_cast<A*>(a.grad_v) + (t.b * s.Hkv + t.hk) * s.S * s.D;
  const A scale = A(s.scale), keep_scale = A(1) / A(1 - s.dropout_p);
  const int64_t kend = t.key_end();
  for (int64_t j0 = 0; j0 < kend; j0 += BK) {
    __syncthreads();
    t.stage_kv(j0);
    __syncthreads();
    for (int rr = 0; rr < kRowsPerWarp; ++rr) {
      const int r = warp * kRowsPerWarp + rr;
      const int64_t i = t.i0 + r, j = j0 + lane;
      if (i >= s.T || lse[rr] == neg_inf<A>()) continue;  // uniform; a row without keys: no gradient
      const A x = t.logit(r, i, j, lane);
      // A lane without a key (masked, past S, lane >= BK: x = -inf) has p = pd = dS = 0, set
      // rather than computed: with a NaN lse or Delta (a NaN in q, k, v or dO), exp(-inf - NaN)
      // and 0 * NaN are NaN, and the NaN would reach keys past S (the next head's dK, dV).
      const bool seen = x != neg_inf<A>();
      const A p = seen ? exp(x - lse[rr]) : A(0);
      const A pd = !seen ? A(0) : s.dropout_p > 0 ? (t.kept(i, j) ? p * keep_scale : A(0)) : p;
      A dp = 0;
      if (seen && p != A(0))
        for (int64_t d = 0; d < s.D; ++d) dp += dos[r * s.D + d] * t.vs[lane * s.D + d];
      const A ds = seen ? pd * dp - p * delta[rr] : A(0);
      if (a.grad_bias && seen && p != A(0)) static_cast<A*>(a.grad_bias)[(bh * s.T + i) * s.S + j] = ds;
      for (int jj = 0; jj < BK && j0 + jj < s.S; ++jj) {  // dK, dV have S rows
        const A dsj = __shfl_sync(kFullMask, ds, jj), pdj = __shfl_sync(kFullMask, pd, jj);
        if (dsj == A(0) && pdj == A(0)) continue;  // uniform
        for (int c = 0; c < kChunks; ++c) {
          const int64_t d = lane + c * kWarp;
          if (d >= s.D) continue;
          dq[rr][c] += dsj * t.ks[jj * s.D + d];
          atomicAdd(gk + (j0 + jj) * s.D + d, scale * dsj * t.rows[r * s.D + d]);
          atomicAdd(gv + (j0 + jj) * s.D + d, pdj * dos[r * s.D + d]);
        }
      }
    }
  }
  for (int rr = 0; rr < kRowsPerWarp; ++rr) {
    const int64_t i = t.i0 + warp * kRowsPerWarp + rr;
    if (i >= s.T) continue;
    T* gq = static_cast<T*>(a.grad_q) + (bh * s.T + i) * s.D;
    for (int c = 0; c < kChunks; ++c) {
      const int64_t d = lane + c * kWarp;
      if (d < s.D) gq[d] = cuda::from_acc<T>(dq[rr][c] * scale);
    }
  }
}

// x: query blocks; y: (b, h) from bh0, at most max_grid_y() of them per launch.
dim3 grid_of(const AttentionShape& s, int64_t bh0) {
  return dim3(unsigned((s.T + kBlockQ - 1) / kBlockQ), cuda::grid_rows(s.B * s.H, bh0));
}

bool supported(const AttentionShape& s) { return s.D >= 1 && s.D <= kAttentionCudaMaxHeadDim; }

}  // namespace

cudaError_t attention_fwd_cuda(const AttentionFwdArgs& a, cudaStream_t stream) {
  if (a.s.B * a.s.H * a.s.T == 0) return cudaSuccess;
  if (!supported(a.s)) return cudaErrorInvalidValue;
  return cuda::dispatch_float_types(a.s.dtype, [&](auto tag) {
    using T = decltype(tag);
    using A = acc_t<T>;
    const size_t smem = size_t(2 * kBlockK<A> + kBlockQ) * a.s.D * sizeof(A);
    auto kernel = &attention_fwd_kernel<T>;
    for (int64_t bh0 = 0; bh0 < a.s.B * a.s.H; bh0 += cuda::max_grid_y())
      FASTPT_LAUNCH(kernel, grid_of(a.s, bh0), dim3(kWarps * kWarp), smem, stream, a, bh0);
    return cudaSuccess;
  });
}

cudaError_t attention_bwd_cuda(const AttentionBwdArgs& a, cudaStream_t stream) {
  if (a.s.B * a.s.H * a.s.T == 0) return cudaSuccess;
  if (!supported(a.s)) return cudaErrorInvalidValue;
  return cuda::dispatch_float_types(a.s.dtype, [&](auto tag) {
    using T = decltype(tag);
    using A = acc_t<T>;
    const size_t smem = size_t(2 * kBlockK<A> + 2 * kBlockQ) * a.s.D * sizeof(A);
    auto kernel = &attention_bwd_kernel<T>;
    for (int64_t bh0 = 0; bh0 < a.s.B * a.s.H; bh0 += cuda::max_grid_y())
      FASTPT_LAUNCH(kernel, grid_of(a.s, bh0), dim3(kWarps * kWarp), smem, stream, a, bh0);
    return cudaSuccess;
  });
}

}  // namespace fastpt
