// The CUDA kernels: the step of every algorithm of algorithms.h as a functor of the multi-tensor launcher, the
// step-counter update, a deterministic sum of squares and weight averaging. The math is the
// shared headers' (A::scalars / step_element / rounding_keys / average_element), called exactly as the CPU loop in csrc/cpu/optim_kernels.cpp calls it
// (through the tiles of element_tiles.h); this file only decides which block and thread
// handle which elements.
//
// Nothing here synchronises with the host, allocates or copies: the tables travel as kernel
// arguments, device scalars (grad scale, found_inf, clip coefficient, lr, step) are read in
// the kernels, so every call can be captured in a CUDA graph.
#include <cuda_runtime.h>

#include <cstring>
#include <stdexcept>
#include <type_traits>

#include "../fusedopt/step_dispatch.h"
#include "element_tiles.h"
#include "multi_tensor_apply.cuh"

namespace fusedopt::cuda {
namespace {

// ---- launch geometry ---------------------------------------------------------------------
// Optimizer steps: one block per chunk of 64Ki elements; each thread takes tiles of W
// elements (element_tiles.h), kStepThreads tiles apart (coalesced): 32 tiles per thread and
// full chunk when W = 4, 16 when W = 8. At least two blocks per SM: at most 64 registers
// per thread.
constexpr int kStepThreads = 512;
constexpr int kStepMinBlocks = 2;
constexpr int64_t kStepChunk = 65536;
static_assert(kStepChunk % (int64_t(kStepThreads) * kMaxRoundElements) == 0,
              "full chunks take whole rounds of tiles and no one-element tail");

// Sum of squares: a fixed grid of kReduceBlocks blocks strides over chunks of kReduceChunk
// elements; each block owns one float64 slot of the workspace.
constexpr int kReduceThreads = 256;
constexpr int64_t kReduceChunk = 8192;
constexpr int kReduceBlocks = 512;
constexpr int kFinishThreads = 512;
static_assert(kReduceChunk % kMaxTileWidth == 0, "chunks start on tile boundaries");

// Step counters advanced per launch of increment_steps_kernel (one block).
constexpr int kCounterThreads = 512;
constexpr int kCounterCapacity = 480;
static_assert(kCounterCapacity <= kCounterThreads, "one thread per counter");

// ---- per-tensor metadata of a step launch --------------------------------------------------
// Everything the kernel needs to know about one table row, the group's hyper-parameters
// included (copied per tensor, so no group table has to reach the device).
struct StepTensor {
  void* param;
  const void* grad;
  void* state0;  // exp_avg | momentum_buffer
  void* state1;  // exp_avg_sq
  void* state2;  // max_exp_avg_sq
  void* extra;   // master_param | kahan_comp
  float* absmax[3];  // 8-bit states (quantized.h): per-block absmax of state 0, 1, 2
  float* step;   // read here (old value), advanced by increment_steps_kernel afterwards
  const float* lr;
  const float* beta[2];  // tensor betas on the device (kColBeta1/2), or null
  uint64_t seed;
  int64_t param_index;
  int64_t rng_offset;   // global index of the first element (shards of a larger param)
  int64_t group_index;  // row of the group table: the stats slot of track_stats
  double group[kNumGroupFields];
  int32_t first;  // SGD: the momentum buffer starts as the grad
};
using StepList = TensorList<StepTensor>;
#if CUDART_VERSION >= 12010
static_assert(StepList::kCapacity >= 36, "a step launch holds at least as many tensors as torch's");
#endif

struct StepCall {
  int algorithm;         // an id of algorithms.h
  const int64_t* table;  // host copy of the table (n_tensors x kNumTableColumns)
  int64_t n_tensors;
  const double* groups;  // host copy of the group table
  DType param_dtype;
  DType state_dtype;
  Precision precision;
  bool variant;  // the algorithm's variant flag (Adam: amsgrad; SGD: momentum)
  StepScalars scalars;
  double* stats;  // n_groups x kNumStats device sums to add into (track_stats), or null
  cudaStream_t stream;
};

StepTensor step_tensor(const StepCall& call, int64_t t) {
  const int64_t* row = call.table + t * kNumTableColumns;
  // The one-step input/output columns are a CPU feature; the Python layer copies on CUDA instead.
  for (int c = kColParamFrom; c < kNumTableColumns; ++c)
    if (row[c] != 0) throw std::invalid_argument("fusedopt: the *From / GradMix / *To table columns are CPU-only");
  StepTensor m{};
  m.param = reinterpret_cast<void*>(row[kColParam]);
  m.grad = reinterpret_cast<const void*>(row[kColGrad]);
  m.state0 = reinterpret_cast<void*>(row[kColState0]);
  m.state1 = reinterpret_cast<void*>(row[kColState1]);
  m.state2 = reinterpret_cast<void*>(row[kColState2]);
  m.extra = reinterpret_cast<void*>(row[kColExtra]);
  for (int k = 0; k < 3; ++k) m.absmax[k] = reinterpret_cast<float*>(row[kColAbsmax0 + k]);
  m.step = reinterpret_cast<float*>(row[kColStep]);
  m.lr = reinterpret_cast<const float*>(row[kColLr]);
  m.beta[0] = reinterpret_cast<const float*>(row[kColBeta1]);
  m.beta[1] = reinterpret_cast<const float*>(row[kColBeta2]);
  m.seed = uint64_t(row[kColSeed]);
  m.param_index = row[kColParamIndex];
  m.rng_offset = row[kColRngOffset];
  m.group_index = row[kColGroup];
  std::memcpy(m.group, call.groups + row[kColGroup] * kNumGroupFields, sizeof m.group);
  m.first = (row[kColFlags] & kFlagFirstStep) != 0 ? 1 : 0;
  return m;
}

// ---- per-block scalars (thread 0 only) -------------------------------------------------------
// 1 / grad_scale * clip_coef, or false when found_inf says to skip the step: the CPU's
// read_unscale, operation for operation.
__device__ __forceinline__ bool read_unscale(const StepScalars& s, float* unscale) {
  if (s.found_inf != nullptr && *s.found_inf != 0.0f) return false;
  float f = 1.0f;
  if (s.grad_scale != nullptr) f = 1.0f / *s.grad_scale;
  if (s.clip_coef != nullptr) f *= *s.clip_coef;
  *unscale = f;
  return true;
}

// The step number after this update. The CPU does `*step += 1; step = *step`; here many
// blocks share a counter, so each reads the old value and adds one in the same float
// arithmetic, and increment_steps_kernel (launched after the step on the same stream)
// writes the new value back.
__device__ __forceinline__ double next_step(const float* step) {
  if (step == nullptr) return 0.0;
  const float now = *step + 1.0f;
  return double(now);
}

__device__ __forceinline__ double tensor_lr(const StepTensor& t) {
  return t.lr != nullptr ? double(*t.lr) : t.group[kGroupLr];
}

// The algorithm's per-tensor scalars from the tensor's group row, with tensor betas that live
// on the device read here (thread 0, once per block): no host sync, capturable.
template <class A, typename C>
__device__ __forceinline__ typename A::template Scalars<C> tensor_scalars(const StepTensor& t, double step,
                                                                           float unscale) {
  if (t.beta[0] == nullptr && t.beta[1] == nullptr) return A::template scalars<C>(t.group, tensor_lr(t), step, unscale);
  double group[kNumGroupFields];
#pragma unroll
  for (int f = 0; f < kNumGroupFields; ++f) group[f] = t.group[f];
  if (t.beta[0] != nullptr) group[kGroupBeta1] = double(*t.beta[0]);
  if (t.beta[1] != nullptr) group[kGroupBeta2] = double(*t.beta[1]);
  return A::template scalars<C>(group, tensor_lr(t), step, unscale);
}

// ---- track_stats -------------------------------------------------------------------------------
// The element functions report (grad as stored, param before, param after) to a Stats
// object; here each thread sums them in registers, the block adds its threads' sums in a
// fixed order (float64), and thread 0 adds the block's kNumStats sums into the group's slot
// with float64 atomics. The per-block sums are deterministic; the order in which blocks add
// them is not, so the last bits of the stats may vary from run to run (telemetry only: the
// step itself never depends on them).
struct RegisterStats {
  float* acc;  // kNumStats running sums of this thread (a local array: lives in registers)
  FUSEDOPT_HD void add(float g, float before, float after) const {
    const float d = after - before;
    acc[kStatGradSq] += g * g;
    acc[kStatParamSq] += after * after;
    acc[kStatUpdateSq] += d * d;
    acc[kStatParamBeforeSq] += before * before;
  }
};

template <int kThreads = kStepThreads>
__device__ __forceinline__ void add_block_stats(const float (&acc)[kNumStats], double* __restrict__ slot) {
  constexpr int kWarps = kThreads / 32;
  __shared__ double warp_sums[kWarps][kNumStats];
  double v[kNumStats];
#pragma unroll
  for (int f = 0; f < kNumStats; ++f) {
    v[f] = acc[f];
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) v[f] += __shfl_down_sync(0xFFFFFFFFu, v[f], offset);
  }
  if ((threadIdx.x & 31) == 0) {
#pragma unroll
    for (int f = 0; f < kNumStats; ++f) warp_sums[threadIdx.x >> 5][f] = v[f];
  }
  __syncthreads();
  if (threadIdx.x == 0) {
#pragma unroll
    for (int f = 0; f < kNumStats; ++f) {
      double total = 0.0;
      for (int w = 0; w < kWarps; ++w) total += warp_sums[w][f];
      atomicAdd(slot + f, total);
    }
  }
}

// ---- step functors -----------------------------------------------------------------------
// What an algorithm adds to the common step functor: the tensor's scalars, and the op a
// thread runs over its share of the chunk (element_tiles.h: StepOp).
template <class A, typename P, typename S, Precision PREC, bool V>
struct AlgorithmStep {
  using Scalars = typename A::template Scalars<ComputeOf<P>>;

  __device__ static Scalars scalars(const StepTensor& t, double step, float unscale) {
    return tensor_scalars<A, ComputeOf<P>>(t, step, unscale);
  }

  template <bool FIRST, typename Stats>
  __device__ static void run_first(const StepTensor& t, const ChunkRef& c, const Scalars& s, const RoundingKeys& keys,
                                   Stats stats) {
    const StepOp<A, P, S, PREC, V, FIRST, Stats> op{static_cast<P*>(t.param),
                                                    static_cast<const P*>(t.grad),
                                                    {static_cast<S*>(t.state0), static_cast<S*>(t.state1),
                                                     static_cast<S*>(t.state2)},
                                                    t.extra,
                                                    s,
                                                    keys,
                                                    stats};
    run_thread_share(op, c.begin, c.end, int(threadIdx.x), kStepThreads);
  }

  // The first-step flag is a template parameter so each loop body stays branch-free.
  template <typename Stats>
  __device__ static void run(const StepTensor& t, const ChunkRef& c, const Scalars& s, const RoundingKeys& keys,
                             Stats stats) {
    if (A::kUsesFirst && t.first != 0) run_first<A::kUsesFirst>(t, c, s, keys, stats);
    else run_first<false>(t, c, s, keys, stats);
  }
};

// One block per chunk. Thread 0 reads the device scalars and computes the tensor's scalars
// and rounding keys (as the CPU's plan_tensors does per tensor); the block shares them, or
// returns at once when found_inf says to skip the step.
template <typename Step>
struct StepFunctor {
  static constexpr int kBlockThreads = kStepThreads;
  static constexpr int kMinBlocksPerSm = kStepMinBlocks;
  StepScalars scalars;
  double* stats;

  int64_t grid(int64_t n_chunks) const { return n_chunks; }

  __device__ void operator()(const StepList& list) const {
    using Scalars = typename Step::Scalars;
    const ChunkRef c = locate_chunk(list, int64_t(blockIdx.x));
    const StepTensor& t = list.meta[c.slot];
    __shared__ Scalars shared_scalars;
    __shared__ RoundingKeys shared_keys;
    __shared__ int shared_run;
    if (threadIdx.x == 0) {
      float unscale = 1.0f;
      const bool run = read_unscale(scalars, &unscale);
      if (run) {
        const double step = next_step(t.step);
        shared_scalars = Step::scalars(t, step, unscale);
        shared_keys = rounding_keys(t.seed, t.param_index, int64_t(step), t.rng_offset);
      }
      shared_run = run ? 1 : 0;
    }
    __syncthreads();
    if (shared_run == 0) return;
    const Scalars s = shared_scalars;  // into registers: the loop's stores cannot alias them
    const RoundingKeys keys = shared_keys;
    if (stats == nullptr) {
      Step::run(t, c, s, keys, NoStats{});
    } else {
      float acc[kNumStats] = {};
      Step::run(t, c, s, keys, RegisterStats{acc});
      add_block_stats(acc, stats + t.group_index * kNumStats);
    }
  }
};

__device__ __forceinline__ void add_quantized_block_stats(const float (&acc)[kNumStats], double* __restrict__ slot) {
  add_block_stats<kQuantBlock>(acc, slot);
}

// ---- 8-bit states ------------------------------------------------------------------------------
// One thread per element of a quantization block (kQuantBlock threads), blocks of a chunk in
// turn: each thread dequantizes its element's states, runs step_element on them in registers,
// the block finds each state's new absmax (a max over the threads, exact in any order) and
// each thread requantizes its element (quantized.h: quantize_code), as the CPU's
// quantized_block does element for element.
__device__ __forceinline__ float block_max(float v) {
  __shared__ float warp_max[kQuantBlock / 32];
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v = fmaxf(v, __shfl_xor_sync(0xFFFFFFFFu, v, offset));
  if ((threadIdx.x & 31) == 0) warp_max[threadIdx.x >> 5] = v;
  __syncthreads();
  float m = 0.0f;
#pragma unroll
  for (int w = 0; w < kQuantBlock / 32; ++w) m = fmaxf(m, warp_max[w]);
  __syncthreads();  // warp_max is reused by the next call
  return m;
}

template <class A, typename P, Precision PREC, bool V>
struct QuantizedStepFunctor {
  static constexpr int kBlockThreads = kQuantBlock;
  static constexpr int kMinBlocksPerSm = 4;
  using Scalars = typename A::template Scalars<ComputeOf<P>>;
  StepScalars scalars;
  double* stats;

  int64_t grid(int64_t n_chunks) const { return n_chunks; }

  template <bool FIRST>
  __device__ void run(const StepTensor& t, const ChunkRef& c, const Scalars& s, const RoundingKeys& keys) const {
    constexpr int kStates = A::template kStates<V>;
    const float* maps = scalars.qmaps;
    float acc[kNumStats] = {};
    for (int64_t b = c.begin; b < c.end; b += kQuantBlock) {  // chunks start on block boundaries
      const int64_t i = b + threadIdx.x;
      const bool live = i < c.end;
      float st[3] = {0.0f, 0.0f, 0.0f};
#pragma unroll
      for (int k = 0; k < kStates; ++k)
        if (live && A::template reads_state<V, FIRST>(k))
          st[k] = quant_map(maps, k)[static_cast<const q8_t*>(k == 0 ? t.state0 : (k == 1 ? t.state1 : t.state2))[i].code] *
                  t.absmax[k][b / kQuantBlock];
      if (live) {
        if (stats == nullptr)
          step_element<A, P, float, PREC, V, FIRST>(static_cast<P*>(t.param) + i, static_cast<const P*>(t.grad) + i,
                                                    st, st + 1, st + 2, extra_at<PREC, P>(t.extra, i), 0, s,
                                                    keys.at(i), NoStats{});
        else
          step_element<A, P, float, PREC, V, FIRST>(static_cast<P*>(t.param) + i, static_cast<const P*>(t.grad) + i,
                                                    st, st + 1, st + 2, extra_at<PREC, P>(t.extra, i), 0, s,
                                                    keys.at(i), RegisterStats{acc});
      }
#pragma unroll
      for (int k = 0; k < kStates; ++k) {
        const float m = block_max(live ? fabsf(st[k]) : 0.0f);
        if (threadIdx.x == 0) t.absmax[k][b / kQuantBlock] = m;
        if (live) {
          const float x = st[k] * (m > 0.0f ? 1.0f / m : 0.0f);
          q8_t* codes = static_cast<q8_t*>(k == 0 ? t.state0 : (k == 1 ? t.state1 : t.state2));
          uint8_t code;
          if constexpr (PREC == Precision::kStochastic) {
            const ElementRandom r = element_random<PREC>(keys, i, true);
            code = quantize_code<true>(quant_map(maps, k), quant_base(maps, k), quant_threshold(maps, k), x,
                                       k == 0 ? r.a >> 16 : (k == 1 ? r.b : r.b >> 16));
          } else {
            code = quantize_code<false>(quant_map(maps, k), quant_base(maps, k), quant_threshold(maps, k), x, 0u);
          }
          codes[i].code = code;
        }
      }
    }
    if (stats != nullptr) add_quantized_block_stats(acc, stats + t.group_index * kNumStats);
  }

  __device__ void operator()(const StepList& list) const {
    const ChunkRef c = locate_chunk(list, int64_t(blockIdx.x));
    const StepTensor& t = list.meta[c.slot];
    float unscale = 1.0f;
    if (!read_unscale(scalars, &unscale)) return;  // every thread reads the same scalars
    const double step = next_step(t.step);
    const Scalars s = tensor_scalars<A, ComputeOf<P>>(t, step, unscale);
    const RoundingKeys keys = rounding_keys(t.seed, t.param_index, int64_t(step), t.rng_offset);
    if (A::kUsesFirst && t.first != 0) run<A::kUsesFirst>(t, c, s, keys);
    else run<false>(t, c, s, keys);
  }
};

// ---- step counters -------------------------------------------------------------------------
struct StepCounters {
  float* step[kCounterCapacity];
  int32_t n;
};

// Advances the counters of one call after its step kernels, unless found_inf is set. An
// atomic add of 1.0f gives the same bits as the CPU's `*step += 1.0f`. Rows are expected to
// have distinct counters (one per param, as torch keeps them); were one shared, it would
// still end up advanced once per row, as on the CPU, but every row would have used the same
// step number, where the CPU's rows see consecutive ones.
__global__ void __launch_bounds__(kCounterThreads)
    increment_steps_kernel(const __grid_constant__ StepCounters counters, const float* found_inf) {
  if (found_inf != nullptr && *found_inf != 0.0f) return;
  const int i = int(threadIdx.x);
  if (i < counters.n) atomicAdd(counters.step[i], 1.0f);
}

void increment_steps(const StepCall& call) {
  StepCounters counters{};
  auto flush = [&] {
    if (counters.n == 0) return;
    increment_steps_kernel<<<1, kCounterThreads, 0, call.stream>>>(counters, call.scalars.found_inf);
    check_launch("increment_steps");
    counters.n = 0;
  };
  for (int64_t t = 0; t < call.n_tensors; ++t) {
    float* step = reinterpret_cast<float*>(call.table[t * kNumTableColumns + kColStep]);
    if (step == nullptr) continue;
    if (counters.n == kCounterCapacity) flush();
    counters.step[counters.n++] = step;
  }
  flush();
}

// ---- host side of a step -------------------------------------------------------------------
template <typename Functor>
void run_step(const StepCall& call, const char* name) {
  const Functor functor{call.scalars, call.stats};
  multi_tensor_apply<StepTensor>(
      call.n_tensors, kStepChunk, [&](int64_t t) { return call.table[t * kNumTableColumns + kColNumel]; },
      [&](int64_t t) { return step_tensor(call, t); }, functor, call.stream, name);
  increment_steps(call);
}

template <class A, typename P, typename S, Precision PREC, bool V>
struct StepKernel {
  static void run(const StepCall& call) {
    if constexpr (std::is_same_v<S, q8_t>) {
      if (call.scalars.qmaps == nullptr) throw std::invalid_argument("fusedopt: 8-bit states need the maps (qmaps)");
      run_step<QuantizedStepFunctor<A, P, PREC, V>>(call, "step (8-bit states)");
    } else {
      run_step<StepFunctor<AlgorithmStep<A, P, S, PREC, V>>>(call, "step");
    }
  }
};

// ---- deterministic sum of squares --------------------------------------------------------------
// Sum over the block in a fixed order (shuffle tree per warp, then warps in order); the
// result is valid in thread 0. Called once per kernel.
template <int kThreads>
__device__ __forceinline__ double block_sum(double v) {
  static_assert(kThreads % 32 == 0 && kThreads <= 1024, "whole warps");
  __shared__ double warp_sums[kThreads / 32];
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_down_sync(0xFFFFFFFFu, v, offset);
  if ((threadIdx.x & 31) == 0) warp_sums[threadIdx.x >> 5] = v;
  __syncthreads();
  double total = 0.0;
  if (threadIdx.x == 0)
    for (int w = 0; w < kThreads / 32; ++w) total += warp_sums[w];
  return total;
}

// Stage 1: block b of every launch adds the squares of its chunks (chunks b, b + grid, ...)
// in float64 and writes its slot: launch 0 overwrites it, later launches add to it, in
// stream order. The grid is always kReduceBlocks, so every slot is written by launch 0.
template <typename T>
struct SumSquaresFunctor {
  static constexpr int kBlockThreads = kReduceThreads;
  static constexpr int kMinBlocksPerSm = 1;
  double* partials;

  int64_t grid(int64_t) const { return kReduceBlocks; }

  __device__ void operator()(const TensorList<const void*>& list) const {
    double sum = 0.0;
    for (int64_t chunk = blockIdx.x; chunk < list.n_chunks; chunk += gridDim.x) {
      const ChunkRef c = locate_chunk(list, chunk);
      const SumSquaresOp<T> op{static_cast<const T*>(list.meta[c.slot]), &sum};
      run_thread_share(op, c.begin, c.end, int(threadIdx.x), kReduceThreads);
    }
    const double total = block_sum<kReduceThreads>(sum);
    if (threadIdx.x == 0) partials[blockIdx.x] = (list.launch_index == 0 ? 0.0 : partials[blockIdx.x]) + total;
  }
};

// Stage 2: one block adds the n slots in a fixed order and writes the float64 sum. It stays
// float64 (as the CPU's): the grads are still scaled by the GradScaler here, and
// scale^2 * sum(g^2) passes float32's 3.4e38 long before the unscaled norm is large
// (scale 2**70 and a grad norm of 1 already do).
__global__ void __launch_bounds__(kFinishThreads)
    sum_squares_finish(const double* __restrict__ partials, int n, double* __restrict__ out) {
  double v = 0.0;
  for (int i = int(threadIdx.x); i < n; i += kFinishThreads) v += partials[i];
  const double total = block_sum<kFinishThreads>(v);
  if (threadIdx.x == 0) *out = total;
}

// `workspace` belongs to this call alone until the stream has run it (the caller allocates
// it per call from the caching allocator): two calls on different streams must never share
// the slots.
template <typename T>
void sum_squares_typed(const int64_t* ptrs, const int64_t* numels, int64_t n_tensors, double* out, double* workspace,
                       cudaStream_t stream) {
  const SumSquaresFunctor<T> functor{workspace};
  const int launches = multi_tensor_apply<const void*>(
      n_tensors, kReduceChunk, [&](int64_t t) { return numels[t]; },
      [&](int64_t t) { return reinterpret_cast<const void*>(ptrs[t]); }, functor, stream, "sum_squares");
  // No launch (no elements): the slots are stale, so add none of them and write 0.
  sum_squares_finish<<<1, kFinishThreads, 0, stream>>>(workspace, launches > 0 ? kReduceBlocks : 0, out);
  check_launch("sum_squares_finish");
}

// ---- weight averaging ----------------------------------------------------------------------
// avg += weight * (src - avg) (averaging.h), one block per chunk like the steps.
struct AveragePair {
  float* avg;
  const void* src;
};

template <typename T>
struct AverageFunctor {
  static constexpr int kBlockThreads = kStepThreads;
  static constexpr int kMinBlocksPerSm = kStepMinBlocks;
  float weight;

  int64_t grid(int64_t n_chunks) const { return n_chunks; }

  __device__ void operator()(const TensorList<AveragePair>& list) const {
    const ChunkRef c = locate_chunk(list, int64_t(blockIdx.x));
    const AveragePair& pair = list.meta[c.slot];
    const AverageOp<T> op{pair.avg, static_cast<const T*>(pair.src), weight};
    run_thread_share(op, c.begin, c.end, int(threadIdx.x), kStepThreads);
  }
};

template <typename T>
void average_typed(const int64_t* avgs, const int64_t* srcs, const int64_t* numels, int64_t n_tensors, float weight,
                   cudaStream_t stream) {
  const AverageFunctor<T> functor{weight};
  multi_tensor_apply<AveragePair>(
      n_tensors, kStepChunk, [&](int64_t t) { return numels[t]; },
      [&](int64_t t) { return AveragePair{reinterpret_cast<float*>(avgs[t]), reinterpret_cast<const void*>(srcs[t])}; },
      functor, stream, "average");
}

}  // namespace

// ---- entry points (declared again in bindings_cuda.cpp) ---------------------------------
void step(int algorithm, const int64_t* table, int64_t n_tensors, const double* groups, DType param_dtype,
          DType state_dtype, Precision precision, bool variant, StepScalars scalars, double* stats,
          cudaStream_t stream) {
  const StepCall call{algorithm, table,   n_tensors, groups, param_dtype, state_dtype, precision,
                      variant,   scalars, stats,     stream};
  dispatch_step<StepKernel>(call);
}

void sum_squares(const int64_t* ptrs, const int64_t* numels, int64_t n_tensors, DType dtype, double* out,
                 double* workspace, cudaStream_t stream) {
  switch (dtype) {
    case DType::kFloat32: return sum_squares_typed<float>(ptrs, numels, n_tensors, out, workspace, stream);
    case DType::kBFloat16: return sum_squares_typed<bf16_t>(ptrs, numels, n_tensors, out, workspace, stream);
    case DType::kFloat16: return sum_squares_typed<fp16_t>(ptrs, numels, n_tensors, out, workspace, stream);
    case DType::kFloat64: return sum_squares_typed<double>(ptrs, numels, n_tensors, out, workspace, stream);
    case DType::kUInt8Blockwise: break;
  }
  throw std::invalid_argument("fusedopt: unsupported dtype for sum_squares");
}

int64_t sum_squares_workspace_size() { return kReduceBlocks; }

void average(const int64_t* avgs, const int64_t* srcs, const int64_t* numels, int64_t n_tensors, DType src_dtype,
             float weight, cudaStream_t stream) {
  switch (src_dtype) {
    case DType::kFloat32: return average_typed<float>(avgs, srcs, numels, n_tensors, weight, stream);
    case DType::kBFloat16: return average_typed<bf16_t>(avgs, srcs, numels, n_tensors, weight, stream);
    case DType::kFloat16: return average_typed<fp16_t>(avgs, srcs, numels, n_tensors, weight, stream);
    case DType::kFloat64:
    case DType::kUInt8Blockwise: break;
  }
  throw std::invalid_argument("fusedopt: unsupported dtype for average");
}

}  // namespace fusedopt::cuda
