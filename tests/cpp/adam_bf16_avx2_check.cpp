// Checks the hand-vectorized AVX2 Adam kernel (csrc/cpu/adam_bf16_avx2.h) against the generic
// element step (element.h: step_element, the code every other build and the CUDA kernels run),
// bit for bit, on every buffer: bf16 params with bf16 or fp32 states, precisions plain,
// stochastic, Kahan and master, amsgrad off/on, coupled / decoupled / no decay, each with and
// without a grad factor (maximize, a grad scale), lengths around the 16-element block,
// stochastic-rounding offsets whose low half carries inside the piece or whose high half is
// nonzero, and inputs sprinkled with NaNs (quiet, signalling, negative), infinities, signed
// zeros, subnormals, values that round up to inf and exact rounding ties. The kernel runs the way the CPU loop calls it: a prefix of
// whole blocks, then step_element on the rest.
//
// Built with the AVX2 build's flags by tests/test_adam_bf16_avx2.py. Exit 0: all equal; 1: a
// mismatch (described on stderr); 2: the header was not compiled in (wrong flags).
#include <cstdio>
#include <cstring>
#include <vector>

#include "cpu/adam_bf16_avx2.h"

#if !defined(__AVX2__) || defined(__AVX512F__)
int main() { return 2; }
#else
using namespace fusedopt;

namespace {

uint64_t rng_state = 0x9E3779B97F4A7C15ull;
uint32_t next_u32() {
  rng_state ^= rng_state << 13;
  rng_state ^= rng_state >> 7;
  rng_state ^= rng_state << 17;
  return uint32_t(rng_state >> 16);
}
float uniform() { return float(next_u32() >> 8) / float(1 << 24); }
float normal_ish() { return (uniform() + uniform() + uniform() - 1.5f) * 2.0f; }

// A special fp32 bit pattern now and then, else `usual`.
uint32_t sprinkle(uint32_t usual) {
  static const uint32_t kSpecial[] = {
      0x7FC00000u, 0xFFC00000u, 0x7F810000u, 0x7FFFFFFFu, 0xFF80FFFFu,  // NaNs (quiet, signalling, payloads)
      0x7F800000u, 0xFF800000u, 0x00000000u, 0x80000000u,              // infinities, signed zeros
      0x00010000u, 0x80010000u, 0x00000001u,                           // subnormals
      0x7F7FFFFFu, 0x7F7F8000u, 0xFF7FC000u,                           // round up to inf
      0x3F808000u, 0x3F818000u, 0xBF808000u,                           // ties (even, odd mantissa)
  };
  if (next_u32() % 64 != 0) return usual;
  return kSpecial[next_u32() % (sizeof kSpecial / sizeof kSpecial[0])];
}

uint16_t bf16_bits(float f) { return uint16_t(bf16_nearest_high(f) >> 16); }

template <typename T>
T make(float f, bool sprinkled);
template <>
bf16_t make<bf16_t>(float f, bool sprinkled) {
  uint32_t b = uint32_t(bf16_bits(f)) << 16;
  if (sprinkled) b = sprinkle(b);
  return bf16_t{uint16_t(b >> 16)};
}
template <>
float make<float>(float f, bool sprinkled) {
  uint32_t b = float_bits(f);
  if (sprinkled) b = sprinkle(b);
  return bits_float(b);
}

template <typename T>
uint32_t raw(T x) {
  if constexpr (std::is_same_v<T, float>) return float_bits(x);
  else return x.bits;
}

// The buffers of one piece.
template <typename S>
struct Buffers {
  std::vector<bf16_t> param, grad, comp;
  std::vector<S> s0, s1, s2;
  std::vector<float> master;
  explicit Buffers(int64_t n) {
    for (int64_t i = 0; i < n; ++i) {
      param.push_back(make<bf16_t>(normal_ish(), true));
      grad.push_back(make<bf16_t>(normal_ish() * 0.1f, true));
      comp.push_back(make<bf16_t>(normal_ish() * 1e-3f, true));
      s0.push_back(make<S>(normal_ish() * 0.01f, true));
      const float v = normal_ish() * 1e-3f;
      s1.push_back(make<S>(v * v, true));
      s2.push_back(make<S>(v * v * 2.0f, true));
      master.push_back(make<float>(normal_ish(), true));
    }
  }
  void* extra(Precision prec) {
    if (prec == Precision::kMaster) return master.data();
    if (prec == Precision::kKahan) return comp.data();
    return nullptr;
  }
};

template <typename T>
bool is_nan(T x) {
  if constexpr (std::is_same_v<T, float>) return (float_bits(x) & 0x7FFFFFFFu) > 0x7F800000u;
  else return (x.bits & 0x7FFFu) > 0x7F80u;
}

// Equal bits, or both NaN: which payload an operation on two NaNs returns depends on the
// operand order the compiler picks for a commutative operation (x86 returns the first; CUDA
// returns one canonical NaN), so NaN payloads are not part of the bit promise.
template <typename S>
bool same(const Buffers<S>& a, const Buffers<S>& b, const char* what) {
  auto cmp = [&](const auto& x, const auto& y, const char* buffer) {
    for (size_t i = 0; i < x.size(); ++i)
      if (raw(x[i]) != raw(y[i]) && !(is_nan(x[i]) && is_nan(y[i]))) {
        std::fprintf(stderr, "%s: %s[%zu] is %#x, step_element gives %#x\n", what, buffer, i, raw(x[i]), raw(y[i]));
        return false;
      }
    return true;
  };
  return cmp(a.param, b.param, "param") && cmp(a.comp, b.comp, "kahan_comp") && cmp(a.s0, b.s0, "exp_avg") &&
         cmp(a.s1, b.s1, "exp_avg_sq") && cmp(a.s2, b.s2, "max_exp_avg_sq") && cmp(a.master, b.master, "master");
}

template <typename S, Precision PREC, bool AMSGRAD>
bool check(int64_t n, const Adam::Scalars<float>& scalars, const RoundingKeys& keys, const char* what) {
  Buffers<S> want(n);
  Buffers<S> got = want;
  S* s2w = AMSGRAD ? want.s2.data() : nullptr;
  for (int64_t i = 0; i < n; ++i)
    step_element<Adam, bf16_t, S, PREC, AMSGRAD, false>(want.param.data(), want.grad.data(), want.s0.data(),
                                                         want.s1.data(), s2w, want.extra(PREC), i, scalars, keys);
  // As the CPU loop does it: the kernel's prefix, then step_element on arrays moved past it.
  S* s2g = AMSGRAD ? got.s2.data() : nullptr;
  const int64_t done = cpu::adam_bf16_avx2::step_prefix<S, PREC, AMSGRAD>(
      got.param.data(), got.grad.data(), got.s0.data(), got.s1.data(), s2g, got.extra(PREC), n, scalars, keys);
  if (done < 0 || done > n || done % cpu::adam_bf16_avx2::kBlock != 0) {
    std::fprintf(stderr, "%s: the kernel claims %lld of %lld elements\n", what, (long long)done, (long long)n);
    return false;
  }
  const RoundingKeys rest = keys.at(done);
  void* extra = extra_at<PREC, bf16_t>(got.extra(PREC), done);
  for (int64_t i = 0; i < n - done; ++i)
    step_element<Adam, bf16_t, S, PREC, AMSGRAD, false>(got.param.data() + done, got.grad.data() + done,
                                                         got.s0.data() + done, got.s1.data() + done,
                                                         AMSGRAD ? s2g + done : nullptr, extra, i, scalars, rest);
  return same(got, want, what);
}

struct GroupCase {
  const char* name;
  double lr, beta1, beta2, eps, weight_decay;
  WeightDecayMode mode;
  bool maximize;
  float unscale;
  double step;
};

template <typename S, Precision PREC, bool AMSGRAD>
int run_all(const char* label) {
  const GroupCase groups[] = {
      {"adamw", 1e-3, 0.9, 0.999, 1e-8, 1e-2, WeightDecayMode::kDecoupled, false, 1.0f, 1},
      {"adamw-large-lr", 3.0, 0.5, 0.9, 1e-3, 0.1, WeightDecayMode::kDecoupled, false, 1.0f, 7},
      {"adam-coupled", 1e-2, 0.9, 0.99, 1e-8, 0.1, WeightDecayMode::kCoupled, false, 1.0f, 3},
      {"adam-no-decay", 1e-2, 0.9, 0.99, 1e-8, 0.0, WeightDecayMode::kCoupled, false, 1.0f, 2},
      {"maximize-scaled", 1e-2, 0.8, 0.95, 1e-6, 1e-2, WeightDecayMode::kIndependent, true, 0.25f, 5},
      {"adam-coupled-maximize-scaled", 1e-2, 0.9, 0.99, 1e-8, 0.1, WeightDecayMode::kCoupled, true, 0.5f, 4},
      {"adam-no-decay-scaled", 1e-2, 0.9, 0.99, 1e-8, 0.0, WeightDecayMode::kDecoupled, false, 2.0f, 6},
  };
  // Offsets of the piece's first element in the param: the low half carrying inside the piece
  // (mid-block and on a block boundary) and a nonzero high half.
  const int64_t offsets[] = {0, 77, (int64_t(1) << 32) - 37, (int64_t(1) << 32) - 48, (int64_t(3) << 32) + 5};
  const int64_t lengths[] = {1, 15, 16, 17, 33, 1000, 4099};
  int failures = 0;
  for (const GroupCase& gc : groups) {
    double row[kNumGroupFields] = {};
    row[kGroupLr] = gc.lr;
    row[kGroupBeta1] = gc.beta1;
    row[kGroupBeta2] = gc.beta2;
    row[kGroupEps] = gc.eps;
    row[kGroupWeightDecay] = gc.weight_decay;
    row[kGroupWdMode] = double(int(gc.mode));
    row[kGroupMaximize] = gc.maximize ? 1.0 : 0.0;
    const Adam::Scalars<float> scalars = Adam::scalars<float>(row, gc.lr, gc.step, gc.unscale);
    for (int64_t offset : offsets) {
      const RoundingKeys keys = rounding_keys(1234567ull + uint64_t(offset), 3, int64_t(gc.step), offset);
      for (int64_t n : lengths) {
        char what[200];
        std::snprintf(what, sizeof what, "%s amsgrad=%d %s offset=%lld n=%lld", label, int(AMSGRAD), gc.name,
                      (long long)offset, (long long)n);
        if (!check<S, PREC, AMSGRAD>(n, scalars, keys, what)) ++failures;
      }
    }
  }
  return failures;
}

template <typename S, Precision PREC>
int run_variants(const char* label) {
  return run_all<S, PREC, false>(label) + run_all<S, PREC, true>(label);
}

}  // namespace

int main() {
  int failures = 0;
  failures += run_variants<bf16_t, Precision::kPlain>("bf16 states, plain");
  failures += run_variants<bf16_t, Precision::kStochastic>("bf16 states, stochastic");
  failures += run_variants<bf16_t, Precision::kKahan>("bf16 states, kahan");
  failures += run_variants<bf16_t, Precision::kMaster>("bf16 states, master");
  failures += run_variants<float, Precision::kPlain>("fp32 states, plain");
  failures += run_variants<float, Precision::kStochastic>("fp32 states, stochastic");
  failures += run_variants<float, Precision::kKahan>("fp32 states, kahan");
  failures += run_variants<float, Precision::kMaster>("fp32 states, master");
  if (failures) std::fprintf(stderr, "%d failing cases\n", failures);
  return failures ? 1 : 0;
}
#endif
