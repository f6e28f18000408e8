#pragma once
#include "step_call.h"

namespace fusedopt::cpu {
// The kernel build chosen for this CPU (decided on first use, then fixed).
const KernelTable& active_kernels();
}  // namespace fusedopt::cpu
