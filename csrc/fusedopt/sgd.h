// SGD with momentum, dampening, Nesterov and the three weight-decay modes: the scalar
// update of one element and its load/store glue, shared by both backends.
#pragma once
#include "adam.h"  // load_param / store_param / store_state / RoundingKeys

namespace fusedopt {

struct SgdScalars {
  float grad_factor;   // (maximize ? -1 : 1) * clip_coef / grad_scale
  float coupled_wd;
  float decay_factor;
  float lr;
  float momentum;
  float one_minus_dampening;
  bool nesterov;
};

FUSEDOPT_HD SgdScalars sgd_scalars(const double* group, double lr, float unscale) {
  SgdScalars s;
  s.grad_factor = (group[kGroupMaximize] != 0.0 ? -1.0f : 1.0f) * unscale;
  const DecayTerms decay = decay_terms(group, lr);
  s.coupled_wd = decay.coupled_wd;
  s.decay_factor = decay.decay_factor;
  s.lr = float(lr);
  s.momentum = float(group[kGroupBeta1]);
  s.one_minus_dampening = float(1.0 - group[kGroupBeta2]);
  s.nesterov = group[kGroupNesterov] != 0.0;
  return s;
}

// One element of SGD in fp32 registers, in torch.optim's operation order. `first` is true
// on the step that creates the momentum buffer: torch then sets it to the grad itself.
template <bool MOMENTUM>
FUSEDOPT_HD void sgd_update(float& p, float g, float& buf, bool first, const SgdScalars& s) {
  g = g * s.grad_factor + coupled_decay(p, s.coupled_wd);
  p = p * s.decay_factor;
  if (MOMENTUM) {
    buf = first ? g : s.momentum * buf + s.one_minus_dampening * g;
    g = s.nesterov ? g + s.momentum * buf : buf;
  }
  p = p - s.lr * g;
}

template <typename P, typename S, Precision PREC, bool MOMENTUM, typename Stats = NoStats>
FUSEDOPT_HD void sgd_element(P* __restrict__ param, const P* __restrict__ grad, S* __restrict__ momentum_buffer,
                             void* __restrict__ extra, int64_t i, bool first, const SgdScalars& s,
                             const RoundingKeys& keys, Stats stats = Stats{}) {
  float p = load_param<PREC>(param, static_cast<const float*>(extra), i);
  float old = p;
  float buf = MOMENTUM && !first ? load_float(momentum_buffer[i]) : 0.0f;
  float g = load_float(grad[i]);
  sgd_update<MOMENTUM>(p, g, buf, first, s);
  stats.add(g, old, p);
  const ElementRandom r = element_random<PREC>(keys, i, false);
  if (MOMENTUM) store_state<PREC>(momentum_buffer + i, buf, r.a >> 16);
  store_param<PREC>(param, extra, i, old, p, r.a);
}

}  // namespace fusedopt
