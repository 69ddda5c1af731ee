// float16 and bfloat16 conversions for the optimizers' loops, bit for bit c10's values:
//   - half_to_float / half_from_float: whole arrays, fusedreg/cpu/rows.h's row conversions
//     (the F16C instructions where the kernels run at the AVX2 level or above, else integer
//     formulas with the same values);
//   - load16 / store16: 16 values to and from an AVX-512 register, for loops that convert as
//     they go (vcvtph2ps / vcvtps2ph for float16, integer shifts and rounding for bfloat16).
// Why the per-register forms exist beside the arrays: in a loop that also does the
// optimizers' float math, a round trip through an fp32 copy of each block costs stores and
// reloads that a conversion in registers does not.
#pragma once

#include <cstdint>

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "fusedreg/cpu/isa.h"
#include "fusedreg/cpu/rows.h"
#include "fusedreg/macros.h"

#if FUSEDREG_X86_DISPATCH
#include <immintrin.h>
#endif

namespace fusedreg {
namespace cpu {

#if FUSEDREG_X86_DISPATCH
// 16 float16 values to and from an AVX-512 register, for loops that convert as they go (the
// optimizers' float16 steps): the values of rows.h's row_to_float_f16c / row_from_float_f16c
// (NaN lanes stored as sign | 0x7E00). Only call them after cpu_has_avx512(). The store,
// half16_store, and the all-lanes mask kAll16 the intrinsics here use are rows.h's (the
// layer_norm forward's in-place fp16 rows use them too).
constexpr int64_t kHalfBlock = 16;

FUSEDREG_TARGET_AVX512 inline FUSEDREG_ALWAYS_INLINE __m512 half16_load(const c10::Half* src) {
  return _mm512_maskz_cvtph_ps(kAll16, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src)));
}

// 16 bfloat16 values to and from an AVX-512 register with c10::BFloat16's conversions, bit for
// bit (the integer formulas of optim.cpp's load_as / store_as, 16 lanes at a time): up
// (bf16x16_widen), the bits shifted by 16; down (bf16x16_bits), round to nearest even, any NaN
// 0x7FC0, as 16 words. Not the AVX-512 BF16 instruction, which flushes subnormals (c10 keeps
// them). The BatchNorm and bias_dropout register loops use the word forms with masked loads
// and stores.
FUSEDREG_TARGET_AVX512 inline FUSEDREG_ALWAYS_INLINE __m512 bf16x16_widen(__m256i h) {
  return _mm512_castsi512_ps(_mm512_maskz_slli_epi32(kAll16, _mm512_maskz_cvtepu16_epi32(kAll16, h), 16));
}

// The rounded words in the low halves of 16 32-bit lanes (bf16x16_lanes; for a narrowing store
// with a mask, vpmovdw, as bias_dropout's partial steps do), or packed (bf16x16_bits). NaN is
// found with integer operations (|bits| > 0x7F800000), as BatchNorm's own copy of this rounding
// did before these helpers replaced it: with vcmpps instead, BatchNorm's bf16 eval
// (32x64x56x56, two threads) and bias_dropout's bf16 forward (8192x1024) measured 2-5% slower
// than before; with the integer test, within the noise of it.
FUSEDREG_TARGET_AVX512 inline FUSEDREG_ALWAYS_INLINE __m512i bf16x16_lanes(__m512 x) {
  const __m512i u = _mm512_castps_si512(x);
  const __m512i lsb = _mm512_and_si512(_mm512_maskz_srli_epi32(kAll16, u, 16), _mm512_set1_epi32(1));
  const __m512i rounded =
      _mm512_maskz_srli_epi32(kAll16, _mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF))), 16);
  const __mmask16 nan =
      _mm512_cmpgt_epu32_mask(_mm512_and_si512(u, _mm512_set1_epi32(0x7FFFFFFF)), _mm512_set1_epi32(0x7F800000));
  return _mm512_mask_blend_epi32(nan, rounded, _mm512_set1_epi32(0x7FC0));
}

FUSEDREG_TARGET_AVX512 inline FUSEDREG_ALWAYS_INLINE __m256i bf16x16_bits(__m512 x) {
  return _mm512_maskz_cvtepi32_epi16(kAll16, bf16x16_lanes(x));
}

FUSEDREG_TARGET_AVX512 inline FUSEDREG_ALWAYS_INLINE __m512 bf16x16_load(const c10::BFloat16* src) {
  return bf16x16_widen(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(src)));
}

FUSEDREG_TARGET_AVX512 inline FUSEDREG_ALWAYS_INLINE void bf16x16_store(c10::BFloat16* dst, __m512 x) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst), bf16x16_bits(x));
}

// 16 values of a 16-bit or float32 array as floats, and back.
FUSEDREG_TARGET_AVX512 inline FUSEDREG_ALWAYS_INLINE __m512 load16(const c10::Half* src) { return half16_load(src); }
FUSEDREG_TARGET_AVX512 inline FUSEDREG_ALWAYS_INLINE __m512 load16(const c10::BFloat16* src) { return bf16x16_load(src); }
FUSEDREG_TARGET_AVX512 inline FUSEDREG_ALWAYS_INLINE __m512 load16(const float* src) { return _mm512_loadu_ps(src); }
FUSEDREG_TARGET_AVX512 inline FUSEDREG_ALWAYS_INLINE void store16(c10::Half* dst, __m512 x) { half16_store(dst, x); }
FUSEDREG_TARGET_AVX512 inline FUSEDREG_ALWAYS_INLINE void store16(c10::BFloat16* dst, __m512 x) { bf16x16_store(dst, x); }
FUSEDREG_TARGET_AVX512 inline FUSEDREG_ALWAYS_INLINE void store16(float* dst, __m512 x) { _mm512_storeu_ps(dst, x); }
#endif

inline void half_to_float(const c10::Half* __restrict src, float* __restrict dst, int64_t n) {
  row_to_float(src, dst, n);
}

inline void half_from_float(const float* __restrict src, c10::Half* __restrict dst, int64_t n) {
  row_from_float(src, dst, n);
}

}  // namespace cpu
}  // namespace fusedreg
