// The registry of algorithms: each row names an algorithm struct (its header says its math, its
// states and its group row) and the id the Python class passes as `algorithm`. Both backends
// instantiate their one generic step loop for every row, through dispatch_step
// (step_dispatch.h). Adding an elementwise algorithm = one header + one row here.
#pragma once
#include "adam.h"
#include "lion.h"
#include "schedule_free.h"
#include "sgd.h"

// X(id, struct)
#define FUSEDOPT_ALGORITHMS(X) \
  X(0, Adam)                   \
  X(1, Sgd)                    \
  X(2, Lion)                   \
  X(3, ScheduleFreeAdamW)      \
  X(4, ScheduleFreeSgd)

namespace fusedopt {

constexpr int kNumAlgorithms = 5;

}  // namespace fusedopt
