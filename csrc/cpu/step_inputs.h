// One-step inputs read from elsewhere (tensor_table.h: kColParamFrom .. kColGradMixWeight)
// and outputs saved elsewhere (kColExtraTo .. kColState2To), applied to one piece of a tensor
// right before the step runs over it. The piece (at most one
// chunk, 32K elements) is then in cache when the step reads it, so a restore costs the step
// one more read stream instead of a separate copy pass over memory, and SAM's grad mix never
// goes to memory at all.
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

template <typename P, typename S, Precision PREC>
struct StepInputs {
  // The param, extra and (unless the states are 8-bit codes) state buffers of [begin, end)
  // taken from their *From columns.
  static void restore(const int64_t* row, int64_t begin, int64_t end) {
    if constexpr (PREC != Precision::kMaster) copy_from_column(row, kColParamFrom, kColParam, sizeof(P), begin, end);
    if constexpr (kHasExtra<PREC>)
      copy_from_column(row, kColExtraFrom, kColExtra, sizeof(ExtraOf<P, PREC>), begin, end);
    if constexpr (!std::is_same_v<S, q8_t>) {
      for (int k = 0; k < 3; ++k) copy_from_column(row, kColState0From + k, kColState0 + k, sizeof(S), begin, end);
    }
  }

  // The extra and (unless 8-bit codes) state buffers of [begin, end) saved into their *To
  // columns, after restore(): streaming stores (nothing reads the saved copy during the step),
  // whose loads bring the piece into cache for the update. Returns whether it stored anything
  // (the caller fences the streaming stores once its chunk is done: stream_copy.h).
  static bool save(const int64_t* row, int64_t begin, int64_t end) {
    bool saved = false;
    if constexpr (kHasExtra<PREC>) saved |= save_column(row, kColExtra, kColExtraTo, sizeof(ExtraOf<P, PREC>), begin, end);
    if constexpr (!std::is_same_v<S, q8_t>) {
      for (int k = 0; k < 3; ++k) saved |= save_column(row, kColState0 + k, kColState0To + k, sizeof(S), begin, end);
    }
    return saved;
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
