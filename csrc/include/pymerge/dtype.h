// The element types the kernels handle, their codes (shared with Python), and compile-time traits that
// turn a storage element into the fp32 the math uses and back.
#pragma once

#include <cstdint>
#include <type_traits>

#include "pymerge/dtype_cast.h"

namespace pymerge {

// Stable codes: Python passes these integers (pymerge._C.DTYPE_*); never renumber.
enum class DType : int32_t { F32 = 0, F16 = 1, BF16 = 2 };

inline bool is_valid_dtype(int32_t code) { return code >= 0 && code <= 2; }

inline int64_t dtype_size(DType d) { return d == DType::F32 ? 4 : 2; }

inline const char* dtype_name(DType d) {
  switch (d) {
    case DType::F32: return "float32";
    case DType::F16: return "float16";
    case DType::BF16: return "bfloat16";
  }
  return "?";
}

template <DType D>
struct DTypeTraits;

template <>
struct DTypeTraits<DType::F32> {
  using storage = float;
  PYMERGE_HD static float widen(float v) { return v; }
  PYMERGE_HD static float narrow(float v) { return v; }
};

template <>
struct DTypeTraits<DType::F16> {
  using storage = uint16_t;
  PYMERGE_HD static float widen(uint16_t v) { return f16_to_f32(v); }
  PYMERGE_HD static uint16_t narrow(float v) { return f32_to_f16(v); }
};

template <>
struct DTypeTraits<DType::BF16> {
  using storage = uint16_t;
  PYMERGE_HD static float widen(uint16_t v) { return bf16_to_f32(v); }
  PYMERGE_HD static uint16_t narrow(float v) { return f32_to_bf16(v); }
};

template <DType D>
using DTypeTag = std::integral_constant<DType, D>;

// Calls fn(DTypeTag<d>{}) so a generic lambda can instantiate a template for a run-time dtype.
// The dtype must be valid (the binding layer checks codes before any kernel runs).
template <typename Fn>
decltype(auto) dispatch_dtype(DType d, Fn&& fn) {
  switch (d) {
    case DType::F16: return fn(DTypeTag<DType::F16>{});
    case DType::BF16: return fn(DTypeTag<DType::BF16>{});
    case DType::F32:
    default: return fn(DTypeTag<DType::F32>{});
  }
}

}  // namespace pymerge
