// CUDA tie cutoffs (contract in cpu_kernels.h): the flat index of the budget-th element whose task-vector key
// equals the threshold, per expert, so that the map pass keeps ties with a plain index comparison.
// Two kernels: every block counts the ties of one segment of one expert; then one block per expert prefix-sums
// the segment counts, finds the segment where the budget runs out, and prefix-sums that segment's elements to
// find the exact index. Exact integer counts: the same cutoffs as the CPU scan.
#include <cub/block/block_scan.cuh>
#include <cuda_runtime.h>

#include <cstdint>
#include <vector>

#include "launch.cuh"
#include "pymerge/cuda_kernels.h"
#include "pymerge/dtype.h"
#include "pymerge/radix_select.h"

namespace pymerge::cuda {
namespace {

constexpr int64_t kSegment = 8192;
constexpr int kCountThreads = 256;
constexpr int kFindThreads = 1024;
constexpr int64_t kPerThread = kSegment / kFindThreads;  // elements of the found segment per thread

struct CutoffParams {
  const void* experts[kMaxInputs];  // the experts that still have a positive budget, compacted
  int64_t budgets[kMaxInputs];
  uint32_t keys[kMaxInputs];
  const void* base;
};

template <DType S>
__device__ __forceinline__ bool is_tie(const CutoffParams& p, int j, int64_t i) {
  using T = typename DTypeTraits<S>::storage;
  const float t = __fsub_rn(DTypeTraits<S>::widen(static_cast<const T*>(p.experts[j])[i]),
                            DTypeTraits<S>::widen(static_cast<const T*>(p.base)[i]));
  return radix::magnitude_key(t) == p.keys[j];
}

template <DType S>
__global__ void __launch_bounds__(kCountThreads)
    count_ties_kernel(const CutoffParams p, int64_t n, int64_t segments, long long* __restrict__ counts) {
  const int j = blockIdx.y;
  const int64_t begin = int64_t(blockIdx.x) * kSegment;
  const int64_t end = begin + kSegment < n ? begin + kSegment : n;
  long long c = 0;
  for (int64_t i = begin + threadIdx.x; i < end; i += blockDim.x) c += is_tie<S>(p, j, i) ? 1 : 0;
  for (int offset = 16; offset > 0; offset /= 2) c += __shfl_down_sync(0xFFFFFFFFu, c, offset);
  __shared__ long long warp_sums[kCountThreads / 32];
  if ((threadIdx.x & 31) == 0) warp_sums[threadIdx.x / 32] = c;
  __syncthreads();
  if (threadIdx.x == 0) {
    long long total = 0;
    for (int w = 0; w < kCountThreads / 32; ++w) total += warp_sums[w];
    counts[int64_t(j) * segments + blockIdx.x] = total;
  }
}

template <DType S>
__global__ void __launch_bounds__(kFindThreads)
    find_cutoff_kernel(const CutoffParams p, int64_t n, int64_t segments, const long long* __restrict__ counts,
                       long long* __restrict__ results) {
  using Scan = cub::BlockScan<long long, kFindThreads>;
  __shared__ typename Scan::TempStorage scan_storage;
  __shared__ long long found_segment, ties_before, found_index;
  const int j = blockIdx.x;
  const long long budget = p.budgets[j];
  const long long* c = counts + int64_t(j) * segments;
  if (threadIdx.x == 0) {
    found_segment = -1;
    found_index = -1;
  }
  // 1. Which segment holds the budget-th tie: each thread sums a contiguous run of segment counts.
  const int64_t per = (segments + kFindThreads - 1) / kFindThreads;
  const int64_t lo = int64_t(threadIdx.x) * per;
  const int64_t hi = lo + per < segments ? lo + per : segments;
  long long own = 0;
  for (int64_t s = lo; s < hi; ++s) own += c[s];
  long long before = 0, total = 0;
  Scan(scan_storage).ExclusiveSum(own, before, total);
  __syncthreads();
  if (before < budget && budget <= before + own) {  // exactly one thread
    long long acc = before;
    for (int64_t s = lo; s < hi; ++s) {
      if (acc + c[s] >= budget) {
        found_segment = s;
        ties_before = acc;
        break;
      }
      acc += c[s];
    }
  }
  __syncthreads();
  if (found_segment < 0) {  // fewer ties than the budget: all kept, the rest is left to the next chunk
    if (threadIdx.x == 0) {
      results[2 * j] = n;
      results[2 * j + 1] = budget - total;
    }
    return;
  }
  // 2. Where in that segment: each thread counts kPerThread consecutive elements.
  const long long need = budget - ties_before;  // 1-based rank of the wanted tie within the segment
  const int64_t first = found_segment * kSegment + int64_t(threadIdx.x) * kPerThread;
  const int64_t last = first + kPerThread < n ? first + kPerThread : n;
  long long mine = 0;
  for (int64_t i = first; i < last; ++i) mine += is_tie<S>(p, j, i) ? 1 : 0;
  long long earlier = 0;
  Scan(scan_storage).ExclusiveSum(mine, earlier);
  if (earlier < need && need <= earlier + mine) {
    long long acc = earlier;
    for (int64_t i = first; i < last; ++i) {
      if (is_tie<S>(p, j, i) && ++acc == need) {
        found_index = i;
        break;
      }
    }
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    results[2 * j] = found_index;
    results[2 * j + 1] = 0;
  }
}

int64_t segments_for(int64_t n) { return (n + kSegment - 1) / kSegment; }

}  // namespace

int64_t tie_cutoffs_scratch_bytes(int64_t n, int64_t k) {
  return (k * segments_for(n < 0 ? 0 : n) + 2 * k) * int64_t(sizeof(long long));
}

const char* tie_cutoffs(const void* base, const void* const* experts, int64_t k, DType dtype, int64_t n,
                        const int32_t* thresh_keys, int64_t* tie_budgets, int64_t* cutoffs, void* scratch,
                        int64_t scratch_bytes, Stream stream) {
  if (k > kMaxInputs) return "too many experts for the CUDA tie cutoffs";
  std::vector<int64_t> pending;
  for (int64_t j = 0; j < k; ++j) {
    if (!radix::trivial_tie_cutoff(tie_budgets[j], n, &cutoffs[j])) pending.push_back(j);
  }
  if (pending.empty()) return nullptr;
  if (n <= 0) {
    for (int64_t j : pending) cutoffs[j] = n;
    return nullptr;
  }
  const int64_t kp = int64_t(pending.size());
  const int64_t segments = segments_for(n);
  if (scratch == nullptr || scratch_bytes < tie_cutoffs_scratch_bytes(n, kp)) {
    return "scratch buffer too small for the CUDA tie cutoffs";
  }
  if (segments > int64_t(0x7FFFFFFF)) return "tensor too large for the CUDA tie cutoffs";
  CutoffParams p{};
  for (int64_t q = 0; q < kp; ++q) {
    p.experts[q] = experts[pending[size_t(q)]];
    p.budgets[q] = tie_budgets[pending[size_t(q)]];
    p.keys[q] = uint32_t(thresh_keys[pending[size_t(q)]]);
  }
  p.base = base;
  auto* counts = static_cast<long long*>(scratch);
  long long* results = counts + kp * segments;
  dispatch_dtype(dtype, [&](auto tag) {
    constexpr DType S = decltype(tag)::value;
    const dim3 grid{unsigned(segments), unsigned(kp), 1u};
    count_ties_kernel<S><<<grid, kCountThreads, 0, stream>>>(p, n, segments, counts);
    find_cutoff_kernel<S><<<unsigned(kp), kFindThreads, 0, stream>>>(p, n, segments, counts, results);
  });
  if (const char* error = detail::last_error()) return error;
  std::vector<long long> host(size_t(2 * kp));
  cudaError_t err = cudaMemcpyAsync(host.data(), results, size_t(2 * kp) * sizeof(long long),
                                    cudaMemcpyDeviceToHost, stream);
  if (err == cudaSuccess) err = cudaStreamSynchronize(stream);
  if (err != cudaSuccess) return detail::error_text(err);
  for (int64_t q = 0; q < kp; ++q) {
    const int64_t j = pending[size_t(q)];
    cutoffs[j] = host[size_t(2 * q)];
    tie_budgets[j] = host[size_t(2 * q + 1)];
  }
  return nullptr;
}

}  // namespace pymerge::cuda
