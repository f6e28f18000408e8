// The plain-data interface between the Python layer and both backends. Python packs one
// int64 row per tensor and one float64 row per param group; the kernels read raw pointers
// from them. No torch types cross this boundary, so one build serves any torch version.
#pragma once
#include "common.h"

namespace fusedopt {

// Columns of the per-tensor table (int64). Pointers are addresses on the tensor's device;
// an unused state column is 0.
enum TableColumn : int {
  kColParam = 0,       // param storage (param dtype)
  kColGrad = 1,        // grad storage (param dtype)
  kColState0 = 2,      // exp_avg | momentum_buffer (state dtype)
  kColState1 = 3,      // exp_avg_sq (state dtype)
  kColState2 = 4,      // max_exp_avg_sq (state dtype, amsgrad only)
  kColExtra = 5,       // master_param (fp32) | kahan_comp (bf16)
  kColStep = 6,        // float32 step counter of this param (read, then incremented)
  kColNumel = 7,       // element count (int64: tensors may exceed 2^31 elements)
  kColGroup = 8,       // row of the group table holding this tensor's hyper-parameters
  kColParamIndex = 9,  // index of the param over all groups: keys stochastic rounding
  kColFlags = 10,      // kFlagFirstStep: SGD momentum buffer starts as the grad
  kColLr = 11,         // optional float32* lr on the device (tensor lr); 0 = group lr
  kColSeed = 12,       // stochastic-rounding seed of the param's group
  kColRngOffset = 13,  // index of this tensor's first element in the full (unsharded) param:
                       // random bits are keyed by the global index, so sharding never changes them
  kColAbsmax0 = 14,    // 8-bit states (quantized.h): fp32 absmax per block of state 0, 1, 2
  kColAbsmax1 = 15,
  kColAbsmax2 = 16,
  kColBeta1 = 17,      // optional float32* on the device: a tensor beta1 / beta2 read by the
  kColBeta2 = 18,      // CUDA kernel in place of the group's (0 = the group table's value)
  // Inputs read from elsewhere for one step (the CPU kernels only; 0 = none). The step first
  // takes the param / extra / state k from these buffers (same dtype and layout), then updates
  // the live ones as usual: a restore (SAM's w, a LossAdaptiveLR snapshot) fused into the
  // step's pass while each piece is in cache, instead of a separate copy pass. Under master
  // weights the param is never read (the master is), so kColParamFrom is ignored there.
  kColParamFrom = 19,
  kColExtraFrom = 20,
  kColState0From = 21,  // full-precision states only (not 8-bit codes)
  kColState1From = 22,
  kColState2From = 23,
  // SAM's gradient-norm-penalty mix: the step uses torch.lerp(grad, mix, w) (rounded to the
  // grad's dtype, as torch's in-place lerp_ would leave it) instead of grad; w is the float64
  // whose bits kColGradMixWeight holds.
  kColGradMix = 24,
  kColGradMixWeight = 25,
  // Outputs of one step (the CPU kernels only; 0 = none): before updating a piece, the step
  // saves the live extra / state k of that piece into these buffers (same dtype and layout),
  // after any restore above: a LossAdaptiveLR snapshot of the optimizer state taken by the
  // next step's pass (which reads those values anyway) instead of a separate copy pass.
  kColExtraTo = 26,
  kColState0To = 27,  // full-precision states only (not 8-bit codes)
  kColState1To = 28,
  kColState2To = 29,
  kNumTableColumns = 30,
};

enum TableFlags : int64_t { kFlagFirstStep = 1 };

// Columns of the per-group table (float64). Each algorithm's header says which it reads.
enum GroupField : int {
  kGroupLr = 0,
  kGroupBeta1 = 1,        // Adam beta1 | SGD momentum
  kGroupBeta2 = 2,        // Adam beta2 | SGD dampening
  kGroupEps = 3,
  kGroupWeightDecay = 4,
  kGroupWdMode = 5,       // WeightDecayMode
  kGroupMaximize = 6,     // 0 or 1
  kGroupNesterov = 7,     // SGD only
  kGroupAux0 = 8,         // algorithm-specific values the Python class computes per step
  kGroupAux1 = 9,         // (schedule_free.h: ckp1, the y coefficient, bias correction 2)
  kGroupAux2 = 10,
  kNumGroupFields = 11,
};

// Per-call device scalars: all optional (nullptr), all float32 on the tensors' device.
struct StepScalars {
  const float* grad_scale = nullptr;  // GradScaler scale: grads are divided by it
  const float* found_inf = nullptr;   // nonzero: the whole step is skipped
  const float* clip_coef = nullptr;   // global-norm clip factor, already min(1, ...)
  const float* qmaps = nullptr;       // 8-bit states: the signed then the unsigned map (512 floats)
};

// track_stats: per group, the kernel adds these sums into a (n_groups x kNumStats) float64
// array; the norms are their square roots (the grad's divided by the grad scale).
enum StatField : int {
  kStatGradSq = 0,          // sum of grad^2 as stored (before unscale and clipping)
  kStatParamSq = 1,         // sum of p^2 after the step
  kStatUpdateSq = 2,        // sum of (p_after - p_before)^2
  kStatParamBeforeSq = 3,   // sum of p^2 before the step
  kNumStats = 4,
};

}  // namespace fusedopt
