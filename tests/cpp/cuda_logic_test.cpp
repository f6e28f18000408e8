// Host tests of the CUDA kernels' logic, for machines without a GPU (tests/test_cuda_logic.py
// compiles and runs this with the system C++ compiler). It includes the very headers the
// kernels are built from, so what passes here is what the kernels do, up to the device's
// own arithmetic (which the GPU tests compare with the CPU build):
//   a) launch planning: every element of every tensor is covered by exactly one chunk of
//      exactly one launch, in order, and no launch exceeds its slots or gridDim.x;
//   b) the tiled chunk loop (16-byte tiles plus a one-element tail, split over threads as
//      on the device) writes the same bits as a plain loop of the element function, for
//      every combination the step dispatch builds;
//   c) a misaligned buffer sends the whole tensor down the one-element path, with the same
//      result;
//   d) the random bits of an element are those of its 64-bit global index, past 2^32 too.
// Prints every failure (up to a limit) and exits nonzero if there was any.
#include <algorithm>
#include <array>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <limits>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

#include "cuda/element_tiles.h"
#include "cuda/launch_plan.h"
#include "fusedopt/step_dispatch.h"

using namespace fusedopt;
using namespace fusedopt::cuda;

namespace {

int failures = 0;
constexpr int kMaxPrinted = 30;

void fail(const std::string& what) {
  if (failures < kMaxPrinted) std::printf("FAIL: %s\n", what.c_str());
  ++failures;
}

#define CHECK(cond, context)                                                                     \
  do {                                                                                           \
    if (!(cond)) fail(std::string(context) + ": " #cond " (line " + std::to_string(__LINE__) + ")"); \
  } while (0)

// ---- a) launch planning ---------------------------------------------------------------------
// Metadata as the kernels carry it: the test only needs the tensor's index; `padding` gives a
// second list capacity, close to that of the steps' StepTensor.
template <int kPaddingBytes>
struct PlanMeta {
  int64_t tensor;
  char padding[kPaddingBytes];
};

// Plans `numels` and walks the launches as the kernels would: chunk c of a launch is the
// block (or grid-stride step) that calls locate_chunk(list, c). `every_chunk`: locate every
// chunk; otherwise (lists of billions of chunks) the first, second and last of each slot.
template <typename Meta>
void check_plan(const std::vector<int64_t>& numels, int64_t chunk_size, bool every_chunk, const std::string& name) {
  using List = TensorList<Meta>;
  const int64_t n = int64_t(numels.size());
  // The next element that must be covered: (tensor, element); tensors <= 0 are skipped.
  int64_t tensor = 0, element = 0;
  auto skip_empty = [&] {
    while (tensor < n && numels[tensor] <= 0) ++tensor;
  };
  skip_empty();
  bool in_order = true;
  int lists = 0;

  auto covers = [&](const List& list, int64_t c, const ChunkRef& ref) {
    const int64_t t = list.meta[ref.slot].tensor;
    const int64_t end = std::min(element + chunk_size, t < n ? numels[t] : 0);
    if (t != tensor || ref.begin != element || ref.end != end || !(ref.begin < ref.end)) {
      auto range = [](int64_t index, int64_t from, int64_t to) {
        return "tensor " + std::to_string(index) + " [" + std::to_string(from) + ", " + std::to_string(to) + ")";
      };
      fail(name + ": launch " + std::to_string(list.launch_index) + " chunk " + std::to_string(c) + " is " +
           range(t, ref.begin, ref.end) + ", expected " + range(tensor, element, end));
      in_order = false;
      return;
    }
    element = ref.end;
    if (element == numels[t]) {
      ++tensor;
      element = 0;
      skip_empty();
    }
  };

  auto launch = [&](const List& list) {
    CHECK(list.launch_index == lists, name);
    ++lists;
    CHECK(list.n_tensors >= 1 && list.n_tensors <= List::kCapacity, name);
    CHECK(list.n_chunks >= 1 && list.n_chunks <= kMaxGridX, name);
    CHECK(list.chunk_size == chunk_size, name);
    CHECK(list.chunk_start[0] == 0 && list.chunk_start[list.n_tensors] == list.n_chunks, name);
    if (!in_order) return;
    if (every_chunk) {
      for (int64_t c = 0; c < list.n_chunks && in_order; ++c) covers(list, c, locate_chunk(list, c));
      return;
    }
    for (int s = 0; s < list.n_tensors && in_order; ++s) {
      const int64_t first = list.chunk_start[s], last = list.chunk_start[s + 1] - 1;
      CHECK(list.numel[s] == numels[list.meta[s].tensor], name);
      CHECK(last - first + 1 == (list.numel[s] + chunk_size - 1) / chunk_size, name);
      covers(list, first, locate_chunk(list, first));
      if (first + 1 < last) {
        const ChunkRef second = locate_chunk(list, first + 1);
        CHECK(second.slot == s && second.begin == chunk_size, name);
      }
      if (first < last) {  // jump to the last chunk: it must end the tensor
        element = (last - first) * chunk_size;
        covers(list, last, locate_chunk(list, last));
      }
    }
  };

  int launches = 0;
  try {
    launches = plan_launches<Meta>(
        n, chunk_size, [&](int64_t t) { return numels[t]; },
        [&](int64_t t) {
          Meta m{};
          m.tensor = t;
          return m;
        },
        launch);
  } catch (const std::exception& e) {
    fail(name + ": plan_launches threw " + e.what());
    return;
  }
  CHECK(launches == lists, name);
  CHECK(!in_order || (tensor == n && element == 0), name + ": elements left uncovered");
}

template <typename Meta>
void expect_plan_error(const std::vector<int64_t>& numels, int64_t chunk_size, const std::string& name) {
  bool threw = false;
  try {
    plan_launches<Meta>(
        int64_t(numels.size()), chunk_size, [&](int64_t t) { return numels[t]; }, [](int64_t) { return Meta{}; },
        [](const TensorList<Meta>&) {});
  } catch (const std::invalid_argument&) {
    threw = true;
  }
  CHECK(threw, name + ": expected std::invalid_argument");
}

template <typename Meta>
void test_launch_planning(std::mt19937_64& rng, const char* meta_name) {
  const std::string tag = std::string("plan<") + meta_name + ">";
  const int capacity = TensorList<Meta>::kCapacity;
  for (int round = 0; round < 300; ++round) {
    const int64_t chunk_size = std::array<int64_t, 5>{1, 7, 64, 1000, 65536}[rng() % 5];
    const int n = int(rng() % (3 * capacity + 3));
    std::vector<int64_t> numels(n);
    for (auto& v : numels) {
      switch (rng() % 6) {
        case 0: v = 0; break;
        case 1: v = 1; break;
        case 2: v = chunk_size * int64_t(1 + rng() % 3); break;  // whole chunks
        default: v = int64_t(rng() % uint64_t(std::min<int64_t>(5 * chunk_size + 2, 300000)));
      }
    }
    check_plan<Meta>(numels, chunk_size, true, tag + " random #" + std::to_string(round));
  }
  // More tensors than a list holds, all tiny: several lists, every one full but the last.
  check_plan<Meta>(std::vector<int64_t>(5 * capacity + 1, 1), 64, true, tag + " many 1-element tensors");
  check_plan<Meta>(std::vector<int64_t>(7, 0), 64, true, tag + " only empty tensors");
  check_plan<Meta>({}, 64, true, tag + " no tensors");
  // Tensors past 2^31 and 2^32 elements (metadata only), among small ones.
  const int64_t big = (int64_t(1) << 31) + 5, huge = 3 * (int64_t(1) << 32);
  check_plan<Meta>({3, big, 0, 1, huge, 65536, 7}, 65536, true, tag + " 2^31+5 and 3*2^32");
  // gridDim.x: four tensors of 2^29 + 2 chunks each do not fit one launch (2^31 - 1 blocks).
  check_plan<Meta>({big, big, 5, big, big}, 4, false, tag + " grid limit");
  expect_plan_error<Meta>({big}, 1, tag + " one tensor over the grid limit");
  expect_plan_error<Meta>({5}, 0, tag + " zero chunk size");
}

// ---- b) and c): tiles against the plain element loop -------------------------------------------
template <typename T> const char* type_name();
template <> const char* type_name<float>() { return "fp32"; }
template <> const char* type_name<bf16_t>() { return "bf16"; }
template <> const char* type_name<fp16_t>() { return "fp16"; }
template <> const char* type_name<double>() { return "fp64"; }

const char* precision_name(Precision p) {
  switch (p) {
    case Precision::kPlain: return "plain";
    case Precision::kMaster: return "master";
    case Precision::kStochastic: return "stochastic";
    case Precision::kKahan: return "kahan";
  }
  return "?";
}

uint64_t bits_of(float x) { return float_bits(x); }
uint64_t bits_of(bf16_t x) { return x.bits; }
uint64_t bits_of(fp16_t x) { return x.bits; }
uint64_t bits_of(double x) {
  uint64_t u;
  std::memcpy(&u, &x, sizeof u);
  return u;
}

// Mostly N(0, scale^2), with infinities, NaN, signed zeros and a subnormal now and then.
float random_value(std::mt19937_64& rng, float scale) {
  switch (rng() % 64) {
    case 0: return std::numeric_limits<float>::infinity();
    case 1: return -std::numeric_limits<float>::infinity();
    case 2: return std::numeric_limits<float>::quiet_NaN();
    case 3: return 0.0f;
    case 4: return -0.0f;
    case 5: return 1e-40f;
    default: return scale * std::normal_distribution<float>(0.0f, 1.0f)(rng);
  }
}

// A buffer of n elements whose start is 64-byte aligned, plus `misalign` elements.
template <typename T>
struct Buffer {
  std::vector<unsigned char> raw;
  T* data = nullptr;
  int64_t n = 0;
  int misalign = 0;

  Buffer(int64_t n_, int misalign_, std::mt19937_64& rng, float scale) : n(n_), misalign(misalign_) {
    allocate();
    for (int64_t i = 0; i < n; ++i) store_nearest(data + i, random_value(rng, scale));
  }
  Buffer(const Buffer& other) : n(other.n), misalign(other.misalign) {
    allocate();
    std::memcpy(data, other.data, size_t(n) * sizeof(T));
  }
  Buffer& operator=(const Buffer&) = delete;

  void allocate() {
    raw.assign(size_t(n + misalign) * sizeof(T) + 64, 0);
    const uintptr_t start = (reinterpret_cast<uintptr_t>(raw.data()) + 63) & ~uintptr_t(63);
    data = reinterpret_cast<T*>(start) + misalign;
  }
};

template <typename T>
void check_same(const Buffer<T>& got, const Buffer<T>& expected, const char* what, const std::string& context) {
  for (int64_t i = 0; i < got.n; ++i) {
    if (bits_of(got.data[i]) != bits_of(expected.data[i])) {
      char line[160];
      std::snprintf(line, sizeof line, ": %s[%lld] is 0x%08llx, the element loop wrote 0x%08llx", what, (long long)i,
                    (unsigned long long)bits_of(got.data[i]), (unsigned long long)bits_of(expected.data[i]));
      fail(context + line);
      return;
    }
  }
}

// Each (grad, param before, param after) the element functions report, as bits.
struct RecordedStats {
  std::vector<std::array<uint32_t, 3>>* seen;
  void add(float g, float before, float after) const {
    seen->push_back({float_bits(g), float_bits(before), float_bits(after)});
  }
};

// The tiled path reports the elements in another order, so the lists are compared sorted.
void check_same_stats(std::vector<std::array<uint32_t, 3>> got, std::vector<std::array<uint32_t, 3>> expected,
                      const std::string& context) {
  std::sort(got.begin(), got.end());
  std::sort(expected.begin(), expected.end());
  CHECK(got == expected, context + ": stats saw other (grad, before, after) values");
}

// Counts what run_thread_share does with an op: tiles loaded and single elements.
template <typename Op>
struct CountingOp {
  static constexpr int kWidth = Op::kWidth;
  static constexpr int kTilesInFlight = Op::kTilesInFlight;
  Op op;
  int64_t* tiles;
  int64_t* singles;

  bool aligned() const { return op.aligned(); }
  CountingOp from(int64_t begin) const { return {op.from(begin), tiles, singles}; }
  void element(int64_t i) const {
    ++*singles;
    op.element(i);
  }
  struct Tile {
    typename Op::Tile tile;
    void load(const CountingOp& c, int first) {
      ++*c.tiles;
      tile.load(c.op, first);
    }
    void update_and_store(const CountingOp& c, int first) { tile.update_and_store(c.op, first); }
  };
};

// How the device splits work: chunks of `chunk` elements (one block each), `threads` threads.
struct Split {
  int64_t chunk;
  int threads;
};
constexpr Split kSplits[] = {{48, 3}, {1024, 32}, {65536, 512}};
constexpr int64_t kLengths[] = {1, 7, 8, 9, 33, 1003};

// Runs `op` over [0, n) as the kernels do (every chunk, every thread of its block) and checks
// the tile / single-element counts: tiles over the aligned body of each chunk and the
// remainder one at a time, or every element one at a time when `tiled` is false.
template <typename Op>
void run_like_kernel(const Op& op, int64_t n, const Split& split, bool tiled, const std::string& context) {
  int64_t tiles = 0, singles = 0;
  const CountingOp<Op> counting{op, &tiles, &singles};
  for (int64_t begin = 0; begin < n; begin += split.chunk) {
    const int64_t end = std::min(begin + split.chunk, n);
    for (int thread = 0; thread < split.threads; ++thread)
      run_thread_share(counting, begin, end, thread, split.threads);
  }
  int64_t expected_tiles = 0;
  if (tiled)
    for (int64_t begin = 0; begin < n; begin += split.chunk)
      expected_tiles += std::min(split.chunk, n - begin) / Op::kWidth;
  CHECK(tiles == expected_tiles, context + " (tiles " + std::to_string(tiles) + ")");
  CHECK(singles == n - expected_tiles * Op::kWidth, context + " (single elements " + std::to_string(singles) + ")");
}

// The same arbitrary but fixed hyper-parameters for every case (each algorithm reads the
// fields its header names); the keys' offset is past 2^32 so its upper half takes part in the
// random bits.
const double* test_group() {
  static double group[kNumGroupFields];
  group[kGroupLr] = 0.05;
  group[kGroupBeta1] = 0.9;
  group[kGroupBeta2] = 0.999;
  group[kGroupEps] = 1e-8;
  group[kGroupWeightDecay] = 0.01;
  group[kGroupWdMode] = double(int(WeightDecayMode::kDecoupled));
  group[kGroupMaximize] = 0.0;
  group[kGroupNesterov] = 1.0;
  group[kGroupAux0] = 0.3;    // schedule-free ckp1
  group[kGroupAux1] = -0.04;  // schedule-free y coefficient
  group[kGroupAux2] = 0.2;    // schedule-free bias correction 2
  return group;
}
const RoundingKeys kKeys = rounding_keys(0x5EEDu, 3, 7, (int64_t(1) << 32) + 12345);

// Which buffer a case offsets by one element (c); kNone: all aligned (b).
enum Role : int { kNone, kParam, kGrad, kState0, kState1, kState2, kExtra, kNumRoles };
const char* role_name(int r) {
  static const char* names[] = {"none", "param", "grad", "state0", "state1", "state2", "extra"};
  return names[r];
}

template <typename P, typename S, Precision PREC>
std::string case_name(const char* algorithm, const std::string& flags, int64_t n, const Split& split, Role misaligned) {
  return std::string(algorithm) + " P=" + type_name<P>() + " S=" + type_name<S>() + " " + precision_name(PREC) + flags +
         " n=" + std::to_string(n) + " chunk=" + std::to_string(split.chunk) +
         " threads=" + std::to_string(split.threads) + " misaligned=" + role_name(misaligned);
}

// Algorithm A's StepOp (the tiles) against a plain loop of step_element, bit for bit.
template <class A, typename P, typename S, Precision PREC, bool V, bool FIRST>
struct StepCase {
  static constexpr int kStates = A::template kStates<V>;
  static constexpr bool kTouches[kNumRoles] = {false, true, true, kStates > 0, kStates > 1, kStates > 2,
                                               kHasExtra<PREC>};
  const char* name;

  void run_one(int64_t n, const Split& split, Role misaligned, std::mt19937_64& rng) const {
    using Extra = ExtraOf<P, PREC>;
    auto off = [&](Role r) { return r == misaligned ? 1 : 0; };
    const Buffer<P> param(n, off(kParam), rng, 1.0f), grad(n, off(kGrad), rng, 1.0f);
    const Buffer<S> s0(n, off(kState0), rng, 0.1f), s1(n, off(kState1), rng, 0.01f), s2(n, off(kState2), rng, 0.01f);
    const Buffer<Extra> extra(n, off(kExtra), rng, PREC == Precision::kKahan ? 1e-3f : 1.0f);
    const auto s = A::template scalars<ComputeOf<P>>(test_group(), 0.05, 7.0, 0.5f);
    const std::string flags = std::string(V ? " variant" : "") + (FIRST ? " first" : "");
    const std::string context = case_name<P, S, PREC>(name, flags, n, split, misaligned);

    Buffer<P> p_ref(param), p_got(param), g_ref(grad), g_got(grad);
    Buffer<S> a_ref(s0), a_got(s0), b_ref(s1), b_got(s1), c_ref(s2), c_got(s2);
    Buffer<Extra> e_ref(extra), e_got(extra);
    std::vector<std::array<uint32_t, 3>> seen_ref, seen_got;
    for (int64_t i = 0; i < n; ++i)
      step_element<A, P, S, PREC, V, FIRST>(p_ref.data, g_ref.data, a_ref.data, b_ref.data, c_ref.data, e_ref.data, i,
                                            s, kKeys, RecordedStats{&seen_ref});

    // The unused buffers are passed too (misaligned when the case says so): an op must ignore
    // what its element function does not touch.
    const bool tiled = !kTouches[misaligned];
    const StepOp<A, P, S, PREC, V, FIRST, RecordedStats> op{
        p_got.data, g_got.data, {a_got.data, b_got.data, c_got.data}, e_got.data, s, kKeys, RecordedStats{&seen_got}};
    CHECK(op.aligned() == tiled, context);
    run_like_kernel(op, n, split, tiled, context);
    check_same(p_got, p_ref, "param", context);
    check_same(g_got, g_ref, "grad", context);
    check_same(a_got, a_ref, "state0", context);
    check_same(b_got, b_ref, "state1", context);
    check_same(c_got, c_ref, "state2", context);
    check_same(e_got, e_ref, "extra", context);
    check_same_stats(seen_got, seen_ref, context);
  }
};

// Every length and split with all buffers aligned; then, on one length that has whole tiles
// and a tail, each buffer offset by one element in turn. The ops run with stats recorded
// (the kernels' other instantiation, NoStats, differs only in an empty add).
template <typename Case>
void run_case(const Case& c) {
  std::mt19937_64 rng(12345);
  for (const Split& split : kSplits)
    for (int64_t n : kLengths) c.run_one(n, split, kNone, rng);
  for (int role = kParam; role < kNumRoles; ++role) c.run_one(1003, kSplits[0], Role(role), rng);
}

// What dispatch_step hands a kernel, and the kernels the test instantiates through it: so
// exactly the combinations the backends build are tested.
struct Combo {
  int algorithm;
  DType param_dtype;
  DType state_dtype;
  Precision precision;
  bool variant;
};

int combos_run = 0;
const char* algorithm_name(int id) {
  switch (id) {
#define FUSEDOPT_NAME(id, A) \
  case id: return #A;
    FUSEDOPT_ALGORITHMS(FUSEDOPT_NAME)
#undef FUSEDOPT_NAME
  }
  return "?";
}

template <class A, typename P, typename S, Precision PREC, bool V>
struct StepCheck {
  static void run(const Combo& combo) {
    // 8-bit states take the CUDA quantized functor, one thread per element (no tiles): its
    // math is the CPU's quantized_block, tested against references in test_quantized.py.
    if constexpr (!std::is_same_v<S, q8_t>) {
      const char* name = algorithm_name(combo.algorithm);
      run_case(StepCase<A, P, S, PREC, V, false>{name});
      if constexpr (A::kUsesFirst) run_case(StepCase<A, P, S, PREC, V, true>{name});
      ++combos_run;
    }
  }
};

// Combinations built for one algorithm.
int run_dispatched(int algorithm) {
  combos_run = 0;
  for (DType pd : {DType::kFloat32, DType::kBFloat16, DType::kFloat16, DType::kFloat64})
    for (DType sd : {DType::kFloat32, DType::kBFloat16, DType::kFloat16, DType::kFloat64})  // (not 8-bit)
      for (int pr = 0; pr < 4; ++pr)
        for (bool variant : {false, true}) {
          try {
            dispatch_step<StepCheck>(Combo{algorithm, pd, sd, Precision(pr), variant});
          } catch (const std::invalid_argument&) {
            // not a combination the backends build
          }
        }
  return combos_run;
}

// Averaging: the same tiles around average_element.
template <typename T>
void test_average() {
  std::mt19937_64 rng(777);
  for (const Split& split : kSplits)
    for (int64_t n : kLengths)
      for (int misaligned = 0; misaligned < 3; ++misaligned) {  // none, avg, src
        const Buffer<float> avg(n, misaligned == 1, rng, 1.0f);
        const Buffer<T> src(n, misaligned == 2, rng, 1.0f);
        const std::string context = std::string("average src=") + type_name<T>() + " n=" + std::to_string(n) +
                                    " chunk=" + std::to_string(split.chunk) + " misaligned=" +
                                    std::array<const char*, 3>{"none", "avg", "src"}[misaligned];
        Buffer<float> a_ref(avg), a_got(avg);
        Buffer<T> s_ref(src), s_got(src);
        for (int64_t i = 0; i < n; ++i) average_element(a_ref.data, s_ref.data, i, 0.25f);
        const AverageOp<T> op{a_got.data, s_got.data, 0.25f};
        CHECK(op.aligned() == (misaligned == 0), context);
        run_like_kernel(op, n, split, misaligned == 0, context);
        check_same(a_got, a_ref, "avg", context);
        check_same(s_got, s_ref, "src", context);
      }
}

// Sum of squares: one thread adds its elements in element order, tiles or not, so with one
// thread the sum is that of the plain loop, bit for bit; with many it is the same on every run.
template <typename T>
void test_sum_squares() {
  std::mt19937_64 rng(999);
  for (int64_t n : kLengths)
    for (int misaligned = 0; misaligned < 2; ++misaligned) {
      const Buffer<T> x(n, misaligned, rng, 1.0f);
      const std::string context = std::string("sum_squares ") + type_name<T>() + " n=" + std::to_string(n) +
                                  (misaligned ? " misaligned" : "");
      double expected = 0.0;
      for (int64_t i = 0; i < n; ++i) SumSquaresOp<T>{x.data, &expected}.element(i);
      double one_thread = 0.0;
      run_like_kernel(SumSquaresOp<T>{x.data, &one_thread}, n, Split{64, 1}, misaligned == 0, context);
      CHECK(float_bits(float(one_thread)) == float_bits(float(expected)) && std::memcmp(&one_thread, &expected, 8) == 0,
            context);
      std::vector<double> per_thread_a(7, 0.0), per_thread_b(7, 0.0);
      for (auto* sums : {&per_thread_a, &per_thread_b})
        for (int thread = 0; thread < 7; ++thread)
          for (int64_t begin = 0; begin < n; begin += 64) {
            const SumSquaresOp<T> op{x.data, &(*sums)[thread]};
            run_thread_share(op, begin, std::min<int64_t>(begin + 64, n), thread, 7);
          }
      CHECK(std::memcmp(per_thread_a.data(), per_thread_b.data(), 7 * sizeof(double)) == 0, context + " (repeat)");
    }
}

}  // namespace

// ---- d) random bits of an element -------------------------------------------------------------
// random_bits forms the global index g = offset + i from 32-bit halves (so the CPU loop
// vectorizes on 32-bit lanes); it must equal its definition on the 64-bit g, whatever the
// offset, including where offset + i carries into the upper half and for i past 2^32.
uint32_t random_bits_definition(uint32_t key, uint64_t g) {
  return mix32((uint32_t(g) ^ key) + uint32_t(g >> 32) * 0x27D4EB2Fu);
}

void test_random_bits(std::mt19937_64& rng) {
  const int64_t k32 = int64_t(1) << 32;
  const std::vector<int64_t> offsets = {0, 1, k32 - 1, k32 - 7, k32, 3 * k32 - 100000, (int64_t(1) << 62) - 5};
  const std::vector<int64_t> indices = {0, 1, 6, 7, 8, 99999, 100000, k32 - 1, k32, 5 * k32 + 3};
  for (int trial = 0; trial < 4; ++trial) {
    const uint32_t key = uint32_t(rng());
    for (int64_t offset : offsets)
      for (int64_t i : indices) {
        const uint32_t got = random_bits(key, offset, i);
        const uint32_t want = random_bits_definition(key, uint64_t(offset) + uint64_t(i));
        CHECK(got == want, "random_bits(offset=" + std::to_string(offset) + ", i=" + std::to_string(i) + ")");
      }
  }
  // The tile and chunk loops shift the arrays and the keys together (RoundingKeys::at).
  const RoundingKeys keys{uint32_t(rng()), uint32_t(rng()), k32 - 3};
  for (int64_t first : {int64_t(0), int64_t(2), int64_t(3), int64_t(65536)})
    for (int64_t i = 0; i < 8; ++i)
      CHECK(random_bits(keys.at(first).a, keys.at(first).offset, i) == random_bits(keys.a, keys.offset, first + i),
            "RoundingKeys::at(" + std::to_string(first) + ") draws other bits at " + std::to_string(i));
}

int main() {
  std::mt19937_64 rng(2024);
  test_launch_planning<PlanMeta<8>>(rng, "16-byte meta");
  test_launch_planning<PlanMeta<200>>(rng, "208-byte meta");
  test_random_bits(rng);

  // 14 (param, state, precision) combinations in step_dispatch.h, each with both variants,
  // for every algorithm.
  int all_combos = 0;
  for (int id = 0; id < kNumAlgorithms; ++id) {
    const int combos = run_dispatched(id);
    CHECK(combos == 28, std::string(algorithm_name(id)) + ": combinations dispatched " + std::to_string(combos));
    all_combos += combos;
  }

  test_average<float>();
  test_average<bf16_t>();
  test_average<fp16_t>();
  test_sum_squares<float>();
  test_sum_squares<bf16_t>();
  test_sum_squares<fp16_t>();

  if (failures > kMaxPrinted) std::printf("... and %d more failures\n", failures - kMaxPrinted);
  std::printf("cuda_logic_test: %s (%d failures; %d combinations of %d algorithms)\n", failures ? "FAILED" : "passed",
              failures, all_combos, kNumAlgorithms);
  return failures ? 1 : 0;
}
