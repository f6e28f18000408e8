// SGD with momentum, dampening, Nesterov and the three weight-decay modes, in torch.optim's
// operation order (run by step_element, element.h).
//
// Group row: lr, beta1 = momentum, beta2 = dampening, weight_decay, wd_mode, maximize,
// nesterov. State: momentum_buffer when the variant (momentum != 0) is on. The first-step
// flag marks the step that creates the buffer: torch then sets it to the grad itself.
#pragma once
#include "element.h"

namespace fusedopt {

struct Sgd {
  template <bool MOMENTUM>
  static constexpr int kStates = MOMENTUM ? 1 : 0;
  template <bool MOMENTUM, bool FIRST>
  static constexpr FUSEDOPT_HD bool reads_state(int) { return !FIRST; }
  static constexpr bool kUsesFirst = true;
  static constexpr bool kQuantizable = true;  // 8-bit states (quantized.h)

  template <typename C>
  struct Scalars : StepBaseScalars<C> {
    C momentum;
    C one_minus_dampening;
    bool nesterov;
  };

  // SGD's step number only keys the random bits of stochastic rounding.
  template <typename C>
  static FUSEDOPT_HD Scalars<C> scalars(const double* group, double lr, double, float unscale) {
    Scalars<C> s;
    static_cast<StepBaseScalars<C>&>(s) = step_base_scalars<C>(group, lr, unscale);
    s.momentum = C(group[kGroupBeta1]);
    s.one_minus_dampening = C(1.0 - group[kGroupBeta2]);
    s.nesterov = group[kGroupNesterov] != 0.0;
    return s;
  }

  // s = {momentum_buffer}.
  template <bool MOMENTUM, bool FIRST, typename C>
  static FUSEDOPT_HD void update(C& p, C g, C (&s)[3], const Scalars<C>& k) {
    g = g * k.grad_factor + coupled_decay(p, k.coupled_wd);
    p = p * k.decay_factor;
    if constexpr (MOMENTUM) {
      C& buf = s[0];
      buf = FIRST ? g : k.momentum * buf + k.one_minus_dampening * g;
      g = k.nesterov ? g + k.momentum * buf : buf;
    }
    p = p - k.lr * g;
  }
};

}  // namespace fusedopt
