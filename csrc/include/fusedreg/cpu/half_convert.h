// float16 arrays to and from float with the CPU's F16C conversions (vcvtph2ps / vcvtps2ph, 8
// elements per instruction), bit for bit the values of c10::Half's own conversions, which
// the extension, built for baseline x86-64, compiles without F16C:
//   - float16 -> float is exact either way (normals, subnormals, infinities; a NaN keeps its
//     payload and is made quiet, as c10 does);
//   - float -> float16 rounds to nearest even either way (|f| >= 65520 to inf, subnormal
//     results rounded in their own units), but a NaN becomes sign | 0x7E00 in c10 and keeps
//     its (truncated) payload in vcvtps2ph: the NaN lanes are set to sign | 0x7E00 after
//     the conversion.
// Without F16C (or with FUSEDREG_CPU_ISA capping the level below AVX2) the conversions of
// fusedreg/cpu/rows.h run instead: the same values from integer arithmetic.
//
// Why these exist beside rows.h: in a loop that also does the optimizers' float math, rows.h's
// integer formulas (about 25 operations per element and direction) cost more than the math,
// and GCC vectorizes them there only partly; a whole-array conversion per instruction does not.
#pragma once

#include <cstdint>

#include <c10/util/Half.h>

#include "fusedreg/cpu/isa.h"
#include "fusedreg/cpu/rows.h"
#include "fusedreg/macros.h"

#if FUSEDREG_X86_DISPATCH
#include <immintrin.h>
#define FUSEDREG_TARGET_F16C __attribute__((target("avx2,fma,bmi,bmi2,popcnt,f16c")))
#endif

namespace fusedreg {
namespace cpu {

// Whether the kernels run at the AVX2 level or above on a CPU with F16C.
inline bool cpu_has_f16c() {
#if FUSEDREG_X86_DISPATCH
  static const bool has = cpu_isa() != Isa::kBaseline && __builtin_cpu_supports("f16c");
  return has;
#else
  return false;
#endif
}

#if FUSEDREG_X86_DISPATCH
FUSEDREG_TARGET_F16C __attribute__((noinline)) inline void half_to_float_f16c(
    const c10::Half* __restrict src, float* __restrict dst, int64_t n) {
  const uint16_t* h = reinterpret_cast<const uint16_t*>(src);
  int64_t t = 0;
  for (; t + 8 <= n; t += 8) {
    _mm256_storeu_ps(dst + t, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(h + t))));
  }
  row_to_float(src + t, dst + t, n - t);
}

FUSEDREG_TARGET_F16C __attribute__((noinline)) inline void half_from_float_f16c(
    const float* __restrict src, c10::Half* __restrict dst, int64_t n) {
  uint16_t* h = reinterpret_cast<uint16_t*>(dst);
  const __m128i sign = _mm_set1_epi16(int16_t(0x8000)), qnan = _mm_set1_epi16(0x7E00);
  int64_t t = 0;
  for (; t + 8 <= n; t += 8) {
    const __m256 x = _mm256_loadu_ps(src + t);
    __m128i v = _mm256_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m256i nan32 = _mm256_castps_si256(_mm256_cmp_ps(x, x, _CMP_UNORD_Q));
    const __m128i nan16 = _mm_packs_epi32(_mm256_castsi256_si128(nan32), _mm256_extracti128_si256(nan32, 1));
    v = _mm_blendv_epi8(v, _mm_or_si128(_mm_and_si128(v, sign), qnan), nan16);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(h + t), v);
  }
  row_from_float(src + t, dst + t, n - t);
}
#endif

#if FUSEDREG_X86_DISPATCH
// 16 float16 values to and from an AVX-512 register, for loops that convert as they go (the
// optimizers' float16 steps): the values of half_to_float_f16c / half_from_float_f16c (NaN
// lanes stored as sign | 0x7E00). Only call them after cpu_has_avx512().
constexpr int64_t kHalfBlock = 16;

FUSEDREG_TARGET_AVX512 inline FUSEDREG_ALWAYS_INLINE __m512 half16_load(const c10::Half* src) {
  // the maskz forms with an all-ones mask (the plain instructions): the unmasked intrinsics'
  // undefined pass-through operand trips GCC's -Wmaybe-uninitialized
  return _mm512_maskz_cvtph_ps(__mmask16(0xFFFF), _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src)));
}

FUSEDREG_TARGET_AVX512 inline FUSEDREG_ALWAYS_INLINE void half16_store(c10::Half* dst, __m512 x) {
  const __m256i v =
      _mm512_maskz_cvtps_ph(__mmask16(0xFFFF), x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __mmask16 nan = _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q);
  // (v & 0x8000) | 0x7E00 in one ternary-logic op (truth table 0xEA: A & B | C)
  const __m256i quiet = _mm256_ternarylogic_epi32(v, _mm256_set1_epi16(int16_t(0x8000)),
                                                  _mm256_set1_epi16(0x7E00), 0xEA);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst), _mm256_mask_blend_epi16(nan, v, quiet));
}
#endif

inline void half_to_float(const c10::Half* __restrict src, float* __restrict dst, int64_t n) {
#if FUSEDREG_X86_DISPATCH
  if (cpu_has_f16c()) return half_to_float_f16c(src, dst, n);
#endif
  dispatch_isa([&](auto) FUSEDREG_ALWAYS_INLINE { row_to_float(src, dst, n); });
}

inline void half_from_float(const float* __restrict src, c10::Half* __restrict dst, int64_t n) {
#if FUSEDREG_X86_DISPATCH
  if (cpu_has_f16c()) return half_from_float_f16c(src, dst, n);
#endif
  dispatch_isa([&](auto) FUSEDREG_ALWAYS_INLINE { row_from_float(src, dst, n); });
}

}  // namespace cpu
}  // namespace fusedreg
