// WMMA (nvcuda::wmma) for the SIMT emulator, included by simt.h. Shapes 16x16x16 only;
// A/B in __half, __nv_bfloat16 (accumulator float) or signed/unsigned char (accumulator int).
// Every lane holds the whole tile (num_elements = rows * cols), so the element-to-lane
// mapping differs from the hardware's (which CUDA leaves unspecified anyway): element-wise
// loops over frag.x[i] work, code that assumes a particular mapping does not. Each call is a
// warp-collective: all 32 lanes must make it, at the same call (PTX wmma.* are .aligned), and
// loads and stores check CUDA's rules for their operands (check_matrix_operand).
// The products are summed in float (int32 for int8) in k order, not in the tensor core's
// order, so float results can differ from a GPU's in the last bits.
#pragma once

#include <cstdio>

namespace nvcuda {
namespace wmma {

struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };

namespace detail {
template <typename Use, int M, int N, int K>
struct dims;
template <int M, int N, int K>
struct dims<matrix_a, M, N, K> { static constexpr int rows = M, cols = K; };
template <int M, int N, int K>
struct dims<matrix_b, M, N, K> { static constexpr int rows = K, cols = N; };
template <int M, int N, int K>
struct dims<accumulator, M, N, K> { static constexpr int rows = M, cols = N; };
template <typename L>
constexpr bool is_col_major() { return std::is_same_v<L, col_major>; }

using std::source_location;

// The CUDA C++ Programming Guide's rules for load_matrix_sync and store_matrix_sync: "mptr must
// be a 256-bit aligned pointer", "ldm ... must be a multiple of 8 for __half element type or
// multiple of 4 for float element type (i.e., multiple of 16 bytes in both cases)": 16 bytes
// for every element type here (16 elements of 8-bit types, 4 of int). Broken: an error of the
// launch, as a misaligned access would be on the GPU (or a silently wrong tile).
template <typename T>
void check_matrix_operand(const char* what, const T* p, unsigned ldm, const source_location& loc) {
  const std::string at = std::string(what) + " at " + fastpt_simt::where(loc) + ": ";
  if (reinterpret_cast<uintptr_t>(p) % 32 != 0) {
    char addr[32];
    std::snprintf(addr, sizeof addr, "%p", static_cast<const void*>(p));
    throw fastpt_simt::Error(at + "pointer " + addr + " is not 256-bit (32-byte) aligned");
  }
  if (ldm * sizeof(T) % 16 != 0)
    throw fastpt_simt::Error(at + "ldm " + std::to_string(ldm) + " is not a multiple of 16 bytes (" +
                             std::to_string(16 / sizeof(T)) + " elements of " + std::to_string(sizeof(T)) +
                             " bytes)");
}

// The warp barrier of a WMMA call. Loads and stores: every lane must pass the same pointer, ldm
// and layout (compared when the warp is released).
inline void wmma_barrier(const char* what, const source_location& loc, const void* p = nullptr,
                         unsigned ldm = 0, int layout = 0) {
  const uint64_t ldm_layout = (uint64_t(unsigned(layout)) << 32) | ldm;
  fastpt_simt::warp_barrier(fastpt_simt::Site{what, loc, true, {reinterpret_cast<uintptr_t>(p), ldm_layout}},
                            0xffffffffu);
}
}  // namespace detail

template <typename Use, int M, int N, int K, typename T, typename Layout = void>
struct fragment {
  static_assert(M == 16 && N == 16 && K == 16, "the emulator supports 16x16x16 WMMA only");
  static constexpr int rows = detail::dims<Use, M, N, K>::rows;
  static constexpr int cols = detail::dims<Use, M, N, K>::cols;
  static constexpr int num_elements = rows * cols;
  using element_type = T;
  T x[num_elements];  // row-major tile
};

template <typename Use, int M, int N, int K, typename T, typename L, typename V>
inline void fill_fragment(fragment<Use, M, N, K, T, L>& f, const V& v,
                          std::source_location loc = std::source_location::current()) {
  detail::wmma_barrier("wmma::fill_fragment", loc);
  for (int i = 0; i < f.num_elements; ++i) f.x[i] = static_cast<T>(v);
}

// A / B: the layout is the fragment's.
template <typename Use, int M, int N, int K, typename T, typename L>
inline void load_matrix_sync(fragment<Use, M, N, K, T, L>& f, const T* p, unsigned ldm,
                             std::source_location loc = std::source_location::current()) {
  static_assert(!std::is_same_v<Use, accumulator>, "accumulator loads take a layout_t");
  constexpr const char* what = "wmma::load_matrix_sync";
  detail::check_matrix_operand(what, p, ldm, loc);
  detail::wmma_barrier(what, loc, p, ldm);
  constexpr bool col = detail::is_col_major<L>();
  for (int r = 0; r < f.rows; ++r)
    for (int c = 0; c < f.cols; ++c) f.x[r * f.cols + c] = col ? p[c * ldm + r] : p[r * ldm + c];
  detail::wmma_barrier(what, loc, p, ldm);
}

template <int M, int N, int K, typename T>
inline void load_matrix_sync(fragment<accumulator, M, N, K, T, void>& f, const T* p, unsigned ldm,
                             layout_t layout, std::source_location loc = std::source_location::current()) {
  constexpr const char* what = "wmma::load_matrix_sync";
  detail::check_matrix_operand(what, p, ldm, loc);
  detail::wmma_barrier(what, loc, p, ldm, layout);
  for (int r = 0; r < f.rows; ++r)
    for (int c = 0; c < f.cols; ++c)
      f.x[r * f.cols + c] = layout == mem_col_major ? p[c * ldm + r] : p[r * ldm + c];
  detail::wmma_barrier(what, loc, p, ldm, layout);
}

template <int M, int N, int K, typename T>
inline void store_matrix_sync(T* p, const fragment<accumulator, M, N, K, T, void>& f, unsigned ldm,
                              layout_t layout, std::source_location loc = std::source_location::current()) {
  constexpr const char* what = "wmma::store_matrix_sync";
  detail::check_matrix_operand(what, p, ldm, loc);
  detail::wmma_barrier(what, loc, p, ldm, layout);
  // Every lane holds the same tile; lane 0 writes it, the others wait for it.
  if (fastpt_simt::linear_tid() % 32 == 0)
    for (int r = 0; r < f.rows; ++r)
      for (int c = 0; c < f.cols; ++c)
        (layout == mem_col_major ? p[c * ldm + r] : p[r * ldm + c]) = f.x[r * f.cols + c];
  detail::wmma_barrier(what, loc, p, ldm, layout);
}

namespace detail {
template <typename Acc, typename T>
inline Acc widen(T v) {
  if constexpr (std::is_integral_v<T>) return static_cast<Acc>(v);
  else return static_cast<Acc>(static_cast<float>(v));
}
}  // namespace detail

template <int M, int N, int K, typename TA, typename LA, typename TB, typename LB, typename TC>
inline void mma_sync(fragment<accumulator, M, N, K, TC, void>& d,
                     const fragment<matrix_a, M, N, K, TA, LA>& a,
                     const fragment<matrix_b, M, N, K, TB, LB>& b,
                     const fragment<accumulator, M, N, K, TC, void>& c,
                     std::source_location loc = std::source_location::current()) {
  static_assert(std::is_same_v<TA, TB>, "A and B must have the same element type");
  static_assert((std::is_integral_v<TA> && std::is_same_v<TC, int>) ||
                    (!std::is_integral_v<TA> && std::is_same_v<TC, float>),
                "accumulators: float for half/bf16, int for int8");
  detail::wmma_barrier("wmma::mma_sync", loc);
  TC out[M * N];
  for (int i = 0; i < M; ++i)
    for (int j = 0; j < N; ++j) {
      TC s = c.x[i * N + j];
      for (int k = 0; k < K; ++k)
        s += detail::widen<TC>(a.x[i * K + k]) * detail::widen<TC>(b.x[k * N + j]);
      out[i * N + j] = s;
    }
  for (int i = 0; i < M * N; ++i) d.x[i] = out[i];
  detail::wmma_barrier("wmma::mma_sync", loc);
}

}  // namespace wmma
}  // namespace nvcuda
