// CPU feature detection (cpuid + xgetbv) and the capability switch behind cpu_dispatch.h.
#include "common/cpu_dispatch.h"
#include "common/cpu_features.h"

#include <cpuid.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>

namespace fastpt::cpu {
namespace {

uint64_t xgetbv0() {
  uint32_t eax, edx;
  __asm__ volatile("xgetbv" : "=a"(eax), "=d"(edx) : "c"(0));
  return (uint64_t(edx) << 32) | eax;
}

CpuFeatures detect() {
  CpuFeatures f{};
  unsigned a, b, c, d;
  if (!__get_cpuid(0, &a, &b, &c, &d)) return f;
  char vendor[13] = {};
  std::memcpy(vendor, &b, 4);
  std::memcpy(vendor + 4, &d, 4);
  std::memcpy(vendor + 8, &c, 4);
  f.intel = std::strcmp(vendor, "GenuineIntel") == 0;
  if (!__get_cpuid(1, &a, &b, &c, &d)) return f;
  const bool osxsave = c & bit_OSXSAVE;
  const bool fma = c & bit_FMA, f16c = c & bit_F16C, avx = c & bit_AVX;
  const uint64_t xcr0 = osxsave ? xgetbv0() : 0;
  // The OS must save the register state: YMM (bits 1-2), ZMM (5-7), AMX tiles (17-18).
  const bool os_ymm = (xcr0 & 0x6) == 0x6;
  const bool os_zmm = os_ymm && (xcr0 & 0xe0) == 0xe0;
  const bool os_amx = (xcr0 & 0x60000) == 0x60000;
  if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return f;
  f.avx2 = avx && os_ymm && (b & bit_AVX2) && fma && f16c;
  f.avx512 = os_zmm && (b & bit_AVX512F) && (b & bit_AVX512BW) && (b & bit_AVX512VL) &&
             (b & bit_AVX512DQ) && fma && f16c;
  f.avx512_vnni = f.avx512 && (c & (1u << 11));
  f.avx512_bf16 = false;
  unsigned a1, b1, c1, d1;
  if (__get_cpuid_count(7, 1, &a1, &b1, &c1, &d1)) f.avx512_bf16 = f.avx512 && (a1 & (1u << 5));
  f.amx_bf16 = os_amx && (d & (1u << 22));
  f.amx_tile = os_amx && (d & (1u << 24));
  f.amx_int8 = os_amx && (d & (1u << 25));
  return f;
}

Capability best(const CpuFeatures& f) {
  if (f.avx512 && f.avx512_bf16) return Capability::AVX512_BF16;
  if (f.avx512) return Capability::AVX512;
  if (f.avx2) return Capability::AVX2;
  return Capability::DEFAULT;
}


std::atomic<int>& active() {
  static std::atomic<int> cap = [] {
    Capability c = best(cpu_features());
    if (const char* env = std::getenv("FASTPT_CPU_CAPABILITY"); env && *env) {
      Capability want;
      try {
        want = parse_capability(env);
      } catch (const std::invalid_argument& e) {  // raised by every op call: name where it came from
        throw std::invalid_argument(std::string("environment variable FASTPT_CPU_CAPABILITY: ") + e.what());
      }
      // Asking for more than the CPU has would crash with SIGILL later: keep the best instead.
      if (static_cast<int>(want) < static_cast<int>(c)) c = want;
    }
    return static_cast<int>(c);
  }();
  return cap;
}

}  // namespace

const CpuFeatures& cpu_features() {
  static const CpuFeatures f = detect();
  return f;
}

Capability detected_capability() { return best(cpu_features()); }

Capability capability() { return static_cast<Capability>(active().load(std::memory_order_relaxed)); }

bool own_gemm_active() {
  const Capability cap = capability();
  return !cpu_features().intel && (cap == Capability::AVX512 || cap == Capability::AVX512_BF16);
}

void set_capability(Capability cap) {
  if (static_cast<int>(cap) > static_cast<int>(detected_capability())) {
    throw std::invalid_argument(std::string("this CPU cannot run the ") + capability_name(cap) +
                                " kernels (best available: " +
                                capability_name(detected_capability()) + ")");
  }
  active().store(static_cast<int>(cap));
}

namespace {
std::atomic<int64_t>& stream_threshold() {
  static std::atomic<int64_t> bytes = [] {
    const char* env = std::getenv("FASTPT_STREAM_MIN_BYTES");
    return env && *env ? std::max<int64_t>(0, std::atoll(env)) : int64_t(32) << 20;
  }();
  return bytes;
}
}  // namespace

int64_t stream_min_bytes() { return stream_threshold().load(std::memory_order_relaxed); }

void set_stream_min_bytes(int64_t bytes) {
  if (bytes < 0) throw std::invalid_argument("stream_min_bytes must be >= 0");
  stream_threshold().store(bytes);
}

Capability parse_capability(const std::string& name) {
  for (Capability c : {Capability::DEFAULT, Capability::AVX2, Capability::AVX512, Capability::AVX512_BF16})
    if (name == capability_name(c)) return c;
  throw std::invalid_argument("CPU capability must be DEFAULT, AVX2, AVX512 or AVX512_BF16, got '" + name + "'");
}

const char* capability_name(Capability cap) {
  switch (cap) {
    case Capability::AVX512_BF16: return "AVX512_BF16";
    case Capability::AVX512: return "AVX512";
    case Capability::AVX2: return "AVX2";
    default: return "DEFAULT";
  }
}

}  // namespace fastpt::cpu
