// Copies whose destination is not read back soon (a snapshot, a saved w, the live tensors on
// restore): where the ISA has them, streaming (non-temporal) stores, which skip the read the
// cache does before each ordinary store and so save a third of a copy's traffic.
#pragma once
#include <cstdint>
#include <cstring>
#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

// (In the build's own namespace: see multi_tensor_cpu.h.)
namespace fusedopt::cpu::FUSEDOPT_ISA {

// n bytes from src to dst with streaming stores where the ISA has them. The stores are
// weakly ordered: call stream_fence() before the copied bytes may be read by another thread
// (before the chunk that wrote them counts as done).
inline void stream_copy(char* __restrict__ dst, const char* __restrict__ src, int64_t n) {
#if defined(__AVX512F__) || defined(__AVX2__)
#if defined(__AVX512F__)
  constexpr int64_t kLine = 64;
#else
  constexpr int64_t kLine = 32;
#endif
  int64_t head = int64_t((kLine - (reinterpret_cast<uintptr_t>(dst) & (kLine - 1))) & (kLine - 1));
  head = head < n ? head : n;
  std::memcpy(dst, src, size_t(head));
  int64_t i = head;
  for (; i + kLine <= n; i += kLine) {
#if defined(__AVX512F__)
    _mm512_stream_si512(reinterpret_cast<__m512i*>(dst + i), _mm512_loadu_si512(src + i));
#else
    _mm256_stream_si256(reinterpret_cast<__m256i*>(dst + i),
                        _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + i)));
#endif
  }
  std::memcpy(dst + i, src + i, size_t(n - i));
#else
  std::memcpy(dst, src, size_t(n));
#endif
}

inline void stream_fence() {
#if defined(__AVX512F__) || defined(__AVX2__)
  _mm_sfence();
#endif
}

// One piece of a copy, complete when it returns.
inline void copy_piece(char* __restrict__ dst, const char* __restrict__ src, int64_t n) {
  stream_copy(dst, src, n);
  stream_fence();
}

}  // namespace fusedopt::cpu::FUSEDOPT_ISA
