// pymerge._C: the only pybind11 file. Python passes raw addresses (tensor.data_ptr()), element counts
// and dtype codes; this layer checks everything a kernel assumes (null pointers, dtype codes, sizes,
// overlaps, weights), raises ValueError with a message naming the argument, releases the GIL and calls
// the kernel. It cannot check that a buffer really holds n elements: the Python wrappers
// (pymerge/ops/native_*.py) derive n from the tensors themselves.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <string>
#include <vector>

#include "pymerge/cpu_kernels.h"
#include "pymerge/cpu_parallel.h"
#include "pymerge/dtype.h"
#include "pymerge/philox.h"
#include "pymerge/radix_select.h"
#if defined(PYMERGE_WITH_CUDA)
#include "pymerge/cuda_kernels.h"
#endif

// The module's name and the -march level its CPU kernels were compiled for (CMakeLists.txt builds this file
// once per level: _C for the compiler's default, _C_x86_64_v3 / _C_x86_64_v4 for those levels).
#ifndef PYMERGE_MODULE_NAME
#define PYMERGE_MODULE_NAME _C
#endif
#ifndef PYMERGE_CPU_ISA
#define PYMERGE_CPU_ISA "default"
#endif

namespace py = pybind11;
using pymerge::DType;

namespace {

[[noreturn]] void fail(const std::string& message) { throw py::value_error(message); }

DType checked_dtype(int code, const char* what) {
  if (!pymerge::is_valid_dtype(code)) {
    fail(std::string(what) + ": unknown dtype code " + std::to_string(code) +
         " (expected 0 = float32, 1 = float16, 2 = bfloat16)");
  }
  return static_cast<DType>(code);
}

void check_count(int64_t n) {
  if (n < 0) fail("n: element count must be >= 0, got " + std::to_string(n));
}

uintptr_t checked_pointer(int64_t address, int64_t n, const std::string& what) {
  if (address < 0) fail(what + ": address must be >= 0, got " + std::to_string(address));
  if (address == 0 && n > 0) fail(what + ": null pointer with n = " + std::to_string(n) + " elements");
  return static_cast<uintptr_t>(address);
}

// Byte ranges [a, a + a_bytes) and [b, b + b_bytes) share at least one byte.
bool overlaps(uintptr_t a, int64_t a_bytes, uintptr_t b, int64_t b_bytes) {
  return a_bytes > 0 && b_bytes > 0 && a < b + uintptr_t(b_bytes) && b < a + uintptr_t(a_bytes);
}

// Per-expert mask-bit buffers of `bytes` bytes each (0 = none for that expert), or none at all (empty list):
// checked against each other and against the inputs' byte ranges [inputs[i], + in_bytes).
std::vector<uint8_t*> checked_bits(const std::vector<int64_t>& ptrs, size_t k, int64_t bytes,
                                   const std::vector<uintptr_t>& inputs, int64_t in_bytes) {
  std::vector<uint8_t*> out;
  if (ptrs.empty()) return out;
  if (ptrs.size() != k) {
    fail("keep_bits_ptrs: got " + std::to_string(ptrs.size()) + " values for " + std::to_string(k) +
         " experts (one per expert, 0 for none)");
  }
  for (size_t j = 0; j < k; ++j) {
    const std::string what = "keep_bits_ptrs[" + std::to_string(j) + "]";
    if (ptrs[j] < 0) fail(what + ": address must be >= 0");
    const uintptr_t p = uintptr_t(ptrs[j]);
    if (p != 0) {
      for (uintptr_t in : inputs) {
        if (overlaps(p, bytes, in, in_bytes)) fail(what + ": overlaps an input");
      }
      for (size_t i = 0; i < j; ++i) {
        if (overlaps(p, bytes, uintptr_t(out[i]), out[i] != nullptr ? bytes : 0)) {
          fail(what + ": overlaps keep_bits_ptrs[" + std::to_string(i) + "]");
        }
      }
    }
    out.push_back(reinterpret_cast<uint8_t*>(p));
  }
  return out;
}

// n * element size must be addressable; beyond that a buffer of n elements cannot exist.
void check_bytes(int64_t n, DType d, const char* what) {
  if (n > std::numeric_limits<int64_t>::max() / pymerge::dtype_size(d)) {
    fail(std::string(what) + ": n = " + std::to_string(n) + " elements is too large");
  }
}

// rows * cols of a [rows, cols] chunk, after checking both are >= 0 and the fp32 bytes of the product fit.
int64_t checked_matrix(int64_t rows, int64_t cols) {
  if (rows < 0 || cols < 0) {
    fail("rows, cols: must be >= 0, got " + std::to_string(rows) + ", " + std::to_string(cols));
  }
  if (cols > 0 && rows > std::numeric_limits<int64_t>::max() / (8 * cols)) fail("rows * cols: too large");
  return rows * cols;
}

struct CastArgs {
  const void* src;
  DType src_dtype;
  void* dst;
  DType dst_dtype;
};

CastArgs check_cast(int64_t src_ptr, int src_dtype, int64_t dst_ptr, int dst_dtype, int64_t n) {
  check_count(n);
  const DType s = checked_dtype(src_dtype, "src_dtype");
  const DType d = checked_dtype(dst_dtype, "dst_dtype");
  check_bytes(n, s, "src");
  check_bytes(n, d, "dst");
  const uintptr_t src = checked_pointer(src_ptr, n, "src_ptr");
  const uintptr_t dst = checked_pointer(dst_ptr, n, "dst_ptr");
  const bool same_buffer = src == dst && s == d;  // a no-op copy onto itself is harmless
  if (!same_buffer && overlaps(src, n * pymerge::dtype_size(s), dst, n * pymerge::dtype_size(d))) {
    fail("cast: src and dst memory overlap; the output must be a separate buffer");
  }
  return {reinterpret_cast<const void*>(src), s, reinterpret_cast<void*>(dst), d};
}

struct WeightedSumArgs {
  std::vector<const void*> inputs;
  std::vector<float> weights;
  DType in_dtype;
  void* out;
  DType out_dtype;
  float weight_sum;
};

WeightedSumArgs check_weighted_sum(const std::vector<int64_t>& input_ptrs, int in_dtype,
                                   const std::vector<double>& weights, int64_t out_ptr, int out_dtype,
                                   int64_t n, bool normalize) {
  check_count(n);
  if (input_ptrs.empty()) fail("input_ptrs: at least one input is required");
  if (weights.size() != input_ptrs.size()) {
    fail("weights: got " + std::to_string(weights.size()) + " weights for " +
         std::to_string(input_ptrs.size()) + " inputs (one weight per input)");
  }
  WeightedSumArgs a;
  a.in_dtype = checked_dtype(in_dtype, "in_dtype");
  a.out_dtype = checked_dtype(out_dtype, "out_dtype");
  check_bytes(n, a.in_dtype, "inputs");
  check_bytes(n, a.out_dtype, "out");
  const uintptr_t out = checked_pointer(out_ptr, n, "out_ptr");
  const int64_t in_bytes = n * pymerge::dtype_size(a.in_dtype);
  const int64_t out_bytes = n * pymerge::dtype_size(a.out_dtype);
  double sum = 0.0;  // in input order, in double: the divisor is rounded to fp32 once
  for (size_t j = 0; j < input_ptrs.size(); ++j) {
    const std::string name = "input_ptrs[" + std::to_string(j) + "]";
    const uintptr_t in = checked_pointer(input_ptrs[j], n, name);
    // Writing out[i] after reading every x_j[i] is safe only when out is exactly an input of its dtype.
    const bool in_place = in == out && a.in_dtype == a.out_dtype;
    if (!in_place && overlaps(in, in_bytes, out, out_bytes)) {
      fail(name + ": overlaps the output buffer; the output must be separate (or exactly an input of the "
                  "same dtype)");
    }
    const float w = static_cast<float>(weights[j]);
    if (!std::isfinite(weights[j]) || !std::isfinite(w)) {
      fail("weights[" + std::to_string(j) + "]: must be finite in float32, got " + std::to_string(weights[j]));
    }
    a.inputs.push_back(reinterpret_cast<const void*>(in));
    a.weights.push_back(w);
    sum += weights[j];
  }
  a.weight_sum = static_cast<float>(sum);
  if (normalize && (a.weight_sum == 0.0f || !std::isfinite(a.weight_sum))) {
    fail("weights: normalize=True needs a non-zero finite weight sum, got " + std::to_string(sum));
  }
  a.out = reinterpret_cast<void*>(out);
  return a;
}

// ---- Philox, radix histograms, TIES map ----

uint32_t checked_u32(int64_t v, const char* what) {
  if (v < 0 || v > int64_t(0xFFFFFFFFu)) {
    fail(std::string(what) + ": must be in [0, 2^32), got " + std::to_string(v));
  }
  return static_cast<uint32_t>(v);
}

void check_stream_range(int64_t start, int64_t count) {
  if (start < 0) fail("start: first element must be >= 0, got " + std::to_string(start));
  if (count < 0) fail("count: element count must be >= 0, got " + std::to_string(count));
  if (count > std::numeric_limits<int64_t>::max() / 4 - start) {
    fail("start + count: " + std::to_string(start) + " + " + std::to_string(count) + " is too large");
  }
}

// Pointers of k inputs of n elements of `dtype`, none of which may overlap `out` (out_bytes long).
std::vector<const void*> checked_inputs(const std::vector<int64_t>& ptrs, const char* name, DType dtype,
                                        int64_t n, uintptr_t out, int64_t out_bytes, const char* out_name) {
  std::vector<const void*> inputs;
  for (size_t j = 0; j < ptrs.size(); ++j) {
    const std::string what = std::string(name) + "[" + std::to_string(j) + "]";
    const uintptr_t p = checked_pointer(ptrs[j], n, what);
    if (overlaps(p, n * pymerge::dtype_size(dtype), out, out_bytes)) {
      fail(what + ": overlaps " + out_name + "; it must be a separate buffer");
    }
    inputs.push_back(reinterpret_cast<const void*>(p));
  }
  return inputs;
}

struct RadixHistArgs {
  std::vector<const void*> inputs;
  const void* base;
  DType dtype;
  int64_t* hist;
};

RadixHistArgs check_radix_hist(const std::vector<int64_t>& x_ptrs, int dtype, int64_t n, int64_t hist_ptr,
                               int64_t base_ptr) {
  check_count(n);
  if (x_ptrs.empty()) fail("x_ptrs: at least one input is required");
  RadixHistArgs a;
  a.dtype = checked_dtype(dtype, "dtype");
  check_bytes(n, a.dtype, "x");
  const int64_t hist_bytes = int64_t(x_ptrs.size()) * pymerge::radix::kBins * int64_t(sizeof(int64_t));
  const uintptr_t hist = checked_pointer(hist_ptr, 1, "hist_ptr");
  if (hist % alignof(int64_t) != 0) fail("hist_ptr: must be 8-byte aligned (an int64 buffer)");
  a.inputs = checked_inputs(x_ptrs, "x_ptrs", a.dtype, n, hist, hist_bytes, "the histogram buffer");
  a.base = nullptr;  // 0: histogram the inputs themselves
  if (base_ptr != 0) {
    const uintptr_t base = checked_pointer(base_ptr, n, "base_ptr");
    if (overlaps(base, n * pymerge::dtype_size(a.dtype), hist, hist_bytes)) {
      fail("base_ptr: overlaps the histogram buffer; it must be a separate buffer");
    }
    a.base = reinterpret_cast<const void*>(base);
  }
  a.hist = reinterpret_cast<int64_t*>(hist);
  return a;
}

// Per-expert arrays of a TIES call, each one value per expert.
void check_per_expert(size_t k, size_t got, const char* what) {
  if (got != k) {
    fail(std::string(what) + ": got " + std::to_string(got) + " values for " + std::to_string(k) +
         " experts (one per expert)");
  }
}

std::vector<int32_t> checked_thresh_keys(const std::vector<int64_t>& keys) {
  std::vector<int32_t> out;
  for (size_t j = 0; j < keys.size(); ++j) {
    if (keys[j] < pymerge::radix::kKeepAll || keys[j] > pymerge::radix::kKeepNone) {
      fail("thresh_keys[" + std::to_string(j) + "]: must be a magnitude key in [-1, 2^31 - 1], got " +
           std::to_string(keys[j]));
    }
    out.push_back(static_cast<int32_t>(keys[j]));
  }
  return out;
}

struct TieCutoffArgs {
  const void* base;
  std::vector<const void*> experts;
  DType dtype;
  std::vector<int32_t> thresh_keys;
  std::vector<int64_t> tie_budgets;
};

TieCutoffArgs check_tie_cutoffs(int64_t base_ptr, const std::vector<int64_t>& expert_ptrs, int dtype, int64_t n,
                                const std::vector<int64_t>& thresh_keys, const std::vector<int64_t>& tie_budgets) {
  check_count(n);
  const size_t k = expert_ptrs.size();
  if (k == 0) fail("expert_ptrs: at least one expert is required");
  check_per_expert(k, thresh_keys.size(), "thresh_keys");
  check_per_expert(k, tie_budgets.size(), "tie_budgets");
  TieCutoffArgs a;
  a.dtype = checked_dtype(dtype, "dtype");
  check_bytes(n, a.dtype, "inputs");
  a.base = reinterpret_cast<const void*>(checked_pointer(base_ptr, n, "base_ptr"));
  for (size_t j = 0; j < k; ++j) {
    a.experts.push_back(
        reinterpret_cast<const void*>(checked_pointer(expert_ptrs[j], n, "expert_ptrs[" + std::to_string(j) + "]")));
  }
  a.thresh_keys = checked_thresh_keys(thresh_keys);
  for (size_t j = 0; j < k; ++j) {
    const std::string what = "tie_budgets[" + std::to_string(j) + "]";
    if (tie_budgets[j] < -1) {
      fail(what + ": must be >= 0, or -1 to keep every tie, got " + std::to_string(tie_budgets[j]));
    }
    if (tie_budgets[j] > 0 && (a.thresh_keys[j] < 0 || a.thresh_keys[j] == pymerge::radix::kKeepNone)) {
      fail(what + ": a tie budget needs a real threshold key, got key " + std::to_string(a.thresh_keys[j]));
    }
  }
  a.tie_budgets = tie_budgets;
  return a;
}

struct TiesMapArgs {
  const void* base;
  std::vector<const void*> experts;
  DType in_dtype;
  std::vector<float> weights;
  std::vector<int32_t> thresh_keys;
  float lambda;
  void* out;
  DType out_dtype;
};

TiesMapArgs check_ties_map(int64_t base_ptr, const std::vector<int64_t>& expert_ptrs, int in_dtype, int64_t n,
                           const std::vector<double>& weights, const std::vector<int64_t>& thresh_keys,
                           const std::vector<int64_t>& tie_cutoffs, double lambda, int64_t out_ptr,
                           int out_dtype) {
  check_count(n);
  const size_t k = expert_ptrs.size();
  if (k == 0) fail("expert_ptrs: at least one expert is required");
  check_per_expert(k, weights.size(), "weights");
  check_per_expert(k, thresh_keys.size(), "thresh_keys");
  check_per_expert(k, tie_cutoffs.size(), "tie_cutoffs");
  TiesMapArgs a;
  a.in_dtype = checked_dtype(in_dtype, "in_dtype");
  a.out_dtype = checked_dtype(out_dtype, "out_dtype");
  check_bytes(n, a.in_dtype, "inputs");
  check_bytes(n, a.out_dtype, "out");
  const uintptr_t out = checked_pointer(out_ptr, n, "out_ptr");
  const int64_t in_bytes = n * pymerge::dtype_size(a.in_dtype);
  const int64_t out_bytes = n * pymerge::dtype_size(a.out_dtype);
  // Element i of out is written after every input's element i is read, by the thread that read them: out
  // may be exactly one of the inputs (same dtype), never a shifted view of one.
  const auto check_input = [&](int64_t ptr, const std::string& what) {
    const uintptr_t p = checked_pointer(ptr, n, what);
    const bool in_place = p == out && a.in_dtype == a.out_dtype;
    if (!in_place && overlaps(p, in_bytes, out, out_bytes)) {
      fail(what + ": overlaps the output buffer; the output must be separate (or exactly an input of the "
                  "same dtype)");
    }
    return reinterpret_cast<const void*>(p);
  };
  a.base = check_input(base_ptr, "base_ptr");
  for (size_t j = 0; j < k; ++j) {
    const std::string index = "[" + std::to_string(j) + "]";
    a.experts.push_back(check_input(expert_ptrs[j], "expert_ptrs" + index));
    const float w = static_cast<float>(weights[j]);
    if (!std::isfinite(weights[j]) || !std::isfinite(w)) {
      fail("weights" + index + ": must be finite in float32, got " + std::to_string(weights[j]));
    }
    a.weights.push_back(w);
  }
  a.thresh_keys = checked_thresh_keys(thresh_keys);
  a.lambda = static_cast<float>(lambda);
  if (!std::isfinite(lambda) || !std::isfinite(a.lambda)) {
    fail("lambda_: must be finite in float32, got " + std::to_string(lambda));
  }
  a.out = reinterpret_cast<void*>(out);
  return a;
}

struct DareMapArgs {
  const void* base;
  std::vector<const void*> experts;
  std::vector<float> weights, scales, limits;
  std::vector<const float*> probs;
  bool any_probs = false;
  std::vector<uint32_t> models;
  DType in_dtype, out_dtype;
  void* out;
  float lambda, divisor;
  pymerge::Consensus consensus;
};

// The checks of the CPU and CUDA DARE/DELLA maps (the CUDA one adds its input limit); probs[j] is the
// scalar keep probability of expert j, used where prob_ptrs[j] == 0 (else n fp32 probabilities there).
DareMapArgs check_dare_map(int64_t base_ptr, const std::vector<int64_t>& expert_ptrs, int in_dtype, int64_t n,
                           const std::vector<double>& weights, const std::vector<double>& scales,
                           const std::vector<double>& probs, const std::vector<int64_t>& prob_ptrs,
                           const std::vector<int64_t>& model_ids, int64_t start, int consensus, bool normalize,
                           double divisor, double lambda, int64_t out_ptr, int out_dtype, bool has_out = true) {
  check_count(n);
  const size_t k = expert_ptrs.size();
  if (k == 0) fail("expert_ptrs: at least one expert is required");
  check_per_expert(k, weights.size(), "weights");
  check_per_expert(k, scales.size(), "scales");
  check_per_expert(k, probs.size(), "probs");
  check_per_expert(k, prob_ptrs.size(), "prob_ptrs");
  check_per_expert(k, model_ids.size(), "model_ids");
  check_stream_range(start, n);
  if (consensus < 0 || consensus > 2) {
    fail("consensus: expected 0 (none), 1 (sum) or 2 (count), got " + std::to_string(consensus));
  }
  DareMapArgs a;
  a.consensus = static_cast<pymerge::Consensus>(consensus);
  a.in_dtype = checked_dtype(in_dtype, "in_dtype");
  a.out_dtype = checked_dtype(out_dtype, "out_dtype");
  check_bytes(n, a.in_dtype, "inputs");
  check_bytes(n, a.out_dtype, "out");
  // Without an output (the L1-norm pass) out is 0 and 0 bytes long: nothing can overlap it.
  const uintptr_t out = has_out ? checked_pointer(out_ptr, n, "out_ptr") : 0;
  const int64_t in_bytes = n * pymerge::dtype_size(a.in_dtype);
  const int64_t out_bytes = has_out ? n * pymerge::dtype_size(a.out_dtype) : 0;
  const auto check_input = [&](int64_t ptr, const std::string& what) {  // as check_ties_map
    const uintptr_t p = checked_pointer(ptr, n, what);
    const bool in_place = p == out && a.in_dtype == a.out_dtype;
    if (!in_place && overlaps(p, in_bytes, out, out_bytes)) {
      fail(what + ": overlaps the output buffer; the output must be separate (or exactly an input of the "
                  "same dtype)");
    }
    return reinterpret_cast<const void*>(p);
  };
  const auto finite_f32 = [](double v, const std::string& what) {
    const float f = static_cast<float>(v);
    if (!std::isfinite(v) || !std::isfinite(f)) fail(what + ": must be finite in float32, got " + std::to_string(v));
    return f;
  };
  a.base = check_input(base_ptr, "base_ptr");
  for (size_t j = 0; j < k; ++j) {
    const std::string index = "[" + std::to_string(j) + "]";
    a.experts.push_back(check_input(expert_ptrs[j], "expert_ptrs" + index));
    a.weights.push_back(finite_f32(weights[j], "weights" + index));
    a.scales.push_back(finite_f32(scales[j], "scales" + index));
    if (std::isnan(probs[j])) fail("probs" + index + ": must be a probability, got NaN");
    a.limits.push_back(pymerge::philox::keep_limit(static_cast<float>(probs[j])));
    if (prob_ptrs[j] != 0) {
      const uintptr_t p = checked_pointer(prob_ptrs[j], n, "prob_ptrs" + index);
      if (p % alignof(float) != 0) fail("prob_ptrs" + index + ": must be 4-byte aligned (a float32 buffer)");
      if (overlaps(p, n * 4, out, out_bytes)) fail("prob_ptrs" + index + ": overlaps the output buffer");
      a.any_probs = true;
    }
    a.probs.push_back(reinterpret_cast<const float*>(static_cast<uintptr_t>(prob_ptrs[j])));
    a.models.push_back(checked_u32(model_ids[j], ("model_ids" + index).c_str()));
  }
  a.lambda = finite_f32(lambda, "lambda_");
  a.divisor = finite_f32(divisor, "divisor");
  if (normalize && a.consensus == pymerge::Consensus::None && a.divisor == 0.0f) {
    fail("divisor: normalize without consensus needs a non-zero divisor");
  }
  a.out = reinterpret_cast<void*>(out);
  return a;
}

py::dict build_info() {
  py::dict info;
#if defined(PYMERGE_WITH_CUDA)
  info["cuda_compiled"] = true;
  info["cuda_version"] = PYMERGE_CUDA_VERSION;
  py::list archs;
  std::string all = PYMERGE_CUDA_ARCHS;
  size_t start = 0;
  while (start <= all.size()) {
    const size_t comma = all.find(',', start);
    const std::string arch = all.substr(start, comma == std::string::npos ? std::string::npos : comma - start);
    if (!arch.empty()) archs.append(arch);
    if (comma == std::string::npos) break;
    start = comma + 1;
  }
  info["cuda_archs"] = archs;
  info["cuda_max_inputs"] = pymerge::cuda::kMaxInputs;
#else
  info["cuda_compiled"] = false;
  info["cuda_version"] = py::none();
  info["cuda_archs"] = py::list();
  info["cuda_max_inputs"] = py::none();
#endif
#if defined(PYMERGE_WITH_OPENMP)
  info["openmp"] = true;
#else
  info["openmp"] = false;
#endif
  info["omp_max_threads"] = pymerge::cpu::max_threads();
  info["compiler"] = PYMERGE_CXX_COMPILER;
  info["cpu_isa"] = PYMERGE_CPU_ISA;
  py::dict codes;
  codes["float32"] = static_cast<int>(DType::F32);
  codes["float16"] = static_cast<int>(DType::F16);
  codes["bfloat16"] = static_cast<int>(DType::BF16);
  info["dtype_codes"] = codes;
  return info;
}

#if defined(PYMERGE_WITH_CUDA)
void raise_launch_error(const char* op, const char* error) {
  if (error != nullptr) throw std::runtime_error(std::string("pymerge CUDA ") + op + " failed: " + error);
}

pymerge::cuda::Stream to_stream(int64_t stream) {
  if (stream < 0) fail("stream: must be a CUDA stream handle >= 0, got " + std::to_string(stream));
  return reinterpret_cast<pymerge::cuda::Stream>(static_cast<uintptr_t>(stream));
}
#endif

// ==== CUDA merge kernels: radix histograms, tie cutoffs, TIES map, Philox masks, DARE/DELLA map (begin) ====
// Registered by def_cuda_merge_kernels() from the module body. The argument checks are the CPU ones
// (check_radix_hist, check_tie_cutoffs, check_ties_map) plus each kernel's input limit; pointers are device
// pointers and per-expert scalars travel by value.
#if defined(PYMERGE_WITH_CUDA)
void check_cuda_inputs(size_t k, int64_t max_inputs, const char* what, const char* op) {
  if (int64_t(k) > max_inputs) {
    fail(std::string(what) + ": the CUDA " + op + " takes at most " + std::to_string(max_inputs) +
         " inputs, got " + std::to_string(k));
  }
}

void def_cuda_merge_kernels(py::module_& m) {
  m.def(
      "cuda_radix_hist",
      [](const std::vector<int64_t>& x_ptrs, int dtype, int64_t n, const std::vector<int64_t>& hi_bins,
         int64_t hist_ptr, int64_t base_ptr, int64_t stream) {
        check_cuda_inputs(x_ptrs.size(), pymerge::cuda::kMaxInputs, "x_ptrs", "radix histogram");
        const RadixHistArgs a = check_radix_hist(x_ptrs, dtype, n, hist_ptr, base_ptr);
        std::vector<int32_t> bins;  // empty: the hi pass
        if (!hi_bins.empty()) {
          if (hi_bins.size() != x_ptrs.size()) {
            fail("hi_bins: got " + std::to_string(hi_bins.size()) + " bins for " + std::to_string(x_ptrs.size()) +
                 " inputs (one per input, or none for the hi pass)");
          }
          for (size_t j = 0; j < hi_bins.size(); ++j) {
            if (hi_bins[j] < 0 || hi_bins[j] >= pymerge::radix::kBins) {
              fail("hi_bins[" + std::to_string(j) + "]: must be in [0, 65536), got " + std::to_string(hi_bins[j]));
            }
            bins.push_back(static_cast<int32_t>(hi_bins[j]));
          }
        }
        const pymerge::cuda::Stream s = to_stream(stream);
        const char* error = nullptr;
        {
          py::gil_scoped_release release;
          error = pymerge::cuda::radix_hist(a.inputs.data(), int64_t(a.inputs.size()), a.base, a.dtype, n,
                                            bins.empty() ? nullptr : bins.data(), a.hist, s);
        }
        raise_launch_error("radix_hist", error);
      },
      py::arg("x_ptrs"), py::arg("dtype"), py::arg("n"), py::arg("hi_bins"), py::arg("hist_ptr"),
      py::arg("base_ptr"), py::arg("stream"),
      "As radix_hist_hi (hi_bins empty) / radix_hist_lo, enqueued on `stream` (device memory).");

  m.def(
      "cuda_tie_cutoffs_scratch_bytes",
      [](int64_t n, int64_t k) {
        check_count(n);
        if (k < 1) fail("k: must be >= 1, got " + std::to_string(k));
        return pymerge::cuda::tie_cutoffs_scratch_bytes(n, k);
      },
      py::arg("n"), py::arg("k"), "Device scratch bytes cuda_tie_cutoffs needs for n elements and k experts.");

  m.def(
      "cuda_tie_cutoffs",
      [](int64_t base_ptr, const std::vector<int64_t>& expert_ptrs, int dtype, int64_t n,
         const std::vector<int64_t>& thresh_keys, const std::vector<int64_t>& tie_budgets, int64_t scratch_ptr,
         int64_t scratch_bytes, int64_t stream) {
        check_cuda_inputs(expert_ptrs.size(), pymerge::cuda::kMaxInputs, "expert_ptrs", "tie cutoffs");
        TieCutoffArgs a = check_tie_cutoffs(base_ptr, expert_ptrs, dtype, n, thresh_keys, tie_budgets);
        if (scratch_ptr < 0 || scratch_ptr % 8 != 0) fail("scratch_ptr: must be an 8-byte aligned device address");
        const pymerge::cuda::Stream s = to_stream(stream);
        std::vector<int64_t> cutoffs(a.experts.size(), 0);
        const char* error = nullptr;
        {
          py::gil_scoped_release release;
          error = pymerge::cuda::tie_cutoffs(a.base, a.experts.data(), int64_t(a.experts.size()), a.dtype, n,
                                             a.thresh_keys.data(), a.tie_budgets.data(), cutoffs.data(),
                                             reinterpret_cast<void*>(static_cast<uintptr_t>(scratch_ptr)),
                                             scratch_bytes, s);
        }
        raise_launch_error("tie_cutoffs", error);
        return py::make_tuple(cutoffs, a.tie_budgets);
      },
      py::arg("base_ptr"), py::arg("expert_ptrs"), py::arg("dtype"), py::arg("n"), py::arg("thresh_keys"),
      py::arg("tie_budgets"), py::arg("scratch_ptr"), py::arg("scratch_bytes"), py::arg("stream"),
      "As tie_cutoffs (device inputs); waits for `stream` and returns (cutoffs, budgets left).");

  m.def(
      "cuda_ties_map",
      [](int64_t base_ptr, const std::vector<int64_t>& expert_ptrs, int in_dtype, int64_t n,
         const std::vector<double>& weights, const std::vector<int64_t>& thresh_keys,
         const std::vector<int64_t>& tie_cutoffs, double lambda, bool normalize, int64_t out_ptr, int out_dtype,
         bool consensus, int64_t stream) {
        check_cuda_inputs(expert_ptrs.size(), pymerge::cuda::kMaxInputs, "expert_ptrs", "TIES map");
        const TiesMapArgs a = check_ties_map(base_ptr, expert_ptrs, in_dtype, n, weights, thresh_keys,
                                             tie_cutoffs, lambda, out_ptr, out_dtype);
        const pymerge::cuda::Stream s = to_stream(stream);
        const char* error = nullptr;
        {
          py::gil_scoped_release release;
          error = pymerge::cuda::ties_map(a.base, a.experts.data(), int64_t(a.experts.size()), a.in_dtype, n,
                                          a.weights.data(), a.thresh_keys.data(), tie_cutoffs.data(), a.lambda,
                                          normalize, consensus, a.out, a.out_dtype, s);
        }
        raise_launch_error("ties_map", error);
      },
      py::arg("base_ptr"), py::arg("expert_ptrs"), py::arg("in_dtype"), py::arg("n"), py::arg("weights"),
      py::arg("thresh_keys"), py::arg("tie_cutoffs"), py::arg("lambda_"), py::arg("normalize"),
      py::arg("out_ptr"), py::arg("out_dtype"), py::arg("consensus"), py::arg("stream"),
      "As ties_map, enqueued on `stream` (device memory); bit-identical to the CPU kernel.");

  m.def(
      "cuda_philox_uniform24",
      [](uint64_t seed, int64_t model, int64_t name_hash, int64_t start, int64_t count, int64_t out_ptr,
         int64_t stream) {
        const uint32_t mdl = checked_u32(model, "model");
        const uint32_t hash = checked_u32(name_hash, "name_hash");
        check_stream_range(start, count);
        auto* out = reinterpret_cast<uint32_t*>(checked_pointer(out_ptr, count, "out_ptr"));
        const pymerge::cuda::Stream s = to_stream(stream);
        const char* error = nullptr;
        {
          py::gil_scoped_release release;
          error = pymerge::cuda::philox_uniform24(seed, mdl, hash, start, count, out, s);
        }
        raise_launch_error("philox_uniform24", error);
      },
      py::arg("seed"), py::arg("model"), py::arg("name_hash"), py::arg("start"), py::arg("count"),
      py::arg("out_ptr"), py::arg("stream"), "As philox_uniform24, enqueued on `stream` (device memory).");

  m.def(
      "cuda_philox_keep_mask",
      [](uint64_t seed, int64_t model, int64_t name_hash, int64_t start, int64_t count, double prob,
         int64_t probs_ptr, int64_t out_ptr, int64_t stream) {
        const uint32_t mdl = checked_u32(model, "model");
        const uint32_t hash = checked_u32(name_hash, "name_hash");
        check_stream_range(start, count);
        if (std::isnan(prob)) fail("prob: must be a probability, got NaN");
        if (probs_ptr < 0 || probs_ptr % 4 != 0) fail("probs_ptr: must be 0 or a 4-byte aligned device address");
        auto* out = reinterpret_cast<uint8_t*>(checked_pointer(out_ptr, count, "out_ptr"));
        const auto* probs = reinterpret_cast<const float*>(static_cast<uintptr_t>(probs_ptr));
        const pymerge::cuda::Stream s = to_stream(stream);
        const char* error = nullptr;
        {
          py::gil_scoped_release release;
          error = pymerge::cuda::philox_keep_mask(seed, mdl, hash, start, count, static_cast<float>(prob), probs,
                                                  out, s);
        }
        raise_launch_error("philox_keep_mask", error);
      },
      py::arg("seed"), py::arg("model"), py::arg("name_hash"), py::arg("start"), py::arg("count"),
      py::arg("prob"), py::arg("probs_ptr"), py::arg("out_ptr"), py::arg("stream"),
      "As philox_keep_mask (probs_ptr != 0: per-element fp32 probabilities), enqueued on `stream`.");

  m.def(
      "cuda_dare_map",
      [](int64_t base_ptr, const std::vector<int64_t>& expert_ptrs, int in_dtype, int64_t n,
         const std::vector<double>& weights, const std::vector<double>& scales, const std::vector<double>& probs,
         const std::vector<int64_t>& prob_ptrs, uint64_t seed, const std::vector<int64_t>& model_ids,
         int64_t name_hash, int64_t start, int consensus, bool normalize, double divisor, double lambda,
         int64_t out_ptr, int out_dtype, int64_t stream) {
        check_cuda_inputs(expert_ptrs.size(), pymerge::cuda::kMaxDareInputs, "expert_ptrs", "DARE map");
        const DareMapArgs a = check_dare_map(base_ptr, expert_ptrs, in_dtype, n, weights, scales, probs, prob_ptrs,
                                             model_ids, start, consensus, normalize, divisor, lambda, out_ptr,
                                             out_dtype);
        const uint32_t hash = checked_u32(name_hash, "name_hash");
        const pymerge::cuda::Stream s = to_stream(stream);
        const char* error = nullptr;
        {
          py::gil_scoped_release release;
          error = pymerge::cuda::dare_map(a.base, a.experts.data(), int64_t(a.experts.size()), a.in_dtype, n,
                                          a.weights.data(), a.scales.data(), a.limits.data(),
                                          a.any_probs ? a.probs.data() : nullptr, seed, a.models.data(), hash,
                                          start, a.consensus, normalize, a.divisor, a.lambda, a.out, a.out_dtype,
                                          s);
        }
        raise_launch_error("dare_map", error);
      },
      py::arg("base_ptr"), py::arg("expert_ptrs"), py::arg("in_dtype"), py::arg("n"), py::arg("weights"),
      py::arg("scales"), py::arg("probs"), py::arg("prob_ptrs"), py::arg("seed"), py::arg("model_ids"),
      py::arg("name_hash"), py::arg("start"), py::arg("consensus"), py::arg("normalize"), py::arg("divisor"),
      py::arg("lambda_"), py::arg("out_ptr"), py::arg("out_dtype"), py::arg("stream"),
      "DARE/DELLA map (formula in cuda_kernels.h), enqueued on `stream` (device memory).");
}
#endif
// ==== CUDA merge kernels (end) ====

}  // namespace

// Whether this CPU (and its OS, which must save the wider registers) runs code built for the x86-64
// microarchitecture level `level` (1..4); false on other architectures. Asked of the default module before a
// level module is imported, since importing one on a CPU without its instructions could crash the process.
static bool cpu_supports_level(int level) {
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 12
  __builtin_cpu_init();  // GCC 12+ knows the levels by name (every feature the -march level assumes)
  switch (level) {
    case 1: return true;
    case 2: return __builtin_cpu_supports("x86-64-v2");
    case 3: return __builtin_cpu_supports("x86-64-v3");
    case 4: return __builtin_cpu_supports("x86-64-v4");
    default: return false;
  }
#elif defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  // Older compilers: the features that set the levels apart (every CPU with these has the rest of its level).
  __builtin_cpu_init();
  if (level <= 1) return true;
  const bool v2 = __builtin_cpu_supports("popcnt") && __builtin_cpu_supports("sse4.2") &&
                  __builtin_cpu_supports("ssse3");
  if (level == 2) return v2;
  const bool v3 = v2 && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                  __builtin_cpu_supports("bmi") && __builtin_cpu_supports("bmi2") &&
                  __builtin_cpu_supports("avx");
  if (level == 3) return v3;
  return level == 4 && v3 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512cd") && __builtin_cpu_supports("avx512dq") &&
         __builtin_cpu_supports("avx512vl");
#else
  (void)level;
  return false;
#endif
}

PYBIND11_MODULE(PYMERGE_MODULE_NAME, m) {
  m.doc() = "pymerge native kernels (C++17 CPU, optional CUDA). Raw pointers + dtype codes; see pymerge.ops.";
  m.attr("DTYPE_F32") = static_cast<int>(DType::F32);
  m.attr("DTYPE_F16") = static_cast<int>(DType::F16);
  m.attr("DTYPE_BF16") = static_cast<int>(DType::BF16);
  m.attr("PARALLEL_BLOCK") = pymerge::cpu::kParallelBlock;

  m.def("build_info", &build_info,
        "How this extension was built: cuda_compiled, cuda_version, cuda_archs, cuda_max_inputs, openmp, "
        "omp_max_threads, compiler, cpu_isa, dtype_codes.");
  m.def("cpu_supports_level", &cpu_supports_level, py::arg("level"),
        "Whether this CPU runs code built for x86-64 microarchitecture level `level` (1-4); False elsewhere.");

  m.def(
      "cast",
      [](int64_t src_ptr, int src_dtype, int64_t dst_ptr, int dst_dtype, int64_t n) {
        const CastArgs a = check_cast(src_ptr, src_dtype, dst_ptr, dst_dtype, n);
        py::gil_scoped_release release;
        pymerge::cpu::cast(a.src, a.src_dtype, a.dst, a.dst_dtype, n);
      },
      py::arg("src_ptr"), py::arg("src_dtype"), py::arg("dst_ptr"), py::arg("dst_dtype"), py::arg("n"),
      "dst[i] = dst_dtype(src[i]) for i < n, round to nearest even (CPU memory).");

  m.def(
      "weighted_sum",
      [](const std::vector<int64_t>& input_ptrs, int in_dtype, const std::vector<double>& weights,
         int64_t out_ptr, int out_dtype, int64_t n, bool normalize) {
        const WeightedSumArgs a =
            check_weighted_sum(input_ptrs, in_dtype, weights, out_ptr, out_dtype, n, normalize);
        py::gil_scoped_release release;
        pymerge::cpu::weighted_sum(a.inputs.data(), a.weights.data(), int64_t(a.inputs.size()), a.in_dtype,
                                   a.out, a.out_dtype, n, normalize, a.weight_sum);
      },
      py::arg("input_ptrs"), py::arg("in_dtype"), py::arg("weights"), py::arg("out_ptr"), py::arg("out_dtype"),
      py::arg("n"), py::arg("normalize"),
      "out[i] = out_dtype(sum_j w[j] * x_j[i] [/ sum_j w[j]]), fp32 math in input order (CPU memory).");

  m.def(
      "philox4x32_10",
      [](const std::vector<int64_t>& counter, const std::vector<int64_t>& key) {
        if (counter.size() != 4) fail("counter: expected 4 words, got " + std::to_string(counter.size()));
        if (key.size() != 2) fail("key: expected 2 words, got " + std::to_string(key.size()));
        const pymerge::philox::Words w = pymerge::philox::philox4x32_10(
            {checked_u32(counter[0], "counter[0]"), checked_u32(counter[1], "counter[1]"),
             checked_u32(counter[2], "counter[2]"), checked_u32(counter[3], "counter[3]")},
            checked_u32(key[0], "key[0]"), checked_u32(key[1], "key[1]"));
        return std::vector<int64_t>{w.x0, w.x1, w.x2, w.x3};
      },
      py::arg("counter"), py::arg("key"),
      "The four output words of Philox4x32-10 for one counter (4 words) and key (2 words).");

  m.def(
      "philox_uniform24",
      [](uint64_t seed, int64_t model, int64_t name_hash, int64_t start, int64_t count, int64_t out_ptr) {
        const uint32_t mdl = checked_u32(model, "model");
        const uint32_t hash = checked_u32(name_hash, "name_hash");
        check_stream_range(start, count);
        auto* out = reinterpret_cast<uint32_t*>(checked_pointer(out_ptr, count, "out_ptr"));
        py::gil_scoped_release release;
        pymerge::cpu::philox_uniform24(seed, mdl, hash, start, count, out);
      },
      py::arg("seed"), py::arg("model"), py::arg("name_hash"), py::arg("start"), py::arg("count"),
      py::arg("out_ptr"),
      "out[i] = Philox word of element start + i >> 8 (uint32 buffer of count elements, CPU memory).");

  m.def(
      "philox_keep_mask",
      [](uint64_t seed, int64_t model, int64_t name_hash, int64_t start, int64_t count, double prob,
         int64_t out_ptr) {
        const uint32_t mdl = checked_u32(model, "model");
        const uint32_t hash = checked_u32(name_hash, "name_hash");
        check_stream_range(start, count);
        if (std::isnan(prob)) fail("prob: must be a probability, got NaN");
        auto* out = reinterpret_cast<uint8_t*>(checked_pointer(out_ptr, count, "out_ptr"));
        py::gil_scoped_release release;
        pymerge::cpu::philox_keep_mask(seed, mdl, hash, start, count, static_cast<float>(prob), out);
      },
      py::arg("seed"), py::arg("model"), py::arg("name_hash"), py::arg("start"), py::arg("count"),
      py::arg("prob"), py::arg("out_ptr"),
      "out[i] = 1 if float(word >> 8) < float32(prob) * 2^24 else 0 (uint8 buffer, CPU memory).");

  m.def(
      "count_nonfinite",
      [](const std::vector<int64_t>& x_ptrs, int dtype, int64_t n) {
        check_count(n);
        if (x_ptrs.empty()) fail("x_ptrs: at least one input is required");
        const DType d = checked_dtype(dtype, "dtype");
        check_bytes(n, d, "inputs");
        const std::vector<const void*> xs = checked_inputs(x_ptrs, "x_ptrs", d, n, 0, 0, "nothing");
        std::vector<int64_t> counts(x_ptrs.size(), 0);
        {
          py::gil_scoped_release release;
          pymerge::cpu::count_nonfinite(xs.data(), int64_t(xs.size()), d, n, counts.data());
        }
        return counts;
      },
      py::arg("x_ptrs"), py::arg("dtype"), py::arg("n"),
      "Per input, the number of Inf/NaN elements among its n stored elements (exponent bits all ones).");

  m.def(
      "radix_hist_hi",
      [](const std::vector<int64_t>& x_ptrs, int dtype, int64_t n, int64_t hist_ptr, int64_t base_ptr,
         int sample_shift) {
        const RadixHistArgs a = check_radix_hist(x_ptrs, dtype, n, hist_ptr, base_ptr);
        if (sample_shift < 0 || sample_shift > 15) {
          fail("sample_shift: must be in [0, 16), got " + std::to_string(sample_shift));
        }
        py::gil_scoped_release release;
        pymerge::cpu::radix_hist(a.inputs.data(), int64_t(a.inputs.size()), a.base, a.dtype, n, nullptr,
                                 a.hist, sample_shift);
      },
      py::arg("x_ptrs"), py::arg("dtype"), py::arg("n"), py::arg("hist_ptr"), py::arg("base_ptr") = 0,
      py::arg("sample_shift") = 0,
      "hist[j, key >> 16] += 1 for key = fp32 bits of |x_j[i] (- base[i])| (int64 [len(x_ptrs), 65536]); with "
      "sample_shift s only the first len >> s elements of every 65,536-element block.");

  m.def(
      "radix_bracket",
      [](const std::vector<int64_t>& x_ptrs, int dtype, int64_t n, const std::vector<int64_t>& lo_keys,
         const std::vector<int64_t>& hi_keys, const std::vector<int64_t>& out_ptrs,
         const std::vector<int64_t>& capacities, const std::vector<int64_t>& filled, int64_t base_ptr,
         const std::vector<int64_t>& span_ptrs) {
        const size_t k = x_ptrs.size();
        if (k == 0) fail("x_ptrs: at least one input is required");
        if (!span_ptrs.empty()) check_per_expert(k, span_ptrs.size(), "span_ptrs");
        check_per_expert(k, lo_keys.size(), "lo_keys");
        check_per_expert(k, hi_keys.size(), "hi_keys");
        check_per_expert(k, out_ptrs.size(), "out_ptrs");
        check_per_expert(k, capacities.size(), "capacities");
        check_per_expert(k, filled.size(), "filled");
        check_count(n);
        const DType d = checked_dtype(dtype, "dtype");
        check_bytes(n, d, "x");
        std::vector<uint32_t> los, his;
        std::vector<int32_t*> outs;
        std::vector<int64_t> fills(filled);
        for (size_t j = 0; j < k; ++j) {
          const std::string at = "[" + std::to_string(j) + "]";
          if (lo_keys[j] < 0 || lo_keys[j] > hi_keys[j] || hi_keys[j] > (int64_t(1) << 31)) {
            fail("lo_keys" + at + ", hi_keys" + at + ": need 0 <= lo <= hi <= 2^31, got " +
                 std::to_string(lo_keys[j]) + ", " + std::to_string(hi_keys[j]));
          }
          if (capacities[j] < 0) fail("capacities" + at + ": must be >= 0");
          if (filled[j] < 0) fail("filled" + at + ": must be >= 0");
          los.push_back(uint32_t(lo_keys[j]));
          his.push_back(uint32_t(hi_keys[j]));
          const uintptr_t o = checked_pointer(out_ptrs[j], capacities[j], "out_ptrs" + at);
          if (o % alignof(int32_t) != 0) fail("out_ptrs" + at + ": must be 4-byte aligned (an int32 buffer)");
          outs.push_back(reinterpret_cast<int32_t*>(o));
        }
        std::vector<const void*> inputs;
        for (size_t j = 0; j < k; ++j) {
          const std::string what = "x_ptrs[" + std::to_string(j) + "]";
          const uintptr_t p = checked_pointer(x_ptrs[j], n, what);
          for (size_t i = 0; i < k; ++i) {
            if (overlaps(p, n * pymerge::dtype_size(d), uintptr_t(outs[i]), capacities[i] * 4)) {
              fail(what + ": overlaps out_ptrs[" + std::to_string(i) + "]; they must be separate buffers");
            }
          }
          inputs.push_back(reinterpret_cast<const void*>(p));
        }
        for (size_t i = 0; i < k; ++i) {
          for (size_t j = i + 1; j < k; ++j) {
            if (overlaps(uintptr_t(outs[i]), capacities[i] * 4, uintptr_t(outs[j]), capacities[j] * 4)) {
              fail("out_ptrs[" + std::to_string(i) + "], out_ptrs[" + std::to_string(j) + "]: overlap");
            }
          }
        }
        const void* base = nullptr;
        if (base_ptr != 0) {
          const uintptr_t b = checked_pointer(base_ptr, n, "base_ptr");
          for (size_t i = 0; i < k; ++i) {
            if (overlaps(b, n * pymerge::dtype_size(d), uintptr_t(outs[i]), capacities[i] * 4)) {
              fail("base_ptr: overlaps out_ptrs[" + std::to_string(i) + "]; they must be separate buffers");
            }
          }
          base = reinterpret_cast<const void*>(b);
        }
        // one (start, count) int64 pair per block of kParallelBlock elements, for each selection
        std::vector<int64_t*> spans;
        const int64_t num_blocks = (n + pymerge::cpu::kParallelBlock - 1) / pymerge::cpu::kParallelBlock;
        for (size_t j = 0; j < span_ptrs.size(); ++j) {
          const std::string what = "span_ptrs[" + std::to_string(j) + "]";
          const uintptr_t p = checked_pointer(span_ptrs[j], 2 * num_blocks, what);
          if (p % alignof(int64_t) != 0) fail(what + ": must be 8-byte aligned (an int64 buffer)");
          for (size_t i = 0; i < k; ++i) {
            if (overlaps(p, int64_t(2 * num_blocks) * 8, uintptr_t(outs[i]), capacities[i] * 4)) {
              fail(what + ": overlaps out_ptrs[" + std::to_string(i) + "]; they must be separate buffers");
            }
          }
          for (size_t i = 0; i < j; ++i) {
            if (overlaps(p, int64_t(2 * num_blocks) * 8, uintptr_t(spans[i]), int64_t(2 * num_blocks) * 8)) {
              fail(what + ": overlaps span_ptrs[" + std::to_string(i) + "]");
            }
          }
          spans.push_back(reinterpret_cast<int64_t*>(p));
        }
        std::vector<int64_t> above(k, 0), nonfinite(k, 0);
        {
          py::gil_scoped_release release;
          pymerge::cpu::radix_bracket(inputs.data(), int64_t(k), base, d, n, los.data(), his.data(), outs.data(),
                                      capacities.data(), fills.data(), above.data(), nonfinite.data(),
                                      spans.empty() ? nullptr : spans.data());
        }
        return py::make_tuple(fills, above, nonfinite);
      },
      py::arg("x_ptrs"), py::arg("dtype"), py::arg("n"), py::arg("lo_keys"), py::arg("hi_keys"), py::arg("out_ptrs"),
      py::arg("capacities"), py::arg("filled"), py::arg("base_ptr") = 0, py::arg("span_ptrs") = std::vector<int64_t>{},
      "Bracket pass of the sampled top-k (cpu_kernels.h): appends the keys in [lo_keys[j], hi_keys[j]) to the "
      "int32 buffers; returns (filled, above, nonfinite) per input (filled > capacity: overflowed). span_ptrs: "
      "optional int64 buffers of 2 * ceil(n / PARALLEL_BLOCK), receiving each block's (start, count) in out.");

  m.def(
      "radix_hist_lo",
      [](const std::vector<int64_t>& x_ptrs, int dtype, int64_t n, const std::vector<int64_t>& hi_bins,
         int64_t hist_ptr, int64_t base_ptr) {
        const RadixHistArgs a = check_radix_hist(x_ptrs, dtype, n, hist_ptr, base_ptr);
        if (hi_bins.size() != x_ptrs.size()) {
          fail("hi_bins: got " + std::to_string(hi_bins.size()) + " bins for " + std::to_string(x_ptrs.size()) +
               " inputs (one per input)");
        }
        std::vector<int32_t> bins;
        for (size_t j = 0; j < hi_bins.size(); ++j) {
          if (hi_bins[j] < 0 || hi_bins[j] >= pymerge::radix::kBins) {
            fail("hi_bins[" + std::to_string(j) + "]: must be in [0, 65536), got " + std::to_string(hi_bins[j]));
          }
          bins.push_back(static_cast<int32_t>(hi_bins[j]));
        }
        py::gil_scoped_release release;
        pymerge::cpu::radix_hist(a.inputs.data(), int64_t(a.inputs.size()), a.base, a.dtype, n, bins.data(),
                                 a.hist);
      },
      py::arg("x_ptrs"), py::arg("dtype"), py::arg("n"), py::arg("hi_bins"), py::arg("hist_ptr"),
      py::arg("base_ptr") = 0,
      "hist[j, key & 0xFFFF] += 1 for the keys with key >> 16 == hi_bins[j] (int64 [len(x_ptrs), 65536]).");

  m.def(
      "tie_cutoffs",
      [](int64_t base_ptr, const std::vector<int64_t>& expert_ptrs, int dtype, int64_t n,
         const std::vector<int64_t>& thresh_keys, const std::vector<int64_t>& tie_budgets) {
        TieCutoffArgs a = check_tie_cutoffs(base_ptr, expert_ptrs, dtype, n, thresh_keys, tie_budgets);
        std::vector<int64_t> cutoffs(a.experts.size(), 0);
        {
          py::gil_scoped_release release;
          pymerge::cpu::tie_cutoffs(a.base, a.experts.data(), int64_t(a.experts.size()), a.dtype, n,
                                    a.thresh_keys.data(), a.tie_budgets.data(), cutoffs.data());
        }
        return py::make_tuple(cutoffs, a.tie_budgets);
      },
      py::arg("base_ptr"), py::arg("expert_ptrs"), py::arg("dtype"), py::arg("n"), py::arg("thresh_keys"),
      py::arg("tie_budgets"),
      "(cutoffs, budgets left): the flat index of each expert's budget-th threshold tie (-1: none kept, n: all "
      "of them), and what a following chunk may still keep (contract in cpu_kernels.h).");

  m.def(
      "ties_map",
      [](int64_t base_ptr, const std::vector<int64_t>& expert_ptrs, int in_dtype, int64_t n,
         const std::vector<double>& weights, const std::vector<int64_t>& thresh_keys,
         const std::vector<int64_t>& tie_cutoffs, double lambda, bool normalize, int64_t out_ptr,
         int out_dtype, bool consensus, const std::vector<int64_t>& inner_keys,
         const std::vector<int64_t>& inner_cutoffs) {
        const TiesMapArgs a = check_ties_map(base_ptr, expert_ptrs, in_dtype, n, weights, thresh_keys,
                                             tie_cutoffs, lambda, out_ptr, out_dtype);
        std::vector<int32_t> inner;  // empty: no band
        if (!inner_keys.empty() || !inner_cutoffs.empty()) {
          check_per_expert(a.experts.size(), inner_keys.size(), "inner_keys");
          check_per_expert(a.experts.size(), inner_cutoffs.size(), "inner_cutoffs");
          inner = checked_thresh_keys(inner_keys);
        }
        py::gil_scoped_release release;
        pymerge::cpu::ties_map(a.base, a.experts.data(), int64_t(a.experts.size()), a.in_dtype, n,
                               a.weights.data(), a.thresh_keys.data(), tie_cutoffs.data(), a.lambda, normalize,
                               consensus, a.out, a.out_dtype, inner.empty() ? nullptr : inner.data(),
                               inner.empty() ? nullptr : inner_cutoffs.data());
      },
      py::arg("base_ptr"), py::arg("expert_ptrs"), py::arg("in_dtype"), py::arg("n"), py::arg("weights"),
      py::arg("thresh_keys"), py::arg("tie_cutoffs"), py::arg("lambda_"), py::arg("normalize"),
      py::arg("out_ptr"), py::arg("out_dtype"), py::arg("consensus") = true,
      py::arg("inner_keys") = std::vector<int64_t>{}, py::arg("inner_cutoffs") = std::vector<int64_t>{},
      "TIES trim/elect/disjoint-mean map (formula in cpu_kernels.h): keeps key > T, and key == T at flat "
      "index <= the expert's tie cutoff.");

  m.def(
      "dare_map",
      [](int64_t base_ptr, const std::vector<int64_t>& expert_ptrs, int in_dtype, int64_t n,
         const std::vector<double>& weights, const std::vector<double>& scales, const std::vector<double>& probs,
         const std::vector<int64_t>& prob_ptrs, uint64_t seed, const std::vector<int64_t>& model_ids,
         int64_t name_hash, int64_t start, int consensus, bool normalize, double divisor, double lambda,
         int64_t out_ptr, int out_dtype, const std::vector<int64_t>& keep_bits_ptrs) {
        const DareMapArgs a = check_dare_map(base_ptr, expert_ptrs, in_dtype, n, weights, scales, probs, prob_ptrs,
                                             model_ids, start, consensus, normalize, divisor, lambda, out_ptr,
                                             out_dtype);
        std::vector<uintptr_t> outs{reinterpret_cast<uintptr_t>(a.out)};
        const int64_t out_bytes = n * pymerge::dtype_size(a.out_dtype);
        std::vector<uint8_t*> bits = checked_bits(keep_bits_ptrs, a.experts.size(), (n + 7) / 8, outs, out_bytes);
        std::vector<const uint8_t*> keep_bits(bits.begin(), bits.end());
        const uint32_t hash = checked_u32(name_hash, "name_hash");
        py::gil_scoped_release release;
        pymerge::cpu::dare_map(a.base, a.experts.data(), int64_t(a.experts.size()), a.in_dtype, n, a.weights.data(),
                               a.scales.data(), a.limits.data(), a.any_probs ? a.probs.data() : nullptr, seed,
                               a.models.data(), hash, start, a.consensus, normalize, a.divisor, a.lambda, a.out,
                               a.out_dtype, keep_bits.empty() ? nullptr : keep_bits.data());
      },
      py::arg("base_ptr"), py::arg("expert_ptrs"), py::arg("in_dtype"), py::arg("n"), py::arg("weights"),
      py::arg("scales"), py::arg("probs"), py::arg("prob_ptrs"), py::arg("seed"), py::arg("model_ids"),
      py::arg("name_hash"), py::arg("start"), py::arg("consensus"), py::arg("normalize"), py::arg("divisor"),
      py::arg("lambda_"), py::arg("out_ptr"), py::arg("out_dtype"), py::arg("keep_bits_ptrs") = std::vector<int64_t>{},
      "DARE/DELLA map (formula in cpu_kernels.h): Philox masks (or the L1 pass's mask bits), rescale, weights, "
      "election, base (CPU memory).");

  m.def(
      "dare_l1_rows",
      [](int64_t base_ptr, const std::vector<int64_t>& expert_ptrs, int dtype, int64_t rows, int64_t cols,
         const std::vector<double>& probs, const std::vector<int64_t>& prob_ptrs, uint64_t seed,
         const std::vector<int64_t>& model_ids, int64_t name_hash, int64_t start, int64_t out_ptr,
         const std::vector<int64_t>& keep_bits_ptrs) {
        const int64_t n = checked_matrix(rows, cols);
        const size_t k = expert_ptrs.size();
        // The map's checks with no output: weights and scales do not enter the norms.
        const DareMapArgs a = check_dare_map(base_ptr, expert_ptrs, dtype, n, std::vector<double>(k, 1.0),
                                             std::vector<double>(k, 1.0), probs, prob_ptrs, model_ids, start,
                                             0, false, 1.0, 1.0, 0, int(DType::F32), /*has_out=*/false);
        if (k > 0 && rows > std::numeric_limits<int64_t>::max() / int64_t(2 * k * sizeof(double))) {
          fail("out: k * rows norms are too many");
        }
        const int64_t out_bytes = rows * int64_t(2 * k * sizeof(double));
        const uintptr_t out = checked_pointer(out_ptr, rows * int64_t(2 * k), "out_ptr");
        if (out % alignof(double) != 0) fail("out_ptr: must be 8-byte aligned (a float64 buffer)");
        const int64_t in_bytes = n * pymerge::dtype_size(a.in_dtype);
        if (overlaps(reinterpret_cast<uintptr_t>(a.base), in_bytes, out, out_bytes)) fail("out_ptr: overlaps base");
        for (size_t j = 0; j < k; ++j) {
          if (overlaps(reinterpret_cast<uintptr_t>(a.experts[j]), in_bytes, out, out_bytes)) {
            fail("out_ptr: overlaps expert_ptrs[" + std::to_string(j) + "]");
          }
        }
        if (!keep_bits_ptrs.empty() && cols % 8 != 0) {
          fail("keep_bits_ptrs: mask bits need whole bytes per row (cols % 8 == 0), got cols = " +
               std::to_string(cols));
        }
        std::vector<uintptr_t> inputs{reinterpret_cast<uintptr_t>(a.base)};
        for (const void* e : a.experts) inputs.push_back(reinterpret_cast<uintptr_t>(e));
        std::vector<uint8_t*> bits = checked_bits(keep_bits_ptrs, k, n / 8, inputs, in_bytes);
        for (uint8_t* b : bits) {
          if (overlaps(uintptr_t(b), b != nullptr ? n / 8 : 0, out, out_bytes)) {
            fail("keep_bits_ptrs: overlaps out_ptr");
          }
        }
        const uint32_t hash = checked_u32(name_hash, "name_hash");
        py::gil_scoped_release release;
        pymerge::cpu::dare_l1_rows(a.base, a.experts.data(), int64_t(k), a.in_dtype, rows, cols, start, seed,
                                   a.models.data(), hash, a.limits.data(), a.any_probs ? a.probs.data() : nullptr,
                                   reinterpret_cast<double*>(out), bits.empty() ? nullptr : bits.data());
      },
      py::arg("base_ptr"), py::arg("expert_ptrs"), py::arg("dtype"), py::arg("rows"), py::arg("cols"),
      py::arg("probs"), py::arg("prob_ptrs"), py::arg("seed"), py::arg("model_ids"), py::arg("name_hash"),
      py::arg("start"), py::arg("out_ptr"), py::arg("keep_bits_ptrs") = std::vector<int64_t>{},
      "Per expert and row: (sum |t|, sum |t| * keep) in fp64, in eight interleaved lanes (formula in cpu_kernels.h).");

  m.def(
      "della_probs",
      [](int64_t base_ptr, int64_t x_ptr, int dtype, int64_t rows, int64_t cols, double low, double span,
         int64_t out_ptr) {
        if (cols > int64_t(UINT32_MAX)) fail("cols: a row of more than 2^32 - 1 elements cannot be ranked");
        const int64_t n = checked_matrix(rows, cols);
        const DType d = checked_dtype(dtype, "dtype");
        check_bytes(n, d, "inputs");
        const uintptr_t base = checked_pointer(base_ptr, n, "base_ptr");
        const uintptr_t x = checked_pointer(x_ptr, n, "x_ptr");
        const uintptr_t out = checked_pointer(out_ptr, n, "out_ptr");
        if (out % alignof(float) != 0) fail("out_ptr: must be 4-byte aligned (a float32 buffer)");
        const int64_t in_bytes = n * pymerge::dtype_size(d);
        if (overlaps(base, in_bytes, out, n * 4) || overlaps(x, in_bytes, out, n * 4)) {
          fail("out_ptr: overlaps an input; the probabilities need their own buffer");
        }
        const float lo = static_cast<float>(low), sp = static_cast<float>(span);
        if (!std::isfinite(lo) || !std::isfinite(sp)) fail("low, span: must be finite in float32");
        const float denom = static_cast<float>(std::max<int64_t>(cols - 1, 1));
        py::gil_scoped_release release;
        pymerge::cpu::della_probs(reinterpret_cast<const void*>(base), reinterpret_cast<const void*>(x), d, rows,
                                  cols, lo, sp, denom, reinterpret_cast<float*>(out));
      },
      py::arg("base_ptr"), py::arg("x_ptr"), py::arg("dtype"), py::arg("rows"), py::arg("cols"), py::arg("low"),
      py::arg("span"), py::arg("out_ptr"),
      "DELLA keep probabilities from per-row stable magnitude ranks of x - base (formula in cpu_kernels.h).");

#if defined(PYMERGE_WITH_CUDA)
  m.def(
      "cuda_device_count",
      []() {
        int count = 0;
        const char* error = nullptr;
        {
          py::gil_scoped_release release;
          error = pymerge::cuda::device_count(&count);
        }
        return py::make_tuple(count, error == nullptr ? py::object(py::none()) : py::str(error));
      },
      "(number of CUDA devices this extension's runtime sees, None or the CUDA error text).");

  m.def(
      "cuda_cast",
      [](int64_t src_ptr, int src_dtype, int64_t dst_ptr, int dst_dtype, int64_t n, int64_t stream) {
        const CastArgs a = check_cast(src_ptr, src_dtype, dst_ptr, dst_dtype, n);
        const pymerge::cuda::Stream s = to_stream(stream);
        const char* error = nullptr;
        {
          py::gil_scoped_release release;
          error = pymerge::cuda::cast(a.src, a.src_dtype, a.dst, a.dst_dtype, n, s);
        }
        raise_launch_error("cast", error);
      },
      py::arg("src_ptr"), py::arg("src_dtype"), py::arg("dst_ptr"), py::arg("dst_dtype"), py::arg("n"),
      py::arg("stream"), "dst[i] = dst_dtype(src[i]), enqueued on `stream` (device memory).");

  m.def(
      "cuda_weighted_sum",
      [](const std::vector<int64_t>& input_ptrs, int in_dtype, const std::vector<double>& weights,
         int64_t out_ptr, int out_dtype, int64_t n, bool normalize, int64_t stream) {
        if (int64_t(input_ptrs.size()) > pymerge::cuda::kMaxInputs) {
          fail("input_ptrs: the CUDA weighted sum takes at most " + std::to_string(pymerge::cuda::kMaxInputs) +
               " inputs, got " + std::to_string(input_ptrs.size()));
        }
        const WeightedSumArgs a =
            check_weighted_sum(input_ptrs, in_dtype, weights, out_ptr, out_dtype, n, normalize);
        const pymerge::cuda::Stream s = to_stream(stream);
        const char* error = nullptr;
        {
          py::gil_scoped_release release;
          error = pymerge::cuda::weighted_sum(a.inputs.data(), a.weights.data(), int64_t(a.inputs.size()),
                                              a.in_dtype, a.out, a.out_dtype, n, normalize, a.weight_sum, s);
        }
        raise_launch_error("weighted_sum", error);
      },
      py::arg("input_ptrs"), py::arg("in_dtype"), py::arg("weights"), py::arg("out_ptr"), py::arg("out_dtype"),
      py::arg("n"), py::arg("normalize"), py::arg("stream"),
      "Same as weighted_sum, enqueued on `stream` (device memory); bit-identical to the CPU kernel.");

  def_cuda_merge_kernels(m);  // radix histograms, tie cutoffs, TIES map, Philox masks, DARE/DELLA map
#endif
}
