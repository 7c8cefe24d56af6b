// Run-time choice of the CPU int8 GEMM path (int8_path.h).
#include "ops/int8/int8_path.h"

#include <atomic>
#include <cstdlib>
#include <stdexcept>

#if defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#endif

#include "common/cpu_dispatch.h"
#include "common/cpu_features.h"

namespace fastpt::cpu {
namespace {

constexpr Int8Path kPaths[] = {Int8Path::kAmx, Int8Path::kVnni, Int8Path::kAvx2, Int8Path::kScalar};

// Linux keeps AMX tile data off until the process asks for it (kernel >= 5.16).
bool amx_permitted() {
  static const bool ok = [] {
#if defined(__linux__) && defined(SYS_arch_prctl)
    constexpr long kReqXcompPerm = 0x1023, kGetXcompPerm = 0x1022, kXtileData = 18;
    unsigned long features = 0;
    if (syscall(SYS_arch_prctl, kReqXcompPerm, kXtileData) != 0) return false;
    return syscall(SYS_arch_prctl, kGetXcompPerm, &features) == 0 && (features >> kXtileData & 1);
#else
    return false;
#endif
  }();
  return ok;
}

Int8Path best_for(Capability cap) {
  const CpuFeatures& f = cpu_features();
  switch (cap) {
    case Capability::AVX512_BF16:
    case Capability::AVX512:
      if (f.amx_tile && f.amx_int8 && amx_permitted()) return Int8Path::kAmx;
      return f.avx512_vnni ? Int8Path::kVnni : Int8Path::kAvx2;
    case Capability::AVX2: return Int8Path::kAvx2;
    default: return Int8Path::kScalar;
  }
}

Int8Path parse(const std::string& name) {
  for (Int8Path p : kPaths)
    if (name == int8_path_name(p)) return p;
  throw std::invalid_argument("int8 path must be auto, amx, vnni, avx2 or scalar, got '" + name + "'");
}

// -1: auto, else the highest path allowed.
std::atomic<int>& cap_override() {
  static std::atomic<int> v = [] {
    const char* env = std::getenv("FASTPT_INT8_PATH");
    if (!env || !*env || std::string(env) == "auto") return -1;
    return static_cast<int>(parse(env));
  }();
  return v;
}

}  // namespace

const char* int8_path_name(Int8Path path) {
  switch (path) {
    case Int8Path::kAmx: return "amx";
    case Int8Path::kVnni: return "vnni";
    case Int8Path::kAvx2: return "avx2";
    default: return "scalar";
  }
}

Int8Path int8_path() {
  const Int8Path best = best_for(capability());
  const int cap = cap_override().load(std::memory_order_relaxed);
  return cap < 0 ? best : static_cast<Int8Path>(std::min(cap, static_cast<int>(best)));
}

std::vector<std::string> int8_paths_available() {
  std::vector<std::string> names;
  const Int8Path best = best_for(detected_capability());
  for (Int8Path p : kPaths)
    if (static_cast<int>(p) <= static_cast<int>(best)) names.push_back(int8_path_name(p));
  return names;
}

void set_int8_path(const std::string& name) {
  if (name == "auto") return cap_override().store(-1);
  const Int8Path p = parse(name);
  const Int8Path best = best_for(detected_capability());
  if (static_cast<int>(p) > static_cast<int>(best))
    throw std::invalid_argument(std::string("this machine cannot run the ") + name +
                                " int8 path (best: " + int8_path_name(best) + ")");
  cap_override().store(static_cast<int>(p));
}

}  // namespace fastpt::cpu
