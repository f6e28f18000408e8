// Python bindings of the CUDA kernels (module fusedopt._C_cuda). Same tables, checks and
// keyword names as the CPU module (csrc/bindings_common.h); the scalar addresses, tensor addresses and the
// stream are device-side values that this file only passes on: it never touches device
// memory and never synchronises. The only file of the CUDA build that sees pybind11.
#include <cuda_runtime_api.h>
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
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
void sum_squares(const int64_t* ptrs, const int64_t* numels, int64_t n_tensors, DType dtype, double* out,
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

// Kernels launch on the calling thread's current device, and the stream handle alone does
// not say which device that must be: torch's default stream is handle 0 on every device (the
// legacy stream of whichever device is current). So Python passes the params' device index
// with every call, and the guard makes it current for the call and restores the previous
// device afterwards, on every launch and every CUDA version. Two cheap queries when the
// device already is current (no context switch, no synchronisation).
class DeviceGuard {
 public:
  explicit DeviceGuard(int device) {
    check(cudaGetDevice(&previous_), "cudaGetDevice");
    if (previous_ != device) {
      check(cudaSetDevice(device), "cudaSetDevice");
      restore_ = true;
    }
  }
  ~DeviceGuard() {
    if (restore_ && cudaSetDevice(previous_) != cudaSuccess) (void)cudaGetLastError();
  }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  static void check(cudaError_t status, const char* what) {
    if (status == cudaSuccess) return;
    (void)cudaGetLastError();
    throw std::runtime_error(std::string("fusedopt: ") + what + " failed: " + cudaGetErrorString(status));
  }
  int previous_ = -1;
  bool restore_ = false;
};

// Checked with the other arguments, before anything launches: a call must name the device
// (the default -1 is refused), so no caller can fall back to "whichever device is current".
int to_device(int64_t device) {
  if (device < 0 || device > INT32_MAX)
    throw std::invalid_argument("fusedopt: device must be the CUDA device index (>= 0) of the tensors, got " +
                                std::to_string(device));
  return int(device);
}

void run_step(int algorithm, const Int64Array& table, const DoubleArray& groups, int param_dtype, int state_dtype,
              int precision, bool variant, int64_t grad_scale, int64_t found_inf, int64_t clip_coef, int64_t stats,
              int64_t qmaps, int64_t stream, int64_t device) {
  bindings::check_step_tables(table, groups);
  algorithm = bindings::to_algorithm(algorithm);
  const DType pd = to_dtype(param_dtype, "params");
  const DType sd = to_dtype(state_dtype, "state");
  const Precision prec = bindings::to_precision(precision);
  const StepScalars scalars = bindings::step_scalars(grad_scale, found_inf, clip_coef, qmaps);
  const int dev = to_device(device);
  py::gil_scoped_release release;
  DeviceGuard guard(dev);
  cuda::step(algorithm, table.data(), table.shape(0), groups.data(), pd, sd, prec, variant, scalars,
             reinterpret_cast<double*>(stats), reinterpret_cast<cudaStream_t>(stream));
}

void sum_squares(const Int64Array& ptrs, const Int64Array& numels, int dtype, int64_t out, int64_t workspace,
                 int64_t stream, int64_t device) {
  bindings::check_lists({&ptrs, &numels}, "ptrs and numels");
  const DType dt = to_dtype(dtype, "sum_squares");
  if (out == 0) throw std::invalid_argument("fusedopt: sum_squares needs an output address");
  if (workspace == 0) throw std::invalid_argument("fusedopt: sum_squares needs a workspace address");
  const int dev = to_device(device);
  py::gil_scoped_release release;
  DeviceGuard guard(dev);
  cuda::sum_squares(ptrs.data(), numels.data(), ptrs.shape(0), dt, reinterpret_cast<double*>(out),
                    reinterpret_cast<double*>(workspace), reinterpret_cast<cudaStream_t>(stream));
}

void average(const Int64Array& avgs, const Int64Array& srcs, const Int64Array& numels, int src_dtype, double weight,
             int64_t stream, int64_t device) {
  bindings::check_lists({&avgs, &srcs, &numels}, "avgs, srcs and numels");
  const DType dt = to_dtype(src_dtype, "average");
  const int dev = to_device(device);
  py::gil_scoped_release release;
  DeviceGuard guard(dev);
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

// The newest CUDA version the installed driver supports (1000 * major + 10 * minor), 0 when
// there is no driver at all. Asking does not create a context.
int cuda_driver_version() {
  int v = 0;
  if (cudaDriverGetVersion(&v) != cudaSuccess) {
    (void)cudaGetLastError();
    return 0;
  }
  return v;
}

}  // namespace

PYBIND11_MODULE(_C_cuda, m) {
  m.doc() = "fusedopt CUDA kernels: multi-tensor optimizer steps over raw device-pointer tables";
  // Every launch names its stream and the device that stream belongs to (see DeviceGuard).
  std::apply([&](auto... a) { m.def("step", &run_step, a..., "One fused step of an algorithm over a pointer table."); },
             std::tuple_cat(bindings::step_arguments(py::arg("stream") = 0), std::make_tuple(py::arg("device") = -1)));
  m.def("sum_squares", &sum_squares, py::arg("ptrs"), py::arg("numels"), py::arg("dtype"), py::arg("out"),
        py::arg("workspace"), py::arg("stream") = 0, py::arg("device") = -1,
        "Sum of squares (float64 accumulation, deterministic) of a list of tensors on `device`, written as one "
        "float64 to `out`; `workspace` holds sum_squares_workspace_size() float64 values and must not be used by "
        "another call in flight (allocate it per call).");
  m.def("average", &average, py::arg("avgs"), py::arg("srcs"), py::arg("numels"), py::arg("src_dtype"),
        py::arg("weight"), py::arg("stream") = 0, py::arg("device") = -1,
        "avg += weight * (src - avg) over fp32 averages of float32/bfloat16/float16 sources.");
  m.def("sum_squares_workspace_size", [] { return cuda::sum_squares_workspace_size(); });
  m.def("device_count", &device_count);
  m.def("archs", [] { return std::vector<int>{FUSEDOPT_CUDA_ARCH_LIST}; }, "CUDA architectures compiled in.");
  m.def("cuda_runtime_version", &cuda_runtime_version, "CUDA runtime linked into this module (1000*major+10*minor).");
  m.def("cuda_driver_version", &cuda_driver_version,
        "Newest CUDA version the installed driver supports (1000*major+10*minor); 0 without a driver.");
  // Read once at import: fusedopt._backend compares them before the first CUDA launch.
  m.attr("runtime_version") = cuda_runtime_version();
  m.attr("driver_version") = cuda_driver_version();
  m.attr("table_columns") = int(kNumTableColumns);
  m.attr("group_fields") = int(kNumGroupFields);
  m.attr("num_algorithms") = int(kNumAlgorithms);
}
