// fp32, bf16 and fp16 products for CPU kernels (common/cpu_gemm.h) with AVX-512 micro-kernels, used
// where MKL is slow: on CPUs other than Intel's, MKL runs its AVX2 kernels (measured on this
// project's AMD EPYC VM, one thread: MKL sgemm ~100 GFLOP/s, an AVX-512 FMA loop 258), and
// without AMX its gemm_bf16bf16f32 runs at that fp32 rate, while VDPBF16PS (AVX512_BF16: 32
// multiply-adds per instruction, twice an fp32 FMA) peaks at ~516. oneDNN's bf16 kernels, which
// eager PyTorch's bf16 matmuls use, are not exported by libtorch_cpu.
//
// Row-major C (m x n) = alpha * op(A) op(B) + beta * C, fp32 accumulation. B is packed per call
// into panels of kNR columns (zero past n); the micro-kernel keeps kMR x kNR fp32 accumulators
// in 16 zmm registers and broadcasts one element (fp32) or pair (bf16) of A per row and step.
// bf16: VDPBF16PS multiplies pairs along k, so a panel word holds (B[2p][j], B[2p+1][j])
// ("VNNI" layout, zero past k), and A is read as 32-bit pairs (A[i][2p], A[i][2p+1]): in place
// when op(A) = A, from a packed copy when op(A) = A^T.
#pragma once

#if defined(CPU_CAPABILITY_AVX512)
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

namespace fastpt::cpu {
inline namespace CPU_CAPABILITY {
namespace avx512_gemm {

constexpr int64_t kNR = 32;  // columns per B panel: two zmm of fp32 accumulators per row
constexpr int64_t kMR = 8;   // rows per micro-kernel call

inline __mmask16 lanes(int64_t n) { return n >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << n) - 1); }

// dst[((j / width) * kp + p) * width + j % width] = (src[2p][j], src[2p + 1][j]) for a k x n
// row-major src (row 2p + 1 = 0 past k). B panels: width kNR, columns past n zeroed; the packed
// A^T: one block, width n. Two rows are interleaved 32 columns at a time with vpermt2w.
inline void pack_row_pairs(const uint16_t* src, int64_t ld, int64_t k, int64_t n, uint32_t* dst, bool panels) {
  const int64_t width = panels ? kNR : n;
  alignas(64) static const uint16_t kLo[32] = {0, 32, 1, 33, 2, 34, 3, 35, 4, 36, 5, 37, 6, 38, 7, 39,
                                               8, 40, 9, 41, 10, 42, 11, 43, 12, 44, 13, 45, 14, 46, 15, 47};
  alignas(64) static const uint16_t kHi[32] = {16, 48, 17, 49, 18, 50, 19, 51, 20, 52, 21, 53, 22, 54, 23, 55,
                                               24, 56, 25, 57, 26, 58, 27, 59, 28, 60, 29, 61, 30, 62, 31, 63};
  const __m512i lo_idx = _mm512_load_si512(kLo), hi_idx = _mm512_load_si512(kHi);
  const int64_t kp = (k + 1) / 2;
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
      if (panels) {  // whole panel row, zeros past n
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

// B panels from op(B) = B^T, B stored n x k row-major: a transpose of 32-bit words (fp32
// elements, or bf16 pairs B[j][2p .. 2p + 1], already adjacent), in 16 x 16 blocks. Panel word
// (p, jj) = word p of row j0 + jj; `words` per row, plus for bf16 with odd k one more word
// holding the last element alone (`odd_tail`). Columns past n: zero.
// NOTE: word by word it was a sixth of the bf16 forward's time (perf, B=4 H=8 T=S=1024 D=64).
inline void pack_col_words(const char* src, int64_t row_bytes, int64_t words, bool odd_tail, int64_t n,
                           uint32_t* dst) {
  const int64_t kw = words + (odd_tail ? 1 : 0);
  __m512i r[16];
  for (int64_t j0 = 0; j0 < n; j0 += kNR) {
    uint32_t* panel = dst + (j0 / kNR) * kw * kNR;
    const int64_t nj = std::min<int64_t>(kNR, n - j0);
    if (nj < kNR || odd_tail) std::fill(panel, panel + kw * kNR, 0u);
    for (int64_t jj0 = 0; jj0 < nj; jj0 += 16) {
      const int64_t rows = std::min<int64_t>(16, nj - jj0);
      for (int64_t p0 = 0; p0 < words; p0 += 16) {
        const __mmask16 m = lanes(words - p0);
        for (int64_t i = 0; i < 16; ++i)
          r[i] = i < rows ? _mm512_maskz_loadu_epi32(m, src + (j0 + jj0 + i) * row_bytes + 4 * p0)
                          : _mm512_setzero_si512();
        transpose16x16(r);
        for (int64_t p = 0; p < std::min<int64_t>(16, words - p0); ++p)
          _mm512_storeu_si512(panel + (p0 + p) * kNR + jj0, r[p]);
      }
    }
    if (odd_tail)  // bf16, odd k: the last element of each row, high half zero
      for (int64_t jj = 0; jj < nj; ++jj) {
        uint16_t x;
        std::memcpy(&x, src + (j0 + jj) * row_bytes + 4 * words, 2);
        panel[words * kNR + jj] = x;
      }
  }
}

// fp32 B panels from op(B) = B, stored k x n row-major: rows copied 32 columns at a time.
inline void pack_rows_f32(const float* src, int64_t ld, int64_t k, int64_t n, float* dst) {
  for (int64_t p = 0; p < k; ++p)
    for (int64_t j0 = 0; j0 < n; j0 += kNR) {
      const int64_t nj = std::min<int64_t>(kNR, n - j0);
      float* d = dst + ((j0 / kNR) * k + p) * kNR;
      _mm512_storeu_ps(d, _mm512_maskz_loadu_ps(lanes(nj), src + p * ld + j0));
      const __mmask16 hi = nj > 16 ? lanes(nj - 16) : __mmask16(0);
      _mm512_storeu_ps(d + 16, _mm512_maskz_loadu_ps(hi, src + p * ld + j0 + 16));
    }
}

// Where the micro-kernel reads A: row i, step p (an fp32 element or a bf16 pair) at
// a + i * row + p * step (bytes).
struct ReadA {
  const char* a;
  int64_t row, step, steps;
  bool half_tail;  // bf16 read in place with odd k: one more step, a single element (high half 0)
};

template <typename T>
inline T load_a(const ReadA& A, int r, int64_t p) {
  T x;
  std::memcpy(&x, A.a + r * A.row + p * A.step, sizeof(T));
  return x;
}

// C rows [0, MR) x columns [0, nc) of a panel = alpha * acc + beta * C.
template <int MR>
inline void store_tile(__m512 (&acc)[MR][2], float* c, int64_t ldc, int64_t nc, float alpha, float beta) {
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

template <int MR>
inline void kernel_f32(const ReadA& A, const float* panel, float* c, int64_t ldc, int64_t nc, float alpha,
                       float beta) {
  __m512 acc[MR][2];
  for (int r = 0; r < MR; ++r) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
  for (int64_t p = 0; p < A.steps; ++p) {
    const __m512 b0 = _mm512_loadu_ps(panel + p * kNR), b1 = _mm512_loadu_ps(panel + p * kNR + 16);
    for (int r = 0; r < MR; ++r) {
      const __m512 av = _mm512_set1_ps(load_a<float>(A, r, p));
      acc[r][0] = _mm512_fmadd_ps(av, b0, acc[r][0]);
      acc[r][1] = _mm512_fmadd_ps(av, b1, acc[r][1]);
    }
  }
  store_tile<MR>(acc, c, ldc, nc, alpha, beta);
}

#if defined(__AVX512BF16__)
template <int MR>
inline void kernel_bf16(const ReadA& A, const uint32_t* panel, float* c, int64_t ldc, int64_t nc, float alpha,
                        float beta) {
  __m512 acc[MR][2];
  for (int r = 0; r < MR; ++r) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
  auto step = [&](int64_t p, auto load) {
    const __m512bh b0 = (__m512bh)_mm512_loadu_si512(panel + p * kNR);
    const __m512bh b1 = (__m512bh)_mm512_loadu_si512(panel + p * kNR + 16);
    for (int r = 0; r < MR; ++r) {
      const __m512bh av = (__m512bh)_mm512_set1_epi32(int(load(r)));
      acc[r][0] = _mm512_dpbf16_ps(acc[r][0], av, b0);
      acc[r][1] = _mm512_dpbf16_ps(acc[r][1], av, b1);
    }
  };
  for (int64_t p = 0; p < A.steps; ++p) step(p, [&](int r) { return load_a<uint32_t>(A, r, p); });
  if (A.half_tail) step(A.steps, [&](int r) { return uint32_t(load_a<uint16_t>(A, r, A.steps)); });
  store_tile<MR>(acc, c, ldc, nc, alpha, beta);
}
#endif

struct Workspace {
  std::vector<uint32_t> a, b;
  std::vector<float> a_f32, b_f32;  // fp16 inputs converted
};
inline Workspace& workspace() {
  thread_local Workspace w;
  return w;
}

// Calls kernel(MR, A at row i0, panel index, C at (i0, column of the panel), columns) over
// blocks of kMR rows, panel by panel (a panel stays in cache while every row block uses it).
template <typename Kernel>
inline void for_tiles(int64_t m, int64_t n, const ReadA& A, float* c, int64_t ldc, Kernel&& kernel) {
  for (int64_t pn = 0; pn * kNR < n; ++pn) {
    const int64_t nc = std::min(kNR, n - pn * kNR);
    for (int64_t i0 = 0; i0 < m; i0 += kMR) {
      ReadA Ai = A;
      Ai.a += i0 * A.row;
      float* ci = c + i0 * ldc + pn * kNR;
      switch (std::min(kMR, m - i0)) {
        case 8: kernel(std::integral_constant<int, 8>{}, Ai, pn, ci, nc); break;
        case 7: kernel(std::integral_constant<int, 7>{}, Ai, pn, ci, nc); break;
        case 6: kernel(std::integral_constant<int, 6>{}, Ai, pn, ci, nc); break;
        case 5: kernel(std::integral_constant<int, 5>{}, Ai, pn, ci, nc); break;
        case 4: kernel(std::integral_constant<int, 4>{}, Ai, pn, ci, nc); break;
        case 3: kernel(std::integral_constant<int, 3>{}, Ai, pn, ci, nc); break;
        case 2: kernel(std::integral_constant<int, 2>{}, Ai, pn, ci, nc); break;
        default: kernel(std::integral_constant<int, 1>{}, Ai, pn, ci, nc); break;
      }
    }
  }
}

// Row-major C (m x n) = alpha * op(A) op(B) + beta * C (op(X) = X^T when its flag is set),
// m, n, k >= 1; lda, ldb in elements.
inline void gemm_f32(bool ta, bool tb, int64_t m, int64_t n, int64_t k, float alpha, const float* a, int64_t lda,
                     const float* b, int64_t ldb, float beta, float* c, int64_t ldc) {
  Workspace& w = workspace();
  w.b.resize((n + kNR - 1) / kNR * k * kNR);
  if (tb) pack_col_words(reinterpret_cast<const char*>(b), 4 * ldb, k, false, n, w.b.data());
  else pack_rows_f32(b, ldb, k, n, reinterpret_cast<float*>(w.b.data()));
  const float* panels = reinterpret_cast<const float*>(w.b.data());
  // op(A)[i][p] is A[i][p] or, transposed, A[p][i]: either way a strided read, no packing.
  const char* ab = reinterpret_cast<const char*>(a);
  const ReadA A = ta ? ReadA{ab, 4, 4 * lda, k, false} : ReadA{ab, 4 * lda, 4, k, false};
  for_tiles(m, n, A, c, ldc, [&](auto mr, const ReadA& Ai, int64_t pn, float* ci, int64_t nc) {
    kernel_f32<decltype(mr)::value>(Ai, panels + pn * k * kNR, ci, ldc, nc, alpha, beta);
  });
}

// C[i][j] = sum_p A[i][p] B[j][p] for the M (<= kGemvRows) rows of A and the rows j0 .. j1 of B,
// both row-major (B as nn.Linear stores its weight): a matrix-vector product (decoding), bound
// by reading B once, four rows at a time against A's rows held in cache. No packing: packing B
// would read and write it before the product reads it again.
constexpr int64_t kGemvRows = 4;

// 16 elements from p (masked) as fp32: fp32 as they are, bf16 (bit patterns) widened exactly
// (a bf16 is the high half of an fp32).
inline __m512 load16(const float* p, __mmask16 m) { return _mm512_maskz_loadu_ps(m, p); }
inline __m512 load16(const uint16_t* p, __mmask16 m) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p)), 16));
}

template <int M, typename T>
inline void gemv_rows(int64_t j0, int64_t j1, int64_t k, const T* a, int64_t lda, const T* b, int64_t ldb,
                      float* c, int64_t ldc) {
  constexpr int R = 4;  // rows of B per pass
  const int64_t full = k / 16 * 16;
  const __mmask16 tail = lanes(k - full);
  int64_t j = j0;
  for (; j < j1; j += R) {
    const int rows = int(std::min<int64_t>(R, j1 - j));
    __m512 acc[M][R];
    for (int i = 0; i < M; ++i)
      for (int r = 0; r < R; ++r) acc[i][r] = _mm512_setzero_ps();
    auto step = [&](int64_t p, __mmask16 m) {
      __m512 bv[R];
      for (int r = 0; r < R; ++r)
        bv[r] = r < rows ? load16(b + (j + r) * ldb + p, m) : _mm512_setzero_ps();
      for (int i = 0; i < M; ++i) {
        const __m512 av = load16(a + i * lda + p, m);
        for (int r = 0; r < R; ++r) acc[i][r] = _mm512_fmadd_ps(av, bv[r], acc[i][r]);
      }
    };
    for (int64_t p = 0; p < full; p += 16) step(p, __mmask16(0xFFFF));
    if (full < k) step(full, tail);
    for (int i = 0; i < M; ++i)
      for (int r = 0; r < rows; ++r) c[i * ldc + j + r] = _mm512_reduce_add_ps(acc[i][r]);
  }
}

// fp32 or bf16 A and B (fp32 accumulation and output).
template <typename T>
inline void gemv_nt(int64_t m, int64_t j0, int64_t j1, int64_t k, const T* a, int64_t lda, const T* b, int64_t ldb,
                    float* c, int64_t ldc) {
  switch (m) {
    case 1: return gemv_rows<1>(j0, j1, k, a, lda, b, ldb, c, ldc);
    case 2: return gemv_rows<2>(j0, j1, k, a, lda, b, ldb, c, ldc);
    case 3: return gemv_rows<3>(j0, j1, k, a, lda, b, ldb, c, ldc);
    default: return gemv_rows<4>(j0, j1, k, a, lda, b, ldb, c, ldc);
  }
}

// rows x cols fp16 (bit patterns, row stride ld) -> fp32, contiguous.
inline void fp16_to_f32(const uint16_t* src, int64_t ld, int64_t rows, int64_t cols, std::vector<float>& dst) {
  dst.resize(rows * cols);
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t j = 0; j < cols; j += 16) {
      const __mmask16 m = lanes(cols - j);
      const __m512 x = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, src + i * ld + j));
      _mm512_mask_storeu_ps(dst.data() + i * cols + j, m, x);
    }
}

// fp16 A and B: converted to fp32 (exact) for gemm_f32, the conversion O(k (m + n)) against the
// product's O(m n k). Without AVX512_FP16 there is no faster fp16 product.
inline void gemm_f16(bool ta, bool tb, int64_t m, int64_t n, int64_t k, float alpha, const uint16_t* a,
                     int64_t lda, const uint16_t* b, int64_t ldb, float beta, float* c, int64_t ldc) {
  Workspace& w = workspace();
  fp16_to_f32(a, lda, ta ? k : m, ta ? m : k, w.a_f32);
  fp16_to_f32(b, ldb, tb ? n : k, tb ? k : n, w.b_f32);
  gemm_f32(ta, tb, m, n, k, alpha, w.a_f32.data(), ta ? m : k, w.b_f32.data(), tb ? k : n, beta, c, ldc);
}

#if defined(__AVX512BF16__)
// The same for bf16 A and B (bit patterns).
inline void gemm_bf16(bool ta, bool tb, int64_t m, int64_t n, int64_t k, float alpha, const uint16_t* a,
                      int64_t lda, const uint16_t* b, int64_t ldb, float beta, float* c, int64_t ldc) {
  Workspace& w = workspace();
  const int64_t kp = (k + 1) / 2;
  w.b.resize((n + kNR - 1) / kNR * kp * kNR);
  if (tb) pack_col_words(reinterpret_cast<const char*>(b), 2 * ldb, k / 2, k % 2 == 1, n, w.b.data());
  else pack_row_pairs(b, ldb, k, n, w.b.data(), true);
  ReadA A;
  if (ta) {  // op(A) = A^T, A stored k x m: pairs of its rows, one block of width m
    w.a.resize(kp * m);
    pack_row_pairs(a, lda, k, m, w.a.data(), false);
    A = {reinterpret_cast<const char*>(w.a.data()), 4, 4 * m, kp, false};
  } else {
    A = {reinterpret_cast<const char*>(a), 2 * lda, 4, k / 2, k % 2 == 1};
  }
  const uint32_t* panels = w.b.data();
  for_tiles(m, n, A, c, ldc, [&](auto mr, const ReadA& Ai, int64_t pn, float* ci, int64_t nc) {
    kernel_bf16<decltype(mr)::value>(Ai, panels + pn * kp * kNR, ci, ldc, nc, alpha, beta);
  });
}
#endif

}  // namespace avx512_gemm
}  // namespace CPU_CAPABILITY
}  // namespace fastpt::cpu
#endif  // CPU_CAPABILITY_AVX512
