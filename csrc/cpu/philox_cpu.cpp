// CPU Philox stream (philox.h): 24-bit uniforms and Bernoulli keep-masks for flat elements
// [start, start + count) of one model's tensor. Each element's word depends only on (seed, model, name_hash,
// element), so any split over threads gives the same bits.
#include "pymerge/cpu_kernels.h"
#include "pymerge/cpu_parallel.h"
#include "pymerge/philox.h"

namespace pymerge::cpu {
namespace {

using philox::Words;

// Calls put(i, word) for i < count, the word of element first + i. Philox yields four words per block, so
// a partial block at each end is handled apart and the middle runs whole blocks (a loop without branches).
template <typename Put>
void for_each_word(uint64_t seed, uint32_t model, uint32_t name_hash, int64_t first, int64_t count, Put put) {
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

}  // namespace

void philox_uniform24(uint64_t seed, uint32_t model, uint32_t name_hash, int64_t start, int64_t count,
                      uint32_t* out) {
  if (count <= 0) return;
  // kParallelBlock is a multiple of 4, so every block starts at the same phase within a Philox block.
  parallel_for_blocks(count, [&](int64_t begin, int64_t end) {
    uint32_t* o = out + begin;
    for_each_word(seed, model, name_hash, start + begin, end - begin,
                  [o](int64_t i, uint32_t word) { o[i] = philox::uniform24(word); });
  });
}

void philox_keep_mask(uint64_t seed, uint32_t model, uint32_t name_hash, int64_t start, int64_t count,
                      float prob, uint8_t* out) {
  if (count <= 0) return;
  const float limit = philox::keep_limit(prob);
  parallel_for_blocks(count, [&](int64_t begin, int64_t end) {
    uint8_t* o = out + begin;
    for_each_word(seed, model, name_hash, start + begin, end - begin,
                  [o, limit](int64_t i, uint32_t word) { o[i] = philox::keep(word, limit) ? 1 : 0; });
  });
}

}  // namespace pymerge::cpu
