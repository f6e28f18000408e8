// Adam / AdamW: the scalar update of one element, and the per-element glue that loads it
// from storage and writes it back under a precision mode. Both backends call
// `adam_element` in their inner loop; nothing else in the project knows Adam's math.
#pragma once
#include <cmath>
#include <type_traits>
#include "precision.h"
#include "tensor_table.h"

namespace fusedopt {

// Everything the inner loop needs, computed once per tensor from its group and its step.
struct AdamScalars {
  float grad_factor;    // (maximize ? -1 : 1) * clip_coef / grad_scale
  float coupled_wd;     // L2 term added to the grad (coupled mode), else 0
  float decay_factor;   // param multiplier before the update (1 - lr*wd | 1 - wd | 1)
  float one_minus_beta1;
  float beta2;
  float one_minus_beta2;
  float step_size;      // lr / (1 - beta1^step)
  float inv_bias_correction2_sqrt;  // 1 / sqrt(1 - beta2^step): a multiply, not torch's divide
  float eps;
};

// The two weight-decay terms of a group for this lr: the L2 coefficient added to the grad
// (coupled mode) and the factor the param is multiplied by before the update.
struct DecayTerms {
  float coupled_wd;
  float decay_factor;
};

FUSEDOPT_HD DecayTerms decay_terms(const double* group, double lr) {
  const double wd = group[kGroupWeightDecay];
  switch (WeightDecayMode(int(group[kGroupWdMode]))) {
    case WeightDecayMode::kCoupled: return {float(wd), 1.0f};
    case WeightDecayMode::kDecoupled: return {0.0f, float(1.0 - lr * wd)};
    case WeightDecayMode::kIndependent: return {0.0f, float(1.0 - wd)};
  }
  return {0.0f, 1.0f};
}

// `step` is the step number after this update (1 on the first). Done in double, as torch
// does these scalars in Python floats.
FUSEDOPT_HD AdamScalars adam_scalars(const double* group, double lr, double step, float unscale) {
  AdamScalars s;
  double beta1 = group[kGroupBeta1], beta2 = group[kGroupBeta2];
  s.grad_factor = (group[kGroupMaximize] != 0.0 ? -1.0f : 1.0f) * unscale;
  const DecayTerms decay = decay_terms(group, lr);
  s.coupled_wd = decay.coupled_wd;
  s.decay_factor = decay.decay_factor;
  s.one_minus_beta1 = float(1.0 - beta1);
  s.beta2 = float(beta2);
  s.one_minus_beta2 = float(1.0 - beta2);
  s.step_size = float(lr / (1.0 - pow(beta1, step)));
  s.inv_bias_correction2_sqrt = float(1.0 / sqrt(1.0 - pow(beta2, step)));
  s.eps = float(group[kGroupEps]);
  return s;
}

// The L2 term of coupled decay; exactly 0 when there is none, as torch then skips the add
// (0 * inf would turn an inf param into NaN).
FUSEDOPT_HD float coupled_decay(float p, float coupled_wd) { return coupled_wd != 0.0f ? coupled_wd * p : 0.0f; }

// torch.maximum semantics: a NaN on either side wins.
FUSEDOPT_HD float nan_max(float a, float b) { return (b != b || b > a) ? b : a; }

// One element of Adam in fp32 registers, in torch.optim's operation order.
template <bool AMSGRAD>
FUSEDOPT_HD void adam_update(float& p, float g, float& m, float& v, float& vmax, const AdamScalars& s) {
  g = g * s.grad_factor + coupled_decay(p, s.coupled_wd);
  p = p * s.decay_factor;
  m = m + s.one_minus_beta1 * (g - m);
  v = s.beta2 * v + s.one_minus_beta2 * (g * g);
  float second = v;
  if (AMSGRAD) {
    vmax = nan_max(vmax, v);
    second = vmax;
  }
  // One divide per element, not torch's two: divides and square roots are what bound this
  // loop on a CPU whose data sits in cache. The multiply differs from torch's divide by at
  // most an ulp of the denominator.
  float denom = sqrtf(second) * s.inv_bias_correction2_sqrt + s.eps;
  p = p - s.step_size * (m / denom);
}

// Random keys of one tensor for one step (only read under stochastic rounding). `offset` is
// the global index of element 0 of the arrays the element function is handed: the tensor's
// first element (nonzero for a shard of a larger param), advanced by `at` when a loop hands
// in arrays that start inside the tensor.
struct RoundingKeys {
  uint32_t a, b;
  int64_t offset;

  // The keys of the same elements seen through arrays that start `first` elements later.
  FUSEDOPT_HD RoundingKeys at(int64_t first) const { return {a, b, offset + first}; }
};

FUSEDOPT_HD RoundingKeys rounding_keys(uint64_t seed, int64_t param_index, int64_t step, int64_t offset = 0) {
  return {rng_key(seed, param_index, step, kStreamA), rng_key(seed, param_index, step, kStreamB), offset};
}

// The random bits of one element: `a` rounds the param (low half) and state 0 (high half),
// `b` states 1 and 2. Zero (and never computed) unless the step rounds stochastically.
struct ElementRandom {
  uint32_t a, b;
};

template <Precision PREC>
FUSEDOPT_HD ElementRandom element_random(const RoundingKeys& keys, int64_t i, bool need_b) {
  if (PREC != Precision::kStochastic) return {0u, 0u};
  return {random_bits(keys.a, keys.offset, i), need_b ? random_bits(keys.b, keys.offset, i) : 0u};
}

// Stores a state value: stochastically rounded (with the given 16 random bits) when the step
// uses stochastic rounding.
template <Precision PREC, typename S>
FUSEDOPT_HD void store_state(S* dst, float v, uint32_t random16) {
  if (PREC == Precision::kStochastic) store_stochastic(dst, v, random16);
  else store_nearest(dst, v);
}

// What the `extra` buffer of a row holds: the fp32 master copy (kMaster) or the compensation
// in the param's type (kKahan); nothing under the other precisions.
template <Precision PREC>
constexpr bool kHasExtra = PREC == Precision::kMaster || PREC == Precision::kKahan;
template <typename P, Precision PREC>
using ExtraOf = std::conditional_t<PREC == Precision::kMaster, float, P>;

// The `extra` buffer seen from element `first` on (unchanged, null, when there is none).
template <Precision PREC, typename P>
FUSEDOPT_HD void* extra_at(void* extra, int64_t first) {
  if constexpr (kHasExtra<PREC>) return static_cast<ExtraOf<P, PREC>*>(extra) + first;
  return extra;
}

// Loads the fp32 working value of a param under a precision mode.
template <Precision PREC, typename P>
FUSEDOPT_HD float load_param(const P* __restrict__ param, const float* __restrict__ master, int64_t i) {
  return PREC == Precision::kMaster ? master[i] : load_float(param[i]);
}

// Writes an updated param (and its master copy / compensation) under a precision mode.
template <Precision PREC, typename P>
FUSEDOPT_HD void store_param(P* __restrict__ param, void* __restrict__ extra, int64_t i, float old, float updated,
                             uint32_t random16) {
  if (PREC == Precision::kMaster) {
    static_cast<float*>(extra)[i] = updated;
    store_nearest(param + i, updated);
  } else if (PREC == Precision::kStochastic) {
    store_stochastic(param + i, updated, random16);
  } else if (PREC == Precision::kKahan) {
    store_kahan(param + i, static_cast<P*>(extra) + i, old, updated);
  } else {
    store_nearest(param + i, updated);
  }
}

// In-step telemetry (track_stats) sees each element's grad as stored (before unscaling),
// and the fp32 working value of the param before and after the update.
struct NoStats {
  FUSEDOPT_HD void add(float, float, float) const {}
};

template <typename P, typename S, Precision PREC, bool AMSGRAD, typename Stats = NoStats>
FUSEDOPT_HD void adam_element(P* __restrict__ param, const P* __restrict__ grad, S* __restrict__ exp_avg,
                              S* __restrict__ exp_avg_sq, S* __restrict__ max_exp_avg_sq, void* __restrict__ extra,
                              int64_t i, const AdamScalars& s, const RoundingKeys& keys, Stats stats = Stats{}) {
  float p = load_param<PREC>(param, static_cast<const float*>(extra), i);
  float old = p;
  float m = load_float(exp_avg[i]);
  float v = load_float(exp_avg_sq[i]);
  float vmax = AMSGRAD ? load_float(max_exp_avg_sq[i]) : 0.0f;
  float g = load_float(grad[i]);
  adam_update<AMSGRAD>(p, g, m, v, vmax, s);
  stats.add(g, old, p);
  const ElementRandom r = element_random<PREC>(keys, i, true);
  store_state<PREC>(exp_avg + i, m, r.a >> 16);
  store_state<PREC>(exp_avg_sq + i, v, r.b);
  if (AMSGRAD) store_state<PREC>(max_exp_avg_sq + i, vmax, r.b >> 16);
  store_param<PREC>(param, extra, i, old, p, r.a);
}

}  // namespace fusedopt
