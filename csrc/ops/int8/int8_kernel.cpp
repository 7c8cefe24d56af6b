// Int8 CPU kernels (compiled once per CPU capability, see common/cpu_dispatch.h): row-wise
// quantization, outlier-column detection, the int8 GEMM with its dequantization epilogue,
// and the hash-mask dropout of the LoRA op.
//
// GEMM paths (Int8Path, chosen by the glue from the running CPU):
// - AMX (Sapphire Rapids+): _tile_dpbssd, signed x signed int8 -> int32, 16 x 16 x 64 per
//   instruction; a 32 x 32 output block is 2 x 2 accumulator tiles fed by 2 A tiles and 2 B
//   tiles (all 8 tile registers). Compiled with function-level target attributes in the
//   AVX512 builds (every AMX CPU has AVX-512).
// - AVX-512 VNNI: vpdpbusd is unsigned x signed, so A is read as a + 128 (xor 0x80) and
//   128 * sum_k W[n][k] (precomputed at packing) is subtracted at the end.
// - AVX2: sign-extend to int16 and vpmaddwd (exact: |a * b| <= 2^14, two per lane), A and B
//   widened once per slice of k (block_avx2).
// - scalar: the DEFAULT build.
// All paths read the packed weight layout of int8.h and produce the same exact int32 sums.
//
// Work split: 32 x 32 output blocks. A task is (a chunk of ~1 MiB of packed B columns,
// a group of 8 row blocks); in a task the rows' A block (32 x K) is reused across the
// chunk's column blocks and the chunk is reused across the row blocks, both from L2.
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
#include <immintrin.h>
#endif

#include "common/cpu_vec.h"
#include "ops/int8/int8.h"

namespace fastpt::cpu {
inline namespace CPU_CAPABILITY {
namespace {

constexpr int64_t kBlock = 32;  // output block: kBlock x kBlock

// float32 / bfloat16 / float16 only (the glue rejects float64 for the int8 ops).
template <typename Fn>
void dispatch_int8_float_types(DType dtype, Fn&& fn) {
  switch (dtype) {
    case DType::kBFloat16: fn(c10::BFloat16{}); break;
    case DType::kFloat16: fn(c10::Half{}); break;
    default: fn(float{}); break;
  }
}
constexpr int64_t kRowBlocksPerTask = 8;

inline int32_t load_i32(const int8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return v;
}

// ---------------------------------------------------------------- micro-kernels
// Each computes the 32 x 32 int32 block c (row stride kBlock) of rows a[0..32) (stride lda)
// against the two 16-channel panels p0, p1 over k in [0, k_pad).

void block_scalar(const int8_t* a, int64_t lda, const int8_t* p0, const int8_t* p1,
                  int64_t k_pad, int32_t* c) {
  for (int64_t i = 0; i < kBlock; ++i) {
    for (int64_t j = 0; j < kBlock; ++j) {
      const int8_t* p = (j < kPanelN ? p0 : p1) + (j % kPanelN) * 4;
      const int8_t* ai = a + i * lda;
      int32_t acc = 0;
      for (int64_t g = 0; g < k_pad / 4; ++g)
        for (int64_t t = 0; t < 4; ++t) acc += int32_t(ai[4 * g + t]) * int32_t(p[g * 64 + t]);
      c[i * kBlock + j] = acc;
    }
  }
}

#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
// Without VNNI the product is vpmaddwd on int16: each 32-bit lane of a vector holds one
// channel's two partial sums (k0 k1 | k2 k3), so a vector is 4 channels x 4 k, the packed
// layout's order. The block's A rows and B panels are sign-extended to int16 once per slice of
// kAvx2Slice k into L1 buffers, so the inner loop is loads, vpmaddwd and vpaddd only: 4 rows x
// 8 channels per micro-tile, 8 accumulators, 2 B loads and 4 A broadcasts per 8 vpmaddwd.
// (Extending B per row pair inside the loop, as before, ran the block at 0.55x this rate.)
constexpr int64_t kAvx2Slice = 128;  // k per slice: A and B slices 8 KB each (k_pad % 64 == 0)
constexpr int64_t kAvx2Rows = 4;

// pairs[r][0..16) += rows r of a16 (stride lda16) x the 8 channels at b16 over `groups`
// groups of 4 k. pairs holds 8 int32 lanes per vector: (channel, k half) pairs.
inline void avx2_tile(const int16_t* a16, int64_t lda16, const int16_t* b16, int64_t groups,
                      int32_t* pairs) {
  __m256i acc[kAvx2Rows][2];
  for (int r = 0; r < kAvx2Rows; ++r)
    for (int q = 0; q < 2; ++q)
      acc[r][q] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(pairs + r * 2 * kBlock + 8 * q));
  for (int64_t g = 0; g < groups; ++g) {
    const int16_t* bp = b16 + g * 4 * kPanelN;
    const __m256i b0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(bp));
    const __m256i b1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(bp + 16));
    for (int r = 0; r < kAvx2Rows; ++r) {
      int64_t a4;  // 4 k of row r, broadcast to every channel
      std::memcpy(&a4, a16 + r * lda16 + 4 * g, 8);
      const __m256i av = _mm256_set1_epi64x(a4);
      acc[r][0] = _mm256_add_epi32(acc[r][0], _mm256_madd_epi16(av, b0));
      acc[r][1] = _mm256_add_epi32(acc[r][1], _mm256_madd_epi16(av, b1));
    }
  }
  for (int r = 0; r < kAvx2Rows; ++r)
    for (int q = 0; q < 2; ++q)
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(pairs + r * 2 * kBlock + 8 * q), acc[r][q]);
}

// dst[0..n) = src[0..n) widened to int16 (n % 16 == 0).
inline void widen(const int8_t* src, int64_t n, int16_t* dst) {
  for (int64_t i = 0; i < n; i += 16)
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + i),
                        _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i))));
}

void block_avx2(const int8_t* a, int64_t lda, const int8_t* p0, const int8_t* p1, int64_t k_pad,
                int32_t* c) {
  alignas(32) int16_t a16[kBlock * kAvx2Slice];
  alignas(32) int16_t b16[2][kAvx2Slice * kPanelN];
  alignas(32) int32_t pairs[kBlock * 2 * kBlock] = {};  // [row][channel][k half]
  for (int64_t k0 = 0; k0 < k_pad; k0 += kAvx2Slice) {
    const int64_t len = std::min(kAvx2Slice, k_pad - k0);
    for (int64_t i = 0; i < kBlock; ++i) widen(a + i * lda + k0, len, a16 + i * len);
    widen(p0 + k0 * kPanelN, len * kPanelN, b16[0]);
    widen(p1 + k0 * kPanelN, len * kPanelN, b16[1]);
    for (int64_t j = 0; j < kBlock; j += 8)  // 8 channels: half of one panel
      for (int64_t i = 0; i < kBlock; i += kAvx2Rows)
        avx2_tile(a16 + i * len, len, b16[j / kPanelN] + (j % kPanelN) * 4, len / 4,
                  pairs + i * 2 * kBlock + 2 * j);
  }
  for (int64_t i = 0; i < kBlock; ++i)
    for (int64_t j = 0; j < kBlock; ++j)
      c[i * kBlock + j] = pairs[i * 2 * kBlock + 2 * j] + pairs[i * 2 * kBlock + 2 * j + 1];
}
#endif

#if defined(CPU_CAPABILITY_AVX512)
// acc += vpdpbusd(a, b), accumulating in place. Written in asm because GCC 12 compiles
// _mm512_dpbusd_epi32 with a register copy per instruction (and spills accumulators).
// NOTE: the 8 x 2 kernel with its data in L1 (this project's AMD EPYC): 53% of vpdpbusd's
// throughput with the intrinsic, ~100% in place.
__attribute__((target("avx512vnni"))) inline __m512i dpbusd(__m512i acc, __m512i a, __m512i b) {
  asm("vpdpbusd %2, %1, %0" : "+v"(acc) : "v"(a), "v"(b));
  return acc;
}

// Eight rows x two panels: 16 zmm accumulators, 2 B loads and 8 broadcasts per 4 k.
__attribute__((target("avx512vnni"))) void vnni_rows8(const int8_t* a, int64_t lda,
                                                        const int8_t* p0, const int8_t* p1,
                                                        int64_t k_pad, const int32_t* colsum,
                                                        int32_t* c) {
  __m512i acc[8][2];
  for (auto& row : acc) row[0] = row[1] = _mm512_setzero_si512();
  const __m512i flip = _mm512_set1_epi32(int32_t(0x80808080u));
  for (int64_t g = 0; g < k_pad / 4; ++g) {
    const __m512i b0 = _mm512_loadu_si512(p0 + g * 64);
    const __m512i b1 = _mm512_loadu_si512(p1 + g * 64);
    for (int r = 0; r < 8; ++r) {
      const __m512i av = _mm512_xor_si512(_mm512_set1_epi32(load_i32(a + r * lda + 4 * g)), flip);
      acc[r][0] = dpbusd(acc[r][0], av, b0);
      acc[r][1] = dpbusd(acc[r][1], av, b1);
    }
  }
  // sum (a + 128) b = sum a b + 128 sum b
  const __m512i corr0 = _mm512_slli_epi32(_mm512_loadu_si512(colsum), 7);
  const __m512i corr1 = _mm512_slli_epi32(_mm512_loadu_si512(colsum + kPanelN), 7);
  for (int r = 0; r < 8; ++r) {
    _mm512_storeu_si512(c + r * kBlock, _mm512_sub_epi32(acc[r][0], corr0));
    _mm512_storeu_si512(c + r * kBlock + kPanelN, _mm512_sub_epi32(acc[r][1], corr1));
  }
}

void block_vnni(const int8_t* a, int64_t lda, const int8_t* p0, const int8_t* p1, int64_t k_pad,
                const int32_t* colsum, int32_t* c) {
  for (int64_t i = 0; i < kBlock; i += 8) vnni_rows8(a + i * lda, lda, p0, p1, k_pad, colsum, c + i * kBlock);
}

// AMX tile configuration (palette 1): tiles 0-3 the 2 x 2 int32 accumulators, 4-5 A
// (16 rows x 64 int8), 6-7 B (16 groups of 4 k x 16 channels).
struct alignas(64) TileConfig {
  uint8_t palette_id;
  uint8_t start_row;
  uint8_t reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
};
// Static data: GCC 12 does not treat ldtilecfg as reading its operand and drops the stores
// that would fill a stack copy (tilezero then faults with SIGILL).
alignas(64) constexpr TileConfig kTileConfig = {
    1, 0, {}, {64, 64, 64, 64, 64, 64, 64, 64}, {16, 16, 16, 16, 16, 16, 16, 16}};

__attribute__((target("amx-tile"))) void amx_configure() { _tile_loadconfig(&kTileConfig); }

__attribute__((target("amx-tile"))) void amx_release() { _tile_release(); }

__attribute__((target("amx-tile,amx-int8"))) void block_amx(const int8_t* a, int64_t lda,
                                                              const int8_t* p0, const int8_t* p1,
                                                              int64_t k_pad, int32_t* c) {
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
  for (int64_t k = 0; k < k_pad; k += 64) {
    _tile_loadd(4, a + k, lda);
    _tile_loadd(5, a + 16 * lda + k, lda);
    _tile_loadd(6, p0 + k * 16, 64);  // 64 k = 16 groups of 64 bytes
    _tile_loadd(7, p1 + k * 16, 64);
    _tile_dpbssd(0, 4, 6);
    _tile_dpbssd(1, 4, 7);
    _tile_dpbssd(2, 5, 6);
    _tile_dpbssd(3, 5, 7);
  }
  constexpr int64_t ldc = kBlock * 4;  // bytes
  _tile_stored(0, c, ldc);
  _tile_stored(1, c + kPanelN, ldc);
  _tile_stored(2, c + 16 * kBlock, ldc);
  _tile_stored(3, c + 16 * kBlock + kPanelN, ldc);
}
#endif

// ---------------------------------------------------------------- epilogue
// Writes the valid part (rows < m, columns < n) of block c at (m0, n0).
template <typename T>
void epilogue(const Int8GemmArgs& g, int64_t m0, int64_t n0, const int32_t* c) {
  const int64_t mlen = std::min(kBlock, g.m - m0), nlen = std::min(kBlock, g.n - n0);
  if (g.out_int32) {
    for (int64_t i = 0; i < mlen; ++i)
      std::memcpy(static_cast<int32_t*>(g.out) + (m0 + i) * g.ldo + n0, c + i * kBlock, nlen * 4);
    return;
  }
  using V = aVec<T>;
  constexpr int64_t C = kChunk<T>;
  alignas(64) float row[kBlock];
  for (int64_t i = 0; i < mlen; ++i) {
    const float sa = g.scale_a[m0 + i];
    const float* sb = g.scale_b + n0;
    const int32_t* ci = c + i * kBlock;
    for (int64_t j = 0; j < nlen; ++j) row[j] = float(ci[j]) * (sa * sb[j]);
    if (g.bias)
      for (int64_t j = 0; j < nlen; ++j) row[j] += g.bias[n0 + j];
    for (int64_t o = 0; o < g.outlier_rank; ++o) {
      const float xo = g.outlier_x[(m0 + i) * g.outlier_rank + o];
      const float* wo = g.outlier_wt + o * g.n + n0;
      for (int64_t j = 0; j < nlen; ++j) row[j] += xo * wo[j];
    }
    T* o = static_cast<T*>(g.out) + (m0 + i) * g.ldo + n0;
    for (int64_t j = 0; j < nlen; j += C) {
      V v0, v1;
      const int64_t len = std::min(C, nlen - j);
      load2(row + j, v0, v1, len);
      store2(o + j, v0, v1, len);
    }
  }
}

void write_block(const Int8GemmArgs& g, int64_t m0, int64_t n0, const int32_t* c) {
  if (g.out_int32) return epilogue<float>(g, m0, n0, c);
  dispatch_int8_float_types(g.out_dtype, [&](auto tag) { epilogue<decltype(tag)>(g, m0, n0, c); });
}

}  // namespace

void int8_gemm(const Int8GemmArgs& g) {
  const int64_t row_blocks = (g.m + kBlock - 1) / kBlock;
  const int64_t col_blocks = (g.n + kBlock - 1) / kBlock;
  const int64_t panel_bytes = g.k_pad * kPanelN;
  const int64_t chunk = std::max<int64_t>(1, (int64_t(1) << 20) / (2 * panel_bytes));
  const int64_t col_chunks = (col_blocks + chunk - 1) / chunk;
  const int64_t row_groups = (row_blocks + kRowBlocksPerTask - 1) / kRowBlocksPerTask;
  at::parallel_for(0, col_chunks * row_groups, 1, [&](int64_t begin, int64_t end) {
    alignas(64) int32_t c[kBlock * kBlock];
#if defined(CPU_CAPABILITY_AVX512)
    if (g.path == Int8Path::kAmx) amx_configure();
#endif
    for (int64_t t = begin; t < end; ++t) {
      const int64_t cb0 = (t / row_groups) * chunk, cb1 = std::min(col_blocks, cb0 + chunk);
      const int64_t rb0 = (t % row_groups) * kRowBlocksPerTask;
      const int64_t rb1 = std::min(row_blocks, rb0 + kRowBlocksPerTask);
      for (int64_t rb = rb0; rb < rb1; ++rb) {
        const int8_t* a = g.a + rb * kBlock * g.lda;
        for (int64_t cb = cb0; cb < cb1; ++cb) {
          const int8_t* p0 = g.b + 2 * cb * panel_bytes;
          const int8_t* p1 = p0 + panel_bytes;
          switch (g.path) {
#if defined(CPU_CAPABILITY_AVX512)
            case Int8Path::kAmx: block_amx(a, g.lda, p0, p1, g.k_pad, c); break;
            case Int8Path::kVnni:
              block_vnni(a, g.lda, p0, p1, g.k_pad, g.b_colsum + cb * kBlock, c);
              break;
#endif
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
            case Int8Path::kAvx2: block_avx2(a, g.lda, p0, p1, g.k_pad, c); break;
#endif
            default: block_scalar(a, g.lda, p0, p1, g.k_pad, c);
          }
          write_block(g, rb * kBlock, cb * kBlock, c);
        }
      }
    }
#if defined(CPU_CAPABILITY_AVX512)
    if (g.path == Int8Path::kAmx) amx_release();
#endif
  });
}

void int8_pack(const Int8PackArgs& a) {
  const int64_t k_pad = round_up(a.k, kPadK), groups = k_pad / 4, n_pad = round_up(a.n, kPadN);
  at::parallel_for(0, n_pad / kPanelN, 1, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      int8_t* dst = a.packed + p * groups * kPanelN * 4;
      for (int64_t r = 0; r < kPanelN; ++r) {
        const int64_t n = p * kPanelN + r;
        int32_t sum = 0;
        if (n < a.n) {
          const int8_t* src = a.w + n * a.k;
          for (int64_t c = 0; c < a.k; ++c) sum += src[c];
          const int64_t full = a.k / 4;
          for (int64_t g = 0; g < full; ++g) std::memcpy(dst + (g * kPanelN + r) * 4, src + 4 * g, 4);
          for (int64_t g = full; g < groups; ++g)
            for (int64_t t = 0; t < 4; ++t) dst[(g * kPanelN + r) * 4 + t] = 4 * g + t < a.k ? src[4 * g + t] : 0;
        } else {
          for (int64_t g = 0; g < groups; ++g) std::memset(dst + (g * kPanelN + r) * 4, 0, 4);
        }
        a.colsum[n] = sum;
      }
    }
  });
}

// ---------------------------------------------------------------- quantization
namespace {

// q[0..n) = saturate(round_half_even(v[0..n) * inv)) for the float row v.
void quantize_floats(const float* v, int64_t n, float inv, int8_t* q) {
  int64_t c = 0;
#if defined(CPU_CAPABILITY_AVX512)
  const __m512 s = _mm512_set1_ps(inv);
  for (; c + 16 <= n; c += 16) {
    const __m512i i32 = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(v + c), s));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(q + c), _mm512_cvtsepi32_epi8(i32));
  }
#elif defined(CPU_CAPABILITY_AVX2)
  const __m256 s = _mm256_set1_ps(inv);
  const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  for (; c + 32 <= n; c += 32) {
    __m256i i[4];
    for (int t = 0; t < 4; ++t) i[t] = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(v + c + 8 * t), s));
    const __m256i packed = _mm256_packs_epi16(_mm256_packs_epi32(i[0], i[1]), _mm256_packs_epi32(i[2], i[3]));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + c), _mm256_permutevar8x32_epi32(packed, order));
  }
#endif
  for (; c < n; ++c) q[c] = static_cast<int8_t>(std::clamp(std::nearbyint(v[c] * inv), -127.0f, 127.0f));
}

// The row as floats in buf, skipped columns zeroed; returns max |.| (NaN if any NaN).
template <typename T>
float load_row(const T* x, int64_t cols, const int64_t* skip, int64_t n_skip, float* buf) {
  using V = aVec<T>;
  constexpr int64_t C = kChunk<T>;
  V m0(0), m1(0);
  for (int64_t c = 0; c < cols; c += C) {
    V v0, v1;
    const int64_t len = std::min(C, cols - c);
    if (len == C) load2(x + c, v0, v1); else load2(x + c, v0, v1, len);
    store2(buf + c, v0, v1, len);
  }
  for (int64_t s = 0; s < n_skip; ++s) buf[skip[s]] = 0.0f;
  for (int64_t c = 0; c < cols; c += C) {
    V v0, v1;
    load2(buf + c, v0, v1, std::min(C, cols - c));
    m0 = at::vec::maximum(m0, v0.abs());
    m1 = at::vec::maximum(m1, v1.abs());
  }
  alignas(64) float lanes[2 * V::size()];
  m0.store(lanes);
  m1.store(lanes + V::size());
  float amax = 0.0f;
  for (float l : lanes) amax = std::isnan(l) || std::isnan(amax) ? NAN : std::max(amax, l);
  return amax;
}

}  // namespace

void int8_quantize_rows(const Int8QuantArgs& a) {
  dispatch_int8_float_types(a.dtype, [&](auto tag) {
    using T = decltype(tag);
    at::parallel_for(0, a.rows, 16, [&](int64_t begin, int64_t end) {
      std::vector<float> buf(a.cols + kChunk<T>);
      for (int64_t r = begin; r < end; ++r) {
        const float amax = load_row(static_cast<const T*>(a.x) + r * a.ldx, a.cols, a.skip_idx,
                                    a.n_skip, buf.data());
        int8_t* q = a.q + r * a.ldq;
        if (!std::isfinite(amax) || amax == 0.0f) {
          std::memset(q, 0, a.ldq);
          a.scale[r] = amax == 0.0f ? 0.0f : NAN;
          continue;
        }
        float pre = 1.0f;
        if (amax < kTinyRowAmax) {  // (int8.h)
          pre = kTinyRowPrescale;
          for (int64_t c = 0; c < a.cols; ++c) buf[c] *= pre;
        }
        quantize_floats(buf.data(), a.cols, 127.0f / (amax * pre), q);
        std::memset(q + a.cols, 0, a.ldq - a.cols);
        a.scale[r] = amax / 127.0f;
      }
    });
  });
}

void int8_outlier_cols(const Int8OutlierArgs& a) {
  dispatch_int8_float_types(a.dtype, [&](auto tag) {
    using T = decltype(tag);
    using V = aVec<T>;
    constexpr int64_t C = kChunk<T>;
    const int nt = at::get_num_threads();
    std::vector<uint8_t> masks(size_t(nt) * a.cols, 0);
    const V thr(a.threshold);
    at::parallel_for(0, a.rows, 16, [&](int64_t begin, int64_t end) {
      uint8_t* m = masks.data() + size_t(at::get_thread_num()) * a.cols;
      for (int64_t r = begin; r < end; ++r) {
        const T* x = static_cast<const T*>(a.x) + r * a.ldx;
        for (int64_t c = 0; c < a.cols; c += C) {
          V v0, v1;
          const int64_t len = std::min(C, a.cols - c);
          if (len == C) load2(x + c, v0, v1); else load2(x + c, v0, v1, len);
          const V hit = (v0.abs() > thr) | (v1.abs() > thr);
          if (hit.zero_mask() == (1 << V::size()) - 1) continue;  // no lane over: the usual case
          for (int64_t j = 0; j < len; ++j) m[c + j] |= std::abs(float(x[c + j])) > a.threshold;
        }
      }
    });
    for (int64_t c = 0; c < a.cols; ++c) {
      uint8_t any = 0;
      for (int t = 0; t < nt; ++t) any |= masks[size_t(t) * a.cols + c];
      a.mask[c] = any;
    }
  });
}

void hash_dropout(const DropoutArgs& a) {
  dispatch_float_types(a.dtype, [&](auto tag) {
    using T = decltype(tag);
    using A = acc_t<T>;
    const uint32_t threshold = dropout_threshold(a.p);
    const A inv = A(1) / (A(1) - A(a.p));
    const T* x = static_cast<const T*>(a.x);
    T* out = static_cast<T*>(a.out);
    at::parallel_for(0, a.numel, 1 << 14, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i)
        out[i] = dropout_hash(a.seed, uint64_t(i)) >= threshold ? T(A(x[i]) * inv) : T(0);
    });
  });
}

}  // namespace CPU_CAPABILITY
}  // namespace fastpt::cpu
