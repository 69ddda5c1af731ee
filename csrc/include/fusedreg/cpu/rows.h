// Row helpers of the CPU norm kernels: vectorized conversions between float and bf16 / fp16,
// streaming (non-temporal) row stores, and the placement of per-row scratch arrays.
//
// Conversions. The element loops run in float on fp32 copies of each row; the copies are made
// and written back by the loops below, which vectorize at every level of fusedreg/cpu/isa.h
// (integer and bit arithmetic only: a float compare would keep a loop scalar in the AVX2 and
// baseline variants under -ftrapping-math), or use the CPU's conversion instructions where it
// has them (float16: F16C from the AVX2 level; bfloat16 down: AVX-512 BF16), with the same
// values. They round exactly as c10's scalar conversions do (round to nearest even; a NaN
// becomes the quiet NaN 0x7FC0 in bf16 and sign | 0x7E00 in fp16), so results are bitwise
// those of per-element static_casts. (bias_dropout.cpp has the same conversions, 16 lanes at
// a time, for its AVX-512 loops.)
//
// Streaming stores. A row written with ordinary stores first reads the destination's cache
// lines (read-for-ownership): a third more traffic for a 1-read-1-write row, and on this
// project's machines the difference between about 29 and 37 GB/s per core. A large output
// that the caches cannot keep anyway is written with 64-byte non-temporal stores instead
// (store_row_nt, AVX-512 level only; elsewhere an ordinary copy). They are weakly ordered:
// a thread calls store_fence() after its last one, before the parallel region ends.
//
// Scratch placement ("4K aliasing"). A load whose address matches an earlier, still buffered
// store in bits 11..0 waits for that store (the core compares only those bits first). Rows of
// 1024 floats are exactly one page: a scratch row or a partial-sum row written in the same
// loop that streams an input row at the same page offset stalls every load of the loop. So a
// scratch row is placed, per row, at the page offset that keeps every stream's offset at a
// distance: place_scratch below.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <initializer_list>
#include <memory>
#include <type_traits>

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "fusedreg/cpu/isa.h"
#include "fusedreg/macros.h"

#if FUSEDREG_X86_DISPATCH
#include <immintrin.h>
#endif

namespace fusedreg {
namespace cpu {

template <typename T>
constexpr bool kIsHalfType = std::is_same_v<T, c10::BFloat16> || std::is_same_v<T, c10::Half>;

inline FUSEDREG_ALWAYS_INLINE uint32_t f32_bits(float f) {
  uint32_t w;
  std::memcpy(&w, &f, sizeof(w));
  return w;
}

inline FUSEDREG_ALWAYS_INLINE float bits_f32(uint32_t w) {
  float f;
  std::memcpy(&f, &w, sizeof(f));
  return f;
}

// ---- half -> float (exact) ----------------------------------------------------------------

inline FUSEDREG_ALWAYS_INLINE void row_to_float(const c10::BFloat16* __restrict src, float* __restrict dst,
                                                int64_t n) {
  const uint16_t* __restrict h = reinterpret_cast<const uint16_t*>(src);
#pragma omp simd
  for (int64_t t = 0; t < n; ++t) dst[t] = bits_f32(uint32_t(h[t]) << 16);
}

// Normals rebias the exponent (127 - 15), subnormals are m * 2^-24, inf/NaN keep the payload
// (a NaN made quiet).
inline FUSEDREG_ALWAYS_INLINE void row_to_float_half_bits(const uint16_t* __restrict h, float* __restrict dst,
                                                          int64_t n) {
#pragma omp simd
  for (int64_t t = 0; t < n; ++t) {
    const uint32_t a = h[t] & 0x7FFFu, sign = uint32_t(h[t] & 0x8000u) << 16;
    const uint32_t normal = (a << 13) + 0x38000000u;
    const uint32_t special = 0x7F800000u | (a << 13) | (a > 0x7C00u ? 0x00400000u : 0u);
    const uint32_t sub = f32_bits(static_cast<float>(static_cast<int32_t>(a)) * 5.9604644775390625e-08f);
    dst[t] = bits_f32(sign | (a < 0x0400u ? sub : (a >= 0x7C00u ? special : normal)));
  }
}

// ---- float -> half (round to nearest even) --------------------------------------------------

inline FUSEDREG_ALWAYS_INLINE void row_from_float_bf16_bits(const float* __restrict src, uint16_t* __restrict h,
                                                            int64_t n) {
#pragma omp simd
  for (int64_t t = 0; t < n; ++t) {
    const uint32_t w = f32_bits(src[t]);
    const uint32_t rounded = (w + ((w >> 16) & 1u) + 0x7FFFu) >> 16;
    h[t] = static_cast<uint16_t>((w & 0x7FFFFFFFu) > 0x7F800000u ? 0x7FC0u : rounded);
  }
}

#if FUSEDREG_X86_DISPATCH
// With vcvtne2ps2bf16 (32 elements per instruction). It rounds to nearest even as c10 does,
// except that it flushes denormal inputs to zero and keeps a NaN's sign and payload: 32
// elements with any denormal or NaN (vfpclassps) take the integer path.
FUSEDREG_TARGET_AVX512BF16 __attribute__((noinline)) inline void row_from_float_avx512bf16(
    const float* __restrict src, uint16_t* __restrict h, int64_t n) {
  int64_t t = 0;
  for (; t + 32 <= n; t += 32) {
    const __m512 a = _mm512_loadu_ps(src + t), b = _mm512_loadu_ps(src + t + 16);
    constexpr int kNanOrDenormal = 0x01 | 0x80 | 0x20;  // quiet NaN, signaling NaN, denormal
    const __mmask16 ka = _mm512_fpclass_ps_mask(a, kNanOrDenormal);
    const __mmask16 kb = _mm512_fpclass_ps_mask(b, kNanOrDenormal);
    if (_kortestz_mask16_u8(ka, kb)) {
      _mm512_storeu_si512(h + t, (__m512i)_mm512_cvtne2ps_pbh(b, a));  // a in the low half
    } else {
      row_from_float_bf16_bits(src + t, h + t, 32);
    }
  }
  row_from_float_bf16_bits(src + t, h + t, n - t);
}
#endif

inline FUSEDREG_ALWAYS_INLINE void row_from_float(const float* __restrict src, c10::BFloat16* __restrict dst,
                                                  int64_t n) {
  uint16_t* __restrict h = reinterpret_cast<uint16_t*>(dst);
#if FUSEDREG_X86_DISPATCH
  if (n >= 32 && cpu_has_avx512bf16()) return row_from_float_avx512bf16(src, h, n);
#endif
  row_from_float_bf16_bits(src, h, n);
}

// Normals round the 13 dropped mantissa bits (a carry moves into the exponent), |f| >= 65520
// gives inf, results below 2^-14 are round(|f| * 2^24) in subnormal units, taken from the
// float sum |f| + 0.5 (whose ulp is 2^-24; the addition rounds to nearest even).
inline FUSEDREG_ALWAYS_INLINE void row_from_float_half_bits(const float* __restrict src, uint16_t* __restrict h,
                                                            int64_t n) {
#pragma omp simd
  for (int64_t t = 0; t < n; ++t) {
    const uint32_t w = f32_bits(src[t]);
    const uint32_t a = w & 0x7FFFFFFFu, sign = (w >> 16) & 0x8000u;
    const uint32_t r = a - 0x38000000u;
    const uint32_t normal = (r + 0x0FFFu + ((r >> 13) & 1u)) >> 13;
    const uint32_t sub = f32_bits(bits_f32(a) + 0.5f) - 0x3F000000u;
    const uint32_t v = a > 0x7F800000u   ? 0x7E00u
                       : a >= 0x477FF000u ? 0x7C00u
                       : a < 0x38800000u  ? sub
                                          : normal;
    h[t] = static_cast<uint16_t>(sign | v);
  }
}

// ---- float16 with the F16C conversions -----------------------------------------------------
// vcvtph2ps / vcvtps2ph, 8 elements an instruction, give c10::Half's values bit for bit:
//   - float16 -> float is exact either way (normals, subnormals, infinities; a NaN keeps its
//     payload and is made quiet, as the integer formula above does);
//   - float -> float16 rounds to nearest even either way (|f| >= 65520 to inf, subnormal
//     results in their own units), but a NaN becomes sign | 0x7E00 in c10 and keeps its
//     (truncated) payload in vcvtps2ph: the NaN lanes are set to sign | 0x7E00 afterwards.
// The integer formulas cost about 25 vector operations per 16 elements and direction, the
// instructions one: with them a float16 layer_norm forward at 8192x1024 took 1.26x torch's
// time on the project's EPYC (one thread). The extension is built for baseline x86-64, so the
// F16C loops are out-of-line functions of their own target, taken when the kernels run at the
// AVX2 level or above (FUSEDREG_CPU_ISA=baseline keeps the integer formulas, which the tests
// compare with them).
#if FUSEDREG_X86_DISPATCH
#define FUSEDREG_TARGET_F16C __attribute__((target("avx2,fma,bmi,bmi2,popcnt,f16c")))
#endif

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
FUSEDREG_TARGET_F16C __attribute__((noinline)) inline void row_to_float_f16c(const uint16_t* __restrict h,
                                                                            float* __restrict dst, int64_t n) {
  int64_t t = 0;
  for (; t + 8 <= n; t += 8) {
    _mm256_storeu_ps(dst + t, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(h + t))));
  }
  row_to_float_half_bits(h + t, dst + t, n - t);
}

FUSEDREG_TARGET_F16C __attribute__((noinline)) inline void row_from_float_f16c(const float* __restrict src,
                                                                              uint16_t* __restrict h, int64_t n) {
  const __m128i sign = _mm_set1_epi16(int16_t(0x8000)), qnan = _mm_set1_epi16(0x7E00);
  int64_t t = 0;
  for (; t + 8 <= n; t += 8) {
    const __m256 x = _mm256_loadu_ps(src + t);
    __m128i v = _mm256_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m256 nan32 = _mm256_cmp_ps(x, x, _CMP_UNORD_Q);
    if (__builtin_expect(!_mm256_testz_ps(nan32, nan32), 0)) {  // a block with a NaN
      const __m256i nan = _mm256_castps_si256(nan32);
      const __m128i nan16 = _mm_packs_epi32(_mm256_castsi256_si128(nan), _mm256_extracti128_si256(nan, 1));
      v = _mm_blendv_epi8(v, _mm_or_si128(_mm_and_si128(v, sign), qnan), nan16);
    }
    _mm_storeu_si128(reinterpret_cast<__m128i*>(h + t), v);
  }
  row_from_float_half_bits(src + t, h + t, n - t);
}
#endif

inline FUSEDREG_ALWAYS_INLINE void row_to_float(const c10::Half* __restrict src, float* __restrict dst, int64_t n) {
  const uint16_t* __restrict h = reinterpret_cast<const uint16_t*>(src);
#if FUSEDREG_X86_DISPATCH
  if (n >= 8 && cpu_has_f16c()) return row_to_float_f16c(h, dst, n);
#endif
  row_to_float_half_bits(h, dst, n);
}

inline FUSEDREG_ALWAYS_INLINE void row_from_float(const float* __restrict src, c10::Half* __restrict dst,
                                                  int64_t n) {
  uint16_t* __restrict h = reinterpret_cast<uint16_t*>(dst);
#if FUSEDREG_X86_DISPATCH
  if (n >= 8 && cpu_has_f16c()) return row_from_float_f16c(src, h, n);
#endif
  row_from_float_half_bits(src, h, n);
}

#if FUSEDREG_X86_DISPATCH
// All 16 lanes: AVX-512 intrinsics used with their maskz forms and this mask (the plain
// instructions), since the unmasked ones' undefined pass-through operand trips GCC's
// -Wmaybe-uninitialized.
constexpr __mmask16 kAll16 = 0xFFFF;

// 16 floats rounded to float16 as c10 rounds, as 16 words in a register, for loops that convert
// as they go (the optimizers' float16 steps, the layer_norm forward's in-place rows, the
// BatchNorm and bias_dropout register loops): vcvtps2ph (to nearest even), the NaN lanes set
// to sign | 0x7E00, the values of row_from_float_f16c. Only call it after cpu_has_avx512().
// The NaN lanes are fixed up only in a block that has one: the same bits as blending every
// block, without the blend's two extra ops per block, which on the EPYC made the optimizers'
// fp16 SGD with fp16 state slower than torch's fused step (the branch is not taken in any
// block without a NaN, so it predicts). half16_store: the same, stored at dst.
FUSEDREG_TARGET_AVX512 inline FUSEDREG_ALWAYS_INLINE __m256i half16_bits(__m512 x) {
  __m256i v = _mm512_maskz_cvtps_ph(kAll16, x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __mmask16 nan = _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q);
  if (__builtin_expect(nan != 0, 0)) {
    // (v & 0x8000) | 0x7E00 in one ternary-logic op (truth table 0xEA: A & B | C)
    const __m256i quiet = _mm256_ternarylogic_epi32(v, _mm256_set1_epi16(int16_t(0x8000)),
                                                    _mm256_set1_epi16(0x7E00), 0xEA);
    v = _mm256_mask_blend_epi16(nan, v, quiet);
  }
  return v;
}

FUSEDREG_TARGET_AVX512 inline FUSEDREG_ALWAYS_INLINE void half16_store(c10::Half* dst, __m512 x) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst), half16_bits(x));
}
#endif

// ---- streaming stores -----------------------------------------------------------------------

#if FUSEDREG_X86_DISPATCH
// The 64-byte lines of d[0, bytes) (d 64-byte aligned, bytes a multiple of 64) from s.
FUSEDREG_TARGET_AVX512 inline void stream_lines_avx512(char* __restrict d, const char* __restrict s, int64_t bytes) {
  for (int64_t k = 0; k < bytes; k += 64)
    _mm512_stream_si512(reinterpret_cast<__m512i*>(d + k), _mm512_loadu_si512(s + k));
}
#endif

// dst[0, bytes) = src[0, bytes); the 64-byte-aligned lines of dst with non-temporal stores
// at the AVX-512 level (ISA), the partial lines at either end with ordinary ones.
template <Isa ISA>
inline FUSEDREG_ALWAYS_INLINE void store_row_nt(void* __restrict dst, const void* __restrict src, int64_t bytes) {
  char* d = static_cast<char*>(dst);
  const char* s = static_cast<const char*>(src);
#if FUSEDREG_X86_DISPATCH
  if constexpr (ISA == Isa::kAvx512) {
    const int64_t head = std::min<int64_t>(bytes, (64 - (reinterpret_cast<uintptr_t>(d) & 63)) & 63);
    std::memcpy(d, s, head);
    const int64_t body = (bytes - head) / 64 * 64;
    stream_lines_avx512(d + head, s + head, body);
    std::memcpy(d + head + body, s + head + body, bytes - head - body);
    return;
  }
#endif
  std::memcpy(d, s, bytes);
}

// Orders this thread's non-temporal stores before anything it does next (the end of the
// parallel region, whose barrier publishes the rows to the other threads).
template <Isa ISA>
inline FUSEDREG_ALWAYS_INLINE void store_fence() {
#if FUSEDREG_X86_DISPATCH
  if constexpr (ISA == Isa::kAvx512) _mm_sfence();
#endif
}

// ---- scratch placement ----------------------------------------------------------------------

// The first page boundary at or after p (a buffer allocated with a page of slack starts its
// page-aligned part there).
inline char* page_start(char* p) {
  return p + ((4096 - (reinterpret_cast<uintptr_t>(p) & 4095)) & 4095);
}

// The page offset (a multiple of 64 in [0, 4096)) for scratch rows that are both loaded and
// stored in a loop that also loads the rows at `loads` and stores the rows at `stores`
// (null entries ignored). A store at offset S delays a later load at offset L when
// (S - L) mod 4096 lies in (0, ~1.5 KiB] (the store is then a few iterations older, still
// buffered); the offset chosen maximizes the smallest such distance over all streams, where a
// distance of 0 counts as 4096 (same offset: the store of an iteration follows its load).
inline int64_t place_scratch(std::initializer_list<const void*> loads, std::initializer_list<const void*> stores) {
  // Each candidate's score in an array, stream by stream: the loops over the 64 candidates
  // vectorize (the search runs once per distinct set of stream offsets, ScratchRows::place, which
  // short rows meet several times a call: a row of 128 floats is an eighth of a page).
  int32_t score[64];
  for (int32_t k = 0; k < 64; ++k) score[k] = 4096;
  for (const void* p : loads) {
    if (!p) continue;
    const int32_t o = static_cast<int32_t>(reinterpret_cast<uintptr_t>(p) & 4095);
    for (int32_t k = 0; k < 64; ++k) {
      const int32_t d = (64 * k - o) & 4095;
      score[k] = std::min(score[k], d == 0 ? 4096 : d);
    }
  }
  for (const void* p : stores) {
    if (!p) continue;
    const int32_t o = static_cast<int32_t>(reinterpret_cast<uintptr_t>(p) & 4095);
    for (int32_t k = 0; k < 64; ++k) {
      const int32_t d = (o - 64 * k) & 4095;
      score[k] = std::min(score[k], d == 0 ? 4096 : d);
    }
  }
  int32_t best = 0;  // the first candidate of the highest score
  for (int32_t k = 1; k < 64; ++k)
    if (score[k] > score[best]) best = k;
  return 64 * int64_t(best);
}

// A buffer of `arrays` scratch rows of n elements of T, re-placed per row: at(k) is row k of
// the current placement. The rows are a whole number of pages apart, so that they share one
// page offset; the buffer has a page of slack to move them within. place() remembers the
// placements of the last 64 distinct stream offsets (the offsets of rows of one array cycle
// through at most 64 values), so that the search runs once per distinct set, not per row.
template <typename T>
class ScratchRows {
 public:
  static constexpr int kMaxStreams = 8;

  // adaptive: whether place() searches (else the rows stay at one offset): a lookup per row
  // and a search (0.1-0.15 us) per distinct set of offsets, worth it only for calls of many
  // rows.
  ScratchRows(int64_t n, int arrays, bool adaptive)
      : stride_((n * int64_t(sizeof(T)) + 4095) / 4096 * 4096),
        buf_(new char[stride_ * arrays + 8192]),
        adaptive_(adaptive) {
    base_ = page_start(buf_.get());
    cur_ = base_ + 2048;
  }

  // Places the rows for a loop that loads `loads` and stores `stores` (place_scratch).
  void place(std::initializer_list<const void*> loads, std::initializer_list<const void*> stores) {
    if (!adaptive_) return;
    if (loads.size() + stores.size() > 2 * kMaxStreams) {
      cur_ = base_ + place_scratch(loads, stores);
      return;
    }
    // The key's 16-bit offsets are packed into 64-bit words in registers: written as 16-bit
    // stores and read back as words (a memcmp), they waited for every store still buffered
    // (a store-forwarding stall: perf put 29% of the float32 512x128 backward kernel's samples
    // on the compare after those loads; its rows are placed one by one).
    Key k{};
    int i = 0;
    for (const void* p : loads) k.w[i / 4] |= uint64_t(offset_of(p)) << (16 * (i % 4)), ++i;
    for (const void* p : stores) k.w[i / 4] |= uint64_t(offset_of(p) | 0x2000) << (16 * (i % 4)), ++i;
    Entry& e = cache_[(k.w[0] >> 6) & 63];
    if (!e.valid || !(e.key == k)) {
      e.key = k;
      e.offset = place_scratch(loads, stores);
      e.valid = true;
    }
    cur_ = base_ + e.offset;
  }
  T* at(int k) const { return reinterpret_cast<T*>(cur_ + k * stride_); }
  template <typename U>
  U* at_as(int k) const { return reinterpret_cast<U*>(cur_ + k * stride_); }

 private:
  struct Key {
    uint64_t w[kMaxStreams / 2];  // the stream offsets (offset_of), four 16-bit fields a word
    bool operator==(const Key& o) const {
      bool same = true;
      for (int j = 0; j < kMaxStreams / 2; ++j) same &= w[j] == o.w[j];
      return same;
    }
  };
  struct Entry {
    Key key;
    int64_t offset = 0;
    bool valid = false;
  };
  static uint16_t offset_of(const void* p) {
    return p ? static_cast<uint16_t>(reinterpret_cast<uintptr_t>(p) & 4095) : uint16_t(0x1000);
  }
  int64_t stride_;
  std::unique_ptr<char[]> buf_;
  bool adaptive_;
  char* base_;
  char* cur_;
  Entry cache_[64];
};

}  // namespace cpu
}  // namespace fusedreg
