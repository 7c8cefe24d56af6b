// Self-tests of the SIMT emulator (testing/simt.h): a racy kernel must give a wrong result,
// shared memory must not keep what an earlier block wrote, warp primitives must be exact (PTX
// shfl.sync semantics), barrier and warp-primitive misuse must come back as a launch error
// (never a hang), WMMA must match a reference matmul and check CUDA's rules for its operands.
// Prints "SELFTEST <name> ok|FAIL" per test and "<N> selftests, <F> failures"; exit status 1 on
// any failure.
// This file holds main and the tests of execution, warp primitives and errors; the static
// shared memory tests are in simt_selftest_static_smem.cpp, the WMMA ones in
// simt_selftest_wmma.cpp, what they share in simt_selftest.h.
// Built and run by tests/test_cuda_emulated.py (g++ -std=c++20 -DFASTPT_SIMT_EMULATOR -I csrc
// csrc/testing/simt_selftest*.cpp).
#include "testing/simt_selftest.h"

#include <algorithm>
#include <cstdio>
#include <string>
#include <thread>
#include <vector>

using fastpt_simt::Order;

namespace simt_selftest {

int total = 0, failures = 0;
void expect(const std::string& name, bool ok, const std::string& detail) {
  ++total;
  if (!ok) ++failures;
  std::printf("SELFTEST %s %s%s%s\n", name.c_str(), ok ? "ok" : "FAIL", detail.empty() ? "" : ": ",
              detail.c_str());
}

namespace {

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

}  // namespace
}  // namespace simt_selftest

int main() {
  using namespace simt_selftest;
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
  test_wmma_products();
  std::printf("%d selftests, %d failures\n", total, failures);
  return failures != 0;
}
