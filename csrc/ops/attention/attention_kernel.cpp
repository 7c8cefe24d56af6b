// Fused attention CPU kernel (compiled once per CPU capability, see common/cpu_dispatch.h).
// Algorithm and argument contract: attention.h.
//
// Forward: parallel over (b, h, query tile of kBlockQ rows). Each task walks the key tiles
// (kBlockK keys; causal: only those its rows can see): logits = scale * Q K^T by one BLAS call
// (attention_blas.h), bias / masks added per row, online softmax (running max m, sum l, the
// accumulator rescaled by exp(m_old - m_new)), then acc += P V by a second BLAS call. Memory per
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

#include "common/cpu_vec.h"
#include "ops/attention/attention.h"
#include "ops/attention/attention_blas.h"

namespace fastpt::cpu {
inline namespace CPU_CAPABILITY {
namespace {

using attention_blas::gemm;

// NOTE: tile sizes from measurement (2 threads, D = 64, T = S = 1024 and 4096).
constexpr int64_t kBlockQ = 128;
constexpr int64_t kBlockK = 256;
constexpr int64_t kBwdBlockQ = 128;
constexpr int64_t kBwdBlockK = 128;

template <typename A>
constexpr A kNegInf = -std::numeric_limits<A>::infinity();

template <typename A>
inline at::vec::Vectorized<A> vexp(const at::vec::Vectorized<A>& x) {
  if constexpr (std::is_same_v<A, double>) return x.exp();
  else return x.exp_u20();  // <= 20 ulp; exp(-inf) = 0 (inputs here are <= 0 or -inf)
}

template <typename A>
inline A row_max(const A* x, int64_t n) {
  using V = at::vec::Vectorized<A>;
  V mv(kNegInf<A>);
  int64_t j = 0;
  for (; j + V::size() <= n; j += V::size()) mv = at::vec::maximum(mv, V::loadu(x + j));
  A m = at::vec::vec_reduce_all<A>([](V& a, V& b) { return at::vec::maximum(a, b); }, mv);
  for (; j < n; ++j) m = std::max(m, x[j]);
  return m;
}

// x = exp(x - m) in place; returns the sum.
template <typename A>
inline A exp_sub_sum(A* x, int64_t n, A m) {
  using V = at::vec::Vectorized<A>;
  const V mv(m);
  V sv(0);
  int64_t j = 0;
  for (; j + V::size() <= n; j += V::size()) {
    const V e = vexp(V::loadu(x + j) - mv);
    e.store(x + j);
    sv = sv + e;
  }
  if (j < n) {
    const int64_t r = n - j;
    const V e = vexp(V::loadu(x + j, r) - mv);
    e.store(x + j, r);
    sv = sv + V::set(V(0), e, r);
  }
  return at::vec::vec_reduce_all<A>([](V& a, V& b) { return a + b; }, sv);
}

template <typename A>
inline void add_row(A* x, const A* y, int64_t n) {
  using V = at::vec::Vectorized<A>;
  int64_t j = 0;
  for (; j + V::size() <= n; j += V::size()) (V::loadu(x + j) + V::loadu(y + j)).store(x + j);
  if (j < n) (V::loadu(x + j, n - j) + V::loadu(y + j, n - j)).store(x + j, n - j);
}

template <typename A>
inline void scale_row(A* x, int64_t n, A f) {
  using V = at::vec::Vectorized<A>;
  const V fv(f);
  int64_t j = 0;
  for (; j + V::size() <= n; j += V::size()) (V::loadu(x + j) * fv).store(x + j);
  if (j < n) (V::loadu(x + j, n - j) * fv).store(x + j, n - j);
}

// y (storage type) = f * x (compute type).
template <typename T, typename A>
inline void store_row(const A* x, T* y, int64_t n, A f) {
  using V = at::vec::Vectorized<A>;
  constexpr int64_t K = kChunk<T>;
  const V fv(f);
  int64_t j = 0;
  for (; j + K <= n; j += K) store2(y + j, V::loadu(x + j) * fv, V::loadu(x + j + V::size()) * fv);
  if (j < n) {
    const int64_t r = n - j, ra = std::min<int64_t>(r, V::size());
    const V a = V::loadu(x + j, ra) * fv;
    const V b = r > ra ? V::loadu(x + j + ra, r - ra) * fv : V(0);
    store2(y + j, a, b, r);
  }
}

// Dot product of two storage-type rows in the compute type.
template <typename T>
inline acc_t<T> dot_row(const T* x, const T* y, int64_t n) {
  using V = aVec<T>;
  constexpr int64_t K = kChunk<T>;
  V s0(0), s1(0), a0, a1, b0, b1;
  int64_t j = 0;
  for (; j + K <= n; j += K) {
    load2(x + j, a0, a1);
    load2(y + j, b0, b1);
    s0 = at::vec::fmadd(a0, b0, s0);
    s1 = at::vec::fmadd(a1, b1, s1);
  }
  if (j < n) {
    load2(x + j, a0, a1, n - j);
    load2(y + j, b0, b1, n - j);
    s0 = at::vec::fmadd(a0, b0, s0);
    s1 = at::vec::fmadd(a1, b1, s1);
  }
  return at::vec::vec_reduce_all<acc_t<T>>([](V& a, V& b) { return a + b; }, s0 + s1);
}

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

  // Adds bias, key padding (kmask: 0 / -inf per key of the tile, or nullptr) and the causal
  // limit to the logits of query i over keys j0 .. j0 + n.
  void mask_row(acc_t<T>* row, int64_t i, int64_t j0, int64_t n, const acc_t<T>* kmask) const {
    using A = acc_t<T>;
    if (bias) {
      const A* br = bias + i * s.bias_st + j0 * s.bias_ss;
      if (s.bias_ss == 1) add_row(row, br, n);
      else for (int64_t j = 0; j < n; ++j) row[j] += br[j * s.bias_ss];
    }
    if (kmask) add_row(row, kmask, n);
    if (s.causal) {
      const int64_t visible = i + s.S - s.T - j0 + 1;  // keys j0 .. j0 + visible - 1
      for (int64_t j = std::max<int64_t>(visible, 0); j < n; ++j) row[j] = kNegInf<A>;
    }
  }

  void apply_dropout(acc_t<T>* row, int64_t i, int64_t j0, int64_t n, acc_t<T> keep_value) const {
    const uint64_t key = dropout_row_key(s.seed, uint64_t((b * s.H + h) * s.T + i));
    const uint32_t thr = dropout_threshold(s.dropout_p);
    for (int64_t j = 0; j < n; ++j) row[j] = dropout_keep(key, uint32_t(j0 + j), thr) ? row[j] * keep_value : 0;
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

template <typename T>
void forward(const AttentionFwdArgs& args) {
  using A = acc_t<T>;
  constexpr bool kLowp = !std::is_same_v<T, A>;
  const AttentionShape& s = args.s;
  const int64_t D = s.D, nq = (s.T + kBlockQ - 1) / kBlockQ, off = s.S - s.T;
  const A scale = A(s.scale), keep_scale = A(1) / A(1 - s.dropout_p);
  at::parallel_for(0, s.B * s.H * nq, 1, [&](int64_t begin, int64_t end) {
    std::vector<A> logits(kBlockQ * kBlockK), acc(kBlockQ * D), m(kBlockQ), l(kBlockQ), kmask(kBlockK);
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
        const int64_t nk = std::min(kBlockK, kend - j0);
        gemm<T, A>(false, true, mq, nk, D, scale, hd.q + i0 * s.q_st, s.q_st, hd.k + j0 * s.k_st, s.k_st, A(0),
                   logits.data(), kBlockK);
        const bool any_masked = key_mask_tile(s, hd.b, j0, nk, kmask.data());
        for (int64_t r = 0; r < mq; ++r) {
          A* row = logits.data() + r * kBlockK;
          hd.mask_row(row, i0 + r, j0, nk, any_masked ? kmask.data() : nullptr);
          const A m_new = std::max(m[r], row_max(row, nk));
          const A m_use = m_new == kNegInf<A> ? A(0) : m_new;  // a row without keys so far: p = 0
          const A sum = exp_sub_sum(row, nk, m_use);
          const A alpha = std::exp(m[r] - m_use);
          l[r] = l[r] * alpha + sum;
          m[r] = m_new;
          if (alpha != A(1)) scale_row(acc.data() + r * D, D, alpha);
          if (s.dropout_p > 0) hd.apply_dropout(row, i0 + r, j0, nk, A(1));
          if constexpr (kLowp) store_row(row, p_lowp.data() + r * kBlockK, nk, A(1));
        }
        if constexpr (kLowp) {
          gemm<T, A>(false, false, mq, D, nk, A(1), p_lowp.data(), kBlockK, hd.v + j0 * s.v_st, s.v_st, A(1),
                     acc.data(), D);
        } else {
          gemm<T, A>(false, false, mq, D, nk, A(1), logits.data(), kBlockK, hd.v + j0 * s.v_st, s.v_st, A(1),
                     acc.data(), D);
        }
      }
      T* out = static_cast<T*>(args.out) + (bh * s.T + i0) * D;
      A* lse = static_cast<A*>(args.lse) + bh * s.T + i0;
      for (int64_t r = 0; r < mq; ++r) {
        const bool empty = l[r] == A(0);
        store_row(acc.data() + r * D, out + r * D, D, empty ? A(0) : keep_scale / l[r]);
        lse[r] = empty ? kNegInf<A> : m[r] + std::log(l[r]);
      }
    }
  });
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
          const int64_t nk = std::min(BK, s.S - j0);
          const bool any_masked = key_mask_tile(s, b, j0, nk, kmask.data());
          // Causal: query tiles from the first whose last row sees key j0.
          const int64_t i_first = s.causal ? std::max<int64_t>(j0 - off, 0) / BQ * BQ : 0;
          for (int64_t i0 = i_first; i0 < s.T; i0 += BQ) {
            const int64_t mq = std::min(BQ, s.T - i0);
            gemm<T, A>(false, true, mq, nk, D, scale, hd.q + i0 * s.q_st, s.q_st, hd.k + j0 * s.k_st, s.k_st,
                       A(0), p.data(), BK);
            A* pdrop = dropout ? pd.data() : p.data();
            for (int64_t r = 0; r < mq; ++r) {
              A* row = p.data() + r * BK;
              const A lse_r = lse[i0 + r];
              if (lse_r == kNegInf<A>) {  // a row without keys: no gradient
                std::fill(row, row + nk, A(0));
              } else {
                hd.mask_row(row, i0 + r, j0, nk, any_masked ? kmask.data() : nullptr);
                exp_sub_sum(row, nk, lse_r);
              }
              if (dropout) {
                std::copy(row, row + nk, pd.data() + r * BK);
                hd.apply_dropout(pd.data() + r * BK, i0 + r, j0, nk, keep_scale);
              }
              if constexpr (kLowp) store_row(pdrop + r * BK, lowp.data() + r * BK, nk, A(1));
            }
            const T* dO = dout + i0 * D;
            const T* q_i = hd.q + i0 * s.q_st;
            const T* k_j = hd.k + j0 * s.k_st;
            if constexpr (kLowp) gemm<T, A>(true, false, nk, D, mq, A(1), lowp.data(), BK, dO, D, A(1), dv.data() + j0 * D, D);
            else gemm<T, A>(true, false, nk, D, mq, A(1), pdrop, BK, dO, D, A(1), dv.data() + j0 * D, D);
            gemm<T, A>(false, true, mq, nk, D, A(1), dO, D, hd.v + j0 * s.v_st, s.v_st, A(0), dp.data(), BK);
            for (int64_t r = 0; r < mq; ++r) {  // dS = Pd * dP - P * Delta, into dp
              A* dsr = dp.data() + r * BK;
              const A* pr = p.data() + r * BK;
              const A* pdr = pdrop + r * BK;
              const A dl = delta[i0 + r];
              for (int64_t j = 0; j < nk; ++j) dsr[j] = pdr[j] * dsr[j] - pr[j] * dl;
              if (args.grad_bias) {
                A* gb = static_cast<A*>(args.grad_bias) + (bh * s.T + i0 + r) * s.S + j0;
                std::copy(dsr, dsr + nk, gb);
              }
              if constexpr (kLowp) store_row(dsr, lowp.data() + r * BK, nk, A(1));
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

}  // namespace

void attention_fwd(const AttentionFwdArgs& args) {
  dispatch_float_types(args.s.dtype, [&](auto tag) { forward<decltype(tag)>(args); });
}

void attention_bwd(const AttentionBwdArgs& args) {
  dispatch_float_types(args.s.dtype, [&](auto tag) { backward<decltype(tag)>(args); });
}

}  // namespace CPU_CAPABILITY
}  // namespace fastpt::cpu
