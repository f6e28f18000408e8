// Lion (Chen et al. 2023), in the update order of lion_pytorch / optimi: the sign is taken of
// an interpolation of the *old* moment with the grad, and only then is the moment updated.
//
// Group row: lr, beta1, beta2, weight_decay, wd_mode (decoupled by default: p *= 1 - lr*wd),
// maximize. State: exp_avg.
#pragma once
#include "element.h"

namespace fusedopt {

struct Lion {
  template <bool>
  static constexpr int kStates = 1;
  template <bool, bool>
  static constexpr FUSEDOPT_HD bool reads_state(int) { return true; }
  static constexpr bool kUsesFirst = false;
  static constexpr bool kQuantizable = true;  // 8-bit states (quantized.h)

  template <typename C>
  struct Scalars : StepBaseScalars<C> {
    C one_minus_beta1;
    C one_minus_beta2;
  };

  template <typename C>
  static FUSEDOPT_HD Scalars<C> scalars(const double* group, double lr, double, float unscale) {
    Scalars<C> s;
    static_cast<StepBaseScalars<C>&>(s) = step_base_scalars<C>(group, lr, unscale);
    s.one_minus_beta1 = C(1.0 - group[kGroupBeta1]);
    s.one_minus_beta2 = C(1.0 - group[kGroupBeta2]);
    return s;
  }

  template <typename C>
  static FUSEDOPT_HD C sign(C x) { return x > C(0) ? C(1) : (x < C(0) ? C(-1) : C(0)); }

  // s = {exp_avg}.
  template <bool, bool, typename C>
  static FUSEDOPT_HD void update(C& p, C g, C (&s)[3], const Scalars<C>& k) {
    C& m = s[0];
    g = g * k.grad_factor + coupled_decay(p, k.coupled_wd);
    const C c = torch_lerp(m, g, k.one_minus_beta1);
    p = p * k.decay_factor;
    p = p - k.lr * sign(c);
    m = torch_lerp(m, g, k.one_minus_beta2);
  }
};

}  // namespace fusedopt
