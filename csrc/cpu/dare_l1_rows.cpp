// Per-row L1 norms of DARE/DELLA task vectors before and after masking (formula in cpu_kernels.h): the reduce
// pass behind `rescale: true`. Each row is summed strictly left to right in fp64, the canonical order the torch
// twin (pymerge/ops/exact_sum.py, sequential_row_sums) also uses, so both backends get the same rescale bits;
// rows are independent, so any split of rows over threads gives the same result.
#include <cmath>
#include <cstdint>

#include "philox_words.h"
#include "pymerge/cpu_kernels.h"
#include "pymerge/dtype.h"
#include "pymerge/philox.h"

namespace pymerge::cpu {
namespace {

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
    const int64_t row0 = r * cols;
    const T* b = base + row0;
    for (int64_t j = 0; j < k; ++j) {
      const T* x = static_cast<const T*>(experts[j]) + row0;
      const float* p = probs != nullptr && probs[j] != nullptr ? probs[j] + row0 : nullptr;
      const float limit = limits[j];
      double all = 0.0, kept = 0.0;  // two independent chains: the adds of both overlap
      for_each_word(seed, models[j], name_hash, start + row0, cols, [&](int64_t c, uint32_t word) {
        const float a = std::fabs(DTypeTraits<S>::widen(x[c]) - DTypeTraits<S>::widen(b[c]));
        const bool keep = philox::keep(word, p != nullptr ? philox::keep_limit(p[c]) : limit);
        all += double(a);
        kept += double(a * (keep ? 1.0f : 0.0f));  // fp32 product first, as the twin's |tau| * mask
      });
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
