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

template <DType S>
void l1_rows(const void* base_ptr, const void* const* experts, int64_t k, int64_t rows, int64_t cols,
             int64_t start, uint64_t seed, const uint32_t* models, uint32_t name_hash, const float* limits,
             const float* const* probs, double* out) {
  using T = typename DTypeTraits<S>::storage;
  const T* base = static_cast<const T*>(base_ptr);
#if defined(PYMERGE_WITH_OPENMP)
#pragma omp parallel for schedule(static) if (rows * cols * k > (int64_t(1) << 16))
#endif
  for (int64_t r = 0; r < rows; ++r) {
    float keep[kStep];
    float mag[kStep];
    const int64_t row0 = r * cols;
    const T* b = base + row0;
    for (int64_t j = 0; j < k; ++j) {
      const T* x = static_cast<const T*>(experts[j]) + row0;
      const float* p = probs != nullptr && probs[j] != nullptr ? probs[j] + row0 : nullptr;
      const float limit = limits[j];
      double all = 0.0, kept = 0.0;  // two independent chains: the adds of both overlap
      for (int64_t c0 = 0; c0 < cols; c0 += kStep) {
        const int64_t m = std::min(kStep, cols - c0);
        float* kp = keep;
        if (p == nullptr) {
          for_each_word(seed, models[j], name_hash, start + row0 + c0, m, [kp, limit](int64_t i, uint32_t word) {
            kp[i] = philox::keep(word, limit) ? 1.0f : 0.0f;
          });
        } else {
          const float* pc = p + c0;
          for_each_word(seed, models[j], name_hash, start + row0 + c0, m, [kp, pc](int64_t i, uint32_t word) {
            kp[i] = philox::keep(word, philox::keep_limit(pc[i])) ? 1.0f : 0.0f;
          });
        }
        for (int64_t i = 0; i < m; ++i) {
          mag[i] = std::fabs(DTypeTraits<S>::widen(x[c0 + i]) - DTypeTraits<S>::widen(b[c0 + i]));
        }
        for (int64_t i = 0; i < m; ++i) {
          all += double(mag[i]);
          kept += double(mag[i] * keep[i]);  // the fp32 product first, as the twin's |tau| * mask
        }
      }
      out[(j * rows + r) * 2] = all;
      out[(j * rows + r) * 2 + 1] = kept;
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
