// Weight averaging (EMA, SWA): avg <- avg + w * (p - avg), in fp32. EMA uses w = 1 - decay,
// SWA's running uniform mean w = 1 / n. Shared by both backends.
#pragma once
#include "precision.h"

namespace fusedopt {

template <typename T>
FUSEDOPT_HD void average_element(float* __restrict__ avg, const T* __restrict__ src, int64_t i, float weight) {
  float a = avg[i];
  avg[i] = a + weight * (load_float(src[i]) - a);
}

}  // namespace fusedopt
