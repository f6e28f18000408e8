// What the CPU and CUDA modules' bindings share: the NumPy types the tables arrive as, the
// checks a call passes before any kernel runs, and the step functions' keyword names, so a
// malformed table is refused the same way by both backends and Python calls both alike. Each
// module appends its own trailing keyword (the CPU's thread count, the CUDA stream).
#pragma once
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <initializer_list>
#include <stdexcept>
#include <string>
#include <tuple>

#include "fusedopt/algorithms.h"
#include "fusedopt/tensor_table.h"

namespace fusedopt::bindings {

namespace py = pybind11;
using Int64Array = py::array_t<int64_t, py::array::c_style | py::array::forcecast>;
using DoubleArray = py::array_t<double, py::array::c_style | py::array::forcecast>;

inline DType to_dtype(int code, const char* what) {
  if (code < 0 || code > 4) throw std::invalid_argument(std::string("fusedopt: bad dtype code for ") + what);
  return DType(code);
}

inline Precision to_precision(int code) {
  if (code < 0 || code > 3) throw std::invalid_argument("fusedopt: bad precision code");
  return Precision(code);
}

// The pointer table and the group table of a step: shapes, and every row's group index.
inline void check_step_tables(const Int64Array& table, const DoubleArray& groups) {
  if (table.ndim() != 2 || table.shape(1) != kNumTableColumns)
    throw std::invalid_argument("fusedopt: table must be (n_tensors, " + std::to_string(kNumTableColumns) + ")");
  if (groups.ndim() != 2 || groups.shape(1) != kNumGroupFields)
    throw std::invalid_argument("fusedopt: groups must be (n_groups, " + std::to_string(kNumGroupFields) + ")");
  const int64_t* rows = table.data();
  const int64_t n_groups = groups.shape(0);
  for (int64_t t = 0; t < table.shape(0); ++t) {
    const int64_t g = rows[t * kNumTableColumns + kColGroup];
    if (g < 0 || g >= n_groups) throw std::invalid_argument("fusedopt: table row names a missing group");
  }
}

// Parallel per-tensor lists (pointers, sizes): 1-d and of equal length.
inline void check_lists(std::initializer_list<const Int64Array*> lists, const char* names) {
  const Int64Array& first = **lists.begin();
  for (const Int64Array* a : lists)
    if (a->ndim() != 1 || a->shape(0) != first.shape(0))
      throw std::invalid_argument(std::string("fusedopt: ") + names + " must be 1-d and of equal length");
}

// Device scalars (grad scale, found_inf, clip coefficient) and the 8-bit maps arrive as
// addresses, 0 for none.
inline StepScalars step_scalars(int64_t grad_scale, int64_t found_inf, int64_t clip_coef, int64_t qmaps) {
  StepScalars s;
  s.qmaps = reinterpret_cast<const float*>(qmaps);
  s.grad_scale = reinterpret_cast<const float*>(grad_scale);
  s.found_inf = reinterpret_cast<const float*>(found_inf);
  s.clip_coef = reinterpret_cast<const float*>(clip_coef);
  return s;
}

inline int to_algorithm(int id) {
  if (id < 0 || id >= kNumAlgorithms) throw std::invalid_argument("fusedopt: unknown algorithm id " + std::to_string(id));
  return id;
}

// Keyword arguments of `step`: `algorithm` is an id of algorithms.h, `variant` its variant flag
// (Adam: amsgrad, SGD: momentum), and `backend` the module's own trailing argument.
inline auto step_arguments(py::arg_v backend) {
  return std::make_tuple(py::arg("algorithm"), py::arg("table"), py::arg("groups"), py::arg("param_dtype"),
                         py::arg("state_dtype"), py::arg("precision"), py::arg("variant"), py::arg("grad_scale") = 0,
                         py::arg("found_inf") = 0, py::arg("clip_coef") = 0, py::arg("stats") = 0,
                         py::arg("qmaps") = 0, std::move(backend));
}

}  // namespace fusedopt::bindings
