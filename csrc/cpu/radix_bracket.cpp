// CPU bracket pass of the sampled top-k selection (contract in cpu_kernels.h, radix_bracket): once a sample has
// located the k-th largest key within a narrow key range, one pass over the data counts the keys above that
// bracket and copies out the few keys inside it, from which the caller picks the exact k-th key. That replaces
// the full hi pass (a scatter of every key into 65,536 bins) and the lo pass of the two-pass selection.
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "pymerge/cpu_kernels.h"
#include "pymerge/cpu_parallel.h"
#include "pymerge/dtype.h"
#include "pymerge/radix_select.h"

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace pymerge::cpu {
namespace {

// Keys are computed for a tile first (a loop the compiler vectorizes), then compared and counted.
constexpr int64_t kTile = 1024;
// Keys are tested for the bracket in groups: a group without one (most groups: a bracket holds a few percent of
// the keys) is skipped after one vector compare.
constexpr int64_t kGroup = 32;
constexpr uint32_t kNonfiniteKey = 0x7F800000u;

struct Selection {
  const void* x;
  uint32_t lo;    // the bracket is [lo, lo + span)
  uint32_t span;
  int32_t* out;   // candidate buffer
  int64_t capacity;
};

// One block (at most kParallelBlock elements) of one selection: counts into *above / *nonfinite; the in-bracket
// keys go to staged[0..count), count returned. staged holds kParallelBlock + kGroup keys.
template <DType S>
int64_t bracket_block(const Selection& sel, const void* base_ptr, int64_t begin, int64_t end, int64_t* above,
                      int64_t* nonfinite, uint32_t* __restrict staged) {
  using T = typename DTypeTraits<S>::storage;
  const T* __restrict x = static_cast<const T*>(sel.x);
  const T* __restrict base = static_cast<const T*>(base_ptr);
  const uint32_t lo = sel.lo;
  const uint32_t span = sel.span;
  const uint32_t hi = lo + span;
  uint32_t keys[kTile];
  int64_t n_above = 0;
  int64_t n_nonfinite = 0;
  int64_t count = 0;
  for (int64_t t = begin; t < end; t += kTile) {
    const int64_t m = std::min(kTile, end - t);
    if (base != nullptr) {
      for (int64_t i = 0; i < m; ++i) {
        keys[i] = radix::magnitude_key(DTypeTraits<S>::widen(x[t + i]) - DTypeTraits<S>::widen(base[t + i]));
      }
    } else {
      for (int64_t i = 0; i < m; ++i) keys[i] = radix::magnitude_key(DTypeTraits<S>::widen(x[t + i]));
    }
    uint32_t tile_above = 0;
    uint32_t tile_nonfinite = 0;
    for (int64_t i = 0; i < m; ++i) {
      tile_above += keys[i] >= hi ? 1u : 0u;
      tile_nonfinite += keys[i] >= kNonfiniteKey ? 1u : 0u;
    }
    n_above += tile_above;
    n_nonfinite += tile_nonfinite;
    int64_t g0 = 0;
#if defined(__AVX512F__)
    // x86-64-v4 build: test 16 keys per compare and compact the ones inside with vpcompressd (register form,
    // then a full-width store past the cursor: staged has kGroup spare keys at its end).
    const __m512i lo_v = _mm512_set1_epi32(int32_t(lo));
    const __m512i span_v = _mm512_set1_epi32(int32_t(span));
    for (; g0 + 16 <= m; g0 += 16) {
      const __m512i k16 = _mm512_loadu_si512(static_cast<const void*>(keys + g0));
      const __mmask16 inside = _mm512_cmplt_epu32_mask(_mm512_sub_epi32(k16, lo_v), span_v);
      if (inside == 0) continue;
      _mm512_storeu_si512(static_cast<void*>(staged + count), _mm512_maskz_compress_epi32(inside, k16));
      count += __builtin_popcount(static_cast<unsigned>(inside));
    }
#endif
    for (int64_t g = g0; g < m; g += kGroup) {
      const int64_t g_end = std::min(m, g + kGroup);
      uint32_t any = 0;
      for (int64_t i = g; i < g_end; ++i) any |= (keys[i] - lo) < span ? 1u : 0u;  // wraps below lo: one compare
      if (any == 0) continue;
      // Branch-free compaction: every key is written, the cursor advances past the ones inside (keys land in
      // a group about 1 time in 5 at ~1% inside, too often for a well-predicted branch).
      for (int64_t i = g; i < g_end; ++i) {
        staged[count] = keys[i];
        count += (keys[i] - lo) < span ? 1 : 0;
      }
    }
  }
  *above += n_above;
  *nonfinite += n_nonfinite;
  return count;
}

// Appends a block's staged keys to the selection's buffer: reserve a range, copy what fits (filled may pass
// capacity, which tells the caller the buffer overflowed). Returns where the range starts.
int64_t publish(const Selection& sel, int64_t* filled, const uint32_t* staged, int64_t count) {
  if (count == 0) return 0;
  int64_t at;
#if defined(PYMERGE_WITH_OPENMP)
#pragma omp atomic capture
#endif
  {
    at = *filled;
    *filled += count;
  }
  if (at >= sel.capacity) return at;
  const int64_t fit = std::min(count, sel.capacity - at);
  std::memcpy(sel.out + at, staged, size_t(fit) * sizeof(uint32_t));
  return at;
}

}  // namespace

void radix_bracket(const void* const* xs, int64_t k, const void* base, DType dtype, int64_t n,
                   const uint32_t* lo_keys, const uint32_t* hi_keys, int32_t* const* out, const int64_t* capacity,
                   int64_t* filled, int64_t* above, int64_t* nonfinite, int64_t* const* spans) {
  if (n <= 0 || k <= 0) return;
  std::vector<Selection> sels(static_cast<size_t>(k));
  for (int64_t j = 0; j < k; ++j) sels[j] = Selection{xs[j], lo_keys[j], hi_keys[j] - lo_keys[j], out[j], capacity[j]};
  const int64_t num_blocks = (n + kParallelBlock - 1) / kParallelBlock;
  dispatch_dtype(dtype, [&](auto tag) {
    constexpr DType S = decltype(tag)::value;
    std::vector<int64_t> total_above(static_cast<size_t>(k), 0), total_nonfinite(static_cast<size_t>(k), 0);
#if defined(PYMERGE_WITH_OPENMP)
#pragma omp parallel if (num_blocks > 1)
#endif
    {
      std::vector<int64_t> my_above(static_cast<size_t>(k), 0), my_nonfinite(static_cast<size_t>(k), 0);
      std::vector<uint32_t> staged(size_t(kParallelBlock + kGroup));
#if defined(PYMERGE_WITH_OPENMP)
#pragma omp for schedule(static)
#endif
      for (int64_t blk = 0; blk < num_blocks; ++blk) {
        const int64_t begin = blk * kParallelBlock;
        const int64_t end = std::min(n, begin + kParallelBlock);
        for (int64_t j = 0; j < k; ++j) {
          const int64_t count =
              bracket_block<S>(sels[j], base, begin, end, &my_above[j], &my_nonfinite[j], staged.data());
          const int64_t at = publish(sels[j], &filled[j], staged.data(), count);
          if (spans != nullptr && spans[j] != nullptr) {
            spans[j][2 * blk] = at;
            spans[j][2 * blk + 1] = count;
          }
        }
      }
#if defined(PYMERGE_WITH_OPENMP)
#pragma omp critical(pymerge_radix_bracket)
#endif
      for (int64_t j = 0; j < k; ++j) {
        total_above[j] += my_above[j];
        total_nonfinite[j] += my_nonfinite[j];
      }
    }
    for (int64_t j = 0; j < k; ++j) {
      above[j] += total_above[j];
      nonfinite[j] += total_nonfinite[j];
    }
  });
}

}  // namespace pymerge::cpu
