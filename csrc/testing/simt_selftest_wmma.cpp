// SIMT emulator self-tests of WMMA (nvcuda::wmma): products of f16, bf16 and s8 tiles against a
// reference matmul, and CUDA's rules for the load and store operands (alignment, ldm, the same
// pointer in every lane).
#include "testing/simt_selftest.h"

#include <algorithm>
#include <cmath>
#include <new>
#include <string>
#include <type_traits>
#include <vector>

namespace simt_selftest {
namespace {

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

void test_wmma_products() {
  test_wmma<__half, float>("f16", 48, false);
  test_wmma<__nv_bfloat16, float>("bf16", 32, false);
  test_wmma<signed char, int>("s8", 64, true);
}

}  // namespace simt_selftest
