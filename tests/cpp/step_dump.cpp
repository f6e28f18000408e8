// Runs the CPU kernels (the build dispatch.cpp picks: the baseline one when compiled without
// the x86 instruction-set builds, as on AArch64) over fixed pseudo-random inputs — every
// algorithm, the bf16 precision paths, float64, the sum of squares and the copy — and writes
// every resulting buffer to stdout as raw bytes. tests/test_aarch64.py builds it for the host
// and for AArch64 (run under qemu) and requires the same bytes: the math is written once, so
// both builds must compute the same bits.
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <vector>

#include "cpu/dispatch.h"
#include "fusedopt/algorithms.h"
#include "fusedopt/precision.h"

using namespace fusedopt;
using namespace fusedopt::cpu;

namespace {

uint64_t g_state = 0x9E3779B97F4A7C15ull;
float next_float() {  // deterministic, platform-independent: xorshift64* -> [-1, 1)
  g_state ^= g_state >> 12;
  g_state ^= g_state << 25;
  g_state ^= g_state >> 27;
  const uint64_t r = g_state * 0x2545F4914F6CDD1Dull;
  return float(int32_t(r >> 32)) * (1.0f / 2147483648.0f);
}

template <typename T>
std::vector<T> random_buffer(size_t n, float scale, bool positive = false) {
  std::vector<T> v(n);
  for (auto& x : v) {
    float f = next_float() * scale;
    if (positive) f = f < 0 ? -f : f;
    if constexpr (std::is_same_v<T, bf16_t>) store_nearest(&x, f);
    else x = T(f);
  }
  return v;
}

template <typename T>
void dump(const std::vector<T>& v) {
  std::fwrite(v.data(), sizeof(T), v.size(), stdout);
}

const int64_t kSizes[] = {1000, 33, 4099, 70000};  // tails, and more than one chunk

// One step call over four tensors of param type P and state type S, twice (the second with the
// step counters advanced), then dumps params, states and extra buffers.
template <typename P, typename S>
void run(int algorithm, Precision precision, bool variant, std::vector<double> group, int num_threads) {
  const int n_tensors = 4;
  std::vector<std::vector<P>> params, grads, extras;
  std::vector<std::vector<S>> states[3];
  std::vector<std::vector<float>> masters;
  std::vector<float> steps(n_tensors, 0.0f);
  std::vector<int64_t> table(size_t(n_tensors) * kNumTableColumns, 0);
  for (int t = 0; t < n_tensors; ++t) {
    const size_t n = size_t(kSizes[t]);
    params.push_back(random_buffer<P>(n, 1.0f));
    grads.push_back(random_buffer<P>(n, 0.5f));
    for (int k = 0; k < 3; ++k) states[k].push_back(random_buffer<S>(n, k == 0 ? 0.1f : 0.01f, k > 0));
    extras.push_back(random_buffer<P>(n, 1e-3f));
    masters.push_back(random_buffer<float>(n, 1.0f));
  }
  for (int t = 0; t < n_tensors; ++t) {
    int64_t* row = table.data() + t * kNumTableColumns;
    row[kColParam] = int64_t(params[t].data());
    row[kColGrad] = int64_t(grads[t].data());
    for (int k = 0; k < 3; ++k) row[kColState0 + k] = int64_t(states[k][t].data());
    if (precision == Precision::kMaster) row[kColExtra] = int64_t(masters[t].data());
    if (precision == Precision::kKahan) row[kColExtra] = int64_t(extras[t].data());
    row[kColStep] = int64_t(&steps[t]);
    row[kColNumel] = kSizes[t];
    row[kColGroup] = 0;
    row[kColParamIndex] = t;
    row[kColSeed] = 1234;
    row[kColRngOffset] = t == 3 ? (int64_t(1) << 32) - 7 : 0;  // a shard past 2^32 elements
  }
  StepCall call;
  call.algorithm = algorithm;
  call.table = table.data();
  call.n_tensors = n_tensors;
  call.groups = group.data();
  call.n_groups = 1;
  call.param_dtype = std::is_same_v<P, float> ? DType::kFloat32 : std::is_same_v<P, double> ? DType::kFloat64
                                                                                               : DType::kBFloat16;
  call.state_dtype = std::is_same_v<S, float> ? DType::kFloat32 : std::is_same_v<S, double> ? DType::kFloat64
                                                                                               : DType::kBFloat16;
  call.precision = precision;
  call.variant = variant;
  call.num_threads = num_threads;
  for (int rep = 0; rep < 2; ++rep) active_kernels().step(call);
  for (int t = 0; t < n_tensors; ++t) {
    dump(params[t]);
    for (int k = 0; k < 3; ++k) dump(states[k][t]);
    dump(extras[t]);
    dump(masters[t]);
  }
  dump(steps);
}

std::vector<double> group_of(double lr, double beta1, double beta2, double eps, double wd, WeightDecayMode mode,
                             double nesterov = 0.0, double aux0 = 0.0, double aux1 = 0.0, double aux2 = 0.0) {
  std::vector<double> g(kNumGroupFields, 0.0);
  g[kGroupLr] = lr;
  g[kGroupBeta1] = beta1;
  g[kGroupBeta2] = beta2;
  g[kGroupEps] = eps;
  g[kGroupWeightDecay] = wd;
  g[kGroupWdMode] = double(int(mode));
  g[kGroupNesterov] = nesterov;
  g[kGroupAux0] = aux0;
  g[kGroupAux1] = aux1;
  g[kGroupAux2] = aux2;
  return g;
}

}  // namespace

int main() {
  const int threads = 2;
  const auto adamw = group_of(1e-3, 0.9, 0.999, 1e-8, 0.1, WeightDecayMode::kDecoupled);
  const auto adam_l2 = group_of(1e-3, 0.9, 0.999, 1e-8, 0.01, WeightDecayMode::kCoupled);
  run<float, float>(0, Precision::kPlain, false, adamw, threads);
  run<float, float>(0, Precision::kPlain, true, adam_l2, threads);  // amsgrad
  run<double, double>(0, Precision::kPlain, false, adamw, threads);
  run<bf16_t, bf16_t>(0, Precision::kPlain, false, adamw, threads);
  run<bf16_t, bf16_t>(0, Precision::kStochastic, false, adamw, threads);
  run<bf16_t, float>(0, Precision::kStochastic, false, adamw, threads);
  run<bf16_t, bf16_t>(0, Precision::kKahan, false, adamw, threads);
  run<bf16_t, float>(0, Precision::kMaster, false, adamw, threads);
  run<float, float>(1, Precision::kPlain, true, group_of(0.1, 0.9, 0.0, 0.0, 1e-4, WeightDecayMode::kCoupled, 1.0),
                    threads);                                                                     // SGD nesterov
  run<bf16_t, bf16_t>(2, Precision::kStochastic, false,
                      group_of(1e-4, 0.9, 0.99, 0.0, 0.1, WeightDecayMode::kDecoupled), threads);  // Lion
  run<float, float>(3, Precision::kPlain, false,
                    group_of(2.5e-3, 0.9, 0.999, 1e-8, 0.01, WeightDecayMode::kDecoupled, 0.0, 0.5, -2e-3, 0.002),
                    threads);  // AdamWScheduleFree
  // The sum of squares and the copy.
  std::vector<float> x = random_buffer<float>(100003, 3.0f);
  std::vector<float> y(x.size(), 0.0f);
  const int64_t ptr = int64_t(x.data()), numel = int64_t(x.size()), dst = int64_t(y.data()),
                nbytes = int64_t(x.size() * sizeof(float));
  ReduceCall reduce;
  reduce.ptrs = &ptr;
  reduce.numels = &numel;
  reduce.n_tensors = 1;
  reduce.num_threads = threads;
  const double sum = active_kernels().sum_squares(reduce);
  std::fwrite(&sum, sizeof sum, 1, stdout);
  CopyCall copy;
  copy.dsts = &dst;
  copy.srcs = &ptr;
  copy.nbytes = &nbytes;
  copy.n_tensors = 1;
  copy.num_threads = threads;
  active_kernels().copy(copy);
  dump(y);
  std::fprintf(stderr, "isa: %s\n", active_kernels().isa);
  return 0;
}
