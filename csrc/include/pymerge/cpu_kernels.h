// CPU kernels (csrc/cpu/). Raw pointers and sizes only; the caller (csrc/bindings.cpp) has checked every
// precondition listed here, so the kernels do not check again.
#pragma once

#include <cstdint>

#include "pymerge/consensus.h"
#include "pymerge/dtype.h"

namespace pymerge::cpu {

// dst[i] = narrow<dst_dtype>(widen<src_dtype>(src[i])) for i < n (round to nearest even).
// Pre: n >= 0; src/dst non-null when n > 0; the two ranges do not overlap.
void cast(const void* src, DType src_dtype, void* dst, DType dst_dtype, int64_t n);

// out[i] = narrow<out_dtype>(acc_i [/ weight_sum if normalize]) where, in fp32 with every mul and add
// rounded separately (no FMA), acc_i = w[0]*x_0[i], then acc_i = acc_i + w[j]*x_j[i] for j = 1..k-1.
// Pre: k >= 1; n >= 0; inputs[j] (all of in_dtype) and out non-null when n > 0; out overlaps no input
// (except being exactly inputs[j] with in_dtype == out_dtype); weight_sum != 0 when normalize.
void weighted_sum(const void* const* inputs, const float* weights, int64_t k, DType in_dtype, void* out,
                  DType out_dtype, int64_t n, bool normalize, float weight_sum);

// ---- Philox random stream (philox.h has the contract) ----

// out[i] = (word of flat element start + i) >> 8 for i < count: the 24-bit uniforms of one model's tensor.
// Pre: start >= 0; count >= 0; out non-null when count > 0.
void philox_uniform24(uint64_t seed, uint32_t model, uint32_t name_hash, int64_t start, int64_t count,
                      uint32_t* out);

// out[i] = 1 if float(word >> 8) < prob * 2^24 else 0 (fp32 compare) for flat elements start + i, i < count.
// Pre: as philox_uniform24.
void philox_keep_mask(uint64_t seed, uint32_t model, uint32_t name_hash, int64_t start, int64_t count,
                      float prob, uint8_t* out);

// ---- Radix histograms of magnitude keys (radix_select.h) ----

// For each input j < k, with key_j[i] = magnitude_key(widen(xs[j][i]) [- widen(base[i]) when base != null],
// the difference in fp32):
//   hi pass (hi_bins == nullptr): hist[j * 65536 + (key >> 16)] += 1 for every i < n;
//   lo pass: hist[j * 65536 + (key & 0xFFFF)] += 1 for the i whose key >> 16 == hi_bins[j].
// Counts are added to what hist holds. Per-thread private histograms, merged at the end: the result does not
// depend on the thread count. With sample_shift = s > 0 only a sample is counted: the elements i with
// i % 4096 < 4096 >> s.
// Pre: k >= 1; n >= 0; xs[j] (and base) non-null when n > 0, all of `dtype`; hist holds k * 65536 int64;
// 0 <= hi_bins[j] < 65536; 0 <= sample_shift < 16.
void radix_hist(const void* const* xs, int64_t k, const void* base, DType dtype, int64_t n,
                const int32_t* hi_bins, int64_t* hist, int sample_shift = 0);

// The full-resolution pass of a bracketed top-k selection (pymerge/ops/native_cpu.py, MagnitudeTopK): for each
// selection j < k over xs[j] (keys as in radix_hist, base subtracted when non-null), with the bracket
// [lo_keys[j], hi_keys[j]):
//   above[j] += #{i : key >= hi_keys[j]};  nonfinite[j] += #{i : key >= 0x7F800000 (|x - base| is Inf or NaN)};
//   the keys inside the bracket are appended, as int32, to out[j][filled[j]..) in no particular order, and
//   filled[j] grows by their count; keys past capacity[j] are counted but not stored (filled[j] > capacity[j]
//   then says the buffer overflowed).
// The keys of one block of kParallelBlock elements (cpu_parallel.h) are stored contiguously, in flat order;
// when spans (or spans[j]) is non-null, spans[j][2b] and spans[j][2b + 1] receive where block b's keys start in
// out[j] and how many there are (ceil(n / kParallelBlock) blocks): with them the caller finds which block holds
// the r-th key equal to some value in flat order without reading the data again (the TIES tie cutoff).
// Several selections may read the same input. Counts, the multiset of stored keys and each block's keys (when
// none overflowed) are independent of the thread count. Pre: k >= 1; n >= 0; pointers non-null when n > 0;
// lo_keys[j] <= hi_keys[j] <= 2^31; out[j] holds capacity[j] int32.
void radix_bracket(const void* const* xs, int64_t k, const void* base, DType dtype, int64_t n,
                   const uint32_t* lo_keys, const uint32_t* hi_keys, int32_t* const* out, const int64_t* capacity,
                   int64_t* filled, int64_t* above, int64_t* nonfinite, int64_t* const* spans = nullptr);

// ---- TIES map (trim, elect, disjoint mean) ----

// Where each expert's tie budget ends: "keep the first tie_budgets[j] elements whose task-vector key
// magnitude_key(widen(experts[j][i]) - widen(base[i])) equals thresh_keys[j], in flat order" becomes "keep the
// ties at i <= cutoffs[j]", which ties_map applies without any running state. Per expert j:
//   tie_budgets[j] < 0 (keep every tie): cutoffs[j] = n, the budget stays < 0;
//   tie_budgets[j] == 0: cutoffs[j] = -1;
//   else, if the budget-th tie is at index i: cutoffs[j] = i and tie_budgets[j] = 0; if [0, n) holds only
//   c < budget ties: cutoffs[j] = n and tie_budgets[j] -= c (what a following chunk may still keep).
// The scan reads the inputs in parallel waves and stops at the last cutoff found; exact counts make the
// result independent of the thread count. Pre: k >= 1; n >= 0; pointers non-null when n > 0; a positive
// budget comes with a threshold key in [0, 2^31 - 1).
void tie_cutoffs(const void* base, const void* const* experts, int64_t k, DType dtype, int64_t n,
                 const int32_t* thresh_keys, int64_t* tie_budgets, int64_t* cutoffs);

// One fused pass over i < n, fp32 math with every operation rounded separately (no FMA):
//   t_j  = widen(x_j[i]) - widen(base[i]);  key_j = magnitude_key(t_j)
//   keep_j = key_j > T_j, or key_j == T_j and i <= cutoffs[j]         (T_j = thresh_keys[j])
//   d_j  = (t_j * keep_j) * w_j                     (keep as 1.0f / 0.0f)
//   s    = d_0 + d_1 + ... (in order);  gamma = s >= 0 ? +1 : -1;  a_j = sgn(d_j) == gamma (1.0f / 0.0f)
//   m    = d_0 * a_0 + d_1 * a_1 + ...;  v = w_0 * a_0 + w_1 * a_1 + ...  (in order; v == 0 -> 1)
//   r    = normalize ? m / v : m;  r = r * lambda (skipped when lambda == 1);  out[i] = narrow(base + r)
// Without consensus (plain task arithmetic on the trimmed vectors): m = s, v = w_0 + w_1 + ... (a constant;
// |v| < 1e-8 -> 1).
// The sums start from their first term, not from 0, so -0 survives as in the torch twin. Any cutoff is
// valid: < 0 keeps no tie, >= n - 1 keeps all. Pre: k >= 1; n >= 0; pointers non-null when n > 0;
// -1 <= thresh_keys[j] <= 2^31 - 1; weights and lambda finite; out overlaps no input except by being
// exactly base or an expert with in_dtype == out_dtype.
// Breadcrumbs' band (inner_keys != null): keep_j additionally requires NOT (key_j > I_j, or key_j == I_j and
// i <= inner_cutoffs[j]) with I_j = inner_keys[j]: the top k_outer minus the top k_inner.
void ties_map(const void* base, const void* const* experts, int64_t k, DType in_dtype, int64_t n,
              const float* weights, const int32_t* thresh_keys, const int64_t* cutoffs, float lambda,
              bool normalize, bool consensus, void* out, DType out_dtype, const int32_t* inner_keys = nullptr,
              const int64_t* inner_cutoffs = nullptr);

// ---- DARE / DELLA (random and magnitude-ranked random sparsifiers) ----

// For i < n, element e = start + i of the tensor, fp32 with every operation rounded separately (no FMA):
//   t_j = widen(x_j[i]) - widen(base[i])
//   keep_j = float(word_j(e) >> 8) < L_j,  word_j = philox stream (seed, model_ids[j], name_hash) (philox.h),
//            L_j = limits[j] (= fp32(p_j) * 2^24), or probs[j][i] * 2^24 when probs && probs[j] (DELLA)
//   d_j = ((t_j * keep_j) * scales[j]) * weights[j]                      (keep as 1.0f / 0.0f)
//   Sum / Count: s = d_0 + d_1 + ... (Count: sgn(d_0) + ..., sgn as torch.sign: 0 for zeros and NaN);
//                gamma = s >= 0 ? +1 : -1; a_j = sgn(d_j) == gamma; m = sum_j d_j a_j; v = sum_j w_j a_j (0 -> 1)
//   None:        m = d_0 + d_1 + ...;  v = divisor
//   r = normalize ? m / v : m;  r = r * lambda (skipped when lambda == 1);  out[i] = narrow(base + r)
// All sums run in expert order from their first term. The CPU twin of pymerge::cuda::dare_map (same bits).
// Pre: k >= 1; n >= 0; pointers non-null when n > 0; start >= 0; probs[j] (when given) holds n floats;
// weights, scales, lambda finite; divisor non-zero when normalize without consensus; out as for ties_map.
// keep_bits (optional; per expert null or a mask written by dare_l1_rows for this chunk): expert j's keep_j(i) is
// bit i of keep_bits[j] (bit i % 8 of byte i / 8) instead of a Philox draw, the same value without drawing it
// again. keep_bits[j] then holds ceil(n / 8) bytes.
void dare_map(const void* base, const void* const* experts, int64_t k, DType in_dtype, int64_t n,
              const float* weights, const float* scales, const float* limits, const float* const* probs,
              uint64_t seed, const uint32_t* model_ids, uint32_t name_hash, int64_t start, Consensus consensus,
              bool normalize, float divisor, float lambda, void* out, DType out_dtype,
              const uint8_t* const* keep_bits = nullptr);

// The L1 norms behind DARE/DELLA's rescale, per expert j and row r of a [rows, cols] chunk whose first element
// is flat element `start` of the tensor (t_j and keep_j as in dare_map, element e = start + r * cols + c):
//   out[(j * rows + r) * 2]     = sum_c double(|t_j|)
//   out[(j * rows + r) * 2 + 1] = sum_c double(|t_j| * keep_j)      (the fp32 product, then widened)
// each summed in fp64 in the canonical order the torch twin also uses (exact_sum.lane_row_sums): kL1Lanes
// partial sums, lane l adding the columns c = l (mod kL1Lanes) in increasing order from 0.0, then combined as
// ((s0 + s1) + (s2 + s3)) + ((s4 + s5) + (s6 + s7)).
// Pre: k >= 1; rows, cols >= 0; pointers non-null when rows * cols > 0; out holds k * rows * 2 doubles.
// keep_bits (optional; per expert null or a buffer of rows * cols / 8 bytes, cols a multiple of 8): receives
// keep_j of element r * cols + c as bit (r * cols + c) (bit e % 8 of byte e / 8), for dare_map to reuse.
void dare_l1_rows(const void* base, const void* const* experts, int64_t k, DType dtype, int64_t rows,
                  int64_t cols, int64_t start, uint64_t seed, const uint32_t* model_ids, uint32_t name_hash,
                  const float* limits, const float* const* probs, double* out, uint8_t* const* keep_bits = nullptr);

// DELLA's keep probabilities for a [rows, cols] chunk, ranking each row (the tensor's dim 1):
//   key[r][c] = magnitude_key(widen(x[r][c]) - widen(base[r][c]))  (fp32 difference)
//   rank[r][c] = position of c in the row sorted ascending by key, equal keys by index (a stable argsort)
//   out[r][c] = low + span * (float(rank) / denom)                 (fp32, each operation rounded)
// with low = fp32(density - epsilon), span = fp32(2 * epsilon), denom = fp32(max(cols - 1, 1)).
// Pre: rows, cols >= 0; cols < 2^32; pointers non-null when rows * cols > 0; out holds rows * cols floats.
void della_probs(const void* base, const void* x, DType dtype, int64_t rows, int64_t cols, float low, float span,
                 float denom, float* out);

// ---- NaN/Inf policy ----

// counts[j] = number of i < n whose stored element xs[j][i] is Inf or NaN (exponent field all ones).
// Pre: k >= 1; n >= 0; xs[j] non-null when n > 0, all of `dtype`; counts holds k int64.
void count_nonfinite(const void* const* xs, int64_t k, DType dtype, int64_t n, int64_t* counts);

// Number of threads the OpenMP kernels use (1 without OpenMP).
int max_threads();

}  // namespace pymerge::cpu
