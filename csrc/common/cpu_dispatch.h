// Run-time choice between the DEFAULT / AVX2 / AVX512 / AVX512_BF16 builds of each CPU
// kernel file.
//
// CMake compiles every *_kernel.cpp four times with -DCPU_CAPABILITY=<cap> (as ATen does
// for its own kernels), putting each copy in namespace fastpt::cpu::<cap>. Glue calls the
// plain name in fastpt::cpu, which forwards to the best build this CPU supports, or to the
// one set by FASTPT_CPU_CAPABILITY / fastpt._C.set_cpu_capability (used by the tests to
// run every build on one machine).
#pragma once

#include <cstdint>
#include <string>

namespace fastpt::cpu {

enum class Capability : int { DEFAULT = 0, AVX2 = 1, AVX512 = 2, AVX512_BF16 = 3 };

Capability detected_capability();  // the best build this CPU and OS can run
Capability capability();           // the build kernels use now
// Whether fp32 products run on fastpt's AVX-512 kernels (common/gemm_avx512.h) rather than
// MKL: an AVX512 build in use on a non-Intel CPU, where MKL runs its AVX2 kernels.
bool own_gemm_active();
// Throws std::invalid_argument when the CPU cannot run `cap`.
void set_capability(Capability cap);
const char* capability_name(Capability cap);
// Outputs of at least this many bytes are written with non-temporal stores (cpu_vec.h).
// NOTE: RMSNorm fp32 forward, warm, 2 threads: 16 MiB output 0.83 ms ordinary vs 0.86 ms
// streaming (the L3 still helps), 32 MiB 2.43 vs 1.71 ms, 128 MiB 13.1 vs 9.6 ms.
// Default 32 MiB; FASTPT_STREAM_MIN_BYTES or set_stream_min_bytes change it (0: always,
// used by the tests to cover that path on small shapes).
int64_t stream_min_bytes();
void set_stream_min_bytes(int64_t bytes);

// Throws std::invalid_argument for a name other than DEFAULT, AVX2, AVX512, AVX512_BF16.
Capability parse_capability(const std::string& name);

}  // namespace fastpt::cpu

// Declares `void name(const Args&)` in each capability namespace plus a dispatching
// `fastpt::cpu::name`.
#define FASTPT_DECLARE_CPU_KERNEL(name, Args)                     \
  namespace fastpt::cpu {                                         \
  namespace DEFAULT { void name(const Args& args); }              \
  namespace AVX2 { void name(const Args& args); }                 \
  namespace AVX512 { void name(const Args& args); }               \
  namespace AVX512_BF16 { void name(const Args& args); }          \
  inline void name(const Args& args) {                            \
    switch (capability()) {                                       \
      case Capability::AVX512_BF16: return AVX512_BF16::name(args); \
      case Capability::AVX512: return AVX512::name(args);         \
      case Capability::AVX2: return AVX2::name(args);             \
      default: return DEFAULT::name(args);                        \
    }                                                             \
  }                                                               \
  }
