// Launch helpers shared by the CUDA kernels of csrc/cuda (CUDA-only: included by .cu files).
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

namespace pymerge::cuda::detail {

constexpr int kThreads = 256;
// Grid-stride loops: a capped grid covers any n (even n >= 2^31) with enough blocks to fill an H100.
constexpr int64_t kMaxBlocks = 8192;

inline int blocks_for(int64_t work_items) {
  return int(std::max<int64_t>(1, std::min(kMaxBlocks, (work_items + kThreads - 1) / kThreads)));
}

// nullptr, or the text of the error the last launch left (the error is cleared).
inline const char* last_error() {
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

inline const char* error_text(cudaError_t err) { return err == cudaSuccess ? nullptr : cudaGetErrorString(err); }

}  // namespace pymerge::cuda::detail
