// 8-bit optimizer state (state_dtype=torch.uint8): bitsandbytes' blockwise scheme. A state
// buffer is uint8 codes in the param's flat order plus one fp32 absmax per block of
// kQuantBlock elements; code c stands for map[c] * absmax of its block, `map` being
// bitsandbytes' dynamic map (256 sorted values in [-1, 1]: the signed one for state 0 —
// exp_avg, momentum_buffer — the unsigned one for the others — exp_avg_sq, max_exp_avg_sq).
// The maps are built in Python (fusedopt/_quantization.py, checked against bitsandbytes) and
// handed to the kernels as one buffer: 512 floats (signed map, unsigned map), then for each
// map the bucket tables of quantize_code, then for each map its packed bucket table
// (nearest_code_packed).
//
// A step over one block: dequantize every state into fp32 locals, run the algorithm's
// step_element on them (the param update uses these fp32 moments, before requantization, as
// bitsandbytes does), find each state's new absmax over the block, and requantize: the
// nearest code, or under stochastic rounding one of the two neighbouring codes with
// probabilities that make the code's value unbiased.
#pragma once
#include <cmath>
#include "element.h"

namespace fusedopt {

// The host loops of quantized_block are vectorized by OpenMP SIMD on the CPU build; the CUDA
// module's host compile has no OpenMP (and runs none of them).
#if defined(_OPENMP)
#define FUSEDOPT_SIMD _Pragma("omp simd")
#define FUSEDOPT_SIMD_MAX_OF_M _Pragma("omp simd reduction(max : m)")
#else
#define FUSEDOPT_SIMD
#define FUSEDOPT_SIMD_MAX_OF_M
#endif

constexpr int kQuantBlock = 256;
constexpr int kQuantMapSize = 256;

// The storage type of an 8-bit state buffer: a code.
struct q8_t {
  uint8_t code;
};

// Buckets of normalized values: by sign, then 25 binades [2^-24, 2^1) cut in 256 by the top 8
// mantissa bits (0.39% wide: narrower than the gap between any two neighbouring midpoints of
// the maps, 0.70% at least, so at most one code boundary falls in a bucket); values below
// 2^-24 fall in the first bucket of their sign. kBucketMinExponent is the float exponent field
// of 2^-24. Nearest codes then take two table reads and no search: x's code is the bucket's
// base code, plus one where x is above the bucket's threshold (the boundary inside it, or
// +inf). The CPU reads the tables with gathers, which are slow on some x86 parts; two per value
// instead of a binary search's eight.
constexpr int kBucketMinExponent = 103;
constexpr int kBucketsPerSign = 25 * 256;
constexpr int kBuckets = 2 * kBucketsPerSign;

// Which map state k uses: signed for the first (a moment with a sign), unsigned for the rest.
FUSEDOPT_HD const float* quant_map(const float* maps, int k) { return maps + (k == 0 ? 0 : kQuantMapSize); }

// After the two maps, per map: kBuckets int32 base codes, then kBuckets float thresholds
// (fusedopt/_quantization.py builds them from the maps' midpoints).
FUSEDOPT_HD const int32_t* quant_base(const float* maps, int k) {
  return reinterpret_cast<const int32_t*>(maps + 2 * kQuantMapSize + (k == 0 ? 0 : 2 * kBuckets));
}
FUSEDOPT_HD const float* quant_threshold(const float* maps, int k) {
  return maps + 2 * kQuantMapSize + (k == 0 ? 0 : 2 * kBuckets) + kBuckets;
}

// After both maps' bucket tables, per map kBucketsPerSign packed entries of the positive
// buckets: base code << 16 | the threshold's low 15 bits folded as 0xFFFF - bits (0x7FFF where
// the bucket holds no threshold). nearest_code_packed reads one of them where quantize_code
// reads two.
FUSEDOPT_HD const uint32_t* quant_packed(const float* maps, int k) {
  return reinterpret_cast<const uint32_t*>(maps + 2 * kQuantMapSize + 4 * kBuckets + (k == 0 ? 0 : kBucketsPerSign));
}

// The whole buffer, in floats (the sections above).
constexpr int kQuantMapsFloats = 2 * kQuantMapSize + 4 * kBuckets + 2 * kBucketsPerSign;

FUSEDOPT_HD int bucket_of(float x) {
  const uint32_t u = float_bits(x);
  const int e = int((u >> 23) & 0xFFu) - kBucketMinExponent;
  const int in_sign = e < 0 ? 0 : (e > 24 ? kBucketsPerSign - 1 : e * 256 + int((u >> 15) & 0xFFu));
  return int(u >> 31) * kBucketsPerSign + in_sign;
}

// The stochastic code of x given its nearest code: between the neighbouring codes lo <= x <
// hi, hi with probability (x - map[lo]) / (map[hi] - map[lo]), drawn from 16 random bits.
FUSEDOPT_HD int stochastic_code(const float* map, float x, int nearest, uint32_t random16) {
  constexpr int kLast = kQuantMapSize - 1;
  int lo = nearest - int(x < map[nearest]);
  lo = lo < 0 ? 0 : lo;
  const int hi = lo < kLast ? lo + 1 : kLast;
  const float below = x - map[lo], above = map[hi] - x;
  // P(up) = below / (below + above); u uniform in [0, 1) on 16 bits.
  const float u = float(random16 & 0xFFFFu) * (1.0f / 65536.0f);
  return lo + (int(below > 0.0f) & int(u * (below + above) < below) & int(hi != lo));
}

// The code for the normalized value x (x = value * (1 / absmax), in [-1, 1]). Nearest: the
// number of the map's midpoints (float32 of (map[c] + map[c+1]) / 2) below x. Stochastic:
// stochastic_code. Branch-free (selects only), so the CPU loop vectorizes.
template <bool STOCHASTIC>
FUSEDOPT_HD int quantize_code(const float* map, const int32_t* base, const float* threshold, float x,
                              uint32_t random16) {
  const int b = bucket_of(x);
  const int nearest = base[b] + int(x > threshold[b]);
  if constexpr (!STOCHASTIC) {
    (void)map;
    (void)random16;
    return nearest;
  } else {
    return stochastic_code(map, x, nearest, random16);
  }
}

// quantize_code<false> with one table read instead of two. |x|'s bucket is the same as
// bucket_of's positive one; inside it x and its threshold share sign, exponent and top 8
// mantissa bits, so x > threshold compares their low 15 bits, and packed = base << 16 |
// (0xFFFF - threshold's low 15 bits) carries into bit 16 exactly when it holds: the sum with
// x's low 15 bits is the code. A bucket with no threshold stores 0x7FFF, which never carries
// (even with the +1 below). Negative x: the signed map (mirrored) is symmetric about 0 apart
// from its last midpoint (_quantization.packed_table checks it), which makes code(-a) =
// max(kPackedMirror - #{midpoints <= a}, 0), the count taken with +1 (>= instead of >); every midpoint of
// the unsigned map is positive, so a negative x (and -0) has code 0. NaN and inf land in the
// last bucket as in bucket_of. The same codes as quantize_code<false> bit for bit
// (tests/test_quantized_codec.py, every ISA).
constexpr int kPackedMirror = 254;  // twice the signed map's 127 negative midpoints
FUSEDOPT_HD int nearest_code_packed(const uint32_t* packed, bool mirrored, float x) {
  const uint32_t u = float_bits(x);
  const uint32_t magnitude = u & 0x7FFFFFFFu;
  const uint32_t top = magnitude >> 15;  // exponent << 8 | top 8 mantissa bits
  constexpr uint32_t kFirst = uint32_t(kBucketMinExponent) << 8;
  uint32_t b = top > kFirst ? top - kFirst : 0u;
  b = b < uint32_t(kBucketsPerSign - 1) ? b : uint32_t(kBucketsPerSign - 1);
  const uint32_t negative = u >> 31;
  const int count = int((packed[b] + (magnitude & 0x7FFFu) + negative) >> 16);
  const int mirror = kPackedMirror - count > 0 ? kPackedMirror - count : 0;
  return negative == 0u ? count : (mirrored ? mirror : 0);
}

// The table reads of quantized_block, for one state k over the block's n elements: codes to
// values (map[c] * scale) and values to codes (nearest_code_packed of v * inv, then under
// stochastic rounding stochastic_code with the element's random bits, as step_element draws
// them: quantize_code's codes). This one reads the tables element by element (vectorized to
// gathers on the CPU); the CPU's AVX-512 build passes its own codec with the same results
// (cpu/quantized_simd.h).
struct TableCodec {
  void dequantize(const float* maps, int k, const uint8_t* __restrict__ c, float scale, float* __restrict__ out,
                  int n) const {
    const float* __restrict__ map = quant_map(maps, k);
    FUSEDOPT_SIMD
    for (int i = 0; i < n; ++i) out[i] = map[c[i]] * scale;
  }

  template <Precision PREC>
  void quantize(const float* maps, int k, const float* __restrict__ v, float inv, uint8_t* __restrict__ c, int n,
                const RoundingKeys& keys) const {
    const float* __restrict__ map = quant_map(maps, k);
    const uint32_t* __restrict__ packed = quant_packed(maps, k);
    const bool mirrored = k == 0;  // the signed map
    const uint32_t shift = k == 2 ? 16 : 0;  // random bits: state 0 a >> 16, state 1 b, state 2 b >> 16
    FUSEDOPT_SIMD
    for (int i = 0; i < n; ++i) {
      const float x = v[i] * inv;
      const int nearest = nearest_code_packed(packed, mirrored, x);
      if constexpr (PREC == Precision::kStochastic) {
        const ElementRandom r = element_random<PREC>(keys, i, true);
        c[i] = uint8_t(stochastic_code(map, x, nearest, k == 0 ? r.a >> 16 : r.b >> shift));
      } else {
        c[i] = uint8_t(nearest);
      }
    }
  }
};

// One block of algorithm A on a param with 8-bit states: elements [0, n) of the arrays
// handed in (n <= kQuantBlock; the arrays start at the block's first element), the states'
// codes and this block's absmax slot of each state. `slot`: track_stats sums (or null), added
// as run_piece does. Runs on the host (the CPU loop); the CUDA kernel splits the same steps
// over a thread block.
template <class A, typename P, Precision PREC, bool V, bool FIRST, typename RunPiece, typename Codec = TableCodec>
inline void quantized_block(P* __restrict__ param, const P* __restrict__ grad, q8_t* const (&codes)[3],
                            float* const (&absmax)[3], void* __restrict__ extra, int n, const float* maps,
                            const typename A::template Scalars<ComputeOf<P>>& scalars, const RoundingKeys& keys,
                            RunPiece run_piece, const Codec& codec = Codec{}) {
  constexpr int kStates = A::template kStates<V>;
  alignas(64) float s[3][kQuantBlock];
  for (int k = 0; k < kStates; ++k) {
    if (A::template reads_state<V, FIRST>(k)) {
      codec.dequantize(maps, k, reinterpret_cast<const uint8_t*>(codes[k]), *absmax[k], s[k], n);
    } else {
      for (int i = 0; i < n; ++i) s[k][i] = 0.0f;
    }
  }
  float* s0 = s[0];
  float* s1 = s[1];
  float* s2 = s[2];
  run_piece(n, [&](int64_t i, auto st) {
    step_element<A, P, float, PREC, V, FIRST>(param, grad, s0, s1, s2, extra, i, scalars, keys, st);
  });
  for (int k = 0; k < kStates; ++k) {
    const float* __restrict__ v = s[k];
    float m = 0.0f;
    FUSEDOPT_SIMD_MAX_OF_M
    for (int i = 0; i < n; ++i) m = m > std::fabs(v[i]) ? m : std::fabs(v[i]);
    *absmax[k] = m;
    const float inv = m > 0.0f ? 1.0f / m : 0.0f;  // x = value * (1 / absmax), as _quantization.quantize
    codec.template quantize<PREC>(maps, k, v, inv, reinterpret_cast<uint8_t*>(codes[k]), n, keys);
  }
}

}  // namespace fusedopt
