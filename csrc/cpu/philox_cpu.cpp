// CPU Philox stream (philox.h): 24-bit uniforms and Bernoulli keep-masks for flat elements
// [start, start + count) of one model's tensor. Each element's word depends only on (seed, model, name_hash,
// element), so any split over threads gives the same bits.
#include "pymerge/cpu_kernels.h"
#include "pymerge/cpu_parallel.h"
#include "pymerge/philox.h"
#include "philox_words.h"

namespace pymerge::cpu {

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
