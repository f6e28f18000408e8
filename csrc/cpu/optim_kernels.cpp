// The CPU kernels. This file is compiled once per instruction set (baseline, AVX2+FMA,
// AVX-512) into its own namespace, FUSEDOPT_ISA; the compiler auto-vectorizes the inner
// loops from the shared scalar math, and dispatch.cpp picks a build at import. (One
// exception: the AVX2 and AVX-512 builds run Adam on bf16 params through AVX2 intrinsics,
// adam_bf16_avx2.h: on this project's Xeon 1.3-1.8x faster than the auto-vectorized AVX-512 loop.)
#include <cmath>
#include <cstring>
#include <stdexcept>
#include <type_traits>
#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif
#include <vector>

#include "../fusedopt/averaging.h"
#include "../fusedopt/sam.h"
#include "../fusedopt/step_dispatch.h"
#include "adam_bf16_avx2.h"
#include "multi_tensor_cpu.h"
#include "page_kick.h"
#include "quantized_simd.h"
#include "step_call.h"
#include "step_inputs.h"
#include "stream_copy.h"

#ifndef FUSEDOPT_ISA
#error "FUSEDOPT_ISA must name the instruction-set namespace"
#endif

namespace fusedopt::cpu::FUSEDOPT_ISA {
namespace {

// Column `column` of a table row as a T array starting at element `first` of the tensor.
template <typename T>
T* column_ptr(const int64_t* row, int column, int64_t first = 0) {
  T* base = reinterpret_cast<T*>(row[column]);
  return base != nullptr ? base + first : nullptr;
}

// The `extra` column from element `first` on (adam.h: extra_at).
template <Precision PREC, typename P>
void* extra_ptr(const int64_t* row, int64_t first) {
  return extra_at<PREC, P>(reinterpret_cast<void*>(row[kColExtra]), first);
}

// Per-tensor values computed once before the parallel loop.
template <typename Scalars>
struct TensorPlan {
  Scalars scalars;
  RoundingKeys keys;
  bool first;
};

// Reads and advances each tensor's step counter and computes its scalars: a serial pass
// over tensors so the parallel pass is pure streaming. Neighbouring tensors almost always
// share (group, lr, step), so the scalars (two pow calls) are reused from the previous row.
template <typename Scalars, typename MakeScalars>
std::vector<TensorPlan<Scalars>> plan_tensors(const StepCall& call, bool keys_needed, MakeScalars make) {
  std::vector<TensorPlan<Scalars>> plans(size_t(call.n_tensors));
  int64_t last_group = -1;
  double last_lr = 0.0, last_step = -1.0;
  Scalars scalars{};
  for (int64_t t = 0; t < call.n_tensors; ++t) {
    const int64_t* row = call.table + t * kNumTableColumns;
    float* step_ptr = column_ptr<float>(row, kColStep);
    double step = 0.0;
    if (step_ptr != nullptr) {
      *step_ptr += 1.0f;
      step = *step_ptr;
    }
    const double* group = call.groups + row[kColGroup] * kNumGroupFields;
    const float* lr_ptr = column_ptr<const float>(row, kColLr);
    double lr = lr_ptr != nullptr ? double(*lr_ptr) : group[kGroupLr];
    if (row[kColGroup] != last_group || lr != last_lr || step != last_step) {
      scalars = make(group, lr, step);
      last_group = row[kColGroup];
      last_lr = lr;
      last_step = step;
    }
    plans[t].scalars = scalars;
    plans[t].keys = keys_needed ? rounding_keys(uint64_t(row[kColSeed]), row[kColParamIndex], int64_t(step),
                                                row[kColRngOffset])
                                : RoundingKeys{};
    plans[t].first = (row[kColFlags] & kFlagFirstStep) != 0;
  }
  return plans;
}

// 1 / grad_scale * clip_coef, or nothing to do at all when found_inf is set.
bool read_unscale(const StepScalars& s, float* unscale) {
  if (s.found_inf != nullptr && *s.found_inf != 0.0f) return false;
  float f = 1.0f;
  if (s.grad_scale != nullptr) f = 1.0f / *s.grad_scale;
  if (s.clip_coef != nullptr) f *= *s.clip_coef;
  *unscale = f;
  return true;
}

// track_stats sums of one piece. The loop below declares them an OpenMP SIMD reduction,
// which lets the compiler vectorize float sums it may otherwise not reassociate.
struct PieceStats {
  float& grad_sq;
  float& param_sq;
  float& update_sq;
  float& before_sq;
  void add(float g, float before, float after) const {
    float d = after - before;
    grad_sq += g * g;
    param_sq += after * after;
    update_sq += d * d;
    before_sq += before * before;
  }
};

// Runs body(i, stats) for i in [0, n), a piece of at most one chunk; with telemetry on, the
// piece's sums are added in double to the chunk's slot for the tensor's group. The bodies
// index arrays that start at the piece (see at()), so i is a small int: stochastic
// rounding's index arithmetic then vectorizes on 32-bit lanes (precision.h, random_bits).
// Always inlined into the piece's caller: as a function of its own (which GCC chose for some
// instantiations once the chunks ran on the worker pool) the telemetry loop's reduction ran
// scalar, 2.2x slower.
template <typename Body>
__attribute__((always_inline)) inline void run_piece(int64_t n, double* slot, Body body) {
  const int count = int(n);
  if (slot == nullptr) {
    // Elements are independent (params, grads and states never alias): vectorize without the
    // compiler's runtime alias checks.
#pragma omp simd
    for (int i = 0; i < count; ++i) body(i, NoStats{});
    return;
  }
  float g = 0.0f, p = 0.0f, u = 0.0f, b = 0.0f;
#pragma omp simd reduction(+ : g, p, u, b)
  for (int i = 0; i < count; ++i) body(i, PieceStats{g, p, u, b});
  slot[kStatGradSq] += g;
  slot[kStatParamSq] += p;
  slot[kStatUpdateSq] += u;
  slot[kStatParamBeforeSq] += b;
}

// One slot of kNumStats sums per (chunk, group), added up in chunk order at the end, so the
// telemetry is the same for any thread count.
class StatSlots {
 public:
  StatSlots(const StepCall& call, int64_t chunks)
      : call_(call), slots_(call.stats ? size_t(chunks * call.n_groups * kNumStats) : 0, 0.0) {}
  double* slot(int64_t chunk, int64_t group) {
    return call_.stats ? slots_.data() + (chunk * call_.n_groups + group) * kNumStats : nullptr;
  }
  void finish(int64_t chunks) {
    if (!call_.stats) return;
    for (int64_t c = 0; c < chunks; ++c)
      for (int64_t g = 0; g < call_.n_groups; ++g)
        for (int f = 0; f < kNumStats; ++f) call_.stats[g * kNumStats + f] += slot(c, g)[f];
  }

 private:
  const StepCall& call_;
  std::vector<double> slots_;
};

WorkList work_of(const StepCall& call) {
  return WorkList(call.n_tensors, [&](int64_t t) { return call.table[t * kNumTableColumns + kColNumel]; });
}

// Runs piece(row, plan, begin, end, stats_slot) on every piece [begin, end) of every tensor,
// chunks in parallel, then adds up the telemetry slots in chunk order.
template <typename Scalars, typename Piece>
void for_each_piece_parallel(const StepCall& call, const std::vector<TensorPlan<Scalars>>& plans, Piece piece) {
  const WorkList work = work_of(call);
  StatSlots stats(call, work.chunks());
  parallel_for_chunks(work, call.num_threads, [&](int64_t c) {
    work.for_each_piece(c, [&](int64_t t, int64_t begin, int64_t end) {
      const int64_t* row = call.table + t * kNumTableColumns;
      piece(row, plans[t], begin, end, stats.slot(c, row[kColGroup]));
    });
  });
  stats.finish(work.chunks());
}

// How many elements from `begin` of a piece a hand-vectorized kernel of this build updated
// (the generic loop does the rest): Adam on bf16 params in the AVX2 and AVX-512 builds (adam_bf16_avx2.h),
// when no telemetry is summed.
template <class A, typename P, typename S, Precision PREC, bool V, typename Scalars>
int64_t hand_vectorized_prefix(const int64_t* row, const TensorPlan<Scalars>& plan, int64_t begin, int64_t end,
                               const double* slot) {
#if defined(__AVX2__)
  if constexpr (std::is_same_v<A, Adam> && std::is_same_v<P, bf16_t> &&
                (std::is_same_v<S, bf16_t> || std::is_same_v<S, float>)) {
    if (slot == nullptr)
      return adam_bf16_avx2::step_prefix<S, PREC, V>(
          column_ptr<bf16_t>(row, kColParam, begin), column_ptr<const bf16_t>(row, kColGrad, begin),
          column_ptr<S>(row, kColState0, begin), column_ptr<S>(row, kColState1, begin),
          column_ptr<S>(row, kColState2, begin), extra_ptr<PREC, P>(row, begin), end - begin, plan.scalars,
          plan.keys.at(begin));
  }
#endif
  return 0;
}

// One step of algorithm A over every tensor of the call: the same loop for every algorithm of
// algorithms.h, which only supplies the element update (element.h: step_element).
template <class A, typename P, typename S, Precision PREC, bool V>
void algorithm_loop(const StepCall& call) {
  using C = ComputeOf<P>;
  using Scalars = typename A::template Scalars<C>;
  float unscale;
  if (!read_unscale(call.scalars, &unscale)) return;
  auto plans = plan_tensors<Scalars>(call, PREC == Precision::kStochastic,
                                     [&](const double* g, double lr, double step) {
                                       return A::template scalars<C>(g, lr, step, unscale);
                                     });
  const bool inputs = has_step_inputs(call.table, call.n_tensors);
  // The element loop over [begin, end) on the given buffers (each from element `begin` on).
  const auto run = [&](P* __restrict__ param, const P* __restrict__ grad, S* __restrict__ s0, S* __restrict__ s1,
                       S* __restrict__ s2, void* __restrict__ extra, const TensorPlan<Scalars>& plan, int64_t begin,
                       int64_t end, double* slot) __attribute__((always_inline)) {
    const Scalars s = plan.scalars;
    const RoundingKeys keys = plan.keys.at(begin);
    // The first-step flag is hoisted so each loop body stays branch-free.
    if (A::kUsesFirst && plan.first) {
      run_piece(end - begin, slot, [&](int64_t i, auto st) {
        step_element<A, P, S, PREC, V, A::kUsesFirst>(param, grad, s0, s1, s2, extra, i, s, keys, st);
      });
    } else {
      run_piece(end - begin, slot, [&](int64_t i, auto st) {
        step_element<A, P, S, PREC, V, false>(param, grad, s0, s1, s2, extra, i, s, keys, st);
      });
    }
  };
  for_each_piece_parallel(call, plans, [&](const int64_t* row, const TensorPlan<Scalars>& plan, int64_t begin,
                                           int64_t end, double* slot) {
    if (!inputs) {
      begin += hand_vectorized_prefix<A, P, S, PREC, V>(row, plan, begin, end, slot);
      run(column_ptr<P>(row, kColParam, begin), column_ptr<const P>(row, kColGrad, begin),
          column_ptr<S>(row, kColState0, begin), column_ptr<S>(row, kColState1, begin),
          column_ptr<S>(row, kColState2, begin), extra_ptr<PREC, P>(row, begin), plan, begin, end, slot);
      return;
    }
    // With one-step inputs and outputs (step_inputs.h), in sub-pieces that stay in L1 from the
    // restore and save to the update. (The hand-vectorized loops read the live buffers: not here.)
    bool streamed = false;
    for (int64_t b = begin; b < end; b += kInputSubPiece) {
      const int64_t e = b + kInputSubPiece < end ? b + kInputSubPiece : end;
      typename StepInputs<P, S, PREC>::Staged staged(row, b, e);
      run(staged.param.at, StepInputs<P, S, PREC>::grad(row, b, e), staged.state[0].at, staged.state[1].at,
          staged.state[2].at, staged.extra_at(), plan, b, e, slot);
      streamed |= staged.finish();
    }
    if (streamed) stream_fence();
  });
}

// The page kicks (page_kick.h) of the block of kQuantBlock elements at `at`: param, grad and
// each state's codes, for the block-by-block loop below (the fused Adam loop kicks its own
// streams). They replaced prefetches of whole blocks 2 ahead; GPT-2 41.7M AdamW 8-bit step on
// this Xeon, AVX2 build, interleaved runs: 47.8-48.5 -> 45.0-45.7 ms with the kicks alone, 47.0-48.1
// with the block prefetches as well.
template <class A, typename P, bool V>
__attribute__((always_inline)) inline void kick_block(const int64_t* row, const P* grad_at_b, int64_t at) {
  kick_next_page(column_ptr<P>(row, kColParam, at), kQuantBlock * sizeof(P));
  kick_next_page(grad_at_b, kQuantBlock * sizeof(P));
  constexpr int kStates = A::template kStates<V>;
  for (int k = 0; k < kStates; ++k) kick_next_page(column_ptr<q8_t>(row, kColState0 + k, at), kQuantBlock);
}

// The same step for a bucket whose states are 8-bit codes (quantized.h): the tensors are laid
// out on block boundaries in the work list, so every block of kQuantBlock elements (and its
// absmax) belongs to exactly one chunk, and each block is dequantized, updated and
// requantized in one pass while it sits in cache.
template <class A, typename P, Precision PREC, bool V>
void quantized_loop(const StepCall& call) {
  using Scalars = typename A::template Scalars<ComputeOf<P>>;
  if (call.scalars.qmaps == nullptr) throw std::invalid_argument("fusedopt: 8-bit states need the maps (qmaps)");
  float unscale;
  if (!read_unscale(call.scalars, &unscale)) return;
  auto plans = plan_tensors<Scalars>(call, PREC == Precision::kStochastic,
                                     [&](const double* g, double lr, double step) {
                                       return A::template scalars<ComputeOf<P>>(g, lr, step, unscale);
                                     });
  const WorkList work(call.n_tensors, [&](int64_t t) {
    const int64_t n = call.table[t * kNumTableColumns + kColNumel];
    return (n + kQuantBlock - 1) / kQuantBlock * kQuantBlock;
  });
  static_assert(kChunkElements % kQuantBlock == 0, "chunks end on block boundaries");
  StatSlots stats(call, work.chunks());
  const float* maps = call.scalars.qmaps;
  const bool inputs = has_step_inputs(call.table, call.n_tensors);
  const auto codec = quant_codec(maps);
  parallel_for_chunks(work, call.num_threads, [&](int64_t c) {
    work.for_each_piece(c, [&](int64_t t, int64_t begin, int64_t end) {
      const int64_t* row = call.table + t * kNumTableColumns;
      const TensorPlan<Scalars>& plan = plans[t];
      double* slot = stats.slot(c, row[kColGroup]);
      end = end < row[kColNumel] ? end : row[kColNumel];  // (the work list pads to whole blocks)
      if (begin >= end) return;
      if (inputs && StepInputs<P, q8_t, PREC>::restore(row, begin, end)) stream_fence();
      const P* piece_grad =
          inputs ? StepInputs<P, q8_t, PREC>::grad(row, begin, end) : column_ptr<const P>(row, kColGrad, begin);
      const auto runner = [&](int n, auto body) { run_piece(n, slot, body); };
      int64_t b = begin;
#if defined(FUSEDOPT_QUANT_AVX512)
      // Adam on fp32 params (the common 8-bit case): whole blocks by the codec's fused loop.
      if constexpr (std::is_same_v<A, Adam> && std::is_same_v<P, float> && PREC == Precision::kPlain && !V) {
        const int64_t blocks = (end - begin) / kQuantBlock;
        if (slot == nullptr && blocks > 0 && codec.fused_ok()) {
          codec.adam_blocks(column_ptr<float>(row, kColParam, begin), piece_grad,
                            column_ptr<uint8_t>(row, kColState0, begin), column_ptr<uint8_t>(row, kColState1, begin),
                            column_ptr<float>(row, kColAbsmax0, begin / kQuantBlock),
                            column_ptr<float>(row, kColAbsmax1, begin / kQuantBlock), blocks, maps, plan.scalars);
          b += blocks * kQuantBlock;
        }
      }
#endif
      for (; b < end; b += kQuantBlock) {
        const int n = int(end - b < kQuantBlock ? end - b : kQuantBlock);
        kick_block<A, P, V>(row, piece_grad + (b - begin), b);
        q8_t* const codes[3] = {column_ptr<q8_t>(row, kColState0, b), column_ptr<q8_t>(row, kColState1, b),
                                column_ptr<q8_t>(row, kColState2, b)};
        float* const absmax[3] = {column_ptr<float>(row, kColAbsmax0, b / kQuantBlock),
                                  column_ptr<float>(row, kColAbsmax1, b / kQuantBlock),
                                  column_ptr<float>(row, kColAbsmax2, b / kQuantBlock)};
        P* param = column_ptr<P>(row, kColParam, b);
        const P* grad = piece_grad + (b - begin);
        void* extra = extra_ptr<PREC, P>(row, b);
        const RoundingKeys keys = plan.keys.at(b);
        if (A::kUsesFirst && plan.first)
          quantized_block<A, P, PREC, V, A::kUsesFirst>(param, grad, codes, absmax, extra, n, maps, plan.scalars,
                                                        keys, runner, codec);
        else
          quantized_block<A, P, PREC, V, false>(param, grad, codes, absmax, extra, n, maps, plan.scalars, keys,
                                                runner, codec);
      }
    });
  });
  stats.finish(work.chunks());
}

template <class A, typename P, typename S, Precision PREC, bool V>
struct StepKernel {
  static void run(const StepCall& call) {
    if constexpr (std::is_same_v<S, q8_t>) quantized_loop<A, P, PREC, V>(call);
    else algorithm_loop<A, P, S, PREC, V>(call);
  }
};

// Sum of squares in double: per-chunk partials in fixed slots, added in chunk order, so the
// result is the same for any thread count.
template <typename T>
double sum_squares_typed(const ReduceCall& call) {
  const WorkList work(call.n_tensors, [&](int64_t t) { return call.numels[t]; });
  std::vector<double> partial(size_t(work.chunks()), 0.0);
  parallel_for_chunks(work, call.num_threads, [&](int64_t c) {
    // kSumLanes independent accumulators, element i + k of each group of kSumLanes into acc[k]:
    // the SIMD loops keep them in four (AVX-512) or eight (AVX2) registers, so four or eight
    // dependent add chains run at once instead of one (a single chain ran at about half the
    // memory bandwidth). Every build adds in this same order, so the same bits.
    constexpr int kSumLanes = 32;
    double acc[kSumLanes] = {};
    work.for_each_piece(c, [&](int64_t t, int64_t begin, int64_t end) {
      const T* __restrict__ x = reinterpret_cast<const T*>(call.ptrs[t]);
      int64_t i = begin;
#if defined(__AVX512F__) || defined(__AVX2__)
      if constexpr (std::is_same_v<T, float>) {
        // (GCC leaves the generic loop below scalar for float: ~7 GB/s a thread.)
#if defined(__AVX512F__)
        __m512d a[4];
        for (int r = 0; r < 4; ++r) a[r] = _mm512_loadu_pd(acc + 8 * r);
        for (; i + kSumLanes <= end; i += kSumLanes)
          for (int r = 0; r < 4; ++r) {
            const __m512d v = _mm512_cvtps_pd(_mm256_loadu_ps(x + i + 8 * r));
            a[r] = _mm512_add_pd(a[r], _mm512_mul_pd(v, v));
          }
        for (int r = 0; r < 4; ++r) _mm512_storeu_pd(acc + 8 * r, a[r]);
#else
        __m256d a[8];
        for (int r = 0; r < 8; ++r) a[r] = _mm256_loadu_pd(acc + 4 * r);
        for (; i + kSumLanes <= end; i += kSumLanes)
          for (int r = 0; r < 8; ++r) {
            const __m256d v = _mm256_cvtps_pd(_mm_loadu_ps(x + i + 4 * r));
            a[r] = _mm256_add_pd(a[r], _mm256_mul_pd(v, v));
          }
        for (int r = 0; r < 8; ++r) _mm256_storeu_pd(acc + 4 * r, a[r]);
#endif
      }
#endif
      for (; i + kSumLanes <= end; i += kSumLanes)
        for (int k = 0; k < kSumLanes; ++k) {
          double v = load_float(x[i + k]);
          acc[k] += v * v;
        }
      for (; i < end; ++i) {
        double v = load_float(x[i]);
        acc[0] += v * v;
      }
    });
    for (int width = kSumLanes / 2; width >= 1; width /= 2)  // a fixed pairwise tree
      for (int k = 0; k < width; ++k) acc[k] += acc[k + width];
    partial[size_t(c)] = acc[0];
  });
  double sum = 0.0;
  for (double p : partial) sum += p;
  return sum;
}

double sum_squares(const ReduceCall& call) {
  switch (call.dtype) {
    case DType::kFloat32: return sum_squares_typed<float>(call);
    case DType::kBFloat16: return sum_squares_typed<bf16_t>(call);
    case DType::kFloat16: return sum_squares_typed<fp16_t>(call);
    case DType::kFloat64: return sum_squares_typed<double>(call);
    case DType::kUInt8Blockwise: break;
  }
  throw std::invalid_argument("fusedopt: unsupported dtype for sum_squares");
}

template <typename T>
void average_typed(const AverageCall& call) {
  const WorkList work(call.n_tensors, [&](int64_t t) { return call.numels[t]; });
  parallel_for_chunks(work, call.num_threads, [&](int64_t c) {
    work.for_each_piece(c, [&](int64_t t, int64_t begin, int64_t end) {
      float* __restrict__ avg = reinterpret_cast<float*>(call.avgs[t]);
      const T* __restrict__ src = reinterpret_cast<const T*>(call.srcs[t]);
      for (int64_t i = begin; i < end; ++i) average_element(avg, src, i, call.weight);
    });
  });
}

void average(const AverageCall& call) {
  switch (call.src_dtype) {
    case DType::kFloat32: return average_typed<float>(call);
    case DType::kBFloat16: return average_typed<bf16_t>(call);
    case DType::kFloat16: return average_typed<fp16_t>(call);
    case DType::kFloat64:
    case DType::kUInt8Blockwise: break;
  }
  throw std::invalid_argument("fusedopt: unsupported dtype for average");
}

// The byte ranges laid end to end in 64-byte units, cut into the usual chunks (2 MiB), all
// threads on all chunks.
void copy(const CopyCall& call) {
  constexpr int64_t kUnit = 64;
  const WorkList work(call.n_tensors, [&](int64_t t) { return (call.nbytes[t] + kUnit - 1) / kUnit; });
  parallel_for_chunks(work, call.num_threads, [&](int64_t c) {
    work.for_each_piece(c, [&](int64_t t, int64_t begin, int64_t end) {
      const int64_t first = begin * kUnit;
      const int64_t last = end * kUnit < call.nbytes[t] ? end * kUnit : call.nbytes[t];
      copy_piece(reinterpret_cast<char*>(call.dsts[t]) + first, reinterpret_cast<const char*>(call.srcs[t]) + first,
                 last - first);
    });
  });
}

template <typename T>
void sam_perturb_typed(const PerturbCall& call) {
  using C = ComputeOf<T>;
  const WorkList work(call.n_tensors, [&](int64_t t) { return call.numels[t]; });
  const C scale = C(call.scale);
  parallel_for_chunks(work, call.num_threads, [&](int64_t c) {
    work.for_each_piece(c, [&](int64_t t, int64_t begin, int64_t end) {
      T* __restrict__ p = reinterpret_cast<T*>(call.params[t]) + begin;
      T* __restrict__ saved = reinterpret_cast<T*>(call.saved[t]) + begin;
      const T* __restrict__ g = reinterpret_cast<const T*>(call.grads[t]) + begin;
      const int n = int(end - begin);
      // w is saved with the streaming copy (no read of the saved buffer before its stores),
      // which also brings the piece of p into cache for the update below.
      copy_piece(reinterpret_cast<char*>(saved), reinterpret_cast<const char*>(p), int64_t(n) * int64_t(sizeof(T)));
      // The flag is hoisted so each loop body stays branch-free.
      if (call.adaptive) {
#pragma omp simd
        for (int i = 0; i < n; ++i)
          store_nearest(p + i, sam_perturbed<C>(load_float(p[i]), load_float(g[i]), scale, true));
      } else {
#pragma omp simd
        for (int i = 0; i < n; ++i)
          store_nearest(p + i, sam_perturbed<C>(load_float(p[i]), load_float(g[i]), scale, false));
      }
    });
  });
}

void sam_perturb(const PerturbCall& call) {
  switch (call.dtype) {
    case DType::kFloat32: return sam_perturb_typed<float>(call);
    case DType::kBFloat16: return sam_perturb_typed<bf16_t>(call);
    case DType::kFloat16: return sam_perturb_typed<fp16_t>(call);
    case DType::kFloat64: return sam_perturb_typed<double>(call);
    case DType::kUInt8Blockwise: break;
  }
  throw std::invalid_argument("fusedopt: unsupported dtype for sam_perturb");
}

// The codec the step uses (quant_codec), on plain arrays (step_call.h: CodecCall).
void codec(const CodecCall& call) {
  const auto codec = quant_codec(call.maps);
  for (int64_t b = 0; b < call.n; b += kQuantBlock) {
    const int n = int(call.n - b < kQuantBlock ? call.n - b : kQuantBlock);
    if (call.values == nullptr) {
      codec.dequantize(call.maps, call.state, call.codes_in + b, call.scale, call.dequantized + b, n);
    } else if (call.stochastic) {
      codec.template quantize<Precision::kStochastic>(call.maps, call.state, call.values + b, 1.0f, call.codes + b, n,
                                                      RoundingKeys{call.key_a, call.key_b, b});
    } else {
      codec.template quantize<Precision::kPlain>(call.maps, call.state, call.values + b, 1.0f, call.codes + b, n,
                                                 RoundingKeys{});
    }
  }
}

}  // namespace

#define FUSEDOPT_STR2(x) #x
#define FUSEDOPT_STR(x) FUSEDOPT_STR2(x)

// byte_permutes: the CPU has AVX512_VBMI (used by the AVX-512 build's 8-bit codec only).
KernelTable kernels(bool byte_permutes) {
  const char* isa = FUSEDOPT_STR(FUSEDOPT_ISA);
#if defined(FUSEDOPT_QUANT_AVX512)
  g_byte_permutes = byte_permutes;
  if (byte_permutes) isa = FUSEDOPT_STR(FUSEDOPT_ISA) "vbmi";
#else
  (void)byte_permutes;
#endif
  return {isa, [](const StepCall& c) { dispatch_step<StepKernel>(c); }, sum_squares, average, copy,
          sam_perturb, codec};
}

}  // namespace fusedopt::cpu::FUSEDOPT_ISA
