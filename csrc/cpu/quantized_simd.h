// The 8-bit codec of the CPU's AVX-512 build: quantized_block's table reads (quantized.h:
// TableCodec) done with the tables in zmm registers instead of by gathers (16-lane gathers are
// slow on this Xeon: the old AVX-512 build was slower than the AVX2 one). Same results bit for
// bit (tests/test_quantized_codec.py, tests/test_isa.py):
//   dequantize: map[c] by byte permutes of the map's four byte planes where the CPU has
//     AVX512_VBMI (dequantize_byte_planes), else by vpermi2ps over the map in 16 registers
//     (Map256: 8 permutes and a blend tree on the code's bits 5..7);
//   nearest code (the number of the map's 255 midpoints below x): DecadeSearch, which uses the
//     dynamic maps' structure (regions between decades, evenly spaced midpoints inside) to
//     compute the code, and sends the rare lanes it cannot be sure of to quantize_code (about
//     half the vector operations of the branch-free binary search over the midpoints by
//     permutes it replaced, commit ed740d9); maps without that structure get TableCodec;
//   stochastic code: quantize_code<true>'s operations on that nearest code, map values read
//     with Map256.
// Measured single-threaded on the 4M-element AdamW step (Sapphire Rapids, shared machine):
// about 4.0 ns/element with gathers, 1.9-2.1 with this codec; the fp32 step itself (sqrt and
// divide) is about 0.9 of that. The baseline build keeps TableCodec (the CUDA kernel its
// quantize_code), the AVX2 build PackedGatherCodec (end of this file): TableCodec with the
// nearest codes in intrinsics, one gather of the packed bucket table per 8 lanes (AVX2's 8-lane
// gathers cost about what these permutes do; the 256-entry map does not fit its registers).
//   Adam on fp32 params (round-to-nearest, no amsgrad, no telemetry) takes adam_blocks, a
// software pipeline over a piece's blocks that overlaps one block's update (bound by the
// divider) with the next block's dequantization and the previous block's code search (bound
// by the vector ports). bench/q8_block_bench.cpp, TSC cycles per element, one thread, blocks
// in L2, this Xeon: quantized_block with the codec before this pipeline 3.8 (dequantize m, v
// 0.30 + 0.30, update 1.05, absmax 0.17, nearest m, v 0.82 + 0.70); then the searches 0.68 +
// 0.58 on their own, quantized_block 3.5, adam_blocks 2.65-2.7 (2.75-2.8 on a later day); with
// the integer tie test and mask stores (DecadeSearch) and no grad multiply at grad factor 1,
// the searches 0.68 + 0.55 and adam_blocks 2.55-2.6 in the same minutes (-5 to -7%); with the
// codes left in the upper halves (nearest_high: no shift, a one-uop mirror, a byte-permute
// pack) 2.33 against 2.40 (medians of 8 interleaved runs, a quieter hour). Streaming on one
// thread it then ran at ~2.6-2.7 whichever of these versions, waiting on L2 fills: prefetching
// the next block's param and grad lines into L1 (besides the page kicks) took that to 2.3 (2.1
// in cache that hour); GPT-2 41.7M, two threads: 20.5-21.5 -> 18.9-19.4 ms.
#pragma once
#include <cmath>
#include <cstring>

#include "../fusedopt/adam.h"
#include "../fusedopt/quantized.h"
#include "page_kick.h"
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512DQ__)
#include <immintrin.h>
#define FUSEDOPT_QUANT_AVX512 1
#elif defined(__AVX2__)
#include <immintrin.h>
#endif

#ifndef FUSEDOPT_ISA
#error "quantized_simd.h belongs to the per-ISA CPU build (optim_kernels.cpp)"
#endif

namespace fusedopt::cpu::FUSEDOPT_ISA {

#if defined(FUSEDOPT_QUANT_AVX512)

// The per-map tables of the codec, built from the kernels' maps buffer (quantized.h) once per
// step call (a few microseconds): the map itself, its byte planes and the decade search's
// tables.
struct alignas(64) RegisterMapTables {
  float map[kQuantMapSize];
  // Byte b of every map value (little-endian), for the byte-permute dequantizer.
  uint8_t planes[4][kQuantMapSize];

  // The decade search (DecadeSearch), where the map has the structure it relies on.
  bool decades_valid;
  float binade_bound[32];          // the region boundary inside binade [2^(i-24), 2^(i-23)), or +inf
  int32_t binade_region[32];       // the region at the binade's start
  // u = fma(|x|, slope, -offset) = 2^16 t + kTieWindow / 2, where t is the region's first code
  // plus the number of its inner midpoints below |x| (floor): floor(u)'s upper 16 bits are the
  // code (clamped to the region's last, min(floor(u), top)), its lower 16 say how near t is to
  // an integer.
  float region_slope[16], region_offset[16];
  int32_t region_top[16];          // the region's last code (its first + its inner midpoints) << 16 | 0xFFFF
  int32_t mirror;                  // a negative x's code is max(mirror - code(|x|), 0)

  void build(const float* qmap) {
    std::memcpy(map, qmap, sizeof(map));
    for (int c = 0; c < kQuantMapSize; ++c) {
      uint32_t bits;
      std::memcpy(&bits, qmap + c, 4);
      for (int b = 0; b < 4; ++b) planes[b][c] = uint8_t(bits >> (8 * b));
    }
    float mid[kQuantMapSize - 1];
    for (int c = 0; c + 1 < kQuantMapSize; ++c)
      mid[c] = float((double(qmap[c]) + double(qmap[c + 1])) / 2.0);  // as _quantization.midpoints
    decades_valid = build_decades(mid);
  }

  // The decade search's tables, for bitsandbytes' dynamic maps: above 0 (the signed map's lower
  // half mirrors its upper half), decade d = 0..6 holds n_d values spread evenly over
  // (0.1, 1) * 10^(d-6) (n_d = 2^d signed, 2^(d+1) unsigned), then 1.0. So the positive midpoints
  // are 8 irregular ones (R_d between decades, R_7 below 1.0) cutting [0, inf) into 9 regions,
  // and inside region d + 1 (R_d < x <= R_d+1) n_d - 1 evenly spaced ones: the k-th of them lies
  // at t = first + k of t(x) = fma(x, slope_d, -offset_d) (offset_d taking the region's first
  // code in), so the code there is min(floor(t), first + n_d - 1) (floor(t) >= first). False
  // (and the codec quantizes as TableCodec) when any of that does not hold: each inner
  // midpoint's u, computed in float as the kernel does (one fused multiply-add), must lie in
  // [2^16 k, 2^16 k + kTieWindow) for its k = first + k', and each binade may hold
  // one R at most.
  bool build_decades(const float (&mid)[kQuantMapSize - 1]) {
    int negative = 0;
    while (negative < kQuantMapSize - 1 && mid[negative] < 0.0f) ++negative;
    const bool is_signed = negative > 0;
    if (is_signed) {
      if (negative != 127) return false;
      for (int k = 0; k < 127; ++k)
        if (mid[126 - k] != -mid[127 + k]) return false;
    }
    const float* pos = mid + negative;  // R_0, the inner midpoints of decade 0, R_1, ...
    const int n_pos = kQuantMapSize - 1 - negative;
    float boundary[8];
    boundary[0] = pos[0];
    int j = 0;
    set_region(0, 0.0f, 0.0f, negative, 0);  // x <= R_0: t = first + 0.5, never near an integer
    for (int d = 0; d < 7; ++d) {
      const int n = is_signed ? 1 << d : 2 << d;
      if (j + n >= n_pos) return false;
      const double scale = std::pow(10.0, d - 6);
      const int first = negative + j + 1;
      float slope = float(n / (0.9 * scale)), offset = float(0.1 * n / 0.9 - first);
      if (n == 1) slope = 0.0f, offset = 0.0f;
      set_region(d + 1, slope, offset, first, n - 1);
      slope = region_slope[d + 1];
      offset = region_offset[d + 1];
      for (int k = 1; k < n; ++k) {
        const float u = std::fma(pos[j + k], slope, -offset), at = std::ldexp(float(first + k), 16);
        if (!(u >= at && u < at + kTieWindow)) return false;
      }
      // floor(u) >> 16 >= first in the region
      if (!(std::fma(boundary[d], slope, -offset) >= std::ldexp(float(first), 16))) return false;
      j += n;
      boundary[d + 1] = pos[j];
    }
    if (j != n_pos - 1) return false;
    for (int r = 8; r < 16; ++r) set_region(r, 0.0f, 0.0f, kQuantMapSize - 1, 0);  // x > R_7: 255
    for (int b = 0; b < 32; ++b) {
      const float lo = std::ldexp(1.0f, b - 24), hi = std::ldexp(1.0f, b - 23);
      binade_region[b] = 0;
      binade_bound[b] = INFINITY;
      for (int d = 0; d < 8; ++d) {
        if (boundary[d] < lo) ++binade_region[b];
        else if (boundary[d] < hi) {
          if (binade_bound[b] != INFINITY) return false;
          binade_bound[b] = boundary[d];
        }
      }
    }
    // Binade 0 takes every x below 2^-23 (zero and denormals too), binade 31 every x from 2^7.
    if (!(boundary[0] >= std::ldexp(1.0f, -24)) || !(boundary[7] < std::ldexp(1.0f, 7))) return false;
    mirror = 2 * negative;
    return true;
  }

  // Lanes whose floor(u) has its low 16 bits below kTieWindow (t within 2^-14 of an integer),
  // or whose u is NaN or out of range (the conversion's 0x80000000), take the exact scalar
  // path: about 0.012% of values spread over [-1, 1] (one lane in ~30 blocks of 256; the fix-up
  // loop's branches mispredict, so it pays to keep it rare). Any other lane's code is right: its
  // u >= 2^16 j + kTieWindow > u(midpoint j) and u < 2^16 (j + 1) <= u(midpoint j + 1), and u is
  // monotone in |x|, so |x| lies strictly between the two midpoints (build_decades checks every
  // midpoint's u; u below 2^24 has an ulp of at most 1, and bitsandbytes' maps put their
  // midpoints' u within 2 of 2^16 k + 4). The test is one vptestmd on the integer the code comes
  // from (a float band check took three operations: reduce, abs, compare), and the code stays in
  // the upper half for the mirror's 16-bit subtract and the byte pack (no shift).
  static constexpr float kTieWindow = 8.0f;

 private:
  // offset: the line's offset less the first code; slope 0 (one code): t = first + 0.5. Stored
  // for u (build_decades checks these values, as the kernel computes with them).
  void set_region(int r, float slope, float offset, int first, int last) {
    region_slope[r] = std::ldexp(slope, 16);
    region_offset[r] = std::ldexp(slope == 0.0f ? -(float(first) + 0.5f) : offset, 16) - kTieWindow / 2;
    region_top[r] = (first + last) << 16 | 0xFFFF;
  }
};

// The unpacks of dequantize_byte_planes leave code 16k + 4L + e of 64 in dword e of 128-bit
// lane L of result k when it sat at byte 16L + 4k + e: the codes are put there first.
struct alignas(64) BytePlaneOrder {
  uint8_t bytes[64];
};
constexpr BytePlaneOrder byte_plane_order() {
  BytePlaneOrder o{};
  for (int q = 0; q < 64; ++q) o.bytes[q] = uint8_t(16 * ((q % 16) / 4) + 4 * (q / 16) + q % 4);
  return o;
}
inline constexpr BytePlaneOrder kBytePlaneOrder = byte_plane_order();

// Dequantizes with byte permutes (AVX512_VBMI: vpermi2b looks 64 codes up in a 128-byte
// table at once): each byte of the map values is looked up as a byte plane, and the four
// planes are interleaved back into floats; about a third of the operations of the vpermi2ps
// path. Compiled for VBMI here and called only where the CPU has it (dispatch.cpp).
struct BytePlaneTables {
  __m512i t[4][4];  // plane b, 64-byte quarter j
  __attribute__((target("avx512vbmi"))) explicit BytePlaneTables(const uint8_t (&planes)[4][kQuantMapSize]) {
    for (int b = 0; b < 4; ++b)
      for (int j = 0; j < 4; ++j) t[b][j] = _mm512_loadu_si512(planes[b] + 64 * j);
  }
  // The map values of 64 codes (in kBytePlaneOrder) as four vectors of 16 floats' bits.
  __attribute__((target("avx512vbmi"))) void lookup(__m512i code, __m512i (&d)[4]) const {
    const __mmask64 high = _mm512_movepi8_mask(code);  // code >= 128: the upper half of each plane
    __m512i byte[4];
    for (int b = 0; b < 4; ++b)
      byte[b] = _mm512_mask_blend_epi8(high, _mm512_permutex2var_epi8(t[b][0], code, t[b][1]),
                                       _mm512_permutex2var_epi8(t[b][2], code, t[b][3]));
    const __m512i w01lo = _mm512_unpacklo_epi8(byte[0], byte[1]), w01hi = _mm512_unpackhi_epi8(byte[0], byte[1]);
    const __m512i w23lo = _mm512_unpacklo_epi8(byte[2], byte[3]), w23hi = _mm512_unpackhi_epi8(byte[2], byte[3]);
    d[0] = _mm512_unpacklo_epi16(w01lo, w23lo);
    d[1] = _mm512_unpackhi_epi16(w01lo, w23lo);
    d[2] = _mm512_unpacklo_epi16(w01hi, w23hi);
    d[3] = _mm512_unpackhi_epi16(w01hi, w23hi);
  }
};

// 64 codes at c to 64 floats at out (dequantize_byte_planes' loop body, no tail).
__attribute__((target("avx512vbmi"))) inline void dequantize_byte_planes64(const uint8_t (&planes)[4][kQuantMapSize],
                                                                            const uint8_t* __restrict__ c, __m512 s,
                                                                            float* __restrict__ out) {
  const BytePlaneTables tables(planes);
  __m512i d[4];
  tables.lookup(_mm512_permutexvar_epi8(_mm512_load_si512(kBytePlaneOrder.bytes), _mm512_loadu_si512(c)), d);
  for (int k = 0; k < 4; ++k) _mm512_storeu_ps(out + 16 * k, _mm512_mul_ps(_mm512_castsi512_ps(d[k]), s));
}

__attribute__((target("avx512vbmi"))) inline void dequantize_byte_planes(const uint8_t (&planes)[4][kQuantMapSize],
                                                                          const uint8_t* __restrict__ c, float scale,
                                                                          float* __restrict__ out, int n) {
  const BytePlaneTables tables(planes);
  const __m512i order = _mm512_load_si512(kBytePlaneOrder.bytes);
  const __m512 s = _mm512_set1_ps(scale);
  for (int i = 0; i < n; i += 64) {
    const int left = n - i;
    const __mmask64 lanes = left >= 64 ? ~__mmask64(0) : (__mmask64(1) << left) - 1;
    __m512i d[4];
    tables.lookup(_mm512_permutexvar_epi8(order, _mm512_maskz_loadu_epi8(lanes, c + i)), d);
    for (int k = 0; k < 4; ++k) {
      const int rest = left - 16 * k;
      if (rest <= 0) break;
      const __mmask16 m = rest >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << rest) - 1u);
      _mm512_mask_storeu_ps(out + i + 16 * k, m, _mm512_mul_ps(_mm512_castsi512_ps(d[k]), s));
    }
  }
}

class RegisterCodec {
 public:
  // byte_permutes: dequantize with dequantize_byte_planes (the CPU has AVX512_VBMI).
  RegisterCodec(const float* maps, bool byte_permutes) : byte_permutes_(byte_permutes) {
    tables_[0].build(quant_map(maps, 0));
    tables_[1].build(quant_map(maps, 1));
  }

  void dequantize(const float*, int k, const uint8_t* __restrict__ c, float scale, float* __restrict__ out,
                  int n) const {
    if (byte_permutes_) return dequantize_byte_planes(tables_[k != 0].planes, c, scale, out, n);
    const Map256 map(tables_[k != 0].map);
    const __m512 s = _mm512_set1_ps(scale);
    for (int i = 0; i < n; i += 16) {
      const __mmask16 lanes = tail_mask(n - i);
      const __m512i code = _mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(lanes, c + i));
      _mm512_mask_storeu_ps(out + i, lanes, _mm512_mul_ps(map.lookup(code), s));
    }
  }

  // Whether adam_blocks can run (the byte-permute dequantizer).
  bool fused_ok() const {
    return byte_permutes_ && tables_[0].decades_valid && tables_[0].mirror != 0 && tables_[1].decades_valid &&
           tables_[1].mirror == 0;
  }

  // Adam (not amsgrad) on fp32 params, round-to-nearest states, no telemetry: whole blocks
  // [0, blocks) of a piece, as quantized_block does them one by one (the same operations on
  // every value: bit-identical), but with the next block's codes dequantized inside this block's
  // update loop and the previous block's codes found there too. The update is bound by the
  // divider (sqrt and divide of 16 lanes: ~16 cycles, against ~11 of other vector work), the
  // nearest-code search by the vector ports; one after the other (quantized_block's phases,
  // each longer than the reorder window) the divider idles through the searches. Each block
  // kicks the hardware prefetcher on the pages its streams reach next (page_kick.h).
  void adam_blocks(float* __restrict__ param, const float* __restrict__ grad, uint8_t* __restrict__ c0,
                   uint8_t* __restrict__ c1, float* __restrict__ a0, float* __restrict__ a1, int64_t blocks,
                   const float* maps, const Adam::Scalars<float>& k) const {
    // A grad factor of 1 (no unscaling, no clipping) multiplies by nothing: x * 1 is x.
    const bool scaled = k.grad_factor != 1.0f;
    if (k.coupled_wd != 0.0f) {
      if (scaled) adam_blocks_with<true, true>(param, grad, c0, c1, a0, a1, blocks, maps, k);
      else adam_blocks_with<true, false>(param, grad, c0, c1, a0, a1, blocks, maps, k);
    } else {
      if (scaled) adam_blocks_with<false, true>(param, grad, c0, c1, a0, a1, blocks, maps, k);
      else adam_blocks_with<false, false>(param, grad, c0, c1, a0, a1, blocks, maps, k);
    }
  }

  template <Precision PREC>
  void quantize(const float* maps, int k, const float* __restrict__ v, float inv, uint8_t* __restrict__ c, int n,
                const RoundingKeys& keys) const {
    const RegisterMapTables& t = tables_[k != 0];
    if (t.decades_valid && t.mirror != 0)
      return quantize_with<PREC>(DecadeSearch<true>(t), t, maps, k, v, inv, c, n, keys);
    if (t.decades_valid) return quantize_with<PREC>(DecadeSearch<false>(t), t, maps, k, v, inv, c, n, keys);
    TableCodec{}.template quantize<PREC>(maps, k, v, inv, c, n, keys);  // other maps (none today)
  }

 private:
  template <bool COUPLED, bool SCALED>
  __attribute__((target("avx512vbmi"))) void adam_blocks_with(
      float* __restrict__ param, const float* __restrict__ grad, uint8_t* __restrict__ c0, uint8_t* __restrict__ c1,
      float* __restrict__ a0, float* __restrict__ a1, int64_t blocks, const float* maps,
      const Adam::Scalars<float>& k) const {
    // Block j's states live in buf[j % 3] from its dequantization (during block j - 1's
    // update) to its quantization (during block j + 1's update).
    alignas(64) float buf[3][2][kQuantBlock];
    dequantize_byte_planes(tables_[0].planes, c0, a0[0], buf[0][0], kQuantBlock);
    dequantize_byte_planes(tables_[1].planes, c1, a1[0], buf[0][1], kQuantBlock);
    // The values quantized are states times 1 / their absmax: at most 1 + 2^-22 in magnitude
    // where finite (BOUNDED); exp_avg_sq's are >= +0 or NaN (NONNEG).
    const DecadeSearch<true, false, true> search0(tables_[0]);
    const DecadeSearch<false, true, true> search1(tables_[1]);
    const __m512i order = high_code_bytes();
    const __m512 grad_factor = _mm512_set1_ps(k.grad_factor), coupled_wd = _mm512_set1_ps(k.coupled_wd);
    const __m512 decay = _mm512_set1_ps(k.decay_factor), one_minus_beta1 = _mm512_set1_ps(k.one_minus_beta1);
    const __m512 beta2 = _mm512_set1_ps(k.beta2), one_minus_beta2 = _mm512_set1_ps(k.one_minus_beta2);
    const __m512 step_size = _mm512_set1_ps(k.step_size), inv_bc2 = _mm512_set1_ps(k.inv_bias_correction2_sqrt);
    const __m512 eps = _mm512_set1_ps(k.eps);
    float inv[2] = {0.0f, 0.0f};  // 1 / absmax of the block being quantized
    for (int64_t b = 0; b <= blocks; ++b) {
      const bool update = b < blocks, next = b + 1 < blocks, quantize = b > 0;
      float* __restrict__ m = buf[b % 3][0];
      float* __restrict__ v = buf[b % 3][1];
      float* __restrict__ p = param + b * kQuantBlock;
      const float* __restrict__ g = grad + b * kQuantBlock;
      if (update) {
        kick_next_page(p, kQuantBlock * sizeof(float));
        kick_next_page(g, kQuantBlock * sizeof(float));
        kick_next_page(c0 + b * kQuantBlock, kQuantBlock);
        kick_next_page(c1 + b * kQuantBlock, kQuantBlock);
      }
      const float* __restrict__ qm = buf[(b + 2) % 3][0];  // block b - 1
      const float* __restrict__ qv = buf[(b + 2) % 3][1];
      uint8_t* __restrict__ qc0 = c0 + (b - 1) * kQuantBlock;
      uint8_t* __restrict__ qc1 = c1 + (b - 1) * kQuantBlock;
      const __m512 next_scale0 = _mm512_set1_ps(next ? a0[b + 1] : 0.0f);
      const __m512 next_scale1 = _mm512_set1_ps(next ? a1[b + 1] : 0.0f);
      const __m512 qscale0 = _mm512_set1_ps(inv[0]), qscale1 = _mm512_set1_ps(inv[1]);
      __mmask16 sure0[kQuantBlock / 16], sure1[kQuantBlock / 16];
      __m512 max0 = _mm512_setzero_ps(), max1 = _mm512_setzero_ps();
      for (int q = 0; q < kQuantBlock; q += 64) {
        if (next) {
          dequantize_byte_planes64(tables_[0].planes, c0 + (b + 1) * kQuantBlock + q, next_scale0,
                                   buf[(b + 1) % 3][0] + q);
          dequantize_byte_planes64(tables_[1].planes, c1 + (b + 1) * kQuantBlock + q, next_scale1,
                                   buf[(b + 1) % 3][1] + q);
        }
        if (update) {
          // The param and grad lines of the next block into L1 (the L2 streamer, kicked at each
          // page, brings them to L2): the loop then finds them there instead of waiting for L2
          // fills; one block ahead, as reads (a write-intent prefetch of the param measured no
          // better). Streaming on one thread, bench/q8_block_bench.sh 1 f: 2.58 -> 2.33
          // cycles/element (2.12 in cache); half a block ahead no gain, 1.5 blocks 2.45.
          for (int i = q; i < q + 64; i += 16) {
            __builtin_prefetch(p + kQuantBlock + i, 0, 3);
            __builtin_prefetch(g + kQuantBlock + i, 0, 3);
          }
          // Adam::update lane-wise, in its operation order (its fused multiply-adds, no others).
          for (int i = q; i < q + 64; i += 16) {
            __m512 pv = _mm512_loadu_ps(p + i);
            __m512 gv = _mm512_loadu_ps(g + i);
            if constexpr (SCALED) gv = _mm512_mul_ps(gv, grad_factor);
            // Uncoupled, Adam adds 0, which only turns a -0 grad into +0; left out: g feeds only
            // g * g (+0 either way) and m + (1 - beta1) * (g - m), the same for g = +-0 (g - m is
            // -m for m != 0; for m = +-0 the sum is +0 either way).
            if constexpr (COUPLED) gv = _mm512_add_ps(gv, _mm512_mul_ps(coupled_wd, pv));
            pv = _mm512_mul_ps(pv, decay);
            __m512 mv = _mm512_load_ps(m + i);
            mv = _mm512_fmadd_ps(one_minus_beta1, _mm512_sub_ps(gv, mv), mv);
            __m512 vv = _mm512_fmadd_ps(beta2, _mm512_load_ps(v + i), _mm512_mul_ps(one_minus_beta2, _mm512_mul_ps(gv, gv)));
            const __m512 denom = _mm512_fmadd_ps(_mm512_sqrt_ps(vv), inv_bc2, eps);
            pv = _mm512_fnmadd_ps(step_size, _mm512_div_ps(mv, denom), pv);
            _mm512_storeu_ps(p + i, pv);
            _mm512_store_ps(m + i, mv);
            _mm512_store_ps(v + i, vv);
            // The absmax: a max is exact, so any order gives quantized_block's (NaN aside).
            max0 = _mm512_max_ps(max0, _mm512_abs_ps(mv));
            max1 = _mm512_max_ps(max1, vv);  // |vv| = vv: >= +0 or NaN
          }
        }
        if (quantize) {
          nearest64_high(search0, order, qm + q, qscale0, qc0 + q, sure0 + q / 16);
          nearest64_high(search1, order, qv + q, qscale1, qc1 + q, sure1 + q / 16);
        }
      }
      if (quantize) {
        constexpr int kMasks = kQuantBlock / 16;
        if (!all_sure(sure0, kMasks)) fix_unsure<Precision::kPlain>(maps, 0, qm, inv[0], qc0, kQuantBlock, sure0, nullptr);
        if (!all_sure(sure1, kMasks)) fix_unsure<Precision::kPlain>(maps, 1, qv, inv[1], qc1, kQuantBlock, sure1, nullptr);
      }
      if (update) {
        const float mx0 = _mm512_reduce_max_ps(max0), mx1 = _mm512_reduce_max_ps(max1);
        a0[b] = mx0;
        a1[b] = mx1;
        inv[0] = mx0 > 0.0f ? 1.0f / mx0 : 0.0f;  // as quantized_block
        inv[1] = mx1 > 0.0f ? 1.0f / mx1 : 0.0f;
      }
    }
  }

  template <Precision PREC, typename Searcher>
  static void quantize_with(const Searcher& search, const RegisterMapTables& t, const float* maps, int k,
                            const float* __restrict__ v, float inv, uint8_t* __restrict__ c, int n,
                            const RoundingKeys& keys) {
    const __m512 scale = _mm512_set1_ps(inv);
    // Lanes the search is not sure of, per vector: redone by quantize_code after the loop, so
    // the rare branch to them sits outside the vector loop's long dependency chains.
    __mmask16 sure[kQuantBlock / 16];
    alignas(64) uint32_t random[kQuantBlock];
    if constexpr (PREC == Precision::kStochastic) {
      // The random bits of the block first (element.h: element_random; vectorized by the
      // compiler): state 0 a >> 16, state 1 b, state 2 b >> 16.
      const uint32_t key = k == 0 ? keys.a : keys.b;
      const uint32_t shift = k == 1 ? 0 : 16;
#pragma omp simd
      for (int i = 0; i < n; ++i) random[i] = random_bits(key, keys.offset, i) >> shift;
      const Map256 map(t.map);
      for (int i = 0; i < n; i += 16) {
        const __mmask16 lanes = tail_mask(n - i);
        const __m512 x = _mm512_mul_ps(_mm512_maskz_loadu_ps(lanes, v + i), scale);
        const __m512i r = _mm512_maskz_loadu_epi32(lanes, random + i);
        const __m512i nearest = search.nearest(x, sure[i / 16]);
        _mm512_mask_cvtepi32_storeu_epi8(c + i, lanes, stochastic(map, x, nearest, r));
      }
    } else {
      int i = 0;
      const __m512i order = pack_order();
      for (; i + 64 <= n; i += 64) nearest64(search, order, v + i, scale, c + i, sure + i / 16);
      for (; i < n; i += 16) {
        const __mmask16 lanes = tail_mask(n - i);
        const __m512 x = _mm512_mul_ps(_mm512_maskz_loadu_ps(lanes, v + i), scale);
        _mm512_mask_cvtepi32_storeu_epi8(c + i, lanes, search.nearest(x, sure[i / 16]));
      }
    }
    // Lanes past n (the last vector's tail) count as sure.
    const int masks = (n + 15) / 16;
    if (n % 16 != 0) sure[masks - 1] |= __mmask16(~tail_mask(n % 16));
    if (!all_sure(sure, masks)) fix_unsure<PREC>(maps, k, v, inv, c, n, sure, random);
  }

  // The lanes the search was not sure of, by quantize_code: n elements, whose masks count
  // the lanes past n (the last vector's tail) as sure (quantize_with sets them so, for
  // all_sure too; adam_blocks' blocks are whole).
  template <Precision PREC>
  static void fix_unsure(const float* maps, int k, const float* __restrict__ v, float inv, uint8_t* __restrict__ c,
                         int n, const __mmask16* sure, const uint32_t* random) {
    const float* map = quant_map(maps, k);
    const int32_t* base = quant_base(maps, k);
    const float* threshold = quant_threshold(maps, k);
    for (int j = 0; j < (n + 15) / 16; ++j)
      for (unsigned m = ~unsigned(sure[j]) & 0xFFFFu; m != 0; m &= m - 1) {
        const int i = 16 * j + __builtin_ctz(m);
        const float x = v[i] * inv;
        c[i] = uint8_t(PREC == Precision::kStochastic ? quantize_code<true>(map, base, threshold, x, random[i])
                                                      : quantize_code<false>(map, base, threshold, x, 0u));
      }
  }

  // Nearest codes of 64 values (v * scale) as four vectors (HIGH: nearest_high's, the code in
  // bits 16..23 of each lane); the sure lanes' masks stored per 16 (kmovw to memory: no vector
  // port, where a mask to a register takes one).
  template <bool HIGH, typename Searcher>
  static __attribute__((always_inline)) void codes64(const Searcher& search, const float* __restrict__ v,
                                                     __m512 scale, __m512i (&code)[4], __mmask16* sure) {
    for (int q = 0; q < 4; ++q) {
      const __m512 x = _mm512_mul_ps(_mm512_loadu_ps(v + 16 * q), scale);
      __mmask16 s;
      code[q] = HIGH ? search.nearest_high(x, s) : search.nearest(x, s);
      _store_mask16(sure + q, s);
    }
  }

  // codes64's codes to 64 bytes at c: two packs and a dword permute (half the shuffle uops of
  // four vpmovdb stores).
  static __m512i pack_order() { return _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15); }
  template <typename Searcher>
  static __attribute__((always_inline)) void nearest64(const Searcher& search, __m512i order,
                                                       const float* __restrict__ v, __m512 scale,
                                                       uint8_t* __restrict__ c, __mmask16* sure) {
    __m512i code[4];
    codes64<false>(search, v, scale, code, sure);
    const __m512i bytes =
        _mm512_packus_epi16(_mm512_packus_epi32(code[0], code[1]), _mm512_packus_epi32(code[2], code[3]));
    _mm512_storeu_si512(c, _mm512_permutexvar_epi32(order, bytes));
  }

  // The same from nearest_high's codes with byte permutes (AVX512_VBMI): two vpermt2b take byte
  // 2 of every lane, an insert joins their halves (no shifts, one shuffle fewer).
  static __m512i high_code_bytes() {
    alignas(64) uint8_t idx[64];
    for (int j = 0; j < 64; ++j) idx[j] = uint8_t(4 * (j % 32) + 2);
    return _mm512_load_si512(idx);
  }
  template <typename Searcher>
  static __attribute__((always_inline, target("avx512vbmi"))) void nearest64_high(
      const Searcher& search, __m512i order, const float* __restrict__ v, __m512 scale, uint8_t* __restrict__ c,
      __mmask16* sure) {
    __m512i code[4];
    codes64<true>(search, v, scale, code, sure);
    const __m512i lo = _mm512_permutex2var_epi8(code[0], order, code[1]);
    const __m512i hi = _mm512_permutex2var_epi8(code[2], order, code[3]);
    _mm512_storeu_si512(c, _mm512_inserti64x4(lo, _mm512_castsi512_si256(hi), 1));
  }

  // Whether the first `count` sure masks cover every lane (after a block's loop).
  static bool all_sure(const __mmask16* sure, int count) {
    unsigned all = 0xFFFF;
    for (int j = 0; j < count; ++j) all &= sure[j];
    return all == 0xFFFF;
  }

  static __mmask16 tail_mask(int left) { return left >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << left) - 1u); }

  // Bit b of every lane of v, as a mask (a shift and vpmovd2m: kept off the shuffle port,
  // which the permutes saturate).
  template <int B>
  static __mmask16 bit_mask(__m512i v) { return _mm512_movepi32_mask(_mm512_slli_epi32(v, 31 - B)); }

  // A 256-entry float table in 16 registers; lookup(c) = table[c] for c in [0, 256).
  struct Map256 {
    __m512 r[16];
    explicit Map256(const float* table) {
      for (int j = 0; j < 16; ++j) r[j] = _mm512_load_ps(table + 16 * j);
    }
    __m512 lookup(__m512i c) const {
      const __mmask16 b5 = bit_mask<5>(c), b6 = bit_mask<6>(c), b7 = bit_mask<7>(c);
      __m512 q[8];
      for (int j = 0; j < 8; ++j) q[j] = _mm512_permutex2var_ps(r[2 * j], c, r[2 * j + 1]);  // bits 0..4
      for (int j = 0; j < 4; ++j) q[j] = _mm512_mask_blend_ps(b5, q[2 * j], q[2 * j + 1]);
      for (int j = 0; j < 2; ++j) q[j] = _mm512_mask_blend_ps(b6, q[2 * j], q[2 * j + 1]);
      return _mm512_mask_blend_ps(b7, q[0], q[1]);
    }
  };

  // The nearest code (the number of midpoints below x) with no table search: |x|'s binade (a
  // table of 32) and one compare against the region boundary inside it give x's region, the
  // region's line gives u (RegisterMapTables: t scaled, the region's first code taken in), and
  // the code is the upper half of min(floor(u), top) (RegisterMapTables::build_decades); a
  // negative x mirrors. `sure` clears the lanes where that could be off by one (t near an
  // integer, |x| equal to a region boundary, NaN, inf), for quantize_code. nearest_high leaves
  // the code in bits 16..23 of each lane (bits 0..15 hold no code), nearest shifts it down.
  // NONNEG (unsigned maps only): the caller's x are >= +0 or NaN (adam_blocks' exp_avg_sq),
  // so no sign is cleared or tested. BOUNDED: the caller's finite x are below 2^8 in magnitude
  // (adam_blocks: values times 1 / their absmax), so the binade needs no clamp to 31 (a larger
  // exponent, from inf or NaN only, wraps to some binade; its u is not finite: unsure).
  template <bool MIRRORED, bool NONNEG = false, bool BOUNDED = false>
  struct DecadeSearch {
    static_assert(!(MIRRORED && NONNEG), "a mirrored map has negative codes");
    __m512 bound_lo, bound_hi, slope, offset;
    __m512i region_lo, region_hi, top, mirror;

    explicit DecadeSearch(const RegisterMapTables& t)
        : bound_lo(_mm512_loadu_ps(t.binade_bound)),
          bound_hi(_mm512_loadu_ps(t.binade_bound + 16)),
          slope(_mm512_loadu_ps(t.region_slope)),
          offset(_mm512_loadu_ps(t.region_offset)),
          region_lo(_mm512_loadu_si512(t.binade_region)),
          region_hi(_mm512_loadu_si512(t.binade_region + 16)),
          top(_mm512_loadu_si512(t.region_top)),
          mirror(_mm512_set1_epi32(t.mirror << 16)) {}

    __m512i nearest(__m512 x, __mmask16& sure) const { return _mm512_srli_epi32(nearest_high(x, sure), 16); }

    __m512i nearest_high(__m512 x, __mmask16& sure) const {
      const __m512i magnitude_bits =
          NONNEG ? _mm512_castps_si512(x) : _mm512_and_si512(_mm512_castps_si512(x), _mm512_set1_epi32(0x7FFFFFFF));
      const __m512 magnitude = _mm512_castsi512_ps(magnitude_bits);
      // The binade: the exponent field less kBucketMinExponent, at least 0 (a saturating
      // subtract on 16-bit halves whose upper half is 0), at most 31.
      __m512i binade =
          _mm512_subs_epu16(_mm512_srli_epi32(magnitude_bits, 23), _mm512_set1_epi32(kBucketMinExponent));
      if constexpr (!BOUNDED) binade = _mm512_min_epi32(binade, _mm512_set1_epi32(31));
      const __m512 bound = _mm512_permutex2var_ps(bound_lo, binade, bound_hi);
      __m512i region = _mm512_permutex2var_epi32(region_lo, binade, region_hi);
      region = _mm512_mask_add_epi32(region, _mm512_cmp_ps_mask(magnitude, bound, _CMP_GT_OQ), region,
                                     _mm512_set1_epi32(1));
      const __m512 u = _mm512_fmsub_ps(magnitude, _mm512_permutexvar_ps(region, slope),
                                       _mm512_permutexvar_ps(region, offset));
      const __m512i fixed = _mm512_cvt_roundps_epi32(u, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
      // Low 16 bits of floor(u) at least kTieWindow (0x80000000, NaN's and overflow's, has none).
      const __m512i window = _mm512_set1_epi32(0xFFFF & ~(int(RegisterMapTables::kTieWindow) - 1));
      // floor(u) >> 16 >= first: u >= u(lower boundary) >= 2^16 first (build_decades).
      __m512i code = _mm512_min_epi32(fixed, _mm512_permutexvar_epi32(region, top));
      if constexpr (NONNEG) {
        sure = _mm512_test_epi32_mask(fixed, window);
        return code;
      }
      if constexpr (MIRRORED) {
        // max(mirror - code, 0) in the upper halves, by a saturating 16-bit subtract where x's
        // sign bit (bit 15 of its upper half) is set; the lower halves hold no code. The mirror
        // is off by one where |x| is a boundary itself: not sure there.
        code = _mm512_mask_subs_epu16(code, _mm512_movepi16_mask(_mm512_castps_si512(x)), mirror, code);
        sure = _mm512_mask_test_epi32_mask(_mm512_cmp_ps_mask(magnitude, bound, _CMP_NEQ_UQ), fixed, window);
      } else {
        const __mmask16 negative = _mm512_movepi32_mask(_mm512_castps_si512(x));
        code = _mm512_maskz_mov_epi32(_knot_mask16(negative), code);  // every midpoint is > 0
        sure = _mm512_test_epi32_mask(fixed, window);
      }
      return code;
    }
  };

  // quantize_code<true> given the nearest code (quantized.h, the same operations lane-wise).
  static __m512i stochastic(const Map256& map, __m512 x, __m512i nearest, __m512i random16) {
    const __m512i one = _mm512_set1_epi32(1);
    const __mmask16 below_nearest = _mm512_cmp_ps_mask(x, map.lookup(nearest), _CMP_LT_OQ);
    const __m512i lo = _mm512_max_epi32(_mm512_mask_sub_epi32(nearest, below_nearest, nearest, one),
                                        _mm512_setzero_si512());
    const __m512i hi = _mm512_min_epi32(_mm512_add_epi32(lo, one), _mm512_set1_epi32(kQuantMapSize - 1));
    const __m512 below = _mm512_sub_ps(x, map.lookup(lo));
    const __m512 above = _mm512_sub_ps(map.lookup(hi), x);
    const __m512 u = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_and_si512(random16, _mm512_set1_epi32(0xFFFF))),
                                   _mm512_set1_ps(1.0f / 65536.0f));
    const __mmask16 up = _mm512_cmp_ps_mask(below, _mm512_setzero_ps(), _CMP_GT_OQ) &
                         _mm512_cmp_ps_mask(_mm512_mul_ps(u, _mm512_add_ps(below, above)), below, _CMP_LT_OQ) &
                         _mm512_cmpneq_epi32_mask(hi, lo);
    return _mm512_mask_add_epi32(lo, up, lo, one);
  }

  RegisterMapTables tables_[2];
  bool byte_permutes_;
};

// Whether this CPU's AVX-512 has byte permutes (AVX512_VBMI); set once by kernels().
inline bool g_byte_permutes = false;

// The codec of this build for a step call's maps buffer.
inline RegisterCodec quant_codec(const float* maps) { return RegisterCodec(maps, g_byte_permutes); }

#elif defined(__AVX2__)

// The AVX2 build's codec: TableCodec, with the nearest codes of round-to-nearest written out
// in intrinsics (nearest_code_packed, 8 lanes: one gather of the packed bucket table, then
// integer adds and shifts). Dequantizing (a gather of the map) and stochastic codes stay
// TableCodec's. bench/q8_block_bench.cpp built for AVX2 (TSC cycles/element, one thread, in
// cache, this Xeon): nearest codes of m, v 2.54 + 2.52 with quantize_code's two gathers,
// 1.36 + 1.33 with the packed table vectorized by the compiler, 0.85 + 0.67 here; the whole
// block 8.3 -> 4.5.
struct PackedGatherCodec : TableCodec {
  template <Precision PREC>
  void quantize(const float* maps, int k, const float* __restrict__ v, float inv, uint8_t* __restrict__ c, int n,
                const RoundingKeys& keys) const {
    if constexpr (PREC == Precision::kStochastic) {
      TableCodec::quantize<PREC>(maps, k, v, inv, c, n, keys);
    } else {
      if (k == 0)
        nearest<true>(quant_packed(maps, k), v, inv, c, n);
      else
        nearest<false>(quant_packed(maps, k), v, inv, c, n);
    }
  }

 private:
  // nearest_code_packed lane-wise, 32 values a round (four vectors packed to bytes).
  template <bool MIRRORED>
  static void nearest(const uint32_t* packed, const float* __restrict__ v, float inv, uint8_t* __restrict__ c,
                      int n) {
    const __m256 scale = _mm256_set1_ps(inv);
    int i = 0;
    for (; i + 32 <= n; i += 32) {
      __m256i code[4];
      for (int q = 0; q < 4; ++q) code[q] = lanes<MIRRORED>(packed, _mm256_mul_ps(_mm256_loadu_ps(v + i + 8 * q), scale));
      // packs interleave the 128-bit halves: dwords 0,4,1,5,2,6,3,7 of the packed bytes
      const __m256i words01 = _mm256_packus_epi32(code[0], code[1]), words23 = _mm256_packus_epi32(code[2], code[3]);
      const __m256i bytes = _mm256_packus_epi16(words01, words23);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(c + i),
                          _mm256_permutevar8x32_epi32(bytes, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7)));
    }
    for (; i < n; ++i) c[i] = uint8_t(nearest_code_packed(packed, MIRRORED, v[i] * inv));
  }

  template <bool MIRRORED>
  static __m256i lanes(const uint32_t* packed, __m256 x) {
    const __m256i bits = _mm256_castps_si256(x);
    const __m256i magnitude = _mm256_and_si256(bits, _mm256_set1_epi32(0x7FFFFFFF));
    // the bucket: (magnitude >> 15) less the first bucket's, saturating at 0 (16-bit halves
    // whose upper half is 0), at most the last
    const __m256i bucket =
        _mm256_min_epu32(_mm256_subs_epu16(_mm256_srli_epi32(magnitude, 15), _mm256_set1_epi32(kBucketMinExponent << 8)),
                         _mm256_set1_epi32(kBucketsPerSign - 1));
    const __m256i entry = _mm256_i32gather_epi32(reinterpret_cast<const int*>(packed), bucket, 4);
    const __m256i negative = _mm256_srli_epi32(bits, 31);
    const __m256i low = _mm256_and_si256(bits, _mm256_set1_epi32(0x7FFF));
    const __m256i count = _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(entry, low), negative), 16);
    const __m256i is_negative = _mm256_srai_epi32(bits, 31);
    if constexpr (MIRRORED) {
      // max(kPackedMirror - count, 0): a saturating subtract on 16-bit halves (upper halves 0)
      const __m256i mirror = _mm256_subs_epu16(_mm256_set1_epi32(kPackedMirror), count);
      return _mm256_blendv_epi8(count, mirror, is_negative);
    } else {
      return _mm256_andnot_si256(is_negative, count);
    }
  }
};

inline PackedGatherCodec quant_codec(const float*) { return PackedGatherCodec{}; }

#else

inline TableCodec quant_codec(const float*) { return TableCodec{}; }

#endif

}  // namespace fusedopt::cpu::FUSEDOPT_ISA
