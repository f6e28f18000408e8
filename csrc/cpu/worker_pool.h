// The CPU kernels' threads: a small persistent pool in which the calling thread works too and
// never waits for a worker that has not shown up. An OpenMP parallel region ends in a join
// barrier, so on a shared machine a step waited a scheduler tick (~4-8 ms) whenever one of its
// threads had been descheduled, even when the others had done all the work.
#pragma once
#include <cstdint>

namespace fusedopt::cpu {

// Runs one chunk of a job. Must not throw: chunks run on the pool's threads, and an exception
// never crosses threads (one that escapes ends the process).
using ChunkFn = void (*)(void* context, int64_t chunk) noexcept;

// Runs fn(context, c) once for every c in [0, n_chunks), on the calling thread and at most
// num_threads - 1 pool workers, in any order, and returns once every chunk has run. Chunks are
// claimed one at a time from a shared counter: the caller claims too, so a job never waits for
// a worker that has claimed nothing, only for chunks already running. Workers are started on
// first use (and again in a forked child); idle ones spin briefly, then sleep. Two jobs from
// different threads at once: the later runs all its chunks on its own thread.
void run_chunks(int64_t n_chunks, int num_threads, ChunkFn fn, void* context);

// Workers this process has started so far (a forked child starts again from 0).
int pool_workers();

// Whether the kernels run their chunks on this pool (true) or on torch's OpenMP team (false,
// the default; multi_tensor_cpu.h). The pool never waits for a descheduled thread, which pays
// on a machine shared with other processes; but right after torch's own parallel work (the
// backward pass) torch's OpenMP threads still spin for a while, and a pool thread then
// competes with them for the cores (measured ~5% slower steps on 2 vCPUs with torch's default
// OMP_WAIT_POLICY), while the OpenMP team is those very threads. FUSEDOPT_CPU_POOL=1 in the
// environment, or set_use_pool(true), turns the pool on.
bool use_pool();
void set_use_pool(bool on);

}  // namespace fusedopt::cpu
