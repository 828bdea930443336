// CPU weighted sum: out[i] = narrow(sum_j w[j] * widen(x_j[i]) [/ sum_j w[j]]), fp32 math, inputs summed
// in their given order with each mul and add rounded separately, so the result is bit-identical to the
// CUDA kernel and independent of the thread count.
#include <algorithm>

#include "pymerge/cpu_kernels.h"
#include "pymerge/cpu_parallel.h"
#include "pymerge/dtype.h"

namespace pymerge::cpu {
namespace {

// Accumulator tile: 1024 fp32 = 4 KiB stays in L1 while each input streams through it once.
constexpr int64_t kTile = 1024;

template <DType S, DType D, bool kNormalize>
void weighted_sum_range(const void* const* inputs, const float* weights, int64_t k, void* out,
                        int64_t begin, int64_t end, float weight_sum) {
  using SrcT = typename DTypeTraits<S>::storage;
  using DstT = typename DTypeTraits<D>::storage;
  float acc[kTile];
  for (int64_t t = begin; t < end; t += kTile) {
    const int64_t m = std::min(kTile, end - t);
    // Start from the first product (not 0 + product) so a single input gives exactly w*x, -0 included.
    {
      const SrcT* __restrict x = static_cast<const SrcT*>(inputs[0]) + t;
      const float w = weights[0];
      for (int64_t i = 0; i < m; ++i) acc[i] = w * DTypeTraits<S>::widen(x[i]);
    }
    for (int64_t j = 1; j < k; ++j) {
      const SrcT* __restrict x = static_cast<const SrcT*>(inputs[j]) + t;
      const float w = weights[j];
      for (int64_t i = 0; i < m; ++i) acc[i] = acc[i] + w * DTypeTraits<S>::widen(x[i]);
    }
    DstT* __restrict o = static_cast<DstT*>(out) + t;
    if (kNormalize) {
      // A true division (not a reciprocal multiply): correctly rounded, and what the torch twin does.
      for (int64_t i = 0; i < m; ++i) o[i] = DTypeTraits<D>::narrow(acc[i] / weight_sum);
    } else {
      for (int64_t i = 0; i < m; ++i) o[i] = DTypeTraits<D>::narrow(acc[i]);
    }
  }
}

}  // namespace

void weighted_sum(const void* const* inputs, const float* weights, int64_t k, DType in_dtype, void* out,
                  DType out_dtype, int64_t n, bool normalize, float weight_sum) {
  if (n <= 0 || k <= 0) return;
  dispatch_dtype(in_dtype, [&](auto s) {
    dispatch_dtype(out_dtype, [&](auto d) {
      constexpr DType S = decltype(s)::value;
      constexpr DType D = decltype(d)::value;
      parallel_for_blocks(n, [&](int64_t begin, int64_t end) {
        if (normalize) {
          weighted_sum_range<S, D, true>(inputs, weights, k, out, begin, end, weight_sum);
        } else {
          weighted_sum_range<S, D, false>(inputs, weights, k, out, begin, end, weight_sum);
        }
      });
    });
  });
}

}  // namespace pymerge::cpu
