// CPU TIES map: trim each task vector by its exact top-k threshold, elect the sign of the weighted sum, take
// the disjoint mean, scale, add the base and narrow, in one pass over the inputs (formula in cpu_kernels.h).
// Ties at a threshold are kept up to a flat index (tie_cutoffs.cpp finds it), so every element depends only
// on its own inputs: fixed blocks, any thread count, the same bits.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "pymerge/cpu_kernels.h"
#include "pymerge/cpu_parallel.h"
#include "pymerge/dtype.h"
#include "pymerge/radix_select.h"
#include "gta_tile.h"

namespace pymerge::cpu {
namespace {

using gta::kTile;

struct TiesArgs {
  const void* base;
  const void* const* experts;
  int64_t k;
  const float* weights;
  const int32_t* thresh;
  const int64_t* cutoffs;
  float lambda;
  bool apply_lambda;
  float divisor;  // without consensus: w_0 + w_1 + ... (|.| < 1e-8 -> 1), the same for every element
  void* out;
  const int32_t* inner_thresh;  // breadcrumbs: the top set each expert drops (null: none)
  const int64_t* inner_cutoffs;
};

// d[i] = (tau * keep) * w for one expert over one tile, with keep = key > compare; then the ties at flat
// index <= cutoff when the cutoff falls inside the tile (first..first+m-1). Also adds d into the sign-election
// sum (kFirst: starts it, so a lone -0 stays -0 as in the torch twin).
template <DType S, bool kFirst>
void trim_weight(const typename DTypeTraits<S>::storage* __restrict x, const float* __restrict b,
                 float* __restrict d, float* __restrict sum, int64_t m, int64_t first, int32_t thresh,
                 int64_t cutoff, float w) {
  // Below the cutoff every tie is kept ("key > T - 1", T >= -1 so no overflow); above it none.
  const bool all_ties = cutoff >= first + m - 1;
  const int32_t compare = all_ties ? thresh - 1 : thresh;
  if (all_ties || cutoff < first) {
    for (int64_t i = 0; i < m; ++i) {
      const float tau = DTypeTraits<S>::widen(x[i]) - b[i];
      const float keep = radix::above(radix::magnitude_key(tau), compare) ? 1.0f : 0.0f;
      const float v = (tau * keep) * w;
      d[i] = v;
      sum[i] = kFirst ? v : sum[i] + v;
    }
    return;
  }
  // The one tile (per expert) that holds the cutoff: ties at i <= cutoff - first are kept.
  const int64_t last_tie = cutoff - first;
  const uint32_t tie_key = uint32_t(thresh);
  for (int64_t i = 0; i < m; ++i) {
    const float tau = DTypeTraits<S>::widen(x[i]) - b[i];
    const uint32_t key = radix::magnitude_key(tau);
    const bool keep = radix::above(key, thresh) || (key == tie_key && i <= last_tie);
    const float v = (tau * (keep ? 1.0f : 0.0f)) * w;
    d[i] = v;
    sum[i] = kFirst ? v : sum[i] + v;
  }
}

// Kept by a threshold: key > T, or key == T at flat index <= cutoff (T = -1 matches no key: keys < 2^31).
inline bool kept(uint32_t key, int32_t thresh, int64_t index, int64_t cutoff) {
  return radix::above(key, thresh) || (key == uint32_t(thresh) && index <= cutoff);
}

// As trim_weight for breadcrumbs' band: keep the elements kept by the outer threshold and not by the inner one
// (the top k_outer minus the top k_inner), each with its own tie cutoff.
template <DType S, bool kFirst>
void band_weight(const typename DTypeTraits<S>::storage* __restrict x, const float* __restrict b,
                 float* __restrict d, float* __restrict sum, int64_t m, int64_t first, int32_t outer,
                 int64_t outer_cut, int32_t inner, int64_t inner_cut, float w) {
  for (int64_t i = 0; i < m; ++i) {
    const float tau = DTypeTraits<S>::widen(x[i]) - b[i];
    const uint32_t key = radix::magnitude_key(tau);
    const bool keep = kept(key, outer, first + i, outer_cut) && !kept(key, inner, first + i, inner_cut);
    const float v = (tau * (keep ? 1.0f : 0.0f)) * w;
    d[i] = v;
    sum[i] = kFirst ? v : sum[i] + v;
  }
}

// The common case in one loop with every value in registers: K experts (a compile-time count) and no tie cutoff
// inside [t, t + m), so each expert keeps "key > compare[j] and not key > inner[j]" across the whole tile
// (inner[j] = kKeepNone without a breadcrumbs band: the second test always passes). The same operations in the
// same order as trim_weight / band_weight + gta::finish_tile (so the same bits); A/B on 4 x 16.8M bf16
// (x86-64-v4 build, 2 threads): 41.4 -> 15.5 ms for TIES and 24.7 -> 16.7 ms for the breadcrumbs band against
// the staged tile, which makes a pass over L1 scratch per expert and step.
template <DType S, DType D, bool kNormalize, bool kConsensus, bool kBand, int K>
void ties_tile_fused(const TiesArgs& a, const int32_t* __restrict compare, const int32_t* __restrict inner,
                     int64_t t, int64_t m) {
  using SrcT = typename DTypeTraits<S>::storage;
  using DstT = typename DTypeTraits<D>::storage;
  const SrcT* __restrict base = static_cast<const SrcT*>(a.base) + t;
  const SrcT* __restrict x[K];
  float w[K];
  int32_t cmp[K];
  int32_t cmp_in[K];
  for (int j = 0; j < K; ++j) {
    x[j] = static_cast<const SrcT*>(a.experts[j]) + t;
    w[j] = a.weights[j];
    cmp[j] = compare[j];
    cmp_in[j] = inner[j];
  }
  const float divisor = a.divisor;
  // Always multiplied: r * 1.0f is r bit for bit (a NaN keeps its payload on x86), and GCC 12 vectorizes no
  // loop that selects on the loop-invariant apply_lambda.
  const float lambda = a.lambda;
  DstT* __restrict o = static_cast<DstT*>(a.out) + t;
  for (int64_t i = 0; i < m; ++i) {
    const float b = DTypeTraits<S>::widen(base[i]);
    float d[K];
    float sum = 0.0f;
    for (int j = 0; j < K; ++j) {
      const float tau = DTypeTraits<S>::widen(x[j][i]) - b;
      const uint32_t key = radix::magnitude_key(tau);
      // Without a band the second test is left out at compile time: always evaluated it cost plain TIES ~25%.
      const bool kept = radix::above(key, cmp[j]) && (!kBand || !radix::above(key, cmp_in[j]));
      const float keep = kept ? 1.0f : 0.0f;
      d[j] = (tau * keep) * w[j];
      sum = j == 0 ? d[j] : sum + d[j];
    }
    const float r = gta::finish_element<K, kNormalize, kConsensus>(d, w, sum, divisor) * lambda;
    o[i] = DTypeTraits<D>::narrow(b + r);
  }
}

// Experts the fused tile handles (one instantiation each); more experts take the staged tile.
constexpr int64_t kMaxFusedExperts = 4;

// The comparison that applies a threshold with its tie cutoff to a whole tile [t, t + m) as "key > c": false
// when the cutoff falls inside the tile (the tile then needs the per-index test).
inline bool tile_compare(int32_t thresh, int64_t cutoff, int64_t t, int64_t m, int32_t* c) {
  if (cutoff >= t + m - 1) {
    *c = thresh - 1;  // every tie in the tile is kept ("key > T - 1"; T >= -1, so no overflow)
  } else if (cutoff < t) {
    *c = thresh;      // none is
  } else {
    return false;
  }
  return true;
}

// For a tile [t, t + m): fills compare[j] and inner[j] (kKeepNone without a band) and returns true when no
// expert's tie cutoff, outer or inner, falls inside it.
inline bool uniform_compare(const TiesArgs& a, int64_t t, int64_t m, int32_t* compare, int32_t* inner) {
  for (int64_t j = 0; j < a.k; ++j) {
    if (!tile_compare(a.thresh[j], a.cutoffs[j], t, m, &compare[j])) return false;
    inner[j] = radix::kKeepNone;
    if (a.inner_thresh != nullptr && !tile_compare(a.inner_thresh[j], a.inner_cutoffs[j], t, m, &inner[j])) {
      return false;
    }
  }
  return true;
}

// scratch: (k + 4) * kTile floats.
template <DType S, DType D, bool kNormalize, bool kConsensus>
void ties_range(const TiesArgs& a, int64_t begin, int64_t end, float* scratch) {
  using SrcT = typename DTypeTraits<S>::storage;
  using DstT = typename DTypeTraits<D>::storage;
  const gta::Tile tile(scratch);
  float* __restrict b = tile.b;
  float* __restrict sum = tile.sum;
  float* __restrict deltas = tile.deltas;  // k rows of kTile
  const SrcT* __restrict base = static_cast<const SrcT*>(a.base);
  const bool fusable = a.k <= kMaxFusedExperts;
  int32_t compare[kMaxFusedExperts];
  int32_t inner[kMaxFusedExperts];
  for (int64_t t = begin; t < end; t += kTile) {
    const int64_t m = std::min(kTile, end - t);
    if (fusable && uniform_compare(a, t, m, compare, inner)) {
      const auto fused = [&](auto band_tag) {
        constexpr bool kBand = decltype(band_tag)::value;
        switch (a.k) {
          case 1: ties_tile_fused<S, D, kNormalize, kConsensus, kBand, 1>(a, compare, inner, t, m); break;
          case 2: ties_tile_fused<S, D, kNormalize, kConsensus, kBand, 2>(a, compare, inner, t, m); break;
          case 3: ties_tile_fused<S, D, kNormalize, kConsensus, kBand, 3>(a, compare, inner, t, m); break;
          default: ties_tile_fused<S, D, kNormalize, kConsensus, kBand, 4>(a, compare, inner, t, m); break;
        }
      };
      if (a.inner_thresh != nullptr) {
        fused(std::true_type{});
      } else {
        fused(std::false_type{});
      }
      continue;
    }
    for (int64_t i = 0; i < m; ++i) b[i] = DTypeTraits<S>::widen(base[t + i]);

    // Trim and weight each task vector; the sign-election sum runs in expert order from the first term.
    for (int64_t j = 0; j < a.k; ++j) {
      const SrcT* x = static_cast<const SrcT*>(a.experts[j]) + t;
      float* d = deltas + j * kTile;
      if (a.inner_thresh != nullptr) {
        if (j == 0) {
          band_weight<S, true>(x, b, d, sum, m, t, a.thresh[j], a.cutoffs[j], a.inner_thresh[j], a.inner_cutoffs[j],
                               a.weights[j]);
        } else {
          band_weight<S, false>(x, b, d, sum, m, t, a.thresh[j], a.cutoffs[j], a.inner_thresh[j],
                                a.inner_cutoffs[j], a.weights[j]);
        }
      } else if (j == 0) {
        trim_weight<S, true>(x, b, d, sum, m, t, a.thresh[j], a.cutoffs[j], a.weights[j]);
      } else {
        trim_weight<S, false>(x, b, d, sum, m, t, a.thresh[j], a.cutoffs[j], a.weights[j]);
      }
    }

    gta::finish_tile<D, kNormalize, kConsensus>(tile, a.weights, a.k, m, a.divisor, a.lambda, a.apply_lambda,
                                                static_cast<DstT*>(a.out) + t);
  }
}

}  // namespace

void ties_map(const void* base, const void* const* experts, int64_t k, DType in_dtype, int64_t n,
              const float* weights, const int32_t* thresh_keys, const int64_t* cutoffs, float lambda,
              bool normalize, bool consensus, void* out, DType out_dtype, const int32_t* inner_keys,
              const int64_t* inner_cutoffs) {
  if (n <= 0 || k <= 0) return;
  float divisor = weights[0];
  for (int64_t j = 1; j < k; ++j) divisor = divisor + weights[j];
  if (std::fabs(divisor) < 1e-8f) divisor = 1.0f;  // the torch twin's rule for a vanishing weight sum
  const TiesArgs args{base,    experts, k,      weights,    thresh_keys,  cutoffs,
                      lambda,  lambda != 1.0f, divisor, out, inner_keys, inner_cutoffs};
  dispatch_dtype(in_dtype, [&](auto s) {
    dispatch_dtype(out_dtype, [&](auto d) {
      constexpr DType S = decltype(s)::value;
      constexpr DType D = decltype(d)::value;
      auto run = [&](auto normalize_tag, auto consensus_tag) {
        constexpr bool kNormalize = decltype(normalize_tag)::value;
        constexpr bool kConsensus = decltype(consensus_tag)::value;
        parallel_for_blocks(n, [&](int64_t begin, int64_t end) {
          std::vector<float> scratch(size_t((k + 4) * kTile));
          ties_range<S, D, kNormalize, kConsensus>(args, begin, end, scratch.data());
        });
      };
      if (consensus) {
        if (normalize) run(std::true_type{}, std::true_type{}); else run(std::false_type{}, std::true_type{});
      } else {
        if (normalize) run(std::true_type{}, std::false_type{}); else run(std::false_type{}, std::false_type{});
      }
    });
  });
}

}  // namespace pymerge::cpu
