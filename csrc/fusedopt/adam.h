// Adam / AdamW: the scalar update of one element, in torch.optim's operation order (with
// fused multiply-adds where a product meets a sum, see update). Both
// backends run it through step_element (element.h); nothing else in the project knows Adam's
// math. This is the pattern every algorithm of algorithms.h follows.
//
// Group row (tensor_table.h): lr, beta1, beta2, eps, weight_decay, wd_mode, maximize.
// States: exp_avg, exp_avg_sq, and max_exp_avg_sq when the variant (amsgrad) is on.
#pragma once
#include "element.h"

namespace fusedopt {

struct Adam {
  template <bool AMSGRAD>
  static constexpr int kStates = AMSGRAD ? 3 : 2;
  template <bool AMSGRAD, bool FIRST>
  static constexpr FUSEDOPT_HD bool reads_state(int) { return true; }
  static constexpr bool kUsesFirst = false;
  static constexpr bool kQuantizable = true;  // 8-bit states (quantized.h)

  // Everything the inner loop needs, computed once per tensor from its group and its step.
  template <typename C>
  struct Scalars {
    C grad_factor;    // (maximize ? -1 : 1) * clip_coef / grad_scale
    C coupled_wd;     // L2 term added to the grad (coupled mode), else 0
    C decay_factor;   // param multiplier before the update (1 - lr*wd | 1 - wd | 1)
    C one_minus_beta1;
    C beta2;
    C one_minus_beta2;
    C step_size;      // lr / (1 - beta1^step)
    C inv_bias_correction2_sqrt;  // 1 / sqrt(1 - beta2^step): a multiply, not torch's divide
    C eps;
  };

  // `step` is the step number after this update (1 on the first). Done in double, as torch
  // does these scalars in Python floats.
  template <typename C>
  static FUSEDOPT_HD Scalars<C> scalars(const double* group, double lr, double step, float unscale) {
    Scalars<C> s;
    const double beta1 = group[kGroupBeta1], beta2 = group[kGroupBeta2];
    s.grad_factor = grad_factor<C>(group, unscale);
    const DecayTerms<C> decay = decay_terms<C>(group, lr);
    s.coupled_wd = decay.coupled_wd;
    s.decay_factor = decay.decay_factor;
    s.one_minus_beta1 = C(1.0 - beta1);
    s.beta2 = C(beta2);
    s.one_minus_beta2 = C(1.0 - beta2);
    s.step_size = C(lr / (1.0 - pow(beta1, step)));
    s.inv_bias_correction2_sqrt = C(1.0 / sqrt(1.0 - pow(beta2, step)));
    s.eps = C(group[kGroupEps]);
    return s;
  }

  // torch.maximum semantics: a NaN on either side wins.
  template <typename C>
  static FUSEDOPT_HD C nan_max(C a, C b) { return (b != b || b > a) ? b : a; }

  // s = {exp_avg, exp_avg_sq, max_exp_avg_sq}.
  template <bool AMSGRAD, bool FIRST, typename C>
  static FUSEDOPT_HD void update(C& p, C g, C (&s)[3], const Scalars<C>& k) {
    C& m = s[0];
    C& v = s[1];
    g = g * k.grad_factor + coupled_decay(p, k.coupled_wd);
    p = p * k.decay_factor;
    // Fused multiply-adds where torch's order has a product then a sum (here, the denominator
    // and the param update below): one rounding each instead of two (at most half an ulp from
    // torch's results per operation, and nearer the exact value), and fewer operations for the
    // CPU loops that are bound by their vector ports (the 8-bit loop: -4 of ~66 uops per 16
    // elements, 3-4% faster). Every path computes exactly this (CPU builds, hand loops, CUDA).
    m = std::fma(k.one_minus_beta1, g - m, m);
    v = std::fma(k.beta2, v, k.one_minus_beta2 * (g * g));
    C second = v;
    if constexpr (AMSGRAD) {
      s[2] = nan_max(s[2], v);
      second = s[2];
    }
    // One divide per element, not torch's two: divides and square roots are what bound this
    // loop on a CPU whose data sits in cache. The multiply differs from torch's divide by at
    // most an ulp of the denominator.
    const C denom = std::fma(std::sqrt(second), k.inv_bias_correction2_sqrt, k.eps);
    p = std::fma(-k.step_size, m / denom, p);
  }
};

}  // namespace fusedopt
