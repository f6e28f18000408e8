// Microbenchmark of the 8-bit AdamW block step (quantized.h: quantized_block) of the AVX-512
// build (or, built with ISA=avx2, the AVX2 build's: no fused loop or streaming mode there),
// single-threaded on in-cache data, per phase: TSC cycles per element. Not part of the library
// build; compile by hand (see bench/q8_block_bench.sh):
//   g++ -O3 -fopenmp -fno-math-errno -fno-trapping-math -ffp-contract=off -mavx512f -mavx512bw
//       -mavx512vl -mavx512dq -mavx2 -mfma -mf16c -mprefer-vector-width=512 -DFUSEDOPT_ISA=avx512
//       -Icsrc bench/q8_block_bench.cpp -o /tmp/q8_block_bench
// Its input: the kernels' maps buffer as raw float32 (fusedopt._quantization.maps), argv[1].
#include <x86intrin.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <cstring>
#include <vector>

#include "cpu/quantized_simd.h"
#include "fusedopt/adam.h"

using namespace fusedopt;
using namespace fusedopt::cpu::FUSEDOPT_ISA;

namespace {

constexpr int kBlocks = 64;  // 16K elements: ~160 KB of param, grad, codes (L2)
constexpr int kN = kBlocks * kQuantBlock;

struct Data {
  std::vector<float> param, grad, absmax0, absmax1;
  std::vector<uint8_t> c0, c1;
};

template <typename F>
double cycles_per_element(F f, int reps = 200) {
  std::vector<double> samples;
  for (int r = 0; r < 9; ++r) {
    const uint64_t t0 = __rdtsc();
    for (int i = 0; i < reps; ++i) f();
    const uint64_t t1 = __rdtsc();
    samples.push_back(double(t1 - t0) / (double(reps) * kN));
  }
  std::sort(samples.begin(), samples.end());
  return samples[samples.size() / 2];
}

}  // namespace

int main(int argc, char** argv) {
  std::vector<float> maps(kQuantMapsFloats);
  FILE* f = std::fopen(argc > 1 ? argv[1] : "/tmp/q8bench/maps.bin", "rb");
  if (!f || std::fread(maps.data(), 4, maps.size(), f) != maps.size()) {
    std::fprintf(stderr, "maps?\n");
    return 1;
  }
  std::fclose(f);
#if defined(FUSEDOPT_QUANT_AVX512)
  g_byte_permutes = argc > 2 ? std::atoi(argv[2]) != 0 : true;
#endif
  const auto codec = quant_codec(maps.data());

  std::mt19937 rng(1);
  std::normal_distribution<float> nd;
  Data d;
  d.param.resize(kN);
  d.grad.resize(kN);
  d.c0.resize(kN);
  d.c1.resize(kN);
  d.absmax0.resize(kBlocks);
  d.absmax1.resize(kBlocks);
  std::vector<float> m(kN), v(kN);
  for (int i = 0; i < kN; ++i) {
    d.param[i] = 0.02f * nd(rng);
    d.grad[i] = 1e-3f * nd(rng);
    m[i] = 1e-4f * nd(rng);
    float s = 0;
    for (int k = 0; k < 4; ++k) {
      float g = 1e-3f * nd(rng);
      s += g * g;
    }
    v[i] = s / 4;
  }
  RoundingKeys keys{};
  for (int b = 0; b < kBlocks; ++b) {
    float* mb = m.data() + b * kQuantBlock;
    float* vb = v.data() + b * kQuantBlock;
    float am = 0, av = 0;
    for (int i = 0; i < kQuantBlock; ++i) am = std::max(am, std::fabs(mb[i])), av = std::max(av, vb[i]);
    d.absmax0[b] = am;
    d.absmax1[b] = av;
    codec.quantize<Precision::kPlain>(maps.data(), 0, mb, 1.0f / am, d.c0.data() + b * kQuantBlock, kQuantBlock, keys);
    codec.quantize<Precision::kPlain>(maps.data(), 1, vb, 1.0f / av, d.c1.data() + b * kQuantBlock, kQuantBlock, keys);
  }
  const double group[16] = {1e-3, 0.9, 0.999, 1e-8, 0.01, 1, 0};
  const auto scalars = Adam::scalars<float>(group, 1e-3, 10.0, 1.0f);

  {  // the codec's codes against TableCodec's (the scalar reference): random magnitudes, every
     // midpoint and its neighbouring floats, zeros, tiny values
    std::vector<float> xs;
    std::uniform_real_distribution<float> ud(-1.0f, 1.0f), ed(-30.0f, 0.5f);
    for (int i = 0; i < 1 << 20; ++i) xs.push_back(ud(rng) * std::exp2(ed(rng)));
    for (int k = 0; k < 2; ++k) {
      const float* qm = quant_map(maps.data(), k);
      for (int c = 0; c + 1 < kQuantMapSize; ++c) {
        float mid = float((double(qm[c]) + double(qm[c + 1])) / 2.0);
        for (int u = -3; u <= 3; ++u) {
          uint32_t b;
          std::memcpy(&b, &mid, 4);
          b += u;
          float y;
          std::memcpy(&y, &b, 4);
          xs.push_back(y);
          xs.push_back(-y);
        }
      }
    }
    for (float z : {0.0f, -0.0f, 1e-30f, -1e-30f, 1e-40f, 1.0f, -1.0f, 1.0000001f, 2.0f, 300.0f, -300.0f})
      xs.push_back(z);
    while (xs.size() % kQuantBlock) xs.push_back(0.5f);
    long bad = 0;
    std::vector<uint8_t> a(kQuantBlock), b(kQuantBlock);
    for (int k = 0; k < 2; ++k)
      for (size_t o = 0; o < xs.size(); o += kQuantBlock)
        for (int n : {kQuantBlock, 200, 77}) {
          codec.quantize<Precision::kPlain>(maps.data(), k, xs.data() + o, 1.0f, a.data(), n, keys);
          TableCodec{}.quantize<Precision::kPlain>(maps.data(), k, xs.data() + o, 1.0f, b.data(), n, keys);
          for (int i = 0; i < n; ++i) bad += a[i] != b[i];
        }
    std::printf("codec check: %ld mismatches of %zu values x 2 maps x 3 lengths\n", bad, xs.size());
  }
  alignas(64) static float s0[kN], s1[kN];
  const float* mp = maps.data();
  std::printf("TSC cycles/element (%.1f GHz TSC), single thread, %d blocks in cache\n", 2.6, kBlocks);
  const double dm = cycles_per_element([&] {
    for (int b = 0; b < kBlocks; ++b)
      codec.dequantize(mp, 0, d.c0.data() + b * kQuantBlock, d.absmax0[b], s0 + b * kQuantBlock, kQuantBlock);
  });
  const double dv = cycles_per_element([&] {
    for (int b = 0; b < kBlocks; ++b)
      codec.dequantize(mp, 1, d.c1.data() + b * kQuantBlock, d.absmax1[b], s1 + b * kQuantBlock, kQuantBlock);
  });
  std::vector<float> p2 = d.param;
  const double up = cycles_per_element([&] {
    float* param = p2.data();
    const float* grad = d.grad.data();
#pragma omp simd
    for (int i = 0; i < kN; ++i)
      step_element<Adam, float, float, Precision::kPlain, false, false>(param, grad, s0, s1, nullptr, nullptr, i,
                                                                         scalars, keys, NoStats{});
  });
  // restore realistic states after the repeated updates
  for (int b = 0; b < kBlocks; ++b) {
    codec.dequantize(mp, 0, d.c0.data() + b * kQuantBlock, d.absmax0[b], s0 + b * kQuantBlock, kQuantBlock);
    codec.dequantize(mp, 1, d.c1.data() + b * kQuantBlock, d.absmax1[b], s1 + b * kQuantBlock, kQuantBlock);
  }
  volatile float sink = 0;
  const double am = cycles_per_element([&] {
    float acc = 0;
    for (int k = 0; k < 2; ++k)
      for (int b = 0; b < kBlocks; ++b) {
        const float* vv = (k ? s1 : s0) + b * kQuantBlock;
        float mm = 0.0f;
#pragma omp simd reduction(max : mm)
        for (int i = 0; i < kQuantBlock; ++i) mm = mm > std::fabs(vv[i]) ? mm : std::fabs(vv[i]);
        acc += mm;
      }
    sink = acc;
  });
  std::vector<uint8_t> out(kN);
  const double qm = cycles_per_element([&] {
    for (int b = 0; b < kBlocks; ++b)
      codec.quantize<Precision::kPlain>(mp, 0, s0 + b * kQuantBlock, 1.0f / d.absmax0[b], out.data() + b * kQuantBlock,
                                        kQuantBlock, keys);
  });
  const double qv = cycles_per_element([&] {
    for (int b = 0; b < kBlocks; ++b)
      codec.quantize<Precision::kPlain>(mp, 1, s1 + b * kQuantBlock, 1.0f / d.absmax1[b], out.data() + b * kQuantBlock,
                                        kQuantBlock, keys);
  });
  // The whole block step, as quantized_loop runs it (codes and absmax updated in place).
  Data w = d;
  const auto runner = [](int n, auto body) {
#pragma omp simd
    for (int i = 0; i < n; ++i) body(i, NoStats{});
  };
  const double whole = cycles_per_element([&] {
    for (int b = 0; b < kBlocks; ++b) {
      q8_t* const codes[3] = {reinterpret_cast<q8_t*>(w.c0.data() + b * kQuantBlock),
                              reinterpret_cast<q8_t*>(w.c1.data() + b * kQuantBlock), nullptr};
      float* const absmax[3] = {&w.absmax0[b], &w.absmax1[b], nullptr};
      quantized_block<Adam, float, Precision::kPlain, false, false>(
          w.param.data() + b * kQuantBlock, w.grad.data() + b * kQuantBlock, codes, absmax, nullptr, kQuantBlock, mp,
          scalars, keys, runner, codec);
    }
  }, 50);
#if defined(FUSEDOPT_QUANT_AVX512)  // the streaming and fused-loop parts: adam_blocks
  if (argc > 3) {  // streaming, 41.7M elements: argv[3..] = "f" (adam_blocks, its own page kicks) or a prefetch
                   // distance in blocks for quantized_block (0: none), interleaved
    const int64_t big = 41.7e6 / kQuantBlock * kQuantBlock;
    const int64_t nb = big / kQuantBlock;
    std::vector<float> P(big), G(big), A0(nb), A1(nb);
    std::vector<uint8_t> C0(big), C1(big);
    for (int64_t i = 0; i < big; ++i) P[i] = d.param[i % kN], G[i] = d.grad[i % kN], C0[i] = d.c0[i % kN], C1[i] = d.c1[i % kN];
    for (int64_t b = 0; b < nb; ++b) A0[b] = d.absmax0[b % kBlocks], A1[b] = d.absmax1[b % kBlocks];
    for (int rep = 0; rep < 5 * (argc - 3); ++rep) {
      const char* arg = argv[3 + rep % (argc - 3)];
      const bool fused_loop = arg[0] == 'f';
      const int dist = std::atoi(arg + fused_loop);
      const uint64_t t0 = __rdtsc();
      if (fused_loop) {
        constexpr int64_t kPiece = 64 * 1024;  // kChunkElements-like pieces
        for (int64_t e0 = 0; e0 < big; e0 += kPiece) {
          const int64_t e1 = std::min(big, e0 + kPiece), blocks = (e1 - e0) / kQuantBlock;
          codec.adam_blocks(P.data() + e0, G.data() + e0, C0.data() + e0, C1.data() + e0, A0.data() + e0 / kQuantBlock,
                            A1.data() + e0 / kQuantBlock, blocks, mp, scalars);
        }
      }
      for (int64_t b = 0; b < nb && !fused_loop; ++b) {
        const int64_t e = b * kQuantBlock;
        if (dist > 0 && b + dist < nb) {
          const int64_t f = e + int64_t(dist) * kQuantBlock;
          for (int l = 0; l < kQuantBlock; l += 16) {
            __builtin_prefetch(P.data() + f + l, 1);
            __builtin_prefetch(G.data() + f + l, 0);
          }
          for (int l = 0; l < kQuantBlock; l += 64) {
            __builtin_prefetch(C0.data() + f + l, 1);
            __builtin_prefetch(C1.data() + f + l, 1);
          }
        }
        q8_t* const codes[3] = {reinterpret_cast<q8_t*>(C0.data() + e), reinterpret_cast<q8_t*>(C1.data() + e), nullptr};
        float* const absmax[3] = {&A0[b], &A1[b], nullptr};
        quantized_block<Adam, float, Precision::kPlain, false, false>(P.data() + e, G.data() + e, codes, absmax,
                                                                      nullptr, kQuantBlock, mp, scalars, keys, runner, codec);
      }
      const uint64_t t1 = __rdtsc();
      std::printf("stream %s: %.2f cycles/element, %.1f ms\n", arg, double(t1 - t0) / big, (t1 - t0) / 2.6e6);
    }
  }
  // The fused loop (RegisterCodec::adam_blocks): bit-identical to quantized_block, and its time.
  double fused = 0;
  for (int variant = 0; variant < 4; ++variant) {
    const int coupled = variant & 1;
    const float unscale = variant & 2 ? 0.37f : 1.0f;  // grads as they are, or scaled (grad_factor != 1)
    Data x = d;
    // block 3: zero states (absmax 0) and -0 grads; block 5: zero grads
    for (int i = 0; i < kQuantBlock; ++i) {
      x.grad[3 * kQuantBlock + i] = -0.0f;
      x.grad[5 * kQuantBlock + i] = 0.0f;
    }
    x.absmax0[3] = x.absmax1[3] = 0.0f;
    Data y = x;
    const double group2[16] = {1e-3, 0.9, 0.999, 1e-8, 0.01, double(coupled ? 0 : 1), 0};
    const auto sc = Adam::scalars<float>(group2, 1e-3, 10.0, unscale);
    for (int step = 0; step < 5; ++step) {
      for (int b = 0; b < kBlocks; ++b) {
        q8_t* const codes[3] = {reinterpret_cast<q8_t*>(x.c0.data() + b * kQuantBlock),
                                reinterpret_cast<q8_t*>(x.c1.data() + b * kQuantBlock), nullptr};
        float* const absmax[3] = {&x.absmax0[b], &x.absmax1[b], nullptr};
        quantized_block<Adam, float, Precision::kPlain, false, false>(
            x.param.data() + b * kQuantBlock, x.grad.data() + b * kQuantBlock, codes, absmax, nullptr, kQuantBlock, mp,
            sc, keys, runner, codec);
      }
      codec.adam_blocks(y.param.data(), y.grad.data(), y.c0.data(), y.c1.data(), y.absmax0.data(), y.absmax1.data(),
                        kBlocks, mp, sc);
    }
    const bool same = std::memcmp(x.param.data(), y.param.data(), kN * 4) == 0 && x.c0 == y.c0 && x.c1 == y.c1 &&
                      std::memcmp(x.absmax0.data(), y.absmax0.data(), kBlocks * 4) == 0 &&
                      std::memcmp(x.absmax1.data(), y.absmax1.data(), kBlocks * 4) == 0;
    std::printf("fused vs quantized_block after 5 steps (%s weight decay, grad factor %g): %s\n",
                coupled ? "coupled" : "decoupled", double(sc.grad_factor), same ? "bit-identical" : "DIFFERENT");
    fused = cycles_per_element([&] {
      codec.adam_blocks(y.param.data(), y.grad.data(), y.c0.data(), y.c1.data(), y.absmax0.data(), y.absmax1.data(),
                        kBlocks, mp, scalars);
    }, 50);
  }
  std::printf("fused block loop %.2f\n", fused);
#endif
  std::printf("dequant m %.2f  dequant v %.2f  update %.2f  absmax(m+v) %.2f  quant m %.2f  quant v %.2f  "
              "sum %.2f  whole block %.2f\n",
              dm, dv, up, am, qm, qv, dm + dv + up + am + qm + qv, whole);
  return 0;
}
