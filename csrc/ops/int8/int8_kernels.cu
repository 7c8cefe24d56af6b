// Int8 CUDA kernels: the int8 GEMM on int8 tensor cores (WMMA m16n16k16, s8 x s8 -> s32)
// with the dequantization epilogue, row-wise quantization, outlier-column detection and the
// hash-mask dropout of the LoRA op. Same formulas as int8_kernel.cpp (CPU); the GEMM's int32
// sums are exact, so both devices give the same integers.
//
// GEMM: one block of 4 warps per 32 x 32 output tile, each warp one 16 x 16 accumulator
// fragment. K advances 64 at a time through shared memory: A's 32 x 64 bytes (rows past m
// read as 0) and B's 32 channels x 64 k from the packed weight (two panels, each 1 KiB
// contiguous for 64 k), rearranged into column-major tiles for matrix_b. Both are stored
// k-chunk-major: each 16 k of the 32 rows (or channels) is one 512-byte block of 16-byte
// rows, so every 16 x 16 fragment WMMA loads starts 256-bit aligned, as load_matrix_sync
// requires (rows padded to 80 bytes put the k = 16 and 48 fragments 16 bytes off that).
// Per block and K step: 4 KiB read
// from global memory for 32 x 32 x 64 MACs (8 MACs per byte): bound by L2/DRAM bandwidth
// rather than the tensor cores; larger tiles and cp.async pipelining would be the next step
// (not measured: no GPU here).
#include "common/cuda_compat.h"
#include "common/portable.h"
#include "ops/int8/int8.h"
#include "ops/int8/int8_cuda.h"

namespace fastpt {
namespace {

using cuda::from_float;
using cuda::to_float;

constexpr int kTile = 32;      // output tile
constexpr int kStepK = 64;     // K per shared-memory step
constexpr int kChunkK = 16;    // k of one WMMA fragment, and the leading dimension of a chunk
constexpr int kChunk = kTile * kChunkK;  // bytes of one k-chunk of a tile
constexpr int kGemmThreads = 128;

// WMMA loads and stores need 256-bit aligned tiles.
struct alignas(32) GemmSmem {
  signed char a[kTile * kStepK];  // row r, k: a[(k / 16) * kChunk + r * 16 + k % 16]
  signed char b[kTile * kStepK];  // channel n, k: b[(k / 16) * kChunk + n * 16 + k % 16] (column-major)
  int c[kTile * kTile];
};

// blockIdx.x: the row tile (m can be any token count: x goes to 2^31 - 1); blockIdx.y: the
// column tile from n_tile0, the launch's first (launches take at most 65535 rows of blocks).
template <typename T>
__global__ void int8_gemm_kernel(Int8GemmArgs g, int64_t n_tile0) {
  __shared__ GemmSmem smem;
  signed char* a_s = smem.a;
  signed char* b_s = smem.b;
  int* c_s = smem.c;
  const int tid = threadIdx.x, warp = tid / cuda::kWarp;
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * kTile, n0 = (n_tile0 + blockIdx.y) * kTile;
  const int64_t groups = g.k_pad / 4;
  nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, 16, int> acc;
  nvcuda::wmma::fill_fragment(acc, 0);
  for (int64_t k0 = 0; k0 < g.k_pad; k0 += kStepK) {
    {  // A: thread -> 16 bytes of one row
      const int row = tid / 4, seg = (tid % 4) * 16;
      const int64_t m = m0 + row;
      for (int j = 0; j < 16; ++j)
        a_s[(seg / kChunkK) * kChunk + row * kChunkK + j] =
            m < g.m ? static_cast<signed char>(g.a[m * g.lda + k0 + seg + j]) : 0;
    }
    {  // B: thread -> 16 bytes = 4 channels x 4 k of one group of one panel
      const int panel = tid / 64, within = (tid % 64) * 16, group = within / 64, byte = within % 64;
      const int8_t* src = g.b + ((n0 / kPanelN + panel) * groups + k0 / 4 + group) * (kPanelN * 4) + byte;
      for (int j = 0; j < 16; ++j) {
        const int n = panel * kPanelN + (byte + j) / 4, k = group * 4 + (byte + j) % 4;
        b_s[(k / kChunkK) * kChunk + n * kChunkK + k % kChunkK] = static_cast<signed char>(src[j]);
      }
    }
    __syncthreads();
    const int wm = warp / 2, wn = warp % 2;
    for (int kk = 0; kk < kStepK; kk += kChunkK) {
      nvcuda::wmma::fragment<nvcuda::wmma::matrix_a, 16, 16, 16, signed char, nvcuda::wmma::row_major> fa;
      nvcuda::wmma::fragment<nvcuda::wmma::matrix_b, 16, 16, 16, signed char, nvcuda::wmma::col_major> fb;
      const int chunk = (kk / kChunkK) * kChunk;
      nvcuda::wmma::load_matrix_sync(fa, a_s + chunk + wm * 16 * kChunkK, kChunkK);
      nvcuda::wmma::load_matrix_sync(fb, b_s + chunk + wn * 16 * kChunkK, kChunkK);
      nvcuda::wmma::mma_sync(acc, fa, fb, acc);
    }
    __syncthreads();
  }
  nvcuda::wmma::store_matrix_sync(c_s + (warp / 2) * 16 * kTile + (warp % 2) * 16, acc, kTile,
                                  nvcuda::wmma::mem_row_major);
  __syncthreads();
  for (int i = tid; i < kTile * kTile; i += kGemmThreads) {
    const int64_t m = m0 + i / kTile, n = n0 + i % kTile;
    if (m >= g.m || n >= g.n) continue;
    const int v = c_s[i];
    if (g.out_int32) {
      static_cast<int32_t*>(g.out)[m * g.ldo + n] = v;
    } else {
      float r = static_cast<float>(v) * (g.scale_a[m] * g.scale_b[n]);
      if (g.bias) r += g.bias[n];
      static_cast<T*>(g.out)[m * g.ldo + n] = from_float<T>(r);
    }
  }
}

constexpr int kRowThreads = 256;

// max over the block (every thread gets it); scratch: 32 floats of shared memory.
FASTPT_DEVICE float block_max(float v, float* scratch) {
  for (int o = cuda::kWarp / 2; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(cuda::kFullMask, v, o));
  const int lane = threadIdx.x % cuda::kWarp, warp = threadIdx.x / cuda::kWarp;
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  v = lane < static_cast<int>(blockDim.x / cuda::kWarp) ? scratch[lane] : 0.0f;
  for (int o = cuda::kWarp / 2; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(cuda::kFullMask, v, o));
  __syncthreads();
  return v;
}

// One block per row. Non-finite values count as +inf in the max, which marks the row.
template <typename T>
__global__ void int8_quantize_kernel(Int8QuantArgs a) {
  __shared__ float scratch[32];
  const int64_t r = blockIdx.x;
  const T* x = static_cast<const T*>(a.x) + r * a.ldx;
  int8_t* q = a.q + r * a.ldq;
  float amax = 0.0f;
  for (int64_t c = threadIdx.x; c < a.cols; c += blockDim.x) {
    if (a.skip_mask && a.skip_mask[c]) continue;
    const float v = fabsf(to_float(x[c]));
    amax = fmaxf(amax, v <= 3.402823466e+38f ? v : __int_as_float(0x7f800000));  // NaN, inf -> inf
  }
  amax = block_max(amax, scratch);
  const bool bad = !(amax <= 3.402823466e+38f);
  const float pre = amax < kTinyRowAmax ? kTinyRowPrescale : 1.0f;  // (int8.h)
  const float inv = 127.0f / (amax * pre);
  for (int64_t c = threadIdx.x; c < a.ldq; c += blockDim.x) {
    int8_t v = 0;
    if (!bad && amax > 0.0f && c < a.cols && !(a.skip_mask && a.skip_mask[c]))
      v = static_cast<int8_t>(fminf(fmaxf(rintf(to_float(x[c]) * pre * inv), -127.0f), 127.0f));
    q[c] = v;
  }
  if (threadIdx.x == 0) a.scale[r] = bad ? cuda::quiet_nan<float>() : amax / 127.0f;
}

// One thread per column, rows in a loop (neighbouring threads read neighbouring columns).
template <typename T>
__global__ void int8_outlier_kernel(Int8OutlierArgs a) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= a.cols) return;
  uint8_t hit = 0;
  for (int64_t r = 0; r < a.rows && !hit; ++r)
    hit = fabsf(to_float(static_cast<const T*>(a.x)[r * a.ldx + c])) > a.threshold;
  a.mask[c] = hit;
}

template <typename T>
__global__ void int8_dropout_kernel(DropoutArgs a, uint32_t threshold, cuda::acc_t<T> inv) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < a.numel; i += stride) {
    const bool keep = dropout_hash(a.seed, static_cast<uint64_t>(i)) >= threshold;
    static_cast<T*>(a.out)[i] = keep ? cuda::from_acc<T>(cuda::to_acc(static_cast<const T*>(a.x)[i]) * inv)
                                     : cuda::from_acc<T>(cuda::acc_t<T>(0));
  }
}

// float32 / bfloat16 / float16 only (the glue rejects float64 for the int8 ops).
template <typename F>
cudaError_t dispatch_int8_float_types(DType dtype, F&& f) {
  switch (dtype) {
    case DType::kFloat32: return f(float{});
    case DType::kBFloat16: return f(cuda::bf16{});
    case DType::kFloat16: return f(cuda::fp16{});
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace

cudaError_t int8_gemm_cuda(const Int8GemmArgs& g, cudaStream_t stream) {
  if (g.m <= 0 || g.n <= 0) return cudaSuccess;
  const int64_t m_tiles = (g.m + kTile - 1) / kTile, n_tiles = (g.n + kTile - 1) / kTile;
  if (m_tiles > 0x7fffffff) return cudaErrorInvalidConfiguration;
  auto launch = [&](auto tag) {
    auto kernel = &int8_gemm_kernel<decltype(tag)>;
    for (int64_t n_tile0 = 0; n_tile0 < n_tiles; n_tile0 += cuda::max_grid_y())
      FASTPT_LAUNCH(kernel, dim3(static_cast<unsigned>(m_tiles), cuda::grid_rows(n_tiles, n_tile0)), kGemmThreads, 0,
                    stream, g, n_tile0);
    return cudaSuccess;
  };
  if (g.out_int32) return launch(float{});
  return dispatch_int8_float_types(g.out_dtype, launch);
}

cudaError_t int8_quantize_rows_cuda(const Int8QuantArgs& a, cudaStream_t stream) {
  if (a.rows <= 0) return cudaSuccess;
  if (a.rows > 2147483647) return cudaErrorInvalidConfiguration;
  return dispatch_int8_float_types(a.dtype, [&](auto tag) {
    auto kernel = &int8_quantize_kernel<decltype(tag)>;
    FASTPT_LAUNCH(kernel, static_cast<unsigned>(a.rows), kRowThreads, 0, stream, a);
    return cudaSuccess;
  });
}

cudaError_t int8_outlier_cols_cuda(const Int8OutlierArgs& a, cudaStream_t stream) {
  if (a.cols <= 0) return cudaSuccess;
  return dispatch_int8_float_types(a.dtype, [&](auto tag) {
    auto kernel = &int8_outlier_kernel<decltype(tag)>;
    FASTPT_LAUNCH(kernel, static_cast<unsigned>((a.cols + kRowThreads - 1) / kRowThreads), kRowThreads, 0,
                  stream, a);
    return cudaSuccess;
  });
}

cudaError_t int8_dropout_cuda(const DropoutArgs& a, cudaStream_t stream) {
  if (a.numel <= 0) return cudaSuccess;
  return cuda::dispatch_float_types(a.dtype, [&](auto tag) {
    using T = decltype(tag);
    using A = cuda::acc_t<T>;
    auto kernel = &int8_dropout_kernel<T>;
    FASTPT_LAUNCH(kernel, cuda::grid_for(a.numel, kRowThreads), kRowThreads, 0, stream, a,
                  dropout_threshold(a.p), A(1) / (A(1) - A(a.p)));
    return cudaSuccess;
  });
}

}  // namespace fastpt
