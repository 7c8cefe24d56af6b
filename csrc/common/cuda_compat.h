// The one portability header of the CUDA kernel files (*_kernels.cu) and their launcher
// declarations (*_cuda.h). It is the only place that names CUDA headers, so that F2 can
// compile the same .cu sources with the host compiler through the SIMT emulator
// (csrc/testing/) by defining FASTPT_SIMT_EMULATOR and providing, in "testing/simt.h":
//   - the keywords __global__, __device__, __shared__ (static arrays in kernels),
//     __forceinline__, __restrict__, the built-ins threadIdx / blockIdx / blockDim /
//     gridDim and dim3;
//   - __syncthreads, __shfl_xor_sync (full mask only; float and double), sqrt, exp, expf,
//     __int_as_float, __longlong_as_double;
//   - __nv_bfloat16 / __half with __bfloat162float, __float2bfloat16_rn, __half2float,
//     __float2half_rn;
//   - nvcuda::wmma, 16x16x16 (testing/simt_wmma.h; <mma.h> under nvcc, below);
//   - cudaError_t, cudaSuccess, cudaErrorInvalidValue, cudaStream_t, cudaGetLastError,
//     cudaPeekAtLastError and cudaGetErrorString;
//   - FASTPT_SIMT_LAUNCH(kernel, grid, block, smem_bytes, stream, args...), which runs
//     every block's threads with real barriers and returns a cudaError_t, and
//     fastpt_simt_dynamic_smem(), the running block's dynamic shared memory (a void*
//     aligned to 16 bytes), used instead of `extern __shared__` (see dynamic_smem below).
// Rules that keep kernels emulable: launch only through FASTPT_LAUNCH, only documented
// CUDA C++ (no inline PTX, no cooperative groups, no CUB), __shfl_*_sync with the full
// mask from all 32 lanes, so every block size is a multiple of 32 (csrc/testing/README.md
// has the full list). tests/test_cuda_emulated.py runs every kernel under the emulator; no
// GPU has run them yet.
//
// Host compilers that only need the launcher declarations (the *_cuda.cpp glue) get the
// runtime types and nothing else.
#pragma once

#include <cstdint>
#include <type_traits>

#include "common/portable.h"

#if defined(FASTPT_SIMT_EMULATOR)
#include "testing/simt.h"
#define FASTPT_KERNEL_COMPILE 1
#elif defined(__CUDACC__)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <mma.h>  // nvcuda::wmma (the emulator's: testing/simt_wmma.h, included by simt.h)
#define FASTPT_KERNEL_COMPILE 1
#else
#include <cuda_runtime_api.h>  // cudaError_t, cudaStream_t for the glue's host compiler
#define FASTPT_KERNEL_COMPILE 0
#endif

// Launches `kernel` and returns the launch error (bad configuration, no kernel image for
// this GPU, ...) from the enclosing function, which must return cudaError_t: kernel files
// are torch-free, so the glue turns the code into a c10 error. Template kernels with
// several arguments go through a function pointer (`auto k = &f<T, V>;`) because the
// preprocessor splits macro arguments at the comma inside <...>.
// cudaGetLastError after a launch also returns (and clears) an error left by earlier work on
// this thread: another library's unchecked launch, or an earlier kernel's fault (CUDA reports
// those asynchronously). So an error already pending is returned as it is, not consumed and
// with nothing launched, and the glue says whose it is (error_predates_launch below).
#if defined(FASTPT_SIMT_EMULATOR)
#define FASTPT_LAUNCH_UNCHECKED(kernel, grid, block, smem_bytes, stream, ...) \
  (void)FASTPT_SIMT_LAUNCH(kernel, grid, block, smem_bytes, stream, __VA_ARGS__)
#elif defined(__CUDACC__)
#define FASTPT_LAUNCH_UNCHECKED(kernel, grid, block, smem_bytes, stream, ...) \
  kernel<<<(grid), (block), (smem_bytes), (stream)>>>(__VA_ARGS__)
#endif
#if FASTPT_KERNEL_COMPILE
#define FASTPT_LAUNCH(kernel, grid, block, smem_bytes, stream, ...)                          \
  do {                                                                                      \
    const cudaError_t fastpt_pending_err_ = cudaPeekAtLastError();                          \
    if (fastpt_pending_err_ != cudaSuccess) return fastpt_pending_err_;                     \
    FASTPT_LAUNCH_UNCHECKED(kernel, grid, block, smem_bytes, stream, __VA_ARGS__);          \
    const cudaError_t fastpt_launch_err_ = cudaGetLastError();                              \
    if (fastpt_launch_err_ != cudaSuccess) return fastpt_launch_err_;                       \
  } while (0)
#endif

namespace fastpt::cuda {

// Whether `err`, returned by a launcher, is an error that was pending before its launch
// (FASTPT_LAUNCH left it in place) rather than the launch's own (which it consumed). Sticky
// errors (a kernel's fault) stay pending too: they come from kernels queued earlier.
inline bool error_predates_launch(cudaError_t err) {
  return err != cudaSuccess && cudaPeekAtLastError() == err;
}

}  // namespace fastpt::cuda

#if FASTPT_KERNEL_COMPILE

#define FASTPT_DEVICE __device__ __forceinline__

namespace fastpt::cuda {

using bf16 = __nv_bfloat16;
using fp16 = __half;

constexpr int kWarp = 32;
constexpr unsigned kFullMask = 0xffffffffu;

// ---- storage <-> compute type. Arithmetic is fp32 for float / bf16 / fp16 storage and
// double for double (float64 exists for references and gradcheck, as on the CPU side);
// rounding back is round-to-nearest-even, as c10::BFloat16 / c10::Half do.
template <typename T>
struct AccType {
  using type = float;
};
template <>
struct AccType<double> {
  using type = double;
};
template <typename T>
using acc_t = typename AccType<T>::type;

FASTPT_DEVICE float to_float(float v) { return v; }
FASTPT_DEVICE float to_float(bf16 v) { return __bfloat162float(v); }
FASTPT_DEVICE float to_float(fp16 v) { return __half2float(v); }

template <typename T>
FASTPT_DEVICE T from_float(float v);
template <>
FASTPT_DEVICE float from_float<float>(float v) { return v; }
template <>
FASTPT_DEVICE bf16 from_float<bf16>(float v) { return __float2bfloat16_rn(v); }
template <>
FASTPT_DEVICE fp16 from_float<fp16>(float v) { return __float2half_rn(v); }

template <typename T>
FASTPT_DEVICE acc_t<T> to_acc(T v) {
  if constexpr (std::is_same_v<T, double>) return v;
  else return to_float(v);
}
template <typename T>
FASTPT_DEVICE T from_acc(acc_t<T> v) {
  if constexpr (std::is_same_v<T, double>) return v;
  else return from_float<T>(v);
}

// ---- vectorized access: V elements of T in one aligned access (16 bytes when
// V = 16 / sizeof(T)); V = 1 is the scalar fallback for unaligned data or odd sizes.
template <typename T, int V>
struct alignas(sizeof(T) * V) Pack {
  T v[V];
};

template <int V, typename T>
FASTPT_DEVICE void load_acc(const T* p, acc_t<T> (&f)[V]) {
  const Pack<T, V> pk = *reinterpret_cast<const Pack<T, V>*>(p);
#pragma unroll
  for (int k = 0; k < V; ++k) f[k] = to_acc(pk.v[k]);
}

template <int V, typename T>
FASTPT_DEVICE void store_acc(T* p, const acc_t<T> (&f)[V]) {
  Pack<T, V> pk;
#pragma unroll
  for (int k = 0; k < V; ++k) pk.v[k] = from_acc<T>(f[k]);
  *reinterpret_cast<Pack<T, V>*>(p) = pk;
}

// Elements of T per 16-byte access.
template <typename T>
constexpr int vec_width() {
  return static_cast<int>(16 / sizeof(T));
}

// Whether every pointer is aligned to `bytes` (host side, picks the vector path).
template <typename... Ps>
inline bool aligned_to(std::uintptr_t bytes, const Ps*... ps) {
  return ((reinterpret_cast<std::uintptr_t>(ps) % bytes == 0) && ...);
}

// The kernel's dynamic shared memory (the launch's smem_bytes) as an array of A; one
// declaration for every instantiation, so templates over A do not clash, and the one
// place the emulator has to replace.
template <typename A>
FASTPT_DEVICE A* dynamic_smem() {
#if defined(FASTPT_SIMT_EMULATOR)
  return reinterpret_cast<A*>(fastpt_simt_dynamic_smem());
#else
  extern __shared__ double fastpt_dynamic_smem[];
  return reinterpret_cast<A*>(fastpt_dynamic_smem);
#endif
}

// ---- reductions. Every lane of the warp must call them (full mask).
template <typename A>
FASTPT_DEVICE A warp_sum(A v) {
#pragma unroll
  for (int offset = kWarp / 2; offset > 0; offset >>= 1) v += __shfl_xor_sync(kFullMask, v, offset);
  return v;
}

// Sum over the block, returned to every thread. blockDim.x must be a multiple of 32
// (at most 1024) and blockDim.y == 1; `scratch` is 32 values of shared memory. Ends with a
// barrier so the caller may call it again with the same scratch.
template <typename A>
FASTPT_DEVICE A block_sum(A v, A* scratch) {
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  const int num_warps = blockDim.x / kWarp;
  v = warp_sum(v);
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  v = lane < num_warps ? scratch[lane] : A(0);
  v = warp_sum(v);  // every warp reduces the partials itself: no second broadcast barrier
  __syncthreads();
  return v;
}

// A quiet NaN of the compute type (for results a kernel must mark invalid).
template <typename A>
FASTPT_DEVICE A quiet_nan() {
  if constexpr (std::is_same_v<A, double>) return __longlong_as_double(0x7ff8000000000000LL);
  else return __int_as_float(0x7fc00000);
}

// gridDim.y and gridDim.z are at most 65535 (gridDim.x: 2^31 - 1). Launchers put counts that
// can exceed that on y in chunks of max_grid_y() rows of blocks; the emulator lets tests lower
// the limit (fastpt_simt::settings().max_grid_yz) to cover the chunking on small shapes.
inline int64_t max_grid_y() {
#if defined(FASTPT_SIMT_EMULATOR)
  return fastpt_simt::settings().max_grid_yz;
#else
  return 65535;
#endif
}

// gridDim.y of the launch whose first row of blocks is y0 of `rows`.
inline unsigned grid_rows(int64_t rows, int64_t y0) {
  const int64_t n = rows - y0;
  return static_cast<unsigned>(n < max_grid_y() ? n : max_grid_y());
}

// ---- dtype dispatch for launchers: f(T{}) with T the storage type of `dtype`.
template <typename F>
cudaError_t dispatch_float_types(DType dtype, F&& f) {
  switch (dtype) {
    case DType::kFloat32: return f(float{});
    case DType::kBFloat16: return f(bf16{});
    case DType::kFloat16: return f(fp16{});
    case DType::kFloat64: return f(double{});
  }
  return cudaErrorInvalidValue;
}

// Blocks for a grid-stride loop over `work` items of `per_block` each: enough to fill the
// GPU many times over, capped so grid.x stays far from its limit (loops take the rest).
inline unsigned grid_for(int64_t work, int64_t per_block, int64_t cap = int64_t{1} << 16) {
  const int64_t blocks = (work + per_block - 1) / per_block;
  return static_cast<unsigned>(blocks < 1 ? 1 : (blocks < cap ? blocks : cap));
}

}  // namespace fastpt::cuda

#endif  // FASTPT_KERNEL_COMPILE
