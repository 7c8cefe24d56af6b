// WMMA (nvcuda::wmma) for the SIMT emulator, included by simt.h. Shapes 16x16x16 only;
// A/B in __half, __nv_bfloat16 (accumulator float) or signed/unsigned char (accumulator int).
// Every lane holds the whole tile (num_elements = rows * cols), so the element-to-lane
// mapping differs from the hardware's (which CUDA leaves unspecified anyway): element-wise
// loops over frag.x[i] work, code that assumes a particular mapping does not. Each call is a
// warp-collective: all 32 lanes must make it (checked like a full-mask __syncwarp).
// The products are summed in float (int32 for int8) in k order, not in the tensor core's
// order, so float results can differ from a GPU's in the last bits.
#pragma once

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
inline void fill_fragment(fragment<Use, M, N, K, T, L>& f, const V& v) {
  fastpt_simt::warp_barrier("wmma::fill_fragment", 0xffffffffu);
  for (int i = 0; i < f.num_elements; ++i) f.x[i] = static_cast<T>(v);
}

// A / B: the layout is the fragment's.
template <typename Use, int M, int N, int K, typename T, typename L>
inline void load_matrix_sync(fragment<Use, M, N, K, T, L>& f, const T* p, unsigned ldm) {
  static_assert(!std::is_same_v<Use, accumulator>, "accumulator loads take a layout_t");
  fastpt_simt::warp_barrier("wmma::load_matrix_sync", 0xffffffffu);
  constexpr bool col = detail::is_col_major<L>();
  for (int r = 0; r < f.rows; ++r)
    for (int c = 0; c < f.cols; ++c) f.x[r * f.cols + c] = col ? p[c * ldm + r] : p[r * ldm + c];
  fastpt_simt::warp_barrier("wmma::load_matrix_sync", 0xffffffffu);
}

template <int M, int N, int K, typename T>
inline void load_matrix_sync(fragment<accumulator, M, N, K, T, void>& f, const T* p, unsigned ldm,
                             layout_t layout) {
  fastpt_simt::warp_barrier("wmma::load_matrix_sync", 0xffffffffu);
  for (int r = 0; r < f.rows; ++r)
    for (int c = 0; c < f.cols; ++c)
      f.x[r * f.cols + c] = layout == mem_col_major ? p[c * ldm + r] : p[r * ldm + c];
  fastpt_simt::warp_barrier("wmma::load_matrix_sync", 0xffffffffu);
}

template <int M, int N, int K, typename T>
inline void store_matrix_sync(T* p, const fragment<accumulator, M, N, K, T, void>& f, unsigned ldm,
                              layout_t layout) {
  fastpt_simt::warp_barrier("wmma::store_matrix_sync", 0xffffffffu);
  // Every lane holds the same tile; lane 0 writes it, the others wait for it.
  if (fastpt_simt::linear_tid() % 32 == 0)
    for (int r = 0; r < f.rows; ++r)
      for (int c = 0; c < f.cols; ++c)
        (layout == mem_col_major ? p[c * ldm + r] : p[r * ldm + c]) = f.x[r * f.cols + c];
  fastpt_simt::warp_barrier("wmma::store_matrix_sync", 0xffffffffu);
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
                     const fragment<accumulator, M, N, K, TC, void>& c) {
  static_assert(std::is_same_v<TA, TB>, "A and B must have the same element type");
  static_assert((std::is_integral_v<TA> && std::is_same_v<TC, int>) ||
                    (!std::is_integral_v<TA> && std::is_same_v<TC, float>),
                "accumulators: float for half/bf16, int for int8");
  fastpt_simt::warp_barrier("wmma::mma_sync", 0xffffffffu);
  TC out[M * N];
  for (int i = 0; i < M; ++i)
    for (int j = 0; j < N; ++j) {
      TC s = c.x[i * N + j];
      for (int k = 0; k < K; ++k)
        s += detail::widen<TC>(a.x[i * K + k]) * detail::widen<TC>(b.x[k * N + j]);
      out[i * N + j] = s;
    }
  for (int i = 0; i < M * N; ++i) d.x[i] = out[i];
  fastpt_simt::warp_barrier("wmma::mma_sync", 0xffffffffu);
}

}  // namespace wmma
}  // namespace nvcuda
