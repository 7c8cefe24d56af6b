// bf16 x bf16 -> fp32 tile products with AVX512_BF16's VDPBF16PS, for CPUs that have it but no
// AMX (AMD Zen 4 and 5, Intel Cooper Lake). Only in the AVX512_BF16 build (-mavx512bf16).
//
// Why not MKL: on such a CPU (measured on this project's Zen 4 VM) MKL's gemm_bf16bf16f32 runs
// at its fp32 rate, so bf16 attention was no faster than fp32 and half the speed of eager
// PyTorch, whose bf16 matmuls go to oneDNN's AVX512_BF16 kernels (not exported by libtorch_cpu).
// VDPBF16PS does 32 multiply-adds per instruction, twice an fp32 FMA.
//
// Row-major C (m x n) = alpha * op(A) op(B) + beta * C, fp32 accumulation. VDPBF16PS multiplies
// pairs of bf16 along k, so B is packed per call into panels of kNR columns where each 32-bit
// word holds (B[2p][j], B[2p+1][j]) ("VNNI" layout, zero past k), and A is read as 32-bit pairs
// (A[i][2p], A[i][2p+1]): in place when op(A) = A, from a packed copy when op(A) = A^T. The
// micro-kernel keeps kMR x kNR fp32 accumulators in 16 zmm registers.
#pragma once

#if defined(__AVX512BF16__)
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

namespace fastpt::cpu {
inline namespace CPU_CAPABILITY {
namespace dpbf16 {

constexpr int64_t kNR = 32;  // columns per B panel: two zmm of fp32 accumulators per row
constexpr int64_t kMR = 8;   // rows per micro-kernel call

inline uint32_t load_u32(const char* p) {
  uint32_t x;
  std::memcpy(&x, p, 4);
  return x;
}

inline __mmask16 lanes(int64_t n) { return n >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << n) - 1); }

// dst[((j / width) * kp + p) * width + j % width] = (src[2p][j], src[2p + 1][j]) for a k x n
// row-major src (row 2p + 1 = 0 past k); width is kNR (B panels, padded columns zeroed) or >= n
// (one block: the packed A^T). Two rows are interleaved 32 columns at a time with vpermt2w.
inline void pack_row_pairs(const uint16_t* src, int64_t ld, int64_t k, int64_t n, uint32_t* dst, int64_t width) {
  alignas(64) static const uint16_t kLo[32] = {0, 32, 1, 33, 2, 34, 3, 35, 4, 36, 5, 37, 6, 38, 7, 39,
                                               8, 40, 9, 41, 10, 42, 11, 43, 12, 44, 13, 45, 14, 46, 15, 47};
  alignas(64) static const uint16_t kHi[32] = {16, 48, 17, 49, 18, 50, 19, 51, 20, 52, 21, 53, 22, 54, 23, 55,
                                               24, 56, 25, 57, 26, 58, 27, 59, 28, 60, 29, 61, 30, 62, 31, 63};
  const __m512i lo_idx = _mm512_load_si512(kLo), hi_idx = _mm512_load_si512(kHi);
  const int64_t kp = (k + 1) / 2;
  const bool padded = width == kNR;
  for (int64_t p = 0; p < kp; ++p) {
    const uint16_t* r0 = src + 2 * p * ld;
    const uint16_t* r1 = 2 * p + 1 < k ? r0 + ld : nullptr;
    for (int64_t j0 = 0; j0 < n; j0 += 32) {
      const int64_t nj = std::min<int64_t>(32, n - j0);
      const __mmask32 m = nj == 32 ? __mmask32(0xFFFFFFFFu) : __mmask32((1u << nj) - 1);
      const __m512i a = _mm512_maskz_loadu_epi16(m, r0 + j0);
      const __m512i b = r1 ? _mm512_maskz_loadu_epi16(m, r1 + j0) : _mm512_setzero_si512();
      uint32_t* d = dst + ((j0 / width) * kp + p) * width + j0 % width;
      const __m512i lo = _mm512_permutex2var_epi16(a, lo_idx, b), hi = _mm512_permutex2var_epi16(a, hi_idx, b);
      if (padded) {  // whole panel row, zeros past n
        _mm512_storeu_si512(d, lo);
        _mm512_storeu_si512(d + 16, hi);
      } else {
        _mm512_mask_storeu_epi32(d, lanes(nj), lo);
        if (nj > 16) _mm512_mask_storeu_epi32(d + 16, lanes(nj - 16), hi);
      }
    }
  }
}

// In-register transpose of a 16 x 16 block of 32-bit words: r[i] holds row i on entry, column i
// on return (32-bit, 64-bit and two 128-bit-lane shuffle stages).
inline void transpose16x16(__m512i r[16]) {
  __m512i t[16];
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 4; ++i) {  // r[4i + c], 128-bit lane L: column 4L + c of rows 4i .. 4i + 3
    r[4 * i] = _mm512_unpacklo_epi64(t[4 * i], t[4 * i + 2]);
    r[4 * i + 1] = _mm512_unpackhi_epi64(t[4 * i], t[4 * i + 2]);
    r[4 * i + 2] = _mm512_unpacklo_epi64(t[4 * i + 1], t[4 * i + 3]);
    r[4 * i + 3] = _mm512_unpackhi_epi64(t[4 * i + 1], t[4 * i + 3]);
  }
  for (int c = 0; c < 4; ++c) {
    t[c] = _mm512_shuffle_i32x4(r[c], r[4 + c], 0x88);  // lanes 0, 2 of each
    t[4 + c] = _mm512_shuffle_i32x4(r[c], r[4 + c], 0xdd);  // lanes 1, 3 of each
    t[8 + c] = _mm512_shuffle_i32x4(r[8 + c], r[12 + c], 0x88);
    t[12 + c] = _mm512_shuffle_i32x4(r[8 + c], r[12 + c], 0xdd);
  }
  for (int c = 0; c < 4; ++c) {
    r[c] = _mm512_shuffle_i32x4(t[c], t[8 + c], 0x88);
    r[8 + c] = _mm512_shuffle_i32x4(t[c], t[8 + c], 0xdd);
    r[4 + c] = _mm512_shuffle_i32x4(t[4 + c], t[12 + c], 0x88);
    r[12 + c] = _mm512_shuffle_i32x4(t[4 + c], t[12 + c], 0xdd);
  }
}

// B panels from op(B) = B^T, B stored n x k row-major: word (p, j) is B[j][2p .. 2p + 1], already
// adjacent, so this is a transpose of 32-bit words, in 16 x 16 blocks (columns past n: zero).
// NOTE: word by word it was a sixth of the forward's time (perf, B=4 H=8 T=S=1024 D=64).
inline void pack_col_pairs(const uint16_t* src, int64_t ld, int64_t k, int64_t n, uint32_t* dst) {
  const int64_t kp = (k + 1) / 2, full = k / 2;
  __m512i r[16];
  for (int64_t j0 = 0; j0 < n; j0 += kNR) {
    uint32_t* panel = dst + (j0 / kNR) * kp * kNR;
    const int64_t nj = std::min<int64_t>(kNR, n - j0);
    if (nj < kNR || full < kp) std::fill(panel, panel + kp * kNR, 0u);
    for (int64_t jj0 = 0; jj0 < nj; jj0 += 16) {
      const int64_t rows = std::min<int64_t>(16, nj - jj0);
      for (int64_t p0 = 0; p0 < full; p0 += 16) {
        const __mmask16 m = lanes(full - p0);
        for (int64_t i = 0; i < 16; ++i)
          r[i] = i < rows ? _mm512_maskz_loadu_epi32(m, src + (j0 + jj0 + i) * ld + 2 * p0) : _mm512_setzero_si512();
        transpose16x16(r);
        for (int64_t p = 0; p < std::min<int64_t>(16, full - p0); ++p)
          _mm512_storeu_si512(panel + (p0 + p) * kNR + jj0, r[p]);
      }
    }
    if (full < kp)  // odd k: the last word holds one element
      for (int64_t jj = 0; jj < nj; ++jj) panel[full * kNR + jj] = src[(j0 + jj) * ld + k - 1];
  }
}

// A as 32-bit pairs: row i, pair p at a + i * row + p * pair (bytes). `half_tail`: k is odd and A
// is read in place, so the last pair is the single element (high half zero).
struct PairsA {
  const char* a;
  int64_t row, pair, full_pairs;
  bool half_tail;
};

// C rows [0, MR) x columns [0, nc) of one panel: alpha * A B + beta * C.
template <int MR>
inline void micro_kernel(const PairsA& A, const uint32_t* panel, float* c, int64_t ldc, int64_t nc, float alpha,
                         float beta) {
  __m512 acc[MR][2];
  for (int r = 0; r < MR; ++r) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
  const int64_t kp = A.full_pairs;
  for (int64_t p = 0; p < kp; ++p) {
    const __m512bh b0 = (__m512bh)_mm512_loadu_si512(panel + p * kNR);
    const __m512bh b1 = (__m512bh)_mm512_loadu_si512(panel + p * kNR + 16);
    for (int r = 0; r < MR; ++r) {
      const __m512bh av = (__m512bh)_mm512_set1_epi32(int(load_u32(A.a + r * A.row + p * A.pair)));
      acc[r][0] = _mm512_dpbf16_ps(acc[r][0], av, b0);
      acc[r][1] = _mm512_dpbf16_ps(acc[r][1], av, b1);
    }
  }
  if (A.half_tail) {
    const __m512bh b0 = (__m512bh)_mm512_loadu_si512(panel + kp * kNR);
    const __m512bh b1 = (__m512bh)_mm512_loadu_si512(panel + kp * kNR + 16);
    for (int r = 0; r < MR; ++r) {
      uint16_t x;
      std::memcpy(&x, A.a + r * A.row + kp * A.pair, 2);
      const __m512bh av = (__m512bh)_mm512_set1_epi32(int(x));
      acc[r][0] = _mm512_dpbf16_ps(acc[r][0], av, b0);
      acc[r][1] = _mm512_dpbf16_ps(acc[r][1], av, b1);
    }
  }
  const __mmask16 m0 = lanes(nc), m1 = nc > 16 ? lanes(nc - 16) : __mmask16(0);
  const __m512 av = _mm512_set1_ps(alpha), bv = _mm512_set1_ps(beta);
  for (int r = 0; r < MR; ++r) {
    float* cr = c + r * ldc;
    __m512 x0 = _mm512_mul_ps(acc[r][0], av), x1 = _mm512_mul_ps(acc[r][1], av);
    if (beta != 0.f) {  // beta == 0 must not read C (it may be uninitialised)
      x0 = _mm512_fmadd_ps(bv, _mm512_maskz_loadu_ps(m0, cr), x0);
      x1 = _mm512_fmadd_ps(bv, _mm512_maskz_loadu_ps(m1, cr + 16), x1);
    }
    _mm512_mask_storeu_ps(cr, m0, x0);
    _mm512_mask_storeu_ps(cr + 16, m1, x1);
  }
}

struct Workspace {
  std::vector<uint32_t> a, b;
};
inline Workspace& workspace() {
  thread_local Workspace w;
  return w;
}

// Row-major C (m x n) = alpha * op(A) op(B) + beta * C (op(X) = X^T when its flag is set), A and B
// bf16 bit patterns, m, n, k >= 1.
inline void gemm(bool ta, bool tb, int64_t m, int64_t n, int64_t k, float alpha, const uint16_t* a, int64_t lda,
                 const uint16_t* b, int64_t ldb, float beta, float* c, int64_t ldc) {
  Workspace& w = workspace();
  const int64_t kp = (k + 1) / 2, panels = (n + kNR - 1) / kNR;
  w.b.resize(panels * kp * kNR);
  if (tb) pack_col_pairs(b, ldb, k, n, w.b.data());
  else pack_row_pairs(b, ldb, k, n, w.b.data(), kNR);
  PairsA A;
  if (ta) {  // op(A) = A^T, A stored k x m: pairs of its rows, one block of width m
    w.a.resize(kp * m);
    pack_row_pairs(a, lda, k, m, w.a.data(), m);
    A = {reinterpret_cast<const char*>(w.a.data()), 4, 4 * m, kp, false};
  } else {
    A = {reinterpret_cast<const char*>(a), 2 * lda, 4, k / 2, k % 2 == 1};
  }
  for (int64_t pn = 0; pn < panels; ++pn) {
    const uint32_t* panel = w.b.data() + pn * kp * kNR;
    const int64_t j0 = pn * kNR, nc = std::min(kNR, n - j0);
    for (int64_t i0 = 0; i0 < m; i0 += kMR) {
      PairsA Ai = A;
      Ai.a += i0 * A.row;
      float* ci = c + i0 * ldc + j0;
      switch (std::min(kMR, m - i0)) {
        case 8: micro_kernel<8>(Ai, panel, ci, ldc, nc, alpha, beta); break;
        case 7: micro_kernel<7>(Ai, panel, ci, ldc, nc, alpha, beta); break;
        case 6: micro_kernel<6>(Ai, panel, ci, ldc, nc, alpha, beta); break;
        case 5: micro_kernel<5>(Ai, panel, ci, ldc, nc, alpha, beta); break;
        case 4: micro_kernel<4>(Ai, panel, ci, ldc, nc, alpha, beta); break;
        case 3: micro_kernel<3>(Ai, panel, ci, ldc, nc, alpha, beta); break;
        case 2: micro_kernel<2>(Ai, panel, ci, ldc, nc, alpha, beta); break;
        default: micro_kernel<1>(Ai, panel, ci, ldc, nc, alpha, beta); break;
      }
    }
  }
}

}  // namespace dpbf16
}  // namespace CPU_CAPABILITY
}  // namespace fastpt::cpu
#endif  // __AVX512BF16__
