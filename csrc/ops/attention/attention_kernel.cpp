// Fused attention CPU kernel (compiled once per CPU capability, see common/cpu_dispatch.h).
// Algorithm and argument contract: attention.h; the per-row vector helpers: attention_kernel_rows.h.
//
// Forward: parallel over (b, h, query tile of kBlockQ rows). Each task walks the key tiles
// (kBlockK keys; causal: only those its rows can see): logits = Q K^T by one tile product
// (BLAS, common/cpu_gemm.h; bf16/fp16 with AMX: ATen's brgemm on K, V packed once per call, see
// PackedProducts), bias / masks added per row, online softmax (running max m, sum l, the
// accumulator rescaled by exp(m_old - m_new)), then acc += P V by a second product. Memory per
// thread: one kBlockQ x kBlockK logits tile, a kBlockQ x D accumulator (+ a storage-type copy of
// P for bf16/fp16, whose products run in bf16/fp16 with fp32 accumulation as in FlashAttention).
// FLOPs: 4 B H T S D (half that causal); traffic: q, k, v read once per query tile.
//
// Backward: parallel over (b, kv head). A task owns dK, dV of its kv head (S x D fp32
// accumulators) and walks the H / Hkv query heads that share it, so GQA needs no atomics and no
// reduction across threads; dQ of one query head accumulates in a T x D buffer. Per (key tile,
// query tile): P recomputed from lse, five products (Q K^T, dV += Pd^T dO, dP = dO V^T,
// dK += dS^T Q, dQ += dS K). Memory per thread O((S + T) D + tile).
#include <ATen/Parallel.h>

#include <cmath>
#include <limits>
#include <vector>

#include <ATen/native/CPUBlas.h>

#include "common/cpu_vec.h"
#include "ops/attention/attention.h"
#include "common/cpu_gemm.h"
#include "ops/attention/attention_kernel_rows.h"

namespace fastpt::cpu {
inline namespace CPU_CAPABILITY {
namespace {

using cpu_gemm::gemm;

// NOTE: forward tiles of 128 queries x 512 keys vs 128 x 256 (2 threads, D = 64, CPU time,
// alternating with SDPA): bf16 B=1 T=S=4096 93 vs 103 ms (SDPA 106-109), fp32 about even.
// 512 keys are a multiple of the 64-column chunks of the packed path.
constexpr int64_t kBlockQ = 128;
constexpr int64_t kBlockK = 512;
constexpr int64_t kBwdBlockQ = 128;
constexpr int64_t kBwdBlockK = 128;
// Causal: query rows of a tile that crosses the diagonal (its rows see different numbers of the
// tile's keys) run in sub-tiles of this many, each over the keys its last row sees, so the
// products skip most of the masked triangle instead of computing it and masking it.
constexpr int64_t kDiagBlockQ = 32;

// Per-task view of the inputs: where rows live and how logits are masked.
template <typename T>
struct Head {
  const AttentionShape& s;
  int64_t b, h;
  const T *q, *k, *v;  // rows 0 of this (b, h) / its kv head
  const acc_t<T>* bias;  // row 0 of this (b, h), or nullptr

  Head(const AttentionShape& s_, const void* q_, const void* k_, const void* v_, int64_t b_, int64_t h_)
      : s(s_), b(b_), h(h_) {
    const int64_t hk = h / (s.H / s.Hkv);
    q = static_cast<const T*>(q_) + b * s.q_sb + h * s.q_sh;
    k = static_cast<const T*>(k_) + b * s.k_sb + hk * s.k_sh;
    v = static_cast<const T*>(v_) + b * s.v_sb + hk * s.v_sh;
    bias = s.bias ? static_cast<const acc_t<T>*>(s.bias) + b * s.bias_sb + h * s.bias_sh : nullptr;
  }

  // Keys j0 .. j0 + visible - 1 of a tile of nk that query i may see (causal limit).
  int64_t visible(int64_t i, int64_t j0, int64_t nk) const {
    return s.causal ? std::clamp<int64_t>(i + s.S - s.T - j0 + 1, 0, nk) : nk;
  }

  // Adds bias and key padding (kmask: 0 / -inf per key of the tile, or nullptr) to the logits
  // of query i over keys j0 .. j0 + n.
  void add_bias_mask(acc_t<T>* row, int64_t i, int64_t j0, int64_t n, const acc_t<T>* kmask) const {
    if (bias) {
      const acc_t<T>* br = bias + i * s.bias_st + j0 * s.bias_ss;
      if (s.bias_ss == 1) add_row(row, br, n);
      else for (int64_t j = 0; j < n; ++j) row[j] += br[j * s.bias_ss];
    }
    if (kmask) add_row(row, kmask, n);
  }

  // Logits of query i over keys j0 .. j0 + n with bias, key padding and causal limit applied
  // (masked: -inf), for the backward.
  void mask_row(acc_t<T>* row, int64_t i, int64_t j0, int64_t n, const acc_t<T>* kmask) const {
    add_bias_mask(row, i, j0, n, kmask);
    std::fill(row + visible(i, j0, n), row + n, kNegInf<acc_t<T>>);
  }

  template <typename U>
  void apply_dropout(U* row, int64_t i, int64_t j0, int64_t n, acc_t<T> keep_value) const {
    const uint64_t key = dropout_row_key(s.seed, uint64_t((b * s.H + h) * s.T + i));
    const uint32_t thr = dropout_threshold(s.dropout_p);
    for (int64_t j = 0; j < n; ++j)
      row[j] = dropout_keep(key, uint32_t(j0 + j), thr) ? U(acc_t<T>(row[j]) * keep_value) : U(0);
  }
};

// 0 / -inf per key of the tile from the key padding mask; false when no key there is masked.
template <typename A>
inline bool key_mask_tile(const AttentionShape& s, int64_t b, int64_t j0, int64_t n, A* out) {
  if (!s.key_mask) return false;
  const uint8_t* m = s.key_mask + b * s.S + j0;
  bool any = false;
  for (int64_t j = 0; j < n; ++j) {
    out[j] = m[j] ? A(0) : kNegInf<A>;
    any |= !m[j];
  }
  return any;
}

// The forward's two tile products through BLAS (common/cpu_gemm.h), reading q, k, v in place.
template <typename T>
struct BlasProducts {
  const AttentionShape& s;
  int64_t acc_ld;  // = D
  static constexpr bool kPadEven = false;
  // logits (mq x nk, ld ldl) = scale * Q K^T; returns whether the scale is already applied.
  bool logits(const Head<T>& hd, int64_t i0, int64_t mq, int64_t jb, int64_t j0, int64_t nk, acc_t<T>* out,
              int64_t ldl) const {
    gemm<T, acc_t<T>>(false, true, mq, nk, s.D, acc_t<T>(s.scale), hd.q + i0 * s.q_st, s.q_st,
                      hd.k + j0 * s.k_st, s.k_st, acc_t<T>(0), out, ldl);
    return true;
  }
  // acc (mq x D) += P (mq x nk, ld ldp) V.
  void accumulate(const Head<T>& hd, int64_t mq, int64_t jb, int64_t j0, int64_t nk, const T* p, int64_t ldp,
                  acc_t<T>* acc) const {
    gemm<T, acc_t<T>>(false, false, mq, s.D, nk, acc_t<T>(1), p, ldp, hd.v + j0 * s.v_st, s.v_st, acc_t<T>(1), acc,
                      acc_ld);
  }
  void release() const {}
};

// bf16 / fp16 with AMX: ATen's brgemm (oneDNN's micro-kernel, what PyTorch's own flash kernel
// uses) on K^T and V tiles packed once per call into the layout it needs: VNNI (pairs of rows
// interleaved, so an even number of rows; zero-padded), in chunks of kPackN = 64 columns (the
// widths oneDNN accepts for packed B). Extra memory: one padded copy of k and v.
// NOTE: B=4 H=8 T=S=1024 D=64 bf16 forward, 2 threads: MKL gemm_bf16bf16f32 per tile 29.9 ms
// (0.68x SDPA) -> this, see README.
template <typename T>
struct PackedProducts {
  static constexpr int64_t kPackN = 64;
  static constexpr bool kPadEven = true;
  const AttentionShape& s;
  int64_t BK, nblk, Dp, acc_ld;  // tile keys (a multiple of kPackN), tiles per kv head, D padded
  std::vector<T> kt, v;          // per (b, kv head, tile): BK * D and BK * Dp elements

  static bool available(const AttentionShape& s, int64_t BK) {
    return s.D % 2 == 0 && BK % kPackN == 0 && at::native::cpublas::could_pack(c10::CppTypeToScalarType<T>::value);
  }

  PackedProducts(const AttentionShape& s_, const void* k, const void* vv, int64_t BK_)
      : s(s_), BK(BK_), nblk((s_.S + BK_ - 1) / BK_), Dp((s_.D + kPackN - 1) / kPackN * kPackN), acc_ld(Dp),
        kt(s_.B * s_.Hkv * nblk * BK_ * s_.D), v(s_.B * s_.Hkv * nblk * BK_ * Dp) {
    const auto dt = c10::CppTypeToScalarType<T>::value;
    const int64_t D = s.D;
    at::parallel_for(0, s.B * s.Hkv * nblk, 1, [&](int64_t begin, int64_t end) {
      std::vector<T> dense(BK * std::max(D, Dp));  // one tile, zero-padded, before packing
      for (int64_t t = begin; t < end; ++t) {
        const int64_t jb = t % nblk, hk = (t / nblk) % s.Hkv, b = t / (nblk * s.Hkv), j0 = jb * BK;
        const int64_t nk = std::min(BK, s.S - j0), nkp = (nk + 1) / 2 * 2;
        const T* kr = static_cast<const T*>(k) + b * s.k_sb + hk * s.k_sh + j0 * s.k_st;
        // K^T (D x BK, zero past nk), 16 x 16 blocks so reads and writes both stay in L1.
        // NOTE: the row-by-row transpose was a quarter of the kernel's own time (perf, bf16
        // B=4 T=S=1024); with blocks the forward went from 0.77-0.87x SDPA to 1.0-1.2x.
        if (nk < BK) std::fill(dense.begin(), dense.end(), T(0));
        for (int64_t jb = 0; jb < nk; jb += 16)
          for (int64_t db = 0; db < D; db += 16)
            for (int64_t j = jb; j < std::min(jb + 16, nk); ++j)
              for (int64_t d = db; d < std::min(db + 16, D); ++d) dense[d * BK + j] = kr[j * s.k_st + d];
        for (int64_t c = 0; c * kPackN < nk; ++c)
          at::native::cpublas::pack(D, kPackN, BK, kPackN, dt, dt, dense.data() + c * kPackN,
                                    kt.data() + t * BK * D + c * D * kPackN);
        const T* vr = static_cast<const T*>(vv) + b * s.v_sb + hk * s.v_sh + j0 * s.v_st;
        if (nk < BK || D < Dp) std::fill(dense.begin(), dense.end(), T(0));
        for (int64_t j = 0; j < nk; ++j) std::copy(vr + j * s.v_st, vr + j * s.v_st + D, dense.data() + j * Dp);
        for (int64_t c = 0; c * kPackN < D; ++c)
          at::native::cpublas::pack(nkp, kPackN, Dp, kPackN, dt, dt, dense.data() + c * kPackN,
                                    v.data() + t * BK * Dp + c * BK * kPackN);
      }
    });
  }

  int64_t tile(const Head<T>& hd, int64_t jb) const { return (hd.b * s.Hkv + hd.h / (s.H / s.Hkv)) * nblk + jb; }

  // logits (mq x nk, ld ldl >= nk rounded up to kPackN) = Q K^T, unscaled.
  bool logits(const Head<T>& hd, int64_t i0, int64_t mq, int64_t jb, int64_t j0, int64_t nk, float* out,
              int64_t ldl) const {
    const T* kt_tile = kt.data() + tile(hd, jb) * BK * s.D;
    for (int64_t c = 0; c * kPackN < nk; ++c)
      at::native::cpublas::brgemm(mq, kPackN, s.D, s.q_st, kPackN, ldl, false, hd.q + i0 * s.q_st,
                                  kt_tile + c * s.D * kPackN, out + c * kPackN);
    return false;
  }
  // acc (mq x Dp) += P (mq x nk, ld ldp, zero in column nk when nk is odd) V.
  void accumulate(const Head<T>& hd, int64_t mq, int64_t jb, int64_t j0, int64_t nk, const T* p, int64_t ldp,
                  float* acc) const {
    const T* v_tile = v.data() + tile(hd, jb) * BK * Dp;
    for (int64_t c = 0; c * kPackN < s.D; ++c)
      at::native::cpublas::brgemm(mq, kPackN, (nk + 1) / 2 * 2, ldp, kPackN, Dp, true, p, v_tile + c * BK * kPackN,
                                  acc + c * kPackN);
  }
  void release() const { at::native::cpublas::brgemm_release(); }
};

template <typename T, typename Products>
void forward(const AttentionFwdArgs& args, const Products& mm) {
  using A = acc_t<T>;
  constexpr bool kLowp = !std::is_same_v<T, A>;
  const AttentionShape& s = args.s;
  const int64_t D = s.D, nq = (s.T + kBlockQ - 1) / kBlockQ, off = s.S - s.T;
  const A scale = A(s.scale), keep_scale = A(1) / A(1 - s.dropout_p);
  at::parallel_for(0, s.B * s.H * nq, 1, [&](int64_t begin, int64_t end) {
    const int64_t ld = mm.acc_ld;
    std::vector<A> logits(kBlockQ * kBlockK), acc(kBlockQ * ld), m(kBlockQ), l(kBlockQ), kmask(kBlockK);
    std::vector<T> p_lowp(kLowp ? kBlockQ * kBlockK : 0);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t qt = task % nq, bh = task / nq;
      const Head<T> hd(s, args.q, args.k, args.v, bh / s.H, bh % s.H);
      const int64_t i0 = qt * kBlockQ, mq = std::min(kBlockQ, s.T - i0);
      const int64_t kend = s.causal ? std::clamp<int64_t>(i0 + mq + off, 0, s.S) : s.S;
      std::fill(m.begin(), m.end(), kNegInf<A>);
      std::fill(l.begin(), l.end(), A(0));
      std::fill(acc.begin(), acc.end(), A(0));
      for (int64_t j0 = 0; j0 < kend; j0 += kBlockK) {
        const int64_t jb = j0 / kBlockK;
        const int64_t nk = std::min(kBlockK, kend - j0);
        const bool scaled = mm.logits(hd, i0, mq, jb, j0, nk, logits.data(), kBlockK);
        const bool any_masked = key_mask_tile(s, hd.b, j0, nk, kmask.data());
        for (int64_t r = 0; r < mq; ++r) {
          A* row = logits.data() + r * kBlockK;
          T* prow = kLowp ? reinterpret_cast<T*>(p_lowp.data()) + r * kBlockK : reinterpret_cast<T*>(row);
          const int64_t vis = hd.visible(i0 + r, j0, nk);  // keys past vis: p = 0
          // Logits are scale * row; the scale is folded into the exp pass where it can be
          // (it commutes with the max only when positive).
          A row_scale = scaled ? A(1) : scale, mx;
          if (hd.bias || any_masked || row_scale <= 0) {
            if (row_scale != A(1)) scale_row(row, vis, row_scale);
            row_scale = A(1);
            hd.add_bias_mask(row, i0 + r, j0, vis, any_masked ? kmask.data() : nullptr);
            mx = row_max(row, vis);
          } else {
            mx = row_max(row, vis) * row_scale;
          }
          const A m_new = std::max(m[r], mx);
          const A m_use = m_new == kNegInf<A> ? A(0) : m_new;  // a row without keys so far: p = 0
          const A sum = exp_sum_store(row, vis, row_scale, m_use, prow);
          std::fill(prow + vis, prow + (Products::kPadEven ? (nk + 1) / 2 * 2 : nk), T(0));
          const A alpha = std::exp(m[r] - m_use);
          l[r] = l[r] * alpha + sum;
          m[r] = m_new;
          if (alpha != A(1)) scale_row(acc.data() + r * ld, D, alpha);
          if (s.dropout_p > 0) hd.apply_dropout(prow, i0 + r, j0, vis, A(1));
        }
        if constexpr (kLowp) mm.accumulate(hd, mq, jb, j0, nk, p_lowp.data(), kBlockK, acc.data());
        else mm.accumulate(hd, mq, jb, j0, nk, logits.data(), kBlockK, acc.data());
      }
      T* out = static_cast<T*>(args.out) + (bh * s.T + i0) * D;
      A* lse = static_cast<A*>(args.lse) + bh * s.T + i0;
      for (int64_t r = 0; r < mq; ++r) {
        const bool empty = l[r] == A(0);
        store_row(acc.data() + r * ld, out + r * D, D, empty ? A(0) : keep_scale / l[r]);
        lse[r] = empty ? kNegInf<A> : m[r] + std::log(l[r]);
      }
    }
    mm.release();
  });
}

template <typename T>
void forward(const AttentionFwdArgs& args) {
  if constexpr (std::is_same_v<T, c10::BFloat16> || std::is_same_v<T, c10::Half>) {
    if (PackedProducts<T>::available(args.s, kBlockK)) return forward<T>(args, PackedProducts<T>(args.s, args.k, args.v, kBlockK));
  }
  forward<T>(args, BlasProducts<T>{args.s, args.s.D});
}

template <typename T>
void backward(const AttentionBwdArgs& args) {
  using A = acc_t<T>;
  constexpr bool kLowp = !std::is_same_v<T, A>;
  const AttentionShape& s = args.s;
  const int64_t D = s.D, group = s.H / s.Hkv, off = s.S - s.T;
  constexpr int64_t BQ = kBwdBlockQ, BK = kBwdBlockK;
  const A scale = A(s.scale), keep_scale = A(1) / A(1 - s.dropout_p);
  const bool dropout = s.dropout_p > 0;
  at::parallel_for(0, s.B * s.Hkv, 1, [&](int64_t begin, int64_t end) {
    std::vector<A> p(BQ * BK), pd(dropout ? BQ * BK : 0), dp(BQ * BK), kmask(BK), delta(s.T);
    std::vector<A> dq(s.T * D), dk(s.S * D), dv(s.S * D);
    std::vector<T> lowp(kLowp ? BQ * BK : 0);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / s.Hkv, hk = task % s.Hkv;
      std::fill(dk.begin(), dk.end(), A(0));
      std::fill(dv.begin(), dv.end(), A(0));
      for (int64_t h = hk * group; h < (hk + 1) * group; ++h) {
        const Head<T> hd(s, args.q, args.k, args.v, b, h);
        const int64_t bh = b * s.H + h;
        const T* o = static_cast<const T*>(args.out) + bh * s.T * D;
        const T* dout = static_cast<const T*>(args.grad_out) + bh * s.T * D;
        const A* lse = static_cast<const A*>(args.lse) + bh * s.T;
        for (int64_t i = 0; i < s.T; ++i) delta[i] = dot_row(dout + i * D, o + i * D, D);
        std::fill(dq.begin(), dq.end(), A(0));
        for (int64_t j0 = 0; j0 < s.S; j0 += BK) {
          const int64_t nk_tile = std::min(BK, s.S - j0);
          const bool any_masked = key_mask_tile(s, b, j0, nk_tile, kmask.data());
          // Causal: from the first sub-tile whose last row sees key j0.
          const int64_t i_first = s.causal ? std::max<int64_t>(j0 - off, 0) / kDiagBlockQ * kDiagBlockQ : 0;
          for (int64_t i0 = i_first, mq; i0 < s.T; i0 += mq) {
            const bool crosses = s.causal && i0 + off < j0 + nk_tile - 1;  // row i0 misses a key of the tile
            mq = std::min(crosses ? kDiagBlockQ : BQ, s.T - i0);
            const int64_t nk = crosses ? std::clamp<int64_t>(i0 + mq + off - j0, 0, nk_tile) : nk_tile;
            gemm<T, A>(false, true, mq, nk, D, scale, hd.q + i0 * s.q_st, s.q_st, hd.k + j0 * s.k_st, s.k_st,
                       A(0), p.data(), BK);
            A* pdrop = dropout ? pd.data() : p.data();
            for (int64_t r = 0; r < mq; ++r) {
              A* row = p.data() + r * BK;
              T* row_lowp = kLowp && !dropout ? lowp.data() + r * BK : nullptr;  // P rounded in the exp pass
              const A lse_r = lse[i0 + r];
              if (lse_r == kNegInf<A>) {  // a row without keys: no gradient
                std::fill(row, row + nk, A(0));
                if (row_lowp) std::fill(row_lowp, row_lowp + nk, T(0));
              } else {
                hd.mask_row(row, i0 + r, j0, nk, any_masked ? kmask.data() : nullptr);
                exp_sub_store(row, nk, lse_r, row_lowp);
              }
              if (dropout) {
                std::copy(row, row + nk, pd.data() + r * BK);
                hd.apply_dropout(pd.data() + r * BK, i0 + r, j0, nk, keep_scale);
                if constexpr (kLowp) store_row(pd.data() + r * BK, lowp.data() + r * BK, nk, A(1));
              }
            }
            const T* dO = dout + i0 * D;
            const T* q_i = hd.q + i0 * s.q_st;
            const T* k_j = hd.k + j0 * s.k_st;
            if constexpr (kLowp) gemm<T, A>(true, false, nk, D, mq, A(1), lowp.data(), BK, dO, D, A(1), dv.data() + j0 * D, D);
            else gemm<T, A>(true, false, nk, D, mq, A(1), pdrop, BK, dO, D, A(1), dv.data() + j0 * D, D);
            gemm<T, A>(false, true, mq, nk, D, A(1), dO, D, hd.v + j0 * s.v_st, s.v_st, A(0), dp.data(), BK);
            for (int64_t r = 0; r < mq; ++r) {  // dS = Pd * dP - P * Delta: into dp, or rounded into lowp
              A* dsr = dp.data() + r * BK;
              const A* pr = p.data() + r * BK;
              const A dl = delta[i0 + r];
              A* gb = args.grad_bias ? static_cast<A*>(args.grad_bias) + (bh * s.T + i0 + r) * s.S + j0 : nullptr;
              if (dropout) {
                const A* pdr = pd.data() + r * BK;
                for (int64_t j = 0; j < nk; ++j) dsr[j] = pdr[j] * dsr[j] - pr[j] * dl;
                if (kLowp) store_row(dsr, lowp.data() + r * BK, nk, A(1));
              } else {
                grad_logits_row(pr, dsr, nk, dl, kLowp ? lowp.data() + r * BK : nullptr, !kLowp || gb);
              }
              if (gb) std::copy(dsr, dsr + nk, gb);
            }
            if constexpr (kLowp) {
              gemm<T, A>(true, false, nk, D, mq, scale, lowp.data(), BK, q_i, s.q_st, A(1), dk.data() + j0 * D, D);
              gemm<T, A>(false, false, mq, D, nk, scale, lowp.data(), BK, k_j, s.k_st, A(1), dq.data() + i0 * D, D);
            } else {
              gemm<T, A>(true, false, nk, D, mq, scale, dp.data(), BK, q_i, s.q_st, A(1), dk.data() + j0 * D, D);
              gemm<T, A>(false, false, mq, D, nk, scale, dp.data(), BK, k_j, s.k_st, A(1), dq.data() + i0 * D, D);
            }
          }
        }
        T* gq = static_cast<T*>(args.grad_q) + bh * s.T * D;
        for (int64_t i = 0; i < s.T; ++i) store_row(dq.data() + i * D, gq + i * D, D, A(1));
      }
      T* gk = static_cast<T*>(args.grad_k) + task * s.S * D;
      T* gv = static_cast<T*>(args.grad_v) + task * s.S * D;
      for (int64_t j = 0; j < s.S; ++j) {
        store_row(dk.data() + j * D, gk + j * D, D, A(1));
        store_row(dv.data() + j * D, gv + j * D, D, A(1));
      }
    }
  });
}

// One query per (b, h) without dropout: a KV-cache decoding step (causal or not, a single
// query aligned at the end sees every key). The G query heads of a kv head are the rows of
// two products over its whole cache, (G x D)(D x S) and (G x S)(S x D), with the softmax
// between them; no tiles, no online rescaling. Small steps run on the calling thread.
// NOTE: Llama decoding step (8 / 2 heads, D 64, S 640), 2 threads, through the models'
// attend: 26 us fp32 and 20 us bf16 here, against 33 and 46 us for the float32 matmuls with
// a cast of the cache that decoding used before (the tiled path: 43 and 390 us, 1 thread).
constexpr int64_t kDecodeParallelWork = 1 << 20;  // multiply-adds of q k^T

template <typename T>
void decode_forward(const AttentionFwdArgs& args) {
  using A = acc_t<T>;
  constexpr bool kLowp = !std::is_same_v<T, A>;
  const AttentionShape& s = args.s;
  const int64_t G = s.H / s.Hkv, D = s.D, S = s.S;
  const int64_t tasks = s.B * s.Hkv;
  const int64_t grain = s.B * s.H * S * D < kDecodeParallelWork ? tasks : 1;
  at::parallel_for(0, tasks, grain, [&](int64_t begin, int64_t end) {
    std::vector<A> p(G * S), acc(G * D), kmask(S), inv_l(G);
    std::vector<T> p_lowp(kLowp ? G * S : 0);  // P rounded for the bf16 / fp16 product, as in `forward`
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / s.Hkv, hk = task % s.Hkv;
      const T* q = static_cast<const T*>(args.q) + b * s.q_sb + hk * G * s.q_sh;  // G rows, stride q_sh
      const T* k = static_cast<const T*>(args.k) + b * s.k_sb + hk * s.k_sh;
      const T* v = static_cast<const T*>(args.v) + b * s.v_sb + hk * s.v_sh;
      gemm<T, A>(false, true, G, S, D, A(s.scale), q, s.q_sh, k, s.k_st, A(0), p.data(), S);  // logits
      const bool masked = key_mask_tile(s, b, 0, S, kmask.data());
      A* lse = static_cast<A*>(args.lse) + b * s.H + hk * G;
      for (int64_t g = 0; g < G; ++g) {  // softmax of each query's row, P in place
        A* row = &p[g * S];
        if (s.bias) {
          const A* br = static_cast<const A*>(s.bias) + b * s.bias_sb + (hk * G + g) * s.bias_sh;
          if (s.bias_ss == 1) add_row(row, br, S);
          else for (int64_t j = 0; j < S; ++j) row[j] += br[j * s.bias_ss];
        }
        if (masked) add_row(row, kmask.data(), S);
        // As in `forward`: the max skips NaN, so a row whose logits are all NaN has mx = -inf
        // like a row without a visible key; the sum tells them apart (NaN, or 0 for no key).
        const A mx = row_max(row, S);
        const A m_use = mx == kNegInf<A> ? A(0) : mx;
        const A l = exp_sub_sum(row, S, m_use);
        const bool empty = l == A(0);  // no visible key: output 0, lse -inf
        inv_l[g] = empty ? A(0) : A(1) / l;
        lse[g] = empty ? kNegInf<A> : m_use + std::log(l);
        if constexpr (kLowp) std::copy(row, row + S, &p_lowp[g * S]);
      }
      if constexpr (kLowp) gemm<T, A>(false, false, G, D, S, A(1), p_lowp.data(), S, v, s.v_st, A(0), acc.data(), D);
      else gemm<T, A>(false, false, G, D, S, A(1), p.data(), S, v, s.v_st, A(0), acc.data(), D);
      for (int64_t g = 0; g < G; ++g) {
        store_row(&acc[g * D], static_cast<T*>(args.out) + (b * s.H + hk * G + g) * D, D, inv_l[g]);
      }
    }
  });
}

}  // namespace

void attention_fwd(const AttentionFwdArgs& args) {
  if (args.s.T == 1 && args.s.dropout_p == 0 && args.s.q_sh >= args.s.D) {  // q rows: a G x D matrix
    return dispatch_float_types(args.s.dtype, [&](auto tag) { decode_forward<decltype(tag)>(args); });
  }
  dispatch_float_types(args.s.dtype, [&](auto tag) { forward<decltype(tag)>(args); });
}

void attention_bwd(const AttentionBwdArgs& args) {
  dispatch_float_types(args.s.dtype, [&](auto tag) { backward<decltype(tag)>(args); });
}

}  // namespace CPU_CAPABILITY
}  // namespace fastpt::cpu
