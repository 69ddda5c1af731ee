// Dropout keep decisions from the Philox words as bits, at the AVX-512 level: what a kernel
// needs when it only compares the uniforms with p (keep: u >= p), never uses their values.
// Used by bias_dropout's kernels without an activation (csrc/cpu/bias_dropout.cpp: keep masks
// read bit by bit) and by layer_norm's dropout (csrc/cpu/layer_norm.cpp: fill_keep_at, 0/1
// floats in place of the uniforms).
//
// keep needs only u >= p, not u. u = float(fold(w)) * 2^-31 with fold(w) = w < 0 ? ~w : w (the
// word as int32, philox.h's uint_to_uniform) is non-decreasing in fold(w) (both roundings are
// monotone), so u >= p exactly when fold(w) >= T, T the least fold value whose uniform reaches
// p (keep_threshold, a binary search with the same two float operations). fold(w) < T means
// -T <= w < T, that is (uint32)(w + T) < 2T: one add and one unsigned compare per 16 words,
// against the uniforms' conversion (fold, convert, multiply), their permutes into element order
// (12 shuffles per 64 elements), stores, reloads and float compare. The words' keep bits are
// put in element order with four pdep per 64 elements (scalar port, beside the vector work).
// The Philox rounds are cpu::philox_rounds_avx512 (fusedreg/cpu/uniforms.h), those of the
// uniforms: the same words, so the same decisions (the tests compare the kernels' results with
// the uniforms' paths and the reference bit for bit).
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "fusedreg/cpu/isa.h"
#include "fusedreg/cpu/philox_stream.h"
#include "fusedreg/cpu/uniforms.h"
#include "fusedreg/macros.h"
#include "fusedreg/philox.h"

#if FUSEDREG_X86_DISPATCH
#include <immintrin.h>
#endif

namespace fusedreg {
namespace cpu {

// T (see above) for p in (0, 1]; 2^31 when no uniform reaches p (then the bits cannot stand
// for the decisions: callers take the uniforms).
inline uint32_t keep_threshold(float p) {
  int64_t lo = 0, hi = int64_t(1) << 31;
  while (lo < hi) {
    const int64_t mid = (lo + hi) / 2;
    if (static_cast<float>(static_cast<int32_t>(mid)) * 4.6566127342e-10f >= p) {
      hi = mid;
    } else {
      lo = mid + 1;
    }
  }
  return static_cast<uint32_t>(lo);
}

// Whether keep bits can stand for the decisions u >= p at threshold T = keep_threshold(p).
inline bool keep_threshold_usable(uint32_t threshold) { return threshold < (uint32_t(1) << 31); }

// The keep bits of elements [start, start + len) from the uniforms, one at a time: only for the
// rare range whose groups do not share their high word.
inline void keep_from_uniforms(uint64_t seed, int64_t start, int64_t len, float p, uint64_t* keep) {
  for (int64_t b = 0; b < (len + 63) / 64; ++b) keep[b] = 0;
  for (int64_t e = 0; e < len; ++e) {
    if (dropout_uniform(seed, start + e) >= p) keep[e / 64] |= uint64_t(1) << (e % 64);
  }
}

#if FUSEDREG_X86_DISPATCH
#if !defined(__clang__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#endif
// Bit i of the result: whether 32-bit word i of merge_low_words(lo, hi) is kept.
FUSEDREG_TARGET_AVX512 inline FUSEDREG_ALWAYS_INLINE uint64_t keep_bits16(__m512i lo, __m512i hi, __m512i t,
                                                                        __m512i t2) {
  const __m512i w = merge_low_words(lo, hi);
  return uint64_t(_cvtmask16_u32(_mm512_cmpge_epu32_mask(_mm512_add_epi32(w, t), t2)));
}

// keep[b] (bit e: element 64b + e kept) for the 16 * NB groups from g on (elements 4g ...),
// the groups sharing their high word (head). t = T, t2 = 2T broadcast.
template <int NB>
FUSEDREG_TARGET_AVX512 inline FUSEDREG_ALWAYS_INLINE void philox_keep_blocks_avx512(
    const PhiloxKeys& keys, const PhiloxHead& head, uint64_t g, __m512i t, __m512i t2, uint64_t* __restrict keep) {
  __m512i c0[2 * NB], c1[2 * NB], c2[2 * NB], c3[2 * NB];
  philox_rounds_avx512<NB>(keys, &head, g, c0, c1, c2, c3);
  // Words 0, 1 (w01) and 2, 3 (w23) of A's and B's groups, a group's pair in two adjacent
  // 32-bit lanes; bit 2i + j of a compare mask is word j (or 2 + j) of the vector's group i,
  // that is element 8i + j (A) or 8i + 4 + j (B) of the block.
#pragma GCC unroll 2
  for (int b = 0; b < NB; ++b) {
    const int a = 2 * b, o = 2 * b + 1;
    // (no lambda: a lambda does not take the function's target, and could not inline these)
    keep[b] = _pdep_u64(keep_bits16(c0[a], c1[a], t, t2), 0x0303030303030303ull) |
              _pdep_u64(keep_bits16(c2[a], c3[a], t, t2), 0x0C0C0C0C0C0C0C0Cull) |
              _pdep_u64(keep_bits16(c0[o], c1[o], t, t2), 0x3030303030303030ull) |
              _pdep_u64(keep_bits16(c2[o], c3[o], t, t2), 0xC0C0C0C0C0C0C0C0ull);
  }
}

// keep[0, ceil(len / 64)) for elements [start, start + len), start a multiple of 4 (the bits
// past len are those of the groups after). False (nothing written) when the groups do not
// share their high word (a range across a multiple of 2^34 elements): the caller then takes
// the uniforms.
FUSEDREG_TARGET_AVX512 inline FUSEDREG_ALWAYS_INLINE bool philox_keep_avx512(const PhiloxKeys& keys, int64_t start,
                                                                          int64_t len, uint32_t threshold,
                                                                          uint64_t* keep) {
  const uint64_t g = static_cast<uint64_t>(start) >> 2;
  const int64_t blocks = (len + 63) / 64;
  if ((g >> 32) != ((g + 16 * uint64_t(blocks) - 1) >> 32)) return false;
  const PhiloxHead head(keys, static_cast<uint32_t>(g >> 32));
  const __m512i t = _mm512_set1_epi32(static_cast<int>(threshold));
  const __m512i t2 = _mm512_set1_epi32(static_cast<int>(2 * threshold));
  int64_t b = 0;
  for (; b + 2 <= blocks; b += 2) philox_keep_blocks_avx512<2>(keys, head, g + 16 * b, t, t2, keep + b);
  if (b < blocks) philox_keep_blocks_avx512<1>(keys, head, g + 16 * b, t, t2, keep + b);
  return true;
}

// u[k] = 1.0f where element start + k is kept, else 0.0f, for k in [0, len) (any start and
// len): read as the uniforms are read (u >= p, p in (0, 1), keep_threshold_usable), the same
// decisions. A range whose groups do not share their high word gets the uniforms themselves.
// Out of line, like philox_uniforms_avx512: fill_keep_at's generic body cannot inline it.
FUSEDREG_TARGET_AVX512 __attribute__((noinline)) inline void keep_floats_avx512(
    const PhiloxKeys& keys, uint64_t seed, uint32_t threshold, int64_t start, int64_t len, float* __restrict u) {
  constexpr int64_t kPiece = 256;
  // bits of [s - off, s + n): ceil((n + off) / 64) <= 5 words (zeroed once: a word read past
  // them only supplies the bits of elements past n)
  alignas(64) uint64_t keep[kPiece / 64 + 1] = {};
  const __m512 one = _mm512_set1_ps(1.0f);
  for (int64_t k0 = 0; k0 < len; k0 += kPiece) {
    const int64_t n = std::min(kPiece, len - k0);
    const int64_t s = start + k0;
    const int64_t off = s & 3;
    float* uk = u + k0;
    if (!philox_keep_avx512(keys, s - off, n + off, threshold, keep)) {
      for (int64_t k = 0; k < n; ++k) uk[k] = dropout_uniform(seed, s + k);
      continue;
    }
    // 64 elements' bits a word at a time, shifted by off from the aligned words (whole-word
    // reads of what was just stored: 16-bit reads at byte offsets within those stores could
    // not be forwarded from them, and waited for the stores to reach L1), then 16 floats a
    // step from the word's bits in a register.
    for (int64_t t0 = 0; t0 < n; t0 += 64) {
      const int64_t wi = t0 / 64;
      uint64_t kw = keep[wi];
      if (off) kw = (kw >> off) | (keep[wi + 1] << (64 - off));
      const int64_t m64 = std::min<int64_t>(64, n - t0);
#pragma GCC unroll 4
      for (int64_t q = 0; q < 64; q += 16) {
        if (q >= m64) break;
        const __mmask16 k = _cvtu32_mask16(static_cast<uint32_t>(kw >> q) & 0xFFFFu);
        const __mmask16 m = m64 - q >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (m64 - q)) - 1u);
        _mm512_mask_storeu_ps(uk + t0 + q, m, _mm512_maskz_mov_ps(k, one));
      }
    }
  }
}
#if !defined(__clang__)
#pragma GCC diagnostic pop
#endif
#endif  // FUSEDREG_X86_DISPATCH

// u[k] for k in [0, len), to be read only as u[k] >= p (p in (0, 1), threshold =
// keep_threshold(p)): that is the keep decision of element start + k. At the AVX-512 level with
// a usable threshold 0/1 floats from the keep bits (keep_floats_avx512), else the uniforms
// (fill_uniforms_at). Call it from a dispatch_isa body at level ISA.
template <Isa ISA>
inline FUSEDREG_ALWAYS_INLINE void fill_keep_at(const PhiloxKeys& keys, uint64_t seed, uint32_t threshold,
                                                int64_t start, int64_t len, float* __restrict u) {
#if FUSEDREG_X86_DISPATCH
  if constexpr (ISA == Isa::kAvx512) {
    if (keep_threshold_usable(threshold)) return keep_floats_avx512(keys, seed, threshold, start, len, u);
  }
#endif
  (void)threshold;
  fill_uniforms_at<ISA>(keys, seed, start, len, u);
}

}  // namespace cpu
}  // namespace fusedreg
