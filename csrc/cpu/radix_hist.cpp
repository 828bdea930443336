// CPU radix histograms of magnitude keys (radix_select.h), for the exact top-k thresholds of TIES and the
// other magnitude sparsifiers. Every thread counts its blocks into private uint32 histograms, added into the
// caller's int64 histograms at the end: integer sums, so the result is independent of the thread count.
#include <algorithm>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <vector>

#include "pymerge/cpu_kernels.h"
#include "pymerge/cpu_parallel.h"
#include "pymerge/dtype.h"
#include "pymerge/radix_select.h"

#if defined(PYMERGE_WITH_OPENMP)
#include <omp.h>
#endif

namespace pymerge::cpu {
namespace {

// Keys are computed for a tile first (a loop the compiler vectorizes), then counted (a scatter it cannot).
constexpr int64_t kTile = 1024;
constexpr int64_t kGroup = 32;

// A private uint32 bin could overflow after 2^32 elements: flush to int64 well before that.
constexpr int64_t kFlushEvery = (int64_t(std::numeric_limits<uint32_t>::max()) / kParallelBlock) - 1;

// Private histograms have kWays interleaved copies: element i counts into copy i % kWays. Task vectors of
// bf16 checkpoints take few distinct magnitudes, so consecutive keys often hit the same bin, and increments
// of one counter form a serial load-add-store chain; four copies run four chains side by side.
constexpr int64_t kWays = 4;

template <DType S, bool kTau, int64_t Ways, typename Count>
void hist_range(const void* x_ptr, const void* base_ptr, int64_t begin, int64_t end, int32_t hi_bin,
                Count* hist) {
  using T = typename DTypeTraits<S>::storage;
  const T* __restrict x = static_cast<const T*>(x_ptr);
  const T* __restrict base = static_cast<const T*>(base_ptr);
  uint32_t keys[kTile];
  for (int64_t t = begin; t < end; t += kTile) {
    const int64_t m = std::min(kTile, end - t);
    if (kTau) {
      for (int64_t i = 0; i < m; ++i) {
        keys[i] = radix::magnitude_key(DTypeTraits<S>::widen(x[t + i]) - DTypeTraits<S>::widen(base[t + i]));
      }
    } else {
      for (int64_t i = 0; i < m; ++i) keys[i] = radix::magnitude_key(DTypeTraits<S>::widen(x[t + i]));
    }
    if (hi_bin < 0) {
      for (int64_t i = 0; i < m; ++i) ++hist[((i % Ways) << 16) | radix::key_hi(keys[i])];
    } else {
      // In fp32 data few keys fall in the one bin the lo pass looks at: test groups of kGroup keys with a
      // vector compare and skip the groups that hold none. In bf16/f16 data the bin is often dense, so a
      // group that holds some is counted without a per-key branch: keys outside the bin go to a dummy
      // counter per way.
      const uint32_t want = uint32_t(hi_bin);
      Count dummy[Ways] = {};
      for (int64_t g = 0; g < m; g += kGroup) {
        const int64_t g_end = std::min(m, g + kGroup);
        uint32_t any = 0;
        for (int64_t i = g; i < g_end; ++i) any |= radix::key_hi(keys[i]) == want ? 1u : 0u;
        if (any == 0) continue;
        for (int64_t i = g; i < g_end; ++i) {
          const int64_t way = i % Ways;
          Count* slot = radix::key_hi(keys[i]) == want ? &hist[(way << 16) | radix::key_lo(keys[i])] : &dummy[way];
          ++*slot;
        }
      }
    }
  }
}

// hist holds k * Ways * kBins counters: input j's copies start at j * Ways * kBins.
// The sample of radix_hist's sample_shift: the first kSampleSpan >> shift elements of every kSampleSpan. Short
// runs spread evenly, so every row of a weight matrix contributes (rows may differ in scale).
constexpr int64_t kSampleSpan = 4096;

template <DType S, int64_t Ways, typename Count>
void hist_all(const void* const* xs, int64_t k, const void* base, const int32_t* hi_bins, int64_t begin,
              int64_t end, Count* hist, int shift) {
  const int64_t run = kSampleSpan >> shift;
  for (int64_t j = 0; j < k; ++j) {
    const int32_t hi_bin = hi_bins == nullptr ? -1 : hi_bins[j];
    Count* h = hist + j * Ways * radix::kBins;
    for (int64_t b = begin; b < end; b += (shift == 0 ? end - begin : kSampleSpan)) {
      const int64_t e = shift == 0 ? end : std::min(end, b + run);
      if (base != nullptr) {
        hist_range<S, true, Ways>(xs[j], base, b, e, hi_bin, h);
      } else {
        hist_range<S, false, Ways>(xs[j], nullptr, b, e, hi_bin, h);
      }
    }
  }
}

}  // namespace

void radix_hist(const void* const* xs, int64_t k, const void* base, DType dtype, int64_t n,
                const int32_t* hi_bins, int64_t* hist, int sample_shift) {
  if (n <= 0 || k <= 0) return;
  const int shift = sample_shift;
  const int64_t num_blocks = (n + kParallelBlock - 1) / kParallelBlock;
  dispatch_dtype(dtype, [&](auto tag) {
    constexpr DType S = decltype(tag)::value;
    auto count_parallel = [&](auto ways_tag) {
      constexpr int64_t Ways = decltype(ways_tag)::value;
      // Private uint32 histograms (Ways copies each) per thread, added into the int64 ones at the end.
      const int64_t bins = k * radix::kBins;
#if defined(PYMERGE_WITH_OPENMP)
#pragma omp parallel
#endif
      {
        std::vector<uint32_t> local(size_t(bins * Ways), 0u);
        int64_t since_flush = 0;
        auto flush = [&](bool last) {
#if defined(PYMERGE_WITH_OPENMP)
#pragma omp critical(pymerge_radix_hist)
#endif
          for (int64_t j = 0; j < k; ++j) {
            for (int64_t w = 0; w < Ways; ++w) {
              const uint32_t* src = local.data() + (j * Ways + w) * radix::kBins;
              int64_t* dst = hist + j * radix::kBins;
              for (int64_t b = 0; b < radix::kBins; ++b) dst[b] += src[b];
            }
          }
          if (!last) std::fill(local.begin(), local.end(), 0u);
          since_flush = 0;
        };
#if defined(PYMERGE_WITH_OPENMP)
#pragma omp for schedule(static)
#endif
        for (int64_t blk = 0; blk < num_blocks; ++blk) {
          const int64_t begin = blk * kParallelBlock;
          hist_all<S, Ways>(xs, k, base, hi_bins, begin, std::min(n, begin + kParallelBlock), local.data(), shift);
          // Every copy of a bin counts at most kParallelBlock / Ways per block; flushing every kFlushEvery
          // blocks keeps each uint32 far from overflow.
          if (++since_flush >= kFlushEvery) flush(false);
        }
        if (since_flush > 0) flush(true);
      }
    };
    if (num_blocks > 1) {
      // A sample counts 1/2^shift of the keys into the same bins: the copies' zeroing and merging, fixed costs
      // per call, would outweigh the few repeated-bin chains they break (A/B, 3 x 16.8M bf16, shift 4, best of
      // 18: four copies 3.3 ms, one 2.8 ms).
      if (shift > 0) {
        count_parallel(std::integral_constant<int64_t, 1>{});
      } else {
        count_parallel(std::integral_constant<int64_t, kWays>{});
      }
      return;
    }
    hist_all<S, 1>(xs, k, base, hi_bins, 0, n, hist, shift);  // one block: count straight into the int64 bins
  });
}

}  // namespace pymerge::cpu
