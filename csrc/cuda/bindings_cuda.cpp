// Python bindings of the CUDA kernels (module fusedopt._C_cuda). Same tables, checks and
// keyword names as the CPU module (csrc/bindings_common.h); the scalar addresses, tensor addresses and the
// stream are device-side values that this file only passes on: it never touches device
// memory and never synchronises. The only file of the CUDA build that sees pybind11.
#include <cuda_runtime_api.h>
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <stdexcept>
#include <string>
#include <tuple>
#include <vector>

#include "../bindings_common.h"

#ifndef FUSEDOPT_CUDA_ARCH_LIST
#define FUSEDOPT_CUDA_ARCH_LIST
#endif

namespace fusedopt::cuda {
// Defined in optim_kernels.cu. They launch on `stream` and return without waiting; they
// throw std::invalid_argument for an unsupported combination (before launching anything)
// and std::runtime_error when a launch fails.
void step(int algorithm, const int64_t* table, int64_t n_tensors, const double* groups, DType param_dtype,
          DType state_dtype, Precision precision, bool variant, StepScalars scalars, double* stats,
          cudaStream_t stream);
void sum_squares(const int64_t* ptrs, const int64_t* numels, int64_t n_tensors, DType dtype, float* out,
                 double* workspace, cudaStream_t stream);
int64_t sum_squares_workspace_size();
void average(const int64_t* avgs, const int64_t* srcs, const int64_t* numels, int64_t n_tensors, DType src_dtype,
             float weight, cudaStream_t stream);
}  // namespace fusedopt::cuda

namespace py = pybind11;
using namespace fusedopt;

namespace {

using bindings::DoubleArray;
using bindings::Int64Array;
using bindings::to_dtype;

int device_count();

// Kernels launch on the calling thread's current device, and a stream belongs to one device.
// When the stream's device is not the current one (several GPUs and no torch.cuda.device
// guard in the caller), it is made current for the call and restored afterwards. Queries
// only, no synchronisation; with one GPU nothing is asked at all.
class DeviceGuard {
 public:
  explicit DeviceGuard(cudaStream_t stream) {
#if CUDART_VERSION >= 12080
    static const int n_devices = device_count();
    if (stream == nullptr || n_devices < 2) return;  // null: the legacy stream of the current device
    int device = -1;
    if (cudaStreamGetDevice(stream, &device) != cudaSuccess || cudaGetDevice(&previous_) != cudaSuccess) {
      (void)cudaGetLastError();
      return;
    }
    if (device != previous_ && cudaSetDevice(device) == cudaSuccess) restore_ = true;
    (void)cudaGetLastError();
#else
    (void)stream;
#endif
  }
  ~DeviceGuard() {
    if (restore_) cudaSetDevice(previous_);
  }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int previous_ = -1;
  bool restore_ = false;
};

void run_step(int algorithm, const Int64Array& table, const DoubleArray& groups, int param_dtype, int state_dtype,
              int precision, bool variant, int64_t grad_scale, int64_t found_inf, int64_t clip_coef, int64_t stats,
              int64_t stream) {
  bindings::check_step_tables(table, groups);
  algorithm = bindings::to_algorithm(algorithm);
  const DType pd = to_dtype(param_dtype, "params");
  const DType sd = to_dtype(state_dtype, "state");
  const Precision prec = bindings::to_precision(precision);
  const StepScalars scalars = bindings::step_scalars(grad_scale, found_inf, clip_coef);
  py::gil_scoped_release release;
  DeviceGuard guard(reinterpret_cast<cudaStream_t>(stream));
  cuda::step(algorithm, table.data(), table.shape(0), groups.data(), pd, sd, prec, variant, scalars,
             reinterpret_cast<double*>(stats), reinterpret_cast<cudaStream_t>(stream));
}

void sum_squares(const Int64Array& ptrs, const Int64Array& numels, int dtype, int64_t out, int64_t workspace,
                 int64_t stream) {
  bindings::check_lists({&ptrs, &numels}, "ptrs and numels");
  const DType dt = to_dtype(dtype, "sum_squares");
  if (out == 0) throw std::invalid_argument("fusedopt: sum_squares needs an output address");
  if (workspace == 0) throw std::invalid_argument("fusedopt: sum_squares needs a workspace address");
  py::gil_scoped_release release;
  DeviceGuard guard(reinterpret_cast<cudaStream_t>(stream));
  cuda::sum_squares(ptrs.data(), numels.data(), ptrs.shape(0), dt, reinterpret_cast<float*>(out),
                    reinterpret_cast<double*>(workspace), reinterpret_cast<cudaStream_t>(stream));
}

void average(const Int64Array& avgs, const Int64Array& srcs, const Int64Array& numels, int src_dtype, double weight,
             int64_t stream) {
  bindings::check_lists({&avgs, &srcs, &numels}, "avgs, srcs and numels");
  const DType dt = to_dtype(src_dtype, "average");
  py::gil_scoped_release release;
  DeviceGuard guard(reinterpret_cast<cudaStream_t>(stream));
  cuda::average(avgs.data(), srcs.data(), numels.data(), avgs.shape(0), dt, float(weight),
                reinterpret_cast<cudaStream_t>(stream));
}

// 0 when there is no usable device or driver (the error is cleared, not raised), so the
// Python layer can probe without a try.
int device_count() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    (void)cudaGetLastError();
    return 0;
  }
  return n;
}

int cuda_runtime_version() {
  int v = 0;
  if (cudaRuntimeGetVersion(&v) != cudaSuccess) {
    (void)cudaGetLastError();
    return 0;
  }
  return v;
}

}  // namespace

PYBIND11_MODULE(_C_cuda, m) {
  m.doc() = "fusedopt CUDA kernels: multi-tensor optimizer steps over raw device-pointer tables";
  std::apply([&](auto... a) { m.def("step", &run_step, a..., "One fused step of an algorithm over a pointer table."); },
             bindings::step_arguments(py::arg("stream") = 0));
  m.def("sum_squares", &sum_squares, py::arg("ptrs"), py::arg("numels"), py::arg("dtype"), py::arg("out"),
        py::arg("workspace"), py::arg("stream") = 0,
        "Sum of squares (float64 accumulation, deterministic) of a list of device tensors, written as float32 to "
        "`out`; `workspace` holds sum_squares_workspace_size() float64 values.");
  m.def("average", &average, py::arg("avgs"), py::arg("srcs"), py::arg("numels"), py::arg("src_dtype"),
        py::arg("weight"), py::arg("stream") = 0,
        "avg += weight * (src - avg) over fp32 averages of float32/bfloat16/float16 sources.");
  m.def("sum_squares_workspace_size", [] { return cuda::sum_squares_workspace_size(); });
  m.def("device_count", &device_count);
  m.def("archs", [] { return std::vector<int>{FUSEDOPT_CUDA_ARCH_LIST}; }, "CUDA architectures compiled in.");
  m.def("cuda_runtime_version", &cuda_runtime_version);
  m.attr("table_columns") = int(kNumTableColumns);
  m.attr("group_fields") = int(kNumGroupFields);
  m.attr("num_algorithms") = int(kNumAlgorithms);
}
