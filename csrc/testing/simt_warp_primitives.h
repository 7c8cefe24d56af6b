// SIMT emulator, barriers and warp primitives: __syncthreads, __syncwarp, the shuffles with
// PTX shfl.sync's source lanes, and the votes, each a switch point of the calling fiber (full
// masks only). Included by simt.h only.
#pragma once

#include <cstdint>
#include <cstring>
#include <source_location>
#include <type_traits>

#include "testing/simt_block.h"

namespace fastpt_simt {

// ---- warp exchange: write own slot, warp barrier, read, warp barrier.
template <typename T, typename SrcFn>
T warp_exchange(const char* what, unsigned mask, T v, SrcFn src_lane, std::source_location loc) {
  static_assert(sizeof(T) <= 8 && std::is_trivially_copyable_v<T>, "shuffle of a type > 8 bytes");
  check_in_kernel(what);
  const int lin = linear_tid(), lane = lin % 32, base = lin - lane;
  uint64_t bits = 0;
  std::memcpy(&bits, &v, sizeof(T));
  g_block->xchg[lin] = bits;
  // CUDA shuffles 8-byte types as two 32-bit shuffles: every lane must move as many bytes.
  const Site site{what, loc, false, {sizeof(T), 0}};
  warp_barrier(site, mask);
  const int src = src_lane(lane);
  T r;
  std::memcpy(&r, &g_block->xchg[base + src], sizeof(T));
  warp_barrier(site, mask);
  return r;
}

// The 32 lanes' predicates (vote.sync: ballot, any and all are different primitives).
inline unsigned vote(const char* what, unsigned mask, int pred, std::source_location loc) {
  check_in_kernel(what);
  const int lin = linear_tid(), lane = lin % 32, base = lin - lane;
  g_block->xchg[lin] = pred != 0;
  const Site site{what, loc, false, {0, 0}};
  warp_barrier(site, mask);
  unsigned r = 0;
  for (int l = 0; l < 32; ++l) r |= (g_block->xchg[base + l] ? 1u : 0u) << l;
  warp_barrier(site, mask);
  return r;
}

inline void check_width(int width) {
  if (width < 1 || width > 32 || (width & (width - 1)) != 0)
    throw Error("shuffle width must be a power of two <= 32");
}

// The source lanes of shfl.sync (PTX ISA) with the clamp operand c that CUDA's __shfl_*_sync
// pass for `width`: c = ((32 - width) << 8) | 0x1f (idx, down, bfly) or (32 - width) << 8 (up).
// segmask = 32 - width selects the lane's segment; maxLane = segment start | (c & 0x1f &
// ~segmask): the segment's last lane (idx, down, bfly), its first (up). b is used modulo 32
// (b[4:0]). A lane whose source is out of range (pval false) gets its own value.
inline int segment_start(int lane, int width) { return lane & ~(width - 1); }
inline int shfl_idx_src(int lane, int src, int width) {  // j = minLane | (b & ~segmask)
  return segment_start(lane, width) | (src & 31 & (width - 1));
}
inline int shfl_down_src(int lane, unsigned delta, int width) {  // j = lane + b, pval = j <= maxLane
  const int j = lane + static_cast<int>(delta & 31);
  return j <= (segment_start(lane, width) | (width - 1)) ? j : lane;
}
inline int shfl_up_src(int lane, unsigned delta, int width) {  // j = lane - b, pval = j >= maxLane
  const int j = lane - static_cast<int>(delta & 31);
  return j >= segment_start(lane, width) ? j : lane;
}
// j = lane ^ b, pval = j <= maxLane: a partner in this segment or an earlier one gives its
// value (for width < 32 and a lane mask >= width, the upper segment reads the lower one), a
// partner in a later segment does not.
inline int shfl_xor_src(int lane, int lane_mask, int width) {
  const int j = lane ^ (lane_mask & 31);
  return j <= (segment_start(lane, width) | (width - 1)) ? j : lane;
}

}  // namespace fastpt_simt

// ---- barriers and warp primitives (full masks only). The defaulted source_location names the
// call, for the checks that lanes released together made the same call.
inline void __syncthreads(std::source_location loc = std::source_location::current()) {
  fastpt_simt::block_barrier(loc);
}
inline void __syncwarp(unsigned mask = 0xffffffffu,
                       std::source_location loc = std::source_location::current()) {
  fastpt_simt::warp_barrier(fastpt_simt::Site{"__syncwarp", loc, false, {0, 0}}, mask);
}
inline void __threadfence() {}
inline void __threadfence_block() {}
inline unsigned __activemask() { return 0xffffffffu; }

template <typename T>
T __shfl_sync(unsigned mask, T v, int src, int width = 32,
              std::source_location loc = std::source_location::current()) {
  fastpt_simt::check_width(width);
  return fastpt_simt::warp_exchange(
      "__shfl_sync", mask, v, [=](int lane) { return fastpt_simt::shfl_idx_src(lane, src, width); }, loc);
}
template <typename T>
T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32,
                  std::source_location loc = std::source_location::current()) {
  fastpt_simt::check_width(width);
  return fastpt_simt::warp_exchange(
      "__shfl_xor_sync", mask, v, [=](int lane) { return fastpt_simt::shfl_xor_src(lane, lane_mask, width); },
      loc);
}
template <typename T>
T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = 32,
                   std::source_location loc = std::source_location::current()) {
  fastpt_simt::check_width(width);
  return fastpt_simt::warp_exchange(
      "__shfl_down_sync", mask, v, [=](int lane) { return fastpt_simt::shfl_down_src(lane, delta, width); },
      loc);
}
template <typename T>
T __shfl_up_sync(unsigned mask, T v, unsigned delta, int width = 32,
                 std::source_location loc = std::source_location::current()) {
  fastpt_simt::check_width(width);
  return fastpt_simt::warp_exchange(
      "__shfl_up_sync", mask, v, [=](int lane) { return fastpt_simt::shfl_up_src(lane, delta, width); }, loc);
}
inline unsigned __ballot_sync(unsigned mask, int pred,
                              std::source_location loc = std::source_location::current()) {
  return fastpt_simt::vote("__ballot_sync", mask, pred, loc);
}
inline int __any_sync(unsigned mask, int pred, std::source_location loc = std::source_location::current()) {
  return fastpt_simt::vote("__any_sync", mask, pred, loc) != 0;
}
inline int __all_sync(unsigned mask, int pred, std::source_location loc = std::source_location::current()) {
  return fastpt_simt::vote("__all_sync", mask, pred, loc) == 0xffffffffu;
}
