// The second half of a fused generalized-task-arithmetic tile, shared by the TIES map (ties_map.cpp) and the
// DARE/DELLA map (dare_map.cpp): once each expert's weighted, sparsified delta d_j and the election sum s are
// in the tile's scratch, elect the sign, take the (disjoint) mean, scale, add the base and narrow.
// Formula in cpu_kernels.h (ties_map, dare_map); fp32 with every operation rounded separately (no FMA).
#pragma once

#include <cstdint>

#include "pymerge/dtype.h"

namespace pymerge::cpu::gta {

// Elements per tile: base, election sum, mixed sum, divisor and one row per expert stay in L1 for a handful
// of experts (fp32 scratch of (k + 4) * kTile floats).
constexpr int64_t kTile = 512;

// 1.0f when sgn(d) equals the elected sign (+1 if sum >= 0, else -1; a NaN sum elects -1), else 0.0f; zeros
// and NaN never agree. Both sides are evaluated and combined bitwise: signs are random, so a branch would
// mispredict often, and the branch-free form vectorizes.
inline float agreement(float sum, float d) {
  const bool positive = sum >= 0.0f;
  return ((positive & (d > 0.0f)) | (!positive & (d < 0.0f))) ? 1.0f : 0.0f;
}

// torch.sign in fp32: +1, -1, or 0 for zeros and NaN.
inline float sgn(float d) { return d > 0.0f ? 1.0f : (d < 0.0f ? -1.0f : 0.0f); }

// The per-element tail of the fused (register-resident) tiles, ties_map's and dare_map's: from the K weighted,
// sparsified deltas d[j] and their election sum, the merged update r before lambda. With kConsensus:
// a_j = agreement(sum, d_j), r = sum_j d_j a_j, divided (kNormalize) by sum_j w_j a_j (0 -> 1), both in expert
// order from their first term; otherwise r = sum, divided (kNormalize) by plain_divisor. The same operations
// in the same order as finish_tile.
template <int K, bool kNormalize, bool kConsensus>
inline float finish_element(const float* d, const float* w, float sum, float plain_divisor) {
  if (!kConsensus) return kNormalize ? sum / plain_divisor : sum;
  float mixed = 0.0f;
  float div = 0.0f;
  for (int j = 0; j < K; ++j) {
    const float agree = agreement(sum, d[j]);
    mixed = j == 0 ? d[j] * agree : mixed + d[j] * agree;
    if (kNormalize) div = j == 0 ? w[j] * agree : div + w[j] * agree;
  }
  return kNormalize ? mixed / (div == 0.0f ? 1.0f : div) : mixed;
}

// Scratch rows of one tile.
struct Tile {
  float* b;       // widened base
  float* sum;     // election sum (or, without consensus, the plain sum of the deltas)
  float* mixed;   // sum of agreeing deltas
  float* divisor; // sum of agreeing weights
  float* deltas;  // k rows of kTile: d_j

  explicit Tile(float* scratch)
      : b(scratch), sum(b + kTile), mixed(sum + kTile), divisor(mixed + kTile), deltas(divisor + kTile) {}
};

// Writes out[0..m) from a filled tile. kConsensus: a_j = agreement(sum, d_j), m = sum_j d_j a_j and
// v = sum_j w_j a_j (0 -> 1), both in expert order from their first term; otherwise m = sum and v =
// plain_divisor. r = kNormalize ? m / v : m; r = r * lambda when apply_lambda; out = narrow(b + r).
template <DType D, bool kNormalize, bool kConsensus>
inline void finish_tile(const Tile& s, const float* weights, int64_t k, int64_t m, float plain_divisor,
                        float lambda, bool apply_lambda, typename DTypeTraits<D>::storage* __restrict o) {
  const float* __restrict b = s.b;
  const float* __restrict sum = s.sum;
  float* __restrict mixed = s.mixed;
  float* __restrict divisor = s.divisor;
  if (!kConsensus) {
    for (int64_t i = 0; i < m; ++i) {
      float r = sum[i];
      if (kNormalize) r = r / plain_divisor;
      if (apply_lambda) r = r * lambda;
      o[i] = DTypeTraits<D>::narrow(b[i] + r);
    }
    return;
  }
  for (int64_t j = 0; j < k; ++j) {
    const float* __restrict d = s.deltas + j * kTile;
    const float w = weights[j];
    if (j == 0) {
      for (int64_t i = 0; i < m; ++i) {
        const float agree = agreement(sum[i], d[i]);
        mixed[i] = d[i] * agree;
        if (kNormalize) divisor[i] = w * agree;
      }
    } else {
      for (int64_t i = 0; i < m; ++i) {
        const float agree = agreement(sum[i], d[i]);
        mixed[i] = mixed[i] + d[i] * agree;
        if (kNormalize) divisor[i] = divisor[i] + w * agree;
      }
    }
  }
  for (int64_t i = 0; i < m; ++i) {
    float r = mixed[i];
    if (kNormalize) r = r / (divisor[i] == 0.0f ? 1.0f : divisor[i]);
    if (apply_lambda) r = r * lambda;
    o[i] = DTypeTraits<D>::narrow(b[i] + r);
  }
}

}  // namespace pymerge::cpu::gta
