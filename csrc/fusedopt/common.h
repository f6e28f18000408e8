// Shared by the CPU loop (g++) and the CUDA kernels (nvcc): nothing here may include
// torch, pybind11 or a CUDA header, so one definition serves both compilers.
#pragma once
#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define FUSEDOPT_HD __host__ __device__ __forceinline__
#else
#define FUSEDOPT_HD inline __attribute__((always_inline))
#endif

namespace fusedopt {

// Element types a kernel can be instantiated for; the numbers are the wire format
// used by the Python layer (python/fusedopt/_backend.py). kUInt8Blockwise: 8-bit state codes with
// a per-block absmax (quantized.h), a state dtype only.
enum class DType : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2, kFloat64 = 3, kUInt8Blockwise = 4 };

// How a low-precision param is written back after the fp32 update.
enum class Precision : int {
  kPlain = 0,       // round to nearest even (torch's behaviour)
  kMaster = 1,      // fp32 copy in `extra` is the source of truth; param = round(master)
  kStochastic = 2,  // stochastic rounding keyed by (seed, param index, step, element)
  kKahan = 3,       // bf16 compensation buffer in `extra`
};

enum class WeightDecayMode : int { kCoupled = 0, kDecoupled = 1, kIndependent = 2 };

FUSEDOPT_HD uint32_t float_bits(float x) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(x);
#elif defined(__GNUC__) && !defined(__CUDACC__)
  return __builtin_bit_cast(uint32_t, x);  // (a memcpy through memory can block vectorization)
#else
  uint32_t u;
  std::memcpy(&u, &x, sizeof u);
  return u;
#endif
}

FUSEDOPT_HD float bits_float(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float x;
  std::memcpy(&x, &u, sizeof x);
  return x;
#endif
}

}  // namespace fusedopt
