// CUDA TIES map: trim by the exact threshold (ties kept up to a flat-index cutoff), elect the sign (or not:
// consensus off is task arithmetic on the trimmed vectors), disjoint mean, scale, add the base, narrow; one
// pass (formula in cpu_kernels.h). Every mul/add/div is an explicit __fmul_rn/__fadd_rn/__fsub_rn/__fdiv_rn,
// so nvcc cannot contract them into FMAs and the bits equal the CPU kernel's.
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <type_traits>

#include "launch.cuh"
#include "pymerge/cuda_kernels.h"
#include "pymerge/dtype.h"
#include "pymerge/radix_select.h"

namespace pymerge::cuda {
namespace {

// Parameter block (about 3.1 KiB, under the 4 KiB limit): no device allocation or copy per call.
struct TiesParams {
  const void* experts[kMaxInputs];
  int64_t cutoffs[kMaxInputs];
  float weights[kMaxInputs];
  int32_t thresh[kMaxInputs];
  int k;
  float lambda;
  float divisor;  // without consensus: w_0 + w_1 + ... in fp32 (|.| < 1e-8 -> 1), as the CPU kernel
};

template <DType S>
__device__ __forceinline__ float trimmed(const TiesParams& p, int j, int64_t i, float b) {
  using T = typename DTypeTraits<S>::storage;
  const float t = __fsub_rn(DTypeTraits<S>::widen(static_cast<const T*>(p.experts[j])[i]), b);
  const uint32_t key = radix::magnitude_key(t);
  const bool keep = radix::above(key, p.thresh[j]) || (int32_t(key) == p.thresh[j] && i <= p.cutoffs[j]);
  return __fmul_rn(__fmul_rn(t, keep ? 1.0f : 0.0f), p.weights[j]);
}

// 1 when sgn(d) equals the elected sign (+1 if s >= 0, else -1; NaN elects -1); zeros and NaN never agree.
__device__ __forceinline__ float agreement(float s, float d) {
  return (s >= 0.0f ? d > 0.0f : d < 0.0f) ? 1.0f : 0.0f;
}

template <DType S, DType D, bool kNormalize, bool kLambda, bool kConsensus>
__global__ void ties_map_kernel(const TiesParams p, const typename DTypeTraits<S>::storage* __restrict__ base,
                                typename DTypeTraits<D>::storage* __restrict__ out, int64_t n) {
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    const float b = DTypeTraits<S>::widen(base[i]);
    float s = trimmed<S>(p, 0, i, b);  // from the first term: a lone -0 stays -0
    for (int j = 1; j < p.k; ++j) s = __fadd_rn(s, trimmed<S>(p, j, i, b));
    if (!kConsensus) {  // plain task arithmetic on the trimmed vectors: one constant divisor
      float r = s;
      if (kNormalize) r = __fdiv_rn(r, p.divisor);
      if (kLambda) r = __fmul_rn(r, p.lambda);
      out[i] = DTypeTraits<D>::narrow(__fadd_rn(b, r));
      continue;
    }
    // Recompute d_j (the thread's inputs are in L1) rather than keep k values per thread.
    float d = trimmed<S>(p, 0, i, b);
    float a = agreement(s, d);
    float m = __fmul_rn(d, a);
    float v = __fmul_rn(p.weights[0], a);
    for (int j = 1; j < p.k; ++j) {
      d = trimmed<S>(p, j, i, b);
      a = agreement(s, d);
      m = __fadd_rn(m, __fmul_rn(d, a));
      v = __fadd_rn(v, __fmul_rn(p.weights[j], a));
    }
    float r = m;
    if (kNormalize) r = __fdiv_rn(r, v == 0.0f ? 1.0f : v);
    if (kLambda) r = __fmul_rn(r, p.lambda);
    out[i] = DTypeTraits<D>::narrow(__fadd_rn(b, r));
  }
}

}  // namespace

const char* ties_map(const void* base, const void* const* experts, int64_t k, DType in_dtype, int64_t n,
                     const float* weights, const int32_t* thresh_keys, const int64_t* cutoffs, float lambda,
                     bool normalize, bool consensus, void* out, DType out_dtype, Stream stream) {
  if (n <= 0 || k <= 0) return nullptr;
  if (k > kMaxInputs) return "too many experts for the CUDA TIES map";
  TiesParams p{};
  for (int64_t j = 0; j < k; ++j) {
    p.experts[j] = experts[j];
    p.cutoffs[j] = cutoffs[j];
    p.weights[j] = weights[j];
    p.thresh[j] = thresh_keys[j];
  }
  p.k = int(k);
  p.lambda = lambda;
  float divisor = weights[0];
  for (int64_t j = 1; j < k; ++j) divisor = divisor + weights[j];  // host fp32 adds: no FMA to contract
  p.divisor = std::fabs(divisor) < 1e-8f ? 1.0f : divisor;
  const int blocks = detail::blocks_for(n);
  dispatch_dtype(in_dtype, [&](auto s) {
    dispatch_dtype(out_dtype, [&](auto d) {
      constexpr DType S = decltype(s)::value;
      constexpr DType D = decltype(d)::value;
      using SrcT = typename DTypeTraits<S>::storage;
      using DstT = typename DTypeTraits<D>::storage;
      const auto* b = static_cast<const SrcT*>(base);
      auto* o = static_cast<DstT*>(out);
      const bool apply_lambda = lambda != 1.0f;
      auto run = [&](auto normalize_tag, auto lambda_tag, auto consensus_tag) {
        ties_map_kernel<S, D, decltype(normalize_tag)::value, decltype(lambda_tag)::value,
                        decltype(consensus_tag)::value><<<blocks, detail::kThreads, 0, stream>>>(p, b, o, n);
      };
      auto with_consensus = [&](auto normalize_tag, auto lambda_tag) {
        if (consensus) {
          run(normalize_tag, lambda_tag, std::true_type{});
        } else {
          run(normalize_tag, lambda_tag, std::false_type{});
        }
      };
      if (normalize && apply_lambda) {
        with_consensus(std::true_type{}, std::true_type{});
      } else if (normalize) {
        with_consensus(std::true_type{}, std::false_type{});
      } else if (apply_lambda) {
        with_consensus(std::false_type{}, std::true_type{});
      } else {
        with_consensus(std::false_type{}, std::false_type{});
      }
    });
  });
  return detail::last_error();
}

}  // namespace pymerge::cuda
