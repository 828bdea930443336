// CUDA launchers (csrc/cuda/). Declared without any CUDA header so the C++ binding layer can call them:
// a stream is the opaque CUstream_st*, the same type as cudaStream_t (0 = the legacy default stream).
// Each launcher enqueues its kernel on `stream` of the current device and returns nullptr, or the CUDA
// error text when the launch failed. Preconditions are those of the matching CPU kernel (cpu_kernels.h),
// with device pointers, checked by csrc/bindings.cpp.
#pragma once

#include <cstdint>

#include "pymerge/consensus.h"
#include "pymerge/dtype.h"

struct CUstream_st;

namespace pymerge::cuda {

using Stream = CUstream_st*;

// Inputs and weights travel in the kernel's parameter block (no device allocation), which bounds k.
constexpr int64_t kMaxInputs = 128;

// dst[i] = narrow<dst_dtype>(widen<src_dtype>(src[i])).
const char* cast(const void* src, DType src_dtype, void* dst, DType dst_dtype, int64_t n, Stream stream);

// Same formula and rounding as pymerge::cpu::weighted_sum (bit-identical results). Pre: 1 <= k <= kMaxInputs.
const char* weighted_sum(const void* const* inputs, const float* weights, int64_t k, DType in_dtype,
                         void* out, DType out_dtype, int64_t n, bool normalize, float weight_sum,
                         Stream stream);

// Number of CUDA devices this runtime sees; returns nullptr, or the error text (no driver, driver too old).
const char* device_count(int* count);

// ---- Exact top-k, TIES, DARE/DELLA (csrc/cuda/{radix_hist,tie_cutoffs,ties_map,philox_mask,dare_map}.cu) ----
// Same contracts, rounding and tie rules as the CPU kernels in cpu_kernels.h (fp32 math with every operation
// rounded separately: the outputs are bit-identical). Data pointers are device pointers; per-expert scalars
// (weights, keys, cutoffs, bins) are host arrays copied into the kernel's parameter block.

// Radix histograms of magnitude keys, as pymerge::cpu::radix_hist: hist (device, k * 65536 int64) is added to.
// hi_bins (host) == nullptr: hi pass; else the lo pass inside bin hi_bins[j]. Each block counts one segment
// of one expert into a shared-memory histogram of packed 16-bit counters (at most 65535 elements per segment,
// so no counter overflows), then adds its non-zero bins to hist with 64-bit atomics. Pre: 1 <= k <= kMaxInputs.
const char* radix_hist(const void* const* xs, int64_t k, const void* base, DType dtype, int64_t n,
                       const int32_t* hi_bins, int64_t* hist, Stream stream);

// Device scratch (bytes) that tie_cutoffs needs for n elements and k experts.
int64_t tie_cutoffs_scratch_bytes(int64_t n, int64_t k);

// As pymerge::cpu::tie_cutoffs (thresh_keys, tie_budgets and cutoffs are host arrays). Counts the ties of
// every segment, then one block per expert scans the counts and the segment that holds the budget-th tie.
// Synchronous: waits for `stream` before it returns the results. scratch: a device buffer of at least
// tie_cutoffs_scratch_bytes(n, k) bytes, 8-byte aligned. Pre: 1 <= k <= kMaxInputs.
const char* tie_cutoffs(const void* base, const void* const* experts, int64_t k, DType dtype, int64_t n,
                        const int32_t* thresh_keys, int64_t* tie_budgets, int64_t* cutoffs, void* scratch,
                        int64_t scratch_bytes, Stream stream);

// As pymerge::cpu::ties_map, consensus flag included (weights, thresh_keys, cutoffs: host arrays).
// Pre: 1 <= k <= kMaxInputs.
const char* ties_map(const void* base, const void* const* experts, int64_t k, DType in_dtype, int64_t n,
                     const float* weights, const int32_t* thresh_keys, const int64_t* cutoffs, float lambda,
                     bool normalize, bool consensus, void* out, DType out_dtype, Stream stream);

// As pymerge::cpu::philox_uniform24 / philox_keep_mask (out: device). keep_mask with probs != nullptr (a device
// array of count fp32 probabilities) draws out[i] = float(u24) < probs[i] * 2^24 instead of the scalar prob.
const char* philox_uniform24(uint64_t seed, uint32_t model, uint32_t name_hash, int64_t start, int64_t count,
                             uint32_t* out, Stream stream);
const char* philox_keep_mask(uint64_t seed, uint32_t model, uint32_t name_hash, int64_t start, int64_t count,
                             float prob, const float* probs, uint8_t* out, Stream stream);

// Sign election of dare_map (consensus.h).
using Consensus = pymerge::Consensus;

// Per-expert inputs of dare_map travel in the parameter block: fewer than kMaxInputs fit in its 4 KiB.
constexpr int64_t kMaxDareInputs = 64;

// DARE / DELLA map (the torch twin is pymerge.methods.task_arithmetic with the random / della_magprune
// sparsifier; the Triton twin is triton_kernels/dare_map.py). For i < n, element e = start + i of the tensor,
// fp32 with every operation rounded separately:
//   t_j = widen(x_j[i]) - widen(base[i])
//   keep_j = float(word_j(e) >> 8) < L_j,  word_j = philox stream (seed, model_ids[j], name_hash) (philox.h),
//            L_j = limits[j] (= fp32(p_j) * 2^24), or probs[j][i] * 2^24 when probs && probs[j] (DELLA)
//   d_j = ((t_j * keep_j) * scales[j]) * weights[j]
//   Sum / Count: s = d_0 + d_1 + ... (Count: sgn(d_0) + ..., sgn as torch.sign: 0 for zeros and NaN);
//                gamma = s >= 0 ? +1 : -1; a_j = sgn(d_j) == gamma; m = sum_j d_j a_j; v = sum_j w_j a_j (0 -> 1)
//   None:        m = d_0 + d_1 + ...;  v = divisor
//   r = normalize ? m / v : m;  r = r * lambda (skipped when lambda == 1);  out[i] = narrow(base + r)
// Pre: 1 <= k <= kMaxDareInputs; pointers non-null when n > 0; start >= 0; weights, scales, lambda finite;
// divisor non-zero when normalize without consensus; out as for ties_map.
const char* dare_map(const void* base, const void* const* experts, int64_t k, DType in_dtype, int64_t n,
                     const float* weights, const float* scales, const float* limits, const float* const* probs,
                     uint64_t seed, const uint32_t* model_ids, uint32_t name_hash, int64_t start,
                     Consensus consensus, bool normalize, float divisor, float lambda, void* out, DType out_dtype,
                     Stream stream);

}  // namespace pymerge::cuda
