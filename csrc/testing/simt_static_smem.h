// SIMT emulator, static shared memory: finds every `__shared__` variable of the program (they
// carry the abi_tag "fastpt_smem", see simt_cuda_builtins.h) in its ELF symbol table, poisons
// them before each block, and counts a kernel's bytes against the per-block limit. Included by
// simt.h only.
#pragma once

#include <elf.h>
#include <fcntl.h>
#include <link.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

namespace fastpt_simt {

// Poison bytes, one per block in turn (by launch number of the kernel and block index, so a
// program run twice poisons alike): 0xff is NaN in every floating-point type and -1 in integers,
// but a min or max through `<` or fmaxf skips a NaN; 0x7f is a huge positive value (float
// 3.4e38, double 1.4e306, int 0x7f7f7f7f) and 0xfe a huge negative one, which such a reduction
// does not skip. (In fp16 all three are NaN.)
constexpr unsigned char kPoison[] = {0xff, 0x7f, 0xfe};
constexpr const char* kSharedTag = "B11fastpt_smem";  // the abi_tag of `__shared__` in a mangled name

// The symbol table (.symtab) of one loaded ELF file, mapped read-only for the process's life.
class SymbolTable {
 public:
  SymbolTable(const std::string& path, uintptr_t load_bias) : bias_(load_bias) { load(path); }
  ~SymbolTable() {
    if (map_ != MAP_FAILED) munmap(map_, size_);
  }
  SymbolTable(const SymbolTable&) = delete;
  SymbolTable& operator=(const SymbolTable&) = delete;
  const std::string& error() const { return error_; }

  struct Symbol {
    const char* name;  // mangled
    uintptr_t addr;    // in this process
    size_t size;
    int type;          // STT_*
    // Local symbols (static functions and variables, anything in an anonymous namespace) of
    // different translation units can have the same name: `file` tells them apart (the index
    // of the STT_FILE symbol their unit's locals follow); -1 for global symbols.
    long file;
  };

  // f(Symbol) for every defined symbol.
  template <typename F>
  void for_each(F&& f) const {
    long file = -1;
    for (size_t i = 0; i < count_; ++i) {
      const Elf64_Sym& s = syms_[i];
      if (ELF64_ST_TYPE(s.st_info) == STT_FILE) file = static_cast<long>(i);
      if (s.st_shndx == SHN_UNDEF || s.st_name >= names_size_) continue;
      const bool local = ELF64_ST_BIND(s.st_info) == STB_LOCAL;
      f(Symbol{names_ + s.st_name, bias_ + s.st_value, static_cast<size_t>(s.st_size),
               ELF64_ST_TYPE(s.st_info), local ? file : -1});
    }
  }

 private:
  void load(const std::string& path) {
    const int fd = open(path.c_str(), O_RDONLY | O_CLOEXEC);
    struct stat st {};
    if (fd < 0 || fstat(fd, &st) != 0) {
      if (fd >= 0) close(fd);
      error_ = "cannot read " + path;
      return;
    }
    size_ = static_cast<size_t>(st.st_size);
    map_ = mmap(nullptr, size_, PROT_READ, MAP_PRIVATE, fd, 0);
    close(fd);
    if (map_ == MAP_FAILED) {
      error_ = "cannot map " + path;
      return;
    }
    const char* base = static_cast<const char*>(map_);
    const auto* eh = reinterpret_cast<const Elf64_Ehdr*>(base);
    if (size_ < sizeof(Elf64_Ehdr) || std::memcmp(eh->e_ident, ELFMAG, SELFMAG) != 0 ||
        eh->e_ident[EI_CLASS] != ELFCLASS64 || eh->e_shoff + eh->e_shnum * sizeof(Elf64_Shdr) > size_) {
      error_ = path + " is not a 64-bit ELF file";
      return;
    }
    const auto* sections = reinterpret_cast<const Elf64_Shdr*>(base + eh->e_shoff);
    for (int i = 0; i < eh->e_shnum; ++i) {
      const Elf64_Shdr& tab = sections[i];
      if (tab.sh_type != SHT_SYMTAB || tab.sh_link >= eh->e_shnum) continue;
      const Elf64_Shdr& strings = sections[tab.sh_link];
      if (tab.sh_offset + tab.sh_size > size_ || strings.sh_offset + strings.sh_size > size_) break;
      syms_ = reinterpret_cast<const Elf64_Sym*>(base + tab.sh_offset);
      count_ = tab.sh_size / sizeof(Elf64_Sym);
      names_ = base + strings.sh_offset;
      names_size_ = strings.sh_size;
      return;
    }
    // Without .symtab the `__shared__` variables (local symbols) cannot be found.
    error_ = path + " has no symbol table (stripped?): its __shared__ variables cannot be found";
  }

  uintptr_t bias_;
  void* map_ = MAP_FAILED;
  size_t size_ = 0;
  const Elf64_Sym* syms_ = nullptr;
  size_t count_ = 0;
  const char* names_ = nullptr;
  size_t names_size_ = 0;
  std::string error_;
};

// The loaded object (the program or a shared library) that holds `addr`: its file and the
// offset from its link-time addresses to this process's.
struct LoadedObject {
  std::string path;
  uintptr_t bias = 0;
};
inline bool find_object(const void* addr, LoadedObject& out) {
  struct Query {
    uintptr_t addr;
    LoadedObject* out;
    bool found = false;
  } q{reinterpret_cast<uintptr_t>(addr), &out};
  dl_iterate_phdr(
      [](dl_phdr_info* info, size_t, void* data) -> int {
        auto* q = static_cast<Query*>(data);
        for (int i = 0; i < info->dlpi_phnum; ++i) {
          const ElfW(Phdr)& ph = info->dlpi_phdr[i];
          const uintptr_t lo = info->dlpi_addr + ph.p_vaddr;
          if (ph.p_type != PT_LOAD || q->addr < lo || q->addr >= lo + ph.p_memsz) continue;
          const bool program = info->dlpi_name == nullptr || info->dlpi_name[0] == '\0';
          q->out->path = program ? "/proc/self/exe" : info->dlpi_name;
          q->out->bias = info->dlpi_addr;
          q->found = true;
          return 1;
        }
        return 0;
      },
      &q);
  return q.found;
}

// One `__shared__` variable.
struct SharedVar {
  char* addr;
  size_t size;
  const char* name;  // mangled, in the symbol table's mapping
  long file;         // SymbolTable::Symbol::file
};

// Every `__shared__` variable of one loaded object, found by the ABI tag in its symbol name.
struct ObjectSmem {
  SymbolTable symbols;
  std::vector<SharedVar> vars;
  explicit ObjectSmem(const LoadedObject& o) : symbols(o.path, o.bias) {
    symbols.for_each([&](const SymbolTable::Symbol& s) {
      if (s.type == STT_OBJECT && s.size > 0 && std::strstr(s.name, kSharedTag) != nullptr)
        vars.push_back({reinterpret_cast<char*>(s.addr), s.size, s.name, s.file});
    });
  }
};

// What a launch needs to know about the static shared memory of its kernel.
struct KernelSmem {
  ObjectSmem* object = nullptr;  // poisoned whole before each block
  std::string error;
  // The kernel's static shared memory as far as it is known: its own `__shared__` variables
  // (declared in its body, known before it runs) and those of other functions (the device
  // functions it calls) that one of its blocks changed. A lower bound where a called function's
  // variable was only read, or written with the poison byte.
  size_t static_bytes = 0;
  std::vector<bool> counted;  // per variable of `object`: in static_bytes
  uint64_t launches = 0;      // picks the poison bytes
};

inline void count_var(KernelSmem& k, size_t i) {
  if (k.counted[i]) return;
  k.counted[i] = true;
  k.static_bytes += k.object->vars[i].size;
}

// Counts the kernel's own variables: local statics of a function with the mangled name
// `_Z<encoding>` are named `_ZZ<encoding>E...`. A kernel in an anonymous namespace is a local
// symbol, and another unit may have one of the same name: only its own unit's count.
inline void count_own_vars(KernelSmem& k, const void* kernel) {
  std::string prefix;
  long file = -1;
  k.object->symbols.for_each([&](const SymbolTable::Symbol& s) {
    const bool mangled = std::strncmp(s.name, "_Z", 2) == 0;
    if (s.type == STT_FUNC && s.addr == reinterpret_cast<uintptr_t>(kernel) && mangled) {
      prefix = std::string("_ZZ") + (s.name + 2) + "E";
      file = s.file;
    }
  });
  if (prefix.empty()) return;  // extern "C" or a lambda's invoker: counted once written
  for (size_t i = 0; i < k.object->vars.size(); ++i) {
    const SharedVar& v = k.object->vars[i];
    const bool same_unit = file < 0 || v.file == file;
    if (std::strncmp(v.name, prefix.c_str(), prefix.size()) == 0 && same_unit) count_var(k, i);
  }
}

// The static shared memory record of `kernel`, made on its first launch. Called under the
// launch lock.
inline KernelSmem& kernel_smem(const void* kernel) {
  static std::map<const void*, KernelSmem> kernels;
  static std::map<std::string, std::unique_ptr<ObjectSmem>> objects;  // by file
  auto [it, fresh] = kernels.try_emplace(kernel);
  KernelSmem& k = it->second;
  if (!fresh) return k;
  LoadedObject o;
  if (!find_object(kernel, o)) {
    k.error = "the kernel is in no loaded object: its __shared__ variables cannot be found";
    return k;
  }
  std::unique_ptr<ObjectSmem>& obj = objects[o.path];
  if (!obj) obj = std::make_unique<ObjectSmem>(o);
  if (!obj->symbols.error().empty()) {
    k.error = obj->symbols.error();
    return k;
  }
  k.object = obj.get();
  k.counted.assign(obj->vars.size(), false);
  count_own_vars(k, kernel);
  return k;
}

inline void poison_static_smem(const KernelSmem& k, unsigned char poison) {
  for (const SharedVar& v : k.object->vars) std::memset(v.addr, poison, v.size);
}

// After a block: counts the variables of called functions that the block changed.
inline void count_changed_vars(KernelSmem& k, unsigned char poison) {
  for (size_t i = 0; i < k.object->vars.size(); ++i) {
    const SharedVar& v = k.object->vars[i];
    const auto changed = [=](char c) { return static_cast<unsigned char>(c) != poison; };
    if (!k.counted[i] && std::any_of(v.addr, v.addr + v.size, changed)) count_var(k, i);
  }
}

// Launches run one at a time in the process: static shared memory has one copy.
inline std::mutex& launch_mutex() {
  static std::mutex m;
  return m;
}

}  // namespace fastpt_simt
