// CPU count of non-finite values (Inf or NaN) in stored inputs, for the executor's NaN/Inf policy on the
// native path: it reads the stored bytes (no widening) and tests the exponent field, which is all ones
// exactly for Inf and NaN in f32, f16 and bf16 alike. Integer counts: independent of the thread count.
#include <cstdint>
#include <cstring>
#include <vector>

#include "pymerge/cpu_kernels.h"
#include "pymerge/cpu_parallel.h"
#include "pymerge/dtype.h"

namespace pymerge::cpu {
namespace {

template <typename Bits, Bits kExpMask>
int64_t count_range(const void* x, int64_t begin, int64_t end) {
  const Bits* __restrict p = static_cast<const Bits*>(x);
  int64_t c = 0;
  for (int64_t i = begin; i < end; ++i) c += (p[i] & kExpMask) == kExpMask;
  return c;
}

int64_t count_one(const void* x, DType dtype, int64_t begin, int64_t end) {
  switch (dtype) {
    case DType::F32: return count_range<uint32_t, 0x7F800000u>(x, begin, end);
    case DType::F16: return count_range<uint16_t, 0x7C00u>(x, begin, end);
    case DType::BF16: return count_range<uint16_t, 0x7F80u>(x, begin, end);
  }
  return 0;
}

}  // namespace

void count_nonfinite(const void* const* xs, int64_t k, DType dtype, int64_t n, int64_t* counts) {
  for (int64_t j = 0; j < k; ++j) counts[j] = 0;
  if (n <= 0 || k <= 0) return;
  const int64_t num_blocks = (n + kParallelBlock - 1) / kParallelBlock;
  // One slot per (input, block): each written by one thread, summed serially afterwards.
  std::vector<int64_t> per_block(size_t(k * num_blocks), 0);
  parallel_for_blocks(n, [&](int64_t begin, int64_t end) {
    const int64_t b = begin / kParallelBlock;
    for (int64_t j = 0; j < k; ++j) per_block[size_t(j * num_blocks + b)] = count_one(xs[j], dtype, begin, end);
  });
  for (int64_t j = 0; j < k; ++j) {
    for (int64_t b = 0; b < num_blocks; ++b) counts[j] += per_block[size_t(j * num_blocks + b)];
  }
}

}  // namespace pymerge::cpu
