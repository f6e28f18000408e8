// One-step inputs read from elsewhere (tensor_table.h: kColParamFrom .. kColGradMixWeight)
// and outputs saved elsewhere (kColExtraTo .. kColState2To), applied to each sub-piece of a
// tensor (kInputSubPiece elements) right before the step runs over it, while it is in L1: a
// restore or a save costs the step one more stream instead of a separate copy pass over
// memory, and SAM's grad mix never goes to memory at all. (8-bit buckets restore whole pieces,
// at most one chunk: restore() below.)
#pragma once
#include <cstring>
#include <vector>

#include "../fusedopt/element.h"
#include "multi_tensor_cpu.h"
#include "stream_copy.h"

// (In the build's own namespace: see multi_tensor_cpu.h.)
namespace fusedopt::cpu::FUSEDOPT_ISA {

// Whether any row of the table has a one-step input (the loops skip all of this otherwise).
inline bool has_step_inputs(const int64_t* table, int64_t n_tensors) {
  for (int64_t t = 0; t < n_tensors; ++t)
    for (int c = kColParamFrom; c < kNumTableColumns; ++c)
      if (table[t * kNumTableColumns + c] != 0) return true;
  return false;
}

// Copies elements [begin, end) of the column's buffer into the live buffer of `to`.
inline void copy_from_column(const int64_t* row, int from, int to, size_t element_bytes, int64_t begin, int64_t end) {
  if (row[from] == 0 || row[to] == 0) return;
  const size_t offset = size_t(begin) * element_bytes;
  std::memcpy(reinterpret_cast<char*>(row[to]) + offset, reinterpret_cast<const char*>(row[from]) + offset,
              size_t(end - begin) * element_bytes);
}

// Streams elements [begin, end) of the live buffer `from` into the column `to`'s buffer.
inline bool save_column(const int64_t* row, int from, int to, size_t element_bytes, int64_t begin, int64_t end) {
  if (row[from] == 0 || row[to] == 0) return false;
  const size_t offset = size_t(begin) * element_bytes;
  stream_copy(reinterpret_cast<char*>(row[to]) + offset, reinterpret_cast<const char*>(row[from]) + offset,
              int64_t(end - begin) * int64_t(element_bytes));
  return true;
}

// One buffer of a sub-piece (at most kInputSubPiece elements) as the step sees it. Restored
// from a *From column, the step updates it in an L1 scratch holding the restored values, and
// finish() streams the result to the live buffer: the cache never reads the live buffer's
// stale contents before overwriting them (a restore then costs the step one read stream,
// nothing more). Otherwise the step updates the live buffer in place.
template <typename T>
struct StagedBuffer {
  T* live = nullptr;
  T* at = nullptr;  // where the step reads and writes
  int64_t n = 0;

  void stage(const int64_t* row, int live_column, int from_column, int64_t begin, int64_t end, T* scratch) {
    live = row[live_column] != 0 ? reinterpret_cast<T*>(row[live_column]) + begin : nullptr;
    at = live;
    n = end - begin;
    if (live == nullptr || from_column < 0 || row[from_column] == 0) return;
    std::memcpy(scratch, reinterpret_cast<const T*>(row[from_column]) + begin, size_t(n) * sizeof(T));
    at = scratch;
  }
  // Streams the sub-piece's values from before the step (the restored ones, if restored) into
  // the *To column's buffer. Returns whether it stored anything.
  bool save(const int64_t* row, int to_column, int64_t begin) const {
    if (at == nullptr || row[to_column] == 0) return false;
    stream_copy(reinterpret_cast<char*>(reinterpret_cast<T*>(row[to_column]) + begin),
                reinterpret_cast<const char*>(at), n * int64_t(sizeof(T)));
    return true;
  }
  bool finish() const {
    if (at == live) return false;
    stream_copy(reinterpret_cast<char*>(live), reinterpret_cast<const char*>(at), n * int64_t(sizeof(T)));
    return true;
  }
};

template <typename P, typename S, Precision PREC>
struct StepInputs {
  using Extra = std::conditional_t<kHasExtra<PREC>, ExtraOf<P, PREC>, P>;
  static constexpr size_t kScratchBytes = sizeof(double) * kInputSubPiece * 5;

  // The buffers of one sub-piece [begin, end) for the step (restored ones in the calling
  // thread's scratch, saves done): param / extra / state[k] `.at` are what to hand the element
  // loop, finish() then streams the restored ones back. Under master weights the param is
  // never read (the master is), so kColParamFrom is ignored there; 8-bit states go through
  // restore() instead.
  struct Staged {
    StagedBuffer<P> param;
    StagedBuffer<Extra> extra;
    StagedBuffer<S> state[3];
    bool streamed = false;  // streaming stores were issued (the chunk must fence them)

    Staged(const int64_t* row, int64_t begin, int64_t end) {
      static_assert(!std::is_same_v<S, q8_t>, "8-bit states go through restore()");
      thread_local std::vector<unsigned char> scratch = std::vector<unsigned char>(kScratchBytes);
      unsigned char* next = scratch.data();
      const auto slot = [&](size_t element_bytes) {
        unsigned char* at = next;
        next += element_bytes * kInputSubPiece;
        return at;
      };
      param.stage(row, kColParam, PREC == Precision::kMaster ? -1 : kColParamFrom, begin, end,
                  reinterpret_cast<P*>(slot(sizeof(P))));
      if constexpr (kHasExtra<PREC>) {
        extra.stage(row, kColExtra, kColExtraFrom, begin, end, reinterpret_cast<Extra*>(slot(sizeof(Extra))));
        streamed |= extra.save(row, kColExtraTo, begin);
      }
      for (int k = 0; k < 3; ++k) {
        state[k].stage(row, kColState0 + k, kColState0From + k, begin, end, reinterpret_cast<S*>(slot(sizeof(S))));
        streamed |= state[k].save(row, kColState0To + k, begin);
      }
    }
    void* extra_at() const { return kHasExtra<PREC> ? static_cast<void*>(extra.at) : nullptr; }
    bool finish() {
      streamed |= param.finish();
      if constexpr (kHasExtra<PREC>) streamed |= extra.finish();
      for (int k = 0; k < 3; ++k) streamed |= state[k].finish();
      return streamed;
    }
  };

  // 8-bit buckets (quantized_loop): the param, extra and full-precision state buffers of
  // [begin, end) taken from their *From columns, and then the extra saved into its *To column
  // (streaming; returns whether anything was streamed).
  static bool restore(const int64_t* row, int64_t begin, int64_t end) {
    if constexpr (PREC != Precision::kMaster) copy_from_column(row, kColParamFrom, kColParam, sizeof(P), begin, end);
    bool streamed = false;
    if constexpr (kHasExtra<PREC>) {
      copy_from_column(row, kColExtraFrom, kColExtra, sizeof(ExtraOf<P, PREC>), begin, end);
      streamed = save_column(row, kColExtra, kColExtraTo, sizeof(ExtraOf<P, PREC>), begin, end);
    }
    return streamed;
  }

  // The grad of [begin, end) the step should read: the live one, or torch.lerp(grad, mix, w)
  // rounded to P (what torch's in-place lerp_ leaves in the grad) in a per-thread scratch.
  static const P* grad(const int64_t* row, int64_t begin, int64_t end) {
    const P* live = reinterpret_cast<const P*>(row[kColGrad]) + begin;
    if (row[kColGradMix] == 0) return live;
    using C = ComputeOf<P>;
    double weight;
    std::memcpy(&weight, &row[kColGradMixWeight], sizeof weight);
    const C w = C(weight);
    const P* __restrict__ mix = reinterpret_cast<const P*>(row[kColGradMix]) + begin;
    thread_local std::vector<P> scratch = std::vector<P>(size_t(kChunkElements));
    P* __restrict__ out = scratch.data();
    const int n = int(end - begin);  // a piece is at most one chunk
    for (int i = 0; i < n; ++i) store_nearest(out + i, torch_lerp<C>(load_float(live[i]), load_float(mix[i]), w));
    return out;
  }
};

}  // namespace fusedopt::cpu::FUSEDOPT_ISA
