// SIMT emulator self-tests of static shared memory: poisoned before every block wherever it is
// declared (kernel, device function, template, aligned struct), a race a poison byte shows, and
// the bytes counted against the per-block limit.
#include "testing/simt_selftest.h"

#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

namespace simt_selftest {
namespace {

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

}  // namespace

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

}  // namespace simt_selftest
