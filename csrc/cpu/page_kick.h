// Starting the hardware prefetcher on the next 4 KiB page before a stream gets there.
//
// The L2 streamer of x86 cores follows a stream only inside a 4 KiB page: at every new page
// it starts over, and the page's first lines reach the core as demand misses with the full
// memory latency. A loop that streams few bytes per cycle of vector work cannot look far
// enough ahead out of order to overlap them (a 512-entry reorder buffer holds ~150 cycles of
// such a loop; memory is ~300 cycles away), so it stalls at every page of every stream. A
// prefetch of the first lines of the next page, issued half a page earlier, restarts the
// streamer there in time. Prefetching whole blocks instead does not help (the L1 has 16 fill
// buffers: software prefetch alone cannot carry a stream).
//
// Measured on the 8-bit AdamW step (quantized_simd.h: adam_blocks; bench/q8_block_bench.sh's
// streaming mode is the same loop), 41.7M elements, one thread, this project's 2-vCPU Xeon:
// 3.3-3.5 TSC cycles/element without kicks, 2.7-2.9 with (2.6-2.8 with everything in L2);
// kicking 1 KiB, 2 KiB or 3 KiB ahead all help, a page or more ahead less (the kick's own page
// walk then stalls the loop); without the codes' kicks the gain is gone. The gain depends on
// how the compiler schedules the loop around the kicks: the same kicks issued from a callback,
// or (with the loop of commit 9e75e13) the loop compiled without its grad multiply, ran 3.8-4.0
// cycles/element with the first kick stalling (perf annotate), and the kicks spread one per 64
// elements instead of four at the block's start ran 3.13 against 2.96 after the search's
// changes; after changing that loop, check the streaming mode of bench/q8_block_bench.sh ("f").
// Once its vector work had shrunk, adam_blocks also prefetches the next block's param and grad
// lines into L1 (without the kicks that prefetch gains less: 2.50 against 2.33 with both).
#pragma once
#include <cstdint>

namespace fusedopt::cpu {

constexpr uintptr_t kPageBytes = 4096;
constexpr uintptr_t kKickAheadBytes = 2048;  // half a page ahead
constexpr int kKickLines = 4;

// For a stream read in order: call once per span of `span_bytes` (at most a page) starting at
// `at`. When a page starts within the span kKickAheadBytes further on, prefetch (to L2) its
// first kKickLines lines; once per page as the spans go by. A prefetch never faults, so kicks
// past the end of a buffer are harmless.
inline void kick_next_page(const void* at, uintptr_t span_bytes) {
  const uintptr_t ahead = reinterpret_cast<uintptr_t>(at) + kKickAheadBytes;
  const uintptr_t into_page = ahead & (kPageBytes - 1);
  if (into_page < span_bytes) {
    const char* page = reinterpret_cast<const char*>(ahead - into_page);
    for (int l = 0; l < kKickLines; ++l) __builtin_prefetch(page + 64 * l, 0, 2);  // prefetcht1 on x86
  }
}

}  // namespace fusedopt::cpu
