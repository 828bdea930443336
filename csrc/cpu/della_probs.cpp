// DELLA's keep probabilities from per-row magnitude ranks (formula in cpu_kernels.h). Each row's magnitude keys
// are ranked by an LSD radix sort (three passes of 11 bits over the 31-bit keys, stable, so equal keys keep
// their index order: the torch twin's stable argsort). A pass whose digit is the same for the whole row is
// skipped. Rows are independent, so any split of rows over threads gives the same bits.
#include <algorithm>
#include <cstdint>
#include <utility>
#include <vector>

#include "pymerge/cpu_kernels.h"
#include "pymerge/dtype.h"
#include "pymerge/radix_select.h"

namespace pymerge::cpu {
namespace {

// 11-bit digits: 3 passes cover the 31-bit keys, and 2048 counters (8 KiB) stay in L1 next to a row of a few
// thousand (key, index) pairs.
constexpr int kDigitBits = 11;
constexpr int kPasses = 3;
constexpr uint32_t kDigits = 1u << kDigitBits;

// Sorts (keys, idx) of one row ascending by key, stably, using (keys2, idx2) as scratch; returns the
// index array that holds the result.
const uint32_t* radix_sort_row(uint32_t* keys, uint32_t* idx, uint32_t* keys2, uint32_t* idx2, int64_t n,
                               uint32_t* count) {
  for (int pass = 0; pass < kPasses; ++pass) {
    const int shift = pass * kDigitBits;
    std::fill(count, count + kDigits, 0u);
    for (int64_t i = 0; i < n; ++i) ++count[(keys[i] >> shift) & (kDigits - 1)];
    if (count[(keys[0] >> shift) & (kDigits - 1)] == uint32_t(n)) continue;  // one digit for the whole row
    uint32_t sum = 0;
    for (uint32_t d = 0; d < kDigits; ++d) {
      const uint32_t c = count[d];
      count[d] = sum;
      sum += c;
    }
    for (int64_t i = 0; i < n; ++i) {
      const uint32_t at = count[(keys[i] >> shift) & (kDigits - 1)]++;
      keys2[at] = keys[i];
      idx2[at] = idx[i];
    }
    std::swap(keys, keys2);
    std::swap(idx, idx2);
  }
  return idx;
}

template <DType S>
void probs_rows(const void* base_ptr, const void* x_ptr, int64_t rows, int64_t cols, float low, float span,
                float denom, float* out) {
  using T = typename DTypeTraits<S>::storage;
  const T* base = static_cast<const T*>(base_ptr);
  const T* x = static_cast<const T*>(x_ptr);
#if defined(PYMERGE_WITH_OPENMP)
#pragma omp parallel if (rows > 1 && rows * cols > (int64_t(1) << 16))
#endif
  {
    std::vector<uint32_t> buf(size_t(4 * cols) + kDigits);
    uint32_t* keys = buf.data();
    uint32_t* idx = keys + cols;
    uint32_t* keys2 = idx + cols;
    uint32_t* idx2 = keys2 + cols;
    uint32_t* count = idx2 + cols;
#if defined(PYMERGE_WITH_OPENMP)
#pragma omp for schedule(static)
#endif
    for (int64_t r = 0; r < rows; ++r) {
      const T* xr = x + r * cols;
      const T* br = base + r * cols;
      for (int64_t c = 0; c < cols; ++c) {
        keys[c] = radix::magnitude_key(DTypeTraits<S>::widen(xr[c]) - DTypeTraits<S>::widen(br[c]));
        idx[c] = uint32_t(c);
      }
      const uint32_t* order = radix_sort_row(keys, idx, keys2, idx2, cols, count);
      float* o = out + r * cols;
      for (int64_t rank = 0; rank < cols; ++rank) {
        o[order[rank]] = low + span * (float(rank) / denom);  // each operation rounded, as the twin's
      }
    }
  }
}

}  // namespace

void della_probs(const void* base, const void* x, DType dtype, int64_t rows, int64_t cols, float low, float span,
                 float denom, float* out) {
  if (rows <= 0 || cols <= 0) return;
  dispatch_dtype(dtype, [&](auto s) { probs_rows<decltype(s)::value>(base, x, rows, cols, low, span, denom, out); });
}

}  // namespace pymerge::cpu
