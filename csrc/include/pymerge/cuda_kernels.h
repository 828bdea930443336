// CUDA launchers (csrc/cuda/). Declared without any CUDA header so the C++ binding layer can call them:
// a stream is the opaque CUstream_st*, the same type as cudaStream_t (0 = the legacy default stream).
// Each launcher enqueues its kernel on `stream` of the current device and returns nullptr, or the CUDA
// error text when the launch failed. Preconditions are those of the matching CPU kernel (cpu_kernels.h),
// with device pointers, checked by csrc/bindings.cpp.
#pragma once

#include <cstdint>

#include "pymerge/dtype.h"

struct CUstream_st;

namespace pymerge::cuda {

using Stream = CUstream_st*;

// Inputs and weights travel in the kernel's parameter block (no device allocation), which bounds k.
constexpr int64_t kMaxInputs = 128;

// dst[i] = narrow<dst_dtype>(widen<src_dtype>(src[i])).
const char* cast(const void* src, DType src_dtype, void* dst, DType dst_dtype, int64_t n, Stream stream);

// Same formula and rounding as pymerge::cpu::weighted_sum (bit-identical results). Pre: 1 <= k <= kMaxInputs.
const char* weighted_sum(const void* const* inputs, const float* weights, int64_t k, DType in_dtype,
                         void* out, DType out_dtype, int64_t n, bool normalize, float weight_sum,
                         Stream stream);

// Number of CUDA devices this runtime sees; returns nullptr, or the error text (no driver, driver too old).
const char* device_count(int* count);

}  // namespace pymerge::cuda
