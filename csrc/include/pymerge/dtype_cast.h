// Conversions between fp32 and the 16-bit float formats (bfloat16, IEEE binary16), shared by host and
// device code. Framework-free: values travel as raw bit patterns (uint16_t), so no CUDA or torch header
// is needed.
//
// Contract (bit-exact with torch's `.to(torch.bfloat16 / torch.float16)` for every non-NaN input):
//  * widening (bf16/f16 -> f32) is exact; f16 subnormals become normal fp32 values.
//  * narrowing (f32 -> bf16/f16) rounds to nearest, ties to even; values past the largest finite
//    value (after rounding) become +-Inf; f16 subnormals are produced, never flushed.
//  * NaN stays NaN with its sign: narrowing gives a quiet NaN keeping the top payload bits (torch's own
//    NaN bit patterns differ between its scalar and vector paths, so only NaN-ness can match it);
//    f16 -> f32 sets the quiet bit; bf16 -> f32 is a plain bit extension, as in torch.
// All code is integer bit manipulation plus one exact fp32 add/multiply, written without branches so that
// the CPU loops auto-vectorize; it needs IEEE round-to-nearest and no -ffast-math.
#pragma once

#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define PYMERGE_HD __host__ __device__
#else
#define PYMERGE_HD
#endif

namespace pymerge {

PYMERGE_HD inline uint32_t f32_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
#endif
}

PYMERGE_HD inline float f32_from_bits(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
#endif
}

// bfloat16 is the top half of an fp32: widening is a shift.
PYMERGE_HD inline float bf16_to_f32(uint16_t h) { return f32_from_bits(uint32_t(h) << 16); }

PYMERGE_HD inline uint16_t f32_to_bf16(float f) {
  const uint32_t x = f32_bits(f);
  // Round to nearest even on the 16 dropped bits: add 0x7FFF, plus 1 when the kept part is odd.
  // A carry into the exponent is correct, including max-finite -> Inf.
  const uint32_t rounded = (x + 0x7FFFu + ((x >> 16) & 1u)) >> 16;
  // NaN must not round (0x7F800001 would carry into Inf): keep sign and top payload, set the quiet bit.
  const uint32_t quiet_nan = (x >> 16) | 0x0040u;
  return uint16_t((x & 0x7FFFFFFFu) > 0x7F800000u ? quiet_nan : rounded);
}

PYMERGE_HD inline float f16_to_f32(uint16_t h) {
  const uint32_t sign = uint32_t(h & 0x8000u) << 16;
  const uint32_t exponent = (h >> 10) & 0x1Fu;
  const uint32_t mantissa = h & 0x3FFu;
  // Normal: rebias the exponent from 15 to 127 (112 = 127 - 15).
  const uint32_t normal = ((exponent + 112u) << 23) | (mantissa << 13);
  // Inf / NaN: all-ones exponent; NaNs get the quiet bit (as torch and the F16C instructions do).
  const uint32_t special = 0x7F800000u | (mantissa << 13) | (mantissa != 0u ? 0x00400000u : 0u);
  // Zero / subnormal: the value is mantissa * 2^-24, exact in fp32 (mantissa < 2^10).
  const uint32_t tiny = f32_bits(float(mantissa) * 5.9604644775390625e-8f);
  const uint32_t magnitude = exponent == 0u ? tiny : (exponent == 31u ? special : normal);
  return f32_from_bits(sign | magnitude);
}

PYMERGE_HD inline uint16_t f32_to_f16(float f) {
  const uint32_t x = f32_bits(f);
  const uint32_t sign = (x >> 16) & 0x8000u;
  const uint32_t a = x & 0x7FFFFFFFu;  // |f|
  const uint32_t quiet_nan = 0x7E00u | ((a >> 13) & 0x3FFu);
  // |f| >= 65520 (half-way between 65504, the largest f16, and 65536) rounds to Inf; so does Inf.
  const uint32_t infinity = 0x7C00u;
  // Normal f16 range [2^-14, 65520): round the 13 dropped mantissa bits to nearest even (a carry into the
  // exponent is correct), then rebias the exponent from 127 to 15. Unsigned wrap-around below the range
  // is harmless: that lane is not selected.
  const uint32_t normal = (a + 0x0FFFu + ((a >> 13) & 1u) - (112u << 23)) >> 13;
  // Below 2^-14 (f16 subnormals and zero): adding 0.5f puts the value's bits at fp32 ulp 2^-24, the f16
  // subnormal step, so the FPU's own round-to-nearest-even does the rounding; subtracting 0.5f's bits
  // leaves the f16 mantissa (0x400, the smallest normal, when it rounds up).
#if defined(__CUDA_ARCH__)
  const uint32_t subnormal = f32_bits(__fadd_rn(f32_from_bits(a), 0.5f)) - 0x3F000000u;
#else
  const uint32_t subnormal = f32_bits(f32_from_bits(a) + 0.5f) - 0x3F000000u;
#endif
  const uint32_t magnitude =
      a > 0x7F800000u ? quiet_nan
                      : (a >= 0x477FF000u ? infinity : (a >= 0x38800000u ? normal : subnormal));
  return uint16_t(sign | magnitude);
}

}  // namespace pymerge
