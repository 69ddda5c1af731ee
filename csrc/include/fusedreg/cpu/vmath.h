// exp and erf for float32 written so that `#pragma omp simd` loops vectorize them (libm's
// expf/erff are opaque calls that keep a loop scalar), plus the math policy that plugs them
// into the activation formulas of fusedreg/activation.h. double stays on libm.
//
// exp: Cody-Waite reduction x = n ln2 + r, |r| <= ln2/2, and a degree-6 Taylor/minimax
// polynomial for e^r (error below 2 ulp where the result is a normal float); beyond that it
// overflows to inf and underflows through the denormals to 0 as libm's expf does, so
// e^inf = inf, e^-inf = 0 and NaN stays NaN (the activation formulas rely on these limits).
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
// where e^x leaves the normal range, within 2^-100 of the formula. float64 results equal the libm
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
// kNormalRange: the caller guarantees x in [-87, 88] (e^x a normal float; a kernel checks
// its block's inputs first, fusedreg/cpu/bias_dropout.cpp). The clamp and the two-factor
// scale are then skipped; both are exact no-ops there (2^n is one normal float, and scaling
// by powers of two rounds at most once either way), so the result is bitwise vexp's.
template <bool kNormalRange>
inline FUSEDREG_ALWAYS_INLINE float vexp_t(float x) {
  // The input is clamped to [-105, 89], beyond which e^x rounds to 0 / overflows to inf in
  // float32; the scale 2^n is applied as two factors 2^(n/2), each a normal float, so the
  // result overflows to inf and underflows through the denormals to 0 as libm's does. A NaN
  // passes the clamp (both comparisons are false) and gives NaN.
  if constexpr (!kNormalRange) x = x < -105.0f ? -105.0f : (x > 89.0f ? 89.0f : x);
  // n = round(x / ln2) by the 1.5 * 2^23 trick, which vectorizes on any x86-64 (no SSE4.1);
  // the integer is read from the low mantissa bits (no float-to-int conversion)
  const float shifted = x * 1.44269504088896341f + 12582912.0f;
  const float n = shifted - 12582912.0f;
  int32_t ni;
  std::memcpy(&ni, &shifted, sizeof(ni));
  ni -= 0x4B400000;  // the bits of 12582912.0f
  // ln2 split in a high part with trailing zero bits and a low correction
  const float r = (x - n * 0.693145751953125f) - n * 1.428606765330187045e-06f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  if constexpr (kNormalRange) {
    const int32_t bits = (ni + 127) << 23;  // 2^n, n in [-126, 127]
    float scale;
    std::memcpy(&scale, &bits, sizeof(scale));
    return p * scale;
  }
  // 2^n = 2^h * 2^(n - h), h = floor(n / 2): both in [2^-76, 2^64] for n in [-152, 129]
  const int32_t h = ni >> 1;
  const int32_t bits_a = (h + 127) << 23, bits_b = (ni - h + 127) << 23;
  float scale_a, scale_b;
  std::memcpy(&scale_a, &bits_a, sizeof(scale_a));
  std::memcpy(&scale_b, &bits_b, sizeof(scale_b));
  return (p * scale_a) * scale_b;
}

inline FUSEDREG_ALWAYS_INLINE float vexp(float x) { return vexp_t<false>(x); }

// kNormalRange: as vexp_t's, for the argument of the exp inside (-x^2 + P(t) >= -87 for
// |x| <= 9).
template <bool kNormalRange>
inline FUSEDREG_ALWAYS_INLINE float verf_t(float x) {
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
  const float erfc = t * vexp_t<kNormalRange>(-z * z + q);
  const float r = 1.0f - erfc;
  return x < 0.0f ? -r : r;
}

inline FUSEDREG_ALWAYS_INLINE float verf(float x) { return verf_t<false>(x); }

// GELU's derivative Phi(z) + z phi(z) (Phi, phi: the standard normal CDF and density) in
// float32 with one exp, e = e^(-z^2/2), shared by both terms: phi = e / sqrt(2 pi), and the
// tail Phi(-|z|) = erfc(x)/2 = G(s) e, x = |z|/sqrt2, where G(s) = erfcx(x)/2 = e^(x^2) erfc(x)/2
// is a degree-8 polynomial in s = a / (1 + a), a = 0.54 x (s in [0, 1)), fitted for relative
// error on x in [0, 6] with G(0) = 1/2 exact. Then Phi(z) = z < 0 ? tail : 1 - tail. In float32
// (with e^ of the rounded argument exact) the tail is within 5.5e-8 absolute of erfc(x)/2 for
// every z and within 1.5e-6 relative for |z| <= 8: half the error of 1 + erf with verf (2e-7),
// and none of its cancellation in the negative tail. The formula the other backends use,
// 0.5 (1 + erf(z/sqrt2)) + z phi(z) (fusedreg/activation.h), evaluates erf's own exp as well, in
// a dependency chain twice as long: this one takes about a third of its time per element.
// Special values as activate_grad's: 1 at +inf, 0 at -inf (a is capped so that s is 1, not
// inf / inf, there; e = 0 and the z phi term is skipped where phi is 0), NaN propagates
// (through e). kNormalRange: as vexp_t's (|z| <= 8 gives -z^2/2 >= -32; the cap is then a
// no-op too): the same results.
template <bool kNormalRange>
inline FUSEDREG_ALWAYS_INLINE float gelu_grad_t(float z) {
  const float e = vexp_t<kNormalRange>(-0.5f * z * z);
  float a = 3.818376660e-01f * std::fabs(z);  // 0.54 / sqrt(2) |z|
  if constexpr (!kNormalRange) a = a > 1e30f ? 1e30f : a;
  const float s = a / (1.0f + a);
  float g = -3.499864042e-02f;
  g = g * s + 8.423367143e-02f;
  g = g * s - 2.422165312e-02f;
  g = g * s - 1.568314247e-02f;
  g = g * s - 1.308869720e-01f;
  g = g * s - 3.549117129e-03f;
  g = g * s + 6.698509455e-01f;
  g = g * s - 1.044795036e+00f;
  g = g * s + 0.5f;
  const float tail = g * e;
  const float cdf = z < 0.0f ? tail : 1.0f - tail;
  const float pdf = 0.39894228040143267794f * e;
  if constexpr (kNormalRange) return cdf + z * pdf;
  return pdf == 0.0f ? cdf : cdf + z * pdf;  // pdf == 0: |z| huge or inf (z * pdf -> 0)
}

template <bool kNormalRange>
struct VecMathT {
  FUSEDREG_ALWAYS_INLINE static float erf(float v) { return verf_t<kNormalRange>(v); }
  FUSEDREG_ALWAYS_INLINE static double erf(double v) { return std::erf(v); }
  FUSEDREG_ALWAYS_INLINE static float exp(float v) { return vexp_t<kNormalRange>(v); }
  FUSEDREG_ALWAYS_INLINE static double exp(double v) { return std::exp(v); }
  // GELU's derivative in float32 (gelu_grad_t); float64 keeps activation.h's formula on libm.
  FUSEDREG_ALWAYS_INLINE static float gelu_grad(float v) { return gelu_grad_t<kNormalRange>(v); }
};

using VecMath = VecMathT<false>;
// For float32 activation inputs known to satisfy |z| <= kNormalRangeBound, where every exp
// argument the formulas of fusedreg/activation.h form lies in [-87, 88] (gelu: -z^2/2 and
// erf's at |z| <= 8 stay above -33 and -35; gelu_tanh: -2u with u <= 0.8 (8 + 0.045 * 8^3)
// stays above -50; silu: -z): the same results as VecMath, faster.
using VecMathNormal = VecMathT<true>;
constexpr float kNormalRangeBound = 8.0f;

}  // namespace cpu
}  // namespace fusedreg
