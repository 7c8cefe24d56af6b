// Attention CUDA kernels on tensor cores: WMMA m16n16k16 with bf16 / fp16 inputs and fp32
// accumulation, same contract as the SIMT kernels (attention.h), which keep fp32 and fp64.
//
// Tiles: 32 queries x 32 keys per step, block = 4 warps. D is padded with zeros to Dp (a
// multiple of 16, <= 128) in shared memory, so every D <= 128 runs here (D = 40 -> 48: 20%
// of the MACs are on zeros). Each tile product is cut into 16 x 16 output tiles, one warp each.
// Forward, block = (32 queries, b, h), per key tile:
//   S = Q K^T: 2 x 2 tiles, one per warp, stored in fp32 to shared memory;
//   online softmax in fp32: warp w owns rows 8w..8w+7, lane = key, warp-shuffle max and sum,
//     the rows' running max and sum in shared memory; P (rounded to the input type before
//     P V, as FlashAttention does) and each row's rescale factor alpha go to shared memory;
//   O = alpha O + P V: 2 x Dp/16 tiles, warp w owns tiles w, w+4, ...; a tile's P V product goes
//     through a per-warp fp32 scratch tile into registers (lane: row lane/2, 8 columns), where
//     the rescale happens: WMMA leaves the fragment's element-to-row mapping unspecified.
// Backward, deterministic (no atomics), two kernels recomputing P from the saved lse:
//   dQ kernel, block = (32 queries, b, h), per key tile: S = Q K^T and dP = dO V^T per warp
//     tile; dS = Pd * dP - P * Delta elementwise (the warp on its own tile) -> shared memory
//     in the input type; dQ += dS K in fragments held across the key loop. Writes dBias.
//   dK dV kernel, block = (32 keys, b, kv head), over the H / Hkv query heads of the group and
//     the query tiles that see the keys: S^T = K Q^T, dP^T = V dO^T, dV += Pd^T dO,
//     dK += dS^T Q in fragments; a block owns its keys, so GQA needs no reduction.
// Shared memory at Dp = 128: forward 37 KiB, dQ 45 KiB, dK dV 47 KiB (all under the 48 KiB a
// launch gets without opting in). FLOPs: 4 B H T S D forward; the backward does 7 tile
// products per tile pair (FlashAttention-2: 5), S and dP twice, the price of no atomics.
// Traffic: forward and dQ read their 32 rows of q (and dO) once and k, v once per block; the
// dK dV kernel reads k, v once and q, dO, O once per block. Not tuned (no GPU here): no
// cp.async double buffering, scalar staging loads.
#include "common/cuda_compat.h"
#include "common/portable.h"
#include "ops/attention/attention.h"
#include "ops/attention/attention_cuda.h"

namespace fastpt {
namespace {

namespace wmma = nvcuda::wmma;
using cuda::kWarp;
using cuda::to_float;

constexpr int kTile = 32;  // queries and keys per step
constexpr int kWarps = 4;
constexpr int kThreads = kWarps * kWarp;
constexpr int kRowsPerWarp = kTile / kWarps;  // softmax rows per warp
constexpr int kMaxOutTiles = 2 * int(kAttentionCudaMaxHeadDim) / 16 / kWarps;  // per warp
constexpr int kPad = 8;  // 16-bit elements of row padding: spreads banks, keeps 32-byte alignment
constexpr int kLdP = kTile + kPad;  // row stride of the 32 x 32 16-bit tiles (P, dS)
constexpr int kLdS = kTile + 4;     // row stride of the 32 x 32 fp32 score tile
constexpr int kFrag = 16 * 16;

template <typename T>
using FragA = wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major>;
template <typename T>
using FragBRow = wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major>;
template <typename T>
using FragBCol = wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major>;
using FragC = wmma::fragment<wmma::accumulator, 16, 16, 16, float>;

// bf16 WMMA exists from sm_80 (fp16 from sm_70): compiled for an older arch, the bf16 kernels
// are empty, and attention_wmma_supported sends bf16 to the SIMT kernels on such a GPU.
template <typename T>
constexpr bool kWmmaCompiled =
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
    !std::is_same_v<T, cuda::bf16>;
#else
    true;
#endif

// Padded head dim and the row stride of the 32 x Dp tiles (in elements).
struct Dims {
  int dp, ld;
  FASTPT_HOST_DEVICE explicit Dims(int64_t D) : dp(int((D + 15) / 16 * 16)), ld(int((D + 15) / 16 * 16) + kPad) {}
  // 16x16 output tiles of a 32 x Dp product.
  FASTPT_HOST_DEVICE int out_tiles() const { return 2 * (dp / 16); }
};

// Carves shared memory into 128-byte aligned regions (WMMA pointers need 32 bytes). With a
// null base it only counts, so host and device agree on the size.
struct Carver {
  char* base;
  size_t used = 0;
  template <typename X>
  FASTPT_HOST_DEVICE X* take(size_t n) {
    X* r = base ? reinterpret_cast<X*>(base + used) : nullptr;
    used += (n * sizeof(X) + 127) / 128 * 128;
    return r;
  }
};

FASTPT_DEVICE char* aligned_smem() {
  const uintptr_t p = reinterpret_cast<uintptr_t>(cuda::dynamic_smem<char>());
  return reinterpret_cast<char*>((p + 127) / 128 * 128);
}

template <typename T>
struct FwdSmem {
  T *q, *k, *v, *p;  // 32 x ld tiles; P: 32 x kLdP
  float *s, *scratch, *alpha, *inv_l, *row_m, *row_l;  // row_m, row_l: the softmax state
  FASTPT_HOST_DEVICE FwdSmem(Carver& c, const Dims& d) {
    q = c.take<T>(kTile * d.ld);
    k = c.take<T>(kTile * d.ld);
    v = c.take<T>(kTile * d.ld);
    p = c.take<T>(kTile * kLdP);
    s = c.take<float>(kTile * kLdS);
    scratch = c.take<float>(kWarps * kFrag);
    alpha = c.take<float>(kTile);
    inv_l = c.take<float>(kTile);
    row_m = c.take<float>(kTile);
    row_l = c.take<float>(kTile);
  }
};

// Both backward kernels: "rows" are the 32 queries, "cols" the 32 keys (dQ kernel) or the other
// way round (dK dV kernel); g1, g2 the 16-bit tiles for dS (and Pd^T).
template <typename T>
struct BwdSmem {
  T *q, *dout, *k, *v, *g1, *g2;
  float *scratch, *lse, *delta;
  FASTPT_HOST_DEVICE BwdSmem(Carver& c, const Dims& d, bool two_grad_tiles) {
    q = c.take<T>(kTile * d.ld);
    dout = c.take<T>(kTile * d.ld);
    k = c.take<T>(kTile * d.ld);
    v = c.take<T>(kTile * d.ld);
    g1 = c.take<T>(kTile * kLdP);
    g2 = two_grad_tiles ? c.take<T>(kTile * kLdP) : nullptr;
    scratch = c.take<float>(kWarps * 2 * kFrag);
    lse = c.take<float>(kTile);
    delta = c.take<float>(kTile);
  }
};

// Rows [r0, r0 + 32) of x (row stride st) into a 32 x ld tile; zeros past n rows and for the
// padded features d >= D.
template <typename T>
FASTPT_DEVICE void stage(T* dst, const T* x, int64_t st, int64_t r0, int64_t n, int64_t D, const Dims& dm) {
  for (int e = threadIdx.x; e < kTile * dm.dp; e += kThreads) {
    const int r = e / dm.dp, d = e % dm.dp;
    const int64_t row = r0 + r;
    dst[r * dm.ld + d] = row < n && d < D ? x[row * st + d] : cuda::from_float<T>(0.0f);
  }
}

FASTPT_DEVICE float warp_max(float v) {
#pragma unroll
  for (int o = kWarp / 2; o > 0; o /= 2) v = fmaxf(v, __shfl_xor_sync(cuda::kFullMask, v, o));
  return v;
}

// Which logits of head (b, h) exist, their bias and their dropout decision.
struct Logits {
  const AttentionShape& s;
  int64_t b, h;
  FASTPT_DEVICE bool seen(int64_t i, int64_t j) const {
    return i < s.T && j < s.S && (!s.causal || j <= i + s.S - s.T) &&
           (s.key_mask == nullptr || s.key_mask[b * s.S + j]);
  }
  FASTPT_DEVICE float logit(float dot, int64_t i, int64_t j) const {
    float x = dot * float(s.scale);
    if (s.bias)
      x += static_cast<const float*>(s.bias)[b * s.bias_sb + h * s.bias_sh + i * s.bias_st + j * s.bias_ss];
    return x;
  }
  FASTPT_DEVICE bool kept(int64_t i, int64_t j) const {
    return s.dropout_p == 0 || dropout_keep(dropout_row_key(s.seed, uint64_t((b * s.H + h) * s.T + i)),
                                            uint32_t(j), dropout_threshold(s.dropout_p));
  }
};

// Keys [0, end) that some query of [i0, i0 + 32) sees.
FASTPT_DEVICE int64_t key_end(const AttentionShape& s, int64_t i0) {
  if (!s.causal) return s.S;
  const int64_t last = (i0 + kTile < s.T ? i0 + kTile : s.T) - 1;
  const int64_t e = last + s.S - s.T + 1;
  return e < 0 ? 0 : (e < s.S ? e : s.S);
}

// acc += A[16 x K] B[K x 16], A row-major (lda), B as FragB says (column-major: B^T's rows are
// b's rows), K in steps of 16.
template <typename T, typename FragB>
FASTPT_DEVICE void mma_tile(FragC& acc, const T* a, int lda, const T* b, int ldb, int k) {
  constexpr bool b_col = std::is_same_v<FragB, FragBCol<T>>;
  for (int kk = 0; kk < k; kk += 16) {
    FragA<T> fa;
    FragB fb;
    wmma::load_matrix_sync(fa, a + kk, lda);
    wmma::load_matrix_sync(fb, b_col ? b + kk : b + kk * ldb, ldb);
    wmma::mma_sync(acc, fa, fb, acc);
  }
}

// The forward of the 32 queries from blockIdx.x * 32 of head bh = b H + h.
template <typename T>
FASTPT_DEVICE void wmma_fwd(const AttentionFwdArgs& a, int64_t bh) {
  const AttentionShape& s = a.s;
  const Dims dm(s.D);
  Carver carver{aligned_smem()};
  const FwdSmem<T> sm(carver, dm);
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  const int64_t b = bh / s.H, h = bh % s.H, hk = h / (s.H / s.Hkv);
  const int64_t i0 = int64_t(blockIdx.x) * kTile;
  const Logits lg{s, b, h};
  const T* k = static_cast<const T*>(a.k) + b * s.k_sb + hk * s.k_sh;
  const T* v = static_cast<const T*>(a.v) + b * s.v_sb + hk * s.v_sh;
  stage(sm.q, static_cast<const T*>(a.q) + b * s.q_sb + h * s.q_sh, s.q_st, i0, s.T, s.D, dm);
  float o[kMaxOutTiles][8];  // this lane's 8 elements of each of its output tiles
#pragma unroll
  for (int t = 0; t < kMaxOutTiles; ++t)
#pragma unroll
    for (int e = 0; e < 8; ++e) o[t][e] = 0.0f;
  // Each row's running max and sum live in shared memory, written by lane 0 of the warp that
  // owns the row and read by that warp only (after the next __syncthreads).
  // NOTE: in registers (the row loop unrolled) the kernel took 238 registers; this way 128.
  for (int rr = 0; rr < kRowsPerWarp && lane == 0; ++rr)
    sm.row_m[warp * kRowsPerWarp + rr] = -INFINITY, sm.row_l[warp * kRowsPerWarp + rr] = 0.0f;
  const int64_t kend = key_end(s, i0);
  for (int64_t j0 = 0; j0 < kend; j0 += kTile) {
    __syncthreads();  // the previous tile is consumed (the first time: Q is staged)
    stage(sm.k, k, s.k_st, j0, s.S, s.D, dm);
    stage(sm.v, v, s.v_st, j0, s.S, s.D, dm);
    __syncthreads();
    {
      const int rf = warp / 2, kf = warp % 2;
      FragC acc;
      wmma::fill_fragment(acc, 0.0f);
      mma_tile<T, FragBCol<T>>(acc, sm.q + rf * 16 * dm.ld, dm.ld, sm.k + kf * 16 * dm.ld, dm.ld, dm.dp);
      wmma::store_matrix_sync(sm.s + rf * 16 * kLdS + kf * 16, acc, kLdS, wmma::mem_row_major);
    }
    __syncthreads();  // a softmax row reads two warps' S tiles
#pragma unroll 1
    for (int rr = 0; rr < kRowsPerWarp; ++rr) {
      const int r = warp * kRowsPerWarp + rr;
      const int64_t i = i0 + r, j = j0 + lane;
      const bool seen = lg.seen(i, j);
      const float x = seen ? lg.logit(sm.s[r * kLdS + lane], i, j) : -INFINITY;
      // Read before the warp primitives: lane 0 overwrites both after them.
      const float m_old = sm.row_m[r], l_old = sm.row_l[r];
      const float m_new = fmaxf(m_old, warp_max(x));
      const float m_use = m_new == -INFINITY ? 0.0f : m_new;  // no key seen yet: p = 0
      float p = expf(x - m_use);
      const float alpha = expf(m_old - m_use);
      const float l_new = l_old * alpha + cuda::warp_sum(p);
      if (seen && !lg.kept(i, j)) p = 0.0f;
      sm.p[r * kLdP + lane] = cuda::from_float<T>(p);
      if (lane == 0) sm.alpha[r] = alpha, sm.row_m[r] = m_new, sm.row_l[r] = l_new;
    }
    __syncthreads();
    float* scratch = sm.scratch + warp * kFrag;
    const int row = lane / 2, col0 = (lane % 2) * 8;
#pragma unroll
    for (int t = 0; t < kMaxOutTiles; ++t) {
      const int tile = warp + t * kWarps, rf = tile % 2, c = tile / 2 * 16;
      if (tile >= dm.out_tiles()) continue;  // uniform over the warp
      FragC acc;
      wmma::fill_fragment(acc, 0.0f);
      mma_tile<T, FragBRow<T>>(acc, sm.p + rf * 16 * kLdP, kLdP, sm.v + c, dm.ld, kTile);
      wmma::store_matrix_sync(scratch, acc, 16, wmma::mem_row_major);
      __syncwarp();
      const float al = sm.alpha[rf * 16 + row];
#pragma unroll
      for (int e = 0; e < 8; ++e) o[t][e] = o[t][e] * al + scratch[row * 16 + col0 + e];
      __syncwarp();
    }
  }
  // The softmax warps own l and m; the output tiles are spread over all warps.
  const float keep_scale = 1.0f / float(1.0 - s.dropout_p);
  for (int rr = 0; rr < kRowsPerWarp && lane == 0; ++rr) {
    const int r = warp * kRowsPerWarp + rr;
    const float l = sm.row_l[r];
    const bool empty = l == 0.0f;  // no key: output 0, lse -inf
    sm.inv_l[r] = empty ? 0.0f : keep_scale / l;
    if (i0 + r < s.T) static_cast<float*>(a.lse)[bh * s.T + i0 + r] = empty ? -INFINITY : sm.row_m[r] + logf(l);
  }
  __syncthreads();
  T* out = static_cast<T*>(a.out) + bh * s.T * s.D;
  const int row = lane / 2, col0 = (lane % 2) * 8;
#pragma unroll
  for (int t = 0; t < kMaxOutTiles; ++t) {
    const int tile = warp + t * kWarps, rf = tile % 2, c = tile / 2 * 16;
    const int64_t i = i0 + rf * 16 + row;
    if (tile >= dm.out_tiles() || i >= s.T) continue;
    const float f = sm.inv_l[rf * 16 + row];
#pragma unroll
    for (int e = 0; e < 8; ++e)
      if (c + col0 + e < s.D) out[i * s.D + c + col0 + e] = cuda::from_float<T>(o[t][e] * f);
  }
}

// lse and Delta = dO . O of the rows [i0, i0 + 32) of head bh (warp w: rows 8w..8w+7).
template <typename T>
FASTPT_DEVICE void row_stats(const AttentionBwdArgs& a, int64_t bh, int64_t i0, float* lse, float* delta) {
  const AttentionShape& s = a.s;
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  for (int rr = 0; rr < kRowsPerWarp; ++rr) {
    const int r = warp * kRowsPerWarp + rr;
    const int64_t i = i0 + r;
    float part = 0.0f;
    if (i < s.T) {
      const T* o = static_cast<const T*>(a.out) + (bh * s.T + i) * s.D;
      const T* g = static_cast<const T*>(a.grad_out) + (bh * s.T + i) * s.D;
      for (int64_t d = lane; d < s.D; d += kWarp) part += to_float(g[d]) * to_float(o[d]);
    }
    part = cuda::warp_sum(part);
    if (lane == 0) {
      lse[r] = i < s.T ? static_cast<const float*>(a.lse)[bh * s.T + i] : -INFINITY;
      delta[r] = part;
    }
  }
}

// The warp's 16 x 16 tile of S (or S^T) and dP (or dP^T) from the staged tiles, into its two
// fp32 scratch tiles: x_s = X Y^T, x_dp = U W^T (rows of X, U; columns from Y, W).
template <typename T>
FASTPT_DEVICE void score_tiles(float* scratch, const T* x, const T* y, const T* u, const T* w, const Dims& dm) {
  FragC acc;
  wmma::fill_fragment(acc, 0.0f);
  mma_tile<T, FragBCol<T>>(acc, x, dm.ld, y, dm.ld, dm.dp);
  wmma::store_matrix_sync(scratch, acc, 16, wmma::mem_row_major);
  wmma::fill_fragment(acc, 0.0f);
  mma_tile<T, FragBCol<T>>(acc, u, dm.ld, w, dm.ld, dm.dp);
  wmma::store_matrix_sync(scratch + kFrag, acc, 16, wmma::mem_row_major);
  __syncwarp();
}

// P, Pd and dS = Pd * dP - P * Delta of one logit, from its dot product and dP.
struct Grad {
  float pd, ds;
};
FASTPT_DEVICE Grad logit_grad(const Logits& lg, int64_t i, int64_t j, float dot, float dp, float lse, float delta) {
  if (lse == -INFINITY || !lg.seen(i, j)) return {0.0f, 0.0f};  // a row without keys: no gradient
  const float p = expf(lg.logit(dot, i, j) - lse);
  const float pd = lg.kept(i, j) ? p / float(1.0 - lg.s.dropout_p) : 0.0f;
  return {pd, pd * dp - p * delta};
}

// Stores 16x16 fp32 fragments to a (rows x D) row-major matrix through the warp's scratch tile,
// times `mul`, cut at n rows and D columns.
template <typename O>
FASTPT_DEVICE void store_tile(O* dst, const FragC& acc, float* scratch, int64_t r0, int64_t n, int c, int64_t D,
                              float mul) {
  wmma::store_matrix_sync(scratch, acc, 16, wmma::mem_row_major);
  __syncwarp();
  for (int e = threadIdx.x % kWarp; e < kFrag; e += kWarp) {
    const int64_t r = r0 + e / 16, d = c + e % 16;
    if (r < n && d < D) {
      if constexpr (std::is_same_v<O, float>) dst[r * D + d] = scratch[e] * mul;
      else dst[r * D + d] = cuda::from_float<O>(scratch[e] * mul);
    }
  }
  __syncwarp();
}

// dQ (and dBias) of the 32 queries from blockIdx.x * 32 of head bh = b H + h.
template <typename T>
FASTPT_DEVICE void wmma_bwd_dq(const AttentionBwdArgs& a, int64_t bh) {
  const AttentionShape& s = a.s;
  const Dims dm(s.D);
  Carver carver{aligned_smem()};
  const BwdSmem<T> sm(carver, dm, false);
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  const int64_t b = bh / s.H, h = bh % s.H, hk = h / (s.H / s.Hkv);
  const int64_t i0 = int64_t(blockIdx.x) * kTile;
  const Logits lg{s, b, h};
  const T* k = static_cast<const T*>(a.k) + b * s.k_sb + hk * s.k_sh;
  const T* v = static_cast<const T*>(a.v) + b * s.v_sb + hk * s.v_sh;
  stage(sm.q, static_cast<const T*>(a.q) + b * s.q_sb + h * s.q_sh, s.q_st, i0, s.T, s.D, dm);
  stage(sm.dout, static_cast<const T*>(a.grad_out) + bh * s.T * s.D, s.D, i0, s.T, s.D, dm);
  row_stats<T>(a, bh, i0, sm.lse, sm.delta);
  FragC dq[kMaxOutTiles];
#pragma unroll
  for (int t = 0; t < kMaxOutTiles; ++t) wmma::fill_fragment(dq[t], 0.0f);
  float* scratch = sm.scratch + warp * 2 * kFrag;
  const int64_t kend = key_end(s, i0);
  for (int64_t j0 = 0; j0 < kend; j0 += kTile) {
    __syncthreads();  // the previous tile is consumed (the first time: Q, dO, row stats are in)
    stage(sm.k, k, s.k_st, j0, s.S, s.D, dm);
    stage(sm.v, v, s.v_st, j0, s.S, s.D, dm);
    __syncthreads();
    const int rf = warp / 2, kf = warp % 2;
    score_tiles(scratch, sm.q + rf * 16 * dm.ld, sm.k + kf * 16 * dm.ld, sm.dout + rf * 16 * dm.ld,
                sm.v + kf * 16 * dm.ld, dm);
    for (int e = lane; e < kFrag; e += kWarp) {
      const int r = rf * 16 + e / 16, c = kf * 16 + e % 16;
      const int64_t i = i0 + r, j = j0 + c;
      const Grad g = logit_grad(lg, i, j, scratch[e], scratch[kFrag + e], sm.lse[r], sm.delta[r]);
      sm.g1[r * kLdP + c] = cuda::from_float<T>(g.ds);
      if (a.grad_bias && lg.seen(i, j)) static_cast<float*>(a.grad_bias)[(bh * s.T + i) * s.S + j] = g.ds;
    }
    __syncthreads();
#pragma unroll
    for (int t = 0; t < kMaxOutTiles; ++t) {
      const int tile = warp + t * kWarps, trf = tile % 2, c = tile / 2 * 16;
      if (tile < dm.out_tiles())
        mma_tile<T, FragBRow<T>>(dq[t], sm.g1 + trf * 16 * kLdP, kLdP, sm.k + c, dm.ld, kTile);
    }
  }
  T* gq = static_cast<T*>(a.grad_q) + bh * s.T * s.D;
#pragma unroll
  for (int t = 0; t < kMaxOutTiles; ++t) {
    const int tile = warp + t * kWarps, trf = tile % 2, c = tile / 2 * 16;
    if (tile < dm.out_tiles()) store_tile(gq, dq[t], scratch, i0 + trf * 16, s.T, c, s.D, float(s.scale));
  }
}

// dK, dV of the 32 keys from blockIdx.x * 32 of kv head bkv = b Hkv + hk.
template <typename T>
FASTPT_DEVICE void wmma_bwd_dkv(const AttentionBwdArgs& a, int64_t bkv) {
  const AttentionShape& s = a.s;
  const Dims dm(s.D);
  Carver carver{aligned_smem()};
  const BwdSmem<T> sm(carver, dm, true);  // g1 = Pd^T, g2 = dS^T (keys x queries)
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  const int64_t b = bkv / s.Hkv, hk = bkv % s.Hkv, group = s.H / s.Hkv;
  const int64_t j0 = int64_t(blockIdx.x) * kTile;
  stage(sm.k, static_cast<const T*>(a.k) + b * s.k_sb + hk * s.k_sh, s.k_st, j0, s.S, s.D, dm);
  stage(sm.v, static_cast<const T*>(a.v) + b * s.v_sb + hk * s.v_sh, s.v_st, j0, s.S, s.D, dm);
  FragC dk[kMaxOutTiles], dv[kMaxOutTiles];
#pragma unroll
  for (int t = 0; t < kMaxOutTiles; ++t) wmma::fill_fragment(dk[t], 0.0f), wmma::fill_fragment(dv[t], 0.0f);
  float* scratch = sm.scratch + warp * 2 * kFrag;
  // Causal: query i sees key j iff i >= j - (S - T); earlier query tiles see none of the block.
  const int64_t first = s.causal && j0 - (s.S - s.T) > 0 ? (j0 - (s.S - s.T)) / kTile * kTile : 0;
  for (int64_t h = hk * group; h < (hk + 1) * group; ++h) {
    const int64_t bh = b * s.H + h;
    const Logits lg{s, b, h};
    for (int64_t i0 = first; i0 < s.T; i0 += kTile) {
      __syncthreads();  // the previous tile is consumed (the first time: K, V are staged)
      stage(sm.q, static_cast<const T*>(a.q) + b * s.q_sb + h * s.q_sh, s.q_st, i0, s.T, s.D, dm);
      stage(sm.dout, static_cast<const T*>(a.grad_out) + bh * s.T * s.D, s.D, i0, s.T, s.D, dm);
      row_stats<T>(a, bh, i0, sm.lse, sm.delta);
      __syncthreads();
      const int kf = warp / 2, qf = warp % 2;
      score_tiles(scratch, sm.k + kf * 16 * dm.ld, sm.q + qf * 16 * dm.ld, sm.v + kf * 16 * dm.ld,
                  sm.dout + qf * 16 * dm.ld, dm);
      for (int e = lane; e < kFrag; e += kWarp) {
        const int c = kf * 16 + e / 16, r = qf * 16 + e % 16;  // key c, query r
        const Grad g = logit_grad(lg, i0 + r, j0 + c, scratch[e], scratch[kFrag + e], sm.lse[r], sm.delta[r]);
        sm.g1[c * kLdP + r] = cuda::from_float<T>(g.pd);
        sm.g2[c * kLdP + r] = cuda::from_float<T>(g.ds);
      }
      __syncthreads();  // dV, dK tiles read every warp's Pd^T, dS^T
#pragma unroll
      for (int t = 0; t < kMaxOutTiles; ++t) {
        const int tile = warp + t * kWarps, tkf = tile % 2, c = tile / 2 * 16;
        if (tile >= dm.out_tiles()) continue;
        mma_tile<T, FragBRow<T>>(dv[t], sm.g1 + tkf * 16 * kLdP, kLdP, sm.dout + c, dm.ld, kTile);
        mma_tile<T, FragBRow<T>>(dk[t], sm.g2 + tkf * 16 * kLdP, kLdP, sm.q + c, dm.ld, kTile);
      }
    }
  }
  float* gk = static_cast<float*>(a.grad_k) + (b * s.Hkv + hk) * s.S * s.D;
  float* gv = static_cast<float*>(a.grad_v) + (b * s.Hkv + hk) * s.S * s.D;
#pragma unroll
  for (int t = 0; t < kMaxOutTiles; ++t) {
    const int tile = warp + t * kWarps, tkf = tile % 2, c = tile / 2 * 16;
    if (tile >= dm.out_tiles()) continue;
    store_tile(gk, dk[t], scratch, j0 + tkf * 16, s.S, c, s.D, float(s.scale));
    store_tile(gv, dv[t], scratch, j0 + tkf * 16, s.S, c, s.D, 1.0f);
  }
}

// The kernels: blockIdx.y is the head (kv head for dK dV) from bh0, the launch's first
// (launches take at most 65535 rows of blocks).
template <typename T>
__global__ void __launch_bounds__(kThreads) attention_wmma_fwd_kernel(AttentionFwdArgs a, int64_t bh0) {
  if constexpr (kWmmaCompiled<T>) wmma_fwd<T>(a, bh0 + blockIdx.y);
}
template <typename T>
__global__ void __launch_bounds__(kThreads) attention_wmma_bwd_dq_kernel(AttentionBwdArgs a, int64_t bh0) {
  if constexpr (kWmmaCompiled<T>) wmma_bwd_dq<T>(a, bh0 + blockIdx.y);
}
template <typename T>
__global__ void __launch_bounds__(kThreads) attention_wmma_bwd_dkv_kernel(AttentionBwdArgs a, int64_t bkv0) {
  if constexpr (kWmmaCompiled<T>) wmma_bwd_dkv<T>(a, bkv0 + blockIdx.y);
}

template <typename T>
size_t fwd_smem(const Dims& d) {
  Carver c{nullptr};
  const FwdSmem<T> layout(c, d);
  (void)layout;
  return c.used + 128;  // + the alignment of the base
}

template <typename T>
size_t bwd_smem(const Dims& d, bool two_grad_tiles) {
  Carver c{nullptr};
  const BwdSmem<T> layout(c, d, two_grad_tiles);
  (void)layout;
  return c.used + 128;
}

// bf16 / fp16 only: f(T{}).
template <typename F>
cudaError_t dispatch_wmma_types(DType dtype, F&& f) {
  switch (dtype) {
    case DType::kBFloat16: return f(cuda::bf16{});
    case DType::kFloat16: return f(cuda::fp16{});
    default: return cudaErrorInvalidValue;
  }
}

// x: 32-row tiles of n; y: heads from y0 (of `heads`), at most max_grid_y() per launch.
dim3 grid_of(int64_t n, int64_t heads, int64_t y0) {
  return dim3(unsigned((n + kTile - 1) / kTile), cuda::grid_rows(heads, y0));
}

// Whether the current GPU runs the bf16 kernels with their bodies (kWmmaCompiled): the code
// it loads (its arch's cubin, or PTX JIT-compiled for it) was compiled with __CUDA_ARCH__ =
// 10 x the kernel's ptxVersion (CUB's PtxVersion reads it the same way). So TORCH_CUDA_ARCH_LIST
// = 7.5 on a T4, and 7.5+PTX on an A100, both take the SIMT kernels for bf16.
bool bf16_wmma_compiled_here() {
#if defined(FASTPT_SIMT_EMULATOR)
  return true;
#else
  const bool nothing_pending = cudaPeekAtLastError() == cudaSuccess;
  cudaFuncAttributes attr{};
  if (cudaFuncGetAttributes(&attr, attention_wmma_fwd_kernel<cuda::bf16>) == cudaSuccess) return attr.ptxVersion >= 80;
  // No code for this GPU: the SIMT kernels' launch reports that as its own error, so clear
  // this query's (not an earlier error: FASTPT_LAUNCH reports that one as earlier).
  if (nothing_pending) (void)cudaGetLastError();
  return false;
#endif
}

}  // namespace

bool attention_wmma_supported(const AttentionShape& s) {
  if (s.D < 1 || s.D > kAttentionCudaMaxHeadDim) return false;
  return s.dtype == DType::kFloat16 || (s.dtype == DType::kBFloat16 && bf16_wmma_compiled_here());
}

cudaError_t attention_wmma_fwd_cuda(const AttentionFwdArgs& a, cudaStream_t stream) {
  if (a.s.B * a.s.H * a.s.T == 0) return cudaSuccess;
  if (!attention_wmma_supported(a.s)) return cudaErrorInvalidValue;
  return dispatch_wmma_types(a.s.dtype, [&](auto tag) {
    using T = decltype(tag);
    auto kernel = &attention_wmma_fwd_kernel<T>;
    for (int64_t bh0 = 0; bh0 < a.s.B * a.s.H; bh0 += cuda::max_grid_y())
      FASTPT_LAUNCH(kernel, grid_of(a.s.T, a.s.B * a.s.H, bh0), dim3(kThreads), fwd_smem<T>(Dims(a.s.D)), stream, a,
                    bh0);
    return cudaSuccess;
  });
}

cudaError_t attention_wmma_bwd_cuda(const AttentionBwdArgs& a, cudaStream_t stream) {
  if (a.s.B * a.s.H * a.s.T == 0) return cudaSuccess;
  if (!attention_wmma_supported(a.s)) return cudaErrorInvalidValue;
  return dispatch_wmma_types(a.s.dtype, [&](auto tag) {
    using T = decltype(tag);
    const Dims d(a.s.D);
    auto dq_kernel = &attention_wmma_bwd_dq_kernel<T>;
    for (int64_t bh0 = 0; bh0 < a.s.B * a.s.H; bh0 += cuda::max_grid_y())
      FASTPT_LAUNCH(dq_kernel, grid_of(a.s.T, a.s.B * a.s.H, bh0), dim3(kThreads), bwd_smem<T>(d, false), stream, a,
                    bh0);
    if (a.s.S == 0) return cudaSuccess;
    auto dkv_kernel = &attention_wmma_bwd_dkv_kernel<T>;
    for (int64_t bkv0 = 0; bkv0 < a.s.B * a.s.Hkv; bkv0 += cuda::max_grid_y())
      FASTPT_LAUNCH(dkv_kernel, grid_of(a.s.S, a.s.B * a.s.Hkv, bkv0), dim3(kThreads), bwd_smem<T>(d, true), stream,
                    a, bkv0);
    return cudaSuccess;
  });
}

}  // namespace fastpt
