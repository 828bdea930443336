// CUDA radix histograms of magnitude keys (radix_select.h), the reduce passes of the exact top-k of TIES and
// the other magnitude sparsifiers. Privatized: each block counts one segment of one expert into shared memory,
// two 16-bit counters per 32-bit word, then adds its non-zero bins to the caller's int64 histogram. A segment
// holds at most 65535 elements, so no 16-bit counter can overflow (nor carry into its neighbour); counts are
// integers, so the result does not depend on the launch shape and equals the CPU kernel's.
#include <cuda_runtime.h>

#include <cstdint>

#include "launch.cuh"
#include "pymerge/cuda_kernels.h"
#include "pymerge/dtype.h"
#include "pymerge/radix_select.h"

namespace pymerge::cuda {
namespace {

constexpr int kHistThreads = 1024;
constexpr int64_t kSegment = 65535;  // the largest count a 16-bit counter holds
// Magnitude keys are < 2^31: the hi pass needs 32768 bins (64 KiB shared), the lo pass 65536 (128 KiB).
constexpr int kHiBins = 1 << 15;
constexpr int kLoBins = 1 << 16;

struct HistParams {
  const void* xs[kMaxInputs];
  int32_t hi_bins[kMaxInputs];
  const void* base;
};

template <DType S, bool kTau, bool kLo>
__global__ void __launch_bounds__(kHistThreads)
    radix_hist_kernel(const HistParams p, int64_t n, unsigned long long* __restrict__ hist) {
  using T = typename DTypeTraits<S>::storage;
  constexpr int kWords = (kLo ? kLoBins : kHiBins) / 2;
  extern __shared__ uint32_t counts[];  // kWords words: bin 2w in the low half, 2w + 1 in the high half
  const int j = blockIdx.y;
  for (int w = threadIdx.x; w < kWords; w += blockDim.x) counts[w] = 0u;
  __syncthreads();

  const T* __restrict__ x = static_cast<const T*>(p.xs[j]);
  const T* __restrict__ base = static_cast<const T*>(p.base);
  const uint32_t want = kLo ? uint32_t(p.hi_bins[j]) : 0u;
  const int64_t begin = int64_t(blockIdx.x) * kSegment;
  const int64_t end = begin + kSegment < n ? begin + kSegment : n;
  for (int64_t i = begin + threadIdx.x; i < end; i += blockDim.x) {
    float v = DTypeTraits<S>::widen(x[i]);
    if (kTau) v = __fsub_rn(v, DTypeTraits<S>::widen(base[i]));
    const uint32_t key = radix::magnitude_key(v);
    uint32_t bin = radix::key_hi(key);
    if (kLo) {
      if (bin != want) continue;
      bin = radix::key_lo(key);
    }
    atomicAdd(&counts[bin >> 1], 1u << ((bin & 1u) * 16u));
  }
  __syncthreads();

  unsigned long long* h = hist + int64_t(j) * radix::kBins;
  for (int w = threadIdx.x; w < kWords; w += blockDim.x) {
    const uint32_t c = counts[w];
    if (c == 0u) continue;
    if (c & 0xFFFFu) atomicAdd(&h[2 * w], (unsigned long long)(c & 0xFFFFu));
    if (c >> 16) atomicAdd(&h[2 * w + 1], (unsigned long long)(c >> 16));
  }
}

template <DType S, bool kTau, bool kLo>
const char* launch(const HistParams& p, int64_t k, int64_t n, int64_t* hist, Stream stream) {
  constexpr int kBytes = (kLo ? kLoBins : kHiBins) / 2 * int(sizeof(uint32_t));
  auto kernel = radix_hist_kernel<S, kTau, kLo>;
  // More than 48 KiB of dynamic shared memory must be asked for (A100: 163 KiB, H100: 227 KiB available).
  const cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kBytes);
  if (err != cudaSuccess) return detail::error_text(err);
  const int64_t segments = (n + kSegment - 1) / kSegment;  // <= 2^63 / 65535: fits grid.x (2^31 - 1) for n < 2^46
  const dim3 grid{unsigned(segments), unsigned(k), 1u};
  kernel<<<grid, kHistThreads, kBytes, stream>>>(p, n, reinterpret_cast<unsigned long long*>(hist));
  return detail::last_error();
}

}  // namespace

const char* radix_hist(const void* const* xs, int64_t k, const void* base, DType dtype, int64_t n,
                       const int32_t* hi_bins, int64_t* hist, Stream stream) {
  if (n <= 0 || k <= 0) return nullptr;
  if (k > kMaxInputs) return "too many inputs for the CUDA radix histogram";
  if ((n + kSegment - 1) / kSegment > int64_t(0x7FFFFFFF)) return "tensor too large for the CUDA radix histogram";
  HistParams p{};
  for (int64_t j = 0; j < k; ++j) {
    p.xs[j] = xs[j];
    p.hi_bins[j] = hi_bins == nullptr ? 0 : hi_bins[j];
  }
  p.base = base;
  const char* error = nullptr;
  dispatch_dtype(dtype, [&](auto tag) {
    constexpr DType S = decltype(tag)::value;
    if (base != nullptr) {
      error = hi_bins == nullptr ? launch<S, true, false>(p, k, n, hist, stream)
                                 : launch<S, true, true>(p, k, n, hist, stream);
    } else {
      error = hi_bins == nullptr ? launch<S, false, false>(p, k, n, hist, stream)
                                 : launch<S, false, true>(p, k, n, hist, stream);
    }
  });
  return error;
}

}  // namespace pymerge::cuda
