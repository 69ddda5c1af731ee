// exp and erf for float32 written so that `#pragma omp simd` loops vectorize them (libm's
// expf/erff are opaque calls that keep a loop scalar), plus the math policy that plugs them
// into the activation formulas of fusedreg/activation.h. double stays on libm.
//
// exp: Cody-Waite reduction x = n ln2 + r, |r| <= ln2/2, and a degree-6 Taylor/minimax
// polynomial for e^r (error below 2 ulp on [-87, 88]); inputs are clamped to that range, so
// the result saturates at ~1e38 / ~1e-38 instead of inf / denormals, which the activation
// formulas (1 / (1 + e^-z), z * e^..) turn into the same 0 / 1 limits as long as the other
// factor stays moderate (not for huge |z|: silu(-1e30) is -6e-9 here, -0 with libm).
// erf: erf(x) = 1 - erfc(|x|) (sign restored), erfc from the Chebyshev-fitted form
// t * exp(-x^2 + P(t)), t = 1 / (1 + x/2), of fractional error < 1.2e-7 (Numerical Recipes,
// "erfcc"); the absolute error of erf is then < 2e-7, below half an ulp of 1 + erf in GELU.
//
// CPU and CUDA: the activation formulas are one code (activation.h); what differs is only
// the float32 exp and erf they call, these polynomials on the CPU and CUDA's expf/erff
// (StdMath) on the GPU. float64 calls libm's exp and erf on both. tests/test_cpu_math.py
// bounds the CPU's float32 results, forward and backward, against the formulas evaluated in
// float64: within 4 float32 ulps of the largest term the formula combines, plus erf's 2e-7
// (gelu) and exp's amplification of its float32-rounded argument (shared with CUDA), and,
// where an argument is clamped, within 2^-100 of the limit. float64 results equal the libm
// formula exactly in the baseline variant and, where FMA contraction moves the roundings
// (AVX2, AVX-512), are within 2 ulps of its largest term plus exp's argument amplification.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#include "fusedreg/macros.h"

namespace fusedreg {
namespace cpu {

// Force-inlined, as everything a dispatched loop calls (fusedreg/cpu/isa.h).
inline FUSEDREG_ALWAYS_INLINE float vexp(float x) {
  x = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x);
  // n = round(x / ln2) by the 1.5 * 2^23 trick, which vectorizes on any x86-64 (no SSE4.1)
  const float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  // ln2 split in a high part with trailing zero bits and a low correction
  const float r = (x - n * 0.693145751953125f) - n * 1.428606765330187045e-06f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;  // 2^n
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

inline FUSEDREG_ALWAYS_INLINE float verf(float x) {
  const float z = std::fabs(x);
  const float t = 1.0f / (1.0f + 0.5f * z);
  float q = 0.17087277f;
  q = q * t - 0.82215223f;
  q = q * t + 1.48851587f;
  q = q * t - 1.13520398f;
  q = q * t + 0.27886807f;
  q = q * t - 0.18628806f;
  q = q * t + 0.09678418f;
  q = q * t + 0.37409196f;
  q = q * t + 1.00002368f;
  q = q * t - 1.26551223f;
  const float erfc = t * vexp(-z * z + q);
  const float r = 1.0f - erfc;
  return x < 0.0f ? -r : r;
}

struct VecMath {
  FUSEDREG_ALWAYS_INLINE static float erf(float v) { return verf(v); }
  FUSEDREG_ALWAYS_INLINE static double erf(double v) { return std::erf(v); }
  FUSEDREG_ALWAYS_INLINE static float exp(float v) { return vexp(v); }
  FUSEDREG_ALWAYS_INLINE static double exp(double v) { return std::exp(v); }
};

}  // namespace cpu
}  // namespace fusedreg
