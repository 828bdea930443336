// CUDA dtype cast: dst[i] = narrow<dst>(widen<src>(src[i])), the same bits as the CPU kernel
// (both use pymerge/dtype_cast.h).
#include <cuda_runtime.h>

#include <algorithm>

#include "pymerge/cuda_kernels.h"
#include "pymerge/dtype.h"

namespace pymerge::cuda {
namespace {

constexpr int kThreads = 256;
// Grid-stride loops: a capped grid covers any n (even n >= 2^31) with enough blocks to fill an H100.
constexpr int64_t kMaxBlocks = 8192;

template <DType S, DType D>
__global__ void cast_kernel(const typename DTypeTraits<S>::storage* __restrict__ src,
                            typename DTypeTraits<D>::storage* __restrict__ dst, int64_t n) {
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    dst[i] = DTypeTraits<D>::narrow(DTypeTraits<S>::widen(src[i]));
  }
}

}  // namespace

const char* cast(const void* src, DType src_dtype, void* dst, DType dst_dtype, int64_t n, Stream stream) {
  if (n <= 0) return nullptr;
  if (src_dtype == dst_dtype) {
    const cudaError_t err =
        cudaMemcpyAsync(dst, src, size_t(n * dtype_size(src_dtype)), cudaMemcpyDeviceToDevice, stream);
    return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
  }
  const int blocks = int(std::min(kMaxBlocks, (n + kThreads - 1) / kThreads));
  dispatch_dtype(src_dtype, [&](auto s) {
    dispatch_dtype(dst_dtype, [&](auto d) {
      constexpr DType S = decltype(s)::value;
      constexpr DType D = decltype(d)::value;
      cast_kernel<S, D><<<blocks, kThreads, 0, stream>>>(
          static_cast<const typename DTypeTraits<S>::storage*>(src),
          static_cast<typename DTypeTraits<D>::storage*>(dst), n);
    });
  });
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

const char* device_count(int* count) {
  *count = 0;
  const cudaError_t err = cudaGetDeviceCount(count);
  if (err != cudaSuccess) {
    *count = 0;
    cudaGetLastError();  // clear it so the next launch reports its own error
    return cudaGetErrorString(err);
  }
  return nullptr;
}

}  // namespace pymerge::cuda
