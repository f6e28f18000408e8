// Adam / AdamW on bf16 params, written with AVX2 intrinsics for the AVX2 build only: there
// the auto-vectorized generic loop (element.h) spends most of its instructions widening and
// narrowing bf16 across 128-bit lanes and selecting NaN cases, and loses to torch's fused bf16
// step (issue #19). The AVX-512 build keeps the generic loop (it is tuned, and has
// instructions this one emulates).
//
// Bits equal the generic loop's, element for element: the math is adam.h's update in its
// operation order, its fused multiply-adds as FMA intrinsics and every other multiply and add
// separate (the build has -ffp-contract=off: the compiler fuses nothing itself), IEEE divide
// and square root, and the roundings of precision.h
// (round-to-nearest-even, stochastic rounding with the same hash and bits, the Kahan store).
// Precisions: plain, stochastic, Kahan and master weights; states bf16 or fp32.
//
// Two things carry the speed:
// * Where every buffer is bf16 (states bf16, no master copy), 16 elements sit in one 256-bit
//   word and are processed as two halves: the even elements (low 16 bits of each 32-bit lane,
//   shifted up: one shift) and the odd ones (high 16 bits, masked: one and). A store puts them
//   back with one shift and one word blend. Elementwise math does not care about the order;
//   the random bits take each lane's own element index.
// * The bf16 roundings leave out their NaN case (a quiet NaN, not the rounding add): one
//   compare per 16 elements finds a NaN among the results, and such a block (a diverged
//   model) is redone by step_element before anything is stored.
//
// The kernel may assume the in-place form of the table (param and states read and written in
// place); it handles whole blocks of 16 and the caller finishes the rest with step_element.
#pragma once
// Built into the AVX-512 build too (its own namespace copy): there it beat the auto-vectorized
// 512-bit loop by 1.3-1.8x at 41.7M params (bench, 2 threads, this project's Xeon).
#if defined(__AVX2__)
#include <immintrin.h>

#include <type_traits>

#include "../fusedopt/adam.h"

namespace fusedopt::cpu::adam_bf16_avx2 {
// Internal linkage: the AVX2 and AVX-512 objects each keep their own copy (same-named copies
// would be merged by the linker, and one build could then run the other's code).
namespace {

constexpr int kBlock = 16;

inline __m256i splat(uint32_t x) { return _mm256_set1_epi32(int(x)); }
inline __m256i bits(__m256 f) { return _mm256_castps_si256(f); }
inline __m256 floats(__m256i u) { return _mm256_castsi256_ps(u); }

// ---- layouts of a block of 16 elements in two 8-lane halves ---------------------------------
// Every buffer bf16: half 0 the even elements, half 1 the odd ones (see the top).
struct Interleaved {
  static __m256 load_bf16(const bf16_t* src, int half) {
    const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src));
    return floats(half == 0 ? _mm256_slli_epi32(x, 16) : _mm256_and_si256(x, splat(0xFFFF0000u)));
  }
  // `high`: bf16 values in the high 16 bits of each 32-bit lane (the low bits are ignored).
  static void store_bf16(bf16_t* dst, const __m256i (&high)[2]) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst),
                        _mm256_blend_epi16(_mm256_srli_epi32(high[0], 16), high[1], 0xAA));
  }
  static __m256i lane_index(int half) {
    return half == 0 ? _mm256_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14) : _mm256_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15);
  }
};

// Some buffer fp32 (states or the master copy): elements 0-7 in half 0, 8-15 in half 1.
struct Natural {
  static __m256 load_bf16(const bf16_t* src, int half) {
    const __m128i x = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + 8 * half));
    return floats(_mm256_slli_epi32(_mm256_cvtepu16_epi32(x), 16));
  }
  static void store_bf16(bf16_t* dst, const __m256i (&high)[2]) {
    // packus interleaves the halves' 128-bit lanes (0-3, 8-11 | 4-7, 12-15); the permute
    // puts them in order.
    const __m256i packed = _mm256_packus_epi32(_mm256_srli_epi32(high[0], 16), _mm256_srli_epi32(high[1], 16));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst), _mm256_permute4x64_epi64(packed, 0xD8));
  }
  static __m256 load_f32(const float* src, int half) { return _mm256_loadu_ps(src + 8 * half); }
  static void store_f32(float* dst, const __m256 (&h)[2]) {
    _mm256_storeu_ps(dst, h[0]);
    _mm256_storeu_ps(dst + 8, h[1]);
  }
  static __m256i lane_index(int half) {
    return half == 0 ? _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7) : _mm256_setr_epi32(8, 9, 10, 11, 12, 13, 14, 15);
  }
};

template <class Layout>
__m256 load(const bf16_t* src, int half) { return Layout::load_bf16(src, half); }
template <class Layout>
__m256 load(const float* src, int half) { return Layout::load_f32(src, half); }

// ---- roundings (precision.h) -----------------------------------------------------------------
// bf16_nearest_high and bf16_stochastic_high on 8 lanes without their NaN case (see the top).
// `random16`: 16 random bits per lane (the high ones 0).
inline __m256i nearest_high(__m256 f) {
  const __m256i u = bits(f);
  return _mm256_add_epi32(_mm256_add_epi32(u, splat(0x7FFFu)), _mm256_and_si256(_mm256_srli_epi32(u, 16), splat(1u)));
}
inline __m256i stochastic_high(__m256 f, __m256i random16) { return _mm256_add_epi32(bits(f), random16); }

// The value a bf16 store of `high` reads back (store_written).
inline __m256 written_value(__m256i high) { return floats(_mm256_and_si256(high, splat(0xFFFF0000u))); }

// random_bits of precision.h on 8 lanes, as its two 16-bit halves (each in the low bits of
// the lane): `index` holds the lanes' offset_lo + i, where no i of the run carries out of the
// low half (the caller stops before one), and `hi_term` the high half times kIndexHiMul (only
// added when HI: it is 0 below 2^32 elements).
struct RandomHalves {
  __m256i low, high;
};
template <bool HI>
RandomHalves random_bits(__m256i key, __m256i index, __m256i hi_term) {
  __m256i x = _mm256_xor_si256(index, key);
  if constexpr (HI) x = _mm256_add_epi32(x, hi_term);
  // mix32: x ^= x >> 16; x *= kMixMul1; x ^= x >> 15; x *= kMixMul2; x ^= x >> 16. The high
  // half of the result is the high half before the last xor, whose shift is reused.
  x = _mm256_xor_si256(x, _mm256_srli_epi32(x, 16));
  x = _mm256_mullo_epi32(x, splat(kMixMul1));
  x = _mm256_xor_si256(x, _mm256_srli_epi32(x, 15));
  x = _mm256_mullo_epi32(x, splat(kMixMul2));
  const __m256i high = _mm256_srli_epi32(x, 16);
  return {_mm256_and_si256(_mm256_xor_si256(x, high), splat(0xFFFFu)), high};
}

// Software prefetch this many elements ahead on every stream. The loop keeps 4 to 6 streams
// going at once and, at the sizes where memory matters, spends long enough on each block that
// the hardware prefetchers alone leave it waiting (measured one thread on a 41.7M-element
// step: ~1.3x the generic loop's speed without, ~1.7x with; 512 to 2048 elements ahead do
// the same). A prefetch never faults, so one past the end of a buffer is harmless.
constexpr int64_t kPrefetchAhead = 1024;
template <typename T>
void prefetch_ahead(const T* stream, int64_t i) {
  const uintptr_t at = reinterpret_cast<uintptr_t>(stream) + uintptr_t(i + kPrefetchAhead) * sizeof(T);
  _mm_prefetch(reinterpret_cast<const char*>(at), _MM_HINT_T0);
}

// Adam::Scalars<float> broadcast to 8 lanes.
struct VectorScalars {
  __m256 grad_factor, coupled_wd, decay_factor, one_minus_beta1, beta2, one_minus_beta2, step_size, inv_bc2_sqrt, eps;
  explicit VectorScalars(const Adam::Scalars<float>& s)
      : grad_factor(_mm256_set1_ps(s.grad_factor)),
        coupled_wd(_mm256_set1_ps(s.coupled_wd)),
        decay_factor(_mm256_set1_ps(s.decay_factor)),
        one_minus_beta1(_mm256_set1_ps(s.one_minus_beta1)),
        beta2(_mm256_set1_ps(s.beta2)),
        one_minus_beta2(_mm256_set1_ps(s.one_minus_beta2)),
        step_size(_mm256_set1_ps(s.step_size)),
        inv_bc2_sqrt(_mm256_set1_ps(s.inv_bias_correction2_sqrt)),
        eps(_mm256_set1_ps(s.eps)) {}
};

// Which decay term a group has (element.h, decay_terms): none, the coupled L2 term added to
// the grad, or the factor the param is multiplied by (decoupled and independent modes).
enum class Decay { kNone, kCoupled, kFactor };

// Adam::update on 8 lanes, in its operation order, leaving out the multiplies by an exact 1
// and the add of coupled_decay's exact 0 that the group's scalars make no-ops: x * 1 is x and
// x + 0 only turns -0 into +0, whose sign reaches nothing here (m + (1-beta1)*(g - m) and
// g*g give the same bits for g = -0 and +0). NaN inputs, where a multiply by 1 would quiet a
// signalling NaN, make the param NaN, and such blocks are redone by step_element (run_blocks).
// SCALED: grad_factor is not 1.
template <bool AMSGRAD, bool SCALED, Decay DECAY>
void update(__m256& p, __m256 g, __m256& m, __m256& v, __m256& vmax, const VectorScalars& k) {
  if constexpr (SCALED) g = _mm256_mul_ps(g, k.grad_factor);
  if constexpr (DECAY == Decay::kCoupled) g = _mm256_add_ps(g, _mm256_mul_ps(k.coupled_wd, p));
  if constexpr (DECAY == Decay::kFactor) p = _mm256_mul_ps(p, k.decay_factor);
  m = _mm256_fmadd_ps(k.one_minus_beta1, _mm256_sub_ps(g, m), m);
  v = _mm256_fmadd_ps(k.beta2, v, _mm256_mul_ps(k.one_minus_beta2, _mm256_mul_ps(g, g)));
  __m256 second = v;
  if constexpr (AMSGRAD) {
    // Adam::nan_max(vmax, v): v when v is NaN or greater, else vmax.
    const __m256 take_v = _mm256_or_ps(_mm256_cmp_ps(v, v, _CMP_UNORD_Q), _mm256_cmp_ps(v, vmax, _CMP_GT_OQ));
    vmax = _mm256_blendv_ps(vmax, v, take_v);
    second = vmax;
  }
  const __m256 denom = _mm256_fmadd_ps(_mm256_sqrt_ps(second), k.inv_bc2_sqrt, k.eps);
  p = _mm256_fnmadd_ps(k.step_size, _mm256_div_ps(m, denom), p);
}

// Whole blocks of a piece of n elements; returns how many elements were updated. SCALED,
// DECAY: update's; HI: the stochastic-rounding index has a nonzero high half (random_bits).
template <class Layout, typename S, Precision PREC, bool AMSGRAD, bool SCALED, Decay DECAY, bool HI>
int64_t run_blocks(bf16_t* __restrict__ param, const bf16_t* __restrict__ grad, S* __restrict__ state0,
                   S* __restrict__ state1, S* __restrict__ state2, void* __restrict__ extra, int64_t n,
                   const Adam::Scalars<float>& scalars, const RoundingKeys& keys) {
  constexpr bool kSr = PREC == Precision::kStochastic;
  constexpr bool kKahan = PREC == Precision::kKahan;
  constexpr bool kMaster = PREC == Precision::kMaster;
  constexpr bool kBf16States = std::is_same_v<S, bf16_t>;
  float* __restrict__ master = kMaster ? static_cast<float*>(extra) : nullptr;
  bf16_t* __restrict__ comp = kKahan ? static_cast<bf16_t*>(extra) : nullptr;
  const VectorScalars k(scalars);
  const __m256i key_a = splat(keys.a), key_b = splat(keys.b);
  const __m256i hi_term = splat(uint32_t(uint64_t(keys.offset) >> 32) * kIndexHiMul);
  // offset_lo + i of each lane, advanced a block per iteration.
  __m256i index[2];
  for (int h = 0; h < 2; ++h) index[h] = _mm256_add_epi32(splat(uint32_t(keys.offset)), Layout::lane_index(h));
  const int64_t blocks_end = n / kBlock * kBlock;
  for (int64_t i = 0; i < blocks_end; i += kBlock) {
    prefetch_ahead(param, i);
    prefetch_ahead(grad, i);
    prefetch_ahead(state0, i);
    prefetch_ahead(state1, i);
    if constexpr (AMSGRAD) prefetch_ahead(state2, i);
    if constexpr (kKahan) prefetch_ahead(comp, i);
    if constexpr (kMaster) prefetch_ahead(master, i);
    // Each half's results: bf16 ones rounded (high halves of the lanes), fp32 ones as they are;
    // nothing is stored until the block is known to be free of NaN.
    __m256i p_high[2], comp_high[2], m_high[2], v_high[2], vmax_high[2];
    __m256 p_out[2], m_out[2], v_out[2], vmax_out[2];
    // NaN lanes of the block. A NaN state result always makes the param NaN (m/denom is NaN
    // when m, v or max_exp_avg_sq is), so the param alone is tested. Under Kahan the new
    // compensation delta - (written - old) is: it is NaN whenever the param (through delta)
    // or the old value is, hence whenever the value written is, and also where written and
    // old are the same infinity.
    __m256 nan[2];
    for (int h = 0; h < 2; ++h) {
      __m256 p;
      if constexpr (kMaster) p = Layout::load_f32(master + i, h);
      else p = Layout::load_bf16(param + i, h);
      const __m256 g = Layout::load_bf16(grad + i, h);
      __m256 m = load<Layout>(state0 + i, h);
      __m256 v = load<Layout>(state1 + i, h);
      __m256 vmax = AMSGRAD ? load<Layout>(state2 + i, h) : _mm256_setzero_ps();
      const __m256 old = p;
      update<AMSGRAD, SCALED, DECAY>(p, g, m, v, vmax, k);
      // Random bits (step_element): stream a rounds the param (low 16) and state 0 (high 16),
      // stream b states 1 (low) and 2 (high); b only where states are rounded.
      RandomHalves ra{}, rb{};
      if constexpr (kSr) {
        ra = random_bits<HI>(key_a, index[h], hi_term);
        if constexpr (kBf16States) rb = random_bits<HI>(key_b, index[h], hi_term);
        index[h] = _mm256_add_epi32(index[h], splat(kBlock));
      }
      if constexpr (kKahan) {  // store_kahan
        const __m256 delta = _mm256_add_ps(_mm256_sub_ps(p, old), Layout::load_bf16(comp + i, h));
        p_high[h] = nearest_high(_mm256_add_ps(old, delta));
        const __m256 new_comp = _mm256_sub_ps(delta, _mm256_sub_ps(written_value(p_high[h]), old));
        comp_high[h] = nearest_high(new_comp);
        nan[h] = new_comp;
      } else {
        p_high[h] = kSr ? stochastic_high(p, ra.low) : nearest_high(p);
        p_out[h] = p;
        nan[h] = p;
      }
      if constexpr (kBf16States) {
        m_high[h] = kSr ? stochastic_high(m, ra.high) : nearest_high(m);
        v_high[h] = kSr ? stochastic_high(v, rb.low) : nearest_high(v);
        if constexpr (AMSGRAD) vmax_high[h] = kSr ? stochastic_high(vmax, rb.high) : nearest_high(vmax);
      } else {
        m_out[h] = m;
        v_out[h] = v;
        vmax_out[h] = vmax;
      }
    }
    const __m256 any_nan = _mm256_cmp_ps(nan[0], nan[1], _CMP_UNORD_Q);
    if (__builtin_expect(!_mm256_testz_ps(any_nan, any_nan), 0)) {
      const RoundingKeys block_keys = keys.at(i);
      for (int j = 0; j < kBlock; ++j)
        step_element<Adam, bf16_t, S, PREC, AMSGRAD, false>(param + i, grad + i, state0 + i, state1 + i,
                                                            AMSGRAD ? state2 + i : nullptr,
                                                            extra_at<PREC, bf16_t>(extra, i), j, scalars, block_keys);
      continue;
    }
    Layout::store_bf16(param + i, p_high);
    if constexpr (kMaster) Layout::store_f32(master + i, p_out);
    if constexpr (kKahan) Layout::store_bf16(comp + i, comp_high);
    if constexpr (kBf16States) {
      Layout::store_bf16(state0 + i, m_high);
      Layout::store_bf16(state1 + i, v_high);
      if constexpr (AMSGRAD) Layout::store_bf16(state2 + i, vmax_high);
    } else {
      Layout::store_f32(state0 + i, m_out);
      Layout::store_f32(state1 + i, v_out);
      if constexpr (AMSGRAD) Layout::store_f32(state2 + i, vmax_out);
    }
  }
  return blocks_end;
}

// Adam on n elements of bf16 params (arrays starting at the piece, keys at its first element):
// updates a prefix of whole blocks and returns its length; the caller runs step_element on the
// rest.
template <typename S, Precision PREC, bool AMSGRAD>
int64_t step_prefix(bf16_t* param, const bf16_t* grad, S* state0, S* state1, S* state2, void* extra, int64_t n,
                    const Adam::Scalars<float>& scalars, const RoundingKeys& keys) {
  if constexpr (PREC == Precision::kStochastic) {
    // The blocks take the element index's high half as fixed: stop where the low half of
    // offset + i would carry (a piece crossing a multiple of 2^32 elements of one param).
    const int64_t to_carry = int64_t(1ull << 32) - int64_t(uint32_t(keys.offset));
    if (n > to_carry) n = to_carry;
  }
  using Layout = std::conditional_t<std::is_same_v<S, bf16_t> && PREC != Precision::kMaster, Interleaved, Natural>;
  const bool coupled = scalars.coupled_wd != 0.0f, factor = scalars.decay_factor != 1.0f;
  if (coupled && factor) return 0;  // (no weight-decay mode has both: the generic loop would do)
  const Decay decay = coupled ? Decay::kCoupled : factor ? Decay::kFactor : Decay::kNone;
  const bool hi = PREC == Precision::kStochastic && uint64_t(keys.offset) >> 32 != 0;
  // The run-time choices as template arguments.
  const auto run = [&](auto scaled, auto decay_tag, auto hi_tag) {
    return run_blocks<Layout, S, PREC, AMSGRAD, decltype(scaled)::value, decltype(decay_tag)::value,
                      decltype(hi_tag)::value>(param, grad, state0, state1, state2, extra, n, scalars, keys);
  };
  const auto with_decay = [&](auto scaled, auto hi_tag) {
    if (decay == Decay::kCoupled) return run(scaled, std::integral_constant<Decay, Decay::kCoupled>{}, hi_tag);
    if (decay == Decay::kFactor) return run(scaled, std::integral_constant<Decay, Decay::kFactor>{}, hi_tag);
    return run(scaled, std::integral_constant<Decay, Decay::kNone>{}, hi_tag);
  };
  const auto with_scale = [&](auto hi_tag) {
    return scalars.grad_factor != 1.0f ? with_decay(std::true_type{}, hi_tag) : with_decay(std::false_type{}, hi_tag);
  };
  if constexpr (PREC == Precision::kStochastic) {
    if (hi) return with_scale(std::true_type{});
  }
  return with_scale(std::false_type{});
}

}  // namespace
}  // namespace fusedopt::cpu::adam_bf16_avx2
#endif
