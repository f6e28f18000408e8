// Turns a call's runtime (algorithm, param dtype, state dtype, precision, variant) into a
// template instantiation of a backend's step kernel. Only the combinations the Python layer can
// ask for are built; anything else raises.
#pragma once
#include <stdexcept>
#include "algorithms.h"
#include "quantized.h"

namespace fusedopt {

// Kernel<A, P, S, PREC, VARIANT>::run(call) for the call's types, algorithm A fixed. `Call` has
// param_dtype, state_dtype, precision and variant.
template <template <class, typename, typename, Precision, bool> class Kernel, class A, typename Call>
void dispatch_types(const Call& call) {
  using F = float;
  using B = bf16_t;
  using H = fp16_t;
  using D = double;
  using Q = q8_t;
#define FUSEDOPT_VARIANTS(P, S, PREC) \
  return call.variant ? Kernel<A, P, S, PREC, true>::run(call) : Kernel<A, P, S, PREC, false>::run(call)
  const DType pd = call.param_dtype, sd = call.state_dtype;
  const Precision pr = call.precision;
  if (pd == DType::kFloat32 && pr == Precision::kPlain) {
    if (sd == DType::kFloat32) FUSEDOPT_VARIANTS(F, F, Precision::kPlain);
    if (sd == DType::kBFloat16) FUSEDOPT_VARIANTS(F, B, Precision::kPlain);
    if constexpr (A::kQuantizable) {
      if (sd == DType::kUInt8Blockwise) FUSEDOPT_VARIANTS(F, Q, Precision::kPlain);
    }
  }
  if (pd == DType::kFloat64 && sd == DType::kFloat64 && pr == Precision::kPlain) FUSEDOPT_VARIANTS(D, D, Precision::kPlain);
  if (pd == DType::kBFloat16) {
    if (sd == DType::kFloat32) {
      if (pr == Precision::kPlain) FUSEDOPT_VARIANTS(B, F, Precision::kPlain);
      if (pr == Precision::kMaster) FUSEDOPT_VARIANTS(B, F, Precision::kMaster);
      if (pr == Precision::kStochastic) FUSEDOPT_VARIANTS(B, F, Precision::kStochastic);
      if (pr == Precision::kKahan) FUSEDOPT_VARIANTS(B, F, Precision::kKahan);
    }
    if (sd == DType::kBFloat16) {
      if (pr == Precision::kPlain) FUSEDOPT_VARIANTS(B, B, Precision::kPlain);
      if (pr == Precision::kMaster) FUSEDOPT_VARIANTS(B, B, Precision::kMaster);
      if (pr == Precision::kStochastic) FUSEDOPT_VARIANTS(B, B, Precision::kStochastic);
      if (pr == Precision::kKahan) FUSEDOPT_VARIANTS(B, B, Precision::kKahan);
    }
    if constexpr (A::kQuantizable) {
      if (sd == DType::kUInt8Blockwise && pr == Precision::kPlain) FUSEDOPT_VARIANTS(B, Q, Precision::kPlain);
      if (sd == DType::kUInt8Blockwise && pr == Precision::kMaster) FUSEDOPT_VARIANTS(B, Q, Precision::kMaster);
      if (sd == DType::kUInt8Blockwise && pr == Precision::kStochastic) FUSEDOPT_VARIANTS(B, Q, Precision::kStochastic);
      if (sd == DType::kUInt8Blockwise && pr == Precision::kKahan) FUSEDOPT_VARIANTS(B, Q, Precision::kKahan);
    }
  }
  if (pd == DType::kFloat16) {
    if (sd == DType::kFloat32) {
      if (pr == Precision::kPlain) FUSEDOPT_VARIANTS(H, F, Precision::kPlain);
      if (pr == Precision::kMaster) FUSEDOPT_VARIANTS(H, F, Precision::kMaster);
    }
    if (sd == DType::kFloat16 && pr == Precision::kPlain) FUSEDOPT_VARIANTS(H, H, Precision::kPlain);
    if constexpr (A::kQuantizable) {
      if (sd == DType::kUInt8Blockwise && pr == Precision::kPlain) FUSEDOPT_VARIANTS(H, Q, Precision::kPlain);
      if (sd == DType::kUInt8Blockwise && pr == Precision::kMaster) FUSEDOPT_VARIANTS(H, Q, Precision::kMaster);
    }
  }
#undef FUSEDOPT_VARIANTS
  throw std::invalid_argument("fusedopt: unsupported combination of param dtype, state dtype and precision");
}

// The same for the call's algorithm (call.algorithm, an id of algorithms.h).
template <template <class, typename, typename, Precision, bool> class Kernel, typename Call>
void dispatch_step(const Call& call) {
  switch (call.algorithm) {
#define FUSEDOPT_CASE(id, A) \
  case id: return dispatch_types<Kernel, A>(call);
    FUSEDOPT_ALGORITHMS(FUSEDOPT_CASE)
#undef FUSEDOPT_CASE
  }
  throw std::invalid_argument("fusedopt: unknown algorithm id");
}

}  // namespace fusedopt
