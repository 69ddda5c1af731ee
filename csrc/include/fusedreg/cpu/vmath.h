// exp and erf for float32 written so that `#pragma omp simd` loops vectorize them (libm's
// expf/erff are opaque calls that keep a loop scalar), plus the math policy that plugs them
// into the activation formulas of fusedreg/activation.h. double stays on libm.
//
// exp: Cody-Waite reduction x = n ln2 + r, |r| <= ln2/2, and a degree-6 Taylor/minimax
// polynomial for e^r (error below 2 ulp where the result is a normal float); beyond that it
// overflows to inf and underflows through the denormals to 0 as libm's expf does, so
// e^inf = inf, e^-inf = 0 and NaN stays NaN (the activation formulas rely on these limits).
// erf: erf(x) = 1 - erfc(|x|) (sign restored), erfc = e^(-x^2 + x P(min(|x|, 4))) with a
// fitted degree-8 P and no division; the absolute error of erf is < 2e-7 (7.7e-8 measured),
// below half an ulp of 1 + erf in GELU (verf_t below).
// GELU forward at the AVX-512 level (cpu::gelu_avx512, intrinsics): z Phi(z) with Phi as a
// table of degree-5 polynomials picked per lane by a register permute, no exp or erf at all;
// bias_dropout's float32 (and bf16/fp16, on fp32 copies) forward runs it where the CPU has
// AVX-512; the AVX2 and baseline levels keep activation.h's formula over verf.
//
// CPU and CUDA: the activation formulas are one code (activation.h); what differs is only
// the float32 exp and erf they call, these polynomials on the CPU and CUDA's expf/erff
// (StdMath) on the GPU. float64 calls libm's exp and erf on both. tests/test_cpu_math.py
// bounds the CPU's float32 results, forward and backward, against the formulas evaluated in
// float64: within 4 float32 ulps of the largest term the formula combines, plus erf's 2e-7
// (gelu; the table's Phi is within 6.1e-8, 1.3e-7 in erf's terms) and exp's amplification of its float32-rounded argument (shared with CUDA), and,
// where e^x leaves the normal range, within 2^-100 of the formula. float64 results equal the libm
// formula exactly in the baseline variant and, where FMA contraction moves the roundings
// (AVX2, AVX-512), are within 2 ulps of its largest term plus exp's argument amplification.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#include "fusedreg/cpu/isa.h"
#include "fusedreg/macros.h"

#if FUSEDREG_X86_DISPATCH
#include <immintrin.h>
#endif

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

// erf(x) = sign(x) (1 - erfc(|x|)), erfc(a) = e^(-a^2 + a P(min(a, 4))): P, of degree 8, is
// fitted to log(erfc(a)) + a^2 on [0, 4] for the absolute error of erfc (|error| < 2.3e-9 with
// exact arithmetic; 7.7e-8 for erf as evaluated in float32, over [-6, 6]). No division (the
// Numerical Recipes form it replaced had one, and a 10-term polynomial): about 20% less time
// per element. Beyond a = 4, erfc < 1.6e-8 and the clamped P keeps e^(...) below it, so erf
// rounds to +-1 there; erfc(0) = e^0 = 1 exactly, so erf(+-0) = +-0. +-inf gives +-1 (the
// argument is -inf), NaN propagates (through a^2).
// kNormalRange: as vexp_t's (the argument stays above -35 for |x| <= 8 / sqrt2).
template <bool kNormalRange>
inline FUSEDREG_ALWAYS_INLINE float verf_t(float x) {
  const float a = std::fabs(x);
  const float ac = a < 4.0f ? a : 4.0f;  // NaN: 4 (a^2 carries the NaN)
  float q = 8.043771231e-06f;
  q = q * ac - 1.060261129e-04f;
  q = q * ac + 5.879484233e-04f;
  q = q * ac - 1.576755196e-03f;
  q = q * ac + 5.877538206e-05f;
  q = q * ac + 1.921714656e-02f;
  q = q * ac - 1.027992144e-01f;
  q = q * ac + 3.633838892e-01f;
  q = q * ac - 1.128379345e+00f;
  const float erfc = vexp_t<kNormalRange>(q * ac - a * a);
  return std::copysign(1.0f - erfc, x);
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

#if FUSEDREG_X86_DISPATCH
// GELU, z Phi(z), in float32 at the AVX-512 level, without exp or erf: Phi (the standard
// normal CDF) is piecewise polynomial, one degree-5 polynomial per interval of width 0.4, its
// coefficients picked per lane from registers (vpermt2ps, two registers per coefficient hold
// its 32 values). Where the kernels spend their time on GELU's erf, this is about half the
// vector operations of e^(...) and the polynomial of verf (and none of torch's division):
// 19 per 16 elements.
// Intervals: j = round(2.5 zc) + 16 in [0, 31] (zc: z clamped to [-6.5, 6.1]); j in 1..30 is
// centred at 0.4 (j - 16), covering [-6.2, 5.8] with the polynomial in t = zc - centre; j = 0
// (z < -6.2, where Phi < 2.9e-10) is 0 and j = 31 (z >= 5.8, where 1 - Phi < 3.4e-9 rounds
// away) is 1. Each polynomial is fitted to Phi on |t| <= 0.2002 (the intervals' edges with
// room for the rounding of j's product); as evaluated in float32, Phi is within 6.1e-8
// absolute of the exact one, so z Phi within 6.1e-8 |z| plus its rounding: erf's error
// (2 (Phi - 1/2)) below 1.3e-7, under verf's documented 2e-7.
// Special values as activate<kGelu>: z Phi(z) is +inf at +inf (Phi = 1), -0 below -6.2
// (Phi = 0; -inf too, where the product would be NaN) and NaN for NaN (the clamp keeps it:
// max and min return their second operand for a NaN, here z).
namespace detail {
alignas(64) inline constexpr float kPhiPoly[6][32] = {
    {  // t^0
     0.0f, 9.866873985e-10f, 1.071827427e-08f, 9.964788461e-08f,
     7.933443840e-07f, 5.412602150e-06f, 3.167140676e-05f, 1.591088367e-04f,
     6.871381775e-04f, 2.555130515e-03f, 8.197532035e-03f, 2.275012992e-02f,
     5.479928851e-02f, 1.150696650e-01f, 2.118553966e-01f, 3.445782661e-01f,
     5.000000000e-01f, 6.554217339e-01f, 7.881445885e-01f, 8.849303126e-01f,
     9.452007413e-01f, 9.772498608e-01f, 9.918024540e-01f, 9.974448681e-01f,
     9.993128777e-01f, 9.998409152e-01f, 9.999683499e-01f, 9.999945760e-01f,
     9.999992251e-01f, 9.999998808e-01f, 1.000000000e+00f, 1.000000000e+00f,
    },
    {  // t^1
     0.0f, 6.076313230e-09f, 6.182887802e-08f, 5.361157491e-07f,
     3.961346010e-06f, 2.494261025e-05f, 1.338305301e-04f, 6.119019235e-04f,
     2.384087536e-03f, 7.915451191e-03f, 2.239452116e-02f, 5.399096385e-02f,
     1.109208390e-01f, 1.941860467e-01f, 2.896915674e-01f, 3.682701290e-01f,
     3.989422619e-01f, 3.682701290e-01f, 2.896915674e-01f, 1.941860467e-01f,
     1.109208390e-01f, 5.399096385e-02f, 2.239452116e-02f, 7.915451191e-03f,
     2.384087536e-03f, 6.119019235e-04f, 1.338305301e-04f, 2.494261025e-05f,
     3.961346010e-06f, 5.361157491e-07f, 6.182888512e-08f, 0.0f,
    },
    {  // t^2
     0.0f, 1.818297868e-08f, 1.728095498e-07f, 1.392175704e-06f,
     9.499495718e-06f, 5.484620488e-05f, 2.675857104e-04f, 1.101275790e-03f,
     3.814375261e-03f, 1.108168904e-02f, 2.687406726e-02f, 5.399217829e-02f,
     8.873755485e-02f, 1.165108532e-01f, 1.158740148e-01f, 7.365156710e-02f,
     -2.241474997e-14f, -7.365156710e-02f, -1.158740148e-01f, -1.165108532e-01f,
     -8.873755485e-02f, -5.399217829e-02f, -2.687406726e-02f, -1.108168904e-02f,
     -3.814375261e-03f, -1.101275790e-03f, -2.675857104e-04f, -5.484620488e-05f,
     -9.499495718e-06f, -1.392175591e-06f, -1.728095356e-07f, 0.0f,
    },
    {  // t^3
     0.0f, 3.537481064e-08f, 3.124241346e-07f, 2.324629349e-06f,
     1.454316316e-05f, 7.630034816e-05f, 3.345269943e-04f, 1.219672500e-03f,
     3.671544604e-03f, 9.023917839e-03f, 1.776685007e-02f, 2.699570358e-02f,
     2.883863635e-02f, 1.423873473e-02f, -1.738234982e-02f, -5.155668780e-02f,
     -6.648872048e-02f, -5.155668780e-02f, -1.738234982e-02f, 1.423873473e-02f,
     2.883863635e-02f, 2.699570358e-02f, 1.776685007e-02f, 9.023917839e-03f,
     3.671544604e-03f, 1.219672384e-03f, 3.345269943e-04f, 7.630034816e-05f,
     1.454316316e-05f, 2.324628895e-06f, 3.124239072e-07f, 0.0f,
    },
    {  // t^4
     0.0f, 5.307940043e-08f, 4.292438689e-07f, 2.904496796e-06f,
     1.638210051e-05f, 7.661846030e-05f, 2.949370246e-04f, 9.239795036e-04f,
     2.312471857e-03f, 4.465905484e-03f, 6.138598081e-03f, 4.418444354e-03f,
     -3.313068533e-03f, -1.509448048e-02f, -2.261551842e-02f, -1.726728864e-02f,
     7.104126857e-13f, 1.726728864e-02f, 2.261551842e-02f, 1.509448048e-02f,
     3.313068533e-03f, -4.418444354e-03f, -6.138598081e-03f, -4.465905484e-03f,
     -2.312471857e-03f, -9.239795036e-04f, -2.949370246e-04f, -7.661846757e-05f,
     -1.638210051e-05f, -2.904497705e-06f, -4.292442668e-07f, 0.0f,
    },
    {  // t^5
     0.0f, 5.766914057e-08f, 4.287227569e-07f, 2.641225592e-06f,
     1.339447681e-05f, 5.537533070e-05f, 1.838281169e-04f, 4.774253175e-04f,
     9.201393113e-04f, 1.136621344e-03f, 2.797836205e-04f, -2.258900553e-03f,
     -5.334199872e-03f, -5.704662297e-03f, -1.002860139e-03f, 6.291460246e-03f,
     9.890706278e-03f, 6.291460246e-03f, -1.002860139e-03f, -5.704662297e-03f,
     -5.334199872e-03f, -2.258900553e-03f, 2.797835914e-04f, 1.136621344e-03f,
     9.201393113e-04f, 4.774253175e-04f, 1.838281023e-04f, 5.537534162e-05f,
     1.339449227e-05f, 2.641235142e-06f, 4.287279580e-07f, 0.0f,
    },
};
}  // namespace detail

FUSEDREG_TARGET_AVX512 inline FUSEDREG_ALWAYS_INLINE __m512 gelu_avx512(__m512 z) {
  // the masked forms of max and min (all lanes): the plain ones trip GCC 12's
  // -Wmaybe-uninitialized inside their header
  const __m512 lo = _mm512_mask_max_ps(z, __mmask16(0xFFFF), _mm512_set1_ps(-6.5f), z);
  const __m512 zc = _mm512_mask_min_ps(z, __mmask16(0xFFFF), _mm512_set1_ps(6.1f), lo);
  // 12582928 = 1.5 * 2^23 + 16: the sum's low mantissa bits are j (the rounding of 2.5 zc + 16)
  const __m512 shifted = _mm512_fmadd_ps(zc, _mm512_set1_ps(2.5f), _mm512_set1_ps(12582928.0f));
  const __m512i j = _mm512_castps_si512(shifted);
  const __m512 centre = _mm512_mul_ps(_mm512_sub_ps(shifted, _mm512_set1_ps(12582928.0f)), _mm512_set1_ps(0.4f));
  const __m512 t = _mm512_sub_ps(zc, centre);
  // (a loop, not a lambda: a lambda's body would not inherit the AVX-512 target)
  __m512 phi = _mm512_permutex2var_ps(_mm512_load_ps(detail::kPhiPoly[5]), j,
                                      _mm512_load_ps(detail::kPhiPoly[5] + 16));
  for (int k = 4; k >= 0; --k) {
    const __m512 c = _mm512_permutex2var_ps(_mm512_load_ps(detail::kPhiPoly[k]), j,
                                            _mm512_load_ps(detail::kPhiPoly[k] + 16));
    phi = _mm512_fmadd_ps(phi, t, c);
  }
  // z < -6.2: -0 (0 Phi would be NaN at -inf); NaN compares unordered and takes z Phi
  const __mmask16 keep = _mm512_cmp_ps_mask(z, _mm512_set1_ps(-6.2f), _CMP_NLT_UQ);
  return _mm512_mask_mul_ps(_mm512_set1_ps(-0.0f), keep, z, phi);
}
#endif  // FUSEDREG_X86_DISPATCH

}  // namespace cpu
}  // namespace fusedreg
