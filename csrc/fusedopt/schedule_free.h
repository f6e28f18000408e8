// Schedule-Free AdamW and SGD (Defazio et al. 2024), in the operation order of the
// `schedulefree` package 1.4 (its foreach=False path). The param holds y, the point where
// grads are taken; state z is the base sequence; x (the average, evaluated in eval mode) is
// recovered from y and z by the Python class's train()/eval(). The schedule-free weights
// (ckp1 and the y coefficient) depend on the group's step count and lr history, which the
// Python class keeps in the group as schedulefree does, and hands in through the group row.
//
// Group row: lr = scheduled lr (lr * warmup factor), aux0 = ckp1, aux1 = the y coefficient
// (AdamW: lr * (beta1 * (1 - ckp1) - 1); SGD: lr * (momentum * (1 - ckp1) - 1)), beta2,
// eps, weight_decay (applied at y, as schedulefree does), aux2 = bias correction 2 (AdamW:
// 1 - beta2^(k+1)).
#pragma once
#include "element.h"

namespace fusedopt {

template <typename C>
struct ScheduleFreeScalars {
  C grad_factor;
  C lr;
  C ckp1;
  C y_coef;
  C beta2;
  C one_minus_beta2;
  C bias_correction2;
  C eps;
  C weight_decay;
};

template <typename C>
FUSEDOPT_HD ScheduleFreeScalars<C> schedule_free_scalars(const double* group, double lr, float unscale) {
  ScheduleFreeScalars<C> s;
  s.grad_factor = C(unscale);
  s.lr = C(lr);
  s.ckp1 = C(group[kGroupAux0]);
  s.y_coef = C(group[kGroupAux1]);
  s.beta2 = C(group[kGroupBeta2]);
  s.one_minus_beta2 = C(1.0 - group[kGroupBeta2]);
  s.bias_correction2 = C(group[kGroupAux2]);
  s.eps = C(group[kGroupEps]);
  s.weight_decay = C(group[kGroupWeightDecay]);
  return s;
}

// The y and z moves both variants share, from the (normalized, decayed) grad d.
template <typename C>
FUSEDOPT_HD void schedule_free_move(C& y, C& z, C d, const ScheduleFreeScalars<C>& k) {
  y = torch_lerp(y, z, k.ckp1);
  y = y + k.y_coef * d;
  z = z - k.lr * d;
}

// What both variants share: no variant flag, every state read at every step, the scalars.
template <int STATES>
struct ScheduleFreeRow {
  template <bool>
  static constexpr int kStates = STATES;
  template <bool, bool>
  static constexpr FUSEDOPT_HD bool reads_state(int) { return true; }
  static constexpr bool kUsesFirst = false;
  static constexpr bool kQuantizable = false;
  template <typename C>
  using Scalars = ScheduleFreeScalars<C>;

  template <typename C>
  static FUSEDOPT_HD Scalars<C> scalars(const double* group, double lr, double, float unscale) {
    return schedule_free_scalars<C>(group, lr, unscale);
  }
};

struct ScheduleFreeAdamW : ScheduleFreeRow<2> {
  // s = {z, exp_avg_sq}.
  template <bool, bool, typename C>
  static FUSEDOPT_HD void update(C& y, C g, C (&s)[3], const Scalars<C>& k) {
    C& z = s[0];
    C& v = s[1];
    g = g * k.grad_factor;
    v = v * k.beta2 + k.one_minus_beta2 * g * g;
    const C denom = std::sqrt(v / k.bias_correction2) + k.eps;
    C d = g / denom;
    if (k.weight_decay != C(0)) d = d + k.weight_decay * y;
    schedule_free_move(y, z, d, k);
  }
};

struct ScheduleFreeSgd : ScheduleFreeRow<1> {
  // s = {z}.
  template <bool, bool, typename C>
  static FUSEDOPT_HD void update(C& y, C g, C (&s)[3], const Scalars<C>& k) {
    C& z = s[0];
    C d = g * k.grad_factor;
    if (k.weight_decay != C(0)) d = d + k.weight_decay * y;
    schedule_free_move(y, z, d, k);
  }
};

}  // namespace fusedopt
