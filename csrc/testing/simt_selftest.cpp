// Self-tests of the SIMT emulator (testing/simt.h): a racy kernel must give a wrong result,
// warp primitives must be exact, barrier misuse must come back as a launch error (never a
// hang), WMMA must match a reference matmul. Prints "SELFTEST <name> ok|FAIL" per test and
// "<N> selftests, <F> failures"; exit status 1 on any failure.
// Built and run by tests/test_cuda_emulated.py (g++ -std=c++20 -DFASTPT_SIMT_EMULATOR -I csrc).
#include "common/cuda_compat.h"

#include <cstdio>
#include <string>
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
  float* s = fastpt::cuda::dynamic_smem<float>();  // NaN before each block (static smem keeps old values)
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

// Static smem starts as garbage per block in CUDA; here it persists across blocks, so every
// block writes before reading. Dynamic smem: one float per thread, reversed through it.
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

// C (32 x 32, float/int row-major) = A (32 x K row-major) * B (K x 32 col-major), one warp
// per 16x16 tile of C: block (32, 4).
template <typename TI, typename TA>
__global__ void wmma_gemm(const TI* a, const TI* b, TA* c, int K) {
  using namespace nvcuda::wmma;
  const int tile = threadIdx.y, tm = tile / 2, tn = tile % 2;
  fragment<matrix_a, 16, 16, 16, TI, row_major> fa;
  fragment<matrix_b, 16, 16, 16, TI, col_major> fb;
  fragment<accumulator, 16, 16, 16, TA> acc;
  fill_fragment(acc, TA(0));
  for (int k = 0; k < K; k += 16) {
    load_matrix_sync(fa, a + tm * 16 * K + k, K);
    load_matrix_sync(fb, b + tn * 16 * K + k, K);
    mma_sync(acc, fa, fb, acc);
  }
  for (int i = 0; i < acc.num_elements; ++i) acc.x[i] = acc.x[i] * TA(2);
  store_matrix_sync(c + tm * 16 * 32 + tn * 16, acc, 32, mem_row_major);
}

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

template <typename TI, typename TA>
void test_wmma(const char* what, int K) {
  std::vector<TI> a(32 * K), b(32 * K);  // b: column j of B at b[j * K + k]
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
      for (int k = 0; k < K; ++k) ref[m * 32 + n] += val(a[m * K + k]) * val(b[n * K + k]);
      ref[m * 32 + n] *= 2;
    }
  std::vector<TA> c(32 * 32, TA(-1));
  const cudaError_t e = launch(&wmma_gemm<TI, TA>, 1, dim3(32, 4), 0, a.data(), b.data(), c.data(), K);
  double err = 0, scale = 0;
  for (int i = 0; i < 32 * 32; ++i) {
    err = std::max(err, std::abs(double(c[i]) - ref[i]));
    scale = std::max(scale, std::abs(ref[i]));
  }
  // inputs are exact multiples of 1/16 (1/8): the float sums are exact too
  expect(std::string("wmma_") + what, e == cudaSuccess && err == 0 && scale > 0,
         "max err " + std::to_string(err));
}

}  // namespace

int main() {
  test_race();
  test_inter_warp_race();
  test_warp_ops();
  test_errors();
  test_indices_smem_atomics();
  test_wmma<__half, float>("f16", 48);
  test_wmma<__nv_bfloat16, float>("bf16", 32);
  test_wmma<signed char, int>("s8", 64);
  std::printf("%d selftests, %d failures\n", total, failures);
  return failures != 0;
}
