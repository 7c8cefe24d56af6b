// SIMT emulator: runs CUDA kernels (*_kernels.cu) on the CPU, compiled by the host compiler
// with -DFASTPT_SIMT_EMULATOR (C++20). Included only through common/cuda_compat.h. See
// csrc/testing/README.md for what is and is not emulated.
//
// Execution model. Launches are serialized (a process-wide lock) and the blocks of a launch run
// one after another on the launching OS thread, so one copy of each `__shared__` variable (a
// `static`) serves every block in turn; it is filled with a poison pattern before each block, as
// dynamic shared memory is. The threads of a block are fibers (ucontext) on that OS thread,
// switched only at __syncthreads, warp primitives and WMMA calls; between two such points a
// thread runs alone. The order in which ready threads are resumed is configurable (forward,
// reverse, seeded shuffle: set_order() or FASTPT_SIMT_ORDER=forward|reverse|shuffle), so a
// missing barrier reads data that is not written yet (the poison) and shows up as a wrong
// result, deterministically. Warps that call the same warp primitives move in lockstep under
// those orders, so a race between warps (common in WMMA kernels, where every call is
// warp-collective) needs the warp-serial schedule (set_warp_serial(true) or
// FASTPT_SIMT_WARP_SERIAL=1): one warp at a time runs up to its next __syncthreads, the first
// warp in the resume order first.
//
// Errors (a thread exits while others wait at a barrier, a warp primitive called by a partial
// warp, a non-full mask, divergent barriers, lanes of a warp in different primitives, WMMA
// operands that break CUDA's rules, a bad launch configuration) end the launch and come back as
// its cudaError_t, also pending for cudaGetLastError as on CUDA; last_error_message() says what
// happened.
#pragma once

#include <math.h>
#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <map>
#include <memory>
#include <mutex>
#include <numeric>
#include <random>
#include <source_location>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include "testing/simt_static_smem.h"

// ---- keywords
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__
#define __launch_bounds__(...)
// A `__shared__` variable is a `static` whose mangled name carries the ABI tag "fastpt_smem"
// (`_ZZ<function>E<name>B11fastpt_smem`), so that the launch finds every one of them in the
// symbol table of the program and poisons them before each block (see "static shared memory"
// below). A section attribute would be simpler, but g++ ignores it on the statics of function
// templates and puts the statics of different inline functions into one COMDAT group.
#define __shared__ static __attribute__((abi_tag("fastpt_smem")))
#define __constant__ static
#ifndef __restrict__
#define __restrict__ __restrict
#endif

// ---- runtime types
enum cudaError_t : int {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorMemoryAllocation = 2,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorLaunchFailure = 719,
};
using cudaError = cudaError_t;
struct CUstream_st;
using cudaStream_t = CUstream_st*;

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
using uint3 = dim3;

inline thread_local dim3 threadIdx, blockIdx, blockDim, gridDim;
constexpr int warpSize = 32;

// ---- half / bfloat16: 16-bit storage, arithmetic through float, round-to-nearest-even.
struct __half {
  uint16_t x = 0;
  __half() = default;
  explicit __half(float f) { _Float16 h = static_cast<_Float16>(f); std::memcpy(&x, &h, 2); }
  operator float() const { _Float16 h; std::memcpy(&h, &x, 2); return static_cast<float>(h); }
};
struct __nv_bfloat16 {
  uint16_t x = 0;
  __nv_bfloat16() = default;
  explicit __nv_bfloat16(float f) {
    uint32_t u;
    std::memcpy(&u, &f, 4);
    if (std::isnan(f)) { x = static_cast<uint16_t>((u >> 16) | 0x40u); return; }
    u += 0x7fffu + ((u >> 16) & 1u);
    x = static_cast<uint16_t>(u >> 16);
  }
  operator float() const { uint32_t u = uint32_t(x) << 16; float f; std::memcpy(&f, &u, 4); return f; }
};
using half = __half;
using nv_bfloat16 = __nv_bfloat16;

#define FASTPT_SIMT_HALF_OPS(H)                                                              \
  inline H operator+(H a, H b) { return H(float(a) + float(b)); }                           \
  inline H operator-(H a, H b) { return H(float(a) - float(b)); }                           \
  inline H operator*(H a, H b) { return H(float(a) * float(b)); }                           \
  inline H operator/(H a, H b) { return H(float(a) / float(b)); }                           \
  inline H operator-(H a) { H r = a; r.x ^= 0x8000u; return r; }                           \
  inline H& operator+=(H& a, H b) { return a = a + b; }                                     \
  inline H& operator-=(H& a, H b) { return a = a - b; }                                     \
  inline H& operator*=(H& a, H b) { return a = a * b; }                                     \
  inline H& operator/=(H& a, H b) { return a = a / b; }                                     \
  inline bool operator==(H a, H b) { return float(a) == float(b); }                         \
  inline bool operator!=(H a, H b) { return float(a) != float(b); }                         \
  inline bool operator<(H a, H b) { return float(a) < float(b); }                           \
  inline bool operator>(H a, H b) { return float(a) > float(b); }                           \
  inline bool operator<=(H a, H b) { return float(a) <= float(b); }                         \
  inline bool operator>=(H a, H b) { return float(a) >= float(b); }
FASTPT_SIMT_HALF_OPS(__half)
FASTPT_SIMT_HALF_OPS(__nv_bfloat16)
#undef FASTPT_SIMT_HALF_OPS

inline float __half2float(__half h) { return float(h); }
inline __half __float2half(float f) { return __half(f); }
inline __half __float2half_rn(float f) { return __half(f); }
inline float __bfloat162float(__nv_bfloat16 h) { return float(h); }
inline __nv_bfloat16 __float2bfloat16(float f) { return __nv_bfloat16(f); }
inline __nv_bfloat16 __float2bfloat16_rn(float f) { return __nv_bfloat16(f); }

// ---- bit casts and math intrinsics (the accurate host versions)
inline float __int_as_float(int i) { float f; std::memcpy(&f, &i, 4); return f; }
inline int __float_as_int(float f) { int i; std::memcpy(&i, &f, 4); return i; }
inline float __uint_as_float(unsigned i) { float f; std::memcpy(&f, &i, 4); return f; }
inline unsigned __float_as_uint(float f) { unsigned i; std::memcpy(&i, &f, 4); return i; }
inline double __longlong_as_double(long long i) { double d; std::memcpy(&d, &i, 8); return d; }
inline long long __double_as_longlong(double d) { long long i; std::memcpy(&i, &d, 8); return i; }
inline float rsqrtf(float v) { return 1.0f / std::sqrt(v); }
inline double rsqrt(double v) { return 1.0 / std::sqrt(v); }
inline float __expf(float v) { return std::exp(v); }
inline float __logf(float v) { return std::log(v); }
inline float __fdividef(float a, float b) { return a / b; }
inline float __saturatef(float v) { return v < 0.f ? 0.f : (v > 1.f ? 1.f : v); }

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

#define FASTPT_SIMT_LAUNCH(kernel, grid, block, smem_bytes, stream, ...) \
  ::fastpt_simt::launch(kernel, dim3(grid), dim3(block), smem_bytes, stream __VA_OPT__(, ) __VA_ARGS__)

inline void* fastpt_simt_dynamic_smem() {
  fastpt_simt::check_in_kernel("dynamic shared memory");
  return fastpt_simt::g_block->smem.data();
}

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

// ---- atomics: threads of a block never run at the same time and blocks run one after
// another, so plain read-modify-write is atomic here.
template <typename T>
T atomicAdd(T* p, T v) { const T old = *p; *p = old + v; return old; }
template <typename T>
T atomicSub(T* p, T v) { const T old = *p; *p = old - v; return old; }
template <typename T>
T atomicMax(T* p, T v) { const T old = *p; *p = old < v ? v : old; return old; }
template <typename T>
T atomicMin(T* p, T v) { const T old = *p; *p = v < old ? v : old; return old; }
template <typename T>
T atomicExch(T* p, T v) { const T old = *p; *p = v; return old; }
template <typename T>
T atomicCAS(T* p, T cmp, T v) { const T old = *p; if (old == cmp) *p = v; return old; }

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

#include "testing/simt_wmma.h"
