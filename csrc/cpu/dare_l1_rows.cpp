// Per-row L1 norms of DARE/DELLA task vectors before and after masking (formula in cpu_kernels.h): the reduce
// pass behind `rescale: true`. Each row is summed strictly left to right in fp64, the canonical order the torch
// twin (pymerge/ops/exact_sum.py, sequential_row_sums) also uses, so both backends get the same rescale bits;
// rows are independent, so any split of rows over threads gives the same result.
#include <algorithm>
#include <cmath>
#include <cstdint>

#include "philox_words.h"
#include "pymerge/cpu_kernels.h"
#include "pymerge/dtype.h"
#include "pymerge/philox.h"

namespace pymerge::cpu {
namespace {

// Elements per step of a row: the keep mask and |t| of one step are formed in small arrays (the Philox and
// widening loops run without the sums' dependency chain), then added in order. 256 keeps both in L1.
constexpr int64_t kStep = 256;

// Rows summed side by side: each row still adds left to right in its own two chains, but kRows rows give the
// core 2 * kRows independent fp64 add chains instead of 2 (one chain is bound by the add latency: ~4 cycles per
// element). A/B on base + 3 x 16.8M bf16 (4096-wide rows, x86-64-v4 build, 2 threads, best of 14): 1 row
// 50.1 ms, 4 rows 40.1 ms (the rest is the Philox words, ~20 ms, and widening). Storing the rows interleaved so
// the 4 chains form one vector add measured no faster (49.1 ms).
constexpr int64_t kRows = 4;

template <DType S, int64_t R>
void l1_row_group(const void* base_ptr, const void* x_ptr, int64_t r0, int64_t cols, int64_t start, uint64_t seed,
                  uint32_t model, uint32_t name_hash, float limit, const float* probs, double* all_out,
                  double* kept_out) {
  using T = typename DTypeTraits<S>::storage;
  float keep[R][kStep];
  float mag[R][kStep];
  double all[R] = {}, kept[R] = {};
  for (int64_t c0 = 0; c0 < cols; c0 += kStep) {
    const int64_t m = std::min(kStep, cols - c0);
    for (int64_t q = 0; q < R; ++q) {
      const int64_t row0 = (r0 + q) * cols;
      const T* b = static_cast<const T*>(base_ptr) + row0;
      const T* x = static_cast<const T*>(x_ptr) + row0;
      float* kp = keep[q];
      if (probs == nullptr) {
        for_each_word(seed, model, name_hash, start + row0 + c0, m, [kp, limit](int64_t i, uint32_t word) {
          kp[i] = philox::keep(word, limit) ? 1.0f : 0.0f;
        });
      } else {
        const float* pc = probs + row0 + c0;
        for_each_word(seed, model, name_hash, start + row0 + c0, m, [kp, pc](int64_t i, uint32_t word) {
          kp[i] = philox::keep(word, philox::keep_limit(pc[i])) ? 1.0f : 0.0f;
        });
      }
      float* mq = mag[q];
      for (int64_t i = 0; i < m; ++i) {
        mq[i] = std::fabs(DTypeTraits<S>::widen(x[c0 + i]) - DTypeTraits<S>::widen(b[c0 + i]));
      }
    }
    for (int64_t i = 0; i < m; ++i) {
      for (int64_t q = 0; q < R; ++q) {
        all[q] += double(mag[q][i]);
        kept[q] += double(mag[q][i] * keep[q][i]);  // the fp32 product first, as the twin's |tau| * mask
      }
    }
  }
  for (int64_t q = 0; q < R; ++q) {
    all_out[2 * q] = all[q];
    kept_out[2 * q] = kept[q];
  }
}

template <DType S>
void l1_rows(const void* base_ptr, const void* const* experts, int64_t k, int64_t rows, int64_t cols,
             int64_t start, uint64_t seed, const uint32_t* models, uint32_t name_hash, const float* limits,
             const float* const* probs, double* out) {
  const int64_t groups = (rows + kRows - 1) / kRows;
#if defined(PYMERGE_WITH_OPENMP)
#pragma omp parallel for schedule(static) if (rows * cols * k > (int64_t(1) << 16))
#endif
  for (int64_t g = 0; g < groups; ++g) {
    const int64_t r0 = g * kRows;
    for (int64_t j = 0; j < k; ++j) {
      const float* p = probs != nullptr ? probs[j] : nullptr;
      double* o = out + (j * rows + r0) * 2;
      if (r0 + kRows <= rows) {
        l1_row_group<S, kRows>(base_ptr, experts[j], r0, cols, start, seed, models[j], name_hash, limits[j], p, o,
                               o + 1);
      } else {
        for (int64_t r = r0; r < rows; ++r, o += 2) {
          l1_row_group<S, 1>(base_ptr, experts[j], r, cols, start, seed, models[j], name_hash, limits[j], p, o,
                             o + 1);
        }
      }
    }
  }
}

}  // namespace

void dare_l1_rows(const void* base, const void* const* experts, int64_t k, DType dtype, int64_t rows,
                  int64_t cols, int64_t start, uint64_t seed, const uint32_t* model_ids, uint32_t name_hash,
                  const float* limits, const float* const* probs, double* out) {
  if (rows <= 0 || k <= 0) return;
  dispatch_dtype(dtype, [&](auto s) {
    l1_rows<decltype(s)::value>(base, experts, k, rows, cols, start, seed, model_ids, name_hash, limits, probs,
                                out);
  });
}

}  // namespace pymerge::cpu
