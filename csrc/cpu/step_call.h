// One call of a CPU kernel: the tables Python packed for a (device, dtype) bucket, plus the
// call-wide options. Host memory only.
#pragma once
#include "../fusedopt/tensor_table.h"

namespace fusedopt::cpu {

struct StepCall {
  int algorithm = 0;               // an id of algorithms.h
  const int64_t* table = nullptr;  // n_tensors x kNumTableColumns
  int64_t n_tensors = 0;
  const double* groups = nullptr;  // n_groups x kNumGroupFields
  int64_t n_groups = 0;
  DType param_dtype = DType::kFloat32;
  DType state_dtype = DType::kFloat32;
  Precision precision = Precision::kPlain;
  bool variant = false;            // the algorithm's variant flag (Adam: amsgrad; SGD: momentum != 0)
  StepScalars scalars;
  double* stats = nullptr;         // n_groups x kNumStats sums to add into (track_stats), or null
  int num_threads = 1;
};

// A reduction over a list of tensors (pointer, numel, dtype).
struct ReduceCall {
  const int64_t* ptrs = nullptr;
  const int64_t* numels = nullptr;
  int64_t n_tensors = 0;
  DType dtype = DType::kFloat32;
  int num_threads = 1;
};

// avg[i] += weight * (src[i] - avg[i]) over a list of (fp32 avg, src) pairs.
struct AverageCall {
  const int64_t* avgs = nullptr;
  const int64_t* srcs = nullptr;
  const int64_t* numels = nullptr;
  int64_t n_tensors = 0;
  DType src_dtype = DType::kFloat32;
  float weight = 0.0f;
  int num_threads = 1;
};

// dst[t][0, nbytes[t]) = src[t][0, nbytes[t]) over a list of byte ranges that do not overlap.
struct CopyCall {
  const int64_t* dsts = nullptr;
  const int64_t* srcs = nullptr;
  const int64_t* nbytes = nullptr;
  int64_t n_tensors = 0;
  int num_threads = 1;
};

// SAM's first step over a list of params (fusedopt/sam.h): saved[t] = p bit for bit, then
// p = w + e, in the params' dtype.
struct PerturbCall {
  const int64_t* params = nullptr;
  const int64_t* saved = nullptr;
  const int64_t* grads = nullptr;
  const int64_t* numels = nullptr;
  int64_t n_tensors = 0;
  DType dtype = DType::kFloat32;
  double scale = 0.0;
  bool adaptive = false;
  int num_threads = 1;
};

// The 8-bit codec of a build (quantized.h) on plain arrays, for tests: either the codes of n
// values already normalized (x = value, in blocks of kQuantBlock whose random bits are those of
// elements [b, b + kQuantBlock) of a tensor with keys key_a, key_b), or the values of n codes
// times `scale`. `state` picks the map (0: signed, 1 and 2: unsigned).
struct CodecCall {
  const float* maps = nullptr;  // the qmaps buffer (StepScalars::qmaps)
  int state = 0;
  int64_t n = 0;
  const float* values = nullptr;  // quantize: values -> codes
  const uint8_t* codes_in = nullptr;  // dequantize: codes_in -> dequantized
  uint8_t* codes = nullptr;
  float* dequantized = nullptr;
  float scale = 1.0f;
  bool stochastic = false;
  uint32_t key_a = 0, key_b = 0;
};

// Every kernel of one instruction-set build; dispatch.cpp picks one table at import.
struct KernelTable {
  const char* isa;
  void (*step)(const StepCall&);
  double (*sum_squares)(const ReduceCall&);
  void (*average)(const AverageCall&);
  void (*copy)(const CopyCall&);
  void (*sam_perturb)(const PerturbCall&);
  void (*codec)(const CodecCall&);
};

}  // namespace fusedopt::cpu
