// CPU kernels of bias_dropout: out = residual + dropout(act(x + bias)).
// x, residual, out: (M, N) contiguous; bias: (N,). The mask is recomputed from the seed
// (fusedreg/philox.h), four elements per Philox call, never stored. The element loops run at
// the CPU's instruction-set level (fusedreg/cpu/isa.h), dispatched once per thread's range
// of chunks.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <type_traits>
#include <vector>

#include "fusedreg/activation.h"
#include "fusedreg/cpu/alloc.h"
#include "fusedreg/cpu/half_convert.h"
#include "fusedreg/cpu/isa.h"
#include "fusedreg/cpu/keep_bits.h"
#include "fusedreg/cpu/philox_stream.h"
#include "fusedreg/cpu/rows.h"
#include "fusedreg/cpu/uniforms.h"
#include "fusedreg/cpu/vmath.h"
#include "fusedreg/host.h"
#include "fusedreg/macros.h"
#include "fusedreg/philox.h"

#if FUSEDREG_X86_DISPATCH
#include <immintrin.h>
#endif

namespace fusedreg {
namespace {

// Elements per step: the step's uniforms are generated (fusedreg/cpu/philox_stream.h) and
// consumed from L1 right away, so the Philox arithmetic overlaps the streams' loads instead of
// running as a pass of its own. Small enough that the scratch below is a few KB of stack
// (threads may run with a small OMP_STACKSIZE).
constexpr int64_t kChunk = 256;
// Chunks per thread at least (16K elements): below that one thread does it all, since
// waking the pool costs more than it saves.
constexpr int64_t kGrainChunks = 64;
// Elements per step of the kernels that take keep masks instead of uniforms (no activation,
// AVX-512 level). float32: one block of 32 Philox groups (philox_keep_blocks_avx512<2>); the
// out-of-order core then overlaps a step's Philox rounds with the previous step's loads and
// stores, which it did not at 256 (standalone loop of the forward with bias and residual,
// 8192x1024, non-temporal stores, two threads: 2.2 ms at 256 a step, 1.2-1.3 ms at 128, 1.45
// at 64, 1.9 at 512; one thread 3.1 against 2.2 ms). bf16 / fp16, whose steps also convert
// each vector, kept 256: at 128 they took 2-11% longer (the same comparison as in
// stream_forward_output's note).
template <typename scalar_t>
constexpr int64_t kMaskChunk = std::is_same_v<scalar_t, float> ? 128 : 256;

// Whether a keep-mask kernel writes its output with non-temporal stores (store_out), which
// skip the read-for-ownership of each destination line and leave the output outside the
// caches: float32 outputs of 8 MiB and more (as layer_norm.cpp's), the forward's only when its
// streams (x, residual, out) outgrow the last-level cache. Measured on the AMD EPYC, min of 22
// interleaved calls, bias and residual, p = 0.1, streamed / cached (ms): the forward at
// 8192x1024 1.61 / 1.99 on two threads, at 4096x1024 0.70 / 0.81, and at 2048x1024 (24 MiB of
// streams, in the L3) 0.61 / 0.56 on one thread; the backward with the bias gradient at
// 8192x1024 1.51 / 2.17 (two threads), 2.47 / 3.58 (one), at 2048x1024 0.37 / 0.50. bf16
// outputs (half a line per store) gained nothing: forward 8192x1024 1.40 / 1.32, backward
// 1.30 / 1.34.
constexpr int64_t kStreamMinBytes = int64_t(8) << 20;

template <typename scalar_t>
inline bool stream_backward_output(int64_t out_bytes) {
  return std::is_same_v<scalar_t, float> && out_bytes >= kStreamMinBytes && cpu::cpu_has_avx512();
}

template <typename scalar_t>
inline bool stream_forward_output(int64_t out_bytes, int64_t footprint_bytes) {
  return stream_backward_output<scalar_t>(out_bytes) && footprint_bytes > cpu::l3_bytes();
}

// Elements per step of the kernels that take the uniforms (an activation, float64, or below
// AVX-512): kChunk, or half of it for float32 calls whose streams (footprint_bytes) outgrow
// the last-level cache, where the shorter step lets the Philox rounds overlap the memory
// traffic as kMaskChunk's does. Measured on the AMD EPYC (min of 3 rounds of alternating
// processes, bias and residual, p = 0.1, 256 / 128 a step, ms, two threads): float32
// 8192x1024 with GELU forward 2.82 / 2.35 and backward with grad_bias 3.64 / 2.94, with relu
// 2.52 / 1.98 and 2.80 / 2.09; 4096x1024 GELU 1.30 / 1.06 and 1.87 / 1.56; one thread 0.71-0.96
// of the time. In the caches (1024x1024, 256x768) and in bf16 at every size 128 took 3-19%
// longer (tried with 128 everywhere).
template <typename scalar_t>
inline int64_t uniform_step(int64_t footprint_bytes) {
  return std::is_same_v<scalar_t, float> && footprint_bytes > cpu::l3_bytes() ? kChunk / 2 : kChunk;
}

// Per-task scratch (kChunk floats and kChunk scalars, at most 3 KB): the uniforms of a chunk,
// and stand-ins that make the element loops branch-free (so they vectorize): -0s for a
// missing bias/residual, ones (always kept) when there is no dropout.
template <typename scalar_t>
struct Scratch {
  float u[kChunk];
  float ones[kChunk];
  scalar_t zeros[kChunk];
  Scratch() {
    for (int64_t i = 0; i < kChunk; ++i) {
      ones[i] = 1.0f;
      zeros[i] = scalar_t(-0.0);  // -0: z + (-0) == z for every z, -0 included
    }
  }
  template <cpu::Isa ISA>
  inline FUSEDREG_ALWAYS_INLINE const float* uniforms(bool dropout, const cpu::PhiloxKeys& keys,
                                                      uint64_t seed, int64_t start, int64_t len) {
    if (!dropout) return ones;
    cpu::fill_uniforms_at<ISA>(keys, seed, start, len, u);
    return u;
  }
};

// Whether |x + bias| <= cpu::kNormalRangeBound over a segment (false with any inf or NaN):
// the activations' exp then needs no range handling (cpu::VecMathNormal, same results). The
// test is an integer max of the sums' magnitude bits, which vectorizes at every level.
inline FUSEDREG_ALWAYS_INLINE bool all_in_normal_range(const float* __restrict x,
                                                       const float* __restrict bias, int64_t len) {
  int32_t m = 0;
#pragma omp simd reduction(max : m)
  for (int64_t t = 0; t < len; ++t) {
    const float z = x[t] + bias[t];
    int32_t w;
    std::memcpy(&w, &z, sizeof(w));
    w &= 0x7FFFFFFF;
    m = w > m ? w : m;
  }
  float bound = cpu::kNormalRangeBound;
  int32_t b;
  std::memcpy(&b, &bound, sizeof(b));
  return m <= b;
}

// The activations whose formulas call exp (and erf): only they have a normal-range variant.
template <Activation A>
constexpr bool kCallsExp = A == Activation::kGelu || A == Activation::kGeluTanh || A == Activation::kSilu;

// out = (u >= p ? act(x + bias) * scale : 0) + residual over one row segment.
// M: the math policy (cpu::VecMathNormal where the segment is known to be in its range).
template <typename scalar_t, Activation A, typename M = cpu::VecMath>
inline FUSEDREG_ALWAYS_INLINE void forward_segment(
    const scalar_t* __restrict x, const scalar_t* __restrict bias,
    const scalar_t* __restrict residual, const float* __restrict u, scalar_t* __restrict out,
    int64_t len, float p, at::opmath_type<scalar_t> scale) {
  using acc_t = at::opmath_type<scalar_t>;
#pragma omp simd
  for (int64_t t = 0; t < len; ++t) {
    const acc_t v = activate<A, acc_t, M>(static_cast<acc_t>(x[t]) + static_cast<acc_t>(bias[t]));
    out[t] = static_cast<scalar_t>((u[t] >= p ? v * scale : acc_t(0)) + static_cast<acc_t>(residual[t]));
  }
}

// The streams' lines kPrefetchElems elements ahead (four 256-element chunks) are prefetched
// before a step's uniforms or keep masks are generated: the hardware prefetchers alone stop
// short of covering the Philox time, and the loads of the next steps would then wait on the
// last-level cache with the core idle. The output is prefetched with write intent (its
// read-for-ownership starts early too), unless it is streamed (non-temporal stores).
constexpr int64_t kPrefetchElems = 4 * kChunk;

// Up to three streams of (M, N) arrays of scalar_t (null: none) to prefetch ahead.
template <typename scalar_t>
struct Streams {
  const scalar_t* in0;
  const scalar_t* in1;
  const scalar_t* out;
};

// The lines of the chunk (chunk elements) kPrefetchElems elements past start.
template <typename scalar_t>
inline FUSEDREG_ALWAYS_INLINE void prefetch_ahead(const Streams<scalar_t>& s, int64_t start, int64_t total,
                                                  int64_t chunk = kChunk) {
  const int64_t ahead = start + kPrefetchElems;
  if (ahead >= total) return;
  const int64_t bytes = std::min(chunk, total - ahead) * int64_t(sizeof(scalar_t));
  const auto at = [&](const scalar_t* p) FUSEDREG_ALWAYS_INLINE {
    return p ? reinterpret_cast<const char*>(p + ahead) : nullptr;
  };
  const char* in0 = at(s.in0);
  const char* in1 = at(s.in1);
  const char* out = at(s.out);
  for (int64_t k = 0; k < bytes; k += 64) {
    if (in0) __builtin_prefetch(in0 + k, 0, 3);
    if (in1) __builtin_prefetch(in1 + k, 0, 3);
    if (out) __builtin_prefetch(out + k, 1, 3);
  }
}

// Runs fn(i, col, len, u, zeros) over the tensor in parallel, one row segment at a time:
// elements [i, i + len) lie in one row starting at column col, u points at their uniforms
// (all ones without dropout) and zeros at len negative zeros (the stand-in for a missing
// operand: z + (-0) is z for every z, where + 0 would turn a -0 result into +0).
// fn must be a FUSEDREG_ALWAYS_INLINE lambda: it is compiled into each instruction-set variant.
// step: elements per step (uniform_step), at most kChunk.
template <typename scalar_t, typename Fn>
void for_each_row_segment(Rows rows, bool dropout, uint64_t seed, const Streams<scalar_t>& streams,
                          const Fn& fn, int64_t step = kChunk) {
  const int64_t total = rows.M * rows.N;
  const cpu::PhiloxKeys keys(seed);
  at::parallel_for(0, (total + step - 1) / step, kGrainChunks * kChunk / step, [&](int64_t begin, int64_t end) {
    Scratch<scalar_t> scratch;
    cpu::dispatch_isa([&](auto isa) FUSEDREG_ALWAYS_INLINE {
      constexpr cpu::Isa I = decltype(isa)::value;
      int64_t col = (begin * step) % rows.N;
      for (int64_t chunk = begin; chunk < end; ++chunk) {
        const int64_t start = chunk * step;
        const int64_t len = std::min(step, total - start);
        if (dropout) prefetch_ahead(streams, start, total, step);
        const float* u = scratch.template uniforms<I>(dropout, keys, seed, start, len);
        int64_t j = 0;
        while (j < len) {
          const int64_t seg = std::min(len - j, rows.N - col);
          fn(start + j, col, seg, u + j, scratch.zeros);
          j += seg;
          col += seg;
          if (col == rows.N) col = 0;
        }
      }
    });
  });
}

// bf16 and fp16: the element loops run on fp32 copies of each row segment (at most kChunk
// elements, on the stack, so in L1), converted by the norms' row conversions
// (fusedreg/cpu/rows.h: cpu::row_to_float / row_from_float), which vectorize at every level
// and round exactly as c10's scalar conversions do, so the results are bitwise those of the
// per-element code.
template <typename scalar_t>
constexpr bool kIsHalf = std::is_same_v<scalar_t, at::BFloat16> || std::is_same_v<scalar_t, at::Half>;

// forward_segment on fp32 copies (bf16, fp16), with the residual added in a loop of its own:
// act * scale and + residual stay two roundings at every level, as the per-element code
// they replace compiled them (in one loop, the AVX2 variant would contract them into an FMA).
template <Activation A, typename M = cpu::VecMath>
inline FUSEDREG_ALWAYS_INLINE void forward_segment_split(
    const float* __restrict x, const float* __restrict bias, const float* __restrict residual,
    const float* __restrict u, float* __restrict out, int64_t len, float p, float scale) {
#pragma omp simd
  for (int64_t t = 0; t < len; ++t) {
    const float v = activate<A, float, M>(x[t] + bias[t]);
    out[t] = u[t] >= p ? v * scale : 0.0f;
  }
#pragma omp simd
  for (int64_t t = 0; t < len; ++t) out[t] += residual[t];
}

// bf16/fp16: the bias row as fp32, converted once per call rather than once per row
// segment (-0s without a bias, the stand-in of a missing operand). Empty for fp32/fp64.
template <typename scalar_t>
std::vector<float> bias_as_float(const scalar_t* bias, int64_t N) {
  std::vector<float> f;
  if constexpr (kIsHalf<scalar_t>) {
    f.resize(static_cast<size_t>(N));
    if (bias) {
      cpu::row_to_float(bias, f.data(), N);
    } else {
      std::fill(f.begin(), f.end(), -0.0f);
    }
  }
  return f;
}

// Float32 GELU at the AVX-512 level: forward_segment / forward_segment_split (the same two
// roundings, act * scale and + residual) with GELU from cpu::gelu_avx512, whose table of
// polynomials needs no exp or erf: where the loops above were bound by erf's arithmetic, this
// one runs at about the speed of the memory streams. One out-of-line call per row segment
// (dispatched by the CPU's level, cpu::cpu_isa()), for any input: the table's clamp handles
// large, infinite and NaN inputs, so there is no normal-range split. residual may be null
// (none): the sum then skips the add of -0s, which changes no result (o + -0 == o).
#if FUSEDREG_X86_DISPATCH
template <bool kResidual>
FUSEDREG_TARGET_AVX512 __attribute__((noinline)) void gelu_forward_segment_avx512(
    const float* __restrict x, const float* __restrict bias, const float* __restrict residual,
    const float* __restrict u, float* __restrict out, int64_t len, float p, float scale) {
  const __m512 pv = _mm512_set1_ps(p), sv = _mm512_set1_ps(scale);
  for (int64_t t = 0; t < len; t += 16) {
    const __mmask16 m = len - t >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (len - t)) - 1u);
    const __m512 z = _mm512_add_ps(_mm512_maskz_loadu_ps(m, x + t), _mm512_maskz_loadu_ps(m, bias + t));
    const __m512 v = cpu::gelu_avx512(z);
    const __mmask16 keep = _mm512_cmp_ps_mask(_mm512_maskz_loadu_ps(m, u + t), pv, _CMP_GE_OQ);
    __m512 o = _mm512_maskz_mul_ps(keep, v, sv);
    if constexpr (kResidual) o = _mm512_add_ps(o, _mm512_maskz_loadu_ps(m, residual + t));
    _mm512_mask_storeu_ps(out + t, m, o);
  }
}

inline void gelu_forward_segment_avx512(const float* x, const float* bias, const float* residual,
                                        const float* u, float* out, int64_t len, float p, float scale) {
  if (residual) return gelu_forward_segment_avx512<true>(x, bias, residual, u, out, len, p, scale);
  gelu_forward_segment_avx512<false>(x, bias, nullptr, u, out, len, p, scale);
}
#endif

// Whether float32 GELU takes gelu_forward_segment_avx512.
template <Activation A>
inline FUSEDREG_ALWAYS_INLINE bool gelu_by_table() {
#if FUSEDREG_X86_DISPATCH
  return A == Activation::kGelu && cpu::cpu_has_avx512();
#else
  return false;
#endif
}

// The forward without an activation from keep masks (below); false when the call does not
// qualify (then nothing ran).
template <typename scalar_t>
bool masked_forward(const scalar_t* x, const float* bias_row, const scalar_t* residual, scalar_t* out,
                    Rows rows, float p, uint64_t seed);

template <typename scalar_t, Activation A>
void forward_kernel(const scalar_t* x, const scalar_t* bias, const scalar_t* residual,
                    scalar_t* out, Rows rows, float p, uint64_t seed) {
  using acc_t = at::opmath_type<scalar_t>;
  const bool dropout = p > 0.0f;
  const acc_t scale = dropout ? static_cast<acc_t>(dropout_scale(p)) : acc_t(1);
  const Streams<scalar_t> streams{x, residual, out};
  const std::vector<float> bias_f = bias_as_float(bias, rows.N);
  if constexpr (A == Activation::kNone && !std::is_same_v<scalar_t, double>) {
    const float* bias_row = nullptr;  // float: the bias itself; bf16/fp16: its fp32 row (-0s if none)
    if constexpr (std::is_same_v<scalar_t, float>) {
      bias_row = bias;
    } else {
      bias_row = bias_f.data();
    }
    if (dropout && masked_forward<scalar_t>(x, bias_row, residual, out, rows, p, seed)) return;
  }
  for_each_row_segment<scalar_t>(rows, dropout, seed, streams, [&](int64_t i, int64_t col, int64_t len,
                                                          const float* u, const scalar_t* zeros)
                                                          FUSEDREG_ALWAYS_INLINE {
    // The activations' exp without range handling where the segment allows it (the same
    // results, as in the backward; a segment with a large or non-finite input keeps VecMath).
    if constexpr (kIsHalf<scalar_t>) {
      alignas(64) float xf[kChunk], rf[kChunk], of[kChunk];
      cpu::row_to_float(x + i, xf, len);
      const float* bf = bias_f.data() + col;
#if FUSEDREG_X86_DISPATCH
      if (gelu_by_table<A>()) {  // no residual: no -0s to convert and add
        if (residual) cpu::row_to_float(residual + i, rf, len);
        gelu_forward_segment_avx512(xf, bf, residual ? rf : nullptr, u, of, len, p, scale);
        return cpu::row_from_float(of, out + i, len);
      }
#endif
      cpu::row_to_float(residual ? residual + i : zeros, rf, len);
      if (kCallsExp<A> && all_in_normal_range(xf, bf, len)) {
        forward_segment_split<A, cpu::VecMathNormal>(xf, bf, rf, u, of, len, p, scale);
      } else {
        forward_segment_split<A>(xf, bf, rf, u, of, len, p, scale);
      }
      cpu::row_from_float(of, out + i, len);
    } else {
      const scalar_t* b = bias ? bias + col : zeros;
      const scalar_t* r = residual ? residual + i : zeros;
      if constexpr (std::is_same_v<scalar_t, float> && kCallsExp<A>) {
#if FUSEDREG_X86_DISPATCH
        if (gelu_by_table<A>()) {
          return gelu_forward_segment_avx512(x + i, b, residual ? r : nullptr, u, out + i, len, p, scale);
        }
#endif
        if (all_in_normal_range(x + i, b, len)) {
          return forward_segment<scalar_t, A, cpu::VecMathNormal>(x + i, b, r, u, out + i, len, p, scale);
        }
      }
      forward_segment<scalar_t, A>(x + i, b, r, u, out + i, len, p, scale);
    }
  }, uniform_step<scalar_t>((residual ? 3 : 2) * rows.M * rows.N * int64_t(sizeof(scalar_t))));
}

// act'(z) in the compute type: GELU's float32 derivative is the math policy's one-exp form
// (fusedreg/cpu/vmath.h, cpu::gelu_grad_t), every other case activation.h's formula.
template <Activation A, typename T, typename M>
inline FUSEDREG_ALWAYS_INLINE T act_grad(T z) {
  if constexpr (A == Activation::kGelu && std::is_same_v<T, float>) {
    return M::gelu_grad(z);
  } else {
    return activate_grad<A, T, M>(z);
  }
}

// grad_x = grad_out * keep * scale * act'(x + bias) over one row segment of len elements;
// adds grad_x into bias_acc when given (the bias gradient's partial sums).
template <typename scalar_t, Activation A>
inline FUSEDREG_ALWAYS_INLINE void backward_segment(
    const scalar_t* __restrict g, const scalar_t* __restrict x, const scalar_t* __restrict bias,
    const float* __restrict u, scalar_t* __restrict gx, int64_t len, float p,
    at::opmath_type<scalar_t> scale, at::opmath_type<scalar_t>* __restrict bias_acc) {
  using acc_t = at::opmath_type<scalar_t>;
  // g * scale is computed for every element and then selected: written as a conditional
  // product, the vectorizer made g[t] a masked load merged through a stack temporary.
  // Whether there is a bias_acc is a compile-time switch, not a test inside the loop.
  const auto loop = [&](auto math, auto has_acc) FUSEDREG_ALWAYS_INLINE {
    using M = decltype(math);
    constexpr bool kAcc = decltype(has_acc)::value;
#pragma omp simd
    for (int64_t t = 0; t < len; ++t) {
      const acc_t gs = static_cast<acc_t>(g[t]) * scale;
      acc_t d = u[t] >= p ? gs : acc_t(0);
      if constexpr (A != Activation::kNone) {
        d *= act_grad<A, acc_t, M>(static_cast<acc_t>(x[t]) + static_cast<acc_t>(bias[t]));
      }
      gx[t] = static_cast<scalar_t>(d);
      if constexpr (kAcc) bias_acc[t] += d;
    }
  };
  const auto run = [&](auto math) FUSEDREG_ALWAYS_INLINE {
    if (bias_acc) {
      loop(math, std::true_type{});
    } else {
      loop(math, std::false_type{});
    }
  };
  if constexpr (std::is_same_v<scalar_t, float> && (A == Activation::kGelu || A == Activation::kGeluTanh ||
                                                    A == Activation::kSilu)) {
    if (all_in_normal_range(x, bias, len)) return run(cpu::VecMathNormal{});
  }
  run(cpu::VecMath{});
}

// backward_segment on fp32 copies for bf16/fp16 (see cpu::row_to_float), in place otherwise.
// bias_f: the fp32 bias row at this segment's column (bias_as_float; bf16/fp16 with an
// activation).
template <typename scalar_t, Activation A>
inline FUSEDREG_ALWAYS_INLINE void backward_segment_any(
    const scalar_t* g, const scalar_t* x, const scalar_t* bias, const float* bias_f, const float* u,
    scalar_t* gx, int64_t len, float p, at::opmath_type<scalar_t> scale,
    at::opmath_type<scalar_t>* bias_acc) {
  if constexpr (kIsHalf<scalar_t>) {
    alignas(64) float gf[kChunk], xf[kChunk], of[kChunk];
    cpu::row_to_float(g, gf, len);
    if constexpr (A != Activation::kNone) cpu::row_to_float(x, xf, len);
    backward_segment<float, A>(gf, A != Activation::kNone ? xf : nullptr, bias_f, u, of, len, p, scale,
                               bias_acc);
    cpu::row_from_float(of, gx, len);
  } else {
    backward_segment<scalar_t, A>(g, x, bias, u, gx, len, p, scale, bias_acc);
  }
}

// ---- the backward without an activation, at the AVX-512 level: keep masks, not uniforms ----
// grad_x = keep ? grad_out * scale : 0 needs only the keep decisions u >= p, not the
// uniforms: they are taken from the Philox words as bits (fusedreg/cpu/keep_bits.h, shared
// with layer_norm's dropout), the same decisions (the tests compare the gradients with the
// uniforms' path and the reference bit for bit).

#if FUSEDREG_X86_DISPATCH
#if !defined(__clang__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#endif
// 16 (or the m-masked first) elements as float, and back: c10's values bit for bit
// (fusedreg/cpu/half_convert.h's formulas, with masked loads and stores).
FUSEDREG_TARGET_AVX512 inline FUSEDREG_ALWAYS_INLINE __m512 load_masked(const float* p, __mmask16 m) {
  return _mm512_maskz_loadu_ps(m, p);
}
FUSEDREG_TARGET_AVX512 inline FUSEDREG_ALWAYS_INLINE __m512 load_masked(const at::BFloat16* p, __mmask16 m) {
  return cpu::bf16x16_widen(_mm256_maskz_loadu_epi16(m, p));
}
FUSEDREG_TARGET_AVX512 inline FUSEDREG_ALWAYS_INLINE __m512 load_masked(const at::Half* p, __mmask16 m) {
  return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, p));
}
FUSEDREG_TARGET_AVX512 inline FUSEDREG_ALWAYS_INLINE void store_masked(float* p, __mmask16 m, __m512 x) {
  _mm512_mask_storeu_ps(p, m, x);
}
FUSEDREG_TARGET_AVX512 inline FUSEDREG_ALWAYS_INLINE void store_masked(at::BFloat16* p, __mmask16 m, __m512 x) {
  _mm512_mask_cvtepi32_storeu_epi16(p, m, cpu::bf16x16_lanes(x));
}
FUSEDREG_TARGET_AVX512 inline FUSEDREG_ALWAYS_INLINE void store_masked(at::Half* p, __mmask16 m, __m512 x) {
  _mm256_mask_storeu_epi16(p, m, cpu::half16_bits(x));
}

// store_masked, or with NT (float32 only: stream_forward_output / stream_backward_output) a
// non-temporal store of a whole 64-byte-aligned line, all 16 lanes written; the same values.
// A thread that streamed calls _mm_sfence() after its last store (they are weakly ordered).
template <bool NT, typename scalar_t>
FUSEDREG_TARGET_AVX512 inline FUSEDREG_ALWAYS_INLINE void store_out(scalar_t* p, __mmask16 m, __m512 x) {
  if constexpr (NT && std::is_same_v<scalar_t, float>) {
    if (m == __mmask16(0xFFFF) && (reinterpret_cast<uintptr_t>(p) & 63) == 0) return _mm512_stream_ps(p, x);
  }
  store_masked(p, m, x);
}

// gx[0, len) = keep ? g * scale : +0 (in float, rounded to scalar_t), keep from the bits of
// keep (element t: bit t % 64 of keep[t / 64]); acc[0, len) += that float when acc is given.
// The float values, roundings and sums of backward_segment_any without an activation.
template <bool NT, typename scalar_t>
FUSEDREG_TARGET_AVX512 inline FUSEDREG_ALWAYS_INLINE void masked_grad_avx512(
    const scalar_t* __restrict g, const uint64_t* __restrict keep, scalar_t* __restrict gx, int64_t len,
    float scale, float* __restrict acc) {
  const __m512 sv = _mm512_set1_ps(scale);
  for (int64_t t = 0; t < len; t += 16) {
    const __mmask16 m = len - t >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (len - t)) - 1u);
    uint16_t bits;  // elements t .. t + 15: bytes t / 8 and t / 8 + 1 of keep (little-endian)
    std::memcpy(&bits, reinterpret_cast<const char*>(keep) + t / 8, sizeof(bits));
    const __mmask16 k = _cvtu32_mask16(bits);
    const __m512 d = _mm512_maskz_mul_ps(k, load_masked(g + t, m), sv);
    store_out<NT>(gx + t, m, d);
    if (acc) _mm512_mask_storeu_ps(acc + t, m, _mm512_add_ps(_mm512_maskz_loadu_ps(m, acc + t), d));
  }
}

// The backward without an activation or bias gradient over the chunks [c0, c1) (kMaskChunk
// elements each, the last one up to total): per chunk, the lines kPrefetchElems ahead are
// prefetched, its keep masks taken, then gx = keep ? g * scale : 0.
template <bool NT, typename scalar_t>
FUSEDREG_TARGET_AVX512 __attribute__((noinline)) void masked_backward_range(
    const cpu::PhiloxKeys& keys, uint64_t seed, uint32_t threshold, float p, int64_t c0, int64_t c1,
    int64_t total, const scalar_t* g, scalar_t* gx, float scale) {
  const Streams<scalar_t> streams{g, nullptr, NT ? nullptr : gx};
  constexpr int64_t kStep = kMaskChunk<scalar_t>;
  for (int64_t chunk = c0; chunk < c1; ++chunk) {  // chunks start at multiples of kMaskChunk: of 4
    const int64_t start = chunk * kStep;
    const int64_t len = std::min(kStep, total - start);
    prefetch_ahead(streams, start, total, kStep);
    alignas(64) uint64_t keep[kStep / 64];
    if (!cpu::philox_keep_avx512(keys, start, len, threshold, keep)) {
      cpu::keep_from_uniforms(seed, start, len, p, keep);
    }
    masked_grad_avx512<NT>(g + start, keep, gx + start, len, scale, nullptr);
  }
  if constexpr (NT) _mm_sfence();
}

// R rows' chunks at once (the same columns [c, c + len) of rows r0 .. r0 + R - 1, len <=
// kMaskChunk, each chunk's start a multiple of 4): the bias partial row's stretch acc[0, len)
// is loaded and stored once for the R rows, their values added to it in row order (the
// additions of R one-row calls), instead of once per row.
template <int R, bool NT, typename scalar_t>
FUSEDREG_TARGET_AVX512 __attribute__((noinline)) void masked_backward_rows(
    const cpu::PhiloxKeys& keys, uint64_t seed, uint32_t threshold, float p, int64_t r0, int64_t N,
    int64_t c, int64_t len, const scalar_t* g, scalar_t* gx, float scale, float* acc) {
  alignas(64) uint64_t keep[R][kMaskChunk<scalar_t> / 64];
  for (int i = 0; i < R; ++i) {
    const int64_t start = (r0 + i) * N + c;
    if (!cpu::philox_keep_avx512(keys, start, len, threshold, keep[i])) {
      cpu::keep_from_uniforms(seed, start, len, p, keep[i]);
    }
  }
  const __m512 sv = _mm512_set1_ps(scale);
  for (int64_t t = 0; t < len; t += 16) {
    const __mmask16 m = len - t >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (len - t)) - 1u);
    __m512 a = _mm512_maskz_loadu_ps(m, acc + t);
#pragma GCC unroll 4
    for (int i = 0; i < R; ++i) {
      const int64_t at = (r0 + i) * N + c + t;
      uint16_t bits;
      std::memcpy(&bits, reinterpret_cast<const char*>(keep[i]) + t / 8, sizeof(bits));
      const __m512 d = _mm512_maskz_mul_ps(_cvtu32_mask16(bits), load_masked(g + at, m), sv);
      store_out<NT>(gx + at, m, d);
      a = _mm512_add_ps(a, d);
    }
    _mm512_mask_storeu_ps(acc + t, m, a);
  }
}

// One chunk of the forward without an activation (len <= kMaskChunk elements from start, a
// multiple of 4): out = (keep ? (x + bias) * scale : +0) + residual in float, each operation
// rounded on its own as forward_segment / forward_segment_split round them, then rounded to
// scalar_t. bias_row: the fp32 bias row (null: none); residual null: none (adding -0, the
// stand-in the other path adds, changes no value). The chunk is walked by row segments (the
// bias column wraps at a row's end); a segment's keep bits are read at any bit offset.
template <bool NT, typename scalar_t>
FUSEDREG_TARGET_AVX512 inline FUSEDREG_ALWAYS_INLINE void masked_forward_chunk(
    const cpu::PhiloxKeys& keys, uint64_t seed, uint32_t threshold, float p, int64_t start, int64_t len,
    int64_t N, const scalar_t* x, const float* bias_row, const scalar_t* residual, scalar_t* out, float scale) {
  constexpr int64_t kWords = kMaskChunk<scalar_t> / 64;
  alignas(64) uint64_t keep[kWords + 1];  // one word more: 4-byte reads at any byte offset
  keep[kWords] = 0;
  if (!cpu::philox_keep_avx512(keys, start, len, threshold, keep)) cpu::keep_from_uniforms(seed, start, len, p, keep);
  const char* kb = reinterpret_cast<const char*>(keep);
  const __m512 sv = _mm512_set1_ps(scale);
  int64_t col = start % N;
  for (int64_t j = 0; j < len;) {
    const int64_t seg = std::min(len - j, N - col);
    for (int64_t t = 0; t < seg; t += 16) {
      const int64_t e = j + t, i = start + e;
      const __mmask16 m = seg - t >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (seg - t)) - 1u);
      uint32_t w;
      std::memcpy(&w, kb + e / 8, sizeof(w));
      const __mmask16 k = _cvtu32_mask16((w >> (e % 8)) & 0xFFFFu);
      __m512 v = load_masked(x + i, m);
      if (bias_row) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(m, bias_row + col + t));
      __m512 o = _mm512_maskz_mul_ps(k, v, sv);
      if (residual) o = _mm512_add_ps(o, load_masked(residual + i, m));
      store_out<NT>(out + i, m, o);
    }
    j += seg;
    col += seg;
    if (col == N) col = 0;
  }
}

// The forward without an activation over the chunks [c0, c1) (kMaskChunk elements each, the
// last one up to total), each chunk's lines kPrefetchElems ahead prefetched first.
template <bool NT, typename scalar_t>
FUSEDREG_TARGET_AVX512 __attribute__((noinline)) void masked_forward_range(
    const cpu::PhiloxKeys& keys, uint64_t seed, uint32_t threshold, float p, int64_t c0, int64_t c1,
    int64_t total, int64_t N, const scalar_t* x, const float* bias_row, const scalar_t* residual, scalar_t* out,
    float scale) {
  const Streams<scalar_t> streams{x, residual, NT ? nullptr : out};
  constexpr int64_t kStep = kMaskChunk<scalar_t>;
  for (int64_t chunk = c0; chunk < c1; ++chunk) {  // chunks start at multiples of kMaskChunk: of 4
    const int64_t start = chunk * kStep;
    const int64_t len = std::min(kStep, total - start);
    prefetch_ahead(streams, start, total, kStep);
    masked_forward_chunk<NT>(keys, seed, threshold, p, start, len, N, x, bias_row, residual, out, scale);
  }
  if constexpr (NT) _mm_sfence();
}
#if !defined(__clang__)
#pragma GCC diagnostic pop
#endif
#endif  // FUSEDREG_X86_DISPATCH

// Rows per step of the tiles' keep-mask backward (masked_backward_rows).
constexpr int64_t kMaskRows = 4;

// Whether the keep-mask backward exists for these types (masked_backward_chunk).
template <typename scalar_t, Activation A>
constexpr bool kMaskable = FUSEDREG_X86_DISPATCH && A == Activation::kNone && !std::is_same_v<scalar_t, double>;

// Whether the backward of this call takes the keep masks (AVX-512 level, no activation,
// dropout, float / bf16 / fp16, a threshold some uniform reaches).
template <typename scalar_t, Activation A>
inline bool use_keep_masks(bool dropout, uint32_t threshold) {
#if FUSEDREG_X86_DISPATCH
  return A == Activation::kNone && dropout && !std::is_same_v<scalar_t, double> &&
         cpu::keep_threshold_usable(threshold) && cpu::cpu_has_avx512();
#else
  (void)dropout;
  (void)threshold;
  return false;
#endif
}

template <typename scalar_t>
bool masked_forward(const scalar_t* x, const float* bias_row, const scalar_t* residual, scalar_t* out,
                    Rows rows, float p, uint64_t seed) {
#if FUSEDREG_X86_DISPATCH
  const uint32_t threshold = cpu::keep_threshold(p);
  if (!use_keep_masks<scalar_t, Activation::kNone>(true, threshold)) return false;
  const float scale = dropout_scale(p);
  const int64_t total = rows.M * rows.N;
  const cpu::PhiloxKeys keys(seed);
  const int64_t bytes = total * int64_t(sizeof(scalar_t));
  const bool nt = stream_forward_output<scalar_t>(bytes, (residual ? 3 : 2) * bytes);
  constexpr int64_t kStep = kMaskChunk<scalar_t>;
  at::parallel_for(0, (total + kStep - 1) / kStep, kGrainChunks * kChunk / kStep,
                   [&](int64_t begin, int64_t end) {
    if (nt) {
      masked_forward_range<true>(keys, seed, threshold, p, begin, end, total, rows.N, x, bias_row, residual, out,
                                 scale);
    } else {
      masked_forward_range<false>(keys, seed, threshold, p, begin, end, total, rows.N, x, bias_row, residual, out,
                                  scale);
    }
  });
  return true;
#else
  return false;
#endif
}

template <typename scalar_t, Activation A>
void backward_kernel(const scalar_t* g, const scalar_t* x, const scalar_t* bias, scalar_t* gx,
                     scalar_t* grad_bias, Rows rows, float p, uint64_t seed) {
  using acc_t = at::opmath_type<scalar_t>;
  const bool dropout = p > 0.0f;
  const acc_t scale = dropout ? static_cast<acc_t>(dropout_scale(p)) : acc_t(1);
  // Without an activation the bias does not enter the gradient (only its sum is taken).
  const std::vector<float> bias_f = A != Activation::kNone ? bias_as_float(bias, rows.N) : std::vector<float>();
  const auto bias_f_at = [&](int64_t col) FUSEDREG_ALWAYS_INLINE {
    return bias_f.empty() ? nullptr : bias_f.data() + col;
  };
  const uint32_t threshold = dropout ? cpu::keep_threshold(p) : 0;
  const bool masks = use_keep_masks<scalar_t, A>(dropout, threshold);
  const int64_t step = uniform_step<scalar_t>((x ? 3 : 2) * rows.M * rows.N * int64_t(sizeof(scalar_t)));
  if (grad_bias == nullptr) {
    const Streams<scalar_t> streams{g, x, gx};
#if FUSEDREG_X86_DISPATCH
    if constexpr (kMaskable<scalar_t, A>) {
      if (masks) {
        const cpu::PhiloxKeys keys(seed);
        const int64_t total = rows.M * rows.N;
        const bool nt = stream_backward_output<scalar_t>(total * int64_t(sizeof(scalar_t)));
        constexpr int64_t kStep = kMaskChunk<scalar_t>;
        at::parallel_for(0, (total + kStep - 1) / kStep, kGrainChunks * kChunk / kStep,
                         [&](int64_t begin, int64_t end) {
          if (nt) {
            masked_backward_range<true>(keys, seed, threshold, p, begin, end, total, g, gx, scale);
          } else {
            masked_backward_range<false>(keys, seed, threshold, p, begin, end, total, g, gx, scale);
          }
        });
        return;
      }
    }
#endif
    for_each_row_segment<scalar_t>(rows, dropout, seed, streams, [&](int64_t i, int64_t col, int64_t len,
                                                            const float* u, const scalar_t* zeros)
                                                            FUSEDREG_ALWAYS_INLINE {
      backward_segment_any<scalar_t, A>(g + i, x ? x + i : nullptr, bias ? bias + col : zeros,
                                        bias_f_at(col), u, gx + i, len, p, scale, nullptr);
    }, step);
    return;
  }
  // With a bias gradient: tasks are (row block, column block) tiles, each row of a tile
  // walked in steps (kMaskChunk with keep masks, step with the uniforms). The row blocks
  // depend only on M and N, so each block's fp32 partial row, and their in-order sum, is the
  // same for any number of threads: the result is bitwise deterministic. Column blocks (kCols
  // wide) only give rows too long for the row blocks alone some parallelism; they do not
  // change any sum.
  // A row block holds at least kMinBlockElems elements: a small gradient then sums a few
  // partial rows, not one per input row (at 32 x 768, 3 instead of 32 rows of partials to
  // zero, fill and add up).
  constexpr int64_t kMaxRowBlocks = 64;
  constexpr int64_t kMinBlockElems = 8192;
  constexpr int64_t kCols = 64 * kChunk;
  const int64_t row_block = std::max<int64_t>({int64_t(1), (rows.M + kMaxRowBlocks - 1) / kMaxRowBlocks,
                                               (kMinBlockElems + rows.N - 1) / std::max<int64_t>(rows.N, 1)});
  const int64_t n_rb = (rows.M + row_block - 1) / row_block;
  const int64_t n_cb = (rows.N + kCols - 1) / kCols;
  const int64_t tile = row_block * std::min(rows.N, kCols);
  const int64_t grain = std::max<int64_t>(1, kGrainChunks * kChunk / std::max<int64_t>(tile, 1));
  // Uninitialized: each task zeroes its own tile's columns of its partial row (in its cache,
  // in parallel) rather than the whole array here.
  std::unique_ptr<acc_t[]> partial(new acc_t[static_cast<size_t>(n_rb * rows.N)]);
  const cpu::PhiloxKeys keys(seed);
  const Streams<scalar_t> streams{g, x, gx};
  const int64_t total = rows.M * rows.N;
  const bool tile_masks = masks && rows.N % 4 == 0;  // every chunk's start a multiple of 4
  const bool tile_nt = tile_masks && stream_backward_output<scalar_t>(total * int64_t(sizeof(scalar_t)));
  const Streams<scalar_t> mask_streams{g, nullptr, tile_nt ? nullptr : gx};
  at::parallel_for(0, n_rb * n_cb, grain, [&](int64_t begin, int64_t end) {
    Scratch<scalar_t> scratch;
    cpu::dispatch_isa([&](auto isa) FUSEDREG_ALWAYS_INLINE {
      constexpr cpu::Isa I = decltype(isa)::value;
      for (int64_t task = begin; task < end; ++task) {
        const int64_t rb = task / n_cb, cb = task % n_cb;
        const int64_t c0 = cb * kCols, c1 = std::min(rows.N, c0 + kCols);
        acc_t* acc = partial.get() + rb * rows.N;
        std::fill(acc + c0, acc + c1, acc_t(0));
        const int64_t r_end = std::min(rows.M, (rb + 1) * row_block);
#if FUSEDREG_X86_DISPATCH
        if constexpr (kMaskable<scalar_t, A>) {
          if (tile_masks) {
            // kMaskRows rows a step, then the rest one at a time; per row, the next steps'
            // lines are prefetched as prefetch_ahead does (kPrefetchElems ahead in the row,
            // or in the row a step further down)
            constexpr int64_t kStep = kMaskChunk<scalar_t>;
            for (int64_t r = rb * row_block; r < r_end;) {
              const int64_t R = r_end - r >= kMaskRows ? kMaskRows : 1;
              for (int64_t c = c0; c < c1; c += kStep) {
                const int64_t len = std::min(kStep, c1 - c);
                const int64_t ahead = c + kPrefetchElems;
                for (int64_t i = 0; i < R; ++i) {
                  const int64_t pr = ahead < c1 ? r + i : r + R + i;
                  const int64_t col = ahead < c1 ? ahead : ahead - (c1 - c0);
                  if (pr < r_end) prefetch_ahead(mask_streams, pr * rows.N + col - kPrefetchElems, total, kStep);
                }
                if (R == kMaskRows) {
                  if (tile_nt) {
                    masked_backward_rows<kMaskRows, true>(keys, seed, threshold, p, r, rows.N, c, len, g, gx, scale,
                                                          acc + c);
                  } else {
                    masked_backward_rows<kMaskRows, false>(keys, seed, threshold, p, r, rows.N, c, len, g, gx, scale,
                                                           acc + c);
                  }
                } else if (tile_nt) {
                  masked_backward_rows<1, true>(keys, seed, threshold, p, r, rows.N, c, len, g, gx, scale, acc + c);
                } else {
                  masked_backward_rows<1, false>(keys, seed, threshold, p, r, rows.N, c, len, g, gx, scale, acc + c);
                }
              }
              r += R;
            }
            if (tile_nt) cpu::store_fence<cpu::Isa::kAvx512>();
            continue;
          }
        }
#endif
        for (int64_t r = rb * row_block; r < r_end; ++r) {
          for (int64_t c = c0; c < c1; c += step) {
            const int64_t len = std::min(step, c1 - c);
            const int64_t start = r * rows.N + c;
            if (dropout) prefetch_ahead(streams, start, total, step);
            const float* u = scratch.template uniforms<I>(dropout, keys, seed, start, len);
            backward_segment_any<scalar_t, A>(g + start, x ? x + start : nullptr, bias + c,
                                              bias_f_at(c), u, gx + start, len, p, scale, acc + c);
          }
        }
      }
    });
  });
  // grad_bias[c] = the partials of column c added in row-block order, as before, but a
  // block of contiguous columns at a time (each partial row's stretch added into kSumCols
  // running sums, vectorized) rather than one column's strided chain of dependent adds:
  // that chain (64 partial rows x 1024 columns at 1024x1024, one add's latency each) took
  // about 0.1 ms, a quarter of the backward. The same additions in the same order.
  constexpr int64_t kSumCols = 256;
  at::parallel_for(0, rows.N, 1024, [&](int64_t begin, int64_t end) {
    acc_t s[kSumCols];
    for (int64_t a = begin; a < end; a += kSumCols) {
      const int64_t n = std::min(kSumCols, end - a);
      std::fill(s, s + n, acc_t(0));
      for (int64_t rb = 0; rb < n_rb; ++rb) {
        const acc_t* q = partial.get() + rb * rows.N + a;
#pragma omp simd
        for (int64_t j = 0; j < n; ++j) s[j] += q[j];
      }
      for (int64_t j = 0; j < n; ++j) grad_bias[a + j] = static_cast<scalar_t>(s[j]);
    }
  });
}

at::Tensor bias_dropout_fwd_cpu(const at::Tensor& x_in, const std::optional<at::Tensor>& bias_in,
                                const std::optional<at::Tensor>& residual_in, double p,
                                int64_t activation, const at::Tensor& seed) {
  check_bias_dropout_inputs(x_in, bias_in, residual_in, p, activation, seed, at::kCPU);
  const at::Tensor x = x_in.contiguous();
  const std::optional<at::Tensor> bias =
      bias_in ? std::optional<at::Tensor>(bias_in->contiguous()) : std::nullopt;
  const std::optional<at::Tensor> residual =
      residual_in ? std::optional<at::Tensor>(residual_in->contiguous()) : std::nullopt;
  at::Tensor out = cpu::empty_output_like(x);
  if (x.numel() == 0) return out;
  const uint64_t s = static_cast<uint64_t>(*seed.const_data_ptr<int64_t>());  // checked: one int64 on the CPU
  const Rows rows = as_rows(x);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bias_dropout_fwd", [&] {
    FUSEDREG_DISPATCH_ACTIVATION(static_cast<Activation>(activation), A, [&] {
      forward_kernel<scalar_t, A>(x.const_data_ptr<scalar_t>(),
                                  bias ? bias->const_data_ptr<scalar_t>() : nullptr,
                                  residual ? residual->const_data_ptr<scalar_t>() : nullptr,
                                  out.mutable_data_ptr<scalar_t>(), rows, static_cast<float>(p), s);
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> bias_dropout_bwd_cpu(
    const at::Tensor& grad_in, const std::optional<at::Tensor>& x_in,
    const std::optional<at::Tensor>& bias_in, double p, int64_t activation,
    const at::Tensor& seed, bool need_grad_bias) {
  TORCH_CHECK(activation == 0 || x_in.has_value(),
              "fusedreg::bias_dropout_bwd: x is required with an activation");
  check_bias_dropout_inputs(grad_in, bias_in, std::nullopt, p, activation, seed, at::kCPU);
  TORCH_CHECK(!need_grad_bias || bias_in.has_value(),
              "fusedreg::bias_dropout_bwd: need_grad_bias without a bias");
  const at::Tensor g = grad_in.contiguous();
  at::Tensor x;
  if (x_in) {
    TORCH_CHECK(x_in->sizes() == g.sizes() && x_in->scalar_type() == g.scalar_type() &&
                    x_in->device() == g.device(),
                "fusedreg::bias_dropout_bwd: x must match grad_out in shape, dtype and device");
    x = x_in->contiguous();
  }
  at::Tensor bias = bias_in ? bias_in->contiguous() : at::Tensor();
  at::Tensor gx = cpu::empty_output_like(g);
  // grad_bias: every column written by the kernel's sum when there are elements, zeros
  // otherwise (a zeroing op call is a microsecond or two of a small call)
  at::Tensor gb = !need_grad_bias ? at::empty({0}, g.options())
                  : g.numel() > 0 ? at::empty_like(bias) : at::zeros_like(bias);
  if (g.numel() == 0) return {gx, gb};
  // checked: one int64 on the CPU (read directly: item() is a dispatched op call)
  const uint64_t s = static_cast<uint64_t>(*seed.const_data_ptr<int64_t>());
  const Rows rows = as_rows(g);
  const bool use_x = activation != 0;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), "bias_dropout_bwd", [&] {
    FUSEDREG_DISPATCH_ACTIVATION(static_cast<Activation>(activation), A, [&] {
      backward_kernel<scalar_t, A>(
          g.const_data_ptr<scalar_t>(), use_x ? x.const_data_ptr<scalar_t>() : nullptr,
          bias.defined() ? bias.const_data_ptr<scalar_t>() : nullptr,
          gx.mutable_data_ptr<scalar_t>(),
          need_grad_bias ? gb.mutable_data_ptr<scalar_t>() : nullptr, rows,
          static_cast<float>(p), s);
    });
  });
  return {gx, gb};
}

at::Tensor dropout_uniform_cpu(const at::Tensor& seed, int64_t start, int64_t count,
                               const at::Tensor& device_like) {
  TORCH_CHECK(start >= 0 && count >= 0, "fusedreg::dropout_uniform: start and count must be >= 0");
  TORCH_CHECK(count <= std::numeric_limits<int64_t>::max() - start,
              "fusedreg::dropout_uniform: start + count must be below 2^63, got start ", start,
              " and count ", count);
  check_seed(seed, "dropout_uniform");
  at::Tensor u = at::empty({count}, device_like.options().dtype(at::kFloat));
  fill_uniforms(static_cast<uint64_t>(seed.item<int64_t>()), start, count, u.mutable_data_ptr<float>());
  return u;
}

}  // namespace

TORCH_LIBRARY_IMPL(fusedreg, CPU, m) {
  m.impl("dropout_uniform", &dropout_uniform_cpu);
  m.impl("bias_dropout_fwd", &bias_dropout_fwd_cpu);
  m.impl("bias_dropout_bwd", &bias_dropout_bwd_cpu);
}

}  // namespace fusedreg
