// CUDA DARE / DELLA map (formula in cuda_kernels.h): Philox keep masks, rescale, weights, optional sign
// election, base, narrow, in one pass. One thread per Philox block of 4 elements (aligned to the tensor's flat
// index), so each expert's four words are drawn once per block; the keep bits are kept for the second sweep of
// the sign election. Explicit __fmul_rn/__fadd_rn/__fsub_rn/__fdiv_rn: no FMA, the bits of the torch twin.
#include <cuda_runtime.h>

#include <cstdint>

#include "launch.cuh"
#include "pymerge/cuda_kernels.h"
#include "pymerge/dtype.h"
#include "pymerge/philox.h"

namespace pymerge::cuda {
namespace {

// Parameter block: 64 experts * 36 bytes + scalars, under the 4 KiB limit.
struct DareParams {
  const void* experts[kMaxDareInputs];
  const float* probs[kMaxDareInputs];  // per-element keep probabilities (DELLA), or null
  float weights[kMaxDareInputs];
  float scales[kMaxDareInputs];
  float limits[kMaxDareInputs];
  uint32_t models[kMaxDareInputs];
  const void* base;
  uint64_t seed;
  int64_t start;
  int64_t n;
  uint32_t name_hash;
  int k;
  float divisor;
  float lambda;
};

__device__ __forceinline__ float sgn(float d) { return d > 0.0f ? 1.0f : (d < 0.0f ? -1.0f : 0.0f); }

template <DType S>
__device__ __forceinline__ float delta(const DareParams& p, int j, int64_t i, float b, bool keep) {
  using T = typename DTypeTraits<S>::storage;
  const float t = __fsub_rn(DTypeTraits<S>::widen(static_cast<const T*>(p.experts[j])[i]), b);
  return __fmul_rn(__fmul_rn(__fmul_rn(t, keep ? 1.0f : 0.0f), p.scales[j]), p.weights[j]);
}

template <DType S, DType D, Consensus kConsensus, bool kNormalize, bool kLambda>
__global__ void dare_map_kernel(const DareParams p, typename DTypeTraits<D>::storage* __restrict__ out) {
  using T = typename DTypeTraits<S>::storage;
  const uint64_t first_block = uint64_t(p.start) >> 2;
  const uint64_t blocks = ((uint64_t(p.start) + uint64_t(p.n) - 1) >> 2) - first_block + 1;
  const uint64_t stride = uint64_t(gridDim.x) * blockDim.x;
  for (uint64_t t = uint64_t(blockIdx.x) * blockDim.x + threadIdx.x; t < blocks; t += stride) {
    const uint64_t block = first_block + t;
    int64_t idx[4];
    bool valid[4];
    float b[4], s[4], m[4], v[4];
#pragma unroll
    for (int lane = 0; lane < 4; ++lane) {
      idx[lane] = int64_t(4 * block + uint64_t(lane)) - p.start;
      valid[lane] = idx[lane] >= 0 && idx[lane] < p.n;
      b[lane] = valid[lane] ? DTypeTraits<S>::widen(static_cast<const T*>(p.base)[idx[lane]]) : 0.0f;
    }
    // 4 keep bits per expert, for the second sweep of the election (no second Philox draw).
    uint32_t keep_bits[kMaxDareInputs / 8];
    for (int j = 0; j < p.k; ++j) {
      const philox::Words w = philox::stream_block(p.seed, p.models[j], p.name_hash, block);
      uint32_t bits = 0;
#pragma unroll
      for (int lane = 0; lane < 4; ++lane) {
        if (!valid[lane]) continue;
        const float limit = p.probs[j] != nullptr ? philox::keep_limit(p.probs[j][idx[lane]]) : p.limits[j];
        const bool keep = philox::keep(philox::word_at(w, uint32_t(lane)), limit);
        bits |= keep ? (1u << lane) : 0u;
        const float d = delta<S>(p, j, idx[lane], b[lane], keep);
        const float term = kConsensus == Consensus::Count ? sgn(d) : d;
        s[lane] = j == 0 ? term : __fadd_rn(s[lane], term);  // sums start from their first term
      }
      if (kConsensus != Consensus::None) {
        if ((j & 7) == 0) keep_bits[j >> 3] = 0u;
        keep_bits[j >> 3] |= bits << ((j & 7) * 4);
      }
    }
#pragma unroll
    for (int lane = 0; lane < 4; ++lane) {
      if (!valid[lane]) continue;
      float r;
      if (kConsensus == Consensus::None) {
        r = s[lane];
        if (kNormalize) r = __fdiv_rn(r, p.divisor);
      } else {
        const bool positive = s[lane] >= 0.0f;  // NaN elects -1
        for (int j = 0; j < p.k; ++j) {
          const bool keep = (keep_bits[j >> 3] >> ((j & 7) * 4 + lane)) & 1u;
          const float d = delta<S>(p, j, idx[lane], b[lane], keep);
          const float a = (positive ? d > 0.0f : d < 0.0f) ? 1.0f : 0.0f;
          const float dm = __fmul_rn(d, a);
          const float dv = __fmul_rn(p.weights[j], a);
          m[lane] = j == 0 ? dm : __fadd_rn(m[lane], dm);
          v[lane] = j == 0 ? dv : __fadd_rn(v[lane], dv);
        }
        r = m[lane];
        if (kNormalize) r = __fdiv_rn(r, v[lane] == 0.0f ? 1.0f : v[lane]);
      }
      if (kLambda) r = __fmul_rn(r, p.lambda);
      out[idx[lane]] = DTypeTraits<D>::narrow(__fadd_rn(b[lane], r));
    }
  }
}

template <DType S, DType D, Consensus kConsensus>
void launch(const DareParams& p, bool normalize, bool apply_lambda, void* out, int blocks, Stream stream) {
  auto* o = static_cast<typename DTypeTraits<D>::storage*>(out);
  if (normalize && apply_lambda) {
    dare_map_kernel<S, D, kConsensus, true, true><<<blocks, detail::kThreads, 0, stream>>>(p, o);
  } else if (normalize) {
    dare_map_kernel<S, D, kConsensus, true, false><<<blocks, detail::kThreads, 0, stream>>>(p, o);
  } else if (apply_lambda) {
    dare_map_kernel<S, D, kConsensus, false, true><<<blocks, detail::kThreads, 0, stream>>>(p, o);
  } else {
    dare_map_kernel<S, D, kConsensus, false, false><<<blocks, detail::kThreads, 0, stream>>>(p, o);
  }
}

}  // namespace

const char* dare_map(const void* base, const void* const* experts, int64_t k, DType in_dtype, int64_t n,
                     const float* weights, const float* scales, const float* limits, const float* const* probs,
                     uint64_t seed, const uint32_t* model_ids, uint32_t name_hash, int64_t start,
                     Consensus consensus, bool normalize, float divisor, float lambda, void* out, DType out_dtype,
                     Stream stream) {
  if (n <= 0 || k <= 0) return nullptr;
  if (k > kMaxDareInputs) return "too many experts for the CUDA DARE map";
  DareParams p{};
  for (int64_t j = 0; j < k; ++j) {
    p.experts[j] = experts[j];
    p.probs[j] = probs == nullptr ? nullptr : probs[j];
    p.weights[j] = weights[j];
    p.scales[j] = scales[j];
    p.limits[j] = limits[j];
    p.models[j] = model_ids[j];
  }
  p.base = base;
  p.seed = seed;
  p.start = start;
  p.n = n;
  p.name_hash = name_hash;
  p.k = int(k);
  p.divisor = divisor;
  p.lambda = lambda;
  const int blocks = detail::blocks_for(((start + n - 1) >> 2) - (start >> 2) + 1);
  const bool apply_lambda = lambda != 1.0f;
  dispatch_dtype(in_dtype, [&](auto s) {
    dispatch_dtype(out_dtype, [&](auto d) {
      constexpr DType S = decltype(s)::value;
      constexpr DType D = decltype(d)::value;
      switch (consensus) {
        case Consensus::Sum: launch<S, D, Consensus::Sum>(p, normalize, apply_lambda, out, blocks, stream); break;
        case Consensus::Count:
          launch<S, D, Consensus::Count>(p, normalize, apply_lambda, out, blocks, stream);
          break;
        case Consensus::None:
        default: launch<S, D, Consensus::None>(p, normalize, apply_lambda, out, blocks, stream); break;
      }
    });
  });
  return detail::last_error();
}

}  // namespace pymerge::cuda
