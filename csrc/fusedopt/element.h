// The generic element step: loads one element's param, grad and state buffers from storage,
// runs an algorithm's scalar update on them in registers, and writes them back under a
// precision mode. Both backends call `step_element` in their inner loop (the CPU loop, the
// CUDA tiles), for every algorithm of algorithms.h; an algorithm only supplies its update.
//
// An algorithm is a struct (see adam.h for a documented one) with:
//   template <bool V> static constexpr int kStates      state buffers (State0.. columns), <= 3
//   template <bool V, bool FIRST> static constexpr bool reads_state(int k)
//                                                       whether buffer k is read (else it starts at 0)
//   static constexpr bool kUsesFirst                    the table's first-step flag matters
//   static constexpr bool kQuantizable                  8-bit states offered (quantized.h)
//   template <typename C> struct Scalars                per-tensor values, computed once
//   template <typename C> static Scalars<C> scalars(const double* group, double lr, double step, float unscale)
//   template <bool V, bool FIRST, typename C> static void update(C& p, C g, C (&s)[3], const Scalars<C>&)
// V is the algorithm's variant flag (Adam: amsgrad, SGD: momentum); C is the compute type.
#pragma once
#include <cmath>
#include <type_traits>
#include "precision.h"
#include "tensor_table.h"

namespace fusedopt {

// The type an element is updated in: double for float64 params (torch does float64 in
// double), fp32 registers for everything else.
template <typename P>
using ComputeOf = std::conditional_t<std::is_same_v<P, double>, double, float>;

// ---- decay terms shared by the algorithms ---------------------------------------------------
// The two weight-decay terms of a group for this lr: the L2 coefficient added to the grad
// (coupled mode) and the factor the param is multiplied by before the update.
template <typename C>
struct DecayTerms {
  C coupled_wd;
  C decay_factor;
};

template <typename C>
FUSEDOPT_HD DecayTerms<C> decay_terms(const double* group, double lr) {
  const double wd = group[kGroupWeightDecay];
  switch (WeightDecayMode(int(group[kGroupWdMode]))) {
    case WeightDecayMode::kCoupled: return {C(wd), C(1)};
    case WeightDecayMode::kDecoupled: return {C(0), C(1.0 - lr * wd)};
    case WeightDecayMode::kIndependent: return {C(0), C(1.0 - wd)};
  }
  return {C(0), C(1)};
}

// (maximize ? -1 : 1) * clip_coef / grad_scale: what every grad is multiplied by.
template <typename C>
FUSEDOPT_HD C grad_factor(const double* group, float unscale) {
  return (group[kGroupMaximize] != 0.0 ? C(-1) : C(1)) * C(unscale);
}

// What an update with a learning rate, a grad factor and weight decay starts from (SGD, Lion):
// the algorithms' Scalars extend it with their own values.
template <typename C>
struct StepBaseScalars {
  C grad_factor;   // (maximize ? -1 : 1) * clip_coef / grad_scale
  C coupled_wd;    // L2 term added to the grad (coupled mode), else 0
  C decay_factor;  // param multiplier before the update (1 - lr*wd | 1 - wd | 1)
  C lr;
};

template <typename C>
FUSEDOPT_HD StepBaseScalars<C> step_base_scalars(const double* group, double lr, float unscale) {
  const DecayTerms<C> decay = decay_terms<C>(group, lr);
  return {grad_factor<C>(group, unscale), decay.coupled_wd, decay.decay_factor, C(lr)};
}

// The L2 term of coupled decay; exactly 0 when there is none, as torch then skips the add
// (0 * inf would turn an inf param into NaN).
template <typename C>
FUSEDOPT_HD C coupled_decay(C p, C coupled_wd) { return coupled_wd != C(0) ? coupled_wd * p : C(0); }

// torch.lerp(a, b, w): the two formulas torch switches between at |w| = 0.5, so results
// match its kernels' rounding.
template <typename C>
FUSEDOPT_HD C torch_lerp(C a, C b, C w) {
  return (w < C(0.5) && w > C(-0.5)) ? a + w * (b - a) : b - (b - a) * (C(1) - w);
}

// ---- random bits of stochastic rounding -----------------------------------------------------
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

// ---- load / store glue ----------------------------------------------------------------------
// Stores a state value: stochastically rounded (with the given 16 random bits) when the step
// uses stochastic rounding.
template <Precision PREC, typename S, typename C>
FUSEDOPT_HD void store_state(S* dst, C v, uint32_t random16) {
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

// Loads the working value of a param under a precision mode.
template <Precision PREC, typename P>
FUSEDOPT_HD ComputeOf<P> load_param(const P* __restrict__ param, const float* __restrict__ master, int64_t i) {
  if constexpr (PREC == Precision::kMaster) return master[i];
  return load_float(param[i]);
}

// Writes an updated param (and its master copy / compensation) under a precision mode.
template <Precision PREC, typename P, typename C>
FUSEDOPT_HD void store_param(P* __restrict__ param, void* __restrict__ extra, int64_t i, C old, C updated,
                             uint32_t random16) {
  if constexpr (PREC == Precision::kMaster) {
    static_cast<float*>(extra)[i] = updated;
    store_nearest(param + i, updated);
  } else if constexpr (PREC == Precision::kStochastic) {
    store_stochastic(param + i, updated, random16);
  } else if constexpr (PREC == Precision::kKahan) {
    store_kahan(param + i, static_cast<P*>(extra) + i, old, updated);
  } else {
    store_nearest(param + i, updated);
  }
}

// In-step telemetry (track_stats) sees each element's grad as stored (before unscaling),
// and the working value of the param before and after the update.
struct NoStats {
  FUSEDOPT_HD void add(float, float, float) const {}
};

// ---- the generic element step ---------------------------------------------------------------
// One element of algorithm A: the state buffers the update reads are loaded, the rest start
// at 0; every buffer it keeps is written back. Random bits: stream a rounds the param (low 16)
// and state 0 (high 16), stream b states 1 (low) and 2 (high).
template <class A, typename P, typename S, Precision PREC, bool V, bool FIRST, typename Stats = NoStats>
FUSEDOPT_HD void step_element(P* __restrict__ param, const P* __restrict__ grad, S* __restrict__ state0,
                              S* __restrict__ state1, S* __restrict__ state2, void* __restrict__ extra, int64_t i,
                              const typename A::template Scalars<ComputeOf<P>>& scalars, const RoundingKeys& keys,
                              Stats stats = Stats{}) {
  using C = ComputeOf<P>;
  constexpr int kStates = A::template kStates<V>;
  C p = load_param<PREC>(param, static_cast<const float*>(extra), i);
  const C old = p;
  C s[3] = {C(0), C(0), C(0)};
  if constexpr (kStates > 0 && A::template reads_state<V, FIRST>(0)) s[0] = load_float(state0[i]);
  if constexpr (kStates > 1 && A::template reads_state<V, FIRST>(1)) s[1] = load_float(state1[i]);
  if constexpr (kStates > 2 && A::template reads_state<V, FIRST>(2)) s[2] = load_float(state2[i]);
  const C g = load_float(grad[i]);
  A::template update<V, FIRST>(p, g, s, scalars);
  stats.add(float(g), float(old), float(p));
  const ElementRandom r = element_random<PREC>(keys, i, kStates > 1);
  if constexpr (kStates > 0) store_state<PREC>(state0 + i, s[0], r.a >> 16);
  if constexpr (kStates > 1) store_state<PREC>(state1 + i, s[1], r.b);
  if constexpr (kStates > 2) store_state<PREC>(state2 + i, s[2], r.b >> 16);
  store_param<PREC>(param, extra, i, old, p, r.a);
}

}  // namespace fusedopt
