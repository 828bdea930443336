// CUDA weighted sum: out[i] = narrow(sum_j w[j] * widen(x_j[i]) [/ sum_j w[j]]). fp32 math, inputs in
// their given order, each mul/add/div rounded separately (__fmul_rn/__fadd_rn/__fdiv_rn forbid FMA
// contraction), so the bits match pymerge::cpu::weighted_sum.
#include <cuda_runtime.h>

#include <algorithm>

#include "pymerge/cuda_kernels.h"
#include "pymerge/dtype.h"

namespace pymerge::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxBlocks = 8192;

// Passed by value in the kernel's parameter space (1.5 KiB, under the 4 KiB limit): no device allocation
// or copy per call.
struct WeightedSumParams {
  const void* inputs[kMaxInputs];
  float weights[kMaxInputs];
  int num_inputs;
  float weight_sum;
};

template <DType S, DType D, bool kNormalize>
__global__ void weighted_sum_kernel(const WeightedSumParams p, typename DTypeTraits<D>::storage* __restrict__ out,
                                    int64_t n) {
  using SrcT = typename DTypeTraits<S>::storage;
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    float acc = __fmul_rn(p.weights[0], DTypeTraits<S>::widen(static_cast<const SrcT*>(p.inputs[0])[i]));
    for (int j = 1; j < p.num_inputs; ++j) {
      const float x = DTypeTraits<S>::widen(static_cast<const SrcT*>(p.inputs[j])[i]);
      acc = __fadd_rn(acc, __fmul_rn(p.weights[j], x));
    }
    if (kNormalize) acc = __fdiv_rn(acc, p.weight_sum);
    out[i] = DTypeTraits<D>::narrow(acc);
  }
}

}  // namespace

const char* weighted_sum(const void* const* inputs, const float* weights, int64_t k, DType in_dtype,
                         void* out, DType out_dtype, int64_t n, bool normalize, float weight_sum,
                         Stream stream) {
  if (n <= 0 || k <= 0) return nullptr;
  if (k > kMaxInputs) return "too many inputs for the CUDA weighted sum";
  WeightedSumParams p{};
  for (int64_t j = 0; j < k; ++j) {
    p.inputs[j] = inputs[j];
    p.weights[j] = weights[j];
  }
  p.num_inputs = int(k);
  p.weight_sum = weight_sum;
  const int blocks = int(std::min(kMaxBlocks, (n + kThreads - 1) / kThreads));
  dispatch_dtype(in_dtype, [&](auto s) {
    dispatch_dtype(out_dtype, [&](auto d) {
      constexpr DType S = decltype(s)::value;
      constexpr DType D = decltype(d)::value;
      using DstT = typename DTypeTraits<D>::storage;
      if (normalize) {
        weighted_sum_kernel<S, D, true><<<blocks, kThreads, 0, stream>>>(p, static_cast<DstT*>(out), n);
      } else {
        weighted_sum_kernel<S, D, false><<<blocks, kThreads, 0, stream>>>(p, static_cast<DstT*>(out), n);
      }
    });
  });
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

}  // namespace pymerge::cuda
