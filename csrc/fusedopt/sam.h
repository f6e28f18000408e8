// SAM's perturbation of one element, w -> w + e, with e = scale * g (SAM) or scale * w^2 * g
// (ASAM, adaptive), computed in the order pytorch_optimizer and davda54/sam do:
// ((w * w) * g) * scale. scale = rho / (||g|| + 1e-12) is computed by the Python layer (a
// 0-dim tensor in the param's dtype, as theirs). The kernels also save w, bit for bit, for the
// restore (sam.py).
#pragma once
#include "precision.h"

namespace fusedopt {

template <typename C>
FUSEDOPT_HD C sam_perturbed(C w, C g, C scale, bool adaptive) {
  const C e = adaptive ? ((w * w) * g) * scale : g * scale;
  return w + e;
}

}  // namespace fusedopt
