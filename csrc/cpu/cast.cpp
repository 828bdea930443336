// CPU dtype cast: dst[i] = narrow<dst>(widen<src>(src[i])), round to nearest even (see dtype_cast.h).
#include <cstring>

#include "pymerge/cpu_kernels.h"
#include "pymerge/cpu_parallel.h"
#include "pymerge/dtype.h"

namespace pymerge::cpu {
namespace {

// One tight loop per (src, dst) pair: the conversions are branch-free, so the compiler vectorizes it.
template <DType S, DType D>
void cast_range(const typename DTypeTraits<S>::storage* __restrict src,
                typename DTypeTraits<D>::storage* __restrict dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = DTypeTraits<D>::narrow(DTypeTraits<S>::widen(src[i]));
}

}  // namespace

void cast(const void* src, DType src_dtype, void* dst, DType dst_dtype, int64_t n) {
  if (n <= 0) return;
  if (src_dtype == dst_dtype) {
    // Same format: a copy (through fp32 would also be exact, except for NaN payloads).
    const int64_t bytes_per = dtype_size(src_dtype);
    parallel_for_blocks(n, [&](int64_t begin, int64_t end) {
      std::memcpy(static_cast<char*>(dst) + begin * bytes_per,
                  static_cast<const char*>(src) + begin * bytes_per, size_t((end - begin) * bytes_per));
    });
    return;
  }
  dispatch_dtype(src_dtype, [&](auto s) {
    dispatch_dtype(dst_dtype, [&](auto d) {
      constexpr DType S = decltype(s)::value;
      constexpr DType D = decltype(d)::value;
      using SrcT = typename DTypeTraits<S>::storage;
      using DstT = typename DTypeTraits<D>::storage;
      const auto* in = static_cast<const SrcT*>(src);
      auto* out = static_cast<DstT*>(dst);
      parallel_for_blocks(n, [&](int64_t begin, int64_t end) {
        cast_range<S, D>(in + begin, out + begin, end - begin);
      });
    });
  });
}

}  // namespace pymerge::cpu
