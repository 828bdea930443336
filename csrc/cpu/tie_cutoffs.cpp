// CPU tie cutoffs: the flat index of the budget-th element whose task-vector key equals the threshold, per
// expert (contract in cpu_kernels.h). Turning the running count "first `budget` ties in flat order" into one
// index lets the map pass keep ties with a plain comparison, in any order and on any number of threads.
//
// The inputs are scanned in waves of blocks (growing from a few to 64 per thread): the threads count the ties
// of each block in parallel, then one thread walks the wave's counts in order; the block where a budget runs
// out is searched element by element. Scanning stops once every cutoff is found: with ties spread evenly,
// after about budget/ties of the tensor.
#include <algorithm>
#include <cstdint>
#include <vector>

#include "pymerge/cpu_kernels.h"
#include "pymerge/cpu_parallel.h"
#include "pymerge/dtype.h"
#include "pymerge/radix_select.h"

namespace pymerge::cpu {
namespace {

// Blocks per thread in the first wave; each wave doubles, up to the last size, so a cutoff near the start
// costs little overscan and one near the end few joins (each join waits for the slowest thread).
constexpr int64_t kFirstBlocksPerThread = 2;
constexpr int64_t kMaxBlocksPerThread = 64;

template <DType S>
struct TieScan {
  using T = typename DTypeTraits<S>::storage;
  const T* base;
  const T* x;
  uint32_t key;

  float tau(int64_t i) const { return DTypeTraits<S>::widen(x[i]) - DTypeTraits<S>::widen(base[i]); }

  int64_t count(int64_t begin, int64_t end) const {
    int64_t c = 0;
    for (int64_t i = begin; i < end; ++i) c += radix::magnitude_key(tau(i)) == key ? 1 : 0;
    return c;
  }

  // Index of the `nth` (1-based) tie in [begin, end); the caller knows it is there.
  int64_t find(int64_t begin, int64_t end, int64_t nth) const {
    for (int64_t i = begin; i < end; ++i) {
      if (radix::magnitude_key(tau(i)) == key && --nth == 0) return i;
    }
    return end - 1;  // unreachable when the count was right
  }
};

template <DType S>
void scan(const void* base, const void* const* experts, int64_t n, const int32_t* thresh_keys,
          int64_t* tie_budgets, int64_t* cutoffs, std::vector<int64_t> pending) {
  using T = typename DTypeTraits<S>::storage;
  std::vector<TieScan<S>> scans;
  for (int64_t j : pending) {
    scans.push_back({static_cast<const T*>(base), static_cast<const T*>(experts[j]), uint32_t(thresh_keys[j])});
  }
  const int64_t threads = max_threads();
  int64_t blocks_per_thread = kFirstBlocksPerThread;
  std::vector<int64_t> counts;
  for (int64_t w0 = 0, w1 = 0; w0 < n && !pending.empty(); w0 = w1) {
    w1 = std::min(n, w0 + threads * blocks_per_thread * kParallelBlock);
    blocks_per_thread = std::min(kMaxBlocksPerThread, 2 * blocks_per_thread);
    const int64_t blocks = (w1 - w0 + kParallelBlock - 1) / kParallelBlock;
    const int64_t p = int64_t(pending.size());
    counts.assign(size_t(blocks * p), 0);
    parallel_for_blocks(w1 - w0, [&](int64_t begin, int64_t end) {
      const int64_t b = begin / kParallelBlock;
      for (int64_t q = 0; q < p; ++q) counts[size_t(b * p + q)] = scans[size_t(q)].count(w0 + begin, w0 + end);
    });
    std::vector<int64_t> still;
    std::vector<TieScan<S>> still_scans;
    for (int64_t q = 0; q < p; ++q) {
      const int64_t j = pending[size_t(q)];
      bool found = false;
      for (int64_t b = 0; b < blocks && !found; ++b) {
        const int64_t c = counts[size_t(b * p + q)];
        if (c < tie_budgets[j]) {
          tie_budgets[j] -= c;
          continue;
        }
        const int64_t begin = w0 + b * kParallelBlock;
        cutoffs[j] = scans[size_t(q)].find(begin, std::min(n, begin + kParallelBlock), tie_budgets[j]);
        tie_budgets[j] = 0;
        found = true;
      }
      if (!found) {
        still.push_back(j);
        still_scans.push_back(scans[size_t(q)]);
      }
    }
    pending.swap(still);
    scans.swap(still_scans);
  }
  for (int64_t j : pending) cutoffs[j] = n;  // fewer ties than the budget: all of them are kept
}

}  // namespace

void tie_cutoffs(const void* base, const void* const* experts, int64_t k, DType dtype, int64_t n,
                 const int32_t* thresh_keys, int64_t* tie_budgets, int64_t* cutoffs) {
  std::vector<int64_t> pending;
  for (int64_t j = 0; j < k; ++j) {
    if (!radix::trivial_tie_cutoff(tie_budgets[j], n, &cutoffs[j])) pending.push_back(j);
  }
  if (pending.empty()) return;
  if (n <= 0) {
    for (int64_t j : pending) cutoffs[j] = n;
    return;
  }
  dispatch_dtype(dtype, [&](auto tag) {
    scan<decltype(tag)::value>(base, experts, n, thresh_keys, tie_budgets, cutoffs, pending);
  });
}

}  // namespace pymerge::cpu
