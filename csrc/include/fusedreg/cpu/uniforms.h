// Generation of the dropout uniforms on the CPU: one Philox call per aligned group of four
// flat indices. x86-64 machines with AVX-512 run the hand-written kernel below; elsewhere
// the scalar header function runs in a loop the compiler vectorizes for the CPU's level.
// The choice is the kernels' own (fusedreg/cpu/isa.h), so the build stays portable. Both
// give the bits of philox.h. fill_uniforms() fills a buffer in one call (dispatching
// itself); fusedreg/cpu/philox_stream.h calls the same kernel from inside a streaming loop.
//
// The AVX-512 kernel keeps the Philox state in 64-bit lanes (8 groups per vector, two
// vectors per 16 groups): vpmuludq then gives the full 32 x 32 -> 64-bit product in one
// instruction, its high half is moved down with a shuffle (port 5) instead of a shift, and
// the two XORs of a round are one vpternlogd. Per 16 groups and round that is 4 multiplies,
// 4 shuffles and 4 ternary logic ops (a 32-bit-lane form needs 4 multiplies, 2 two-uop
// vpmulld, 4 shifts, 2 blends and 4 XORs). It runs 32 groups at a time as four independent
// chains (see philox_rounds_avx512).
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
// Triton's uint_to_uniform_float on 16 words.
FUSEDREG_TARGET_AVX512 inline __m512 to_uniform16(__m512i w) {
  const __m512i folded = _mm512_mask_xor_epi32(w, _mm512_movepi32_mask(w), w, _mm512_set1_epi32(-1));
  return _mm512_mul_ps(_mm512_cvtepi32_ps(folded), _mm512_set1_ps(4.6566127342e-10f));
}

#if !defined(__clang__)
#pragma GCC diagnostic pop
#endif
#endif  // FUSEDREG_X86_DISPATCH

}  // namespace detail

namespace cpu {

// The 10 round keys of a seed (k0 and k1 of each round).
struct PhiloxKeys {
  uint32_t k0[10], k1[10];
  explicit PhiloxKeys(uint64_t seed) {
    k0[0] = static_cast<uint32_t>(seed);
    k1[0] = static_cast<uint32_t>(seed >> 32);
    for (int r = 1; r < 10; ++r) {
      k0[r] = k0[r - 1] + 0x9E3779B9u;
      k1[r] = k1[r - 1] + 0xBB67AE85u;
    }
  }
};

#if FUSEDREG_X86_DISPATCH
#if !defined(__clang__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#endif

// 32-bit lane L of the result: the low word of lane L / 2 of a (L even) or of b (L odd).
// One masked shuffle (a single uop) rather than a shuffle and a blend.
FUSEDREG_TARGET_AVX512 inline FUSEDREG_ALWAYS_INLINE __m512i merge_low_words(__m512i a, __m512i b) {
  return _mm512_mask_shuffle_epi32(a, 0xAAAA, b, _MM_PERM_CCAA);
}

// Rounds 0 and 1 of a block whose groups share their high word g_hi (every block but those
// that straddle a multiple of 2^32 groups): the constants of those rounds, per call.
struct PhiloxHead {
  uint32_t c0_1;   // c0 after round 0: g_hi ^ k0[0], the same for every group
  uint32_t h0_1;   // round 1: hi(c0_1 * M0) ^ k1[1], the constant part of c2 after it
  uint32_t lo0_1;  // round 1: lo(c0_1 * M0), c3 after it
  PhiloxHead(const PhiloxKeys& keys, uint32_t g_hi) {
    c0_1 = g_hi ^ keys.k0[0];
    const uint64_t prod = uint64_t(c0_1) * 0xD2511F53u;
    h0_1 = static_cast<uint32_t>(prod >> 32) ^ keys.k1[1];
    lo0_1 = static_cast<uint32_t>(prod);
  }
};

// The Philox state after its 10 rounds for the 16 * NB groups g, g + 1, ..., g + 16 * NB - 1:
// vector 2b ("A" of block b) holds groups g + 16b + 0, 2, ..., 14 and vector 2b + 1 ("B")
// groups g + 16b + 1, 3, ..., 15, one per 64-bit lane; word j of a group is the low 32 bits
// of its lane of cj (vpmuludq ignores the high ones). Shared by the uniforms below and by
// the kernels that take keep decisions from the words directly (bias_dropout.cpp).
// A round of one vector is a dependency chain of a multiply (5 cycles), a shuffle and a
// ternary logic op: with two chains (NB = 1) the core waits on that latency; four
// independent chains (NB = 2) keep the multiply and shuffle ports busy (measured: about 0.48
// against 0.65 ns per element on one core).
// The first two rounds have constant operands: c2 = c3 = 0 enter round 0 (its second product
// is 0, so c0 = c1 ^ k0 and c1 = 0 leave it), and when the groups share their high word
// (head, else null) round 1's first product is one constant, (g_hi ^ k0[0]) * M0: 2 of the
// 20 multiplies and shuffles per vector, the same bits.
template <int NB>
FUSEDREG_TARGET_AVX512 inline FUSEDREG_ALWAYS_INLINE void philox_rounds_avx512(
    const PhiloxKeys& keys, const PhiloxHead* head, uint64_t g, __m512i (&c0)[2 * NB],
    __m512i (&c1)[2 * NB], __m512i (&c2)[2 * NB], __m512i (&c3)[2 * NB]) {
  constexpr int NV = 2 * NB;  // vectors (chains): 2b = A of block b, 2b + 1 = B of block b
  const __m512i ma = _mm512_set1_epi64(0xD2511F53u);
  const __m512i mb = _mm512_set1_epi64(0xCD9E8D57u);
  const __m512i base = _mm512_set1_epi64(static_cast<long long>(g));
  const __m512i even = _mm512_set_epi64(14, 12, 10, 8, 6, 4, 2, 0);
  // round 0, from the counters (g_lo, g_hi, 0, 0)
  const __m512i k0_0 = _mm512_set1_epi32(static_cast<int>(keys.k0[0]));
  const __m512i k1_0 = _mm512_set1_epi32(static_cast<int>(keys.k1[0]));
#pragma GCC unroll 4
  for (int v = 0; v < NV; ++v) {
    const __m512i gv = _mm512_add_epi64(base, _mm512_add_epi64(even, _mm512_set1_epi64(16 * (v / 2) + (v % 2))));
    const __m512i p0 = _mm512_mul_epu32(gv, ma);
    c0[v] = head ? _mm512_set1_epi32(static_cast<int>(head->c0_1))
                 : _mm512_xor_si512(_mm512_srli_epi64(gv, 32), k0_0);     // hi1 (0) ^ c1 ^ k0
    c2[v] = _mm512_xor_si512(_mm512_shuffle_epi32(p0, _MM_PERM_DDBB), k1_0);  // hi0 ^ c3 (0) ^ k1
    c1[v] = _mm512_setzero_si512();                                          // lo1 = lo(0 * M1)
    c3[v] = p0;                                                              // lo0
  }
  int r0 = 1;
  if (head) {
    // round 1: p0 = c0 * M0 is the constant head->(h0, lo0); c1 is 0
    const __m512i k0_1 = _mm512_set1_epi32(static_cast<int>(keys.k0[1]));
    const __m512i h0k = _mm512_set1_epi32(static_cast<int>(head->h0_1));
    const __m512i lo0 = _mm512_set1_epi32(static_cast<int>(head->lo0_1));
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) {
      const __m512i p1 = _mm512_mul_epu32(c2[v], mb);
      c0[v] = _mm512_xor_si512(_mm512_shuffle_epi32(p1, _MM_PERM_DDBB), k0_1);  // hi1 ^ c1 (0) ^ k0
      c2[v] = _mm512_xor_si512(c3[v], h0k);                                   // hi0 ^ c3 ^ k1
      c1[v] = p1;
      c3[v] = lo0;
    }
    r0 = 2;
  }
#pragma GCC unroll 9
  for (int r = r0; r < 10; ++r) {
    const __m512i k0 = _mm512_set1_epi32(static_cast<int>(keys.k0[r]));
    const __m512i k1 = _mm512_set1_epi32(static_cast<int>(keys.k1[r]));
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) {
      const __m512i p0 = _mm512_mul_epu32(c0[v], ma), p1 = _mm512_mul_epu32(c2[v], mb);
      // high 32 bits of each product into the low half of its lane (_MM_PERM_DDBB)
      const __m512i h0 = _mm512_shuffle_epi32(p0, _MM_PERM_DDBB);
      const __m512i h1 = _mm512_shuffle_epi32(p1, _MM_PERM_DDBB);
      c0[v] = _mm512_ternarylogic_epi32(h1, c1[v], k0, 0x96);  // hi1 ^ c1 ^ k0
      c2[v] = _mm512_ternarylogic_epi32(h0, c3[v], k1, 0x96);  // hi0 ^ c3 ^ k1
      c1[v] = p1;                                              // lo1 (low half of the product)
      c3[v] = p0;                                              // lo0
    }
  }
}

// u[0, 64 * NB) = the uniforms of groups g, g + 1, ..., g + 16 * NB - 1 (elements 4g ..),
// from the state of philox_rounds_avx512.
template <int NB>
FUSEDREG_TARGET_AVX512 inline FUSEDREG_ALWAYS_INLINE void philox_uniforms_blocks_avx512(
    const PhiloxKeys& keys, const PhiloxHead* head, uint64_t g, float* __restrict u) {
  __m512i c0[2 * NB], c1[2 * NB], c2[2 * NB], c3[2 * NB];
  philox_rounds_avx512<NB>(keys, head, g, c0, c1, c2, c3);
#pragma GCC unroll 2
  for (int b = 0; b < NB; ++b) {
    // Element 4k + j = word j of group k. m01 holds, per 64-bit lane (group), words 0 and 1
    // as a pair of floats, m23 words 2 and 3; A's lane i is group 2i, B's group 2i + 1. Two
    // rounds of two-source permutes of those pairs (vpermt2pd, one uop each) put four whole
    // groups in each output vector: 12 shuffle-port uops, against 20 for a 4 x 16 transpose.
    const int a = 2 * b, o = 2 * b + 1;
    const __m512d a01 = _mm512_castps_pd(fusedreg::detail::to_uniform16(merge_low_words(c0[a], c1[a])));
    const __m512d a23 = _mm512_castps_pd(fusedreg::detail::to_uniform16(merge_low_words(c2[a], c3[a])));
    const __m512d b01 = _mm512_castps_pd(fusedreg::detail::to_uniform16(merge_low_words(c0[o], c1[o])));
    const __m512d b23 = _mm512_castps_pd(fusedreg::detail::to_uniform16(merge_low_words(c2[o], c3[o])));
    const __m512i lo = _mm512_set_epi64(11, 3, 10, 2, 9, 1, 8, 0);   // lanes 0-3 of x, y paired
    const __m512i hi = _mm512_set_epi64(15, 7, 14, 6, 13, 5, 12, 4);  // lanes 4-7
    const __m512d ea = _mm512_permutex2var_pd(a01, lo, a23);  // groups 0, 2, 4, 6 (of A's 0-3)
    const __m512d ea2 = _mm512_permutex2var_pd(a01, hi, a23);  // groups 8, 10, 12, 14
    const __m512d eb = _mm512_permutex2var_pd(b01, lo, b23);  // groups 1, 3, 5, 7
    const __m512d eb2 = _mm512_permutex2var_pd(b01, hi, b23);  // groups 9, 11, 13, 15
    const __m512i g0 = _mm512_set_epi64(11, 10, 3, 2, 9, 8, 1, 0);     // x's groups 1st, 2nd with y's
    const __m512i g1 = _mm512_set_epi64(15, 14, 7, 6, 13, 12, 5, 4);   // x's 3rd, 4th with y's
    float* ub = u + 64 * b;
    _mm512_storeu_pd(reinterpret_cast<double*>(ub + 0), _mm512_permutex2var_pd(ea, g0, eb));
    _mm512_storeu_pd(reinterpret_cast<double*>(ub + 16), _mm512_permutex2var_pd(ea, g1, eb));
    _mm512_storeu_pd(reinterpret_cast<double*>(ub + 32), _mm512_permutex2var_pd(ea2, g0, eb2));
    _mm512_storeu_pd(reinterpret_cast<double*>(ub + 48), _mm512_permutex2var_pd(ea2, g1, eb2));
  }
}

// u[0, 64 * blocks) = the uniforms of groups g .. g + 16 * blocks - 1, two blocks at a time.
// Out of line: a function without the AVX-512 target (fill_uniforms_at's generic body)
// cannot inline it.
FUSEDREG_TARGET_AVX512 __attribute__((noinline)) inline void philox_uniforms_avx512(
    const PhiloxKeys& keys, uint64_t g, int64_t blocks, float* __restrict u) {
  if (blocks <= 0) return;
  // One high word for the whole call (all but calls that straddle a multiple of 2^32 groups,
  // 2^34 elements): the head of every block; else each block checks its own.
  const uint64_t last = g + 16 * uint64_t(blocks) - 1;
  if ((g >> 32) == (last >> 32)) {
    const PhiloxHead head(keys, static_cast<uint32_t>(g >> 32));
    int64_t b = 0;
    for (; b + 2 <= blocks; b += 2) philox_uniforms_blocks_avx512<2>(keys, &head, g + 16 * b, u + 64 * b);
    if (b < blocks) philox_uniforms_blocks_avx512<1>(keys, &head, g + 16 * b, u + 64 * b);
    return;
  }
  for (int64_t b = 0; b < blocks; ++b) {
    const uint64_t gb = g + 16 * b;
    const bool same = (gb >> 32) == ((gb + 15) >> 32);
    const PhiloxHead head(keys, static_cast<uint32_t>(gb >> 32));
    philox_uniforms_blocks_avx512<1>(keys, same ? &head : nullptr, gb, u + 64 * b);
  }
}

#if !defined(__clang__)
#pragma GCC diagnostic pop
#endif
#endif  // FUSEDREG_X86_DISPATCH

}  // namespace cpu

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
      const int64_t blocks = groups / 16;
      cpu::philox_uniforms_avx512(cpu::PhiloxKeys(seed), g0, blocks, u);
      detail::fill_uniform_groups_scalar(seed, g0 + 16 * blocks, groups - 16 * blocks, u + 64 * blocks);
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
