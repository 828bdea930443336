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
#include "pymerge/dtype.h"
#if defined(PYMERGE_WITH_CUDA)
#include "pymerge/cuda_kernels.h"
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

// n * element size must be addressable; beyond that a buffer of n elements cannot exist.
void check_bytes(int64_t n, DType d, const char* what) {
  if (n > std::numeric_limits<int64_t>::max() / pymerge::dtype_size(d)) {
    fail(std::string(what) + ": n = " + std::to_string(n) + " elements is too large");
  }
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

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "pymerge native kernels (C++17 CPU, optional CUDA). Raw pointers + dtype codes; see pymerge.ops.";
  m.attr("DTYPE_F32") = static_cast<int>(DType::F32);
  m.attr("DTYPE_F16") = static_cast<int>(DType::F16);
  m.attr("DTYPE_BF16") = static_cast<int>(DType::BF16);

  m.def("build_info", &build_info,
        "How this extension was built: cuda_compiled, cuda_version, cuda_archs, cuda_max_inputs, openmp, "
        "omp_max_threads, compiler, dtype_codes.");

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
#endif
}
