// Picks the widest instruction-set build of the CPU kernels that this CPU runs, once, at
// import: the installed binary never assumes the build machine's CPU.
#include <cstdlib>
#include <cstring>
#include "dispatch.h"

namespace fusedopt::cpu {

// kernels(byte_permutes): byte_permutes says the CPU has AVX512_VBMI (only the avx512 build uses it).
namespace baseline { KernelTable kernels(bool byte_permutes); }
#if defined(FUSEDOPT_HAVE_X86_ISAS)
namespace avx2 { KernelTable kernels(bool byte_permutes); }
namespace avx512 { KernelTable kernels(bool byte_permutes); }
#endif

static KernelTable choose() {
  // FUSEDOPT_CPU_ISA=baseline|avx2|avx512 caps the choice (for testing the narrower builds;
  // avx512 without the VBMI byte permutes, which only an uncapped run uses where the CPU has them).
  const char* cap = std::getenv("FUSEDOPT_CPU_ISA");
#if defined(FUSEDOPT_HAVE_X86_ISAS)
  __builtin_cpu_init();
  bool allow512 = cap == nullptr || std::strcmp(cap, "avx512") == 0;
  bool allow2 = allow512 || (cap != nullptr && std::strcmp(cap, "avx2") == 0);
  if (allow512 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq"))
    return avx512::kernels(cap == nullptr && __builtin_cpu_supports("avx512vbmi"));
  if (allow2 && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return avx2::kernels(false);
#endif
  (void)cap;
  return baseline::kernels(false);
}

const KernelTable& active_kernels() {
  static const KernelTable table = choose();
  return table;
}

}  // namespace fusedopt::cpu
