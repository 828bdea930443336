// Per-row L1 norms of DARE/DELLA task vectors before and after masking (formula in cpu_kernels.h): the reduce
// pass behind `rescale: true`. Each row is summed in fp64 in one fixed order, eight interleaved lanes combined
// pairwise, which the torch twin (pymerge/ops/exact_sum.py, lane_row_sums) reproduces, so both backends get the
// same rescale bits; rows are independent, so any split of rows over threads gives the same result.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "philox_words.h"
#include "pymerge/cpu_kernels.h"
#include "pymerge/dtype.h"
#include "pymerge/philox.h"

namespace pymerge::cpu {
namespace {

// Elements per step of a row: the keep mask and |t| of one step are formed in small arrays (the Philox and
// widening loops run apart from the sums), then added lane by lane. 256 keeps both in L1; a multiple of kLanes.
constexpr int64_t kStep = 256;

// Interleaved fp64 partial sums per row: one vector add of eight lanes per eight elements. The earlier order
// (one chain per row, strictly left to right, four rows side by side for independent chains) was bound by the
// fp64 add latency: on base + 3 x 16.8M bf16 (4096-wide rows, x86-64-v4, 2 threads, best of 15, alternating
// processes) 38.7-41.4 ms against 35.2-35.9 ms now. The rest is mostly the Philox words (~17 ms).
constexpr int64_t kLanes = 8;

// A NaN sum comes out as the one canonical quiet NaN: which of two NaN operands (|x| of a NaN input, or the
// 0 * Inf of a dropped infinite element) an add returns depends on how the compiler ordered the operands, which
// differs between the ISA builds. Only NaN-ness carries meaning here (the merge reports or skips the rescale).
// GCC/Clang vector extensions: one AVX-512 register on x86-64-v4, pairs of SSE2 registers on the baseline build.
typedef float V8f __attribute__((vector_size(32)));
typedef double V8d __attribute__((vector_size(64)));

inline double combine(const V8d& s) {
  const double v = ((s[0] + s[1]) + (s[2] + s[3])) + ((s[4] + s[5]) + (s[6] + s[7]));
  return std::isnan(v) ? std::numeric_limits<double>::quiet_NaN() : v;
}

template <DType S>
void l1_row(const void* base_ptr, const void* x_ptr, int64_t r, int64_t cols, int64_t start, uint64_t seed,
            uint32_t model, uint32_t name_hash, float limit, const float* probs, double* out, uint8_t* bits) {
  using T = typename DTypeTraits<S>::storage;
  alignas(64) float keep[kStep];
  alignas(64) float mag[kStep];
  V8d all = {};  // vector types keep the lanes in registers across the loop (arrays were stored each step)
  V8d kept = {};
  const int64_t row0 = r * cols;
  const T* b = static_cast<const T*>(base_ptr) + row0;
  const T* x = static_cast<const T*>(x_ptr) + row0;
  for (int64_t c0 = 0; c0 < cols; c0 += kStep) {
    const int64_t m = std::min(kStep, cols - c0);
    if (probs == nullptr) {
      for_each_word(seed, model, name_hash, start + row0 + c0, m, [&keep, limit](int64_t i, uint32_t word) {
        keep[i] = philox::keep(word, limit) ? 1.0f : 0.0f;
      });
    } else {
      const float* pc = probs + row0 + c0;
      for_each_word(seed, model, name_hash, start + row0 + c0, m, [&keep, pc](int64_t i, uint32_t word) {
        keep[i] = philox::keep(word, philox::keep_limit(pc[i])) ? 1.0f : 0.0f;
      });
    }
    if (bits != nullptr) {  // the mask, one bit per element, for the map pass (cols % 8 == 0: whole bytes)
      uint8_t* __restrict to = bits + (row0 + c0) / 8;
      int64_t i = 0;
      // A vector compare's lane mask is the packed byte(s) directly; the portable loop below did not vectorize
      // (it cost the 1b dare_ties L1 pass ~0.4 s).
#if defined(__AVX512F__)
      for (; i + 16 <= m; i += 16) {
        const __mmask16 k = _mm512_cmp_ps_mask(_mm512_loadu_ps(keep + i), _mm512_setzero_ps(), _CMP_NEQ_OQ);
        const uint16_t packed = uint16_t(k);
        std::memcpy(to + i / 8, &packed, 2);  // little-endian: elements i..i+7 in the first byte
      }
#elif defined(__AVX2__)
      for (; i + 8 <= m; i += 8) {
        const __m256 v = _mm256_loadu_ps(keep + i);
        to[i / 8] = uint8_t(_mm256_movemask_ps(_mm256_cmp_ps(v, _mm256_setzero_ps(), _CMP_NEQ_OQ)));
      }
#endif
      for (; i < m; i += 8) {
        uint32_t byte = 0;
        for (int64_t l = 0; l < 8; ++l) byte |= (keep[i + l] != 0.0f ? 1u : 0u) << l;
        to[i / 8] = uint8_t(byte);
      }
    }
    for (int64_t i = 0; i < m; ++i) {
      mag[i] = std::fabs(DTypeTraits<S>::widen(x[c0 + i]) - DTypeTraits<S>::widen(b[c0 + i]));
    }
    // The row's tail pads the last group of lanes with zeros: +0.0 leaves every (non-negative) lane unchanged.
    const int64_t padded = (m + kLanes - 1) / kLanes * kLanes;
    for (int64_t i = m; i < padded; ++i) mag[i] = keep[i] = 0.0f;
    for (int64_t i = 0; i < padded; i += kLanes) {
      V8f mg, kp;
      std::memcpy(&mg, mag + i, sizeof(mg));
      std::memcpy(&kp, keep + i, sizeof(kp));
      all += __builtin_convertvector(mg, V8d);
      kept += __builtin_convertvector(mg * kp, V8d);  // the fp32 product first, as the twin's |tau| * mask
    }
  }
  out[0] = combine(all);
  out[1] = combine(kept);
}

template <DType S>
void l1_rows(const void* base_ptr, const void* const* experts, int64_t k, int64_t rows, int64_t cols,
             int64_t start, uint64_t seed, const uint32_t* models, uint32_t name_hash, const float* limits,
             const float* const* probs, double* out, uint8_t* const* keep_bits) {
#if defined(PYMERGE_WITH_OPENMP)
#pragma omp parallel for schedule(static) if (rows * cols * k > (int64_t(1) << 16))
#endif
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t j = 0; j < k; ++j) {
      const float* p = probs != nullptr ? probs[j] : nullptr;
      l1_row<S>(base_ptr, experts[j], r, cols, start, seed, models[j], name_hash, limits[j], p,
                out + (j * rows + r) * 2, keep_bits != nullptr ? keep_bits[j] : nullptr);
    }
  }
}

}  // namespace

void dare_l1_rows(const void* base, const void* const* experts, int64_t k, DType dtype, int64_t rows,
                  int64_t cols, int64_t start, uint64_t seed, const uint32_t* model_ids, uint32_t name_hash,
                  const float* limits, const float* const* probs, double* out, uint8_t* const* keep_bits) {
  if (rows <= 0 || k <= 0) return;
  dispatch_dtype(dtype, [&](auto s) {
    l1_rows<decltype(s)::value>(base, experts, k, rows, cols, start, seed, model_ids, name_hash, limits, probs,
                                out, keep_bits);
  });
}

}  // namespace pymerge::cpu
