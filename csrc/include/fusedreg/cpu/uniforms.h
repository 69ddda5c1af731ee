// Bulk generation of the dropout uniforms on the CPU: one Philox call per aligned group
// of four flat indices. x86-64 machines with AVX-512 run 16 Philox streams per vector
// (hand-written below: the 32x32->64-bit multiplies as two vpmuludq on even/odd lanes);
// elsewhere the scalar header function runs in a loop the compiler vectorizes for the
// CPU's level. The choice is the kernels' own (fusedreg/cpu/isa.h), so the build stays
// portable. Both give the bits of philox.h.
#pragma once

#include <cstdint>

#include "fusedreg/cpu/isa.h"
#include "fusedreg/macros.h"
#include "fusedreg/philox.h"

#if FUSEDREG_X86_DISPATCH
#include <immintrin.h>
#endif

namespace fusedreg {
namespace detail {

// u[4k + j] = uint_to_uniform(Philox(seed, g0 + k).w[j]) for k in [0, groups). Force-inlined:
// it is compiled for the level of each caller (the dispatch below and the AVX-512 tail).
inline FUSEDREG_ALWAYS_INLINE void fill_uniform_groups_scalar(uint64_t seed, uint64_t g0,
                                                              int64_t groups, float* __restrict u) {
#pragma omp simd
  for (int64_t k = 0; k < groups; ++k) {
    const Philox4 r = philox4x32_10(seed, g0 + static_cast<uint64_t>(k));
    u[4 * k + 0] = uint_to_uniform(r.w[0]);
    u[4 * k + 1] = uint_to_uniform(r.w[1]);
    u[4 * k + 2] = uint_to_uniform(r.w[2]);
    u[4 * k + 3] = uint_to_uniform(r.w[3]);
  }
}

#if FUSEDREG_X86_DISPATCH
// GCC 12 warns that the intrinsics' internal undefined vectors "may be used uninitialized"
// (clang has no such warning, and would warn about the unknown option).
#if !defined(__clang__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
// (hi, lo) of the 16 products m * a, each 32 x 32 -> 64 bits.
FUSEDREG_TARGET_AVX512 inline __m512i mulhilo16(__m512i m, __m512i a, __m512i* lo) {
  const __m512i even = _mm512_mul_epu32(a, m);                         // lanes 0, 2, ...
  const __m512i odd = _mm512_mul_epu32(_mm512_srli_epi64(a, 32), m);   // lanes 1, 3, ...
  *lo = _mm512_mullo_epi32(a, m);
  return _mm512_mask_blend_epi32(0xAAAA, _mm512_srli_epi64(even, 32), odd);
}

// Triton's uint_to_uniform_float on 16 words.
FUSEDREG_TARGET_AVX512 inline __m512 to_uniform16(__m512i w) {
  const __m512i folded = _mm512_mask_xor_epi32(w, _mm512_movepi32_mask(w), w, _mm512_set1_epi32(-1));
  return _mm512_mul_ps(_mm512_cvtepi32_ps(folded), _mm512_set1_ps(4.6566127342e-10f));
}

// Stores the uniforms of 16 Philox groups as elements u[4k + j] = word j of group k, from
// w_j = word j of the 16 groups (lane k = group k): a 4 x 16 transpose.
FUSEDREG_TARGET_AVX512 inline FUSEDREG_ALWAYS_INLINE void store_uniform_groups16(
    __m512 w0, __m512 w1, __m512 w2, __m512 w3, float* u) {
  // 4x4 transposes inside each 128-bit lane: t_j holds, per lane L (groups 4L..4L+3),
  // the four words of group 4L + j.
  const __m512 a01lo = _mm512_unpacklo_ps(w0, w1), a01hi = _mm512_unpackhi_ps(w0, w1);
  const __m512 a23lo = _mm512_unpacklo_ps(w2, w3), a23hi = _mm512_unpackhi_ps(w2, w3);
  const __m512 t0 = _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(a01lo), _mm512_castps_pd(a23lo)));
  const __m512 t1 = _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(a01lo), _mm512_castps_pd(a23lo)));
  const __m512 t2 = _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(a01hi), _mm512_castps_pd(a23hi)));
  const __m512 t3 = _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(a01hi), _mm512_castps_pd(a23hi)));
  // t_j lane L = group 4L + j. Output vector q must hold groups 4q..4q+3 = lane q of t0..t3.
  const __m512 t01lo = _mm512_shuffle_f32x4(t0, t1, 0x44), t01hi = _mm512_shuffle_f32x4(t0, t1, 0xEE);
  const __m512 t23lo = _mm512_shuffle_f32x4(t2, t3, 0x44), t23hi = _mm512_shuffle_f32x4(t2, t3, 0xEE);
  _mm512_storeu_ps(u + 0, _mm512_shuffle_f32x4(t01lo, t23lo, 0x88));
  _mm512_storeu_ps(u + 16, _mm512_shuffle_f32x4(t01lo, t23lo, 0xDD));
  _mm512_storeu_ps(u + 32, _mm512_shuffle_f32x4(t01hi, t23hi, 0x88));
  _mm512_storeu_ps(u + 48, _mm512_shuffle_f32x4(t01hi, t23hi, 0xDD));
}

FUSEDREG_TARGET_AVX512 __attribute__((noinline)) inline void fill_uniform_groups_avx512(
    uint64_t seed, uint64_t g0, int64_t groups, float* __restrict u) {
  uint32_t k0[10], k1[10];
  k0[0] = static_cast<uint32_t>(seed);
  k1[0] = static_cast<uint32_t>(seed >> 32);
  for (int r = 1; r < 10; ++r) {
    k0[r] = k0[r - 1] + 0x9E3779B9u;
    k1[r] = k1[r - 1] + 0xBB67AE85u;
  }
  const __m512i ma = _mm512_set1_epi32(static_cast<int>(0xD2511F53u));
  const __m512i mb = _mm512_set1_epi32(static_cast<int>(0xCD9E8D57u));
  const __m512i lane = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
  // Output order: element 4k + j is word j of group k (a 4 x 16 transpose of w0..w3).
  int64_t k = 0;
  for (; k + 16 <= groups; k += 16) {
    const uint64_t g = g0 + static_cast<uint64_t>(k);
    // counters (g + lane): low words, and high words plus the carry out of the low add
    const __m512i base_lo = _mm512_set1_epi32(static_cast<int>(static_cast<uint32_t>(g)));
    const __m512i base_hi = _mm512_set1_epi32(static_cast<int>(static_cast<uint32_t>(g >> 32)));
    __m512i c0 = _mm512_add_epi32(base_lo, lane);
    const __mmask16 carry = _mm512_cmplt_epu32_mask(c0, base_lo);
    __m512i c1 = _mm512_mask_add_epi32(base_hi, carry, base_hi, _mm512_set1_epi32(1));
    __m512i c2 = _mm512_setzero_si512();
    __m512i c3 = _mm512_setzero_si512();
    for (int r = 0; r < 10; ++r) {
      __m512i lo0, lo1;
      const __m512i hi0 = mulhilo16(ma, c0, &lo0);
      const __m512i hi1 = mulhilo16(mb, c2, &lo1);
      c0 = _mm512_xor_si512(_mm512_xor_si512(hi1, c1), _mm512_set1_epi32(static_cast<int>(k0[r])));
      c2 = _mm512_xor_si512(_mm512_xor_si512(hi0, c3), _mm512_set1_epi32(static_cast<int>(k1[r])));
      c1 = lo1;
      c3 = lo0;
    }
    store_uniform_groups16(to_uniform16(c0), to_uniform16(c1), to_uniform16(c2),
                           to_uniform16(c3), u + 4 * k);
  }
  fill_uniform_groups_scalar(seed, g0 + static_cast<uint64_t>(k), groups - k, u + 4 * k);
}

#if !defined(__clang__)
#pragma GCC diagnostic pop
#endif
#endif  // FUSEDREG_X86_DISPATCH

}  // namespace detail

// u[k] = dropout_uniform(seed, start + k) for k in [0, len).
inline void fill_uniforms(uint64_t seed, int64_t start, int64_t len, float* u) {
  int64_t i = start;
  const int64_t end = start + len;
  for (; i < end && (i & 3) != 0; ++i) *u++ = dropout_uniform(seed, i);
  const int64_t groups = (end - i) >> 2;
  const uint64_t g0 = static_cast<uint64_t>(i) >> 2;
  cpu::dispatch_isa([&](auto isa) FUSEDREG_ALWAYS_INLINE {
#if FUSEDREG_X86_DISPATCH
    if constexpr (decltype(isa)::value == cpu::Isa::kAvx512) {
      detail::fill_uniform_groups_avx512(seed, g0, groups, u);
      return;
    }
#endif
    detail::fill_uniform_groups_scalar(seed, g0, groups, u);
  });
  i += groups * 4;
  u += groups * 4;
  for (; i < end; ++i) *u++ = dropout_uniform(seed, i);
}

}  // namespace fusedreg
