// DELLA's keep probabilities from per-row magnitude ranks (formula in cpu_kernels.h). Each row's magnitude keys
// are ranked by an LSD radix sort of (key << 32 | column) items (four passes of 8 bits over the 31-bit keys,
// stable, so equal keys keep their column order: the torch twin's stable argsort). A pass whose digit is the
// same for the whole row is skipped. Rows are independent, so any split of rows over threads gives the same bits.
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <utility>
#include <vector>

#include "pymerge/cpu_kernels.h"
#include "pymerge/dtype.h"
#include "pymerge/radix_select.h"

namespace pymerge::cpu {
namespace {

// 8-bit digits (256 counters per quarter, 4 KiB for all four in L1) and four contiguous quarters of the row
// scattered side by side, each with its own running offsets (bucket start + that digit's count in the earlier
// quarters): task-vector keys share their high digits, so one running offset per digit was a serial
// load-add-store chain; four quarters run four chains. Standalone A/B on bf16 task-vector keys (one thread,
// best of 3 per run, three runs): 11-bit digits and one chain (the previous kernel) 6.9-8.2 ns per element,
// this 6.0-6.9; 8-bit digits with two quarters 7.0-8.8.
constexpr int kDigitBits = 8;
constexpr uint32_t kDigits = 1u << kDigitBits;
constexpr int kPasses = 4;  // 32 bits of key
constexpr int kQuarters = 4;

// Calls f(q, i) for every index i of quarter q of [0, n) (quarters of qn items, the last maybe fewer), the
// quarters side by side: item t of each quarter in turn, then what the longer quarters have left.
template <typename F>
inline void quarters(int64_t n, int64_t qn, F&& f) {
  const int64_t last = n - (kQuarters - 1) * qn;
  int64_t t = 0;
  for (; t < last; ++t) {
    for (int q = 0; q < kQuarters; ++q) f(q, q * qn + t);
  }
  for (int q = 0; q < kQuarters; ++q) {
    const int64_t lo = std::min(n, q * qn);
    const int64_t hi = std::min(n, lo + qn);
    for (int64_t i = lo + std::min(t, hi - lo); i < hi; ++i) f(q, i);
  }
}

// Sorts the n items of a ascending by their high 32 bits (the key), stably, using b as scratch; returns the
// array that holds the result.
const uint64_t* radix_sort_row(uint64_t* a, uint64_t* b, int64_t n) {
  uint32_t count[kQuarters][kDigits];
  const int64_t qn = (n + kQuarters - 1) / kQuarters;
  for (int pass = 0; pass < kPasses; ++pass) {
    const int shift = 32 + pass * kDigitBits;
    std::memset(count, 0, sizeof(count));
    quarters(n, qn, [&](int q, int64_t i) { ++count[q][(a[i] >> shift) & (kDigits - 1)]; });
    const uint32_t first = (a[0] >> shift) & (kDigits - 1);
    uint32_t same = 0;
    for (int q = 0; q < kQuarters; ++q) same += count[q][first];
    if (same == uint32_t(n)) continue;  // one digit for the whole row
    uint32_t sum = 0;
    for (uint32_t d = 0; d < kDigits; ++d) {
      for (int q = 0; q < kQuarters; ++q) {
        const uint32_t c = count[q][d];
        count[q][d] = sum;
        sum += c;
      }
    }
    quarters(n, qn, [&](int q, int64_t i) {
      const uint64_t v = a[i];
      b[count[q][(v >> shift) & (kDigits - 1)]++] = v;
    });
    std::swap(a, b);
  }
  return a;
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
    std::vector<uint64_t> buf(size_t(2 * cols));
#if defined(PYMERGE_WITH_OPENMP)
#pragma omp for schedule(static)
#endif
    for (int64_t r = 0; r < rows; ++r) {
      const T* xr = x + r * cols;
      const T* br = base + r * cols;
      uint64_t* items = buf.data();
      for (int64_t c = 0; c < cols; ++c) {
        const uint32_t key = radix::magnitude_key(DTypeTraits<S>::widen(xr[c]) - DTypeTraits<S>::widen(br[c]));
        items[c] = (uint64_t(key) << 32) | uint64_t(c);
      }
      const uint64_t* order = radix_sort_row(items, items + cols, cols);
      float* o = out + r * cols;
      for (int64_t rank = 0; rank < cols; ++rank) {
        o[uint32_t(order[rank])] = low + span * (float(rank) / denom);  // each operation rounded, as the twin's
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
