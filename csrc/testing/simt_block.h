// SIMT emulator, one block: its threads as fibers (ucontext) on guarded stacks, the block and
// warp barriers they switch at, the checks that the threads released together made the same
// call, and the scheduler that resumes them (run_block). Included by simt.h only.
#pragma once

#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <memory>
#include <numeric>
#include <random>
#include <source_location>
#include <string>
#include <vector>

#include "testing/simt_cuda_builtins.h"
#include "testing/simt_settings.h"

namespace fastpt_simt {

// Where a thread waits: the barrier or warp primitive, the call, and the operands that every
// lane must pass alike. Compared over the threads released together (check_warp_sites,
// check_block_sites).
struct Site {
  const char* what = "";
  std::source_location loc;
  // PTX .aligned instructions (bar.sync for __syncthreads, wmma.*) must be executed by every
  // thread at the same instruction: the same call here.
  bool aligned = false;
  uint64_t operands[2] = {0, 0};  // shuffles: the bytes moved; WMMA: pointer, ldm and layout
};

inline std::string where(const std::source_location& loc) {
  return std::string(loc.file_name()) + ":" + std::to_string(loc.line());
}

enum class State { kReady, kAtBlockBarrier, kAtWarpBarrier, kDone };

struct Fiber {
  ucontext_t ctx;
  char* stack = nullptr;
  State state = State::kReady;
  dim3 tid;
  int warp = 0;
  Site site;  // of the barrier or warp primitive it waits in
};

struct Block {
  ucontext_t main_ctx;
  std::vector<Fiber> fibers;
  int cur = -1;
  int threads = 0, num_warps = 0;
  int done = 0, at_block_barrier = 0;
  std::vector<int> warp_arrived, warp_done;
  std::vector<uint64_t> xchg;  // one 8-byte slot per thread for warp exchanges
  std::vector<double> smem;    // dynamic shared memory, 16-byte aligned (vector<double> is)
  std::string error;
  void (*body)(void*) = nullptr;
  void* body_arg = nullptr;
};

inline thread_local Block* g_block = nullptr;

// One fiber stack: mmap'ed with an inaccessible guard page below it, so a stack overflow
// crashes (SIGSEGV) instead of silently corrupting the next thread's stack.
struct Stack {
  char* base = nullptr;  // the guard page
  size_t total = 0;
  explicit Stack(size_t bytes) {
    const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
    total = (bytes + page - 1) / page * page + page;
    void* p = mmap(nullptr, total, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) throw std::bad_alloc();
    base = static_cast<char*>(p);
    mprotect(base, page, PROT_NONE);
  }
  ~Stack() { munmap(base, total); }
  Stack(const Stack&) = delete;
  Stack& operator=(const Stack&) = delete;
  char* sp() const { return base + static_cast<size_t>(sysconf(_SC_PAGESIZE)); }
  size_t size() const { return total - static_cast<size_t>(sysconf(_SC_PAGESIZE)); }
};

// Stacks are reused across blocks and launches (allocated once per OS thread, lazily).
inline std::vector<std::unique_ptr<Stack>>& stack_pool() {
  static thread_local std::vector<std::unique_ptr<Stack>> pool;
  return pool;
}

// ---- fibers and barriers
inline int linear_tid() {
  return static_cast<int>(threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z));
}

inline Fiber& current() { return g_block->fibers[g_block->cur]; }

inline void switch_to_scheduler() {
  Block& b = *g_block;
  Fiber& f = b.fibers[b.cur];
  swapcontext(&f.ctx, &b.main_ctx);
}

inline void fiber_entry() {
  Block& b = *g_block;
  try {
    b.body(b.body_arg);
  } catch (const Error& e) {
    if (b.error.empty()) b.error = e.msg;
  } catch (const std::exception& e) {
    if (b.error.empty()) b.error = std::string("exception in kernel: ") + e.what();
  } catch (...) {
    if (b.error.empty()) b.error = "exception in kernel";
  }
  Fiber& f = b.fibers[b.cur];
  f.state = State::kDone;
  ++b.done;
  ++b.warp_done[f.warp];
  // returning resumes uc_link (the scheduler)
}

inline void check_in_kernel(const char* what) {
  if (g_block == nullptr || g_block->cur < 0)
    throw Error(std::string(what) + " called outside a kernel launch");
}

// Every thread of the block must arrive; threads that exited make this an error.
inline void block_barrier(std::source_location loc) {
  check_in_kernel("__syncthreads");
  Block& b = *g_block;
  Fiber& f = current();
  f.site = Site{"__syncthreads", loc, true, {0, 0}};
  f.state = State::kAtBlockBarrier;
  ++b.at_block_barrier;
  switch_to_scheduler();
}

// Every lane of the calling thread's warp must arrive: a warp with fewer than 32 threads
// (block size not a multiple of 32) or with lanes that exited is an error.
inline void warp_barrier(const Site& site, unsigned mask) {
  check_in_kernel(site.what);
  Block& b = *g_block;
  Fiber& f = current();
  if (mask != 0xffffffffu)
    throw Error(std::string(site.what) + ": only the full mask 0xffffffff is emulated");
  const int first = f.warp * 32;
  if (first + 32 > b.threads)
    throw Error(std::string(site.what) + " called by a partial warp: block of " + std::to_string(b.threads) +
                " threads, warp " + std::to_string(f.warp) + " has " + std::to_string(b.threads - first) +
                " lanes");
  if (b.warp_done[f.warp] > 0)
    throw Error(std::string(site.what) + " called by a partial warp: " + std::to_string(b.warp_done[f.warp]) +
                " lane(s) of warp " + std::to_string(f.warp) + " already exited");
  f.site = site;
  f.state = State::kAtWarpBarrier;
  ++b.warp_arrived[f.warp];
  switch_to_scheduler();
}

inline bool same_primitive(const Site& a, const Site& b) {
  return a.what == b.what || std::strcmp(a.what, b.what) == 0;
}
inline bool same_call(const Site& a, const Site& b) {
  return a.loc.line() == b.loc.line() && a.loc.column() == b.loc.column() &&
         std::strcmp(a.loc.file_name(), b.loc.file_name()) == 0;
}

// The 32 lanes of warp w, about to be released together, must be in the same primitive (CUDA:
// "all non-exited threads named in mask must execute the same intrinsic"), WMMA calls at the
// same call (.aligned), with the operands that must be uniform alike. Different __syncwarp
// calls may meet (CUDA allows it), and so may shuffles or votes of the same kind
// (shfl.sync and vote.sync are not .aligned). Returns the error, or "".
inline std::string check_warp_sites(const Block& b, int w) {
  const Site& s0 = b.fibers[w * 32].site;
  for (int l = 1; l < 32; ++l) {
    const Site& s = b.fibers[w * 32 + l].site;
    std::string problem;
    if (!same_primitive(s, s0)) problem = "in different warp primitives";
    else if (s0.aligned && !same_call(s, s0)) problem = "in the same primitive at different calls";
    else if (s.operands[0] != s0.operands[0] || s.operands[1] != s0.operands[1])
      problem = std::strncmp(s0.what, "wmma::", 6) == 0 ? "with different pointers, ldm or layouts"
                                                        : "with different operand sizes";
    if (problem.empty()) continue;
    return "warp " + std::to_string(w) + ": lanes " + problem + ": lane 0 in " + s0.what + " (" +
           where(s0.loc) + "), lane " + std::to_string(l) + " in " + s.what + " (" + where(s.loc) +
           "); every lane of a warp must make the same warp-collective call";
  }
  return "";
}

// Every thread released from __syncthreads must have waited at the same call: bar.sync is
// .aligned, and CUDA allows __syncthreads in conditional code only where the condition is the
// same over the whole block. Returns the error, or "".
inline std::string check_block_sites(const Block& b) {
  const Site& s0 = b.fibers[0].site;
  for (int t = 1; t < b.threads; ++t) {
    const Site& s = b.fibers[t].site;
    if (!same_call(s, s0))
      return "__syncthreads reached at different calls (divergent barriers): thread 0 at " + where(s0.loc) +
             ", thread " + std::to_string(t) + " at " + where(s.loc);
  }
  return "";
}

// Releases the warps whose 32 lanes all arrived. Returns whether any was released; sets
// b.error when lanes exited while others wait, or the lanes' calls do not match.
inline bool release_warps(Block& b) {
  bool released = false;
  for (int w = 0; w < b.num_warps; ++w) {
    if (b.warp_arrived[w] == 0) continue;
    if (b.warp_arrived[w] == 32) {
      b.error = check_warp_sites(b, w);
      if (!b.error.empty()) return false;
      for (int l = 0; l < 32; ++l) b.fibers[w * 32 + l].state = State::kReady;
      b.warp_arrived[w] = 0;
      released = true;
    } else if (b.warp_arrived[w] + b.warp_done[w] == 32) {
      b.error = "warp " + std::to_string(w) + ": " + std::to_string(b.warp_done[w]) +
                " lane(s) exited while the others wait in a warp primitive (partial warp)";
      return false;
    }
  }
  return released;
}

// Runs one block: resumes ready fibers round by round, releasing barriers when complete.
inline void run_block(Block& b, std::mt19937_64& rng) {
  const int n = b.threads;
  std::vector<int> order(n);
  std::iota(order.begin(), order.end(), 0);
  const Order mode = settings().order;
  if (mode == Order::kReverse) std::reverse(order.begin(), order.end());
  const bool serial = settings().warp_serial;
  for (;;) {
    if (mode == Order::kShuffle) std::shuffle(order.begin(), order.end(), rng);
    int only_warp = -1;  // warp-serial: the warp of the first ready thread in resume order
    if (serial)
      for (int i : order)
        if (b.fibers[i].state == State::kReady) {
          only_warp = b.fibers[i].warp;
          break;
        }
    for (int i : order) {
      Fiber& f = b.fibers[i];
      if (f.state != State::kReady || (only_warp >= 0 && f.warp != only_warp)) continue;
      b.cur = i;
      threadIdx = f.tid;
      swapcontext(&b.main_ctx, &f.ctx);
      b.cur = -1;
      if (!b.error.empty()) return;
    }
    if (b.done == n) return;
    const bool released = release_warps(b);
    if (!b.error.empty()) return;
    if (released) continue;
    if (serial && std::any_of(b.fibers.begin(), b.fibers.end(),
                              [](const Fiber& f) { return f.state == State::kReady; }))
      continue;  // warps that have not run yet
    if (b.at_block_barrier == n) {
      b.error = check_block_sites(b);
      if (!b.error.empty()) return;
      for (auto& f : b.fibers) f.state = State::kReady;
      b.at_block_barrier = 0;
      continue;
    }
    if (b.at_block_barrier > 0 && b.at_block_barrier + b.done == n) {
      b.error = std::to_string(b.done) + " thread(s) exited while " +
                std::to_string(b.at_block_barrier) + " wait at __syncthreads";
      return;
    }
    int at_warp = 0;
    for (int w = 0; w < b.num_warps; ++w) at_warp += b.warp_arrived[w];
    b.error = "deadlock: " + std::to_string(b.at_block_barrier) + " thread(s) at __syncthreads, " +
              std::to_string(at_warp) + " in warp primitives, " + std::to_string(b.done) +
              " exited (divergent barriers)";
    return;
  }
}

}  // namespace fastpt_simt
