// Python bindings of the CPU kernels (module fusedopt._C). Takes the tables as NumPy
// arrays and device scalars as raw addresses; the only file of the CPU build that sees
// pybind11.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <stdexcept>
#include <string>

#include "bindings_common.h"
#include "cpu/dispatch.h"
#include "cpu/worker_pool.h"

namespace py = pybind11;
using namespace fusedopt;
using namespace fusedopt::cpu;

namespace {

using bindings::DoubleArray;
using bindings::Int64Array;
using bindings::to_dtype;

StepCall make_call(int algorithm, const Int64Array& table, const DoubleArray& groups, int param_dtype,
                   int state_dtype, int precision, bool variant, int64_t grad_scale, int64_t found_inf,
                   int64_t clip_coef, int64_t stats, int64_t qmaps, int num_threads) {
  bindings::check_step_tables(table, groups);
  StepCall call;
  call.algorithm = bindings::to_algorithm(algorithm);
  call.table = table.data();
  call.n_tensors = table.shape(0);
  call.groups = groups.data();
  call.n_groups = groups.shape(0);
  call.param_dtype = to_dtype(param_dtype, "params");
  call.state_dtype = to_dtype(state_dtype, "state");
  call.precision = bindings::to_precision(precision);
  call.variant = variant;
  call.scalars = bindings::step_scalars(grad_scale, found_inf, clip_coef, qmaps);
  call.stats = reinterpret_cast<double*>(stats);
  call.num_threads = num_threads > 0 ? num_threads : 1;
  return call;
}

void run_step(int algorithm, const Int64Array& table, const DoubleArray& groups, int param_dtype, int state_dtype,
              int precision, bool variant, int64_t grad_scale, int64_t found_inf, int64_t clip_coef, int64_t stats,
              int64_t qmaps, int num_threads) {
  StepCall call = make_call(algorithm, table, groups, param_dtype, state_dtype, precision, variant, grad_scale,
                            found_inf, clip_coef, stats, qmaps, num_threads);
  py::gil_scoped_release release;
  active_kernels().step(call);
}

double sum_squares(const Int64Array& ptrs, const Int64Array& numels, int dtype, int num_threads) {
  bindings::check_lists({&ptrs, &numels}, "ptrs and numels");
  ReduceCall call;
  call.ptrs = ptrs.data();
  call.numels = numels.data();
  call.n_tensors = ptrs.shape(0);
  call.dtype = to_dtype(dtype, "sum_squares");
  call.num_threads = num_threads > 0 ? num_threads : 1;
  py::gil_scoped_release release;
  return active_kernels().sum_squares(call);
}

void average(const Int64Array& avgs, const Int64Array& srcs, const Int64Array& numels, int src_dtype, double weight,
             int num_threads) {
  bindings::check_lists({&avgs, &srcs, &numels}, "avgs, srcs and numels");
  AverageCall call;
  call.avgs = avgs.data();
  call.srcs = srcs.data();
  call.numels = numels.data();
  call.n_tensors = avgs.shape(0);
  call.src_dtype = to_dtype(src_dtype, "average");
  call.weight = float(weight);
  call.num_threads = num_threads > 0 ? num_threads : 1;
  py::gil_scoped_release release;
  active_kernels().average(call);
}

void copy(const Int64Array& dsts, const Int64Array& srcs, const Int64Array& nbytes, int num_threads) {
  bindings::check_lists({&dsts, &srcs, &nbytes}, "dsts, srcs and nbytes");
  CopyCall call;
  call.dsts = dsts.data();
  call.srcs = srcs.data();
  call.nbytes = nbytes.data();
  call.n_tensors = dsts.shape(0);
  for (int64_t t = 0; t < call.n_tensors; ++t)
    if (call.nbytes[t] < 0) throw std::invalid_argument("fusedopt: copy sizes must be >= 0");
  call.num_threads = num_threads > 0 ? num_threads : 1;
  py::gil_scoped_release release;
  active_kernels().copy(call);
}

void sam_perturb(const Int64Array& params, const Int64Array& saved, const Int64Array& grads, const Int64Array& numels,
                 int dtype, double scale, bool adaptive, int num_threads) {
  bindings::check_lists({&params, &saved, &grads, &numels}, "params, saved, grads and numels");
  PerturbCall call;
  call.params = params.data();
  call.saved = saved.data();
  call.grads = grads.data();
  call.numels = numels.data();
  call.n_tensors = params.shape(0);
  call.dtype = to_dtype(dtype, "sam_perturb");
  if (call.dtype == DType::kUInt8Blockwise) throw std::invalid_argument("fusedopt: sam_perturb takes float params");
  call.scale = scale;
  call.adaptive = adaptive;
  call.num_threads = num_threads > 0 ? num_threads : 1;
  py::gil_scoped_release release;
  active_kernels().sam_perturb(call);
}

using FloatArray = py::array_t<float, py::array::c_style | py::array::forcecast>;
using ByteArray = py::array_t<uint8_t, py::array::c_style | py::array::forcecast>;

// The checks both codec directions share, and the call they fill in for the 1-D `array`.
template <typename Array>
CodecCall codec_call(const char* name, const char* array_name, int64_t maps, const Array& array, int state) {
  if (state < 0 || state > 2) throw std::invalid_argument("fusedopt: codec state must be 0, 1 or 2");
  if (maps == 0) throw std::invalid_argument(std::string("fusedopt: ") + name + " needs the maps (maps)");
  if (array.ndim() != 1)
    throw std::invalid_argument(std::string("fusedopt: ") + name + " takes a 1-D " + array_name + " array");
  CodecCall call;
  call.maps = reinterpret_cast<const float*>(maps);
  call.state = state;
  call.n = array.shape(0);
  return call;
}

// The 8-bit codec of the kernels in use on a 1-D array (tests/test_quantized_codec.py).
ByteArray quantize_codes(int64_t maps, const FloatArray& values, int state, bool stochastic, uint32_t key_a,
                         uint32_t key_b) {
  CodecCall call = codec_call("quantize_codes", "values", maps, values, state);
  ByteArray codes(call.n);
  call.values = values.data();
  call.codes = codes.mutable_data();
  call.stochastic = stochastic;
  call.key_a = key_a;
  call.key_b = key_b;
  active_kernels().codec(call);
  return codes;
}

FloatArray dequantize_codes(int64_t maps, const ByteArray& codes, int state, float scale) {
  CodecCall call = codec_call("dequantize_codes", "codes", maps, codes, state);
  FloatArray out(call.n);
  call.codes_in = codes.data();
  call.dequantized = out.mutable_data();
  call.scale = scale;
  active_kernels().codec(call);
  return out;
}

// torch's own accessors (TensorBase.data_ptr, .is_contiguous, .grad, .dtype), handed over
// once by the Python layer so the per-step loop below calls them directly instead of
// looking each attribute up by name on every tensor.
struct TensorAccessors {
  PyObject* data_ptr = nullptr;       // method descriptor
  PyObject* is_contiguous = nullptr;  // method descriptor
  PyObject* numel = nullptr;          // method descriptor
  PyObject* grad = nullptr;           // getset descriptor
  PyObject* dtype = nullptr;          // getset descriptor
  PyTypeObject* tensor_type = nullptr;  // torch._C.TensorBase, the type the methods belong to
} g_access;

void set_tensor_accessors(py::object data_ptr, py::object is_contiguous, py::object numel, py::object grad,
                          py::object dtype) {
  for (PyObject* d : {grad.ptr(), dtype.ptr()})
    if (!PyObject_TypeCheck(d, &PyGetSetDescr_Type)) throw std::invalid_argument("fusedopt: expected attribute descriptors");
  for (PyObject* m : {data_ptr.ptr(), is_contiguous.ptr(), numel.ptr()})
    if (!PyObject_TypeCheck(m, &PyMethodDescr_Type)) throw std::invalid_argument("fusedopt: expected method descriptors");
  PyTypeObject* type = PyDescr_TYPE(data_ptr.ptr());
  for (PyObject* d : {is_contiguous.ptr(), numel.ptr(), grad.ptr(), dtype.ptr()})
    if (PyDescr_TYPE(d) != type) throw std::invalid_argument("fusedopt: the accessors must be of one tensor type");
  Py_INCREF(type);
  g_access = {data_ptr.release().ptr(), is_contiguous.release().ptr(), numel.release().ptr(), grad.release().ptr(),
              dtype.release().ptr(),    type};
}

PyObject* get(PyObject* descr, PyObject* obj) {
  return Py_TYPE(descr)->tp_descr_get(descr, obj, reinterpret_cast<PyObject*>(Py_TYPE(obj)));
}

// method(self) for a method descriptor of g_access.tensor_type; `self` must be an instance of it
// (the caller checked). A METH_NOARGS method (data_ptr, numel) is called through its C function,
// as the descriptor's own call would after the same type check; anything else by vectorcall.
PyObject* call0(PyObject* method, PyObject* self) {
  PyMethodDef* def = reinterpret_cast<PyMethodDescrObject*>(method)->d_method;
  constexpr int kKinds = METH_VARARGS | METH_FASTCALL | METH_NOARGS | METH_O | METH_KEYWORDS | METH_CLASS | METH_STATIC;
  if ((def->ml_flags & kKinds) == METH_NOARGS)
    return def->ml_meth(self, nullptr);
  return PyObject_Vectorcall(method, &self, 1, nullptr);
}

bool call_int(PyObject* method, PyObject* self, long long* out) {
  PyObject* r = call0(method, self);
  if (r == nullptr) return false;
  *out = PyLong_AsLongLong(r);
  Py_DECREF(r);
  return !(*out == -1 && PyErr_Occurred());
}

// The per-step part of the pointer table: re-reads every param's address and its grad's
// address, dtype, size and contiguity in one C loop (these per-tensor calls are what dominates a
// step of many small tensors). Returns -1 when every row is still valid and its grad
// column is filled, else the first row that needs the slow path (param storage moved, grad
// missing, of another dtype or size, or not contiguous); the table must then be rebuilt.
// Each param, and each grad, must be an instance of the tensor type the accessors belong to
// (anything else takes the slow path), which is what lets call0 skip the descriptor's check.
int64_t refresh_grads(const py::list& params, const py::object& dtype, Int64Array& table) {
  if (g_access.data_ptr == nullptr) throw std::logic_error("fusedopt: set_tensor_accessors was not called");
  const Py_ssize_t n = PyList_GET_SIZE(params.ptr());
  if (table.ndim() != 2 || table.shape(0) != n || table.shape(1) != kNumTableColumns)
    throw std::invalid_argument("fusedopt: table does not match the params");
  PyObject* const* items = PySequence_Fast_ITEMS(params.ptr());
  int64_t* rows = table.mutable_data();
  PyTypeObject* tensor = g_access.tensor_type;
  for (Py_ssize_t i = 0; i < n; ++i) {
    PyObject* p = items[i];
    if (!PyObject_TypeCheck(p, tensor)) return i;
    long long ptr;
    if (!call_int(g_access.data_ptr, p, &ptr) || ptr != rows[i * kNumTableColumns + kColParam]) return PyErr_Clear(), i;
    PyObject* g = get(g_access.grad, p);
    if (g == nullptr) return PyErr_Clear(), i;
    bool ok = g != Py_None && PyObject_TypeCheck(g, tensor);
    if (ok) {
      PyObject* gd = get(g_access.dtype, g);
      ok = gd == dtype.ptr();
      Py_XDECREF(gd);
    }
    long long gptr = 0, contiguous = 0, numel = -1;
    ok = ok && call_int(g_access.numel, g, &numel) && numel == rows[i * kNumTableColumns + kColNumel] &&
         call_int(g_access.is_contiguous, g, &contiguous) && contiguous == 1 && call_int(g_access.data_ptr, g, &gptr);
    Py_DECREF(g);
    if (!ok) return PyErr_Clear(), i;
    rows[i * kNumTableColumns + kColGrad] = gptr;
  }
  return -1;
}

// True when two sequences hold the same objects in the same order. Compares identities only,
// so it touches no item: how a cached plan checks, every step, that no group's params list
// had an item replaced, added or removed.
bool same_items(const py::handle& a, const py::handle& b) {
  py::object fa = py::reinterpret_steal<py::object>(PySequence_Fast(a.ptr(), "fusedopt: same_items needs two sequences"));
  if (!fa) throw py::error_already_set();
  py::object fb = py::reinterpret_steal<py::object>(PySequence_Fast(b.ptr(), "fusedopt: same_items needs two sequences"));
  if (!fb) throw py::error_already_set();
  const Py_ssize_t n = PySequence_Fast_GET_SIZE(fa.ptr());
  if (PySequence_Fast_GET_SIZE(fb.ptr()) != n) return false;
  PyObject** ia = PySequence_Fast_ITEMS(fa.ptr());
  PyObject** ib = PySequence_Fast_ITEMS(fb.ptr());
  for (Py_ssize_t i = 0; i < n; ++i)
    if (ia[i] != ib[i]) return false;
  return true;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "fusedopt CPU kernels: multi-tensor optimizer steps over raw pointer tables";
  std::apply([&](auto... a) { m.def("step", &run_step, a..., "One fused step of an algorithm over a pointer table."); },
             bindings::step_arguments(py::arg("num_threads") = 1));
  m.def("sum_squares", &sum_squares, py::arg("ptrs"), py::arg("numels"), py::arg("dtype"), py::arg("num_threads") = 1,
        "Sum of squares (float64 accumulation) over a list of tensors.");
  m.def("set_tensor_accessors", &set_tensor_accessors, py::arg("data_ptr"), py::arg("is_contiguous"), py::arg("numel"),
        py::arg("grad"), py::arg("dtype"));
  m.def("refresh_grads", &refresh_grads, py::arg("params"), py::arg("dtype"), py::arg("table"),
        "Refreshes the grad column of a cached pointer table; -1 if valid, else the first stale row.");
  m.def("same_items", &same_items, py::arg("a"), py::arg("b"),
        "Whether two sequences hold the same objects (by identity) in the same order.");
  m.def("average", &average, py::arg("avgs"), py::arg("srcs"), py::arg("numels"), py::arg("src_dtype"),
        py::arg("weight"), py::arg("num_threads") = 1,
        "avg += weight * (src - avg) over fp32 averages of float32/bfloat16/float16 sources.");
  m.def("sam_perturb", &sam_perturb, py::arg("params"), py::arg("saved"), py::arg("grads"), py::arg("numels"),
        py::arg("dtype"), py::arg("scale"), py::arg("adaptive"), py::arg("num_threads") = 1,
        "SAM's first step: saved = p, then p = p + scale * (p^2 if adaptive else 1) * g (fusedopt/sam.h).");
  m.def("copy", &copy, py::arg("dsts"), py::arg("srcs"), py::arg("nbytes"), py::arg("num_threads") = 1,
        "dst[t][:nbytes[t]] = src[t][:nbytes[t]] over non-overlapping byte ranges, streaming stores where the "
        "instruction set has them.");
  m.def("quantize_codes", &quantize_codes, py::arg("maps"), py::arg("values"), py::arg("state"),
        py::arg("stochastic") = false, py::arg("key_a") = 0, py::arg("key_b") = 0,
        "8-bit codes of normalized values by the kernels' codec (maps: address of the qmaps buffer).");
  m.def("dequantize_codes", &dequantize_codes, py::arg("maps"), py::arg("codes"), py::arg("state"),
        py::arg("scale") = 1.0f, "map[code] * scale by the kernels' codec (maps: address of the qmaps buffer).");
  m.def("isa", [] { return std::string(active_kernels().isa); }, "Instruction set of the CPU kernels in use.");
  m.def("pool_workers", &pool_workers, "Worker threads the CPU kernels' pool has started in this process.");
  m.def("use_pool", &use_pool, "Whether the CPU kernels run on fusedopt's worker pool (else torch's OpenMP team).");
  m.def("set_use_pool", &set_use_pool, py::arg("on"),
        "Run the CPU kernels on fusedopt's worker pool (True) or torch's OpenMP team (False, the default; "
        "FUSEDOPT_CPU_POOL=1 in the environment turns the pool on).");
  m.attr("table_columns") = int(kNumTableColumns);
  m.attr("group_fields") = int(kNumGroupFields);
  m.attr("num_algorithms") = int(kNumAlgorithms);
}
