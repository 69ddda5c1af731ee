// CPU kernels of batch_norm: y = dropout(act((x - mean) * invstd * w + b + residual)). The
// math is written out in fusedreg/reference/batch_norm.py.
//
// x is stored (N, C, S) ("NCS": a channel is N rows of S contiguous values) or channels-last
// (N, S, C) = (L, C) rows ("CL": a channel is a column). The element-wise passes (forward,
// backward element-wise) walk memory in order, spread over threads in row chunks by
// cpu::for_each_task (fusedreg/cpu/scheduler.h) and run at the CPU's instruction-set level
// (fusedreg/cpu/isa.h); z = (x - mean) * scale + shift with scale = invstd * w, shift = b.
// The dropout mask index is the logical (N, C, S) flat index: contiguous along an NCS row (one
// Philox call per four elements, fusedreg/cpu/uniforms.h), stride S along a CL row (one call
// per element; with S == 1 contiguous again).
//
// Reductions are deterministic, whatever the thread count:
//   NCS: each channel is reduced by one thread, row after row in order, into independent
//        lanes folded every kLaneChunk elements (Lanes, below; with dropout the backward sums
//        per row in blocks of kSumBlock);
//   CL:  rows are cut into blocks fixed by (L, C); each block writes its per-channel partial
//        row, and the partials are combined in block order.
// Statistics are two-pass per row (NCS) or per block (CL): the mean (of the deviations from
// the row's / block's first value), then sum (x - mean)^2 over the cache-resident row/block,
// and the (count, mean, m2) parts are combined with Chan et al.'s formula, so a mean of 1e3
// with a std of 1e-2 keeps its digits at every instruction-set level. An NCS channel of at
// most kWholeChannelBytes (short rows) takes the same two passes over the whole channel; small
// ones (rows of at most half the lanes: a 2x2 or 4x4 map) several adjacent channels at a time
// (ncs_group_stats: the same adds, so the same bits).
// Without dropout each backward pass is one loop per row (dz_sums_span / dz_sums_row,
// elemt_span): dz and xhat stay in registers; with dropout the row's keep-scale factors are
// drawn first and dz, xhat go through row buffers (dz_row). Short NCS rows (a 14x14 map) end
// in no scalar remainder: the element-wise passes without dropout walk a chunk of rows as one
// run whose steps cross row boundaries (ncs_flat), and the NCS reductions take a row's last
// values as one masked lane step (Lanes::add, dz_sums_span). float16 operands are converted
// by blocks into float copies that the float32 loops run on ("float16 staging", below).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <bit>
#include <cstdint>
#include <type_traits>
#include <cmath>
#include <memory>
#include <numeric>
#include <tuple>
#include <utility>
#include <vector>

#include "fusedreg/activation.h"
#include "fusedreg/batch_norm_host.h"
#include "fusedreg/cpu/alloc.h"
#include "fusedreg/cpu/half_convert.h"
#include "fusedreg/cpu/isa.h"
#include "fusedreg/cpu/rows.h"
#include "fusedreg/cpu/scheduler.h"
#include "fusedreg/cpu/uniforms.h"
#include "fusedreg/cpu/vmath.h"
#include "fusedreg/macros.h"
#include "fusedreg/philox.h"

namespace fusedreg {
namespace {

constexpr int64_t kSumBlock = 512;
constexpr int64_t kTaskElems = 16384;  // elements per task of the element-wise passes
constexpr int64_t kMaxBlocks = 256;    // CL reductions: row blocks at most
constexpr int64_t kWholeChannelBytes = 64 * 1024;  // NCS statistics: a channel in one pass each

// ---- lane sums --------------------------------------------------------------------------------

// The NCS reductions (a channel's rows are contiguous runs) sum into K independent lanes:
// element j of a span goes to lane j % K (the span's tail to lanes 0, 1, ...), so the adds
// form K / (vector width) independent dependency chains instead of one -- a single vector
// accumulator is latency-bound at about 4 floats per cycle, below what the memory delivers.
// The lanes are folded (a fixed pairwise tree) into the running total every kLaneChunk
// elements or so (at span ends), which bounds each lane's sequential run. Everything is fixed
// by the shape: the result does not depend on the thread count.
constexpr int64_t kLaneChunk = 4096;

// A span's tail (fewer than K values) is taken in steps of kTailStep lanes (one AVX-512 vector
// of float), the last one masked: a 196-value row (a 14x14 map) ends in 4 values, one vector,
// not a full step of K lanes (four vectors for the statistics, of which three add only 0).
constexpr int kTailStep = 16;

template <typename acc_t, int K>
struct Lanes {
  static_assert(K % kTailStep == 0, "the tail's steps stay inside the lanes");
  acc_t part[K];
  acc_t total;
  int64_t pending;
  Lanes() { clear(); }
  void clear() {
    for (int k = 0; k < K; ++k) part[k] = acc_t(0);
    total = acc_t(0);
    pending = 0;
  }
  // adds f(j) (SQ: f(j) squared) for j in [0, len) to the lanes (inside a dispatched region).
  // The span's last rem (< K) values are one full step of K lanes whose f values past rem are
  // replaced by 0 before squaring (a select: 0 even where they are inf or NaN) when
  // f(j) is readable up to j < `readable` (inside the tensor): no scalar remainder loop, which
  // on short rows (196 values of a 14x14 map) cost as much as the rest of the row. The lanes
  // never hold -0 (they start at +0, and +0 + -0 is +0), so adding 0 (or 0 * 0, contracted or
  // not) leaves each lane bitwise as the remainder loop leaves it.
  template <bool SQ = false, typename F>
  inline FUSEDREG_ALWAYS_INLINE void add(int64_t len, const F& f, int64_t readable = 0) {
    // the lanes in a local copy while a chunk is added, which the compiler keeps in registers
    // (the members, which it cannot prove the inputs do not alias, went through memory: a load
    // and a store per step); the same adds in the same order, so the same values
    alignas(64) acc_t p[K];
    for (int64_t c0 = 0; c0 < len; c0 += kLaneChunk) {
      const int64_t c1 = std::min(len, c0 + kLaneChunk);
      for (int k = 0; k < K; ++k) p[k] = part[k];
      int64_t j = c0;
      for (; j + K <= c1; j += K) {
#pragma omp simd
        for (int k = 0; k < K; ++k) {
          const acc_t v = f(j + k);
          p[k] += SQ ? v * v : v;
        }
      }
      const int rem = static_cast<int>(c1 - j);
      if (rem && j + K <= readable) {
        // only the lane vectors the tail reaches: lanes [0, rem) get the values, the rest of
        // the last vector 0, the lanes past it nothing (bitwise what adding 0 to them gives).
        // The condition is a full step's (the masked and the scalar tail can differ in the
        // last bits, FMA contraction: which rows take which is as it was)
        for (int k0 = 0; k0 < rem; k0 += kTailStep) {
          acc_t* q = p + k0;
          const int left = rem - k0;
#pragma omp simd
          for (int k = 0; k < kTailStep; ++k) {
            const acc_t v = f(j + k0 + k);
            const acc_t u = k < left ? v : acc_t(0);
            q[k] += SQ ? u * u : u;
          }
        }
      } else {
#pragma omp simd
        for (int k = 0; k < rem; ++k) {
          const acc_t v = f(j + k);
          p[k] += SQ ? v * v : v;
        }
      }
      for (int k = 0; k < K; ++k) part[k] = p[k];
      pending += c1 - c0;
      if (pending >= kLaneChunk) fold();
    }
  }
  // add(len, f_i, readable(i)) for the rows i in [0, n) in order, f_i(j) = f(i, j): the same
  // adds and folds, so the same values, as n calls of add, but with the lanes kept in the
  // local copy from row to row (rows of at most kLaneChunk values: one chunk each). For short
  // rows (a 4x4 map: 16 values) each add's copy in and out, its chunk loop and fold test cost
  // as much as the row's own adds.
  template <bool SQ = false, typename F, typename R>
  inline FUSEDREG_ALWAYS_INLINE void add_rows(int64_t n, int64_t len, const F& f, const R& readable) {
    if (len > kLaneChunk) {
      for (int64_t i = 0; i < n; ++i) {
        add<SQ>(len, [&](int64_t j) FUSEDREG_ALWAYS_INLINE { return f(i, j); }, readable(i));
      }
      return;
    }
    alignas(64) acc_t p[K];
    for (int k = 0; k < K; ++k) p[k] = part[k];
    for (int64_t i = 0; i < n; ++i) {
      int64_t j = 0;
      for (; j + K <= len; j += K) {
#pragma omp simd
        for (int k = 0; k < K; ++k) {
          const acc_t v = f(i, j + k);
          p[k] += SQ ? v * v : v;
        }
      }
      const int rem = static_cast<int>(len - j);
      if (rem && j + K <= readable(i)) {  // add's masked tail
        for (int k0 = 0; k0 < rem; k0 += kTailStep) {
          acc_t* q = p + k0;
          const int left = rem - k0;
#pragma omp simd
          for (int k = 0; k < kTailStep; ++k) {
            const acc_t v = f(i, j + k0 + k);
            const acc_t u = k < left ? v : acc_t(0);
            q[k] += SQ ? u * u : u;
          }
        }
      } else {
#pragma omp simd
        for (int k = 0; k < rem; ++k) {
          const acc_t v = f(i, j + k);
          p[k] += SQ ? v * v : v;
        }
      }
      pending += len;
      if (pending >= kLaneChunk) {  // fold(), on the local copy
        for (int w = K / 2; w >= 1; w /= 2) {
          for (int k = 0; k < w; ++k) p[k] += p[k + w];
        }
        total += p[0];
        for (int k = 0; k < K; ++k) p[k] = acc_t(0);
        pending = 0;
      }
    }
    for (int k = 0; k < K; ++k) part[k] = p[k];
  }
  inline FUSEDREG_ALWAYS_INLINE void fold() {
    for (int w = K / 2; w >= 1; w /= 2) {
      for (int k = 0; k < w; ++k) part[k] += part[k + w];
    }
    total += part[0];
    for (int k = 0; k < K; ++k) part[k] = acc_t(0);
    pending = 0;
  }
  // the sum of everything added
  inline FUSEDREG_ALWAYS_INLINE acc_t sum() {
    if (pending) fold();
    return total;
  }
};

// 256 bytes of lanes: four AVX-512 / eight AVX2 accumulators
template <typename acc_t>
constexpr int kLanes = static_cast<int>(256 / sizeof(acc_t));

using cpu::dispatch_isa;
using cpu::empty_output;
using cpu::for_each_task;

// Per-channel vectors: VEC (CL) indexes them by the element j of a row, else (NCS) the
// pointers are at the row's channel and index 0.
template <bool VEC>
inline FUSEDREG_ALWAYS_INLINE int64_t ch(int64_t j) {
  return VEC ? j : 0;
}

// ---- element conversions --------------------------------------------------------------------

// x_t <-> the compute type in the element loops. bfloat16 is converted with integer operations
// only (a shift up; round-to-nearest-even, NaN to 0x7FC0 by an integer select), bit for bit what
// c10::BFloat16's conversions give: theirs test std::isnan on the float, a compare that under
// -ftrapping-math keeps the AVX2 loops scalar, and calls through the struct that GCC did not
// vectorize; these become 16-wide shifts, adds and blends in the AVX-512 variant (8 in AVX2).
template <typename acc_t, typename T>
inline FUSEDREG_ALWAYS_INLINE acc_t to_acc(T v) {
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    return std::bit_cast<float>(static_cast<uint32_t>(v.x) << 16);
  } else {
    return static_cast<acc_t>(v);
  }
}

template <typename x_t, typename acc_t>
inline FUSEDREG_ALWAYS_INLINE x_t from_acc(acc_t v) {
  if constexpr (std::is_same_v<x_t, c10::BFloat16>) {
    const uint32_t u = std::bit_cast<uint32_t>(static_cast<float>(v));
    const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
    const bool nan = (u & 0x7FFFFFFFu) > 0x7F800000u;
    return c10::BFloat16(static_cast<uint16_t>(nan ? 0x7FC0u : rounded), c10::BFloat16::from_bits());
  } else {
    return static_cast<x_t>(v);
  }
}

// ---- float16 staging ---------------------------------------------------------------------------

// float16 is not converted in the element loops: c10::Half's conversions (integer and float
// formulas of about 12 operations a value up and 18 down, which GCC vectorizes, but not the
// F16C instructions, which it does not emit for a vectorized loop) made the float16 passes two
// to three times slower than the bfloat16 ones (whose conversions are a shift up and a few
// integer operations down). Instead the loops' float16 operands are staged: a block of each
// is converted to a float copy (cpu::row_to_float: vcvtph2ps, 8 values an instruction, from
// the AVX2 level; exact), the float32 instantiation of the same loop runs on the copies (the
// same expression per element, so the same float values), and its float16 outputs are
// converted back (cpu::row_from_float: vcvtps2ph, rounding to nearest even as c10 does, NaN
// lanes set to c10's sign | 0x7E00). The blocks stay in the L1 or L2 cache. The reductions
// stage whole rows (an NCS row, a group of a channel's rows, a step of channels-last rows), so
// that their lanes see the same values in the same order, and keep their masked-tail decisions (which depend on the values readable in the tensor):
// a row is staged up to its length rounded up to a tail step where the tensor has them.
// Bitwise the values of the unstaged float16 loops, at every instruction-set level.
template <typename x_t>
constexpr bool kStaged = std::is_same_v<x_t, c10::Half>;

// elements of each operand a block of the element-wise spans
constexpr int64_t kStage = 1024;

inline FUSEDREG_ALWAYS_INLINE void stage_in(const c10::Half* src, float* dst, int64_t n) {
  cpu::row_to_float(src, dst, n);
}
inline FUSEDREG_ALWAYS_INLINE void stage_out(const float* src, c10::Half* dst, int64_t n) {
  cpu::row_from_float(src, dst, n);
}

// A row's staged length: through the masked tail's last step (a multiple of kTailStep from the
// row's start), as far as the tensor has values (readable from the row's start; at least len).
inline FUSEDREG_ALWAYS_INLINE int64_t staged_len(int64_t len, int64_t readable) {
  return std::min((len + kTailStep - 1) / kTailStep * kTailStep, std::max(readable, len));
}

// A staging buffer of a thread's task, grown on demand.
struct StageBuf {
  std::unique_ptr<float[]> p;
  int64_t cap = 0;
  float* get(int64_t n) {
    if (n > cap) {
      p.reset(new float[n]);
      cap = n;
    }
    return p.get();
  }
};

// What the element-wise backward writes: grad_x (training: with the mean terms m1, m2;
// eval: scale * dz) and/or grad_residual (dz).
enum class GxMode { kNone, kEval, kTrain };

// float16 in registers at the AVX-512 level: the passes without dropout, whose staging cost
// most (its float copies are stores, and the element-wise passes and the backward sums were
// bound by them: twice bfloat16's time, with an activation or a residual more), convert as
// they go instead, 16 values a vcvtph2ps / vcvtps2ph (NaN lanes then set to sign | 0x7E00),
// with the same float operations per element as the compiled float loops (fwd_span /
// fwd_rows, elemt_span, dz_sums_stretch's whole steps, dz_sums_rows / dz_sums_row,
// stats_kernel's channels-last passes), in the same order, an FMA where GCC contracts one, and
// an activation other than relu through the compiled activate / activate_grad on the step's
// values: the same bits (checked against the staged and the previous build's outputs). Out of
// line, called per span or row after cpu_has_avx512().
#if FUSEDREG_X86_DISPATCH
#define FUSEDREG_H16_TARGET FUSEDREG_TARGET_AVX512 inline FUSEDREG_ALWAYS_INLINE

// Masked loads and stores only where a step is partial: on the AMD EPYC machine a masked
// store of a whole step made the element-wise pass over a 32x64x56x56 tensor (out of the
// caches) about three times slower than plain stores.
FUSEDREG_H16_TARGET __m512 h16_load(const c10::Half* p, __mmask16 m) {
  if (m == 0xFFFF) return cpu::half16_load(p);
  return _mm512_maskz_cvtph_ps(cpu::kAll16, _mm256_maskz_loadu_epi16(m, p));
}

FUSEDREG_H16_TARGET __m512 f32_load(const float* p, __mmask16 m) {
  return m == 0xFFFF ? _mm512_loadu_ps(p) : _mm512_maskz_loadu_ps(m, p);
}

FUSEDREG_H16_TARGET void f32_store(float* p, __m512 v, __mmask16 m) {
  if (m == 0xFFFF) {
    _mm512_storeu_ps(p, v);
  } else {
    _mm512_mask_storeu_ps(p, m, v);
  }
}

FUSEDREG_H16_TARGET void h16_store(c10::Half* p, __m512 x, __mmask16 m) {
  if (m == 0xFFFF) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), cpu::half16_bits(x));
  } else {
    _mm256_mask_storeu_epi16(p, m, cpu::half16_bits(x));
  }
}

// One step of 16 values of x_t in registers, for the forward's register path
// (fwd_regs_avx512): float32 as it is, bfloat16 widened exactly and rounded as from_acc rounds
// (half_convert.h's bf16x16_load / bf16x16_store for whole steps), float16 as h16_load /
// h16_store.
FUSEDREG_H16_TARGET __m512 regs_load(const float* p, __mmask16 m) {
  return f32_load(p, m);
}
FUSEDREG_H16_TARGET __m512 regs_load(const c10::Half* p, __mmask16 m) {
  return h16_load(p, m);
}
FUSEDREG_H16_TARGET __m512 regs_load(const c10::BFloat16* p, __mmask16 m) {
  if (m == 0xFFFF) return cpu::bf16x16_load(p);
  return cpu::bf16x16_widen(_mm256_maskz_loadu_epi16(m, p));
}
FUSEDREG_H16_TARGET void regs_store(float* p, __m512 v, __mmask16 m) {
  f32_store(p, v, m);
}
FUSEDREG_H16_TARGET void regs_store(c10::Half* p, __m512 v, __mmask16 m) {
  h16_store(p, v, m);
}
FUSEDREG_H16_TARGET void regs_store(c10::BFloat16* p, __m512 v, __mmask16 m) {
  if (m == 0xFFFF) {
    cpu::bf16x16_store(p, v);
  } else {
    _mm256_mask_storeu_epi16(p, m, cpu::bf16x16_bits(v));
  }
}

FUSEDREG_H16_TARGET __mmask16 h16_mask(int64_t left) {
  return left >= 16 ? __mmask16(0xFFFF) : static_cast<__mmask16>((1u << left) - 1u);
}

// act'(z) in registers (A != kNone), z = d * k + b + rf * r as GCC contracts act_dz's
// expression: fma(rf, r, fma(d, k, b)) (r is x, rf 0, without a residual: the same
// unconditional term). relu: z <= 0 ? 0 : 1 (1 where z is NaN); the others: the compiled
// activate_grad<A, float, VecMath> on the 16 values (a loop of one vector at this target: the
// float loops' own code for it, so the same values).
template <Activation A>
FUSEDREG_H16_TARGET __m512 h16_act_grad(__m512 d, __m512 k, __m512 b, __m512 rf, __m512 r) {
  const __m512 z = _mm512_fmadd_ps(rf, r, _mm512_fmadd_ps(d, k, b));
  if constexpr (A == Activation::kRelu) {
    const __mmask16 one = _mm512_cmp_ps_mask(z, _mm512_setzero_ps(), _CMP_NLE_UQ);  // !(z <= 0)
    return _mm512_mask_blend_ps(one, _mm512_setzero_ps(), _mm512_set1_ps(1.0f));
  } else {
    alignas(64) float t[16];
    _mm512_store_ps(t, z);
#pragma omp simd
    for (int i = 0; i < 16; ++i) t[i] = activate_grad<A, float, cpu::VecMath>(t[i]);
    return _mm512_load_ps(t);
  }
}

// act_dz in registers: dy without an activation, else dy * act'(z) (h16_act_grad).
template <Activation A>
FUSEDREG_H16_TARGET __m512 h16_act_dz(__m512 dy, __m512 d, __m512 k, __m512 b, __m512 rf, __m512 r) {
  if constexpr (A == Activation::kNone) {
    return dy;
  } else {
    return _mm512_mul_ps(dy, h16_act_grad<A>(d, k, b, rf, r));
  }
}

// activate<A, float, VecMath>(z) in registers: relu z <= 0 ? 0 : z (NaN kept); gelu as
// cpu::gelu_avx512 (Phi from a table of polynomials, fusedreg/cpu/vmath.h: about a third of
// the erf form's time per element, within its error bound); the others as h16_act_grad takes
// act'.
template <Activation A>
FUSEDREG_H16_TARGET __m512 h16_activate(__m512 z) {
  if constexpr (A == Activation::kNone) {
    return z;
  } else if constexpr (A == Activation::kRelu) {
    return _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(z, _mm512_setzero_ps(), _CMP_NLE_UQ), z);
  } else if constexpr (A == Activation::kGelu) {
    return cpu::gelu_avx512(z);
  } else {
    alignas(64) float t[16];
    _mm512_store_ps(t, z);
#pragma omp simd
    for (int i = 0; i < 16; ++i) t[i] = activate<A, float, cpu::VecMath>(t[i]);
    return _mm512_load_ps(t);
  }
}

// fwd_span<A, VEC> / fwd_rows<A> without dropout of float16 (any activation), and of float32
// and bfloat16 with GELU (fwd_span / fwd_rows): y = act((x - mean) * scale + shift (+ r)),
// (x - mean) * scale + shift contracted into one FMA as GCC contracts the loops'; with VEC
// `rows` consecutive channels-last rows of len values (row i at i * len; the channels' values
// loaded once for them, as fwd_rows), else one NCS row. GELU here is the table's
// (h16_activate), which the compiled loops cannot express: with it the float32 eval forward of
// GELU at (32, 256, 14, 14), one thread, took about a third of the erf form's time.
template <Activation A, bool VEC, bool R, typename x_t>
FUSEDREG_TARGET_AVX512 __attribute__((noinline)) void fwd_regs_avx512(const x_t* x, const x_t* r, x_t* y,
                                                                     int64_t len, int rows, const float* mean,
                                                                     const float* scale, const float* shift) {
  const __m512 mu0 = _mm512_set1_ps(mean[0]), k0 = _mm512_set1_ps(scale[0]), b0 = _mm512_set1_ps(shift[0]);
  for (int64_t j = 0; j < len; j += 16) {
    const __mmask16 m = h16_mask(len - j);
    const __m512 mu = VEC ? f32_load(mean + j, m) : mu0, k = VEC ? f32_load(scale + j, m) : k0;
    const __m512 b = VEC ? f32_load(shift + j, m) : b0;
    for (int i = 0; i < (VEC ? rows : 1); ++i) {
      const int64_t o = i * len + j;
      __m512 t = _mm512_fmadd_ps(_mm512_sub_ps(regs_load(x + o, m), mu), k, b);
      if constexpr (R) t = _mm512_add_ps(t, regs_load(r + o, m));
      regs_store(y + o, h16_activate<A>(t), m);
    }
  }
}

// elemt_span<A, VEC, GX, GR> of float16 rows: gr = dz; gx = scale * dz (eval),
// scale * (dz - m1 - xhat * m2) (training: the subtraction of xhat * m2 contracted into one
// FNMA, as GCC contracts the loop's). r (x without a residual, rf 0) is read with relu only.
template <Activation A, GxMode GX, bool GR, bool VEC>
FUSEDREG_TARGET_AVX512 __attribute__((noinline)) void elemt_h16_avx512(
    const c10::Half* dy, const c10::Half* x, const c10::Half* r, float rf, int64_t len, const float* mean,
    const float* invstd, const float* scale, const float* shift, const float* m1, const float* m2, c10::Half* gx,
    c10::Half* gr) {
  constexpr bool kTrain = GX == GxMode::kTrain, kAct = A != Activation::kNone;
  const __m512 mu0 = _mm512_set1_ps(kTrain || kAct ? mean[0] : 0.0f), inv0 = _mm512_set1_ps(kTrain ? invstd[0] : 0.0f);
  const __m512 k0 = _mm512_set1_ps(GX != GxMode::kNone || kAct ? scale[0] : 0.0f);
  const __m512 b0 = _mm512_set1_ps(kAct ? shift[0] : 0.0f), vrf = _mm512_set1_ps(rf);
  const __m512 a10 = _mm512_set1_ps(kTrain ? m1[0] : 0.0f), a20 = _mm512_set1_ps(kTrain ? m2[0] : 0.0f);
  for (int64_t j = 0; j < len; j += 16) {
    const __mmask16 m = h16_mask(len - j);
    const __m512 dyv = h16_load(dy + j, m);
    __m512 d = _mm512_setzero_ps(), g = _mm512_setzero_ps();
    if constexpr (kTrain || kAct) d = _mm512_sub_ps(h16_load(x + j, m), VEC ? f32_load(mean + j, m) : mu0);
    const __m512 k = (GX != GxMode::kNone || kAct) && VEC ? f32_load(scale + j, m) : k0;
    if constexpr (kAct) g = h16_act_grad<A>(d, k, VEC ? f32_load(shift + j, m) : b0, vrf, h16_load(r + j, m));
    const __m512 dz = kAct ? _mm512_mul_ps(dyv, g) : dyv;
    if constexpr (GR) h16_store(gr + j, dz, m);
    if constexpr (GX == GxMode::kNone) continue;
    if constexpr (kTrain) {
      const __m512 inv = VEC ? f32_load(invstd + j, m) : inv0;
      const __m512 a1 = VEC ? f32_load(m1 + j, m) : a10;
      const __m512 a2 = VEC ? f32_load(m2 + j, m) : a20;
      const __m512 xhat = _mm512_mul_ps(d, inv);
      // dz - m1; dz's only use without grad_residual, where GCC contracts dy * act'(z) - m1
      const __m512 t = kAct && !GR ? _mm512_fmsub_ps(dyv, g, a1) : _mm512_sub_ps(dz, a1);
      h16_store(gx + j, _mm512_mul_ps(k, _mm512_fnmadd_ps(xhat, a2, t)), m);
    } else {
      h16_store(gx + j, _mm512_mul_ps(k, dz), m);
    }
  }
}

// dz_sums_stretch's whole steps of 32 lanes: p1[k] += dz, p2[k] += dz * (d *
// invstd) (one FMA) for the steps from c0 while a whole one fits before c1; returns where
// they end.
template <Activation A>
FUSEDREG_TARGET_AVX512 __attribute__((noinline)) int64_t dz_sums_h16_avx512(
    const c10::Half* dy, const c10::Half* x, const c10::Half* r, float rf, int64_t c0, int64_t c1, float mean,
    float invstd, float scale, float shift, float* p1, float* p2) {
  __m512 s10 = _mm512_loadu_ps(p1), s11 = _mm512_loadu_ps(p1 + 16);
  __m512 s20 = _mm512_loadu_ps(p2), s21 = _mm512_loadu_ps(p2 + 16);
  const __m512 mu = _mm512_set1_ps(mean), inv = _mm512_set1_ps(invstd);
  const __m512 k = _mm512_set1_ps(scale), b = _mm512_set1_ps(shift), vrf = _mm512_set1_ps(rf);
  int64_t j = c0;
  for (; j + 32 <= c1; j += 32) {
    const __m512 d0 = _mm512_sub_ps(cpu::half16_load(x + j), mu);
    const __m512 d1 = _mm512_sub_ps(cpu::half16_load(x + j + 16), mu);
    __m512 dz0 = cpu::half16_load(dy + j), dz1 = cpu::half16_load(dy + j + 16);
    if constexpr (A != Activation::kNone) {
      dz0 = h16_act_dz<A>(dz0, d0, k, b, vrf, cpu::half16_load(r + j));
      dz1 = h16_act_dz<A>(dz1, d1, k, b, vrf, cpu::half16_load(r + j + 16));
    }
    const __m512 xh0 = _mm512_mul_ps(d0, inv), xh1 = _mm512_mul_ps(d1, inv);
    s10 = _mm512_add_ps(s10, dz0);
    s11 = _mm512_add_ps(s11, dz1);
    s20 = _mm512_fmadd_ps(dz0, xh0, s20);
    s21 = _mm512_fmadd_ps(dz1, xh1, s21);
  }
  _mm512_storeu_ps(p1, s10);
  _mm512_storeu_ps(p1 + 16, s11);
  _mm512_storeu_ps(p2, s20);
  _mm512_storeu_ps(p2 + 16, s21);
  return j;
}

// dz_sums_rows / dz_sums_row over `rows` consecutive channels-last rows of len
// values (row i at i * len): per channel q1 += dz, q2 += dz * (d * invstd) (one FMA), the
// rows in order.
template <Activation A>
FUSEDREG_TARGET_AVX512 __attribute__((noinline)) void dz_rows_h16_avx512(
    const c10::Half* dy, const c10::Half* x, const c10::Half* r, float rf, int64_t len, int rows, const float* mean,
    const float* invstd, const float* scale, const float* shift, float* q1, float* q2) {
  const __m512 vrf = _mm512_set1_ps(rf);
  for (int64_t j = 0; j < len; j += 16) {
    const __mmask16 m = h16_mask(len - j);
    __m512 s1 = f32_load(q1 + j, m), s2 = f32_load(q2 + j, m);
    const __m512 mu = f32_load(mean + j, m), inv = f32_load(invstd + j, m);
    __m512 k = _mm512_setzero_ps(), b = _mm512_setzero_ps();
    if constexpr (A != Activation::kNone) {
      k = f32_load(scale + j, m);
      b = f32_load(shift + j, m);
    }
    for (int i = 0; i < rows; ++i) {
      const int64_t o = i * len + j;
      const __m512 d = _mm512_sub_ps(h16_load(x + o, m), mu);
      __m512 dz = h16_load(dy + o, m);
      if constexpr (A != Activation::kNone) dz = h16_act_dz<A>(dz, d, k, b, vrf, h16_load(r + o, m));
      const __m512 xh = _mm512_mul_ps(d, inv);
      s1 = _mm512_add_ps(s1, dz);
      s2 = _mm512_fmadd_ps(dz, xh, s2);
    }
    f32_store(q1 + j, s1, m);
    f32_store(q2 + j, s2, m);
  }
}
// One step of `rows` rows (from row, C channels) of stats_kernel's channels-last block:
// acc[c] += x - sub[c] (the first pass), acc[c] += (x - sub[c])^2 (SECOND, one FMA where GCC
// contracts the compiled loop's), the rows in order.
template <bool SECOND>
FUSEDREG_H16_TARGET void cl_stats_h16_step(const c10::Half* row, int64_t C, int rows, const float* sub, float* acc) {
  for (int64_t c = 0; c < C; c += 16) {
    const __mmask16 mk = h16_mask(C - c);
    __m512 s = f32_load(acc + c, mk);
    const __m512 v = f32_load(sub + c, mk);
    for (int i = 0; i < rows; ++i) {
      const __m512 d = _mm512_sub_ps(h16_load(row + i * C + c, mk), v);
      s = SECOND ? _mm512_fmadd_ps(d, d, s) : _mm512_add_ps(s, d);
    }
    f32_store(acc + c, s, mk);
  }
}

// stats_kernel's channels-last block of n rows of C channels from x (the block's first row),
// ROWS (kRows) rows a step: m[c] = k[c] + (sum of x - k[c]) * inv (one FMA, as GCC contracts
// it), then q[c] = sum of (x - m[c])^2.
template <int ROWS>
FUSEDREG_TARGET_AVX512 __attribute__((noinline)) void cl_stats_h16_avx512(const c10::Half* x, int64_t C, int64_t n,
                                                                         const float* k, float inv, float* m,
                                                                         float* q) {
  int64_t r = 0;
  for (; r + ROWS <= n; r += ROWS) cl_stats_h16_step<false>(x + r * C, C, ROWS, k, m);
  for (; r < n; ++r) cl_stats_h16_step<false>(x + r * C, C, 1, k, m);
  const __m512 vinv = _mm512_set1_ps(inv);
  for (int64_t c = 0; c < C; c += 16) {
    const __mmask16 mk = h16_mask(C - c);
    f32_store(m + c, _mm512_fmadd_ps(f32_load(m + c, mk), vinv, f32_load(k + c, mk)), mk);
  }
  for (r = 0; r + ROWS <= n; r += ROWS) cl_stats_h16_step<true>(x + r * C, C, ROWS, m, q);
  for (; r < n; ++r) cl_stats_h16_step<true>(x + r * C, C, 1, m, q);
}
#undef FUSEDREG_H16_TARGET
#endif

// Whether a float16 pass runs in registers (the functions above).
template <Activation A, typename x_t>
inline bool h16_regs() {
#if FUSEDREG_X86_DISPATCH
  if constexpr (std::is_same_v<x_t, c10::Half>) return cpu::cpu_has_avx512();
#endif
  return false;
}

// ---- element-wise pieces ----------------------------------------------------------------------

// A keep-scale factor is not 0 (the element is kept): an integer test of its bits (0.0f is
// all zero bits; the factors are never -0), since under -ftrapping-math a select on a float
// compare is if-converted only with AVX-512's masks and would keep the AVX2 loops scalar.
inline FUSEDREG_ALWAYS_INLINE bool kept(float k) {
  return std::bit_cast<uint32_t>(k) != 0u;
}

// y[j] = act((x[j] - mean) * scale + shift + r[j]) * ks[j] for j in [0, len), with ks the
// row's keep-scale factors (dropout: 1 / (1 - p) or 0; null without dropout). A dropped
// element is 0 even where act(z) is inf or NaN: a select on the factor (a blend, branch-free, so
// the loops stay vectorized), not a multiply by 0.
template <Activation A, bool VEC, typename x_t, typename acc_t>
inline FUSEDREG_ALWAYS_INLINE void fwd_span(const x_t* x, const x_t* r, x_t* y, const float* ks,
                                            int64_t len, const acc_t* mean, const acc_t* scale,
                                            const acc_t* shift) {
#if FUSEDREG_X86_DISPATCH
  if constexpr (A == Activation::kGelu && std::is_same_v<acc_t, float>) {  // GELU's table form
    if (!ks && cpu::cpu_has_avx512()) {
      return r ? fwd_regs_avx512<A, VEC, true>(x, r, y, len, 1, mean, scale, shift)
               : fwd_regs_avx512<A, VEC, false>(x, r, y, len, 1, mean, scale, shift);
    }
  }
#endif
  // NCS (one channel): the vectors' values in registers (y may alias them, as far as the
  // compiler knows, which would reload them per element)
  const acc_t mu0 = mean[0], k0 = scale[0], b0 = shift[0];
  if (!ks) {  // no dropout: no keep-scale factors to load, multiply and test
    if (r) {
#pragma omp simd
      for (int64_t j = 0; j < len; ++j) {
        const acc_t t = (to_acc<acc_t>(x[j]) - (VEC ? mean[j] : mu0)) * (VEC ? scale[j] : k0) +
                        (VEC ? shift[j] : b0) + to_acc<acc_t>(r[j]);
        y[j] = from_acc<x_t>(activate<A, acc_t, cpu::VecMath>(t));
      }
    } else {
#pragma omp simd
      for (int64_t j = 0; j < len; ++j) {
        const acc_t t =
            (to_acc<acc_t>(x[j]) - (VEC ? mean[j] : mu0)) * (VEC ? scale[j] : k0) + (VEC ? shift[j] : b0);
        y[j] = from_acc<x_t>(activate<A, acc_t, cpu::VecMath>(t));
      }
    }
    return;
  }
  if (r) {
#pragma omp simd
    for (int64_t j = 0; j < len; ++j) {
      acc_t t = (to_acc<acc_t>(x[j]) - (VEC ? mean[j] : mu0)) * (VEC ? scale[j] : k0) + (VEC ? shift[j] : b0) +
                to_acc<acc_t>(r[j]);
      t = activate<A, acc_t, cpu::VecMath>(t) * static_cast<acc_t>(ks[j]);
      y[j] = from_acc<x_t>(kept(ks[j]) ? t : acc_t(0));
    }
  } else {
#pragma omp simd
    for (int64_t j = 0; j < len; ++j) {
      acc_t t = (to_acc<acc_t>(x[j]) - (VEC ? mean[j] : mu0)) * (VEC ? scale[j] : k0) + (VEC ? shift[j] : b0);
      t = activate<A, acc_t, cpu::VecMath>(t) * static_cast<acc_t>(ks[j]);
      y[j] = from_acc<x_t>(kept(ks[j]) ? t : acc_t(0));
    }
  }
}

// fwd_span of kFwdRows consecutive CL rows without dropout (row i at offset i * len): each
// channel's mean, scale and shift loaded once for the two rows instead of once a row (three
// loads per vector of outputs), the same expression per element, so the same values. Two rows,
// not four: on the AMD EPYC machine four rows a step were slower than one at (32, 64, 56, 56)
// (a microbenchmark of the loop, 1.6-2.0 against 1.5-1.7 ms; two: 1.1-1.4), as they were on
// the Intel machine (e6905e7, reverted in 095e58d).
constexpr int kFwdRows = 2;

template <Activation A, typename x_t, typename acc_t>
inline FUSEDREG_ALWAYS_INLINE void fwd_rows(const x_t* x, const x_t* r, x_t* y, int64_t len, const acc_t* mean,
                                            const acc_t* scale, const acc_t* shift) {
#if FUSEDREG_X86_DISPATCH
  if constexpr (A == Activation::kGelu && std::is_same_v<acc_t, float>) {  // as fwd_span
    if (cpu::cpu_has_avx512()) {
      return r ? fwd_regs_avx512<A, true, true>(x, r, y, len, kFwdRows, mean, scale, shift)
               : fwd_regs_avx512<A, true, false>(x, r, y, len, kFwdRows, mean, scale, shift);
    }
  }
#endif
  if (r) {
#pragma omp simd
    for (int64_t j = 0; j < len; ++j) {
      const acc_t mu = mean[j], k = scale[j], b = shift[j];
#pragma GCC unroll 2
      for (int i = 0; i < kFwdRows; ++i) {
        const int64_t o = i * len + j;
        const acc_t t = (to_acc<acc_t>(x[o]) - mu) * k + b + to_acc<acc_t>(r[o]);
        y[o] = from_acc<x_t>(activate<A, acc_t, cpu::VecMath>(t));
      }
    }
  } else {
#pragma omp simd
    for (int64_t j = 0; j < len; ++j) {
      const acc_t mu = mean[j], k = scale[j], b = shift[j];
#pragma GCC unroll 2
      for (int i = 0; i < kFwdRows; ++i) {
        const int64_t o = i * len + j;
        const acc_t t = (to_acc<acc_t>(x[o]) - mu) * k + b;
        y[o] = from_acc<x_t>(activate<A, acc_t, cpu::VecMath>(t));
      }
    }
  }
}

// fwd_span, float16 staged (kStaged) in blocks of kStage values (no state from element to
// element: each element the same value).
template <Activation A, bool VEC, typename x_t, typename acc_t>
inline FUSEDREG_ALWAYS_INLINE void fwd_span_any(const x_t* x, const x_t* r, x_t* y, const float* ks, int64_t len,
                                                const acc_t* mean, const acc_t* scale, const acc_t* shift) {
  if constexpr (!kStaged<x_t>) {
    fwd_span<A, VEC>(x, r, y, ks, len, mean, scale, shift);  // (GELU's register form inside)
  } else {
#if FUSEDREG_X86_DISPATCH
    if (!ks && h16_regs<A, x_t>()) {
      return r ? fwd_regs_avx512<A, VEC, true>(x, r, y, len, 1, mean, scale, shift)
               : fwd_regs_avx512<A, VEC, false>(x, r, y, len, 1, mean, scale, shift);
    }
#endif
    alignas(64) float fx[kStage], fr[kStage], fy[kStage];
    for (int64_t j0 = 0; j0 < len; j0 += kStage) {
      const int64_t n = std::min(kStage, len - j0), v = VEC ? j0 : 0;
      stage_in(x + j0, fx, n);
      if (r) stage_in(r + j0, fr, n);
      fwd_span<A, VEC>(static_cast<const float*>(fx), r ? static_cast<const float*>(fr) : nullptr, fy,
                       ks ? ks + j0 : nullptr, n, mean + v, scale + v, shift + v);
      stage_out(fy, y + j0, n);
    }
  }
}

// fwd_rows, float16 staged: the rows as one block where they fit, else row by row.
template <Activation A, typename x_t, typename acc_t>
inline FUSEDREG_ALWAYS_INLINE void fwd_rows_any(const x_t* x, const x_t* r, x_t* y, int64_t len, const acc_t* mean,
                                                const acc_t* scale, const acc_t* shift) {
  if constexpr (!kStaged<x_t>) {
    fwd_rows<A>(x, r, y, len, mean, scale, shift);  // (GELU's register form inside)
  } else {
#if FUSEDREG_X86_DISPATCH
    // in registers below 128 channels; wider rows that fit a block staged as before (the
    // register loop was slower there: (32, 196, 256) relu + residual, one thread, 0.42 against
    // 0.34 ms; (32, 3136, 64) 0.96 against 1.61); GELU (its table form) at every width
    if ((len < 128 || A == Activation::kGelu) && h16_regs<A, x_t>()) {
      return r ? fwd_regs_avx512<A, true, true>(x, r, y, len, kFwdRows, mean, scale, shift)
               : fwd_regs_avx512<A, true, false>(x, r, y, len, kFwdRows, mean, scale, shift);
    }
#endif
    const int64_t n = kFwdRows * len;
    if (n > kStage) {
      for (int i = 0; i < kFwdRows; ++i) {
        const int64_t o = i * len;
        fwd_span_any<A, true>(x + o, r ? r + o : nullptr, y + o, nullptr, len, mean, scale, shift);
      }
      return;
    }
    alignas(64) float fx[kStage], fr[kStage], fy[kStage];
    stage_in(x, fx, n);
    if (r) stage_in(r, fr, n);
    fwd_rows<A>(static_cast<const float*>(fx), r ? static_cast<const float*>(fr) : nullptr, fy, len, mean, scale,
                shift);
    stage_out(fy, y, n);
  }
}

// dz = dy * act'(z) at the pre-activation value z = d * k + b + rf * r[j] (d = x - mean; r is
// x, with rf = 0, when there is no residual: an unconditional load, as a conditional one keeps
// the loops scalar); dy itself without an activation. Every backward loop takes its dz here.
template <Activation A, typename x_t, typename acc_t>
inline FUSEDREG_ALWAYS_INLINE acc_t act_dz(acc_t dy, acc_t d, acc_t k, acc_t b, acc_t rf, const x_t* r, int64_t j) {
  if constexpr (A == Activation::kNone) {
    return dy;
  } else {
    return dy * activate_grad<A, acc_t, cpu::VecMath>(d * k + b + rf * to_acc<acc_t>(r[j]));
  }
}

// g[j] = dz = dy * ks[j] * act'(z) (0 where dropped), xh[j] = xhat, for j in [0, len). r is x when there is no
// residual, with rf = 0 (an unconditional load: a conditional one keeps the loop scalar).
template <Activation A, bool VEC, typename x_t, typename acc_t>
inline FUSEDREG_ALWAYS_INLINE void dz_span(const x_t* dy, const x_t* x, const x_t* r, acc_t rf, const float* ks,
                                           int64_t len, const acc_t* mean, const acc_t* invstd,
                                           const acc_t* scale, const acc_t* shift, acc_t* g, acc_t* xh) {
#pragma omp simd
  for (int64_t j = 0; j < len; ++j) {
    const acc_t d = to_acc<acc_t>(x[j]) - mean[ch<VEC>(j)];
    const acc_t dz = act_dz<A>(to_acc<acc_t>(dy[j]) * static_cast<acc_t>(ks[j]), d, scale[ch<VEC>(j)], shift[ch<VEC>(j)], rf, r, j);
    g[j] = kept(ks[j]) ? dz : acc_t(0);  // dropped: 0 even for an inf/NaN dy or act'(z)
    xh[j] = d * invstd[ch<VEC>(j)];
  }
}

// Without dropout, the backward's element-wise work in one loop over the dy, x (and residual)
// rows, no row buffers: dz = dy * act'(z) (dy itself without an activation; the same values
// dz_span gives with keep-scale factors of 1) and xhat = (x - mean) * invstd.
//
// The reduction of a span (NCS: one channel's row): dz into the lanes l1, dz * xhat into l2
// (half as many lanes each as the statistics use: both sets stay in registers).
template <typename acc_t>
constexpr int kLanes2 = kLanes<acc_t> / 2;

// Columns [c0, c1) of one NCS row (dy, x, r from the row's start; readable values readable
// from it) into the local lane copies p1 (dz) and p2 (dz * xhat): whole steps of K values,
// then the rest as Lanes::add's masked tail (both sums at once) where a whole step is
// readable, else one value at a time. Shared by dz_sums_span and dz_sums_short_rows.
template <Activation A, typename x_t, typename acc_t>
inline FUSEDREG_ALWAYS_INLINE void dz_sums_stretch(const x_t* dy, const x_t* x, const x_t* r, acc_t rf,
                                                   int64_t c0, int64_t c1, int64_t readable, acc_t mean,
                                                   acc_t invstd, acc_t scale, acc_t shift, acc_t* p1, acc_t* p2) {
  constexpr int K = kLanes2<acc_t>;
  auto body = [&](int64_t j, int k) FUSEDREG_ALWAYS_INLINE {
    const acc_t d = to_acc<acc_t>(x[j]) - mean;
    const acc_t dz = act_dz<A>(to_acc<acc_t>(dy[j]), d, scale, shift, rf, r, j);
    p1[k] += dz;
    p2[k] += dz * (d * invstd);
  };
  int64_t j = c0;
#if FUSEDREG_X86_DISPATCH
  if constexpr (std::is_same_v<x_t, c10::Half> && K == 32) {
    if (h16_regs<A, x_t>()) {
      j = dz_sums_h16_avx512<A>(dy, x, r, rf, c0, c1, mean, invstd, scale, shift, p1, p2);  // the tail below
    }
  }
#endif
  for (; j + K <= c1; j += K) {
#pragma omp simd
    for (int k = 0; k < K; ++k) body(j + k, k);
  }
  const int rem = static_cast<int>(c1 - j);
  if (rem && j + K <= readable) {
    for (int k0 = 0; k0 < rem; k0 += kTailStep) {
      const int left = rem - k0;
      acc_t* q1 = p1 + k0;
      acc_t* q2 = p2 + k0;
#pragma omp simd
      for (int k = 0; k < kTailStep; ++k) {
        const int64_t jk = j + k0 + k;
        const acc_t d = to_acc<acc_t>(x[jk]) - mean;
        const acc_t dz = act_dz<A>(to_acc<acc_t>(dy[jk]), d, scale, shift, rf, r, jk);
        // dz and xhat past rem replaced by 0 (selects) before the same sums as body's
        const bool in = k < left;
        const acc_t g = in ? dz : acc_t(0);
        const acc_t xh = in ? d * invstd : acc_t(0);
        q1[k] += g;
        q2[k] += g * xh;
      }
    }
  } else {
#pragma omp simd
    for (int k = 0; k < rem; ++k) body(j + k, k);
  }
}

template <Activation A, typename x_t, typename acc_t>
inline FUSEDREG_ALWAYS_INLINE void dz_sums_span(const x_t* dy, const x_t* x, const x_t* r, acc_t rf, int64_t len,
                                                acc_t mean, acc_t invstd, acc_t scale, acc_t shift,
                                                Lanes<acc_t, kLanes2<acc_t>>& l1, Lanes<acc_t, kLanes2<acc_t>>& l2,
                                                int64_t readable) {
  constexpr int K = kLanes2<acc_t>;
  alignas(64) acc_t p1[K], p2[K];  // local copies of the lanes, in registers (Lanes::add)
  for (int64_t c0 = 0; c0 < len; c0 += kLaneChunk) {
    const int64_t c1 = std::min(len, c0 + kLaneChunk);
    for (int k = 0; k < K; ++k) {
      p1[k] = l1.part[k];
      p2[k] = l2.part[k];
    }
    dz_sums_stretch<A>(dy, x, r, rf, c0, c1, readable, mean, invstd, scale, shift, p1, p2);
    for (int k = 0; k < K; ++k) {
      l1.part[k] = p1[k];
      l2.part[k] = p2[k];
    }
    l1.pending += c1 - c0;
    if (l1.pending >= kLaneChunk) {
      l1.fold();
      l2.fold();
    }
  }
}

// dz_sums_span of the n rows i of one NCS channel in order (row i at offset i * stride from
// dy, x, r; readable(i) values readable from its start), for rows of at most kLaneChunk
// values: the same adds and folds, so the same values, as a call per row, with the lanes kept
// in local copies from row to row (Lanes::add_rows: for short rows the copies in and out and
// the fold test cost as much as the row's own work).
template <Activation A, typename x_t, typename acc_t, typename R>
inline FUSEDREG_ALWAYS_INLINE void dz_sums_short_rows(const x_t* dy, const x_t* x, const x_t* r, acc_t rf, int64_t n,
                                                      int64_t stride, int64_t len, acc_t mean, acc_t invstd,
                                                      acc_t scale, acc_t shift, Lanes<acc_t, kLanes2<acc_t>>& l1,
                                                      Lanes<acc_t, kLanes2<acc_t>>& l2, const R& readable) {
  constexpr int K = kLanes2<acc_t>;
  alignas(64) acc_t p1[K], p2[K];
  for (int k = 0; k < K; ++k) {
    p1[k] = l1.part[k];
    p2[k] = l2.part[k];
  }
  for (int64_t i = 0; i < n; ++i) {
    dz_sums_stretch<A>(dy + i * stride, x + i * stride, r + i * stride, rf, 0, len, readable(i), mean, invstd,
                       scale, shift, p1, p2);
    l1.pending += len;
    if (l1.pending >= kLaneChunk) {  // l1.fold(), l2.fold() on the local copies
      for (int w = K / 2; w >= 1; w /= 2) {
        for (int k = 0; k < w; ++k) {
          p1[k] += p1[k + w];
          p2[k] += p2[k + w];
        }
      }
      l1.total += p1[0];
      l2.total += p2[0];
      for (int k = 0; k < K; ++k) {
        p1[k] = acc_t(0);
        p2[k] = acc_t(0);
      }
      l1.pending = 0;
      l2.pending = 0;
    }
  }
  for (int k = 0; k < K; ++k) {
    l1.part[k] = p1[k];
    l2.part[k] = p2[k];
  }
}

// The same of a CL row: q1[c] += dz, q2[c] += dz * xhat; with STORE also gz[c] = dz (the
// grad_residual that batch_norm_bwd_cl writes in this pass).
template <Activation A, bool STORE = false, typename x_t, typename acc_t>
inline FUSEDREG_ALWAYS_INLINE void dz_sums_row(const x_t* dy, const x_t* x, const x_t* r, acc_t rf, int64_t len,
                                               const acc_t* mean, const acc_t* invstd, const acc_t* scale,
                                               const acc_t* shift, acc_t* q1, acc_t* q2, x_t* gz = nullptr) {
#pragma omp simd
  for (int64_t j = 0; j < len; ++j) {
    const acc_t d = to_acc<acc_t>(x[j]) - mean[j];
    const acc_t dz = act_dz<A>(to_acc<acc_t>(dy[j]), d, scale[j], shift[j], rf, r, j);
    if constexpr (STORE) gz[j] = from_acc<x_t>(dz);
    q1[j] += dz;
    q2[j] += dz * (d * invstd[j]);
  }
}

// The same of kRows consecutive CL rows (row i at x + i * len): each channel's q1, q2 and
// per-channel values loaded and stored once for the kRows rows instead of once a row, the rows
// added in order (the same adds as kRows calls of dz_sums_row: the same values).
constexpr int kRows = 4;

// Software prefetch of the CL reduction's rows: prefetch_rows(len) rows ahead of the four
// being added (at least 4 KiB, at least 8 rows): with the dy, x (and residual) rows walked
// four at a time (eight or twelve interleaved streams) the hardware prefetchers of the AMD
// EPYC machine left the loop waiting on memory (a microbenchmark of the loop, one thread,
// median of 25-100 interleaved calls, twice: (100352, 64) float32 1.56-1.67 ms without, 1.35
// eight rows ahead, 1.26 sixteen; (6272, 256), in L3, 0.18 without, 0.16-0.17 eight ahead).
template <typename x_t>
inline int64_t prefetch_rows(int64_t len) {
  return std::max<int64_t>(8, 4096 / std::max<int64_t>(1, len * static_cast<int64_t>(sizeof(x_t))));
}

// Prefetches every 64-byte line of the n values from p (into all cache levels).
template <typename T>
inline FUSEDREG_ALWAYS_INLINE void prefetch_span(const T* p, int64_t n) {
  const char* c = reinterpret_cast<const char*>(p);
  const int64_t bytes = n * static_cast<int64_t>(sizeof(T));
  for (int64_t o = 0; o < bytes; o += 64) __builtin_prefetch(c + o);
}

template <Activation A, bool STORE = false, typename x_t, typename acc_t>
inline FUSEDREG_ALWAYS_INLINE void dz_sums_rows(const x_t* dy, const x_t* x, const x_t* r, acc_t rf, int64_t len,
                                                const acc_t* mean, const acc_t* invstd, const acc_t* scale,
                                                const acc_t* shift, acc_t* q1, acc_t* q2, x_t* gz = nullptr) {
#pragma omp simd
  for (int64_t j = 0; j < len; ++j) {
    acc_t s1 = q1[j], s2 = q2[j];
    const acc_t mu = mean[j], inv = invstd[j];
    [[maybe_unused]] const acc_t k = scale[j], b = shift[j];
#pragma GCC unroll 4
    for (int i = 0; i < kRows; ++i) {
      const int64_t o = i * len + j;
      const acc_t d = to_acc<acc_t>(x[o]) - mu;
      const acc_t dz = act_dz<A>(to_acc<acc_t>(dy[o]), d, k, b, rf, r, o);
      if constexpr (STORE) gz[o] = from_acc<x_t>(dz);
      s1 += dz;
      s2 += dz * (d * inv);
    }
    q1[j] = s1;
    q2[j] = s2;
  }
}


// grad_x and grad_residual of a span without dropout, in one loop.
template <Activation A, bool VEC, GxMode GX, bool GR, typename x_t, typename acc_t>
inline FUSEDREG_ALWAYS_INLINE void elemt_span(const x_t* dy, const x_t* x, const x_t* r, acc_t rf, int64_t len,
                                              const acc_t* mean, const acc_t* invstd, const acc_t* scale,
                                              const acc_t* shift, const acc_t* m1, const acc_t* m2, x_t* gx,
                                              x_t* gr) {
  // NCS (one channel): the vectors' values in registers (gx may alias them, as far as the
  // compiler knows, which would reload them per element)
  const acc_t mu0 = mean[0], inv0 = invstd[0], k0 = scale[0], b0 = shift[0];
  const acc_t a10 = GX == GxMode::kTrain ? m1[0] : acc_t(0), a20 = GX == GxMode::kTrain ? m2[0] : acc_t(0);
#pragma omp simd
  for (int64_t j = 0; j < len; ++j) {
    const acc_t d = to_acc<acc_t>(x[j]) - (VEC ? mean[j] : mu0);
    const acc_t dz = act_dz<A>(to_acc<acc_t>(dy[j]), d, (VEC ? scale[j] : k0), (VEC ? shift[j] : b0), rf, r, j);
    if constexpr (GR) gr[j] = from_acc<x_t>(dz);
    if constexpr (GX == GxMode::kTrain) {
      const acc_t xhat = d * (VEC ? invstd[j] : inv0);
      gx[j] = from_acc<x_t>((VEC ? scale[j] : k0) * (dz - (VEC ? m1[j] : a10) - xhat * (VEC ? m2[j] : a20)));
    } else if constexpr (GX == GxMode::kEval) {
      gx[j] = from_acc<x_t>((VEC ? scale[j] : k0) * dz);
    }
  }
}

// elemt_span of R consecutive CL rows (row i at offset i * len from each pointer): each
// channel's values loaded once for the R rows instead of once a row (a row's own loop loads
// six or seven per vector of outputs: on the AMD EPYC machine the 14x14 channels-last
// element-wise pass was bound by those loads). Every element takes elemt_span's expression, so
// the values are the same bit for bit. R: four rows of 128 or more values (four_rows), else
// two (a microbenchmark of the loop, one thread, median of 40-80 interleaved
// calls: (6272, 256) float32 0.44 -> 0.31 ms with four, 0.41 with two; (100352, 64) 2.38 ->
// 2.22 with two, 2.46 with four).
inline bool four_rows(int64_t len) {
  return len >= 128;
}
template <int R, Activation A, GxMode GX, bool GR, typename x_t, typename acc_t>
inline FUSEDREG_ALWAYS_INLINE void elemt_rows(const x_t* dy, const x_t* x, const x_t* r, acc_t rf, int64_t len,
                                              const acc_t* mean, const acc_t* invstd, const acc_t* scale,
                                              const acc_t* shift, const acc_t* m1, const acc_t* m2, x_t* gx,
                                              x_t* gr) {
#pragma omp simd
  for (int64_t j = 0; j < len; ++j) {
    const acc_t mu = mean[j], k = scale[j];
    [[maybe_unused]] const acc_t b = A != Activation::kNone ? shift[j] : acc_t(0);
    [[maybe_unused]] const acc_t inv = GX == GxMode::kTrain ? invstd[j] : acc_t(0);
    [[maybe_unused]] const acc_t a1 = GX == GxMode::kTrain ? m1[j] : acc_t(0);
    [[maybe_unused]] const acc_t a2 = GX == GxMode::kTrain ? m2[j] : acc_t(0);
#pragma GCC unroll 4
    for (int i = 0; i < R; ++i) {
      const int64_t o = i * len + j;
      const acc_t d = to_acc<acc_t>(x[o]) - mu;
      const acc_t dz = act_dz<A>(to_acc<acc_t>(dy[o]), d, k, b, rf, r, o);
      if constexpr (GR) gr[o] = from_acc<x_t>(dz);
      if constexpr (GX == GxMode::kTrain) {
        const acc_t xhat = d * inv;
        gx[o] = from_acc<x_t>(k * (dz - a1 - xhat * a2));
      } else if constexpr (GX == GxMode::kEval) {
        gx[o] = from_acc<x_t>(k * dz);
      }
    }
  }
}

// elemt_span, float16 staged (kStaged) in blocks of kStage values: the element-wise loop has
// no state from element to element, so blocks give each element the same value.
template <Activation A, bool VEC, GxMode GX, bool GR, typename x_t, typename acc_t>
inline FUSEDREG_ALWAYS_INLINE void elemt_span_any(const x_t* dy, const x_t* x, const x_t* r, acc_t rf, int64_t len,
                                                  const acc_t* mean, const acc_t* invstd, const acc_t* scale,
                                                  const acc_t* shift, const acc_t* m1, const acc_t* m2, x_t* gx,
                                                  x_t* gr) {
  if constexpr (!kStaged<x_t>) {
    elemt_span<A, VEC, GX, GR>(dy, x, r, rf, len, mean, invstd, scale, shift, m1, m2, gx, gr);
  } else {
#if FUSEDREG_X86_DISPATCH
    if (h16_regs<A, x_t>()) {
      return elemt_h16_avx512<A, GX, GR, VEC>(dy, x, r, rf, len, mean, invstd, scale, shift, m1, m2, gx, gr);
    }
#endif
    alignas(64) float fdy[kStage], fx[kStage], fr[kStage], fgx[kStage], fgr[kStage];
    const bool own_r = A != Activation::kNone && r != x;  // r is read with an activation only
    for (int64_t j0 = 0; j0 < len; j0 += kStage) {
      const int64_t n = std::min(kStage, len - j0), v = VEC ? j0 : 0;
      stage_in(dy + j0, fdy, n);
      stage_in(x + j0, fx, n);
      if (own_r) stage_in(r + j0, fr, n);
      elemt_span<A, VEC, GX, GR>(fdy, fx, own_r ? fr : fx, rf, n, mean + v, invstd + v, scale + v, shift + v,
                                 GX == GxMode::kTrain ? m1 + v : nullptr, GX == GxMode::kTrain ? m2 + v : nullptr,
                                 fgx, fgr);
      if constexpr (GX != GxMode::kNone) stage_out(fgx, gx + j0, n);
      if constexpr (GR) stage_out(fgr, gr + j0, n);
    }
  }
}

// elemt_rows, float16 staged: the R rows as one block where they fit, else row by row
// (elemt_span_any: elemt_rows gives each element elemt_span's value).
template <int R, Activation A, GxMode GX, bool GR, typename x_t, typename acc_t>
inline FUSEDREG_ALWAYS_INLINE void elemt_rows_any(const x_t* dy, const x_t* x, const x_t* r, acc_t rf, int64_t len,
                                                  const acc_t* mean, const acc_t* invstd, const acc_t* scale,
                                                  const acc_t* shift, const acc_t* m1, const acc_t* m2, x_t* gx,
                                                  x_t* gr) {
  if constexpr (!kStaged<x_t>) {
    elemt_rows<R, A, GX, GR>(dy, x, r, rf, len, mean, invstd, scale, shift, m1, m2, gx, gr);
  } else {
    const int64_t n = R * len;
    if (n > kStage || h16_regs<A, x_t>()) {  // (in registers: row by row)
      for (int i = 0; i < R; ++i) {
        const int64_t o = i * len;
        elemt_span_any<A, true, GX, GR>(dy + o, x + o, r + o, rf, len, mean, invstd, scale, shift, m1, m2,
                                        GX == GxMode::kNone ? nullptr : gx + o, GR ? gr + o : nullptr);
      }
      return;
    }
    alignas(64) float fdy[kStage], fx[kStage], fr[kStage], fgx[kStage], fgr[kStage];
    const bool own_r = A != Activation::kNone && r != x;
    stage_in(dy, fdy, n);
    stage_in(x, fx, n);
    if (own_r) stage_in(r, fr, n);
    elemt_rows<R, A, GX, GR>(fdy, fx, own_r ? fr : fx, rf, len, mean, invstd, scale, shift, m1, m2, fgx, fgr);
    if constexpr (GX != GxMode::kNone) stage_out(fgx, gx, n);
    if constexpr (GR) stage_out(fgr, gr, n);
  }
}

// dz_sums_row / dz_sums_rows (without the dz store), float16 staged: the kRows rows as one
// block where they fit, else each row in blocks of kStage columns (each column's sums take the
// same adds in the same order either way).
template <Activation A, typename x_t, typename acc_t>
inline FUSEDREG_ALWAYS_INLINE void dz_sums_row_any(const x_t* dy, const x_t* x, const x_t* r, acc_t rf, int64_t len,
                                                   const acc_t* mean, const acc_t* invstd, const acc_t* scale,
                                                   const acc_t* shift, acc_t* q1, acc_t* q2) {
  if constexpr (!kStaged<x_t>) {
    dz_sums_row<A>(dy, x, r, rf, len, mean, invstd, scale, shift, q1, q2);
  } else {
#if FUSEDREG_X86_DISPATCH
    if (h16_regs<A, x_t>()) return dz_rows_h16_avx512<A>(dy, x, r, rf, len, 1, mean, invstd, scale, shift, q1, q2);
#endif
    alignas(64) float fdy[kStage], fx[kStage], fr[kStage];
    const bool own_r = A != Activation::kNone && r != x;
    for (int64_t j0 = 0; j0 < len; j0 += kStage) {
      const int64_t n = std::min(kStage, len - j0);
      stage_in(dy + j0, fdy, n);
      stage_in(x + j0, fx, n);
      if (own_r) stage_in(r + j0, fr, n);
      dz_sums_row<A>(fdy, fx, own_r ? fr : fx, rf, n, mean + j0, invstd + j0, scale + j0, shift + j0, q1 + j0,
                     q2 + j0);
    }
  }
}

template <Activation A, typename x_t, typename acc_t>
inline FUSEDREG_ALWAYS_INLINE void dz_sums_rows_any(const x_t* dy, const x_t* x, const x_t* r, acc_t rf, int64_t len,
                                                    const acc_t* mean, const acc_t* invstd, const acc_t* scale,
                                                    const acc_t* shift, acc_t* q1, acc_t* q2) {
  if constexpr (!kStaged<x_t>) {
    dz_sums_rows<A>(dy, x, r, rf, len, mean, invstd, scale, shift, q1, q2);
  } else {
#if FUSEDREG_X86_DISPATCH
    if (h16_regs<A, x_t>()) return dz_rows_h16_avx512<A>(dy, x, r, rf, len, kRows, mean, invstd, scale, shift, q1, q2);
#endif
    const int64_t n = kRows * len;
    if (n > kStage) {
      for (int i = 0; i < kRows; ++i) {
        const int64_t o = i * len;
        dz_sums_row_any<A>(dy + o, x + o, r + o, rf, len, mean, invstd, scale, shift, q1, q2);
      }
      return;
    }
    alignas(64) float fdy[kStage], fx[kStage], fr[kStage];
    const bool own_r = A != Activation::kNone && r != x;
    stage_in(dy, fdy, n);
    stage_in(x, fx, n);
    if (own_r) stage_in(r, fr, n);
    dz_sums_rows<A>(fdy, fx, own_r ? fr : fx, rf, len, mean, invstd, scale, shift, q1, q2);
  }
}

// ---- layout: which elements a row is, and its uniforms ------------------------------------------

struct Layout {
  int64_t N, C, S;
  bool cl;
  int64_t rows() const { return cl ? N * S : N * C; }
  int64_t row_len() const { return cl ? C : S; }
  int64_t channel(int64_t row) const { return cl ? 0 : row % C; }
};

// The keep-scale factors of stored row `row` (its row_len() elements): dscale where the mask
// keeps the element, 0 where it drops it.
inline void row_keep_scale(const Layout& l, uint64_t seed, float p, float dscale, int64_t row, float* u) {
  if (!l.cl) {
    fill_uniforms(seed, row * l.S, l.S, u);  // NCS row (n, c) starts at (n * C + c) * S
  } else if (l.S == 1) {
    fill_uniforms(seed, row * l.C, l.C, u);
  } else {
    const int64_t n = row / l.S, s = row % l.S;
    const int64_t base = n * l.C * l.S + s;
    for (int64_t c = 0; c < l.C; ++c) u[c] = dropout_uniform(seed, base + c * l.S);
  }
  const int64_t len = l.row_len();
  for (int64_t j = 0; j < len; ++j) u[j] = u[j] >= p ? dscale : 0.0f;
}

// Per task: the keep-scale row (all ones without dropout).
struct KeepScale {
  std::vector<float> ks;
  KeepScale(int64_t len) : ks(len, 1.0f) {}
  const float* row(const Layout& l, bool drop, uint64_t seed, float p, int64_t r) {
    if (drop) row_keep_scale(l, seed, p, dropout_scale(p), r, ks.data());
    return ks.data();
  }
};

// Chunks of rows over the threads; with `align` (a power of two), each chunk starts at a
// multiple of `align` elements (the flat NCS runs: their steps are then aligned vector loads).
template <typename Body>
void for_each_row_chunk(const Layout& l, const Body& body, int64_t align = 1) {
  const int64_t rows = l.rows(), len = std::max<int64_t>(l.row_len(), 1);
  const int64_t step = align / std::gcd(len, align);  // rows per multiple of align elements
  const int64_t per_task = (std::max<int64_t>(1, kTaskElems / len) + step - 1) / step * step;
  const int64_t n_tasks = (rows + per_task - 1) / per_task;
  for_each_task(n_tasks, [&](auto next_task) {
    for (int64_t t = next_task(); t >= 0; t = next_task())
      body(t * per_task, std::min(rows, (t + 1) * per_task));
  });
}

// ---- NCS rows as one flat run -------------------------------------------------------------------

// Without dropout the element-wise passes walk a chunk of NCS rows [r0, r1) as one contiguous
// run in steps of kFlat elements instead of row by row: a short row (196 values of a 14x14 map
// = 12 vectors and 4 left) would otherwise end in a scalar remainder, converted and computed
// one element at a time, which cost as much as the rest of the row in bfloat16. The steps that
// lie inside a row take that row's channel values (span(off, n, c), n a multiple of kFlat); the
// one step that crosses a row boundary takes each element's own (straddle(off, rem, c, c_next):
// its first rem elements are row c's, the rest the next row's); only the chunk's last row ends
// in a remainder. Every element is computed by the same expression as row by row (the VEC
// variant of the span over per-element copies of the two channels' values), so the results are
// bitwise those of the per-row loops. Needs S >= kFlat (a step crosses at most one boundary).
constexpr int64_t kFlat = 16;

template <typename Span, typename Straddle>
inline FUSEDREG_ALWAYS_INLINE void ncs_flat(const Layout& l, int64_t r0, int64_t r1, const Span& span,
                                            const Straddle& straddle) {
  const int64_t S = l.S, end = r1 * S;
  int64_t c = l.channel(r0), pos = r0 * S;
  for (int64_t row = r0; row < r1; ++row) {
    const int64_t row_end = (row + 1) * S;
    const int64_t cn = c + 1 == l.C ? 0 : c + 1;
    const int64_t n = (row_end - pos) / kFlat * kFlat;
    if (n) span(pos, n, c);
    pos += n;
    const int64_t rem = row_end - pos;
    if (rem) {
      if (row_end == end) {
        span(pos, rem, c);  // the chunk's last row: its own remainder
        pos = row_end;
      } else {
        straddle(pos, rem, c, cn);
        pos += kFlat;
      }
    }
    c = cn;
  }
}

// kFlat per-element copies of a per-channel vector across a row boundary: v[c] for the first
// rem elements, v[cn] for the rest.
template <typename acc_t>
inline FUSEDREG_ALWAYS_INLINE void straddle_values(const acc_t* v, int64_t rem, int64_t c, int64_t cn, acc_t* out) {
  const acc_t a = v[c], b = v[cn];
#pragma omp simd
  for (int64_t k = 0; k < kFlat; ++k) out[k] = k < rem ? a : b;
}

// ---- the plain forward at the AVX-512 level (eval's one pass) ----------------------------------

// y = (x - mean) * scale + shift without residual, activation or dropout (an eval call, and
// the channels-last training forward without them) at the AVX-512 level for float32,
// bfloat16 and float16, written with intrinsics: each element is the same sub and fma as fwd_span's loop
// compiles to, so the same bits. What the compiled loops left on the table on the AMD EPYC
// machine (one thread, 32x64x56x56 and 32x256x14x14 eval against ATen's):
//   - outputs that, with the input, outgrow the L3 are written with non-temporal stores (no
//     read-for-ownership of each destination line, and the input stays in the L3): the
//     32x64x56x56 float32 pass moved 52 GB/s, where a copy with ordinary stores moves 61 and
//     with non-temporal ones 79; smaller outputs keep ordinary stores (a copy of 6 MiB: 127
//     against 85 GB/s);
//   - bfloat16 outputs are rounded by vcvtneps2bf16 where the CPU has it: it rounds to nearest
//     even as c10 does, except that it flushes denormal inputs to zero and keeps a NaN's
//     payload, so a vector with a denormal or a NaN (vfpclassps) takes the integer rounding
//     (from_acc's, bit for bit);
//   - the NCS step across a row boundary blends the two channels' broadcast values by a mask
//     (ncs_flat's straddle copies them through small arrays), and channels-last rows of at
//     most 64 channels keep every channel's three vectors in registers for the whole chunk
//     (larger rows: four rows per load of a channel's values).
// Measured (one thread, loaded machine, the op alone, min of 40 interleaved calls, the
// compiled loops' build and this one in alternating processes twice): float32 32x64x56x56
// 54-57 -> 61-65 GB/s, 32x256x14x14 NCHW 105-109 -> 115-116, channels-last the same (104-113
// both); bfloat16 32x64x56x56 47-56 -> 66-71, 32x256x14x14 40-56 -> 84-97 (torch eager:
// 43-48, 51-74; 34-37, 34-38).
// Every helper carries the AVX-512 + BF16 target so that all of them inline into each other;
// only the kernels that check cpu_has_avx512bf16() call the one that emits vcvtneps2bf16.
#if FUSEDREG_X86_DISPATCH
#define FUSEDREG_PLAIN_TARGET FUSEDREG_TARGET_AVX512BF16 inline FUSEDREG_ALWAYS_INLINE

// Loads and stores of one step of W elements (float: 16; bfloat16: 32, so that one
// vcvtne2ps2bf16 rounds two vectors, a sixth faster than one vcvtneps2bf16 a vector in a
// microbenchmark of the loop) as W / 16 vectors of floats: PlainIo<x_t, NT, CVT> (NT:
// non-temporal stores of the whole steps, which must then be 64-byte aligned; CVT: round
// bfloat16 with the BF16 instructions). Masks have a bit per element.
template <int W>
struct Steps {
  __m512 v[W / 16];
};

template <typename x_t, bool NT, bool CVT>
struct PlainIo;

template <bool NT, bool CVT>
struct PlainIo<float, NT, CVT> {
  static constexpr int W = 16;
  using Mask = __mmask16;
  static FUSEDREG_PLAIN_TARGET Steps<W> load(const float* p) { return {{_mm512_loadu_ps(p)}}; }
  static FUSEDREG_PLAIN_TARGET Steps<W> load(const float* p, Mask m) { return {{_mm512_maskz_loadu_ps(m, p)}}; }
  static FUSEDREG_PLAIN_TARGET void store(float* p, const Steps<W>& s) {
    if constexpr (NT) {
      _mm512_stream_ps(p, s.v[0]);
    } else {
      _mm512_storeu_ps(p, s.v[0]);
    }
  }
  static FUSEDREG_PLAIN_TARGET void store(float* p, const Steps<W>& s, Mask m) { _mm512_mask_storeu_ps(p, m, s.v[0]); }
};

template <bool NT, bool CVT>
struct PlainIo<c10::BFloat16, NT, CVT> {
  static constexpr int W = 32;
  using Mask = __mmask32;
  static FUSEDREG_PLAIN_TARGET __m512 widen(__m256i h) { return cpu::bf16x16_widen(h); }
  static FUSEDREG_PLAIN_TARGET Steps<W> load(const c10::BFloat16* p) {
    return {{widen(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))),
             widen(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 16)))}};
  }
  static FUSEDREG_PLAIN_TARGET Steps<W> load(const c10::BFloat16* p, Mask m) {
    return {{widen(_mm256_maskz_loadu_epi16(static_cast<__mmask16>(m), p)),
             widen(_mm256_maskz_loadu_epi16(static_cast<__mmask16>(m >> 16), p + 16))}};
  }
  // the 32 elements' bfloat16 bits
  static FUSEDREG_PLAIN_TARGET __m512i round(const Steps<W>& s) {
    if constexpr (CVT) {
      constexpr int kNanOrDenormal = 0x01 | 0x80 | 0x20;  // quiet NaN, signaling NaN, denormal
      if (__builtin_expect(_kortestz_mask16_u8(_mm512_fpclass_ps_mask(s.v[0], kNanOrDenormal),
                                               _mm512_fpclass_ps_mask(s.v[1], kNanOrDenormal)),
                           1))
        return (__m512i)_mm512_cvtne2ps_pbh(s.v[1], s.v[0]);  // v[0] in the low half
    }
    // (the masked-zero inserts: the plain insert, cast and zext trip GCC 12's -Wuninitialized
    // inside their header)
    const __m512i lo = _mm512_maskz_inserti64x4(__mmask8(0xFF), _mm512_setzero_si512(), cpu::bf16x16_bits(s.v[0]), 0);
    return _mm512_maskz_inserti64x4(__mmask8(0xFF), lo, cpu::bf16x16_bits(s.v[1]), 1);
  }
  static FUSEDREG_PLAIN_TARGET void store(c10::BFloat16* p, const Steps<W>& s) {
    if constexpr (NT) {
      _mm512_stream_si512(reinterpret_cast<__m512i*>(p), round(s));
    } else {
      _mm512_storeu_si512(p, round(s));
    }
  }
  static FUSEDREG_PLAIN_TARGET void store(c10::BFloat16* p, const Steps<W>& s, Mask m) {
    _mm512_mask_storeu_epi16(p, m, round(s));
  }
};

// float16: steps of 16 elements (one vcvtph2ps up, one vcvtps2ph down: a step of 32 would
// only narrow the shapes this path takes); vcvtps2ph rounds to nearest even as c10::Half does,
// and a NaN lane is set to sign | 0x7E00 afterwards (c10's NaN; the instruction keeps the
// payload), only in a step that has one (rows.h's cpu::half16_bits). Non-temporal steps
// are 32 bytes, at multiples of 16 elements from a 64-byte-aligned y.
template <bool NT, bool CVT>
struct PlainIo<c10::Half, NT, CVT> {
  static constexpr int W = 16;
  using Mask = __mmask16;
  static FUSEDREG_PLAIN_TARGET Steps<W> load(const c10::Half* p) { return {{cpu::half16_load(p)}}; }
  static FUSEDREG_PLAIN_TARGET Steps<W> load(const c10::Half* p, Mask m) {
    return {{_mm512_maskz_cvtph_ps(cpu::kAll16, _mm256_maskz_loadu_epi16(m, p))}};
  }
  static FUSEDREG_PLAIN_TARGET __m256i round(__m512 x) { return cpu::half16_bits(x); }
  static FUSEDREG_PLAIN_TARGET void store(c10::Half* p, const Steps<W>& s) {
    if constexpr (NT) {
      _mm256_stream_si256(reinterpret_cast<__m256i*>(p), round(s.v[0]));
    } else {
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), round(s.v[0]));
    }
  }
  static FUSEDREG_PLAIN_TARGET void store(c10::Half* p, const Steps<W>& s, Mask m) {
    _mm256_mask_storeu_epi16(p, m, round(s.v[0]));
  }
};

// z of a step: (x - mean) * scale + shift, the per-channel values one vector each a lane
template <int W>
FUSEDREG_PLAIN_TARGET Steps<W> plain_z(const Steps<W>& x, const Steps<W>& mu, const Steps<W>& k, const Steps<W>& b) {
  Steps<W> z;
#pragma GCC unroll 2
  for (int h = 0; h < W / 16; ++h) z.v[h] = _mm512_fmadd_ps(_mm512_sub_ps(x.v[h], mu.v[h]), k.v[h], b.v[h]);
  return z;
}

template <int W>
FUSEDREG_PLAIN_TARGET Steps<W> plain_bcast(float v) {
  Steps<W> s;
#pragma GCC unroll 2
  for (int h = 0; h < W / 16; ++h) s.v[h] = _mm512_set1_ps(v);
  return s;
}

template <int W>
FUSEDREG_PLAIN_TARGET Steps<W> plain_vec(const float* p) {
  Steps<W> s;
#pragma GCC unroll 2
  for (int h = 0; h < W / 16; ++h) s.v[h] = _mm512_loadu_ps(p + 16 * h);
  return s;
}

// a's lanes [0, rem), b's after them
template <int W>
FUSEDREG_PLAIN_TARGET Steps<W> plain_join(const Steps<W>& a, const Steps<W>& b, int64_t rem) {
  Steps<W> s;
#pragma GCC unroll 2
  for (int h = 0; h < W / 16; ++h) {
    const int64_t n = std::clamp<int64_t>(rem - 16 * h, 0, 16);
    s.v[h] = _mm512_mask_blend_ps(static_cast<__mmask16>((1u << n) - 1u), b.v[h], a.v[h]);
  }
  return s;
}

// NCS rows [r0, r1) as one run of W-element steps (S >= W; r0 * S a multiple of W when NT):
// steps inside a row take its channel's broadcast values, the step across a row boundary the
// two channels' joined by lane, the chunk's last row ends in a masked step.
template <typename Io, typename x_t>
FUSEDREG_PLAIN_TARGET void plain_ncs_avx512(const x_t* x, x_t* y, int64_t S, int64_t C, int64_t r0, int64_t r1,
                                            const float* mean, const float* scale, const float* shift) {
  constexpr int W = Io::W;
  int64_t c = r0 % C, pos = r0 * S;
  const int64_t end = r1 * S;
  Steps<W> mu = plain_bcast<W>(mean[c]), k = plain_bcast<W>(scale[c]), b = plain_bcast<W>(shift[c]);
  for (int64_t row = r0; row < r1; ++row) {
    const int64_t row_end = (row + 1) * S;
    for (; pos + W <= row_end; pos += W) Io::store(y + pos, plain_z(Io::load(x + pos), mu, k, b));
    const int64_t cn = c + 1 == C ? 0 : c + 1;
    const Steps<W> mun = plain_bcast<W>(mean[cn]), kn = plain_bcast<W>(scale[cn]), bn = plain_bcast<W>(shift[cn]);
    const int64_t rem = row_end - pos;
    if (rem) {
      if (row_end == end) {
        const auto m = static_cast<typename Io::Mask>((uint64_t(1) << rem) - 1u);
        Io::store(y + pos, plain_z(Io::load(x + pos, m), mu, k, b), m);
        pos = row_end;
      } else {  // lanes [0, rem) are this row's, the rest the next row's
        Io::store(y + pos, plain_z(Io::load(x + pos), plain_join(mu, mun, rem), plain_join(k, kn, rem),
                                   plain_join(b, bn, rem)));
        pos += W;
      }
    }
    mu = mun;
    k = kn;
    b = bn;
    c = cn;
  }
}

// Channels-last rows [r0, r1) of NS * W channels (NS * W <= 64): the channels' vectors in
// registers for the whole chunk.
template <int NS, typename Io, typename x_t>
FUSEDREG_PLAIN_TARGET void plain_cl_regs_avx512(const x_t* x, x_t* y, int64_t r0, int64_t r1, const float* mean,
                                                const float* scale, const float* shift) {
  constexpr int W = Io::W;
  constexpr int64_t C = NS * W;
  Steps<W> mu[NS], k[NS], b[NS];
#pragma GCC unroll 4
  for (int v = 0; v < NS; ++v) {
    mu[v] = plain_vec<W>(mean + v * W);
    k[v] = plain_vec<W>(scale + v * W);
    b[v] = plain_vec<W>(shift + v * W);
  }
  for (int64_t row = r0; row < r1; ++row) {
    const x_t* xr = x + row * C;
    x_t* yr = y + row * C;
#pragma GCC unroll 4
    for (int v = 0; v < NS; ++v) Io::store(yr + v * W, plain_z(Io::load(xr + v * W), mu[v], k[v], b[v]));
  }
}

// Channels-last rows [r0, r1) of C channels (C a multiple of W): four rows per load of each
// step's per-channel values, the chunk's last rows one by one.
template <typename Io, typename x_t>
FUSEDREG_PLAIN_TARGET void plain_cl_avx512(const x_t* x, x_t* y, int64_t C, int64_t r0, int64_t r1,
                                           const float* mean, const float* scale, const float* shift) {
  constexpr int W = Io::W;
  constexpr int kRows = 4;
  int64_t row = r0;
  for (; row + kRows <= r1; row += kRows) {
    const x_t* xr = x + row * C;
    x_t* yr = y + row * C;
    for (int64_t j = 0; j < C; j += W) {
      const Steps<W> mu = plain_vec<W>(mean + j), k = plain_vec<W>(scale + j), b = plain_vec<W>(shift + j);
#pragma GCC unroll 4
      for (int i = 0; i < kRows; ++i) Io::store(yr + i * C + j, plain_z(Io::load(xr + i * C + j), mu, k, b));
    }
  }
  for (; row < r1; ++row) {
    for (int64_t j = 0; j < C; j += W) {
      Io::store(y + row * C + j, plain_z(Io::load(x + row * C + j), plain_vec<W>(mean + j),
                                         plain_vec<W>(scale + j), plain_vec<W>(shift + j)));
    }
  }
}

template <typename Io, typename x_t>
FUSEDREG_PLAIN_TARGET void plain_rows_avx512(const Layout& l, const x_t* x, x_t* y, int64_t r0, int64_t r1,
                                             const float* mean, const float* scale, const float* shift) {
  constexpr int W = Io::W;
  if (!l.cl) return plain_ncs_avx512<Io>(x, y, l.S, l.C, r0, r1, mean, scale, shift);
  switch (l.C / W) {  // C is a multiple of W here
    case 1: return plain_cl_regs_avx512<1, Io>(x, y, r0, r1, mean, scale, shift);
    case 2: return plain_cl_regs_avx512<2, Io>(x, y, r0, r1, mean, scale, shift);
    case 3: if constexpr (3 * W <= 64) return plain_cl_regs_avx512<3, Io>(x, y, r0, r1, mean, scale, shift); break;
    case 4: if constexpr (4 * W <= 64) return plain_cl_regs_avx512<4, Io>(x, y, r0, r1, mean, scale, shift); break;
    default: break;
  }
  plain_cl_avx512<Io>(x, y, l.C, r0, r1, mean, scale, shift);
}

// Rows [r0, r1) in one combination (out of line, compiled for AVX-512 + BF16; only CVT = true
// emits BF16 instructions).
template <typename x_t, bool NT, bool CVT>
FUSEDREG_TARGET_AVX512BF16 __attribute__((noinline)) void plain_chunk_avx512(const Layout& l, const x_t* x, x_t* y,
                                                                             int64_t r0, int64_t r1,
                                                                             const float* mean, const float* scale,
                                                                             const float* shift) {
  plain_rows_avx512<PlainIo<x_t, NT, CVT>>(l, x, y, r0, r1, mean, scale, shift);
  if constexpr (NT) _mm_sfence();  // before the region's barrier publishes the rows
}

// ---- bfloat16 NCS element-wise passes in registers ----------------------------------------------
//
// The forward with an activation or a residual (act_fwd_ncs_bf16) and the backward's
// element-wise pass (elemt_ncs_bf16) of bfloat16 NCS rows without dropout, at the AVX-512
// level. The compiled loops (fwd_span, elemt_span, walked by ncs_flat) convert with integer
// operations: the round to nearest even, its NaN test and select cost about as much as the
// arithmetic, twice per element in the backward (grad_x and grad_residual). Here a chunk's rows
// are walked as one run of 32-element steps (plain_ncs_avx512's walk: the step across a row
// boundary takes each lane's channel values, joined by lane; the chunk's last step masked),
// every element computed by the compiled loops' float operations in their order and
// contractions (the forms of fwd_regs_avx512 and elemt_h16_avx512, which float16 has used
// since they were checked against those loops), and rounded by PlainIo: vcvtne2ps2bf16 where
// the CPU has it and no lane of the 32 is a NaN or denormal, else the integer rounding. So
// the values are bit for bit the compiled loops'.

template <int W, int NV>
struct ChanSteps {
  Steps<W> v[NV];
};

template <int W, int NV>
FUSEDREG_PLAIN_TARGET ChanSteps<W, NV> chan_join(const ChanSteps<W, NV>& a, const ChanSteps<W, NV>& b, int64_t rem) {
  ChanSteps<W, NV> s;
#pragma GCC unroll 8
  for (int i = 0; i < NV; ++i) s.v[i] = plain_join<W>(a.v[i], b.v[i], rem);
  return s;
}

// Io's load and store of one step, masked only where the mask is not every lane (a constant
// in the walk's whole steps, so the test folds away there).
template <typename Io, typename x_t>
FUSEDREG_PLAIN_TARGET Steps<Io::W> io_load(const x_t* p, typename Io::Mask m) {
  if (m == static_cast<typename Io::Mask>(~uint64_t(0))) return Io::load(p);
  return Io::load(p, m);
}

template <typename Io, typename x_t>
FUSEDREG_PLAIN_TARGET void io_store(x_t* p, const Steps<Io::W>& s, typename Io::Mask m) {
  if (m == static_cast<typename Io::Mask>(~uint64_t(0))) return Io::store(p, s);
  Io::store(p, s, m);
}

// NCS rows [r0, r1) of S >= Io::W values as one run of steps: Op::vals(a, c) the broadcast
// values of channel c, Op::step(a, pos, vals, mask) one step from element pos.
template <typename Io, typename Op>
FUSEDREG_PLAIN_TARGET void ncs_run_avx512(const typename Op::Args& a, int64_t S, int64_t C, int64_t r0, int64_t r1) {
  constexpr int W = Io::W;
  using Mask = typename Io::Mask;
  constexpr Mask kAll = static_cast<Mask>(~uint64_t(0));
  int64_t c = r0 % C, pos = r0 * S;
  const int64_t end = r1 * S;
  typename Op::Vals v = Op::vals(a, c);
  for (int64_t row = r0; row < r1; ++row) {
    const int64_t row_end = (row + 1) * S;
    for (; pos + W <= row_end; pos += W) Op::step(a, pos, v, kAll);
    const int64_t cn = c + 1 == C ? 0 : c + 1;
    const typename Op::Vals vn = Op::vals(a, cn);
    const int64_t rem = row_end - pos;
    if (rem) {
      if (row_end == end) {
        Op::step(a, pos, v, static_cast<Mask>((uint64_t(1) << rem) - 1u));
        pos = row_end;
      } else {  // lanes [0, rem) are this row's, the rest the next row's
        Op::step(a, pos, chan_join<W>(v, vn, rem), kAll);
        pos += W;
      }
    }
    v = vn;
    c = cn;
  }
}

template <typename x_t>
struct FwdRegsArgs {
  const x_t* x;
  const x_t* r;  // or null
  x_t* y;
  const float* mean;
  const float* scale;
  const float* shift;
};

template <typename x_t>
struct ElemtRegsArgs {
  const x_t* dy;
  const x_t* x;
  const x_t* r;  // x without a residual (rf 0)
  float rf;
  const float* mean;
  const float* invstd;
  const float* scale;
  const float* shift;
  const float* m1;  // training only
  const float* m2;
  x_t* gx;
  x_t* gr;
};

// y = act((x - mean) * scale + shift (+ r)): fwd_span's expression as fwd_regs_avx512 forms it
template <Activation A, bool R, typename Io, typename x_t>
struct ActFwdOp {
  using IoT = Io;
  using Args = FwdRegsArgs<x_t>;
  static constexpr int W = Io::W;
  using Vals = ChanSteps<W, 3>;
  static FUSEDREG_PLAIN_TARGET Vals vals(const Args& a, int64_t c) {
    return {{plain_bcast<W>(a.mean[c]), plain_bcast<W>(a.scale[c]), plain_bcast<W>(a.shift[c])}};
  }
  static FUSEDREG_PLAIN_TARGET void step(const Args& a, int64_t pos, const Vals& v, typename Io::Mask m) {
    Steps<W> z = plain_z(io_load<Io>(a.x + pos, m), v.v[0], v.v[1], v.v[2]);
    [[maybe_unused]] Steps<W> rr;
    if constexpr (R) rr = io_load<Io>(a.r + pos, m);
#pragma GCC unroll 2
    for (int h = 0; h < W / 16; ++h) {
      if constexpr (R) z.v[h] = _mm512_add_ps(z.v[h], rr.v[h]);
      z.v[h] = h16_activate<A>(z.v[h]);
    }
    io_store<Io>(a.y + pos, z, m);
  }
};

// grad_residual = dz, grad_x = scale * (dz - m1 - xhat * m2) (training) or scale * dz (eval):
// elemt_span's expressions as elemt_h16_avx512 forms them (r is x, rf 0, without a residual)
template <Activation A, GxMode GX, bool GR, typename Io, typename x_t>
struct ElemtOp {
  using IoT = Io;
  using Args = ElemtRegsArgs<x_t>;
  static constexpr int W = Io::W;
  static constexpr bool kTrain = GX == GxMode::kTrain, kAct = A != Activation::kNone;
  using Vals = ChanSteps<W, 6>;  // mean, invstd, scale, shift, m1, m2 (0 where unused)
  static FUSEDREG_PLAIN_TARGET Vals vals(const Args& a, int64_t c) {
    return {{plain_bcast<W>(kTrain || kAct ? a.mean[c] : 0.0f), plain_bcast<W>(kTrain ? a.invstd[c] : 0.0f),
             plain_bcast<W>(GX != GxMode::kNone || kAct ? a.scale[c] : 0.0f),
             plain_bcast<W>(kAct ? a.shift[c] : 0.0f), plain_bcast<W>(kTrain ? a.m1[c] : 0.0f),
             plain_bcast<W>(kTrain ? a.m2[c] : 0.0f)}};
  }
  static FUSEDREG_PLAIN_TARGET void step(const Args& a, int64_t pos, const Vals& v, typename Io::Mask m) {
    const Steps<W> dy = io_load<Io>(a.dy + pos, m);
    [[maybe_unused]] Steps<W> x, r;
    if constexpr (kTrain || kAct) x = io_load<Io>(a.x + pos, m);
    if constexpr (kAct) r = io_load<Io>(a.r + pos, m);
    const __m512 vrf = _mm512_set1_ps(a.rf);
    Steps<W> gx, gr;
#pragma GCC unroll 2
    for (int h = 0; h < W / 16; ++h) {
      __m512 d = _mm512_setzero_ps(), g = _mm512_setzero_ps();
      if constexpr (kTrain || kAct) d = _mm512_sub_ps(x.v[h], v.v[0].v[h]);
      if constexpr (kAct) g = h16_act_grad<A>(d, v.v[2].v[h], v.v[3].v[h], vrf, r.v[h]);
      const __m512 dz = kAct ? _mm512_mul_ps(dy.v[h], g) : dy.v[h];
      gr.v[h] = dz;
      if constexpr (kTrain) {
        const __m512 xhat = _mm512_mul_ps(d, v.v[1].v[h]);
        // dz - m1; dz's only use without grad_residual, where GCC contracts dy * act'(z) - m1
        const __m512 t = kAct && !GR ? _mm512_fmsub_ps(dy.v[h], g, v.v[4].v[h]) : _mm512_sub_ps(dz, v.v[4].v[h]);
        gx.v[h] = _mm512_mul_ps(v.v[2].v[h], _mm512_fnmadd_ps(xhat, v.v[5].v[h], t));
      } else if constexpr (GX == GxMode::kEval) {
        gx.v[h] = _mm512_mul_ps(v.v[2].v[h], dz);
      }
    }
    if constexpr (GR) io_store<Io>(a.gr + pos, gr, m);
    if constexpr (GX != GxMode::kNone) io_store<Io>(a.gx + pos, gx, m);
  }
};

// One chunk of rows (out of line, compiled for AVX-512 + BF16; only CVT = true emits the BF16
// instructions).
template <typename Op>
FUSEDREG_TARGET_AVX512BF16 __attribute__((noinline)) void ncs_chunk_avx512(const typename Op::Args& a, int64_t S,
                                                                           int64_t C, int64_t r0, int64_t r1) {
  ncs_run_avx512<typename Op::IoT, Op>(a, S, C, r0, r1);
}
#undef FUSEDREG_PLAIN_TARGET

#endif

// The plain forward through plain_chunk_avx512 where it applies (AVX-512, float32, bfloat16
// or float16, NCS rows of at least a step's values or channels-last rows of a multiple of a
// step's channels: 16 float32 or float16, 32 bfloat16); false where it does not (the caller runs
// forward_kernel's loops).
template <typename x_t>
bool plain_forward(const Layout& l, const x_t* x, x_t* y, const at::opmath_type<x_t>* mean,
                   const at::opmath_type<x_t>* scale, const at::opmath_type<x_t>* shift) {
#if FUSEDREG_X86_DISPATCH
  if constexpr (std::is_same_v<x_t, float> || cpu::kIsHalfType<x_t>) {
    constexpr int64_t W = PlainIo<x_t, false, false>::W;  // elements a step
    if (!cpu::cpu_has_avx512() || (l.cl ? l.C % W != 0 : l.S < W)) return false;
    const int64_t bytes = l.N * l.C * l.S * int64_t(sizeof(x_t));
    // non-temporal stores of the whole steps need them aligned: y's start (a 2 MiB block
    // from empty_output when large, 64 bytes otherwise) and the chunks' (multiples of W)
    const bool nt = 2 * bytes > cpu::l3_bytes() && reinterpret_cast<uintptr_t>(y) % 64 == 0;
    const bool cvt = std::is_same_v<x_t, c10::BFloat16> && cpu::cpu_has_avx512bf16();
    auto chunk = nt ? (cvt ? plain_chunk_avx512<x_t, true, true> : plain_chunk_avx512<x_t, true, false>)
                    : (cvt ? plain_chunk_avx512<x_t, false, true> : plain_chunk_avx512<x_t, false, false>);
    for_each_row_chunk(l, [&](int64_t r0, int64_t r1) { chunk(l, x, y, r0, r1, mean, scale, shift); }, W);
    return true;
  }
#endif
  return false;
}

// Whether the bfloat16 NCS register passes (act_fwd_ncs_bf16, elemt_ncs_bf16) serve these rows:
// AVX-512, NCS rows of at least a step (32 values); the callers run them without dropout only.
template <typename x_t>
inline bool ncs_regs_bf16(const Layout& l) {
#if FUSEDREG_X86_DISPATCH
  if constexpr (std::is_same_v<x_t, c10::BFloat16>) {
    return !l.cl && l.S >= 32 && cpu::cpu_has_avx512();
  }
#endif
  return false;
}

// The forward of bfloat16 NCS rows in registers (ActFwdOp) over every thread; only where
// ncs_regs_bf16.
template <Activation A, typename x_t>
void act_fwd_ncs_bf16(const Layout& l, const FwdRegsArgs<x_t>& a) {
#if FUSEDREG_X86_DISPATCH
  if constexpr (std::is_same_v<x_t, c10::BFloat16>) {
    using Io = PlainIo<x_t, false, false>;
    using IoCvt = PlainIo<x_t, false, true>;
    const bool cvt = cpu::cpu_has_avx512bf16();
    auto chunk = a.r ? (cvt ? ncs_chunk_avx512<ActFwdOp<A, true, IoCvt, x_t>> : ncs_chunk_avx512<ActFwdOp<A, true, Io, x_t>>)
                     : (cvt ? ncs_chunk_avx512<ActFwdOp<A, false, IoCvt, x_t>>
                            : ncs_chunk_avx512<ActFwdOp<A, false, Io, x_t>>);
    for_each_row_chunk(l, [&](int64_t r0, int64_t r1) { chunk(a, l.S, l.C, r0, r1); });
  }
#endif
}

#if FUSEDREG_X86_DISPATCH
// ElemtOp's chunk function for this CPU: rounding by the BF16 instructions where it has them.
template <Activation A, GxMode GX, bool GR, typename x_t>
inline auto elemt_chunk_bf16() {
  return cpu::cpu_has_avx512bf16() ? ncs_chunk_avx512<ElemtOp<A, GX, GR, PlainIo<x_t, false, true>, x_t>>
                                   : ncs_chunk_avx512<ElemtOp<A, GX, GR, PlainIo<x_t, false, false>, x_t>>;
}
#endif

// The backward's element-wise pass of bfloat16 NCS rows in registers (ElemtOp) over every
// thread; only where ncs_regs_bf16.
template <Activation A, GxMode GX, bool GR, typename x_t>
void elemt_ncs_bf16(const Layout& l, const ElemtRegsArgs<x_t>& a) {
#if FUSEDREG_X86_DISPATCH
  if constexpr (std::is_same_v<x_t, c10::BFloat16>) {
    auto chunk = elemt_chunk_bf16<A, GX, GR, x_t>();
    for_each_row_chunk(l, [&](int64_t r0, int64_t r1) { chunk(a, l.S, l.C, r0, r1); });
  }
#endif
}

// The same for channel c's rows alone (N rows of S values at a stride of C rows), on this
// thread: each row a run of its own, ending in a masked step.
template <Activation A, GxMode GX, bool GR, typename x_t>
void elemt_ncs_bf16_channel(const Layout& l, const ElemtRegsArgs<x_t>& a, int64_t c) {
#if FUSEDREG_X86_DISPATCH
  if constexpr (std::is_same_v<x_t, c10::BFloat16>) {
    auto chunk = elemt_chunk_bf16<A, GX, GR, x_t>();
    for (int64_t i = 0; i < l.N; ++i) chunk(a, l.S, l.C, i * l.C + c, i * l.C + c + 1);
  }
#endif
}

// ---- forward ---------------------------------------------------------------------------------

// lanes[j] = v[j's channel] for the n lanes of a group of channels of S values each (the
// small-channel statistics' lanes, spread_forward's per-element values), the lanes past them
// (up to a masked step's reach) 0: a channel's S lanes one broadcast store each (a gather per
// vector of lanes, vgatherdps, made 8x256x4x4 float32 a fifth slower)
template <typename acc_t>
inline FUSEDREG_ALWAYS_INLINE void spread_lanes(const acc_t* v, int64_t n, int64_t S, acc_t* lanes) {
  if (S == 1) {
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) lanes[j] = v[j];
  } else {
    for (int64_t g = 0; g < n / S; ++g) {
      const acc_t vg = v[g];
#pragma omp simd
      for (int64_t s = 0; s < S; ++s) lanes[g * S + s] = vg;
    }
  }
  for (int64_t j = n; j < kLanes<acc_t> + kTailStep; ++j) lanes[j] = acc_t(0);
}

// The forward without dropout of NCS rows shorter than kSpreadRowLimit values (maps of 1x1 to
// 7x7: EfficientNet's last stages have 1152 channels of 3x3, ResNet's 512 of 7x7). Row by row
// (under a step: a vector loop of S values with a scalar remainder) or as ncs_flat's run (a
// step across each row boundary through small copies of both channels' values), the per-row
// work outweighed the row's own: 1.1-5x torch's time in bfloat16 and with silu. Instead a
// block of G consecutive channels (G * S <= kSpreadValues) gets per-element copies of its
// channel values, S each, in arrays that stay in L1, and each image's G * S values of the
// block are one span (VEC) over them; a task is a block over a group of images. Each element
// is computed by the same expression as row by row, so the values are the same.
constexpr int64_t kSpreadRowLimit = 64;
constexpr int64_t kSpreadValues = 1024;
static_assert(kSpreadValues >= kLanes<float> + kTailStep, "spread_lanes zeroes lanes up to a masked step's reach");

template <Activation A, typename x_t>
void spread_forward(const Layout& l, const x_t* x, const x_t* r, x_t* y, const at::opmath_type<x_t>* mean,
                    const at::opmath_type<x_t>* scale, const at::opmath_type<x_t>* shift) {
  using acc_t = at::opmath_type<x_t>;
  const int64_t S = l.S, C = l.C, N = l.N;
  const int64_t G = std::min(C, std::max<int64_t>(1, kSpreadValues / S));
  const int64_t blocks = (C + G - 1) / G;
  const int64_t images = std::max<int64_t>(1, kTaskElems / (G * S));  // per task
  const int64_t groups = (N + images - 1) / images;
  cpu::for_each_task(blocks * groups, [&](auto next_task) {
    alignas(64) acc_t mu[kSpreadValues], k[kSpreadValues], b[kSpreadValues];
    int64_t filled = -1;  // the block whose values the arrays hold
    for (int64_t t = next_task(); t >= 0; t = next_task()) {
      const int64_t blk = t / groups, c0 = blk * G, gn = std::min(G, C - c0), n = gn * S;
      if (blk != filled) {
        spread_lanes(mean + c0, n, S, mu);
        spread_lanes(scale + c0, n, S, k);
        spread_lanes(shift + c0, n, S, b);
        filled = blk;
      }
      const int64_t i0 = (t % groups) * images, i1 = std::min(N, i0 + images);
      dispatch_isa([&](auto) FUSEDREG_ALWAYS_INLINE {
        for (int64_t i = i0; i < i1; ++i) {
          const int64_t off = (i * C + c0) * S;
          fwd_span_any<A, true>(x + off, r ? r + off : nullptr, y + off, nullptr, n, static_cast<const acc_t*>(mu),
                                static_cast<const acc_t*>(k), static_cast<const acc_t*>(b));
        }
      });
    }
  });
}

template <Activation A, typename x_t>
void forward_kernel(const Layout& l, const x_t* x, const x_t* r, x_t* y, const at::opmath_type<x_t>* mean,
                    const at::opmath_type<x_t>* scale, const at::opmath_type<x_t>* shift, float p,
                    uint64_t seed) {
  const bool drop = p > 0.0f;
  const int64_t len = l.row_len();
  using acc_t = at::opmath_type<x_t>;
  if constexpr (A == Activation::kNone) {
    if (!drop && !r && plain_forward<x_t>(l, x, y, mean, scale, shift)) return;
  }
  if (!drop && !l.cl && l.S < kSpreadRowLimit) {  // short NCS rows: spread_forward
    spread_forward<A>(l, x, r, y, mean, scale, shift);
    return;
  }
  if constexpr (std::is_same_v<x_t, c10::BFloat16>) {
    if (!drop && ncs_regs_bf16<x_t>(l)) {  // bfloat16 NCS rows in registers
      act_fwd_ncs_bf16<A>(l, FwdRegsArgs<x_t>{x, r, y, mean, scale, shift});
      return;
    }
  }
  if (!drop && !l.cl && l.S >= kFlat) {  // NCS rows as one flat run (ncs_flat)
    for_each_row_chunk(l, [&](int64_t r0, int64_t r1) {
      dispatch_isa([&](auto) FUSEDREG_ALWAYS_INLINE {
        ncs_flat(
            l, r0, r1,
            [&](int64_t off, int64_t n, int64_t c) FUSEDREG_ALWAYS_INLINE {
              fwd_span_any<A, false>(x + off, r ? r + off : nullptr, y + off, nullptr, n, mean + c, scale + c,
                                 shift + c);
            },
            [&](int64_t off, int64_t rem, int64_t c, int64_t cn) FUSEDREG_ALWAYS_INLINE {
              alignas(64) acc_t mu[kFlat], k[kFlat], b[kFlat];
              straddle_values(mean, rem, c, cn, mu);
              straddle_values(scale, rem, c, cn, k);
              straddle_values(shift, rem, c, cn, b);
              fwd_span_any<A, true>(x + off, r ? r + off : nullptr, y + off, nullptr, kFlat, mu, k, b);
            });
      });
    }, kFlat);
    return;
  }
  for_each_row_chunk(l, [&](int64_t r0, int64_t r1) {
    KeepScale keep(len);
    // One dispatch per chunk of rows: rows can be short (C = 64 channels, a 7x7 map).
    dispatch_isa([&](auto) FUSEDREG_ALWAYS_INLINE {
      int64_t c = l.channel(r0);  // NCS: the row's channel, stepped (not a division per row)
      int64_t row = r0;
      if (l.cl && !drop) {  // kFwdRows rows a step (fwd_rows), the chunk's last rows one by one below
        for (; row + kFwdRows <= r1; row += kFwdRows) {
          const int64_t off = row * len;
          fwd_rows_any<A>(x + off, r ? r + off : nullptr, y + off, len, mean, scale, shift);
        }
      }
      for (; row < r1; ++row) {
        const float* ks = drop ? keep.row(l, drop, seed, p, row) : nullptr;
        const int64_t off = row * len;
        const x_t* rr = r ? r + off : nullptr;
        if (l.cl) {
          fwd_span_any<A, true>(x + off, rr, y + off, ks, len, mean, scale, shift);
        } else {
          fwd_span_any<A, false>(x + off, rr, y + off, ks, len, mean + c, scale + c, shift + c);
          if (++c == l.C) c = 0;
        }
      }
    });
  });
}

// dst[k] = t[k] for k in [lo, hi) (within one step of kFlat): masked vector stores where the
// level has them, instead of a copy call per row
template <typename x_t>
inline FUSEDREG_ALWAYS_INLINE void put_range(x_t* dst, const x_t* t, int64_t lo, int64_t hi) {
#pragma omp simd
  for (int64_t k = 0; k < kFlat; ++k) {
    if (k >= lo && k < hi) dst[k] = t[k];
  }
}

// One NCS row [off, off + S) of the per-channel kernels below in kFlat-element steps at
// multiples of kFlat elements for float and wider (aligned loads: a 196-value row starts
// anywhere in a cache line, and the vector loads that cross a line cost about twice as much:
// the float backward of a 14x14 map took 20-25% longer than that of a 12x16 one), without a scalar
// remainder: span(pos, len, nullptr) writes whole steps in place; a step that the row only
// partly covers (its first, its last) is one full step span(pos, kFlat, tmp) into a small
// buffer -- reading the kFlat values from pos (outside the row, inside the tensor: the values
// past the row are computed and dropped) -- of which put(pos, lo, hi, tmp) stores the elements
// [lo, hi). Near the tensor's ends a partial step is an ordinary short span. Each element is
// computed by the same expression either way (a short row's scalar remainder cost as much as
// the rest of the row in bfloat16).
template <typename x_t, typename Span, typename Put>
inline FUSEDREG_ALWAYS_INLINE void row_in_flat_steps(const Layout& l, int64_t off, const Span& span, const Put& put) {
  const int64_t end = off + l.S, numel = l.N * l.C * l.S;
  int64_t pos = off;
  alignas(64) x_t t[kFlat];
  // float and wider (a step of 64 bytes or more: a misaligned one always crosses a line); a
  // 16-bit step of 32 bytes crosses one only at some offsets, and there the row's first partial
  // step cost more than the loads it aligns (bfloat16 is bound by the conversions' arithmetic)
  const int64_t lo = sizeof(x_t) >= 4 ? off % kFlat : 0;
  if (lo) {  // the first step, from the multiple of kFlat before off
    const int64_t a = off - lo, hi = std::min(kFlat, end - a);
    if (a + kFlat <= numel) {
      span(a, kFlat, t);
      put(a, lo, hi, static_cast<const x_t*>(t));
    } else {
      span(off, hi - lo, static_cast<x_t*>(nullptr));
    }
    pos = a + hi;
  }
  const int64_t n = (end - pos) / kFlat * kFlat;
  if (n) span(pos, n, static_cast<x_t*>(nullptr));
  pos += n;
  if (pos == end) return;
  if (pos + kFlat <= numel) {
    span(pos, kFlat, t);
    put(pos, 0, end - pos, static_cast<const x_t*>(t));
  } else {
    span(pos, end - pos, static_cast<x_t*>(nullptr));
  }
}

// ---- statistics ------------------------------------------------------------------------------

// (count, mean, m2) += (nb, mb, m2b) (Chan et al.).
template <typename acc_t>
inline void chan_merge(acc_t& n, acc_t& mean, acc_t& m2, acc_t nb, acc_t mb, acc_t m2b) {
  const acc_t total = n + nb;
  const acc_t delta = mb - mean;
  mean += delta * (nb / total);
  m2 += m2b + delta * delta * (n * nb / total);
  n = total;
}

// The CL row blocks of a reduction: fixed by (L, C).
struct RowBlocks {
  int64_t per_block, n_blocks;
};

inline RowBlocks row_blocks(int64_t L, int64_t C) {
  const int64_t min_rows = std::max<int64_t>(1, 4096 / std::max<int64_t>(C, 1));
  const int64_t per_block = std::max(min_rows, (L + kMaxBlocks - 1) / kMaxBlocks);
  return {per_block, (L + per_block - 1) / per_block};
}

// The mean and biased variance of NCS channel c (inside a dispatched region). A channel that
// fits in cache (short rows: a 14x14 map) takes its two passes over the whole channel (the mean
// of the deviations from its first value, then sum (x - mean)^2) instead of per row with a merge
// per row, which cost more than the row's sums there.
template <typename x_t>
inline FUSEDREG_ALWAYS_INLINE void ncs_channel_stats(const Layout& l, const x_t* x, int64_t c,
                                                     Lanes<at::opmath_type<x_t>, kLanes<at::opmath_type<x_t>>>& lanes,
                                                     at::opmath_type<x_t>& mean_out, at::opmath_type<x_t>& var_out,
                                                     StageBuf& stage) {
  using acc_t = at::opmath_type<x_t>;
  const int64_t C = l.C;
  const int64_t numel = l.N * C * l.S;
  // float16: the rows staged (staged_len) at a stride of ls, the passes over the copies
  const int64_t ls = (l.S + kTailStep - 1) / kTailStep * kTailStep;
  if (l.N * l.S * static_cast<int64_t>(sizeof(x_t)) <= kWholeChannelBytes) {
    const acc_t k = static_cast<acc_t>(x[c * l.S]);
    auto readable = [&](int64_t i) FUSEDREG_ALWAYS_INLINE { return numel - (i * C + c) * l.S; };
    // the two passes over the channel's rows, row i at x0 + i * stride
    auto passes = [&](const auto* x0, int64_t stride) FUSEDREG_ALWAYS_INLINE {
      lanes.clear();
      lanes.add_rows(
          l.N, l.S, [&](int64_t i, int64_t j) FUSEDREG_ALWAYS_INLINE { return to_acc<acc_t>(x0[i * stride + j]) - k; },
          readable);
      const acc_t count = static_cast<acc_t>(l.N * l.S);
      const acc_t mu = k + lanes.sum() / count;
      lanes.clear();
      lanes.template add_rows<true>(
          l.N, l.S, [&](int64_t i, int64_t j) FUSEDREG_ALWAYS_INLINE { return to_acc<acc_t>(x0[i * stride + j]) - mu; },
          readable);
      mean_out = mu;
      var_out = lanes.sum() / count;
    };
    if constexpr (kStaged<x_t>) {
      float* f = stage.get(l.N * ls);
      for (int64_t i = 0; i < l.N; ++i) stage_in(x + (i * C + c) * l.S, f + i * ls, staged_len(l.S, readable(i)));
      passes(static_cast<const float*>(f), ls);
    } else {
      passes(x + c * l.S, C * l.S);
    }
    return;
  }
  acc_t n = 0, mu = 0, m2 = 0;
  for (int64_t i = 0; i < l.N; ++i) {
    const int64_t readable = numel - (i * C + c) * l.S;
    // the two passes over row i
    auto passes = [&](const auto* row) FUSEDREG_ALWAYS_INLINE {
      // the mean of the deviations from the row's first value: a mean of 1e3 is then
      // exact to the last bits of the spread, not to an ulp of the row's sum
      const acc_t k = static_cast<acc_t>(row[0]);
      lanes.clear();
      lanes.add(l.S, [&](int64_t j) FUSEDREG_ALWAYS_INLINE { return to_acc<acc_t>(row[j]) - k; }, readable);
      const acc_t mr = k + lanes.sum() / l.S;
      lanes.clear();
      lanes.template add<true>(
          l.S, [&](int64_t j) FUSEDREG_ALWAYS_INLINE { return to_acc<acc_t>(row[j]) - mr; }, readable);
      chan_merge(n, mu, m2, static_cast<acc_t>(l.S), mr, lanes.sum());
    };
    const x_t* row = x + (i * C + c) * l.S;
    if constexpr (kStaged<x_t>) {
      float* f = stage.get(ls);
      stage_in(row, f, staged_len(l.S, readable));
      passes(static_cast<const float*>(f));
    } else {
      passes(row);
    }
  }
  mean_out = mu;
  var_out = m2 / n;
}

// ---- small NCS channels ------------------------------------------------------------------------

// A channel whose rows fit in half the statistics' lanes (S <= kLanes / 2: maps up to 5x5 in
// float, 4x4 in double) and that takes ncs_channel_stats' whole-channel passes is, there, N
// rows of S values, each value j of a row always in lane j: lane j sums f(i, j) over the rows
// in order, the lanes past S stay +0, and after each ceil(kLaneChunk / S) rows (and at the end)
// the fixed pairwise tree folds the lanes into the total. Adding +0 changes no lane (a lane
// starts at +0 and never holds -0), so that tree is the same tree over the first bit_ceil(S)
// lanes, the lanes past S taken as 0. Per channel that cost two passes of lane steps with
// masked tails and a 64-lane fold each, then a row loop per output row: at a 2x2 map (32
// values a channel, batch 8) about 150 ns a channel, more than ATen's whole op. Such channels
// are taken G adjacent ones at a time (a group): their rows are adjacent in memory, so a
// group's row i is n = G * S <= kLanes contiguous values, lane g * S + s summing channel g's
// value s, each channel's lanes folded by the same tree in place (fold_group), with the same
// adds in the same order as per channel, so the same bits whichever G (tested against each
// channel alone). A row of kLanes values (an 8x8 map in float) is one whole step of
// ncs_channel_stats already; grouped it was slower (no channels to group).
template <typename x_t>
inline bool small_channels(const Layout& l) {
  return !l.cl && 2 * l.S <= kLanes<at::opmath_type<x_t>> &&
         l.N * l.S * static_cast<int64_t>(sizeof(x_t)) <= kWholeChannelBytes;
}

// Channels a group: as many as fill the lanes, but no fewer than four groups a thread where the
// channels allow (the groups are the parallel loop's items; the bits do not depend on G)
template <typename x_t>
inline int64_t group_channels(const Layout& l) {
  const int64_t fill = kLanes<at::opmath_type<x_t>> / l.S;
  const int64_t spread = l.C / (4 * static_cast<int64_t>(at::get_num_threads()));
  return std::max<int64_t>(1, std::min(fill, spread));
}

// A group's lane arrays: n <= kLanes (64 floats) lanes, the masked steps' reach past them (up to
// kLanes + kTailStep), and the fold's reads past a lane (up to n + kLanes / 2)
constexpr int64_t kGroupLanes = 2 * 256 / sizeof(float);

// Each lane's place in its channel's row (j % S).
struct GroupLanes {
  int64_t S, P;  // P = bit_ceil(S): the fold's tree
  alignas(64) int32_t pos[kGroupLanes];
  explicit GroupLanes(int64_t S_) : S(S_), P(static_cast<int64_t>(std::bit_ceil(static_cast<uint64_t>(S_)))) {
    int32_t q = 0;
    for (int64_t j = 0; j < kGroupLanes; ++j) {  // (no division per lane: a call can be a few us)
      pos[j] = q;
      if (++q == S) q = 0;
    }
  }
};

// Lanes::fold's tree of every channel's S lanes in p[0, n), in place: level w adds lane s + w
// to lane s < w of each channel, where s + w < S (0 otherwise: the lanes past S), reading lanes
// that level does not write; channel g's total ends in p[g * S].
template <typename acc_t>
inline FUSEDREG_ALWAYS_INLINE void fold_group(acc_t* p, int64_t n, const GroupLanes& gl) {
  const int32_t S = static_cast<int32_t>(gl.S);
  for (int32_t w = static_cast<int32_t>(gl.P / 2); w >= 1; w /= 2) {
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) {
      const int32_t s = gl.pos[j];
      p[j] += s < w && s + w < S ? p[j + w] : acc_t(0);
    }
  }
}

// p[j] += f(j) (SQ: its square), f(j) = x[j] - sub[j], for j in [0, n) as Lanes::add's masked
// tail adds them: steps of kTailStep lanes, the values past n replaced by 0 by a select (read
// from row + n on, inside the tensor). Written as that tail is: GCC does not contract its
// square and add into an FMA (the plain loop's it does), so the form decides the bits at the
// AVX2 and AVX-512 levels.
template <bool SQ, typename x_t, typename acc_t>
inline FUSEDREG_ALWAYS_INLINE void lanes_masked(const x_t* row, int64_t n, const acc_t* sub, acc_t* p) {
  for (int64_t k0 = 0; k0 < n; k0 += kTailStep) {
    acc_t* q = p + k0;
    const acc_t* s = sub + k0;
    const int left = static_cast<int>(n - k0);
#pragma omp simd
    for (int k = 0; k < kTailStep; ++k) {
      const acc_t v = to_acc<acc_t>(row[k0 + k]) - s[k];
      const acc_t u = k < left ? v : acc_t(0);
      q[k] += SQ ? u * u : u;
    }
  }
}

// The same as Lanes::add's scalar remainder adds them (reading nothing past n).
template <bool SQ, typename x_t, typename acc_t>
inline FUSEDREG_ALWAYS_INLINE void lanes_plain(const x_t* row, int64_t n, const acc_t* sub, acc_t* p) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) {
    const acc_t v = to_acc<acc_t>(row[j]) - sub[j];
    p[j] += SQ ? v * v : v;
  }
}

// tot[g] = the folded sums of f = x - sub (SQ: its square) of the G channels [c0, c0 + G) (row
// i at x0 + i * C * S, n = G * S values, sub per lane), as Lanes::add_rows and sum() give
// them: a row is the masked tail (lanes_masked) where a whole step of lanes is readable from
// its start, else the scalar remainder (lanes_plain); near the tensor's end that differs from
// channel to channel.
template <bool SQ, typename x_t, typename acc_t>
inline FUSEDREG_ALWAYS_INLINE void group_sums(const Layout& l, const GroupLanes& gl, const x_t* x0, int64_t c0,
                                              int64_t G, const acc_t* sub, acc_t* tot) {
  constexpr int K = kLanes<acc_t>;
  const int64_t S = l.S, C = l.C, n = G * S, numel = l.N * C * S;
  const int64_t R = (kLaneChunk + S - 1) / S;  // rows between folds
  alignas(64) acc_t p[kGroupLanes];
  for (int64_t g = 0; g < G; ++g) tot[g] = acc_t(0);
  for (int64_t i0 = 0; i0 < l.N; i0 += R) {
    const int64_t i1 = std::min(l.N, i0 + R);
    for (int64_t k = 0; k < kGroupLanes; ++k) p[k] = acc_t(0);
    for (int64_t i = i0; i < i1; ++i) {
      const x_t* row = x0 + i * C * S;
      const int64_t readable = numel - (i * C + c0) * S;  // from the group's row i (its first channel's)
      if (readable - (G - 1) * S >= K) {  // every channel's row: the masked tail
        lanes_masked<SQ>(row, n, sub, p);
      } else {
        for (int64_t g = 0; g < G; ++g) {
          if (readable - g * S >= K) {
            lanes_masked<SQ>(row + g * S, S, sub + g * S, p + g * S);
          } else {
            lanes_plain<SQ>(row + g * S, S, sub + g * S, p + g * S);
          }
        }
      }
    }
    fold_group(p, n, gl);
    for (int64_t g = 0; g < G; ++g) tot[g] += p[g * S];
  }
}

// The mean and biased variance of the G small channels [c0, c0 + G) into mean[g], var[g], and
// the means spread over the lanes into mu (inside a dispatched region): ncs_channel_stats'
// values.
template <typename x_t>
inline FUSEDREG_ALWAYS_INLINE void ncs_group_stats(const Layout& l, const GroupLanes& gl, const x_t* x, int64_t c0,
                                                   int64_t G, at::opmath_type<x_t>* mean, at::opmath_type<x_t>* var,
                                                   at::opmath_type<x_t>* mu) {
  using acc_t = at::opmath_type<x_t>;
  const int64_t S = l.S, n = G * S;
  const x_t* x0 = x + c0 * S;
  alignas(64) acc_t k[kLanes<acc_t>], tot[kLanes<acc_t>];
  for (int64_t g = 0; g < G; ++g) k[g] = static_cast<acc_t>(x0[g * S]);  // each channel's first value
  spread_lanes(k, n, gl.S, mu);
  group_sums<false>(l, gl, x0, c0, G, mu, tot);
  const acc_t count = static_cast<acc_t>(l.N * S);
#pragma omp simd
  for (int64_t g = 0; g < G; ++g) mean[g] = k[g] + tot[g] / count;
  spread_lanes(mean, n, gl.S, mu);
  group_sums<true>(l, gl, x0, c0, G, mu, tot);
#pragma omp simd
  for (int64_t g = 0; g < G; ++g) var[g] = tot[g] / count;
}

template <typename x_t>
void stats_kernel(const Layout& l, const x_t* x, at::opmath_type<x_t>* mean, at::opmath_type<x_t>* var) {
  using acc_t = at::opmath_type<x_t>;
  const int64_t C = l.C;
  if (small_channels<x_t>(l)) {  // groups of small channels (ncs_group_stats)
    const int64_t G = group_channels<x_t>(l);
    at::parallel_for(0, (C + G - 1) / G, 1, [&](int64_t g0, int64_t g1) {
      const GroupLanes gl(l.S);
      dispatch_isa([&](auto) FUSEDREG_ALWAYS_INLINE {
        alignas(64) acc_t mu[kGroupLanes];
        for (int64_t g = g0; g < g1; ++g) {
          const int64_t c0 = g * G;
          ncs_group_stats(l, gl, x, c0, std::min(G, C - c0), mean + c0, var + c0, mu);
        }
      });
    });
    return;
  }
  if (!l.cl) {
    at::parallel_for(0, C, 1, [&](int64_t c0, int64_t c1) {
      Lanes<acc_t, kLanes<acc_t>> lanes;
      StageBuf stage;
      for (int64_t c = c0; c < c1; ++c) {
        dispatch_isa([&](auto) FUSEDREG_ALWAYS_INLINE { ncs_channel_stats(l, x, c, lanes, mean[c], var[c], stage); });
      }
    });
    return;
  }
  const int64_t L = l.N * l.S;
  const RowBlocks rb = row_blocks(L, C);
  std::unique_ptr<acc_t[]> pm(new acc_t[rb.n_blocks * C]), pm2(new acc_t[rb.n_blocks * C]);
  for_each_task(rb.n_blocks, [&](auto next_task) {
    std::vector<acc_t> shift(C);  // the block's first row: the mean is taken of deviations from it
    StageBuf stage;
    for (int64_t b = next_task(); b >= 0; b = next_task()) {
      const int64_t r0 = b * rb.per_block, r1 = std::min(L, r0 + rb.per_block);
      acc_t* m = pm.get() + b * C;
      acc_t* q = pm2.get() + b * C;
      std::fill(m, m + C, acc_t(0));
      std::fill(q, q + C, acc_t(0));
      const acc_t inv = acc_t(1) / static_cast<acc_t>(r1 - r0);
      acc_t* k = shift.data();
      for (int64_t c = 0; c < C; ++c) k[c] = static_cast<acc_t>(x[r0 * C + c]);
      // the block's two passes over its rows, rows [r, r + n) at rows(r, n)
      auto passes = [&](const auto& rows) FUSEDREG_ALWAYS_INLINE {
        // kRows rows a step (each channel's sums loaded and stored once for them, the rows
        // added in order: the same adds as row by row)
        int64_t r = r0;
        for (; r + kRows <= r1; r += kRows) {
          const auto* row = rows(r, kRows);
#pragma omp simd
          for (int64_t c = 0; c < C; ++c) {
            acc_t s = m[c];
            const acc_t kc = k[c];
#pragma GCC unroll 4
            for (int i = 0; i < kRows; ++i) s += to_acc<acc_t>(row[i * C + c]) - kc;
            m[c] = s;
          }
        }
        for (; r < r1; ++r) {
          const auto* row = rows(r, 1);
#pragma omp simd
          for (int64_t c = 0; c < C; ++c) m[c] += to_acc<acc_t>(row[c]) - k[c];
        }
#pragma omp simd
        for (int64_t c = 0; c < C; ++c) m[c] = k[c] + m[c] * inv;
        r = r0;
        for (; r + kRows <= r1; r += kRows) {
          const auto* row = rows(r, kRows);
#pragma omp simd
          for (int64_t c = 0; c < C; ++c) {
            acc_t s = q[c];
            const acc_t mc = m[c];
#pragma GCC unroll 4
            for (int i = 0; i < kRows; ++i) {
              const acc_t d = to_acc<acc_t>(row[i * C + c]) - mc;
              s += d * d;
            }
            q[c] = s;
          }
        }
        for (; r < r1; ++r) {
          const auto* row = rows(r, 1);
#pragma omp simd
          for (int64_t c = 0; c < C; ++c) {
            const acc_t d = to_acc<acc_t>(row[c]) - m[c];
            q[c] += d * d;
          }
        }
      };
      dispatch_isa([&](auto) FUSEDREG_ALWAYS_INLINE {
        if constexpr (kStaged<x_t>) {  // each pass stages its steps of rows (in the L1 cache)
#if FUSEDREG_X86_DISPATCH
          if (h16_regs<Activation::kNone, x_t>()) return cl_stats_h16_avx512<kRows>(x + r0 * C, C, r1 - r0, k, inv, m, q);
#endif
          float* f = stage.get(kRows * C);
          passes([&](int64_t r, int64_t n) FUSEDREG_ALWAYS_INLINE {
            stage_in(x + r * C, f, n * C);
            return static_cast<const float*>(f);
          });
        } else {
          passes([&](int64_t r, int64_t) FUSEDREG_ALWAYS_INLINE { return x + r * C; });
        }
      });
    }
  });
  // Combine the blocks in block order: mean = mean_0 + sum n_b (mean_b - mean_0) / L (the
  // blocks' means as deviations from the first block's: blocks of equal means, a constant
  // channel's, give that mean exactly, where sum n_b mean_b / L could be an ulp off and y then
  // (x - mean) * invstd with invstd up to 1/sqrt(eps)), m2 = sum m2_b + n_b (mean_b - mean)^2,
  // walking the partial rows in order (contiguous, vectorized across channels; at the baseline
  // level, which has no FMA to contract these into: the results do not depend on the CPU).
  std::vector<acc_t> s(C, acc_t(0)), m2(C, acc_t(0));
  {
    acc_t* sp = s.data();
    acc_t* qp = m2.data();
    const acc_t* p0 = pm.get();
    for (int64_t b = 1; b < rb.n_blocks; ++b) {
      const acc_t nb = static_cast<acc_t>(std::min(L, (b + 1) * rb.per_block) - b * rb.per_block);
      const acc_t* pb = pm.get() + b * C;
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) sp[c] += nb * (pb[c] - p0[c]);
    }
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) mean[c] = p0[c] + sp[c] / static_cast<acc_t>(L);
    for (int64_t b = 0; b < rb.n_blocks; ++b) {
      const acc_t nb = static_cast<acc_t>(std::min(L, (b + 1) * rb.per_block) - b * rb.per_block);
      const acc_t* pb = pm.get() + b * C;
      const acc_t* qb = pm2.get() + b * C;
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) {
        const acc_t d = pb[c] - mean[c];
        qp[c] += qb[c] + nb * d * d;
      }
    }
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) var[c] = qp[c] / static_cast<acc_t>(L);
  }
}

// The training forward of a contiguous NCS input without dropout in one parallel loop over the
// channels: a channel's statistics (ncs_channel_stats, as stats_kernel takes them), its invstd
// = 1 / sqrt(var + eps) (what torch.rsqrt(var + eps) gives: a correctly rounded square root and
// division, eps rounded to the compute type as a tensor-scalar add does), and at once its output
// rows (fwd_span, the expression the forward kernel evaluates), while the channel's x rows are
// still in the core's cache. The same values bit for bit as batch_norm_stats, the rsqrt and
// batch_norm_fwd.
template <Activation A, typename x_t>
void forward_train_ncs_kernel(const Layout& l, const x_t* x, const x_t* r, x_t* y, const at::opmath_type<x_t>* w,
                              const at::opmath_type<x_t>* bias, double eps, at::opmath_type<x_t>* mean,
                              at::opmath_type<x_t>* var, at::opmath_type<x_t>* invstd) {
  using acc_t = at::opmath_type<x_t>;
  const int64_t C = l.C, S = l.S;
  const acc_t e = static_cast<acc_t>(eps);
  at::parallel_for(0, C, 1, [&](int64_t c0, int64_t c1) {
    Lanes<acc_t, kLanes<acc_t>> lanes;
    StageBuf stage;
    for (int64_t c = c0; c < c1; ++c) {
      acc_t mu, v;
      dispatch_isa([&](auto) FUSEDREG_ALWAYS_INLINE { ncs_channel_stats(l, x, c, lanes, mu, v, stage); });
      const acc_t inv = acc_t(1) / std::sqrt(v + e);
      const acc_t k = w ? inv * w[c] : inv, b = bias ? bias[c] : acc_t(0);
      dispatch_isa([&](auto) FUSEDREG_ALWAYS_INLINE {
        for (int64_t i = 0; i < l.N; ++i) {
          row_in_flat_steps<x_t>(
              l, (i * C + c) * S,
              [&](int64_t off, int64_t len, x_t* out) FUSEDREG_ALWAYS_INLINE {
                fwd_span<A, false>(x + off, r ? r + off : nullptr, out ? out : y + off, nullptr, len, &mu, &k, &b);
              },
              [&](int64_t off, int64_t lo, int64_t hi, const x_t* t) FUSEDREG_ALWAYS_INLINE {
                put_range(y + off, t, lo, hi);
              });
        }
      });
      mean[c] = mu;
      var[c] = v;
      invstd[c] = inv;
    }
  });
}

// The same for small channels (small_channels), a group of G of them at a time
// (ncs_group_stats): the statistics, the invstd, scale and shift of each (as the two-pass
// path's host loop computes them), spread over the group's lanes, then the group's output rows
// (fwd_span over G * S values with per-lane vectors: each element the expression of the
// per-channel spans). The same values bit for bit.
template <Activation A, typename x_t>
void forward_train_small_kernel(const Layout& l, const x_t* x, const x_t* r, x_t* y, const at::opmath_type<x_t>* w,
                                const at::opmath_type<x_t>* bias, double eps, at::opmath_type<x_t>* mean,
                                at::opmath_type<x_t>* var, at::opmath_type<x_t>* invstd) {
  using acc_t = at::opmath_type<x_t>;
  constexpr int K = kLanes<acc_t>;
  const int64_t C = l.C, S = l.S, G = group_channels<x_t>(l);
  const acc_t e = static_cast<acc_t>(eps);
  at::parallel_for(0, (C + G - 1) / G, 1, [&](int64_t g0, int64_t g1) {
    const GroupLanes gl(S);
    dispatch_isa([&](auto) FUSEDREG_ALWAYS_INLINE {
      alignas(64) acc_t mu[kGroupLanes], k[kGroupLanes], b[kGroupLanes], kc[K], bc[K];
      for (int64_t g = g0; g < g1; ++g) {
        const int64_t c0 = g * G, gn = std::min(G, C - c0), n = gn * S;
        ncs_group_stats(l, gl, x, c0, gn, mean + c0, var + c0, mu);
        const acc_t* vg = var + c0;
        acc_t* ig = invstd + c0;
#pragma omp simd
        for (int64_t q = 0; q < gn; ++q) {
          const acc_t inv = acc_t(1) / std::sqrt(vg[q] + e);
          ig[q] = inv;
          kc[q] = w ? inv * w[c0 + q] : inv;
          bc[q] = bias ? bias[c0 + q] : acc_t(0);
        }
        spread_lanes(kc, n, gl.S, k);
        spread_lanes(bc, n, gl.S, b);
        for (int64_t i = 0; i < l.N; ++i) {
          const int64_t off = (i * C + c0) * S;
          fwd_span<A, true>(x + off, r ? r + off : nullptr, y + off, nullptr, n, mu, k, b);
        }
      }
    });
  });
}

// ---- backward ------------------------------------------------------------------------------

template <typename x_t>
struct BwdArgs {
  using acc_t = at::opmath_type<x_t>;
  const x_t* dy;
  const x_t* x;
  const x_t* r;       // or null (read only with an activation)
  const acc_t* mean;
  const acc_t* invstd;
  const acc_t* scale;  // invstd * w
  const acc_t* shift;  // b
  float p;
  uint64_t seed;
};

// dz and xhat of stored row `row` into g and xh (inside a dispatched region).
template <Activation A, typename x_t>
inline FUSEDREG_ALWAYS_INLINE void dz_row(const Layout& l, const BwdArgs<x_t>& a, int64_t row, const float* ks,
                                          at::opmath_type<x_t>* g, at::opmath_type<x_t>* xh) {
  using acc_t = at::opmath_type<x_t>;
  const int64_t len = l.row_len(), off = row * len;
  const x_t* rr = a.r ? a.r + off : a.x + off;
  const acc_t rf = a.r ? acc_t(1) : acc_t(0);
  if (l.cl) {
    dz_span<A, true>(a.dy + off, a.x + off, rr, rf, ks, len, a.mean, a.invstd, a.scale, a.shift, g, xh);
  } else {
    const int64_t c = l.channel(row);
    dz_span<A, false>(a.dy + off, a.x + off, rr, rf, ks, len, a.mean + c, a.invstd + c, a.scale + c, a.shift + c,
                      g, xh);
  }
}

// sum_dz, sum_dzx of NCS channel c without dropout, straight from the dy, x (and residual)
// rows (inside a dispatched region): what bwd_reduce_kernel and bwd_fused_ncs_kernel both take.
template <Activation A, typename x_t>
inline FUSEDREG_ALWAYS_INLINE void ncs_channel_sums(const Layout& l, const BwdArgs<x_t>& a, int64_t c,
                                                    Lanes<at::opmath_type<x_t>, kLanes2<at::opmath_type<x_t>>>& l1,
                                                    Lanes<at::opmath_type<x_t>, kLanes2<at::opmath_type<x_t>>>& l2,
                                                    at::opmath_type<x_t>& s1, at::opmath_type<x_t>& s2,
                                                    StageBuf& stage) {
  using acc_t = at::opmath_type<x_t>;
  const int64_t C = l.C, len = l.S;
  const x_t* rb = a.r ? a.r : a.x;
  const acc_t rf = a.r ? acc_t(1) : acc_t(0);
  l1.clear();
  l2.clear();
  bool staged = false;
  if constexpr (kStaged<x_t>) staged = !h16_regs<A, x_t>();  // (in registers: the rows in place)
  if (staged) {
    if constexpr (kStaged<x_t>) {
      // the rows staged (staged_len) a group at a time, dy, x (and the residual) at a row stride
      // of ls in three arrays; the same calls on them as below, with the tensor's readable counts
      const int64_t numel = l.N * C * len, ls = (len + kTailStep - 1) / kTailStep * kTailStep;
      const bool own_r = A != Activation::kNone && a.r;
      const int64_t per = std::max<int64_t>(1, 4096 / ls);  // rows a group
      const int64_t cap = std::min(per, l.N) * ls;
      float* fdy = stage.get(3 * cap);
      float* fx = fdy + cap;
      float* fr = own_r ? fx + cap : fx;
      for (int64_t i0 = 0; i0 < l.N; i0 += per) {
        const int64_t i1 = std::min(l.N, i0 + per);
        for (int64_t i = i0; i < i1; ++i) {
          const int64_t off = (i * C + c) * len, n = staged_len(len, numel - off), o = (i - i0) * ls;
          stage_in(a.dy + off, fdy + o, n);
          stage_in(a.x + off, fx + o, n);
          if (own_r) stage_in(a.r + off, fr + o, n);
        }
        if (len <= kLaneChunk) {
          dz_sums_short_rows<A>(fdy, fx, fr, rf, i1 - i0, ls, len, a.mean[c], a.invstd[c], a.scale[c], a.shift[c], l1,
                                l2, [&](int64_t k) FUSEDREG_ALWAYS_INLINE { return numel - ((i0 + k) * C + c) * len; });
        } else {  // one row a group
          dz_sums_span<A>(fdy, fx, fr, rf, len, a.mean[c], a.invstd[c], a.scale[c], a.shift[c], l1, l2,
                          numel - (i0 * C + c) * len);
        }
      }
    }
  } else if (len <= kLaneChunk) {  // short rows: the lanes in registers across the rows
    const int64_t off0 = c * len, numel = l.N * C * len;
    dz_sums_short_rows<A>(a.dy + off0, a.x + off0, rb + off0, rf, l.N, C * len, len, a.mean[c], a.invstd[c],
                          a.scale[c], a.shift[c], l1, l2,
                          [&](int64_t i) FUSEDREG_ALWAYS_INLINE { return numel - (i * C + c) * len; });
  } else {
    for (int64_t i = 0; i < l.N; ++i) {
      const int64_t off = (i * C + c) * len;
      dz_sums_span<A>(a.dy + off, a.x + off, rb + off, rf, len, a.mean[c], a.invstd[c], a.scale[c], a.shift[c], l1,
                      l2, l.N * C * len - off);
    }
  }
  l2.pending = l1.pending;
  s1 = l1.sum();
  s2 = l2.sum();
}

// sum_dz[c], sum_dzx[c] (c in [0, C)).
// With gz (CL storage without dropout only: batch_norm_bwd_cl), the pass also writes dz there.
template <Activation A, typename x_t>
void bwd_reduce_kernel(const Layout& l, const BwdArgs<x_t>& a, at::opmath_type<x_t>* sum_dz,
                       at::opmath_type<x_t>* sum_dzx, x_t* gz = nullptr) {
  using acc_t = at::opmath_type<x_t>;
  const bool drop = a.p > 0.0f;
  const int64_t C = l.C, len = l.row_len();
  // dz and xhat of one stored row, into g and xh (called inside a dispatched region)
  auto row_dz = [&](int64_t row, KeepScale& keep, acc_t* g, acc_t* xh) FUSEDREG_ALWAYS_INLINE {
    dz_row<A>(l, a, row, keep.row(l, drop, a.seed, a.p, row), g, xh);
  };
  if (!l.cl) {
    at::parallel_for(0, C, 1, [&](int64_t c0, int64_t c1) {
      KeepScale keep(len);
      std::vector<acc_t> g(len), xh(len);
      Lanes<acc_t, kLanes2<acc_t>> l1, l2;
      StageBuf stage;
      for (int64_t c = c0; c < c1; ++c) {
        acc_t s1 = 0, s2 = 0;
        dispatch_isa([&](auto) FUSEDREG_ALWAYS_INLINE {
          if (!drop) {  // the sums straight from the dy, x (and residual) rows, no row buffers
            ncs_channel_sums<A>(l, a, c, l1, l2, s1, s2, stage);
            return;
          }
          for (int64_t i = 0; i < l.N; ++i) {
            row_dz(i * C + c, keep, g.data(), xh.data());
            const acc_t* gg = g.data();
            const acc_t* xx = xh.data();
            for (int64_t j0 = 0; j0 < len; j0 += kSumBlock) {
              const int64_t j1 = std::min(len, j0 + kSumBlock);
              acc_t t1 = 0, t2 = 0;
#pragma omp simd reduction(+ : t1, t2)
              for (int64_t j = j0; j < j1; ++j) {
                t1 += gg[j];
                t2 += gg[j] * xx[j];
              }
              s1 += t1;
              s2 += t2;
            }
          }
        });
        sum_dz[c] = s1;
        sum_dzx[c] = s2;
      }
    });
    return;
  }
  const int64_t L = l.N * l.S;
  const RowBlocks rb = row_blocks(L, C);
  std::unique_ptr<acc_t[]> p1(new acc_t[rb.n_blocks * C]), p2(new acc_t[rb.n_blocks * C]);
  for_each_task(rb.n_blocks, [&](auto next_task) {
    KeepScale keep(len);
    std::vector<acc_t> g(len), xh(len);
    for (int64_t b = next_task(); b >= 0; b = next_task()) {
      acc_t* q1 = p1.get() + b * C;
      acc_t* q2 = p2.get() + b * C;
      std::fill(q1, q1 + C, acc_t(0));
      std::fill(q2, q2 + C, acc_t(0));
      const int64_t r1 = std::min(L, (b + 1) * rb.per_block);
      dispatch_isa([&](auto) FUSEDREG_ALWAYS_INLINE {
        const acc_t* gg = g.data();
        const acc_t* xx = xh.data();
        if (!drop) {  // one loop per row, no row buffers
          const x_t* rbase = a.r ? a.r : a.x;
          const acc_t rf = a.r ? acc_t(1) : acc_t(0);
          auto rows = [&](auto store) FUSEDREG_ALWAYS_INLINE {
            constexpr bool ST = decltype(store)::value;
            int64_t row = b * rb.per_block;
            const int64_t ahead_by = prefetch_rows<x_t>(len) * len;
            for (; row + kRows <= r1; row += kRows) {
              const int64_t off = row * len;
              // rows ahead into the cache (past the block's end too: for_each_task hands a thread
              // consecutive blocks; past the tensor's end a prefetch is harmless)
              const int64_t ahead = off + ahead_by;
              prefetch_span(a.dy + ahead, kRows * len);
              prefetch_span(a.x + ahead, kRows * len);
              if (a.r) prefetch_span(a.r + ahead, kRows * len);
              if constexpr (ST) {
                dz_sums_rows<A, true>(a.dy + off, a.x + off, rbase + off, rf, len, a.mean, a.invstd, a.scale,
                                      a.shift, q1, q2, gz + off);
              } else {
                dz_sums_rows_any<A>(a.dy + off, a.x + off, rbase + off, rf, len, a.mean, a.invstd, a.scale,
                                    a.shift, q1, q2);
              }
            }
            for (; row < r1; ++row) {
              const int64_t off = row * len;
              if constexpr (ST) {
                dz_sums_row<A, true>(a.dy + off, a.x + off, rbase + off, rf, len, a.mean, a.invstd, a.scale,
                                     a.shift, q1, q2, gz + off);
              } else {
                dz_sums_row_any<A>(a.dy + off, a.x + off, rbase + off, rf, len, a.mean, a.invstd, a.scale, a.shift,
                                   q1, q2);
              }
            }
          };
          if (gz) {
            rows(std::true_type{});
          } else {
            rows(std::false_type{});
          }
          return;
        }
        for (int64_t row = b * rb.per_block; row < r1; ++row) {
          row_dz(row, keep, g.data(), xh.data());
#pragma omp simd
          for (int64_t c = 0; c < C; ++c) {
            q1[c] += gg[c];
            q2[c] += gg[c] * xx[c];
          }
        }
      });
    }
  });
  // the blocks' partial rows in block order (contiguous, vectorized across channels)
  std::fill(sum_dz, sum_dz + C, acc_t(0));
  std::fill(sum_dzx, sum_dzx + C, acc_t(0));
  {
    for (int64_t b = 0; b < rb.n_blocks; ++b) {
      const acc_t* q1 = p1.get() + b * C;
      const acc_t* q2 = p2.get() + b * C;
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) {
        sum_dz[c] += q1[c];
        sum_dzx[c] += q2[c];
      }
    }
  }
}

// The training backward of a contiguous NCS input without dropout in one parallel loop over the
// channels: a channel's sums (ncs_channel_sums, as bwd_reduce_kernel takes them), then at once
// its grad_x / grad_residual rows (elemt_span, as bwd_elemt_kernel computes them), while the
// channel's dy, x (and residual) rows are still in the core's cache: the second read of each
// tensor comes from L2 instead of memory (a 14x14 map's channel, 32 images: 25 KB a tensor in
// float32). The same expressions as the two ops, so the same values bit for bit.
template <Activation A, typename x_t>
void bwd_fused_ncs_kernel(const Layout& l, const BwdArgs<x_t>& a, double count, at::opmath_type<x_t>* sum_dz,
                          at::opmath_type<x_t>* sum_dzx, x_t* gx, x_t* gr) {
  using acc_t = at::opmath_type<x_t>;
  const int64_t C = l.C, S = l.S;
  const x_t* rbase = a.r ? a.r : a.x;
  const acc_t rf = a.r ? acc_t(1) : acc_t(0);
  const acc_t n = static_cast<acc_t>(count);
  auto run = [&](auto gx_mode, auto with_gr) {
    constexpr GxMode GX = decltype(gx_mode)::value;
    constexpr bool GR = decltype(with_gr)::value;
    // bfloat16 rows in registers (elemt_ncs_bf16_channel): m1, m2 by channel
    const bool regs = ncs_regs_bf16<x_t>(l);
    std::vector<acc_t> m1(regs ? C : 0), m2(regs ? C : 0);
    at::parallel_for(0, C, 1, [&](int64_t c0, int64_t c1) {
      Lanes<acc_t, kLanes2<acc_t>> l1, l2;
      StageBuf stage;
      for (int64_t c = c0; c < c1; ++c) {
        acc_t s1 = 0, s2 = 0;
        dispatch_isa([&](auto) FUSEDREG_ALWAYS_INLINE {
          ncs_channel_sums<A>(l, a, c, l1, l2, s1, s2, stage);
          if (regs) return;  // (below)
          const acc_t q1 = s1 / n, q2 = s2 / n;  // m1, m2 as bwd_elemt_cpu divides them
          for (int64_t i = 0; i < l.N; ++i) {
            alignas(64) x_t tr[kFlat];
            row_in_flat_steps<x_t>(l, (i * C + c) * S, [&](int64_t off, int64_t len, x_t* tx) FUSEDREG_ALWAYS_INLINE {
              // the masked step: grad_x into tx, grad_residual into tr (copied with tx's elements)
              elemt_span<A, false, GX, GR>(a.dy + off, a.x + off, rbase + off, rf, len, a.mean + c, a.invstd + c,
                                           a.scale + c, a.shift + c, &q1, &q2,
                                           GX == GxMode::kNone ? nullptr : (tx ? tx : gx + off),
                                           GR ? (tx ? tr : gr + off) : nullptr);
            }, [&](int64_t off, int64_t lo, int64_t hi, const x_t* tx) FUSEDREG_ALWAYS_INLINE {
              if (GX != GxMode::kNone) put_range(gx + off, tx, lo, hi);
              if (GR) put_range(gr + off, static_cast<const x_t*>(tr), lo, hi);
            });
          }
        });
        if constexpr (std::is_same_v<x_t, c10::BFloat16>) {
          if (regs) {
            m1[c] = s1 / n;
            m2[c] = s2 / n;
            elemt_ncs_bf16_channel<A, GX, GR>(l, ElemtRegsArgs<x_t>{a.dy, a.x, rbase, rf, a.mean, a.invstd, a.scale,
                                                                    a.shift, m1.data(), m2.data(), gx, gr}, c);
          }
        }
        sum_dz[c] = s1;
        sum_dzx[c] = s2;
      }
    });
  };
  using Train = std::integral_constant<GxMode, GxMode::kTrain>;
  using NoGx = std::integral_constant<GxMode, GxMode::kNone>;
  if (gx && gr) {
    run(Train{}, std::true_type{});
  } else if (gx) {
    run(Train{}, std::false_type{});
  } else {
    run(NoGx{}, std::true_type{});
  }
}

// grad_residual = dz; grad_x = scale * (dz - m1 - xhat * m2) (training; m1 = sum_dz / count,
// m2 = sum_dzx / count), scale * dz (eval).
template <Activation A, typename x_t>
void bwd_elemt_kernel(const Layout& l, const BwdArgs<x_t>& a, const at::opmath_type<x_t>* m1,
                      const at::opmath_type<x_t>* m2, bool training, x_t* gx, x_t* gr) {
  using acc_t = at::opmath_type<x_t>;
  const bool drop = a.p > 0.0f;
  const int64_t len = l.row_len();
  if (!drop) {  // one loop per row, no row buffers
    const x_t* rbase = a.r ? a.r : a.x;
    const acc_t rf = a.r ? acc_t(1) : acc_t(0);
    auto run = [&](auto gx_mode, auto with_gr) {
      constexpr GxMode GX = decltype(gx_mode)::value;
      constexpr bool GR = decltype(with_gr)::value;
      if constexpr (std::is_same_v<x_t, c10::BFloat16>) {
        if (ncs_regs_bf16<x_t>(l)) {  // bfloat16 NCS rows in registers
          elemt_ncs_bf16<A, GX, GR>(l, ElemtRegsArgs<x_t>{a.dy, a.x, rbase, rf, a.mean, a.invstd, a.scale, a.shift,
                                                          GX == GxMode::kTrain ? m1 : nullptr,
                                                          GX == GxMode::kTrain ? m2 : nullptr, gx, gr});
          return;
        }
      }
      if (!l.cl && l.S >= kFlat) {  // NCS rows as one flat run (ncs_flat)
        for_each_row_chunk(l, [&](int64_t r0, int64_t r1) {
          dispatch_isa([&](auto) FUSEDREG_ALWAYS_INLINE {
            ncs_flat(
                l, r0, r1,
                [&](int64_t off, int64_t n, int64_t c) FUSEDREG_ALWAYS_INLINE {
                  elemt_span_any<A, false, GX, GR>(a.dy + off, a.x + off, rbase + off, rf, n, a.mean + c, a.invstd + c,
                                               a.scale + c, a.shift + c, GX == GxMode::kTrain ? m1 + c : nullptr,
                                               GX == GxMode::kTrain ? m2 + c : nullptr, gx ? gx + off : nullptr,
                                               GR ? gr + off : nullptr);
                },
                [&](int64_t off, int64_t rem, int64_t c, int64_t cn) FUSEDREG_ALWAYS_INLINE {
                  alignas(64) acc_t mu[kFlat], inv[kFlat], k[kFlat], b[kFlat], q1[kFlat], q2[kFlat];
                  straddle_values(a.mean, rem, c, cn, mu);
                  straddle_values(a.invstd, rem, c, cn, inv);
                  straddle_values(a.scale, rem, c, cn, k);
                  straddle_values(a.shift, rem, c, cn, b);
                  if (GX == GxMode::kTrain) {
                    straddle_values(m1, rem, c, cn, q1);
                    straddle_values(m2, rem, c, cn, q2);
                  }
                  elemt_span_any<A, true, GX, GR>(a.dy + off, a.x + off, rbase + off, rf, kFlat, mu, inv, k, b, q1, q2,
                                              gx ? gx + off : nullptr, GR ? gr + off : nullptr);
                });
          });
        }, kFlat);
        return;
      }
      for_each_row_chunk(l, [&](int64_t r0, int64_t r1) {
        dispatch_isa([&](auto) FUSEDREG_ALWAYS_INLINE {
          int64_t cn = l.channel(r0);  // NCS: the row's channel, stepped (not a division per row)
          int64_t row = r0;
          if (l.cl) {  // kRows rows a step (elemt_rows), the chunk's last rows one by one below
            const acc_t* q1 = GX == GxMode::kTrain ? m1 : nullptr;
            const acc_t* q2 = GX == GxMode::kTrain ? m2 : nullptr;
            auto step = [&](auto rows) FUSEDREG_ALWAYS_INLINE {
              constexpr int R = decltype(rows)::value;
              for (; row + R <= r1; row += R) {
                const int64_t off = row * len;
                elemt_rows_any<R, A, GX, GR>(a.dy + off, a.x + off, rbase + off, rf, len, a.mean, a.invstd, a.scale,
                                         a.shift, q1, q2, gx ? gx + off : nullptr, GR ? gr + off : nullptr);
              }
            };
            if (four_rows(len)) {
              step(std::integral_constant<int, 4>{});
            } else {
              step(std::integral_constant<int, 2>{});
            }
          }
          for (; row < r1; ++row) {
            const int64_t off = row * len;
            const int64_t c = cn;
            if (!l.cl && ++cn == l.C) cn = 0;
            const acc_t* q1 = GX == GxMode::kTrain ? m1 + c : nullptr;
            const acc_t* q2 = GX == GxMode::kTrain ? m2 + c : nullptr;
            if (l.cl) {
              elemt_span_any<A, true, GX, GR>(a.dy + off, a.x + off, rbase + off, rf, len, a.mean, a.invstd, a.scale,
                                          a.shift, q1, q2, gx ? gx + off : nullptr, GR ? gr + off : nullptr);
            } else {
              elemt_span_any<A, false, GX, GR>(a.dy + off, a.x + off, rbase + off, rf, len, a.mean + c, a.invstd + c,
                                           a.scale + c, a.shift + c, q1, q2, gx ? gx + off : nullptr,
                                           GR ? gr + off : nullptr);
            }
          }
        });
      });
    };
    using Train = std::integral_constant<GxMode, GxMode::kTrain>;
    using Eval = std::integral_constant<GxMode, GxMode::kEval>;
    using NoGx = std::integral_constant<GxMode, GxMode::kNone>;
    if (gx && gr) {
      training ? run(Train{}, std::true_type{}) : run(Eval{}, std::true_type{});
    } else if (gx) {
      training ? run(Train{}, std::false_type{}) : run(Eval{}, std::false_type{});
    } else {
      run(NoGx{}, std::true_type{});
    }
    return;
  }
  for_each_row_chunk(l, [&](int64_t r0, int64_t r1) {
    KeepScale keep(len);
    std::vector<acc_t> g(len), xh(len);
    acc_t* gg = g.data();
    acc_t* xx = xh.data();
    dispatch_isa([&](auto) FUSEDREG_ALWAYS_INLINE {
      for (int64_t row = r0; row < r1; ++row) {
        const int64_t off = row * len;
        const int64_t cc = l.cl ? 0 : l.channel(row);
        dz_row<A>(l, a, row, keep.row(l, drop, a.seed, a.p, row), gg, xx);
        if (gr) {
          x_t* o = gr + off;
#pragma omp simd
          for (int64_t j = 0; j < len; ++j) o[j] = from_acc<x_t>(gg[j]);
        }
        if (!gx) continue;
        x_t* o = gx + off;
        const acc_t* k = a.scale + cc;
        if (training) {
          const acc_t* q1 = m1 + cc;
          const acc_t* q2 = m2 + cc;
          if (l.cl) {
#pragma omp simd
            for (int64_t j = 0; j < len; ++j) o[j] = from_acc<x_t>(k[j] * (gg[j] - q1[j] - xx[j] * q2[j]));
          } else {
            const acc_t kk = k[0], a1 = q1[0], a2 = q2[0];
#pragma omp simd
            for (int64_t j = 0; j < len; ++j) o[j] = from_acc<x_t>(kk * (gg[j] - a1 - xx[j] * a2));
          }
        } else if (l.cl) {
#pragma omp simd
          for (int64_t j = 0; j < len; ++j) o[j] = from_acc<x_t>(k[j] * gg[j]);
        } else {
          const acc_t kk = k[0];
#pragma omp simd
          for (int64_t j = 0; j < len; ++j) o[j] = from_acc<x_t>(kk * gg[j]);
        }
      }
    });
  });
}

// ---- the ops -----------------------------------------------------------------------------------

std::tuple<at::Tensor, at::Tensor> batch_norm_stats_cpu(const at::Tensor& x_in, bool channels_last) {
  BnStatsIO io = bn_stats_io(x_in, channels_last, at::kCPU);
  if (io.empty) return {io.mean, io.var};
  const Layout l{io.d.N, io.d.C, io.d.S, channels_last};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, io.x.scalar_type(), "batch_norm_stats", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    stats_kernel<scalar_t>(l, io.x.const_data_ptr<scalar_t>(), io.mean.mutable_data_ptr<acc_t>(),
                           io.var.mutable_data_ptr<acc_t>());
  });
  return {io.mean, io.var};
}

// The checked, contiguous inputs of the element-wise ops, as bn_inputs
// (csrc/include/fusedreg/batch_norm_host.h) checks them, but with the per-channel affine map left
// to the kernel call (Affine, below: one host loop over C instead of the two or three small
// tensor ops bn_affine runs, a sizable part of a small batch's time) and the seed read from its
// CPU storage directly.
struct CpuBnInputs {
  at::Tensor dy, x, residual, weight, bias, mean, invstd;
  BnDims d;
  uint64_t seed;
};

CpuBnInputs cpu_bn_inputs(const at::Tensor* dy, const at::Tensor& x_in, const std::optional<at::Tensor>& residual_in,
                          const std::optional<at::Tensor>& weight_in, const std::optional<at::Tensor>& bias_in,
                          const at::Tensor& mean_in, const at::Tensor& invstd_in, int64_t activation,
                          const at::Tensor& seed, bool channels_last) {
  bn_check_x(x_in, at::kCPU);
  CpuBnInputs b;
  b.d = bn_dims(x_in, channels_last);
  b.x = x_in.contiguous();
  if (dy != nullptr) b.dy = bn_like_x(*dy, "dy", b.x);
  b.residual = bn_like_x(residual_in, "residual", b.x);
  b.weight = bn_vec(weight_in, "weight", b.x, b.d.C);
  b.bias = bn_vec(bias_in, "bias", b.x, b.d.C);
  b.mean = bn_vec(mean_in, "mean", b.x, b.d.C);
  b.invstd = bn_vec(invstd_in, "invstd", b.x, b.d.C);
  TORCH_CHECK(activation >= 0 && activation <= 4, "fusedreg::batch_norm: unknown activation code ",
              activation);
  TORCH_CHECK(seed.device().is_cpu() && seed.scalar_type() == at::kLong && seed.numel() == 1,
              "fusedreg::batch_norm: seed must be a 1-element int64 CPU tensor");
  b.seed = static_cast<uint64_t>(*seed.const_data_ptr<int64_t>());
  return b;
}

// z = (x - mean) * scale + shift: scale = invstd * weight (invstd without a weight), shift = bias
// (0 without one); the same products bn_affine's tensor multiply rounds.
template <typename acc_t>
struct Affine {
  std::vector<acc_t> scale, shift;
  explicit Affine(const CpuBnInputs& b) : scale(b.d.C), shift(b.d.C) {
    const int64_t C = b.d.C;
    const acc_t* inv = b.invstd.const_data_ptr<acc_t>();
    const acc_t* w = b.weight.defined() ? b.weight.const_data_ptr<acc_t>() : nullptr;
    const acc_t* bb = b.bias.defined() ? b.bias.const_data_ptr<acc_t>() : nullptr;
    for (int64_t c = 0; c < C; ++c) {
      scale[c] = w ? inv[c] * w[c] : inv[c];
      shift[c] = bb ? bb[c] : acc_t(0);
    }
  }
};

inline Layout layout_of(const CpuBnInputs& b, bool channels_last) {
  return Layout{b.d.N, b.d.C, b.d.S, channels_last};
}

at::Tensor batch_norm_fwd_cpu(const at::Tensor& x_in, const std::optional<at::Tensor>& residual_in,
                              const std::optional<at::Tensor>& weight_in, const std::optional<at::Tensor>& bias_in,
                              const at::Tensor& mean_in, const at::Tensor& invstd_in, int64_t activation,
                              double p, const at::Tensor& seed, bool channels_last) {
  const CpuBnInputs b = cpu_bn_inputs(nullptr, x_in, residual_in, weight_in, bias_in, mean_in, invstd_in, activation,
                                      seed, channels_last);
  at::Tensor y = empty_output(b.x.sizes(), b.x.options());
  if (b.x.numel() == 0) return y;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, b.x.scalar_type(), "batch_norm_fwd", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const Affine<acc_t> af(b);
    FUSEDREG_DISPATCH_ACTIVATION(static_cast<Activation>(activation), A, [&] {
      forward_kernel<A, scalar_t>(layout_of(b, channels_last), b.x.const_data_ptr<scalar_t>(),
                                  b.residual.defined() ? b.residual.const_data_ptr<scalar_t>() : nullptr,
                                  y.mutable_data_ptr<scalar_t>(), b.mean.const_data_ptr<acc_t>(),
                                  af.scale.data(), af.shift.data(), static_cast<float>(p), b.seed);
    });
  });
  return y;
}

template <typename x_t>
BwdArgs<x_t> bwd_args(const CpuBnInputs& b, const Affine<at::opmath_type<x_t>>& af, double p) {
  using acc_t = at::opmath_type<x_t>;
  return BwdArgs<x_t>{b.dy.const_data_ptr<x_t>(), b.x.const_data_ptr<x_t>(),
                      b.residual.defined() ? b.residual.const_data_ptr<x_t>() : nullptr,
                      b.mean.const_data_ptr<acc_t>(), b.invstd.const_data_ptr<acc_t>(),
                      af.scale.data(), af.shift.data(), static_cast<float>(p), b.seed};
}

std::tuple<at::Tensor, at::Tensor> batch_norm_bwd_reduce_cpu(
    const at::Tensor& dy, const at::Tensor& x, const std::optional<at::Tensor>& residual,
    const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias, const at::Tensor& mean,
    const at::Tensor& invstd, int64_t activation, double p, const at::Tensor& seed, bool channels_last) {
  const CpuBnInputs b = cpu_bn_inputs(&dy, x, residual, weight, bias, mean, invstd, activation, seed, channels_last);
  if (b.x.numel() == 0) return {at::zeros({b.d.C}, b.mean.options()), at::zeros({b.d.C}, b.mean.options())};
  at::Tensor sum_dz = at::empty({b.d.C}, b.mean.options());  // the kernel writes every channel
  at::Tensor sum_dzx = at::empty({b.d.C}, b.mean.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, b.x.scalar_type(), "batch_norm_bwd_reduce", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const Affine<acc_t> af(b);
    FUSEDREG_DISPATCH_ACTIVATION(static_cast<Activation>(activation), A, [&] {
      bwd_reduce_kernel<A, scalar_t>(layout_of(b, channels_last), bwd_args<scalar_t>(b, af, p),
                                     sum_dz.mutable_data_ptr<acc_t>(), sum_dzx.mutable_data_ptr<acc_t>());
    });
  });
  return {sum_dz, sum_dzx};
}

// grad_x and grad_residual of a backward op, each empty where it is not needed.
std::pair<at::Tensor, at::Tensor> grad_outputs(const CpuBnInputs& b, bool need_grad_input, bool need_grad_residual) {
  const auto make = [&](bool need) {
    return need ? empty_output(b.x.sizes(), b.x.options()) : at::empty({0}, b.x.options());
  };
  return {make(need_grad_input), make(need_grad_residual)};
}

// The means m1 = sum_dz / count and m2 = sum_dz_xhat / count per channel that the element-wise
// backward takes (what `s / count` gives: ATen divides a float tensor by the scalar cast to
// float), here rather than as two more tensor ops.
template <typename acc_t>
std::pair<std::vector<acc_t>, std::vector<acc_t>> channel_means(const acc_t* s1, const acc_t* s2, int64_t C,
                                                                double count) {
  const acc_t n = static_cast<acc_t>(count);
  std::vector<acc_t> m1(C), m2(C);
  for (int64_t c = 0; c < C; ++c) {
    m1[c] = s1[c] / n;
    m2[c] = s2[c] / n;
  }
  return {std::move(m1), std::move(m2)};
}

std::tuple<at::Tensor, at::Tensor> batch_norm_bwd_elemt_cpu(
    const at::Tensor& dy, const at::Tensor& x, const std::optional<at::Tensor>& residual,
    const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias, const at::Tensor& mean,
    const at::Tensor& invstd, const at::Tensor& sum_dz_in, const at::Tensor& sum_dzx_in, double count,
    int64_t activation, double p, const at::Tensor& seed, bool channels_last, bool training,
    bool need_grad_input, bool need_grad_residual) {
  const CpuBnInputs b = cpu_bn_inputs(&dy, x, residual, weight, bias, mean, invstd, activation, seed, channels_last);
  auto [gx, gr] = grad_outputs(b, need_grad_input, need_grad_residual);
  if (b.x.numel() == 0 || !(need_grad_input || need_grad_residual)) return {gx, gr};
  at::Tensor s1, s2;
  const bool use_sums = training && need_grad_input;
  if (use_sums) {
    TORCH_CHECK(count > 0, "fusedreg::batch_norm_bwd_elemt: count must be positive in training");
    s1 = bn_vec(sum_dz_in, "sum_dz", b.x, b.d.C);
    s2 = bn_vec(sum_dzx_in, "sum_dz_xhat", b.x, b.d.C);
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, b.x.scalar_type(), "batch_norm_bwd_elemt", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    std::vector<acc_t> m1, m2;
    if (use_sums) {
      std::tie(m1, m2) = channel_means(s1.const_data_ptr<acc_t>(), s2.const_data_ptr<acc_t>(), b.d.C, count);
    }
    const Affine<acc_t> af(b);
    FUSEDREG_DISPATCH_ACTIVATION(static_cast<Activation>(activation), A, [&] {
      bwd_elemt_kernel<A, scalar_t>(layout_of(b, channels_last), bwd_args<scalar_t>(b, af, p),
                                    use_sums ? m1.data() : nullptr, use_sums ? m2.data() : nullptr, use_sums,
                                    need_grad_input ? gx.mutable_data_ptr<scalar_t>() : nullptr,
                                    need_grad_residual ? gr.mutable_data_ptr<scalar_t>() : nullptr);
    });
  });
  return {gx, gr};
}

// grad_x of CL storage from dz as the reduce pass wrote it (float and wider: dz exactly):
// scale * (dz - m1 - xhat * m2), xhat = (x - mean) * invstd -- elemt_span's expression, so the
// same values -- reading dz and x (two tensors) instead of dy, x and the residual (three).
template <typename x_t>
void gx_from_dz_cl_kernel(const Layout& l, const x_t* dz, const x_t* x, const at::opmath_type<x_t>* mean,
                          const at::opmath_type<x_t>* invstd, const at::opmath_type<x_t>* scale,
                          const at::opmath_type<x_t>* m1, const at::opmath_type<x_t>* m2, x_t* gx) {
  using acc_t = at::opmath_type<x_t>;
  const int64_t len = l.row_len();
  for_each_row_chunk(l, [&](int64_t r0, int64_t r1) {
    dispatch_isa([&](auto) FUSEDREG_ALWAYS_INLINE {
      int64_t row = r0;
      // R rows a step, each channel's values loaded once for them (as elemt_rows)
      auto step = [&](auto rows) FUSEDREG_ALWAYS_INLINE {
        constexpr int R = decltype(rows)::value;
        for (; row + R <= r1; row += R) {
          const int64_t off = row * len;
          const x_t* g = dz + off;
          const x_t* xr = x + off;
          x_t* o = gx + off;
#pragma omp simd
          for (int64_t j = 0; j < len; ++j) {
            const acc_t mu = mean[j], inv = invstd[j], k = scale[j], a1 = m1[j], a2 = m2[j];
#pragma GCC unroll 4
            for (int i = 0; i < R; ++i) {
              const int64_t q = i * len + j;
              const acc_t d = to_acc<acc_t>(xr[q]) - mu;
              const acc_t xhat = d * inv;
              o[q] = from_acc<x_t>(k * (to_acc<acc_t>(g[q]) - a1 - xhat * a2));
            }
          }
        }
      };
      if (four_rows(len)) {
        step(std::integral_constant<int, 4>{});
      } else {
        step(std::integral_constant<int, 2>{});
      }
      for (; row < r1; ++row) {
        const int64_t off = row * len;
        const x_t* g = dz + off;
        const x_t* xr = x + off;
        x_t* o = gx + off;
#pragma omp simd
        for (int64_t j = 0; j < len; ++j) {
          const acc_t d = to_acc<acc_t>(xr[j]) - mean[j];
          const acc_t xhat = d * invstd[j];
          o[j] = from_acc<x_t>(scale[j] * (to_acc<acc_t>(g[j]) - m1[j] - xhat * m2[j]));
        }
      }
    });
  });
}

// The per-channel ops (batch_norm_fwd_ncs / batch_norm_bwd_ncs) spread channels over the
// threads: with fewer than four channels a thread, they run the two passes instead (the same
// kernels as the four ops, so the same values), whose element-wise pass spreads rows. So do
// 16-bit inputs: their passes are bound by the conversions' arithmetic rather than by memory,
// and the element-wise pass over rows as one flat run (ncs_flat) costs less than row by row
// (one thread, CPU time, (32, 256, 196) bfloat16 relu + residual: forward 0.28 against 0.30
// ns/element, backward 0.49-0.51 against 0.51-0.53; float32 the other way, 0.34 against 0.30
// and 0.64-0.67 against 0.57-0.59) -- except the bfloat16 backward whose rows the register
// pass takes (ncs_regs_bf16): with grad_x and grad_residual rounded by vcvtne2ps2bf16 its
// element-wise work no longer outweighs the second read of dy, x and the residual from memory,
// which the per-channel op takes from the core's cache (Intel Xeon VM, the op alone, min of
// 40 calls, relu + residual, alternating processes; two passes in registers against per
// channel, ms: (32, 256, 196) 0.59-0.67 against 0.60-0.61 on two threads, 1.24 against
// 0.97-1.07 on one; (32, 64, 3136) 1.92-1.99 against 1.62-1.71 and 4.06-4.39 against
// 3.49-3.90; (16, 128, 784) 0.52-0.53 against 0.45-0.50 and 1.03-1.05 against 0.80-0.85).
template <typename x_t>
inline bool two_passes(const Layout& l, bool bwd = false) {
  if (l.C < 4 * static_cast<int64_t>(at::get_num_threads())) return true;
  return sizeof(x_t) < 4 && !(bwd && ncs_regs_bf16<x_t>(l));
}

// batch_norm_fwd_ncs: the training forward (x stored (N, C, S), no dropout) in one op -- (y,
// mean, var, invstd), what batch_norm_stats, invstd = torch.rsqrt(var + eps) and batch_norm_fwd
// give, bit for bit (forward_train_ncs_kernel). CPU only, like batch_norm_bwd_ncs.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> batch_norm_fwd_ncs_cpu(
    const at::Tensor& x_in, const std::optional<at::Tensor>& residual_in, const std::optional<at::Tensor>& weight_in,
    const std::optional<at::Tensor>& bias_in, double eps, int64_t activation) {
  BnStatsIO io = bn_stats_io(x_in, false, at::kCPU);
  at::Tensor invstd = at::empty_like(io.mean);
  at::Tensor y = empty_output(io.x.sizes(), io.x.options());
  const at::Tensor residual = bn_like_x(residual_in, "residual", io.x);
  const at::Tensor weight = bn_vec(weight_in, "weight", io.x, io.d.C);
  const at::Tensor bias = bn_vec(bias_in, "bias", io.x, io.d.C);
  TORCH_CHECK(activation >= 0 && activation <= 4, "fusedreg::batch_norm: unknown activation code ", activation);
  if (io.empty) {
    invstd.fill_(NAN);
    return {y, io.mean, io.var, invstd};
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, io.x.scalar_type(), "batch_norm_fwd_ncs", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    FUSEDREG_DISPATCH_ACTIVATION(static_cast<Activation>(activation), A, [&] {
      const Layout l{io.d.N, io.d.C, io.d.S, false};
      const scalar_t* x = io.x.const_data_ptr<scalar_t>();
      const scalar_t* r = residual.defined() ? residual.const_data_ptr<scalar_t>() : nullptr;
      const acc_t* w = weight.defined() ? weight.const_data_ptr<acc_t>() : nullptr;
      const acc_t* bb = bias.defined() ? bias.const_data_ptr<acc_t>() : nullptr;
      acc_t* mean = io.mean.mutable_data_ptr<acc_t>();
      acc_t* var = io.var.mutable_data_ptr<acc_t>();
      acc_t* inv = invstd.mutable_data_ptr<acc_t>();
      if (small_channels<scalar_t>(l) && l.C >= 4 * static_cast<int64_t>(at::get_num_threads())) {
        forward_train_small_kernel<A, scalar_t>(l, x, r, y.mutable_data_ptr<scalar_t>(), w, bb, eps, mean, var, inv);
        return;
      }
      if (two_passes<scalar_t>(l)) {  // the two passes, each over every thread
        stats_kernel<scalar_t>(l, x, mean, var);
        std::vector<acc_t> scale(l.C), shift(l.C);
        const acc_t e = static_cast<acc_t>(eps);
        for (int64_t c = 0; c < l.C; ++c) {
          inv[c] = acc_t(1) / std::sqrt(var[c] + e);
          scale[c] = w ? inv[c] * w[c] : inv[c];
          shift[c] = bb ? bb[c] : acc_t(0);
        }
        forward_kernel<A, scalar_t>(l, x, r, y.mutable_data_ptr<scalar_t>(), mean, scale.data(), shift.data(), 0.0f, 0);
        return;
      }
      forward_train_ncs_kernel<A, scalar_t>(l, x, r, y.mutable_data_ptr<scalar_t>(), w, bb, eps, mean, var, inv);
    });
  });
  return {y, io.mean, io.var, invstd};
}

// The frame of the one-op training backwards without dropout (batch_norm_bwd_ncs / _cl): the
// inputs' checks, the outputs (sum_dz, sum_dz_xhat, grad_x, grad_residual; the sums written
// whole by the passes), the empty case, the dtype and activation dispatch; `passes` is a
// template lambda <Activation A, typename scalar_t>(layout, args, count, s1, s2, grad_x,
// grad_residual) that runs the passes (grad pointers null where not asked for).
constexpr char kBwdNcs[] = "batch_norm_bwd_ncs";
constexpr char kBwdCl[] = "batch_norm_bwd_cl";

template <const char* kName, typename Passes>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> one_op_backward(
    bool channels_last, const at::Tensor& dy, const at::Tensor& x,
    const std::optional<at::Tensor>& residual, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, const at::Tensor& mean, const at::Tensor& invstd, int64_t activation,
    const at::Tensor& seed, bool need_grad_input, bool need_grad_residual, const Passes& passes) {
  const CpuBnInputs b = cpu_bn_inputs(&dy, x, residual, weight, bias, mean, invstd, activation, seed, channels_last);
  auto [gx, gr] = grad_outputs(b, need_grad_input, need_grad_residual);
  if (b.x.numel() == 0) {
    return {at::zeros({b.d.C}, b.mean.options()), at::zeros({b.d.C}, b.mean.options()), gx, gr};
  }
  at::Tensor sum_dz = at::empty({b.d.C}, b.mean.options());  // the passes write every channel
  at::Tensor sum_dzx = at::empty({b.d.C}, b.mean.options());
  const double count = static_cast<double>(b.d.N * b.d.S);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, b.x.scalar_type(), kName, [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const Affine<acc_t> af(b);
    FUSEDREG_DISPATCH_ACTIVATION(static_cast<Activation>(activation), A, [&] {
      passes.template operator()<A, scalar_t>(
          layout_of(b, channels_last), bwd_args<scalar_t>(b, af, 0.0), count, sum_dz.mutable_data_ptr<acc_t>(),
          sum_dzx.mutable_data_ptr<acc_t>(), need_grad_input ? gx.mutable_data_ptr<scalar_t>() : nullptr,
          need_grad_residual ? gr.mutable_data_ptr<scalar_t>() : nullptr);
    });
  });
  return {sum_dz, sum_dzx, gx, gr};
}

// batch_norm_bwd_ncs: the training backward (x stored (N, C, S), no dropout) in one op --
// (sum_dz, sum_dz_xhat, grad_x, grad_residual), the values batch_norm_bwd_reduce followed by
// batch_norm_bwd_elemt (count = N * S, training) give, bit for bit (bwd_fused_ncs_kernel). CPU
// only; fusedreg/ops/batch_norm.py calls it for the cpu backend's local (not SyncBatchNorm)
// backward and the two ops elsewhere.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> batch_norm_bwd_ncs_cpu(
    const at::Tensor& dy, const at::Tensor& x, const std::optional<at::Tensor>& residual,
    const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias, const at::Tensor& mean,
    const at::Tensor& invstd, int64_t activation, const at::Tensor& seed, bool need_grad_input,
    bool need_grad_residual) {
  return one_op_backward<kBwdNcs>(
      false, dy, x, residual, weight, bias, mean, invstd, activation, seed, need_grad_input,
      need_grad_residual,
      [&]<Activation A, typename scalar_t>(const Layout& l, const BwdArgs<scalar_t>& args, double count,
                                            at::opmath_type<scalar_t>* s1, at::opmath_type<scalar_t>* s2,
                                            scalar_t* pgx, scalar_t* pgr) {
        if (two_passes<scalar_t>(l, true)) {  // the two passes, each over every thread
          bwd_reduce_kernel<A, scalar_t>(l, args, s1, s2);
          if (pgx || pgr) {
            auto [m1, m2] = channel_means(s1, s2, l.C, count);
            bwd_elemt_kernel<A, scalar_t>(l, args, pgx ? m1.data() : nullptr, pgx ? m2.data() : nullptr,
                                          pgx != nullptr, pgx, pgr);
          }
          return;
        }
        bwd_fused_ncs_kernel<A, scalar_t>(l, args, count, s1, s2, pgx, pgr);
      });
}

// batch_norm_bwd_cl: the training backward of channels-last (N, S, C) storage without dropout
// in one op -- (sum_dz, sum_dz_xhat, grad_x, grad_residual), the values batch_norm_bwd_reduce
// followed by batch_norm_bwd_elemt (count = N * S, training) give, bit for bit (but the
// in-place grad_x below: the two-op loop may contract dy * act' - m1 into one FMA). With both
// gradients of a float (or double) input the reduce pass also writes dz, which is
// grad_residual, and grad_x is then computed from it and x (gx_from_dz_cl_kernel): the
// element-wise pass reads two tensors instead of three (dy, x, residual) and evaluates no
// activation. With grad_x alone and silu, gelu or gelu_tanh, whose act' costs more than a
// tensor's write and read (gelu's about 0.6 ns an element a thread on the AMD machine), the
// reduce pass writes dz into grad_x's buffer and the second pass turns it into grad_x in place.
// Otherwise (16-bit dz would be rounded, relu or no activation with one gradient) the two
// passes as the two ops run them. CPU only, like batch_norm_bwd_ncs.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> batch_norm_bwd_cl_cpu(
    const at::Tensor& dy, const at::Tensor& x, const std::optional<at::Tensor>& residual,
    const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias, const at::Tensor& mean,
    const at::Tensor& invstd, int64_t activation, const at::Tensor& seed, bool need_grad_input,
    bool need_grad_residual) {
  return one_op_backward<kBwdCl>(
      true, dy, x, residual, weight, bias, mean, invstd, activation, seed, need_grad_input,
      need_grad_residual,
      [&]<Activation A, typename scalar_t>(const Layout& l, const BwdArgs<scalar_t>& args, double count,
                                            at::opmath_type<scalar_t>* s1, at::opmath_type<scalar_t>* s2,
                                            scalar_t* pgx, scalar_t* pgr) {
        constexpr bool costly = A == Activation::kSilu || A == Activation::kGelu || A == Activation::kGeluTanh;
        const bool dz_pass = sizeof(scalar_t) >= 4 && pgx && (pgr || costly);
        scalar_t* gz = pgr ? pgr : pgx;  // where the reduce pass writes dz
        bwd_reduce_kernel<A, scalar_t>(l, args, s1, s2, dz_pass ? gz : nullptr);
        if (!(pgx || pgr)) return;
        auto [m1, m2] = channel_means(s1, s2, l.C, count);
        if (dz_pass) {  // (in place where gz is pgx: each element read, then written)
          gx_from_dz_cl_kernel<scalar_t>(l, gz, args.x, args.mean, args.invstd, args.scale, m1.data(), m2.data(),
                                         pgx);
          return;
        }
        bwd_elemt_kernel<A, scalar_t>(l, args, pgx ? m1.data() : nullptr, pgx ? m2.data() : nullptr,
                                      pgx != nullptr, pgx, pgr);
      });
}

}  // namespace

TORCH_LIBRARY_IMPL(fusedreg, CPU, m) {
  m.impl("batch_norm_stats", &batch_norm_stats_cpu);
  m.impl("batch_norm_fwd", &batch_norm_fwd_cpu);
  m.impl("batch_norm_bwd_reduce", &batch_norm_bwd_reduce_cpu);
  m.impl("batch_norm_bwd_elemt", &batch_norm_bwd_elemt_cpu);
  m.impl("batch_norm_fwd_ncs", &batch_norm_fwd_ncs_cpu);
  m.impl("batch_norm_bwd_ncs", &batch_norm_bwd_ncs_cpu);
  m.impl("batch_norm_bwd_cl", &batch_norm_bwd_cl_cpu);
}

}  // namespace fusedreg
