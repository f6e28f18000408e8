// Picks the widest instruction-set build of the CPU kernels that this CPU runs, once, at
// import: the installed binary never assumes the build machine's CPU.
#include <cstdlib>
#include <cstring>
#include "dispatch.h"

namespace fusedopt::cpu {

namespace baseline { KernelTable kernels(); }
#if defined(FUSEDOPT_HAVE_X86_ISAS)
namespace avx2 { KernelTable kernels(); }
namespace avx512 { KernelTable kernels(); }
#endif

static KernelTable choose() {
  // FUSEDOPT_CPU_ISA=baseline|avx2 caps the choice (for testing the narrower builds).
  const char* cap = std::getenv("FUSEDOPT_CPU_ISA");
#if defined(FUSEDOPT_HAVE_X86_ISAS)
  __builtin_cpu_init();
  bool allow512 = cap == nullptr || std::strcmp(cap, "avx512") == 0;
  bool allow2 = allow512 || (cap != nullptr && std::strcmp(cap, "avx2") == 0);
  if (allow512 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq"))
    return avx512::kernels();
  if (allow2 && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return avx2::kernels();
#endif
  (void)cap;
  return baseline::kernels();
}

const KernelTable& active_kernels() {
  static const KernelTable table = choose();
  return table;
}

}  // namespace fusedopt::cpu
