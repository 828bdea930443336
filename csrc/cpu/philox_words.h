// Walking the Philox stream (philox.h) over a run of flat elements on the CPU, one block of four words per
// Philox call. Shared by the mask kernels (philox_cpu.cpp) and the DARE/DELLA passes (dare_*.cpp).
#pragma once

#include <cstdint>

#include "pymerge/philox.h"

namespace pymerge::cpu {

// Calls put(i, word) for i = 0 .. count - 1 in increasing order, with the word of flat element first + i.
// A partial block at each end is handled apart and the middle runs whole blocks (a loop without branches).
template <typename Put>
inline void for_each_word(uint64_t seed, uint32_t model, uint32_t name_hash, int64_t first, int64_t count,
                          Put&& put) {
  using philox::Words;
  int64_t i = 0;
  uint64_t e = uint64_t(first);
  if ((e & 3u) != 0 && count > 0) {
    const Words w = philox::stream_block(seed, model, name_hash, e >> 2);
    for (; (e & 3u) != 0 && i < count; ++i, ++e) put(i, philox::word_at(w, uint32_t(e & 3u)));
  }
  const int64_t full_blocks = (count - i) / 4;
  const uint64_t block0 = e >> 2;
  for (int64_t b = 0; b < full_blocks; ++b) {
    const Words w = philox::stream_block(seed, model, name_hash, block0 + uint64_t(b));
    const int64_t at = i + 4 * b;
    put(at, w.x0);
    put(at + 1, w.x1);
    put(at + 2, w.x2);
    put(at + 3, w.x3);
  }
  i += 4 * full_blocks;
  e += uint64_t(4 * full_blocks);
  if (i < count) {
    const Words w = philox::stream_block(seed, model, name_hash, e >> 2);
    for (uint32_t lane = 0; i < count; ++i, ++lane) put(i, philox::word_at(w, lane));
  }
}

}  // namespace pymerge::cpu
