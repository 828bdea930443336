// CUDA Philox stream (philox.h): 24-bit uniforms and Bernoulli keep masks of flat elements
// [start, start + count) of one model's tensor. One thread per Philox block of 4 elements, aligned to the
// tensor's flat index, so each block's four words are computed once; the bits equal the CPU kernel's and the
// torch twin's (pymerge/ops/philox.py).
#include <cuda_runtime.h>

#include <cstdint>

#include "launch.cuh"
#include "pymerge/cuda_kernels.h"
#include "pymerge/philox.h"

namespace pymerge::cuda {
namespace {

enum class Draw { Uniform24, KeepScalar, KeepPerElement };

template <Draw kDraw>
__global__ void philox_kernel(uint64_t seed, uint32_t model, uint32_t name_hash, int64_t start, int64_t count,
                              float limit, const float* __restrict__ probs, void* __restrict__ out) {
  const uint64_t first_block = uint64_t(start) >> 2;
  const uint64_t blocks = ((uint64_t(start) + uint64_t(count) - 1) >> 2) - first_block + 1;
  const uint64_t stride = uint64_t(gridDim.x) * blockDim.x;
  for (uint64_t t = uint64_t(blockIdx.x) * blockDim.x + threadIdx.x; t < blocks; t += stride) {
    const uint64_t block = first_block + t;
    const philox::Words w = philox::stream_block(seed, model, name_hash, block);
#pragma unroll
    for (uint32_t lane = 0; lane < 4; ++lane) {
      const int64_t i = int64_t(4 * block + lane) - start;
      if (i < 0 || i >= count) continue;
      const uint32_t word = philox::word_at(w, lane);
      if (kDraw == Draw::Uniform24) {
        static_cast<uint32_t*>(out)[i] = philox::uniform24(word);
      } else {
        const float bound = kDraw == Draw::KeepScalar ? limit : philox::keep_limit(probs[i]);
        static_cast<uint8_t*>(out)[i] = philox::keep(word, bound) ? 1 : 0;
      }
    }
  }
}

int blocks_for_elements(int64_t start, int64_t count) {
  return detail::blocks_for(((start + count - 1) >> 2) - (start >> 2) + 1);
}

}  // namespace

const char* philox_uniform24(uint64_t seed, uint32_t model, uint32_t name_hash, int64_t start, int64_t count,
                             uint32_t* out, Stream stream) {
  if (count <= 0) return nullptr;
  philox_kernel<Draw::Uniform24><<<blocks_for_elements(start, count), detail::kThreads, 0, stream>>>(
      seed, model, name_hash, start, count, 0.0f, nullptr, out);
  return detail::last_error();
}

const char* philox_keep_mask(uint64_t seed, uint32_t model, uint32_t name_hash, int64_t start, int64_t count,
                             float prob, const float* probs, uint8_t* out, Stream stream) {
  if (count <= 0) return nullptr;
  const int blocks = blocks_for_elements(start, count);
  if (probs == nullptr) {
    philox_kernel<Draw::KeepScalar><<<blocks, detail::kThreads, 0, stream>>>(
        seed, model, name_hash, start, count, philox::keep_limit(prob), nullptr, out);
  } else {
    philox_kernel<Draw::KeepPerElement><<<blocks, detail::kThreads, 0, stream>>>(
        seed, model, name_hash, start, count, 0.0f, probs, out);
  }
  return detail::last_error();
}

}  // namespace pymerge::cuda
