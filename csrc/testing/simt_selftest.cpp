// Self-tests of the SIMT emulator (testing/simt.h): a racy kernel must give a wrong result,
// shared memory must not keep what an earlier block wrote, warp primitives must be exact (PTX
// shfl.sync semantics), barrier and warp-primitive misuse must come back as a launch error
// (never a hang), WMMA must match a reference matmul and check CUDA's rules for its operands.
// Prints "SELFTEST <name> ok|FAIL" per test and "<N> selftests, <F> failures"; exit status 1 on
// any failure.
// Built and run by tests/test_cuda_emulated.py (g++ -std=c++20 -DFASTPT_SIMT_EMULATOR -I csrc).
#include "common/cuda_compat.h"

#include <cstdio>
#include <new>
#include <string>
#include <thread>
#include <vector>

using fastpt_simt::Order;

namespace {

int total = 0, failures = 0;
void expect(const std::string& name, bool ok, const std::string& detail = "") {
  ++total;
  if (!ok) ++failures;
  std::printf("SELFTEST %s %s%s%s\n", name.c_str(), ok ? "ok" : "FAIL", detail.empty() ? "" : ": ",
              detail.c_str());
}

constexpr int kN = 128;

// Tree reduction in shared memory; `racy` leaves out the barrier after the stores.
__global__ void block_reduce(const float* in, float* out, bool racy) {
  __shared__ float s[kN];
  const int t = threadIdx.x;
  s[t] = in[blockIdx.x * kN + t];
  if (!racy) __syncthreads();
  for (int stride = kN / 2; stride > 0; stride /= 2) {
    if (t < stride) s[t] += s[t + stride];
    __syncthreads();
  }
  if (t == 0) out[blockIdx.x] = s[0];
}

// Warp 1 reads what warp 0 wrote; `racy` leaves out the barrier between. Both warps call the
// same warp primitive in between, so they move in lockstep under every resume order and only
// the warp-serial schedule runs the reader before the writer.
__global__ void warp_handoff(float* out, bool racy) {
  float* s = fastpt::cuda::dynamic_smem<float>();  // poisoned before each block
  const int lane = threadIdx.x % 32, w = threadIdx.x / 32;
  if (w == 0) s[lane] = float(lane);
  __syncwarp();
  if (!racy) __syncthreads();
  if (w == 1) out[lane] = s[31 - lane];
}

// Integer warp primitives: xor / down all-reduce, up inclusive scan, broadcast, ballot.
__global__ void warp_ops(int* out) {
  const int lane = threadIdx.x % 32, w = threadIdx.x / 32;
  const int v = (blockIdx.x + 1) * 1000 + w * 100 + lane;
  int x = v;
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  int d = v;
  for (int o = 16; o > 0; o >>= 1) d += __shfl_down_sync(0xffffffffu, d, o);
  int scan = v;
  for (int o = 1; o < 32; o <<= 1) {
    const int y = __shfl_up_sync(0xffffffffu, scan, o);
    if (lane >= o) scan += y;
  }
  const int b = __shfl_sync(0xffffffffu, v, 7);
  const unsigned bal = __ballot_sync(0xffffffffu, lane % 3 == 0);
  __syncwarp();
  const double dx = __shfl_xor_sync(0xffffffffu, double(v) + 0.5, 1);
  int* o = out + (blockIdx.x * blockDim.x + threadIdx.x) * 6;
  o[0] = x; o[1] = lane == 0 ? d : 0; o[2] = scan; o[3] = b; o[4] = int(bal);
  o[5] = int(dx * 2);
}

__global__ void early_exit(int* out) {
  if (threadIdx.x == 5) return;
  __syncthreads();
  out[threadIdx.x] = 1;
}

__global__ void warp_sum_kernel(float* out) {
  const float v = fastpt::cuda::warp_sum(float(threadIdx.x));
  out[threadIdx.x] = v;
}

__global__ void lane_exit_then_shuffle(float* out) {
  if (threadIdx.x % 32 == 3) return;
  out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, float(threadIdx.x), 1);
}

__global__ void partial_mask(float* out) {
  out[threadIdx.x] = __shfl_xor_sync(0x0000ffffu, float(threadIdx.x), 1);
}

__global__ void divergent_barriers(int* out) {
  if (threadIdx.x % 32 < 16) __syncthreads();  // half of each warp here,
  else __syncwarp();                           // the other half there
  out[threadIdx.x] = 1;
}

__global__ void indices_3d(int* out) {
  const int block = blockIdx.x + gridDim.x * (blockIdx.y + gridDim.y * blockIdx.z);
  const int thread = threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
  const int nthreads = blockDim.x * blockDim.y * blockDim.z;
  atomicAdd(&out[block * nthreads + thread], 1);
}

// Static smem starts undefined in every block in CUDA (poisoned here), so every block writes
// before reading. Dynamic smem: one float per thread, reversed through it.
__global__ void smem_kernel(const float* in, float* out) {
  float* dyn = fastpt::cuda::dynamic_smem<float>();
  __shared__ int block_tag;
  if (threadIdx.x == 0) block_tag = blockIdx.x;
  dyn[threadIdx.x] = in[blockIdx.x * blockDim.x + threadIdx.x];
  __syncthreads();
  out[blockIdx.x * blockDim.x + threadIdx.x] = dyn[blockDim.x - 1 - threadIdx.x] + 1000.f * block_tag;
}

__global__ void no_args() { (void)threadIdx.x; }

__global__ void atomics(float* f, int* i, double* d, int* mx) {
  atomicAdd(f, 0.5f);
  atomicAdd(i, 1);
  atomicAdd(d, 0.25);
  atomicMax(mx, int(blockIdx.x * blockDim.x + threadIdx.x));
}

// C (32 x 32, float/int row-major) = A (32 x K) * B (K x 32), one warp per 16x16 tile of C:
// block (32, 4). Element (m, k) of A is at a[m * ld + k / 16 * kstep + k % 16], element (k, n)
// of B at b[n * ld + k / 16 * kstep + k % 16] (column-major): ld = K, kstep = 16 is a row-major
// A; ld = 16, kstep = 512 stores A in blocks of 16 k, so that every tile of an 8-bit A starts
// 32-byte aligned (in a row-major one, the tiles along k are 16 bytes apart).
template <typename TI, typename TA>
__global__ void wmma_gemm(const TI* a, const TI* b, TA* c, int K, int ld, int kstep) {
  using namespace nvcuda::wmma;
  const int tile = threadIdx.y, tm = tile / 2, tn = tile % 2;
  fragment<matrix_a, 16, 16, 16, TI, row_major> fa;
  fragment<matrix_b, 16, 16, 16, TI, col_major> fb;
  fragment<accumulator, 16, 16, 16, TA> acc;
  fill_fragment(acc, TA(0));
  for (int k = 0; k < K; k += 16) {
    load_matrix_sync(fa, a + tm * 16 * ld + k / 16 * kstep, ld);
    load_matrix_sync(fb, b + tn * 16 * ld + k / 16 * kstep, ld);
    mma_sync(acc, fa, fb, acc);
  }
  for (int i = 0; i < acc.num_elements; ++i) acc.x[i] = acc.x[i] * TA(2);
  store_matrix_sync(c + tm * 16 * 32 + tn * 16, acc, 32, mem_row_major);
}

// ---- static shared memory: poisoned before every block, wherever it is declared.

// A device function's own `__shared__` array (CUDA counts it in the calling kernel's).
template <typename T>
__device__ T* device_tile() {
  __shared__ T t[33];
  return t;
}

struct alignas(32) Record {  // an aligned struct, as int8_kernels.cu's GemmSmem
  signed char bytes[40];
  int tag;
};

// Thread 0 of each block counts the static shared values that hold the mark an earlier block
// (or launch) left, then marks them all. In CUDA they are undefined at the start of a block:
// the count must be 0.
template <typename T>
__global__ void marks_left(int* stale) {
  __shared__ T own[5];
  __shared__ Record rec;
  T* dev = device_tile<T>();
  if (threadIdx.x != 0) return;
  const T mark = T(7);
  int n = rec.tag == 7;
  for (int i = 0; i < 5; ++i) n += own[i] == mark;
  for (int i = 0; i < 33; ++i) n += dev[i] == mark;
  stale[blockIdx.x] = n;
  rec.tag = 7;
  for (int i = 0; i < 5; ++i) own[i] = mark;
  for (int i = 0; i < 33; ++i) dev[i] = mark;
}

// The minimum over the block by a tree in static shared memory; `racy` leaves out the barrier
// after the stores, as the audit did to value_iteration's reduce kernel. Threads from n on
// hold +inf, so the race reads the upper half before it is written: a NaN there is skipped by
// `<` and a stale +inf (an earlier block's) changes nothing; only a huge negative value shows.
__global__ void block_min(const float* in, int n, float* out, bool racy) {
  __shared__ float s[kN];
  const int t = threadIdx.x;
  s[t] = t < n ? in[t] : INFINITY;
  if (!racy) __syncthreads();
  for (int half = kN / 2; half > 0; half /= 2) {
    if (t < half) s[t] = s[t + half] < s[t] ? s[t + half] : s[t];
    __syncthreads();
  }
  if (t == 0) out[blockIdx.x] = s[0];
}

constexpr int kBig = 10 * 1024;  // floats: 40 KiB of static shared memory

__global__ void big_static(float* out) {
  __shared__ float big[kBig];
  for (int i = threadIdx.x; i < kBig; i += blockDim.x) big[i] = float(i);
  __syncthreads();
  out[threadIdx.x] = big[kBig - 1 - threadIdx.x];
}

__device__ float* device_big() {
  __shared__ float big[kBig];
  return big;
}

__global__ void big_static_in_device_function(float* out) {
  float* big = device_big();
  for (int i = threadIdx.x; i < kBig; i += blockDim.x) big[i] = float(i);
  __syncthreads();
  out[threadIdx.x] = big[kBig - 1 - threadIdx.x];
}

// ---- every lane of a warp in the same warp primitive

// Lanes 0-15 shuffle, lanes 16-31 vote.
__global__ void shuffle_and_ballot(unsigned* out) {
  const int lane = threadIdx.x % 32;
  if (lane < 16) out[threadIdx.x] = unsigned(__shfl_xor_sync(0xffffffffu, lane, 1));
  else out[threadIdx.x] = __ballot_sync(0xffffffffu, 1);
}

// Lanes 0-15 shuffle a double (two 32-bit shuffles in CUDA), lanes 16-31 a float (one).
__global__ void shuffle_sizes_differ(double* out) {
  const int lane = threadIdx.x % 32;
  if (lane < 16) out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, double(lane), 1);
  else out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, float(lane), 1);
}

// The same shuffle at two calls: allowed (shfl.sync is not .aligned); the halves exchange.
__global__ void shuffle_at_two_calls(int* out) {
  const int lane = threadIdx.x % 32;
  if (lane < 16)
    out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, lane, 16);
  else
    out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, lane + 100, 16);
}

// __syncwarp at two calls: allowed.
__global__ void syncwarp_at_two_calls(int* out) {
  if (threadIdx.x % 32 < 16)
    __syncwarp();
  else
    __syncwarp();
  out[threadIdx.x] = 1;
}

// A WMMA call at two calls (wmma.* are .aligned: undefined behaviour).
__global__ void wmma_fill_at_two_calls(float* out) {
  nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, 16, float> acc;
  if (threadIdx.x % 32 < 16)
    nvcuda::wmma::fill_fragment(acc, 1.0f);
  else
    nvcuda::wmma::fill_fragment(acc, 2.0f);
  out[threadIdx.x] = acc.x[0];
}

// Warp 0 waits at one __syncthreads, warp 1 at another (bar.sync is .aligned; CUDA allows
// __syncthreads in conditional code only where the whole block takes the same branch).
__global__ void syncthreads_at_two_calls(int* out) {
  if (threadIdx.x < 32)
    __syncthreads();
  else
    __syncthreads();
  out[threadIdx.x] = 1;
}

// ---- shuffle semantics of PTX shfl.sync for width < 32 and offsets >= 32

struct XorCase {
  int lane_mask, width;
};
constexpr XorCase kXorCases[] = {{16, 16}, {8, 8}, {12, 8}, {24, 4}, {5, 4}, {1, 2}, {31, 16}, {33, 32}};
constexpr int kXorCount = int(sizeof(kXorCases) / sizeof(kXorCases[0]));

// Lane l shuffles 100 + l. Rows of 32 in `out`: the xor cases, then down by 33, up by 34 in
// segments of 16, from lane -3 in segments of 8.
__global__ void shuffle_widths(int* out) {
  const int lane = threadIdx.x;
  for (int c = 0; c < kXorCount; ++c)
    out[c * 32 + lane] = __shfl_xor_sync(0xffffffffu, 100 + lane, kXorCases[c].lane_mask, kXorCases[c].width);
  int* o = out + kXorCount * 32;
  o[lane] = __shfl_down_sync(0xffffffffu, 100 + lane, 33u);
  o[32 + lane] = __shfl_up_sync(0xffffffffu, 100 + lane, 34u, 16);
  o[64 + lane] = __shfl_sync(0xffffffffu, 100 + lane, -3, 8);
}

// ---- WMMA operand rules

// One warp loads a 16x16 half tile from p + offset with ldm; with `split`, lanes 16-31 pass a
// pointer 16 rows further on.
__global__ void wmma_load(const __half* p, int offset, unsigned ldm, bool split, float* out) {
  nvcuda::wmma::fragment<nvcuda::wmma::matrix_a, 16, 16, 16, __half, nvcuda::wmma::row_major> fa;
  const __half* q = p + offset + (split && threadIdx.x >= 16 ? 16 * ldm : 0);
  nvcuda::wmma::load_matrix_sync(fa, q, ldm);
  out[threadIdx.x] = float(fa.x[0]);
}

__global__ void wmma_store(float* p, int offset, unsigned ldm) {
  nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, 16, float> acc;
  nvcuda::wmma::fill_fragment(acc, 1.0f);
  nvcuda::wmma::store_matrix_sync(p + offset, acc, ldm, nvcuda::wmma::mem_row_major);
}

// Buffers for WMMA operands: load_matrix_sync and store_matrix_sync take 32-byte aligned pointers.
template <typename T>
struct Aligned32 {
  using value_type = T;
  Aligned32() = default;
  template <typename U>
  Aligned32(const Aligned32<U>&) {}
  T* allocate(size_t n) { return static_cast<T*>(::operator new(n * sizeof(T), std::align_val_t{32})); }
  void deallocate(T* p, size_t) { ::operator delete(p, std::align_val_t{32}); }
  template <typename U>
  bool operator==(const Aligned32<U>&) const { return true; }
};
template <typename T>
using WmmaBuffer = std::vector<T, Aligned32<T>>;

template <typename... P, typename... A>
cudaError_t launch(void (*k)(P...), dim3 grid, dim3 block, size_t smem, A... args) {
  return FASTPT_SIMT_LAUNCH(k, grid, block, smem, nullptr, args...);
}

bool has(const std::string& s, const char* sub) { return s.find(sub) != std::string::npos; }

void test_race() {
  const int blocks = 3;
  std::vector<float> in(blocks * kN), out(blocks);
  for (int i = 0; i < blocks * kN; ++i) in[i] = float(i % 17) - 4.0f;  // small ints: exact sums
  std::vector<float> ref(blocks, 0.f);
  for (int i = 0; i < blocks * kN; ++i) ref[i / kN] += in[i];
  const std::pair<Order, const char*> orders[] = {
      {Order::kForward, "forward"}, {Order::kReverse, "reverse"}, {Order::kShuffle, "shuffle"}};
  for (auto [order, oname] : orders) {
    fastpt_simt::set_order(order, 7);
    std::fill(out.begin(), out.end(), -1.f);
    cudaError_t e = launch(&block_reduce, blocks, kN, 0, in.data(), out.data(), false);
    expect(std::string("correct_reduction_") + oname, e == cudaSuccess && out == ref);
    e = launch(&block_reduce, blocks, kN, 0, in.data(), out.data(), true);
    const bool caught = e != cudaSuccess || out != ref;
    // The reverse order happens to write every value before it is read: a race needs an
    // order that runs a reader first, which the default (forward) and shuffle orders do.
    if (order != Order::kReverse) expect(std::string("race_caught_") + oname, caught);
  }
  fastpt_simt::set_order(Order::kForward);
}

void test_inter_warp_race() {
  std::vector<float> out(32), ref(32);
  for (int l = 0; l < 32; ++l) ref[l] = float(31 - l);
  fastpt_simt::set_warp_serial(true);
  for (auto [order, oname] : {std::pair{Order::kForward, "forward"}, std::pair{Order::kReverse, "reverse"}}) {
    fastpt_simt::set_order(order);
    std::fill(out.begin(), out.end(), -1.f);
    const cudaError_t e = launch(&warp_handoff, 1, 64, 32 * sizeof(float), out.data(), false);
    expect(std::string("warp_serial_correct_handoff_") + oname, e == cudaSuccess && out == ref);
  }
  // In reverse order the reader's warp (1) is the first ready one, so it runs first.
  const cudaError_t e = launch(&warp_handoff, 1, 64, 32 * sizeof(float), out.data(), true);
  expect("inter_warp_race_caught_warp_serial", e != cudaSuccess || out != ref);
  fastpt_simt::set_warp_serial(false);
  fastpt_simt::set_order(Order::kForward);
}

void test_warp_ops() {
  const int blocks = 2, threads = 64;
  std::vector<int> out(blocks * threads * 6, -1);
  const cudaError_t e = launch(&warp_ops, blocks, threads, 0, out.data());
  bool ok = e == cudaSuccess;
  for (int blk = 0; blk < blocks && ok; ++blk)
    for (int t = 0; t < threads; ++t) {
      const int lane = t % 32, w = t / 32, base = (blk + 1) * 1000 + w * 100;
      const int* o = &out[(blk * threads + t) * 6];
      int sum = 0, scan = 0;
      for (int l = 0; l < 32; ++l) sum += base + l;
      for (int l = 0; l <= lane; ++l) scan += base + l;
      unsigned bal = 0;
      for (int l = 0; l < 32; l += 3) bal |= 1u << l;
      const int partner = base + (lane ^ 1);
      ok = ok && o[0] == sum && o[1] == (lane == 0 ? sum : 0) && o[2] == scan &&
           o[3] == base + 7 && unsigned(o[4]) == bal && o[5] == 2 * partner + 1;
    }
  expect("warp_primitives_exact", ok);
  std::vector<float> f(64, -1);
  const cudaError_t e2 = launch(&warp_sum_kernel, 1, 64, 0, f.data());
  bool ok2 = e2 == cudaSuccess;
  for (int t = 0; t < 64; ++t) ok2 = ok2 && f[t] == float((t / 32) * 32 * 32 + 496);
  expect("warp_sum_exact", ok2);
}

void test_errors() {
  std::vector<int> io(256, 0);
  std::vector<float> f(256, 0);
  cudaError_t e = launch(&early_exit, 1, 64, 0, io.data());
  std::string m = fastpt_simt::last_error_message();
  expect("early_exit_at_barrier_is_error", e == cudaErrorLaunchFailure && has(m, "exited"), m);
  e = launch(&warp_sum_kernel, 1, 48, 0, f.data());
  m = fastpt_simt::last_error_message();
  expect("partial_warp_block_is_error", e == cudaErrorLaunchFailure && has(m, "partial warp"), m);
  e = launch(&lane_exit_then_shuffle, 1, 64, 0, f.data());
  m = fastpt_simt::last_error_message();
  expect("exited_lane_shuffle_is_error", e == cudaErrorLaunchFailure && has(m, "partial warp"), m);
  e = launch(&partial_mask, 1, 32, 0, f.data());
  m = fastpt_simt::last_error_message();
  expect("non_full_mask_is_error", e == cudaErrorLaunchFailure && has(m, "full mask"), m);
  e = launch(&divergent_barriers, 1, 64, 0, io.data());
  m = fastpt_simt::last_error_message();
  expect("divergent_barriers_is_error", e == cudaErrorLaunchFailure && has(m, "deadlock"), m);
  e = launch(&early_exit, 1, 2048, 0, io.data());
  expect("bad_block_size_is_config_error", e == cudaErrorInvalidConfiguration);
  // a good launch after errors still works
  e = launch(&warp_sum_kernel, 1, 32, 0, f.data());
  expect("launch_after_errors_ok", e == cudaSuccess && f[0] == 496.f);
}

void test_indices_smem_atomics() {
  const dim3 grid(2, 3, 2), block(4, 2, 5);
  std::vector<int> hits(12 * 40, 0);
  cudaError_t e = launch(&indices_3d, grid, block, 0, hits.data());
  expect("indices_3d_each_thread_once",
         e == cudaSuccess && std::all_of(hits.begin(), hits.end(), [](int h) { return h == 1; }));
  const int blocks = 3, threads = 96;
  std::vector<float> in(blocks * threads), out(blocks * threads, -1);
  for (int i = 0; i < blocks * threads; ++i) in[i] = float(i);
  e = launch(&smem_kernel, blocks, threads, threads * sizeof(float), in.data(), out.data());
  bool ok = e == cudaSuccess;
  for (int b = 0; b < blocks; ++b)
    for (int t = 0; t < threads; ++t)
      ok = ok && out[b * threads + t] == in[b * threads + threads - 1 - t] + 1000.f * b;
  expect("static_and_dynamic_smem", ok);
  float fs = 0; int is = 0, mx = -1; double ds = 0;
  e = launch(&atomics, 5, 64, 0, &fs, &is, &ds, &mx);
  expect("atomics", e == cudaSuccess && fs == 160.f && is == 320 && ds == 80.0 && mx == 319);
  e = FASTPT_SIMT_LAUNCH(&no_args, 2, 32, 0, nullptr);
  expect("kernel_without_arguments", e == cudaSuccess);
}

template <typename T>
bool no_marks_left(const char* type, std::string& bad) {
  std::vector<int> stale(4, -1);
  bool ok = true;
  for (int run = 0; run < 2; ++run) {  // the second launch must not see the first's marks either
    const cudaError_t e = launch(&marks_left<T>, 4, 32, 0, stale.data());
    ok = ok && e == cudaSuccess && std::all_of(stale.begin(), stale.end(), [](int n) { return n == 0; });
  }
  if (!ok) bad += std::string(bad.empty() ? "" : ", ") + type;
  return ok;
}

void test_static_smem() {
  std::string bad;
  bool ok = no_marks_left<float>("float", bad);
  ok &= no_marks_left<double>("double", bad);
  ok &= no_marks_left<__half>("half", bad);
  ok &= no_marks_left<int>("int", bad);
  ok &= no_marks_left<signed char>("int8", bad);
  expect("static_smem_poisoned_each_block", ok, bad.empty() ? "" : "earlier marks seen: " + bad);

  std::vector<float> in(kN), out(3);
  for (int i = 0; i < kN; ++i) in[i] = float((i * 37) % 101) + 1.0f;
  const int n = kN / 2;
  const float ref = *std::min_element(in.begin(), in.begin() + n);
  cudaError_t e = launch(&block_min, 3, kN, 0, in.data(), n, out.data(), false);
  auto all_ref = [&] { return std::all_of(out.begin(), out.end(), [&](float v) { return v == ref; }); };
  expect("static_smem_min_correct", e == cudaSuccess && all_ref());
  // three blocks: one of them gets the huge negative poison
  e = launch(&block_min, 3, kN, 0, in.data(), n, out.data(), true);
  expect("static_smem_min_race_caught", e != cudaSuccess || !all_ref());

  std::vector<float> f(128, -1);
  e = launch(&big_static, 2, 128, 0, f.data());
  const bool fits = e == cudaSuccess && f[0] == float(kBig - 1);
  e = launch(&big_static, 2, 128, 16 * 1024, f.data());
  std::string m = fastpt_simt::last_error_message();
  expect("static_smem_counted_in_limit", fits && e == cudaErrorInvalidConfiguration && has(m, "static"), m);
  e = launch(&big_static_in_device_function, 2, 128, 16 * 1024, f.data());
  m = fastpt_simt::last_error_message();
  expect("device_function_static_smem_counted_in_limit",
         e == cudaErrorInvalidConfiguration && has(m, "static"), m);
}

// Launches from two OS threads at once, of a kernel with static shared memory (one copy in
// the process): they must not mix (the emulator runs one launch at a time).
void test_concurrent_launches() {
  auto reduce_many = [](float offset, bool* ok) {
    const int blocks = 3;
    std::vector<float> in(blocks * kN), out(blocks);
    for (int i = 0; i < blocks * kN; ++i) in[i] = float(i % 7) + offset;
    std::vector<float> ref(blocks, 0.f);
    for (int i = 0; i < blocks * kN; ++i) ref[i / kN] += in[i];
    *ok = true;
    for (int r = 0; r < 100 && *ok; ++r)
      *ok = launch(&block_reduce, blocks, kN, 0, in.data(), out.data(), false) == cudaSuccess && out == ref;
  };
  bool ok1 = false, ok2 = false;
  std::thread t1(reduce_many, 1.0f, &ok1), t2(reduce_many, 100.0f, &ok2);
  t1.join();
  t2.join();
  expect("concurrent_launches_serialized", ok1 && ok2);
}

void test_warp_sites() {
  std::vector<unsigned> u(64);
  cudaError_t e = launch(&shuffle_and_ballot, 1, 64, 0, u.data());
  std::string m = fastpt_simt::last_error_message();
  expect("mixed_warp_primitives_is_error",
         e == cudaErrorLaunchFailure && has(m, "different warp primitives"), m);
  std::vector<double> d(64);
  e = launch(&shuffle_sizes_differ, 1, 64, 0, d.data());
  m = fastpt_simt::last_error_message();
  expect("shuffle_sizes_differ_is_error", e == cudaErrorLaunchFailure && has(m, "operand sizes"), m);
  std::vector<int> io(64, -1);
  e = launch(&shuffle_at_two_calls, 1, 64, 0, io.data());
  bool ok = e == cudaSuccess;
  for (int t = 0; t < 64; ++t) ok = ok && io[t] == (t % 32 < 16 ? (t % 32) + 16 + 100 : (t % 32) - 16);
  expect("same_shuffle_at_two_calls_ok", ok);
  e = launch(&syncwarp_at_two_calls, 1, 64, 0, io.data());
  expect("syncwarp_at_two_calls_ok", e == cudaSuccess);
  std::vector<float> f(64);
  e = launch(&wmma_fill_at_two_calls, 1, 64, 0, f.data());
  m = fastpt_simt::last_error_message();
  expect("wmma_at_two_calls_is_error", e == cudaErrorLaunchFailure && has(m, "different calls"), m);
  e = launch(&syncthreads_at_two_calls, 1, 64, 0, io.data());
  m = fastpt_simt::last_error_message();
  expect("syncthreads_at_two_calls_is_error",
         e == cudaErrorLaunchFailure && has(m, "__syncthreads reached at different calls"), m);
}

// The source lane of shfl.sync.bfly, written out by segments: lane ^ mask (mask modulo 32)
// when that lane's segment of `width` lanes is the caller's or an earlier one, else the caller.
int xor_source(int lane, int lane_mask, int width) {
  const int partner = lane ^ (lane_mask % 32);
  return partner / width <= lane / width ? partner : lane;
}

void test_shuffle_widths() {
  std::vector<int> out((kXorCount + 3) * 32, -1);
  const cudaError_t e = launch(&shuffle_widths, 1, 32, 0, out.data());
  bool ok = e == cudaSuccess;
  for (int c = 0; c < kXorCount; ++c)
    for (int l = 0; l < 32; ++l)
      ok = ok && out[c * 32 + l] == 100 + xor_source(l, kXorCases[c].lane_mask, kXorCases[c].width);
  // by hand: width 16, mask 16: lane 20 reads lane 4, lane 4 keeps its own (lane 20 is later);
  // width 8, mask 12: lane 13 reads lane 1, lane 3 keeps its own; mask 33 is mask 1.
  ok = ok && out[0 * 32 + 20] == 104 && out[0 * 32 + 4] == 104 && out[2 * 32 + 13] == 101 &&
       out[2 * 32 + 3] == 103 && out[7 * 32 + 0] == 101;
  expect("shfl_xor_width_ptx", ok);
  const int* o = out.data() + kXorCount * 32;
  bool ok2 = e == cudaSuccess;
  for (int l = 0; l < 32; ++l) {
    ok2 = ok2 && o[l] == 100 + (l + 1 <= 31 ? l + 1 : l);                   // down 33: b[4:0] = 1
    ok2 = ok2 && o[32 + l] == 100 + (l % 16 >= 2 ? l - 2 : l);             // up 34: 2, in segments of 16
    ok2 = ok2 && o[64 + l] == 100 + (l / 8 * 8 + 5);                       // lane -3 of 8: lane 5
  }
  expect("shfl_offsets_modulo_32", ok2);
}

void test_wmma_operands() {
  WmmaBuffer<__half> h(64 * 32, __half(1.0f));
  WmmaBuffer<float> f(64 * 32, 0.0f);
  std::vector<float> out(32);
  cudaError_t e = launch(&wmma_load, 1, 32, 0, h.data(), 0, 32u, false, out.data());
  bool ok = e == cudaSuccess;
  e = launch(&wmma_load, 1, 32, 0, h.data(), 16, 24u, false, out.data());  // 8 x 3 elements
  ok = ok && e == cudaSuccess;
  e = launch(&wmma_store, 1, 32, 0, f.data(), 8, 20u);  // 32 bytes in, ldm 80 bytes
  ok = ok && e == cudaSuccess && f[8] == 1.0f;
  expect("wmma_operands_ok", ok, ok ? "" : fastpt_simt::last_error_message());
  e = launch(&wmma_load, 1, 32, 0, h.data(), 8, 32u, false, out.data());  // 16 bytes in
  std::string m = fastpt_simt::last_error_message();
  const bool load_caught = e == cudaErrorLaunchFailure && has(m, "32-byte");
  e = launch(&wmma_store, 1, 32, 0, f.data(), 4, 16u);
  m += "; " + fastpt_simt::last_error_message();
  expect("wmma_misaligned_pointer_is_error",
         load_caught && e == cudaErrorLaunchFailure && has(m, "32-byte"), m);
  e = launch(&wmma_load, 1, 32, 0, h.data(), 0, 20u, false, out.data());  // 40 bytes
  m = fastpt_simt::last_error_message();
  const bool ldm_caught = e == cudaErrorLaunchFailure && has(m, "multiple of 16 bytes");
  e = launch(&wmma_store, 1, 32, 0, f.data(), 0, 18u);  // 72 bytes
  m += "; " + fastpt_simt::last_error_message();
  expect("wmma_bad_ldm_is_error",
         ldm_caught && e == cudaErrorLaunchFailure && has(m, "multiple of 16 bytes"), m);
  e = launch(&wmma_load, 1, 32, 0, h.data(), 0, 32u, true, out.data());
  m = fastpt_simt::last_error_message();
  expect("wmma_lanes_different_pointers_is_error",
         e == cudaErrorLaunchFailure && has(m, "different pointers"), m);
}

template <typename TI, typename TA>
void test_wmma(const char* what, int K, bool k_blocks) {
  const int ld = k_blocks ? 16 : K, kstep = k_blocks ? 32 * 16 : 16;
  auto at = [=](int row, int k) { return row * ld + k / 16 * kstep + k % 16; };  // row: m of A, n of B
  WmmaBuffer<TI> a(32 * K), b(32 * K);
  std::vector<double> ref(32 * 32, 0);
  for (int i = 0; i < 32 * K; ++i) {
    if constexpr (std::is_integral_v<TI>) {
      a[i] = TI((i * 37 % 255) - 127);
      b[i] = TI((i * 91 % 251) - 125);
    } else {
      a[i] = TI(float((i * 37 % 61) - 30) / 16.f);
      b[i] = TI(float((i * 91 % 53) - 26) / 8.f);
    }
  }
  auto val = [](TI v) { return std::is_integral_v<TI> ? double(v) : double(float(v)); };
  for (int m = 0; m < 32; ++m)
    for (int n = 0; n < 32; ++n) {
      for (int k = 0; k < K; ++k) ref[m * 32 + n] += val(a[at(m, k)]) * val(b[at(n, k)]);
      ref[m * 32 + n] *= 2;
    }
  WmmaBuffer<TA> c(32 * 32, TA(-1));
  const cudaError_t e =
      launch(&wmma_gemm<TI, TA>, 1, dim3(32, 4), 0, a.data(), b.data(), c.data(), K, ld, kstep);
  double err = 0, scale = 0;
  for (int i = 0; i < 32 * 32; ++i) {
    err = std::max(err, std::abs(double(c[i]) - ref[i]));
    scale = std::max(scale, std::abs(ref[i]));
  }
  // inputs are exact multiples of 1/16 (1/8): the float sums are exact too
  expect(std::string("wmma_") + what, e == cudaSuccess && err == 0 && scale > 0,
         e == cudaSuccess ? "max err " + std::to_string(err) : fastpt_simt::last_error_message());
}

}  // namespace

int main() {
  test_race();
  test_inter_warp_race();
  test_warp_ops();
  test_errors();
  test_indices_smem_atomics();
  test_static_smem();
  test_concurrent_launches();
  test_warp_sites();
  test_shuffle_widths();
  test_wmma_operands();
  test_wmma<__half, float>("f16", 48, false);
  test_wmma<__nv_bfloat16, float>("bf16", 32, false);
  test_wmma<signed char, int>("s8", 64, true);
  std::printf("%d selftests, %d failures\n", total, failures);
  return failures != 0;
}
