// The CPU multi-tensor driver: flattens (tensor, fixed-size chunk) pairs of a whole bucket
// into one work list and runs it in parallel, so 2,000 small tensors cost one parallel
// region instead of 2,000, and one huge tensor is still split across all threads.
#pragma once
#include <omp.h>
#include <vector>
#include "../fusedopt/common.h"

namespace fusedopt::cpu {

// Large enough to amortize the per-chunk dispatch, small enough that a 41M-param bucket
// splits into thousands of chunks for load balance.
constexpr int64_t kChunkElements = 1 << 15;
// Below this many elements a parallel region costs more than it saves.
constexpr int64_t kParallelThreshold = 1 << 15;

struct Chunk {
  int64_t tensor;
  int64_t begin;
  int64_t end;
};

template <typename NumelOf>
std::vector<Chunk> make_chunks(int64_t n_tensors, NumelOf numel_of, int64_t* total_out) {
  std::vector<Chunk> chunks;
  int64_t total = 0;
  for (int64_t t = 0; t < n_tensors; ++t) {
    int64_t n = numel_of(t);
    total += n;
    for (int64_t b = 0; b < n; b += kChunkElements) chunks.push_back({t, b, b + kChunkElements < n ? b + kChunkElements : n});
  }
  *total_out = total;
  return chunks;
}

// Runs fn(chunk) over every chunk. Elementwise work only, so the result does not depend on
// the schedule or the thread count.
template <typename Fn>
void for_each_chunk(const std::vector<Chunk>& chunks, int64_t total, int num_threads, Fn fn) {
  int64_t n = int64_t(chunks.size());
  bool parallel = num_threads > 1 && total >= kParallelThreshold && n > 1;
#pragma omp parallel for schedule(static) num_threads(num_threads) if (parallel)
  for (int64_t c = 0; c < n; ++c) fn(chunks[c]);
}

}  // namespace fusedopt::cpu
