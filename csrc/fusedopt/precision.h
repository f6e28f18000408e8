// Element storage types and how an fp32 register value is loaded from and stored to them:
// round-to-nearest-even, stochastic rounding with a counter-based generator, and Kahan
// compensation. Written with integer bit operations only, so the CPU loop auto-vectorizes
// and the CPU and GPU produce identical bits.
#pragma once
#include "common.h"

namespace fusedopt {

struct bf16_t { uint16_t bits; };
struct fp16_t { uint16_t bits; };

template <DType D> struct StorageOf;
template <> struct StorageOf<DType::kFloat32> { using type = float; };
template <> struct StorageOf<DType::kBFloat16> { using type = bf16_t; };
template <> struct StorageOf<DType::kFloat16> { using type = fp16_t; };
template <> struct StorageOf<DType::kFloat64> { using type = double; };

// ---- bf16 --------------------------------------------------------------------------------
FUSEDOPT_HD float load_float(bf16_t x) { return bits_float(uint32_t(x.bits) << 16); }

// NaN test of the value being rounded: one unordered compare on a vector of floats, where a
// test on the bits costs a mask and an unsigned compare (two ops on x86 before AVX-512).
// Exact without -ffast-math, which the project never uses.
FUSEDOPT_HD bool is_nan(float f) { return f != f; }

// Round-to-nearest-even to bf16, as an fp32 bit pattern whose low 16 bits are junk: the bf16
// is the high half. The NaN select is made on 32-bit lanes, before the narrowing, so the
// vectorized loop narrows once per store (a shift and a pack) rather than narrowing both
// candidates and the mask. A NaN keeps its sign and payload top bits, made quiet.
FUSEDOPT_HD uint32_t bf16_nearest_high(float f) {
  uint32_t u = float_bits(f);
  return is_nan(f) ? (u | 0x00400000u) : u + 0x7FFFu + ((u >> 16) & 1u);
}

FUSEDOPT_HD bf16_t bf16_round_nearest(float f) { return bf16_t{uint16_t(bf16_nearest_high(f) >> 16)}; }

// Adds 16 random bits below the bf16 mantissa and truncates: rounds up with probability
// equal to the distance from the lower neighbour, so E[round(x)] = x. Infinities come out as
// they went in (their low 16 bits are zero, so the add cannot carry); a NaN is truncated to a
// quiet NaN with its sign, as adding to its payload could carry into the sign. One compare
// and one select per element: this sits in the hottest loop of the stochastic paths. Same
// high-half form as bf16_nearest_high.
FUSEDOPT_HD uint32_t bf16_stochastic_high(float f, uint32_t random) {
  uint32_t u = float_bits(f);
  return is_nan(f) ? (u | 0x00400000u) : u + (random & 0xFFFFu);
}

FUSEDOPT_HD bf16_t bf16_round_stochastic(float f, uint32_t random) {
  return bf16_t{uint16_t(bf16_stochastic_high(f, random) >> 16)};
}

// ---- fp16 (IEEE half) --------------------------------------------------------------------
FUSEDOPT_HD float load_float(fp16_t x) {
  uint32_t h = x.bits;
  uint32_t sign = (h & 0x8000u) << 16;
  uint32_t em = (h & 0x7FFFu) << 13;           // exponent+mantissa in fp32 position
  uint32_t exp = em & 0x0F800000u;
  float normal = bits_float(em + 0x38000000u);  // rebias 15 -> 127
  // Subnormals: (em + 1<<23 + rebias) - 2^-14 is exact in fp32.
  float sub = bits_float(em + 0x38800000u) - bits_float(0x38800000u);
  uint32_t inf_nan = em + 0x70000000u;          // exponent all ones in fp32
  uint32_t r = exp == 0x0F800000u ? inf_nan : float_bits(exp == 0 ? sub : normal);
  return bits_float(r | sign);
}

FUSEDOPT_HD fp16_t fp16_round_nearest(float f) {
  uint32_t u = float_bits(f);
  uint32_t sign = (u >> 16) & 0x8000u;
  uint32_t a = u & 0x7FFFFFFFu;
  // >= 65520 rounds to inf; NaN keeps a quiet NaN.
  uint32_t big = a > 0x7F800000u ? 0x7E00u : 0x7C00u;
  // Subnormal results: adding 0.5 aligns the mantissa so the FPU's own RNE does the work.
  float denorm = bits_float(a) + 0.5f;
  uint32_t sub = float_bits(denorm) - 0x3F000000u;
  // Normal results: rebias and round to nearest even on the 13 dropped bits.
  uint32_t odd = (a >> 13) & 1u;
  uint32_t norm = (a + 0xC8000FFFu + odd) >> 13;  // 0xC8000000 = (15-127)<<23 mod 2^32
  uint32_t r = a >= 0x477FF000u ? big : (a < 0x38800000u ? sub : norm);
  return fp16_t{uint16_t(r | sign)};
}

// ---- counter-based random bits -----------------------------------------------------------
// A stateless generator: the bits for an element are a hash of (key, element index), where
// the key mixes (seed, param index, step, stream). No state to save, no dependence on
// threads or chunking, identical on CPU and GPU. The mixer is Wellons' lowbias32, a
// bijective 32-bit hash with near-ideal avalanche.
// (The constants are named for the hand-vectorized AVX2 loop, csrc/cpu/adam_bf16_avx2.h,
// which computes the same hash on eight lanes.)
constexpr uint32_t kMixMul1 = 0x7FEB352Du, kMixMul2 = 0x846CA68Bu;
FUSEDOPT_HD uint32_t mix32(uint32_t x) {
  x ^= x >> 16; x *= kMixMul1;
  x ^= x >> 15; x *= kMixMul2;
  x ^= x >> 16;
  return x;
}

// Key for one (seed, param, step, stream) — computed once per tensor, not per element.
FUSEDOPT_HD uint32_t rng_key(uint64_t seed, int64_t param_index, int64_t step, uint32_t stream) {
  uint32_t k = mix32(uint32_t(seed) ^ 0x9E3779B9u);
  k = mix32(k ^ uint32_t(seed >> 32));
  k = mix32(k ^ uint32_t(param_index));
  k = mix32(k ^ uint32_t(uint64_t(param_index) >> 32) ^ 0x85EBCA6Bu);
  k = mix32(k ^ uint32_t(step));
  k = mix32(k ^ uint32_t(uint64_t(step) >> 32) ^ (stream * 0xC2B2AE35u));
  return k;
}

// 32 random bits for the element at global index g = offset + i (offset, i >= 0): one
// bijective mix of g under the key, mix32((lo32(g) ^ key) + hi32(g) * 0x27D4EB2F), so distinct
// elements of a tensor never share bits. g's halves are formed on 32-bit values: the upper
// half is offset's plus i's plus the carry out of the lower half. When the caller's i is a
// small non-negative loop index (the CPU passes chunk-local indices), i's upper half folds to
// zero and the loop vectorizes on 32-bit lanes, with no 64-bit index math or multiply per
// element; one draw serves two rounded buffers (16 bits each).
constexpr uint32_t kIndexHiMul = 0x27D4EB2Fu;
FUSEDOPT_HD uint32_t random_bits(uint32_t key, int64_t offset, int64_t i) {
  constexpr uint32_t kHiMul = kIndexHiMul;
  const uint32_t offset_lo = uint32_t(offset);
  const uint32_t lo = offset_lo + uint32_t(i);
  const uint32_t hi = uint32_t(uint64_t(offset) >> 32) + uint32_t(uint64_t(i) >> 32);
  const uint32_t carry_term = lo < offset_lo ? kHiMul : 0u;
  return mix32((lo ^ key) + (hi * kHiMul + carry_term));
}

// Two draws per element: A feeds the param (low 16 bits) and the first state (high 16 bits),
// B the second and third states.
enum RngStream : uint32_t { kStreamA = 0, kStreamB = 1 };

// ---- load / store ------------------------------------------------------------------------
FUSEDOPT_HD float load_float(float x) { return x; }
// float64 params keep float64 state and are updated in double, as torch does: "load_float"
// reads any storage type into its compute type (element.h: ComputeOf).
FUSEDOPT_HD double load_float(double x) { return x; }

FUSEDOPT_HD void store_nearest(float* dst, float v) { *dst = v; }
FUSEDOPT_HD void store_nearest(double* dst, double v) { *dst = v; }
FUSEDOPT_HD void store_nearest(bf16_t* dst, float v) { *dst = bf16_round_nearest(v); }
FUSEDOPT_HD void store_nearest(fp16_t* dst, float v) { *dst = fp16_round_nearest(v); }

// Stochastic store: only bf16 has a stochastic path; fp32 is exact and fp16 is not offered.
FUSEDOPT_HD void store_stochastic(float* dst, float v, uint32_t) { *dst = v; }
FUSEDOPT_HD void store_stochastic(double* dst, double v, uint32_t) { *dst = v; }
FUSEDOPT_HD void store_stochastic(bf16_t* dst, float v, uint32_t r) { *dst = bf16_round_stochastic(v, r); }
FUSEDOPT_HD void store_stochastic(fp16_t* dst, float v, uint32_t) { *dst = fp16_round_nearest(v); }

// Kahan-compensated write of an updated param: `old` is the value the param held, `updated`
// the fp32 result, `comp` the running compensation. The part of the update that the
// rounding drops is carried in comp and added back next step.
// store_written(dst, v) stores v rounded to nearest and returns the value stored, read back.
// For bf16 the value is taken from the rounding's 32-bit result rather than from the 16-bit
// store, so a vectorized loop does not narrow and then widen again.
FUSEDOPT_HD float store_written(bf16_t* dst, float v) {
  const uint32_t high = bf16_nearest_high(v);
  *dst = bf16_t{uint16_t(high >> 16)};
  return bits_float(high & 0xFFFF0000u);
}
template <typename T>
FUSEDOPT_HD float store_written(T* dst, float v) {
  store_nearest(dst, v);
  return load_float(*dst);
}

template <typename T>
FUSEDOPT_HD void store_kahan(T* param, T* comp, float old, float updated) {
  float delta = (updated - old) + load_float(*comp);
  float target = old + delta;
  float written = store_written(param, target);
  store_nearest(comp, delta - (written - old));
}

}  // namespace fusedopt
