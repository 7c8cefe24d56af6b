// SIMT emulator, settings and error state: the resume order, warp-serial schedule and launch
// limits (settings(), also read from FASTPT_SIMT_ORDER and FASTPT_SIMT_WARP_SERIAL), the
// exception a kernel's misuse throws, and the last launch error. Included by simt.h only.
#pragma once

#include <cstdint>
#include <cstdlib>
#include <exception>
#include <string>
#include <utility>

#include "testing/simt_cuda_builtins.h"

namespace fastpt_simt {

enum class Order { kForward, kReverse, kShuffle };

struct Error : std::exception {
  std::string msg;
  explicit Error(std::string m) : msg(std::move(m)) {}
  const char* what() const noexcept override { return msg.c_str(); }
};

struct Settings {
  Order order = Order::kForward;
  uint64_t seed = 0;
  // Shared memory per block, static + dynamic: CUDA's limit without the opt-in attribute
  // (cudaFuncAttributeMaxDynamicSharedMemorySize), which no fastpt kernel sets.
  size_t max_dynamic_smem = 48 * 1024;
  unsigned max_grid_yz = 65535;  // gridDim.y, z limit; tests lower it to cover chunked launches
  size_t stack_bytes = 128 * 1024;
  bool warp_serial = false;  // run one warp at a time between block barriers
  bool from_env = false;
};
inline Settings& settings() {
  static Settings s;
  if (!s.from_env) {
    s.from_env = true;
    if (const char* o = std::getenv("FASTPT_SIMT_ORDER")) {
      const std::string v = o;
      if (v == "reverse") s.order = Order::kReverse;
      else if (v == "shuffle") s.order = Order::kShuffle;
    }
    if (const char* w = std::getenv("FASTPT_SIMT_WARP_SERIAL")) s.warp_serial = std::string(w) == "1";
  }
  return s;
}
inline void set_warp_serial(bool on) { settings().warp_serial = on; }
inline void set_order(Order o, uint64_t seed = 0) {
  settings().order = o;
  settings().seed = seed;
}

inline thread_local std::string g_last_message;
inline thread_local cudaError_t g_last_error = cudaSuccess;
inline const std::string& last_error_message() { return g_last_message; }

}  // namespace fastpt_simt
