// How the CUDA multi-tensor launcher cuts a list of tensors into launches, and how a block
// finds its chunk: plain C++ with no CUDA header, so the host tests
// (tests/cpp/cuda_logic_test.cpp) run exactly this code.
//
// Per-tensor metadata (any plain struct, `Meta`) and a prefix sum of each tensor's chunk count
// are packed into the kernel's argument struct, so a launch needs no device memory, no copy
// and no host synchronisation, and is capturable in a CUDA graph. When the argument struct is
// full, it is launched and a new one is started.
//
// A launch covers up to TensorList<Meta>::kCapacity tensors and every chunk of each of them
// (a tensor is never split across launches, whatever its size). Chunk c of a launch belongs
// to the last slot whose chunk_start is <= c; `locate_chunk` finds it by binary search over
// the (at most a few dozen) slots, read from the grid-constant argument space.
//
// All element indices and counts are int64, so tensors of more than 2^31 elements work.
#pragma once
#include <cstdint>
#include <stdexcept>

#include "../fusedopt/common.h"

namespace fusedopt::cuda {

// The kernel parameter budget, shared by the tensor list and the functor. CUDA 12.1+ takes up
// to 32,764 bytes on sm_70 and newer (every arch built here) with a driver of 12.1 or later,
// which the module's driver check already requires (the driver must be at least the
// runtime's major version, 13 here): a step launch then holds ~140 tensors instead of ~17.
// Older toolkits, and the host builds of the logic tests (no CUDA header), keep 4 KiB.
#if defined(CUDART_VERSION) && CUDART_VERSION >= 12010
constexpr int kKernelParamBytes = 32764;
#else
constexpr int kKernelParamBytes = 4096;
#endif
constexpr int kFunctorParamReserve = 64;  // bytes kept for the functor
constexpr int64_t kMaxGridX = 2147483647;  // gridDim.x limit

// The argument struct of one launch. Layout: metadata of each slot, then its numel and the
// index of its first chunk in the launch; chunk_start[n_tensors] == n_chunks.
template <typename Meta>
struct TensorList {
  static constexpr int kHeaderBytes = 4 * 8;
  static constexpr int kCapacity =
      (kKernelParamBytes - kFunctorParamReserve - kHeaderBytes - 8) / int(sizeof(Meta) + 2 * sizeof(int64_t));
  static_assert(kCapacity >= 1, "per-tensor metadata too large for one launch");

  Meta meta[kCapacity];
  int64_t numel[kCapacity];
  int64_t chunk_start[kCapacity + 1];
  int64_t chunk_size;    // elements per chunk (the last chunk of a tensor may be shorter)
  int64_t n_chunks;      // chunks in this launch
  int32_t n_tensors;     // slots used
  int32_t launch_index;  // 0 for the first launch of a plan
};

// One chunk: the tensor's slot in the launch and the element range [begin, end) of the
// tensor (indices in the whole tensor).
struct ChunkRef {
  int slot;
  int64_t begin;
  int64_t end;
};

template <typename Meta>
FUSEDOPT_HD ChunkRef locate_chunk(const TensorList<Meta>& list, int64_t chunk) {
  int lo = 0, hi = list.n_tensors - 1;
  while (lo < hi) {  // last slot with chunk_start <= chunk
    int mid = (lo + hi + 1) >> 1;
    if (list.chunk_start[mid] <= chunk) lo = mid;
    else hi = mid - 1;
  }
  ChunkRef ref;
  ref.slot = lo;
  ref.begin = (chunk - list.chunk_start[lo]) * list.chunk_size;
  int64_t end = ref.begin + list.chunk_size;
  ref.end = end < list.numel[lo] ? end : list.numel[lo];
  return ref;
}

// Packs tensors 0..n_tensors-1 into tensor lists and calls `launch(list)` for each, in order.
//   numel_of(t) -> int64_t  element count of tensor t (tensors with <= 0 are skipped)
//   meta_of(t)  -> Meta     its metadata, copied into the list
// A list is handed over when the next tensor would overflow its slots or gridDim.x (one block
// per chunk must stay possible). Returns the number of lists handed over.
template <typename Meta, typename NumelOf, typename MetaOf, typename Launch>
int plan_launches(int64_t n_tensors, int64_t chunk_size, NumelOf numel_of, MetaOf meta_of, Launch launch) {
  using List = TensorList<Meta>;
  if (chunk_size <= 0) throw std::invalid_argument("fusedopt: chunk size must be positive");
  List list{};  // zeroed: unused slots travel as zeros
  list.chunk_size = chunk_size;
  int launches = 0;

  auto flush = [&] {
    if (list.n_tensors == 0) return;
    launch(static_cast<const List&>(list));
    ++launches;
    list.launch_index = launches;
    list.n_tensors = 0;
    list.n_chunks = 0;
  };

  for (int64_t t = 0; t < n_tensors; ++t) {
    const int64_t numel = numel_of(t);
    if (numel <= 0) continue;
    const int64_t chunks = (numel - 1) / chunk_size + 1;
    if (chunks > kMaxGridX) throw std::invalid_argument("fusedopt: tensor too large for one CUDA launch");
    if (list.n_tensors == List::kCapacity || list.n_chunks + chunks > kMaxGridX) flush();
    const int slot = list.n_tensors;
    list.meta[slot] = meta_of(t);
    list.numel[slot] = numel;
    list.chunk_start[slot] = list.n_chunks;
    list.n_chunks += chunks;
    list.chunk_start[slot + 1] = list.n_chunks;
    list.n_tensors = slot + 1;
  }
  flush();
  return launches;
}

}  // namespace fusedopt::cuda
