// Exact top-k by magnitude with two 16-bit radix histograms, shared by host and device code (the pure-torch
// twin and the full description are in pymerge/ops/select.py).
//
// key(x) = the fp32 bit pattern of |x| (sign bit cleared): a uint32 in [0, 2^31) that is monotone in |x|,
// with every NaN above +Inf. The "hi" pass histograms key >> 16 into 65,536 bins; the "lo" pass histograms
// key & 0xFFFF of the keys whose high half equals the bin that holds the k-th largest key. Walking both
// histograms down from the top gives the exact threshold key T and how many elements equal to T to keep.
//
// For bfloat16 data histogrammed as is (no base subtracted), the widened value's low 16 bits are 0, so every
// key falls in lo-bin 0: the hi pass alone already resolves T. A task vector x - base computed in fp32 has
// no such structure, so TIES always needs both passes.
#pragma once

#include <cstdint>

#include "pymerge/dtype_cast.h"

namespace pymerge::radix {

constexpr int64_t kBins = int64_t(1) << 16;

// Threshold keys are int32 in [kKeepAll, kKeepNone]: the keep rule "key > T" then keeps every element when
// T = -1 (k >= n) and none when T = 2^31 - 1 (k = 0), with no special case.
constexpr int32_t kKeepAll = -1;
constexpr int32_t kKeepNone = 0x7FFFFFFF;

PYMERGE_HD inline uint32_t magnitude_key(float x) { return f32_bits(x) & 0x7FFFFFFFu; }
PYMERGE_HD inline uint32_t key_hi(uint32_t key) { return key >> 16; }
PYMERGE_HD inline uint32_t key_lo(uint32_t key) { return key & 0xFFFFu; }

// Strictly above the threshold. Keys are < 2^31, so they compare as int32 with T = -1 included.
PYMERGE_HD inline bool above(uint32_t key, int32_t threshold) { return int32_t(key) > threshold; }

// The tie cutoffs that need no scan (the tie_cutoffs contract in cpu_kernels.h): a negative budget keeps every
// tie (cutoff n), a zero budget none (cutoff -1). Returns false when the budget-th tie must be located.
inline bool trivial_tie_cutoff(int64_t budget, int64_t n, int64_t* cutoff) {
  if (budget < 0) {
    *cutoff = n;
    return true;
  }
  if (budget == 0) {
    *cutoff = -1;
    return true;
  }
  return false;
}

}  // namespace pymerge::radix
