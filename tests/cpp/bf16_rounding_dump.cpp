// Runs the bf16 rounding functions of csrc/fusedopt/precision.h over the cases given on stdin,
// in loops the compiler vectorizes (the same flags as the CPU kernels, per instruction set),
// and writes what they return to stdout. tests/test_bf16_rounding.py checks the output
// against an independent reference.
//
// stdin:  uint32 n, then n (fp32 bits, random word) pairs.
// stdout: n (nearest bf16 bits, stochastic bf16 bits, fp32 bits of the value the Kahan store
//         reads back) triples of uint32.
#include <cstdio>
#include <vector>
#include "fusedopt/precision.h"

using namespace fusedopt;

// Separate loops, each as wide as the vector unit: the code under test is the vectorized form.
static void round_all(int n, const float* __restrict__ in, const uint32_t* __restrict__ random,
                      bf16_t* __restrict__ nearest, bf16_t* __restrict__ stochastic, bf16_t* __restrict__ kahan,
                      float* __restrict__ written) {
#pragma omp simd
  for (int i = 0; i < n; ++i) store_nearest(nearest + i, in[i]);
#pragma omp simd
  for (int i = 0; i < n; ++i) store_stochastic(stochastic + i, in[i], random[i]);
#pragma omp simd
  for (int i = 0; i < n; ++i) written[i] = store_written(kahan + i, in[i]);
}

int main() {
  uint32_t n = 0;
  if (std::fread(&n, sizeof n, 1, stdin) != 1) return 2;
  std::vector<uint32_t> pairs(size_t(n) * 2);
  if (std::fread(pairs.data(), sizeof(uint32_t), pairs.size(), stdin) != pairs.size()) return 2;
  std::vector<float> in(n);
  std::vector<uint32_t> random(n);
  for (uint32_t i = 0; i < n; ++i) {
    in[i] = bits_float(pairs[2 * i]);
    random[i] = pairs[2 * i + 1];
  }
  std::vector<bf16_t> nearest(n), stochastic(n), kahan(n);
  std::vector<float> written(n);
  round_all(int(n), in.data(), random.data(), nearest.data(), stochastic.data(), kahan.data(), written.data());
  std::vector<uint32_t> out(size_t(n) * 3);
  for (uint32_t i = 0; i < n; ++i) {
    if (kahan[i].bits != nearest[i].bits) return 3;  // the Kahan store must round like store_nearest
    out[3 * i] = nearest[i].bits;
    out[3 * i + 1] = stochastic[i].bits;
    out[3 * i + 2] = float_bits(written[i]);
  }
  return std::fwrite(out.data(), sizeof(uint32_t), out.size(), stdout) == out.size() ? 0 : 2;
}
