// How a CUDA thread walks its share of a chunk: 16-byte vector loads and stores of *tiles*
// of consecutive elements where the buffers are aligned, one element at a time otherwise.
// Host+device code with no CUDA header, so the host tests (tests/cpp/cuda_logic_test.cpp)
// run the very loops the kernels run.
//
// An *op* is one tensor's buffers plus what to do to one element, and no op does math of its
// own: the steps and the averaging call the shared element functions (step_element,
// average_element) on a tile held in local arrays, so the element functions
// see the same values, in the same order, as on the CPU, and write the same bits.
//
// A tile is W consecutive elements, W = 16 / (size of the op's narrowest element type): one
// 16-byte load of the narrowest buffer, W * sizeof(T) / 16 of a wider one (4 elements when
// every buffer is fp32, 8 when any is bf16/fp16). A thread copies into local arrays each
// buffer the element function reads, runs the element function on local indices 0..W-1,
// and copies back each buffer it writes. The local arrays are indexed with constants once
// the loops are unrolled, so on the device they are registers.
#pragma once
#include <cassert>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "../fusedopt/algorithms.h"
#include "../fusedopt/averaging.h"

// Fully unrolled on the device (local arrays must be indexed with constants to stay in
// registers); nothing for the host compiler, which does not know this pragma.
#if defined(__CUDA_ARCH__)
#define FUSEDOPT_UNROLL _Pragma("unroll")
#else
#define FUSEDOPT_UNROLL
#endif

namespace fusedopt::cuda {

constexpr int kVectorBytes = 16;
constexpr int kMaxTileWidth = kVectorBytes / 2;  // the narrowest element type is 2 bytes

// A 16-byte aligned buffer start makes every tile of it aligned, as long as tiles start at
// multiples of W: W * sizeof(T) is a multiple of 16 for every buffer of an op.
FUSEDOPT_HD bool vector_aligned(const void* p) { return reinterpret_cast<uintptr_t>(p) % kVectorBytes == 0; }

// One 16-byte copy: a single vector load or store on the device (uint4 is nvcc's built-in
// vector type). On the host (the tests) a misaligned copy fails an assertion, where the device
// would fault.
FUSEDOPT_HD void copy_vector(void* dst, const void* src) {
#if defined(__CUDA_ARCH__)
  *static_cast<uint4*>(dst) = *static_cast<const uint4*>(src);
#else
  assert(vector_aligned(dst) && vector_aligned(src));
  std::memcpy(dst, src, kVectorBytes);
#endif
}

// W for an op whose buffers hold these element types.
template <typename... T>
constexpr int tile_width() {
  size_t narrowest = kVectorBytes;
  for (size_t size : {sizeof(T)...}) narrowest = size < narrowest ? size : narrowest;
  return kVectorBytes / int(narrowest);
}

// Tiles a thread loads before it computes the first of them (a *round*): at most 8 elements
// and 128 bytes of loads, so 2 tiles when W = 4 and 1 when W = 8. The old scalar loop had
// 4 elements in flight (64 bytes for fp32 Adam); a round of fp32 Adam now has 128 bytes,
// and at 1024 threads per SM that is 128 KiB per SM, several times an H100's bandwidth x
// latency per SM (~3.35 TB/s x ~700 ns / 132 SMs, about 18 KiB), which leaves room for the
// part of each round a thread spends computing and storing with no load in flight. The cap
// is registers: the steps must fit in 64 (__launch_bounds__(512, 2)) with their pointers,
// scalars, rounding keys and stats, and each element of a round holds its fp32 working
// values (plus, under stochastic rounding, its random bits) until its tile is stored. With
// 16 elements a round the stochastic and fp16 SGD steps spilled; 8 is already the limit of
// the heaviest (bf16 Adam with AMSGRAD and a master or Kahan buffer, fp16 SGD with
// momentum), where ptxas spills a few bytes.
constexpr int kMaxRoundElements = 8;
constexpr int kMaxRoundLoadBytes = 128;

constexpr int tiles_in_flight(int width, size_t load_bytes_per_tile) {
  const int by_bytes = kMaxRoundLoadBytes / int(load_bytes_per_tile);
  const int by_elements = kMaxRoundElements / width;
  const int tiles = by_bytes < by_elements ? by_bytes : by_elements;
  return tiles < 1 ? 1 : tiles;
}

// W elements of one buffer, in locals.
template <typename T, int W>
struct TileBuffer {
  static_assert(W * sizeof(T) % kVectorBytes == 0, "a tile of every buffer is whole vectors");
  static constexpr int kPerVector = kVectorBytes / int(sizeof(T));
  alignas(kVectorBytes) T v[W];

  FUSEDOPT_HD void load(const T* src) {
    FUSEDOPT_UNROLL
    for (int k = 0; k < W; k += kPerVector) copy_vector(v + k, src + k);
  }
  FUSEDOPT_HD void store(T* dst) const {
    FUSEDOPT_UNROLL
    for (int k = 0; k < W; k += kPerVector) copy_vector(dst + k, v + k);
  }
};

// ---- ops -------------------------------------------------------------------------------------
// Each op has: kWidth (W), kTilesInFlight, aligned() (every buffer it touches is 16-byte
// aligned), from(begin) (the same op on the elements from `begin` on: its index i is the
// tensor's begin + i), element(i) (one element, through global memory) and a Tile with
// load(op, first) and update_and_store(op, first) for the tile starting at element `first`.

// One step of algorithm A (element.h: step_element) on one tensor. It loads the param (not
// under kMaster: load_param reads the master in `extra`), the grad, the state buffers the
// update reads (A::reads_state; SGD's first step reads none) and the extra buffer, and
// stores the param, every state buffer and the extra buffer. FIRST: the step that creates
// the buffers (A::kUsesFirst).
template <class A, typename P, typename S, Precision PREC, bool V, bool FIRST, typename Stats>
struct StepOp {
  using C = ComputeOf<P>;
  using Scalars = typename A::template Scalars<C>;
  using Extra = ExtraOf<P, PREC>;
  static constexpr int kStates = A::template kStates<V>;
  // Without state W follows the param alone (a tile of S would not be whole vectors: fp32
  // params with bf16 states).
  using Buffer = std::conditional_t<(kStates > 0), S, P>;
  static constexpr bool kReadsParam = PREC != Precision::kMaster;
  static constexpr FUSEDOPT_HD bool reads(int k) { return k < kStates && A::template reads_state<V, FIRST>(k); }
  static constexpr int kStatesRead = int(reads(0)) + int(reads(1)) + int(reads(2));
  static constexpr int kWidth = tile_width<P, Buffer>();
  static constexpr int kTilesInFlight = tiles_in_flight(
      kWidth, kWidth * (kReadsParam * sizeof(P) + sizeof(P) + kStatesRead * sizeof(S) + kHasExtra<PREC> * sizeof(Extra)));

  P* param;
  const P* grad;
  S* state[3];
  void* extra;
  Scalars scalars;
  RoundingKeys keys;
  Stats stats;

  FUSEDOPT_HD bool aligned() const {
    bool ok = vector_aligned(param) && vector_aligned(grad) && (!kHasExtra<PREC> || vector_aligned(extra));
    FUSEDOPT_UNROLL
    for (int k = 0; k < kStates; ++k) ok = ok && vector_aligned(state[k]);
    return ok;
  }
  FUSEDOPT_HD StepOp from(int64_t begin) const {
    StepOp op = *this;
    op.param = param + begin;
    op.grad = grad + begin;
    FUSEDOPT_UNROLL
    for (int k = 0; k < kStates; ++k) op.state[k] = state[k] + begin;
    op.extra = extra_at<PREC, P>(extra, begin);
    op.keys = keys.at(begin);
    return op;
  }
  FUSEDOPT_HD void element(int64_t i) const {
    step_element<A, P, S, PREC, V, FIRST>(param, grad, state[0], state[1], state[2], extra, i, scalars, keys, stats);
  }
  struct Tile {
    TileBuffer<P, kWidth> param, grad;
    TileBuffer<Buffer, kWidth> state[3];
    TileBuffer<Extra, kWidth> extra;
    FUSEDOPT_HD void load(const StepOp& op, int first) {
      if constexpr (kReadsParam) param.load(op.param + first);
      grad.load(op.grad + first);
      if constexpr (reads(0)) state[0].load(op.state[0] + first);
      if constexpr (reads(1)) state[1].load(op.state[1] + first);
      if constexpr (reads(2)) state[2].load(op.state[2] + first);
      if constexpr (kHasExtra<PREC>) extra.load(static_cast<const Extra*>(op.extra) + first);
    }
    FUSEDOPT_HD void update_and_store(const StepOp& op, int first) {
      const RoundingKeys keys = op.keys.at(first);
      void* local_extra = kHasExtra<PREC> ? extra.v : nullptr;
      FUSEDOPT_UNROLL
      for (int k = 0; k < kWidth; ++k)
        step_element<A, P, Buffer, PREC, V, FIRST>(param.v, grad.v, state[0].v, state[1].v, state[2].v, local_extra, k,
                                                   op.scalars, keys, op.stats);
      param.store(op.param + first);
      if constexpr (kStates > 0) state[0].store(op.state[0] + first);
      if constexpr (kStates > 1) state[1].store(op.state[1] + first);
      if constexpr (kStates > 2) state[2].store(op.state[2] + first);
      if constexpr (kHasExtra<PREC>) extra.store(static_cast<Extra*>(op.extra) + first);
    }
  };
};

// Weight averaging: avg (fp32) moves towards src (fp32/bf16/fp16).
template <typename T>
struct AverageOp {
  static constexpr int kWidth = tile_width<float, T>();
  static constexpr int kTilesInFlight = tiles_in_flight(kWidth, kWidth * (sizeof(float) + sizeof(T)));

  float* avg;
  const T* src;
  float weight;

  FUSEDOPT_HD bool aligned() const { return vector_aligned(avg) && vector_aligned(src); }
  FUSEDOPT_HD AverageOp from(int64_t begin) const { return {avg + begin, src + begin, weight}; }
  FUSEDOPT_HD void element(int64_t i) const { average_element(avg, src, i, weight); }

  struct Tile {
    TileBuffer<float, kWidth> avg;
    TileBuffer<T, kWidth> src;

    FUSEDOPT_HD void load(const AverageOp& op, int first) {
      avg.load(op.avg + first);
      src.load(op.src + first);
    }
    FUSEDOPT_HD void update_and_store(const AverageOp& op, int first) {
      FUSEDOPT_UNROLL
      for (int k = 0; k < kWidth; ++k) average_element(avg.v, src.v, k, op.weight);
      avg.store(op.avg + first);
    }
  };
};

// Adds x^2 of each element, in float64, to *sum (one running sum per thread: the order of
// the additions is fixed by the thread's share, so the result is the same on every run).
template <typename T>
struct SumSquaresOp {
  static constexpr int kWidth = tile_width<T>();
  static constexpr int kTilesInFlight = tiles_in_flight(kWidth, kWidth * sizeof(T));

  const T* x;
  double* sum;

  FUSEDOPT_HD static double square(T value) {
    const double v = load_float(value);
    return v * v;
  }

  FUSEDOPT_HD bool aligned() const { return vector_aligned(x); }
  FUSEDOPT_HD SumSquaresOp from(int64_t begin) const { return {x + begin, sum}; }
  FUSEDOPT_HD void element(int64_t i) const { *sum += square(x[i]); }

  struct Tile {
    TileBuffer<T, kWidth> x;

    FUSEDOPT_HD void load(const SumSquaresOp& op, int first) { x.load(op.x + first); }
    FUSEDOPT_HD void update_and_store(const SumSquaresOp& op, int) {
      FUSEDOPT_UNROLL
      for (int k = 0; k < kWidth; ++k) *op.sum += square(x.v[k]);
    }
  };
};

// ---- a thread's share of a chunk -----------------------------------------------------------
// Thread `thread` of `threads` runs `op` over its share of the elements [begin, end) of the
// tensor, a chunk (fewer than 2^31 elements: indices within it are int, which with the
// chunk's buffer addresses uniform over the block keeps a few registers free).
// When every buffer is 16-byte aligned at `begin` (chunks begin at multiples of
// kMaxTileWidth, so that is when the tensor's buffers are): thread t takes tiles t,
// t + threads, t + 2 * threads, ... (consecutive threads read consecutive 16-byte vectors:
// coalesced), kTilesInFlight of them per round, loading all of a round before computing any;
// the last (end - begin) % W elements then go one at a time. Otherwise every element goes one
// at a time: elements t, t + threads, ...
template <typename Op>
FUSEDOPT_HD void run_thread_share(const Op& tensor_op, int64_t begin, int64_t end, int thread, int threads) {
  constexpr int kWidth = Op::kWidth;
  constexpr int kRound = Op::kTilesInFlight;
  const Op op = tensor_op.from(begin);
  const int n = int(end - begin);
  int one_at_a_time = 0;
  if (op.aligned()) {
    const int n_tiles = n / kWidth;
    one_at_a_time = n_tiles * kWidth;
    for (int first_tile = thread; first_tile < n_tiles; first_tile += threads * kRound) {
      typename Op::Tile tiles[kRound];
      FUSEDOPT_UNROLL
      for (int r = 0; r < kRound; ++r) {
        const int tile = first_tile + r * threads;
        if (tile < n_tiles) tiles[r].load(op, tile * kWidth);
      }
      FUSEDOPT_UNROLL
      for (int r = 0; r < kRound; ++r) {
        const int tile = first_tile + r * threads;
        if (tile < n_tiles) tiles[r].update_and_store(op, tile * kWidth);
      }
    }
  }
  for (int i = one_at_a_time + thread; i < n; i += threads) op.element(i);
}

}  // namespace fusedopt::cuda
