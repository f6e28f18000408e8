// The CUDA multi-tensor launcher: the one place that turns a list of tensors into kernel
// launches. How tensors are packed into launches and how a block finds its chunk is plain C++
// in launch_plan.h (tested on the host); this file adds the kernel and the launch.
//
// Functors choose their grid: one block per chunk (the optimizer steps), or a fixed grid that
// strides over the chunks (the deterministic reduction).
#pragma once
#include <cuda_runtime.h>

#include <string>

#include "launch_plan.h"

namespace fusedopt::cuda {

inline void check_launch(const char* what) {
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess)
    throw std::runtime_error(std::string("fusedopt: CUDA launch of ") + what + " failed: " + cudaGetErrorString(err));
}

// The single kernel of every multi-tensor op. Both arguments live in the grid-constant
// parameter space: the functor and the tensor list are read (and indexed at run time)
// where they are, never copied to local memory.
template <typename Meta, typename Functor>
__global__ void __launch_bounds__(Functor::kBlockThreads, Functor::kMinBlocksPerSm)
    multi_tensor_kernel(const __grid_constant__ TensorList<Meta> list, const __grid_constant__ Functor functor) {
  functor(list);
}

// Launches `functor` over every chunk of tensors 0..n_tensors-1 on `stream` (numel_of and
// meta_of as in plan_launches). The functor provides kBlockThreads, kMinBlocksPerSm (for
// __launch_bounds__: caps its registers so that many blocks fit on an SM) and
// `int64_t grid(int64_t n_chunks) const`; its device operator()(const TensorList<Meta>&) does
// the work. Returns the number of launches.
template <typename Meta, typename Functor, typename NumelOf, typename MetaOf>
int multi_tensor_apply(int64_t n_tensors, int64_t chunk_size, NumelOf numel_of, MetaOf meta_of,
                       const Functor& functor, cudaStream_t stream, const char* name) {
  static_assert(sizeof(TensorList<Meta>) + sizeof(Functor) <= size_t(kKernelParamBytes),
                "kernel arguments exceed the kernel parameter budget (launch_plan.h)");
  return plan_launches<Meta>(n_tensors, chunk_size, numel_of, meta_of, [&](const TensorList<Meta>& list) {
    const int64_t grid = functor.grid(list.n_chunks);
    multi_tensor_kernel<Meta, Functor><<<unsigned(grid), Functor::kBlockThreads, 0, stream>>>(list, functor);
    check_launch(name);
  });
}

}  // namespace fusedopt::cuda
