// SIMT emulator, launches: checks the configuration against CUDA's limits, runs the blocks one
// after another with their shared memory poisoned, and reports errors as CUDA does
// (FASTPT_SIMT_LAUNCH, cudaGetLastError, cudaPeekAtLastError). Included by simt.h only.
#pragma once

#include <cstdint>
#include <cstring>
#include <mutex>
#include <random>
#include <string>
#include <tuple>
#include <type_traits>

#include "testing/simt_block.h"
#include "testing/simt_cuda_builtins.h"
#include "testing/simt_settings.h"
#include "testing/simt_static_smem.h"

namespace fastpt_simt {

inline cudaError_t fail(cudaError_t e, std::string msg) {
  g_last_error = e;
  g_last_message = std::move(msg);
  return e;
}

inline std::string smem_too_large(const KernelSmem& k, size_t dynamic) {
  return "shared memory " + std::to_string(k.static_bytes) + " bytes static + " + std::to_string(dynamic) +
         " bytes dynamic > limit " + std::to_string(settings().max_dynamic_smem);
}

// Sets up the fibers of one block for a fresh start.
inline void reset_block(Block& b, dim3 block, unsigned char poison) {
  b.done = b.at_block_barrier = 0;
  b.warp_arrived.assign(b.num_warps, 0);
  b.warp_done.assign(b.num_warps, 0);
  std::memset(b.smem.data(), poison, b.smem.size() * sizeof(double));
  auto& pool = stack_pool();
  for (int t = 0; t < b.threads; ++t) {
    Fiber& f = b.fibers[t];
    f.state = State::kReady;
    f.tid = dim3(t % block.x, (t / block.x) % block.y, t / (block.x * block.y));
    f.warp = t / 32;
    f.stack = pool[t]->sp();
    getcontext(&f.ctx);
    f.ctx.uc_stack.ss_sp = f.stack;
    f.ctx.uc_stack.ss_size = pool[t]->size();
    f.ctx.uc_link = &b.main_ctx;
    makecontext(&f.ctx, &fiber_entry, 0);
  }
}

// `kernel` identifies the kernel (its address: where its `__shared__` variables are found).
inline cudaError_t launch_erased(const void* kernel, dim3 grid, dim3 block, size_t smem, void (*body)(void*),
                                 void* arg) {
  if (g_block != nullptr) return fail(cudaErrorLaunchFailure, "nested launch inside a kernel");
  const std::lock_guard<std::mutex> lock(launch_mutex());
  const uint64_t nt = uint64_t(block.x) * block.y * block.z;
  if (nt == 0 || nt > 1024 || block.x > 1024 || block.y > 1024 || block.z > 64)
    return fail(cudaErrorInvalidConfiguration, "bad block size");
  if (grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.x > 0x7fffffffu ||
      grid.y > settings().max_grid_yz || grid.z > settings().max_grid_yz)
    return fail(cudaErrorInvalidConfiguration, "bad grid size");
  if (smem > settings().max_dynamic_smem)
    return fail(cudaErrorInvalidConfiguration,
                "dynamic shared memory " + std::to_string(smem) + " bytes > limit");
  KernelSmem& ks = kernel_smem(kernel);
  if (!ks.error.empty()) return fail(cudaErrorLaunchFailure, ks.error);
  if (ks.static_bytes + smem > settings().max_dynamic_smem)
    return fail(cudaErrorInvalidConfiguration, smem_too_large(ks, smem));
  const uint64_t launch_number = ks.launches++;
  const int n = static_cast<int>(nt);
  auto& pool = stack_pool();
  const size_t stack_bytes = settings().stack_bytes;
  try {
    while (static_cast<int>(pool.size()) < n) pool.emplace_back(new Stack(stack_bytes));
  } catch (const std::bad_alloc&) {
    return fail(cudaErrorMemoryAllocation, "cannot allocate fiber stacks");
  }

  Block b;
  b.threads = n;
  b.num_warps = (n + 31) / 32;
  b.fibers.resize(n);
  b.xchg.assign(n, 0);
  b.smem.resize(smem / sizeof(double) + 2);
  b.body = body;
  b.body_arg = arg;
  gridDim = grid;
  blockDim = block;
  std::mt19937_64 rng(settings().seed);
  uint64_t block_number = 0;
  for (unsigned bz = 0; bz < grid.z; ++bz)
    for (unsigned by = 0; by < grid.y; ++by)
      for (unsigned bx = 0; bx < grid.x; ++bx, ++block_number) {
        blockIdx = dim3(bx, by, bz);
        // Garbage in shared memory, so reads of what the block has not written show up.
        const unsigned char poison = kPoison[(launch_number + block_number) % std::size(kPoison)];
        poison_static_smem(ks, poison);
        reset_block(b, block, poison);
        g_block = &b;
        run_block(b, rng);
        g_block = nullptr;
        const std::string at = "block (" + std::to_string(bx) + "," + std::to_string(by) + "," +
                               std::to_string(bz) + "): ";
        if (!b.error.empty()) return fail(cudaErrorLaunchFailure, at + b.error);
        count_changed_vars(ks, poison);
        if (ks.static_bytes + smem > settings().max_dynamic_smem)
          return fail(cudaErrorInvalidConfiguration, at + smem_too_large(ks, smem));
      }
  return cudaSuccess;  // as on CUDA, an error left pending before stays pending
}

template <typename... P, typename... A>
cudaError_t launch(void (*kernel)(P...), dim3 grid, dim3 block, size_t smem, cudaStream_t,
                   A&&... args) {
  static_assert(sizeof...(P) == sizeof...(A), "kernel argument count");
  struct Call {
    void (*k)(P...);
    std::tuple<std::decay_t<P>...> params;
  } call{kernel, std::tuple<std::decay_t<P>...>(static_cast<std::decay_t<P>>(args)...)};
  return launch_erased(reinterpret_cast<const void*>(kernel), grid, block, smem,
                       [](void* p) {
                         auto* c = static_cast<Call*>(p);
                         auto params = c->params;  // each thread gets its own copy
                         std::apply(c->k, params);
                       },
                       &call);
}

}  // namespace fastpt_simt

#define FASTPT_SIMT_LAUNCH(kernel, grid, block, smem_bytes, stream, ...) \
  ::fastpt_simt::launch(kernel, dim3(grid), dim3(block), smem_bytes, stream __VA_OPT__(, ) __VA_ARGS__)

inline void* fastpt_simt_dynamic_smem() {
  fastpt_simt::check_in_kernel("dynamic shared memory");
  return fastpt_simt::g_block->smem.data();
}

inline cudaError_t cudaGetLastError() {
  const cudaError_t e = fastpt_simt::g_last_error;
  fastpt_simt::g_last_error = cudaSuccess;
  return e;
}
inline cudaError_t cudaPeekAtLastError() { return fastpt_simt::g_last_error; }
inline const char* cudaGetErrorString(cudaError_t e) {
  switch (e) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorMemoryAllocation: return "out of memory";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument";
    case cudaErrorLaunchFailure: return "unspecified launch failure (SIMT emulator)";
  }
  return "unknown error";
}
