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

// The same sum with the input count fixed at compile time: each element's accumulator stays in a register
// (the tiled form above stores and reloads it once per input), the same operations in the same order, so the
// same bits.
template <DType S, DType D, bool kNormalize, int K>
void weighted_sum_fixed(const void* const* inputs, const float* weights, void* out, int64_t begin, int64_t end,
                        float weight_sum) {
  using SrcT = typename DTypeTraits<S>::storage;
  using DstT = typename DTypeTraits<D>::storage;
  const SrcT* x[K];
  float w[K];
  for (int j = 0; j < K; ++j) {
    x[j] = static_cast<const SrcT*>(inputs[j]);
    w[j] = weights[j];
  }
  DstT* __restrict o = static_cast<DstT*>(out);
  for (int64_t i = begin; i < end; ++i) {
    float acc = w[0] * DTypeTraits<S>::widen(x[0][i]);
    for (int j = 1; j < K; ++j) acc = acc + w[j] * DTypeTraits<S>::widen(x[j][i]);
    o[i] = DTypeTraits<D>::narrow(kNormalize ? acc / weight_sum : acc);
  }
}

template <DType S, DType D, bool kNormalize>
void weighted_sum_block(const void* const* inputs, const float* weights, int64_t k, void* out, int64_t begin,
                        int64_t end, float weight_sum) {
  switch (k) {
#define PYMERGE_FIXED_K(K) \
  case K:                  \
    return weighted_sum_fixed<S, D, kNormalize, K>(inputs, weights, out, begin, end, weight_sum);
    PYMERGE_FIXED_K(1)
    PYMERGE_FIXED_K(2)
    PYMERGE_FIXED_K(3)
    PYMERGE_FIXED_K(4)
    PYMERGE_FIXED_K(5)
    PYMERGE_FIXED_K(6)
    PYMERGE_FIXED_K(7)
    PYMERGE_FIXED_K(8)
#undef PYMERGE_FIXED_K
    default:
      return weighted_sum_range<S, D, kNormalize>(inputs, weights, k, out, begin, end, weight_sum);
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
          weighted_sum_block<S, D, true>(inputs, weights, k, out, begin, end, weight_sum);
        } else {
          weighted_sum_block<S, D, false>(inputs, weights, k, out, begin, end, weight_sum);
        }
      });
    });
  });
}

}  // namespace pymerge::cpu
