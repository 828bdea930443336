// Splits [0, n) into fixed blocks and runs them on the OpenMP threads (serially without OpenMP).
// Fixed block boundaries keep every result independent of the thread count.
#pragma once

#include <algorithm>
#include <cstdint>

namespace pymerge::cpu {

// 64K elements: big enough to amortize scheduling, small enough to balance two to a few dozen cores.
constexpr int64_t kParallelBlock = int64_t(1) << 16;

template <typename Fn>
void parallel_for_blocks(int64_t n, Fn&& fn) {
  const int64_t num_blocks = (n + kParallelBlock - 1) / kParallelBlock;
#if defined(PYMERGE_WITH_OPENMP)
#pragma omp parallel for schedule(static) if (num_blocks > 1)
#endif
  for (int64_t b = 0; b < num_blocks; ++b) {
    const int64_t begin = b * kParallelBlock;
    fn(begin, std::min(n, begin + kParallelBlock));
  }
}

}  // namespace pymerge::cpu
