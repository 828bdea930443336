// CPU DARE / DELLA map (formula in cpu_kernels.h): Philox keep masks, L1 rescale, weights, optional sign
// election, base, narrow, in one pass over the inputs. The CPU twin of csrc/cuda/dare_map.cu. Each element's
// mask word depends only on its flat index (philox.h), so fixed blocks and any thread count give the same bits.
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "gta_tile.h"
#include "philox_words.h"
#include "pymerge/cpu_kernels.h"
#include "pymerge/cpu_parallel.h"
#include "pymerge/dtype.h"
#include "pymerge/philox.h"

namespace pymerge::cpu {
namespace {

using gta::kTile;

struct DareArgs {
  const void* base;
  const void* const* experts;
  int64_t k;
  const float* weights;
  const float* scales;
  const float* limits;
  const float* const* probs;  // null, or per expert null / n fp32 probabilities
  uint64_t seed;
  const uint32_t* models;
  uint32_t name_hash;
  int64_t start;
  float divisor;
  float lambda;
  bool apply_lambda;
  void* out;
  const uint8_t* const* keep_bits;  // null, or per expert null / the L1 pass's mask bits
};

// The eight keep values (1.0f / 0.0f) of each mask byte, bit l -> entry l.
struct BitFloats {
  float row[256][8];
  constexpr BitFloats() : row() {
    for (int b = 0; b < 256; ++b) {
      for (int l = 0; l < 8; ++l) row[b][l] = (b >> l) & 1 ? 1.0f : 0.0f;
    }
  }
};
constexpr BitFloats kBitFloats{};

// keep[i] = 1.0f / 0.0f for elements t .. t + m - 1 of expert j (flat element start + t + i of the tensor).
void keep_tile(const DareArgs& a, int64_t j, int64_t t, int64_t m, float* __restrict keep) {
  const uint8_t* bits = a.keep_bits != nullptr ? a.keep_bits[j] : nullptr;
  if (bits != nullptr) {  // drawn by the L1 pass already (Philox words: ~17 of the ~44 ms for 3 x 16.8M)
    // Eight floats per mask byte from a table: a per-bit shift-and-select loop did not vectorize and took
    // longer than drawing the words again (dare_map 2.8 -> 6.8 s per 1b dare_ties merge).
    int64_t i = 0;
    if ((t & 7) == 0) {  // tiles start at multiples of kTile inside 64K blocks: always, in practice
      for (; i + 8 <= m; i += 8) std::memcpy(keep + i, kBitFloats.row[bits[(t + i) >> 3]], 8 * sizeof(float));
    }
    for (; i < m; ++i) keep[i] = (bits[(t + i) >> 3] >> ((t + i) & 7)) & 1u ? 1.0f : 0.0f;
    return;
  }
  const float* probs = a.probs != nullptr ? a.probs[j] : nullptr;
  if (probs == nullptr) {
    const float limit = a.limits[j];
    for_each_word(a.seed, a.models[j], a.name_hash, a.start + t, m, [keep, limit](int64_t i, uint32_t word) {
      keep[i] = philox::keep(word, limit) ? 1.0f : 0.0f;
    });
  } else {
    const float* p = probs + t;
    for_each_word(a.seed, a.models[j], a.name_hash, a.start + t, m, [keep, p](int64_t i, uint32_t word) {
      keep[i] = philox::keep(word, philox::keep_limit(p[i])) ? 1.0f : 0.0f;
    });
  }
}

// One tile [t, t + m) for K experts in one register-resident loop once the keep masks are drawn (keep holds
// K * kTile floats): tau, mask, rescale, weight, election sum, agreement, (weighted) mean, lambda, base and
// narrow per element, the same operations in the same order as the staged tile below + gta::finish_tile (so
// the same bits), without its passes over L1 scratch per expert. As in ties_map's fused tile, lambda is always
// multiplied (r * 1.0f is r bit for bit) so that GCC vectorizes the loop. The Philox words stay in their own
// vectorized loop (keep_tile): ~17 of the ~44 ms here, when not read from mask bits. A/B on base + 3 x 16.8M
// bf16 (x86-64-v4, 2 threads, best of 11, alternating processes): 48.1-48.6 -> 43.5-44.8 ms with sign election,
// 44.1-45.3 -> 42.4-44.2 ms without.
template <DType S, DType D, Consensus kConsensus, bool kNormalize, int K>
void dare_tile_fused(const DareArgs& a, int64_t t, int64_t m, float* __restrict keep) {
  using SrcT = typename DTypeTraits<S>::storage;
  using DstT = typename DTypeTraits<D>::storage;
  for (int j = 0; j < K; ++j) keep_tile(a, j, t, m, keep + j * kTile);
  const SrcT* __restrict base = static_cast<const SrcT*>(a.base) + t;
  const SrcT* __restrict x[K];
  const float* __restrict kp[K];
  float w[K];
  float scale[K];
  for (int j = 0; j < K; ++j) {
    x[j] = static_cast<const SrcT*>(a.experts[j]) + t;
    kp[j] = keep + j * kTile;
    w[j] = a.weights[j];
    scale[j] = a.scales[j];
  }
  const float divisor = a.divisor;
  const float lambda = a.lambda;
  DstT* __restrict o = static_cast<DstT*>(a.out) + t;
  for (int64_t i = 0; i < m; ++i) {
    const float b = DTypeTraits<S>::widen(base[i]);
    float d[K];
    float sum = 0.0f;
    for (int j = 0; j < K; ++j) {
      const float tau = DTypeTraits<S>::widen(x[j][i]) - b;
      d[j] = ((tau * kp[j][i]) * scale[j]) * w[j];
      const float term = kConsensus == Consensus::Count ? gta::sgn(d[j]) : d[j];
      sum = j == 0 ? term : sum + term;
    }
    const float r = gta::finish_element<K, kNormalize, kConsensus != Consensus::None>(d, w, sum, divisor) * lambda;
    o[i] = DTypeTraits<D>::narrow(b + r);
  }
}

// Experts the fused tile handles (one instantiation each); more experts take the staged tile.
constexpr int64_t kMaxFusedExperts = 4;

// scratch: (k + 5) * kTile floats (the tile's rows plus one for the keep mask).
template <DType S, DType D, Consensus kConsensus, bool kNormalize>
void dare_range(const DareArgs& a, int64_t begin, int64_t end, float* scratch) {
  if (a.k <= kMaxFusedExperts) {
    for (int64_t t = begin; t < end; t += kTile) {
      const int64_t m = std::min(kTile, end - t);
      switch (a.k) {
        case 1: dare_tile_fused<S, D, kConsensus, kNormalize, 1>(a, t, m, scratch); break;
        case 2: dare_tile_fused<S, D, kConsensus, kNormalize, 2>(a, t, m, scratch); break;
        case 3: dare_tile_fused<S, D, kConsensus, kNormalize, 3>(a, t, m, scratch); break;
        default: dare_tile_fused<S, D, kConsensus, kNormalize, 4>(a, t, m, scratch); break;
      }
    }
    return;
  }
  using SrcT = typename DTypeTraits<S>::storage;
  using DstT = typename DTypeTraits<D>::storage;
  const gta::Tile tile(scratch);
  float* __restrict keep = tile.deltas + a.k * kTile;
  const SrcT* __restrict base = static_cast<const SrcT*>(a.base);
  for (int64_t t = begin; t < end; t += kTile) {
    const int64_t m = std::min(kTile, end - t);
    float* __restrict b = tile.b;
    float* __restrict sum = tile.sum;
    for (int64_t i = 0; i < m; ++i) b[i] = DTypeTraits<S>::widen(base[t + i]);
    for (int64_t j = 0; j < a.k; ++j) {
      keep_tile(a, j, t, m, keep);
      const SrcT* __restrict x = static_cast<const SrcT*>(a.experts[j]) + t;
      float* __restrict d = tile.deltas + j * kTile;
      const float scale = a.scales[j];
      const float w = a.weights[j];
      for (int64_t i = 0; i < m; ++i) {
        const float tau = DTypeTraits<S>::widen(x[i]) - b[i];
        const float v = ((tau * keep[i]) * scale) * w;
        d[i] = v;
        const float term = kConsensus == Consensus::Count ? gta::sgn(v) : v;
        sum[i] = j == 0 ? term : sum[i] + term;  // from the first term: a lone -0 stays -0 as in the twin
      }
    }
    gta::finish_tile<D, kNormalize, kConsensus != Consensus::None>(tile, a.weights, a.k, m, a.divisor, a.lambda,
                                                                   a.apply_lambda, static_cast<DstT*>(a.out) + t);
  }
}

}  // namespace

void dare_map(const void* base, const void* const* experts, int64_t k, DType in_dtype, int64_t n,
              const float* weights, const float* scales, const float* limits, const float* const* probs,
              uint64_t seed, const uint32_t* model_ids, uint32_t name_hash, int64_t start, Consensus consensus,
              bool normalize, float divisor, float lambda, void* out, DType out_dtype,
              const uint8_t* const* keep_bits) {
  if (n <= 0 || k <= 0) return;
  const DareArgs args{base, experts, k, weights, scales, limits, probs, seed, model_ids, name_hash, start,
                      divisor, lambda, lambda != 1.0f, out, keep_bits};
  dispatch_dtype(in_dtype, [&](auto s) {
    dispatch_dtype(out_dtype, [&](auto d) {
      constexpr DType S = decltype(s)::value;
      constexpr DType D = decltype(d)::value;
      auto run = [&](auto consensus_tag, auto normalize_tag) {
        constexpr Consensus kConsensus = decltype(consensus_tag)::value;
        constexpr bool kNormalize = decltype(normalize_tag)::value;
        parallel_for_blocks(n, [&](int64_t begin, int64_t end) {
          std::vector<float> scratch(size_t((k + 5) * kTile));
          dare_range<S, D, kConsensus, kNormalize>(args, begin, end, scratch.data());
        });
      };
      auto with_normalize = [&](auto consensus_tag) {
        if (normalize) run(consensus_tag, std::true_type{}); else run(consensus_tag, std::false_type{});
      };
      switch (consensus) {
        case Consensus::Sum: with_normalize(std::integral_constant<Consensus, Consensus::Sum>{}); break;
        case Consensus::Count: with_normalize(std::integral_constant<Consensus, Consensus::Count>{}); break;
        case Consensus::None:
        default: with_normalize(std::integral_constant<Consensus, Consensus::None>{}); break;
      }
    });
  });
}

}  // namespace pymerge::cpu
