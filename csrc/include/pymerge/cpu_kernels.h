// CPU kernels (csrc/cpu/). Raw pointers and sizes only; the caller (csrc/bindings.cpp) has checked every
// precondition listed here, so the kernels do not check again.
#pragma once

#include <cstdint>

#include "pymerge/dtype.h"

namespace pymerge::cpu {

// dst[i] = narrow<dst_dtype>(widen<src_dtype>(src[i])) for i < n (round to nearest even).
// Pre: n >= 0; src/dst non-null when n > 0; the two ranges do not overlap.
void cast(const void* src, DType src_dtype, void* dst, DType dst_dtype, int64_t n);

// out[i] = narrow<out_dtype>(acc_i [/ weight_sum if normalize]) where, in fp32 with every mul and add
// rounded separately (no FMA), acc_i = w[0]*x_0[i], then acc_i = acc_i + w[j]*x_j[i] for j = 1..k-1.
// Pre: k >= 1; n >= 0; inputs[j] (all of in_dtype) and out non-null when n > 0; out overlaps no input
// (except being exactly inputs[j] with in_dtype == out_dtype); weight_sum != 0 when normalize.
void weighted_sum(const void* const* inputs, const float* weights, int64_t k, DType in_dtype, void* out,
                  DType out_dtype, int64_t n, bool normalize, float weight_sum);

// Number of threads the OpenMP kernels use (1 without OpenMP).
int max_threads();

}  // namespace pymerge::cpu
