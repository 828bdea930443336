// Counter-based Philox4x32-10 (Salmon et al., SC'11) and pymerge's random stream on top of it, shared by
// host and device code. Framework-free: plain integers in, plain integers out.
//
// Stream contract (identical to the pure-torch twin pymerge/ops/philox.py; every backend must match it bit
// for bit, which is what makes random masks independent of chunking, thread count and device):
//   key     = (seed & 0xFFFFFFFF, seed >> 32)                      (seed taken as 64 unsigned bits)
//   counter = (block & 0xFFFFFFFF, block >> 32, model, name_hash),  block = element / 4
//   word    = output word (element % 4) of Philox4x32-10(counter, key)
//   u24     = word >> 8                                             (uniform = u24 * 2^-24, exact in fp32)
//   keep    = float(u24) < prob_f32 * 2^24                          (u < prob, compared in fp32, no rounding)
#pragma once

#include <cstdint>

#include "pymerge/dtype_cast.h"  // PYMERGE_HD

namespace pymerge::philox {

constexpr uint32_t kM0 = 0xD2511F53u;  // round multipliers
constexpr uint32_t kM1 = 0xCD9E8D57u;
constexpr uint32_t kW0 = 0x9E3779B9u;  // Weyl key increments (golden ratio, sqrt(3) - 1)
constexpr uint32_t kW1 = 0xBB67AE85u;
constexpr int kRounds = 10;

// Four 32-bit words: a counter on the way in, the random output on the way out. Plain members (not an
// array) so that a loop over blocks keeps them in registers and can vectorize.
struct Words {
  uint32_t x0, x1, x2, x3;
};

// (high, low) 32-bit halves of the 64-bit product a * m.
PYMERGE_HD inline void mulhilo(uint32_t a, uint32_t m, uint32_t& hi, uint32_t& lo) {
#if defined(__CUDA_ARCH__)
  hi = __umulhi(a, m);
  lo = a * m;
#else
  const uint64_t p = uint64_t(a) * uint64_t(m);
  hi = uint32_t(p >> 32);
  lo = uint32_t(p);
#endif
}

// Philox4x32-10 of one counter under the key (k0, k1): Random123's philox4x32 with 10 rounds.
PYMERGE_HD inline Words philox4x32_10(Words c, uint32_t k0, uint32_t k1) {
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int r = 0; r < kRounds; ++r) {
    if (r != 0) {  // the key schedule bumps the key before every round but the first
      k0 += kW0;
      k1 += kW1;
    }
    uint32_t hi0, lo0, hi1, lo1;
    mulhilo(c.x0, kM0, hi0, lo0);
    mulhilo(c.x2, kM1, hi1, lo1);
    c = Words{hi1 ^ c.x1 ^ k0, lo1, hi0 ^ c.x3 ^ k1, lo0};
  }
  return c;
}

// The four words of stream block `block` (elements 4*block .. 4*block + 3) of one model's tensor.
PYMERGE_HD inline Words stream_block(uint64_t seed, uint32_t model, uint32_t name_hash, uint64_t block) {
  return philox4x32_10(Words{uint32_t(block), uint32_t(block >> 32), model, name_hash}, uint32_t(seed),
                       uint32_t(seed >> 32));
}

// Word `lane` (0..3) of a block.
PYMERGE_HD inline uint32_t word_at(const Words& w, uint32_t lane) {
  return lane == 0 ? w.x0 : lane == 1 ? w.x1 : lane == 2 ? w.x2 : w.x3;
}

// The word of flat element `element` (one Philox call; loops over many elements should use stream_block).
PYMERGE_HD inline uint32_t stream_word(uint64_t seed, uint32_t model, uint32_t name_hash, uint64_t element) {
  return word_at(stream_block(seed, model, name_hash, element >> 2), uint32_t(element & 3u));
}

// 24 uniform bits of a word: the top 24, so that u24 * 2^-24 is an exact fp32 value in [0, 1).
PYMERGE_HD inline uint32_t uniform24(uint32_t word) { return word >> 8; }

// The fp32 bound that keep() compares against: prob * 2^24 (exact: a power-of-two scaling).
PYMERGE_HD inline float keep_limit(float prob) { return prob * 16777216.0f; }

// Bernoulli(prob) draw: u24 < prob * 2^24, i.e. u < prob, in fp32 (u24 < 2^24 converts exactly).
PYMERGE_HD inline bool keep(uint32_t word, float limit) { return float(uniform24(word)) < limit; }

}  // namespace pymerge::philox
