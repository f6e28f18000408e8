// The CPU multi-tensor driver: one parallel job per bucket over equal chunks of all its
// tensors' elements, so 2,000 small tensors cost one job instead of 2,000, and one huge
// tensor is still split across all threads.
#pragma once
#include <omp.h>

#include <algorithm>
#include <atomic>
#include <vector>
#include "../fusedopt/common.h"
#include "worker_pool.h"

// In the instruction-set build's own namespace: these inline functions are compiled once per
// build with its flags, and same-named copies would be merged by the linker (one build could
// then run another's code).
namespace fusedopt::cpu::FUSEDOPT_ISA {

// Large enough to amortize the per-chunk dispatch, small enough that a 41M-param bucket
// splits into thousands of chunks for load balance.
constexpr int64_t kChunkElements = 1 << 15;
// One-step inputs are copied and then stepped in sub-pieces this long (4 KiB of fp32 per
// buffer), so the copied values are still in L1 when the update reads them (measured, one
// thread: 1,024 a little faster than 2,048, 8,192 clearly slower).
constexpr int64_t kInputSubPiece = 1024;
// Below this many elements a parallel job costs more than it saves.
constexpr int64_t kParallelThreshold = 1 << 15;

// The tensors of a call laid end to end in one flat element space, cut into chunks of
// kChunkElements. A chunk may span many small tensors or part of a big one, so per-chunk
// overhead does not grow with the tensor count.
class WorkList {
 public:
  template <typename NumelOf>
  WorkList(int64_t n_tensors, NumelOf numel_of) : offsets_(size_t(n_tensors) + 1, 0) {
    for (int64_t t = 0; t < n_tensors; ++t) offsets_[t + 1] = offsets_[t] + numel_of(t);
  }
  int64_t total() const { return offsets_.back(); }
  int64_t chunks() const { return (total() + kChunkElements - 1) / kChunkElements; }

  // Calls fn(tensor, begin, end) for each piece of chunk c, in tensor order.
  template <typename Fn>
  void for_each_piece(int64_t c, Fn&& fn) const {
    int64_t lo = c * kChunkElements;
    int64_t hi = lo + kChunkElements < total() ? lo + kChunkElements : total();
    int64_t t = int64_t(std::upper_bound(offsets_.begin(), offsets_.end(), lo) - offsets_.begin()) - 1;
    while (lo < hi) {
      int64_t begin = lo - offsets_[t];
      int64_t end = (hi < offsets_[t + 1] ? hi : offsets_[t + 1]) - offsets_[t];
      if (end > begin) fn(t, begin, end);
      lo = offsets_[t] + end;
      ++t;
    }
  }

 private:
  std::vector<int64_t> offsets_;
};

// Runs fn(chunk) over every chunk of the list on up to num_threads threads (worker_pool.h: the
// caller works too and never waits for a thread that has not claimed a chunk). Results never
// depend on the schedule: the work is elementwise, and reductions write one slot per chunk.
// fn must not throw (it runs on the pool's threads).
template <typename Fn>
void parallel_for_chunks(const WorkList& work, int num_threads, Fn fn) {
  const int64_t n = work.chunks();
  if (num_threads <= 1 || work.total() < kParallelThreshold || n <= 1) {
    for (int64_t c = 0; c < n; ++c) fn(c);
    return;
  }
  if (use_pool()) {
    run_chunks(n, num_threads, [](void* f, int64_t c) noexcept { (*static_cast<Fn*>(f))(c); }, &fn);
    return;
  }
  // torch's OpenMP team (the default: worker_pool.h, use_pool). Thread t owns the t-th of
  // num_threads contiguous ranges of chunks and claims them front to back, then claims what
  // is left of the others' ranges: a thread the OS delays does not hold up chunks another
  // thread can take (the region's end still waits for it), and with no delays each thread
  // streams one contiguous part of the buffers. (Chunks dealt one at a time in turn, as
  // schedule(dynamic, 1) does: the 8-bit step ~3% and the fp32 AdamW step ~1.5% slower on this
  // project's 2-vCPU Xeon, GPT-2 41.7M, interleaved runs.)
  struct alignas(64) Range {
    std::atomic<int64_t> next;
    int64_t end;
  };
  std::vector<Range> ranges(static_cast<size_t>(num_threads));
  for (int r = 0; r < num_threads; ++r) {
    ranges[size_t(r)].next.store(n * r / num_threads, std::memory_order_relaxed);
    ranges[size_t(r)].end = n * (r + 1) / num_threads;
  }
#pragma omp parallel num_threads(num_threads)
  {
    const int t = omp_get_thread_num();
    for (int k = 0; k < num_threads; ++k) {
      Range& r = ranges[size_t((t + k) % num_threads)];
      for (int64_t c = r.next.fetch_add(1, std::memory_order_relaxed); c < r.end;
           c = r.next.fetch_add(1, std::memory_order_relaxed))
        fn(c);
    }
  }
}

}  // namespace fusedopt::cpu::FUSEDOPT_ISA
