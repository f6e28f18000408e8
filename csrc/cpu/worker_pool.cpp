// The worker pool of worker_pool.h. Compiled once (not per instruction set): one pool serves
// every ISA build of the kernels.
//
// A job is published in the word `claim_`: its generation in the high 32 bits, the next
// unclaimed chunk in the low 32. A worker claims a chunk with a compare-exchange that also
// checks the generation, so a worker that read a job's description late (after the job
// finished, or while the next one was being written) claims nothing and never calls into a
// job whose caller has returned: a job cannot finish while a chunk of it is claimed and not
// yet run.
#include "worker_pool.h"

#include <pthread.h>

#include <atomic>
#include <cstdlib>
#include <cstring>
#include <condition_variable>
#include <mutex>
#include <thread>
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

namespace fusedopt::cpu {
namespace {

constexpr int kIndexBits = 32;
constexpr uint64_t kIndexMask = (uint64_t(1) << kIndexBits) - 1;
constexpr int kMaxWorkers = 255;
// How long an idle worker polls for the next job before it sleeps, and how long the caller
// polls for chunks still running on workers before it sleeps, in pause instructions (tens of
// ns each): a few microseconds. Longer polling took the CPU from the very thread it waited
// for whenever both shared one core of a busy machine, and from torch between steps.
constexpr int kIdleSpins = 100;
constexpr int kJoinSpins = 100;

inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
  _mm_pause();
#elif defined(__aarch64__)
  asm volatile("yield");
#endif
}

uint64_t generation_of(uint64_t word) { return word >> kIndexBits; }

class Pool {
 public:
  void run(int64_t n_chunks, int num_threads, ChunkFn fn, void* context) {
    std::unique_lock<std::mutex> job(job_mutex_, std::try_to_lock);
    if (!job.owns_lock() || uint64_t(n_chunks) > kIndexMask - 1) {
      // Another thread's job is in flight (the pool runs one at a time), or too many chunks
      // to count in the claim word: this thread does all the work.
      for (int64_t c = 0; c < n_chunks; ++c) fn(context, c);
      return;
    }
    start_workers(num_threads - 1 < kMaxWorkers ? num_threads - 1 : kMaxWorkers);
    const uint64_t generation = publish(n_chunks, num_threads - 1, fn, context);
    int64_t mine = 0;
    int64_t c;
    while (claim(generation, n_chunks, &c)) {
      fn(context, c);
      ++mine;
    }
    // Every chunk is claimed; wait only for those that workers are running now.
    const int64_t theirs = n_chunks - mine;
    for (int spins = 0; spins < kJoinSpins; ++spins) {
      if (done_.load(std::memory_order_acquire) == theirs) return;
      cpu_relax();
    }
    std::unique_lock<std::mutex> lock(join_mutex_);
    joining_.store(true, std::memory_order_seq_cst);
    while (done_.load(std::memory_order_seq_cst) != theirs) joined_.wait(lock);
    joining_.store(false, std::memory_order_relaxed);
  }

  int workers() {
    std::lock_guard<std::mutex> lock(job_mutex_);
    return workers_;
  }

 private:
  // Writes the job, then opens it. The claim word is first set to the new generation with no
  // chunk left, and the description is written after a release fence: a worker that reads any
  // part of the new description then (after its acquire fence) sees that word, so a worker of
  // the previous generation never claims a chunk with a half-new description.
  uint64_t publish(int64_t n_chunks, int helpers, ChunkFn fn, void* context) {
    uint64_t generation = (generation_of(claim_.load(std::memory_order_relaxed)) + 1) & kIndexMask;
    if (generation == 0) generation = 1;  // (after 2**32 jobs: 0 is what a fresh worker has seen)
    claim_.store(generation << kIndexBits | kIndexMask, std::memory_order_relaxed);
    std::atomic_thread_fence(std::memory_order_release);
    fn_.store(fn, std::memory_order_relaxed);
    context_.store(context, std::memory_order_relaxed);
    n_chunks_.store(n_chunks, std::memory_order_relaxed);
    helpers_.store(helpers, std::memory_order_relaxed);
    done_.store(0, std::memory_order_relaxed);
    claim_.store(generation << kIndexBits, std::memory_order_release);
    published_.store(generation, std::memory_order_seq_cst);
    if (sleepers_.load(std::memory_order_seq_cst) > 0) {
      // A worker counts itself a sleeper and re-reads `published_` under the mutex before it
      // waits, so taking the mutex here means it either saw the new job or is waiting already.
      { std::lock_guard<std::mutex> lock(sleep_mutex_); }
      wake_.notify_all();
    }
    return generation;
  }

  // Claims the next chunk of job `generation`; false when it has none left or is over.
  bool claim(uint64_t generation, int64_t n_chunks, int64_t* chunk) {
    uint64_t word = claim_.load(std::memory_order_relaxed);
    for (;;) {
      if (generation_of(word) != generation || int64_t(word & kIndexMask) >= n_chunks) return false;
      if (claim_.compare_exchange_weak(word, word + 1, std::memory_order_acquire, std::memory_order_relaxed)) {
        *chunk = int64_t(word & kIndexMask);
        return true;
      }
    }
  }

  void start_workers(int wanted) {
    while (workers_ < wanted) {
      try {
        std::thread(&Pool::work, this, workers_).detach();
      } catch (...) {  // (no thread to be had: the caller and the workers so far do the work)
        return;
      }
      ++workers_;
    }
  }

  void work(int index) {
    uint64_t seen = published_.load(std::memory_order_acquire);
    for (;;) {
      const uint64_t generation = wait_for_job(seen);
      seen = generation;
      // The description may already be the next job's: the generation check of claim() and
      // the fence below make such a read claim nothing.
      const int helpers = helpers_.load(std::memory_order_relaxed);
      const ChunkFn fn = fn_.load(std::memory_order_relaxed);
      void* const context = context_.load(std::memory_order_relaxed);
      const int64_t n_chunks = n_chunks_.load(std::memory_order_relaxed);
      std::atomic_thread_fence(std::memory_order_acquire);
      if (index >= helpers) continue;
      int64_t c;
      while (claim(generation, n_chunks, &c)) {
        fn(context, c);
        done_.fetch_add(1, std::memory_order_seq_cst);
        if (joining_.load(std::memory_order_seq_cst)) {
          // The caller sleeps until the chunks it waits for are done (it checks `done_` under
          // the mutex after raising the flag, so this wakes it or it saw the count).
          { std::lock_guard<std::mutex> lock(join_mutex_); }
          joined_.notify_one();
        }
      }
    }
  }

  uint64_t wait_for_job(uint64_t seen) {
    for (int spins = 0; spins < kIdleSpins; ++spins) {
      const uint64_t g = published_.load(std::memory_order_acquire);
      if (g != seen) return g;
      cpu_relax();
    }
    std::unique_lock<std::mutex> lock(sleep_mutex_);
    sleepers_.fetch_add(1, std::memory_order_seq_cst);
    uint64_t g;
    while ((g = published_.load(std::memory_order_seq_cst)) == seen) wake_.wait(lock);
    sleepers_.fetch_sub(1, std::memory_order_relaxed);
    return g;
  }

  // The job. Its fields are atomics because a late worker may read them while the next job
  // writes them (it then claims nothing).
  std::atomic<ChunkFn> fn_{nullptr};
  std::atomic<void*> context_{nullptr};
  std::atomic<int64_t> n_chunks_{0};
  std::atomic<int> helpers_{0};
  alignas(64) std::atomic<uint64_t> claim_{0};
  alignas(64) std::atomic<int64_t> done_{0};      // chunks run by workers in this job
  alignas(64) std::atomic<uint64_t> published_{0};  // generation of the latest job
  std::atomic<int> sleepers_{0};
  std::mutex sleep_mutex_;
  std::condition_variable wake_;
  std::atomic<bool> joining_{false};  // the caller sleeps on `joined_` until `done_` is its count
  std::mutex join_mutex_;
  std::condition_variable joined_;
  std::mutex job_mutex_;  // held by the caller of the job in flight; guards workers_
  int workers_ = 0;
};

// Never freed: its detached workers use it until the process ends. A forked child has none of
// the parent's threads (and maybe a mutex some other thread held at the fork), so it drops
// the parent's pool unused and makes its own on first use.
std::atomic<Pool*> g_pool{nullptr};

void forget_pool_in_child() { g_pool.store(nullptr, std::memory_order_relaxed); }

Pool& pool() {
  Pool* p = g_pool.load(std::memory_order_acquire);
  if (p != nullptr) return *p;
  static const int registered = pthread_atfork(nullptr, nullptr, forget_pool_in_child);
  (void)registered;
  Pool* fresh = new Pool;
  if (g_pool.compare_exchange_strong(p, fresh, std::memory_order_acq_rel)) return *fresh;
  delete fresh;  // (another thread made one first; this one never started a thread)
  return *p;
}

}  // namespace

void run_chunks(int64_t n_chunks, int num_threads, ChunkFn fn, void* context) {
  if (num_threads <= 1 || n_chunks <= 1) {
    for (int64_t c = 0; c < n_chunks; ++c) fn(context, c);
    return;
  }
  pool().run(n_chunks, num_threads, fn, context);
}

namespace {
std::atomic<bool> g_use_pool{[] {
  const char* v = std::getenv("FUSEDOPT_CPU_POOL");
  return v != nullptr && std::strcmp(v, "1") == 0;
}()};
}  // namespace

bool use_pool() { return g_use_pool.load(std::memory_order_relaxed); }
void set_use_pool(bool on) { g_use_pool.store(on, std::memory_order_relaxed); }

int pool_workers() {
  Pool* p = g_pool.load(std::memory_order_acquire);
  return p != nullptr ? p->workers() : 0;
}

}  // namespace fusedopt::cpu
