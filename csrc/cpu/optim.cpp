// CPU kernels of the fused optimizer steps (adam_step, sgd_step, lion_step).
//
// One call steps every tensor of the list: the tensors are cut into spans of kSpan elements,
// and the concatenated elements are split over the threads in equal contiguous shares
// (parallel_spans), so that many small tensors and one big tensor both use every core
// equally. Each span runs a simple loop of
// the per-element math of fusedreg/optim_math.h that the compiler vectorizes, at the CPU's
// instruction-set level (fusedreg/cpu/isa.h, dispatched once per span); 16-bit parameters at
// the AVX-512 level run that loop on register blocks of 16 converted values (blocks16_span).
#include <Python.h>

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/PythonTorchFunctionTLS.h>
#include <ATen/record_function.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <c10/core/impl/TorchDispatchModeTLS.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <bit>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <type_traits>
#include <vector>

#include "fusedreg/cpu/direct.h"
#include "fusedreg/cpu/half_convert.h"
#include "fusedreg/cpu/isa.h"
#include "fusedreg/macros.h"
#include "fusedreg/optim_args.h"

namespace fusedreg {
namespace {

using namespace fusedreg::optim;
using cpu::dispatch_isa;

constexpr int64_t kSpan = 1 << 15;  // elements per task: 128 KiB of fp32 per stream

struct Span {
  int64_t tensor, begin, end;
};

constexpr int64_t kCut = 64;  // a thread's share starts at a multiple of this in its tensor

// The spans of all tensors (at most kSpan elements each) and where each starts in the
// concatenation of the tensors (first[i]; first.back() = all elements).
// The threads split the elements, not the spans: thread t steps the concatenated elements
// [t·N/T, (t+1)·N/T), each boundary moved down to a multiple of kCut elements of its tensor,
// so that the shares are equal whatever the tensors' sizes (with 148 tensors of very
// different sizes, whole spans dealt out by count left one thread 2% more), and a list of
// at most kSpan elements runs on the calling thread without waking the thread pool.
// Every element is stepped by the same code at the same alignment as in a split at span
// boundaries: a share boundary is a multiple of kCut (a multiple of every vector width and
// of the 16-value blocks) from its tensor's start, as span boundaries are, so no element
// moves into a loop's scalar remainder. This stays here rather than in fusedreg/cpu/
// scheduler.h: it exists for the lists of tensors only the optimizers take, and a static
// split suits them, since they update tensors in place (no fresh pages to first-touch,
// which for_each_task's ranges are for).
struct Plan {
  std::vector<Span> spans;
  std::vector<int64_t> first;
};

Plan make_plan(at::TensorList params) {
  Plan plan;
  int64_t total = 0;
  for (size_t t = 0; t < params.size(); ++t) {
    const int64_t n = params[t].numel();
    for (int64_t b = 0; b < n; b += kSpan) {
      const int64_t e = std::min(n, b + kSpan);
      plan.spans.push_back({int64_t(t), b, e});
      plan.first.push_back(total);
      total += e - b;
    }
  }
  plan.first.push_back(total);
  return plan;
}

// Where the share of the element at concatenated position x begins: (span, offset in it),
// the offset moved down to a multiple of kCut (span begins are multiples of kSpan).
std::pair<int64_t, int64_t> share_boundary(const Plan& plan, int64_t x) {
  const int64_t n_spans = int64_t(plan.spans.size());
  if (x >= plan.first.back()) return {n_spans, 0};
  // the last span starting at or before x
  const int64_t i =
      int64_t(std::upper_bound(plan.first.begin(), plan.first.end() - 1, x) - plan.first.begin()) - 1;
  return {i, (x - plan.first[i]) / kCut * kCut};
}

// Runs fn(span) over all spans (pieces of them at the shares' boundaries), the threads
// taking equal contiguous shares of the elements.
template <typename F>
void parallel_spans(const Plan& plan, const F& fn) {
  const int64_t total = plan.first.back();
  // a thread per kSpan elements at most: lists of up to kSpan elements stay on this thread
  const int64_t n_threads = std::min<int64_t>(at::get_num_threads(), std::max<int64_t>(1, (total + kSpan - 1) / kSpan));
  auto run_share = [&](int64_t t) {
    const auto [b_span, b_off] = share_boundary(plan, t * total / n_threads);
    const auto [e_span, e_off] = share_boundary(plan, (t + 1) * total / n_threads);
    for (int64_t i = b_span; i <= e_span && i < int64_t(plan.spans.size()); ++i) {
      Span s = plan.spans[i];
      if (i == e_span) s.end = s.begin + e_off;
      if (i == b_span) s.begin += b_off;
      if (s.begin < s.end) fn(s);
    }
  };
  if (n_threads <= 1) return run_share(0);
  at::parallel_for(0, n_threads, 1, [&](int64_t b, int64_t e) {
    for (int64_t t = b; t < e; ++t) run_share(t);
  });
}

// ---- software prefetch -------------------------------------------------------------------
// A step streams its arrays once, in place. Once they outgrow the caches a core keeps (the
// benchmark's GPT-2-like list: 4 x 63 MB for float32 AdamW, in the last-level cache shared
// with other tenants and in DRAM) the hardware prefetchers alone keep too few lines in
// flight — they stop at every 4 KiB page and ramp up again, and Adam's per-element work (a
// square root and a division on the divider port) fills the out-of-order window so the
// demand misses of the next lines issue late. So each array's lines are prefetched into L2
// (prefetcht1) kPfAhead elements ahead: prefetched_blocks runs a span's loop in blocks of
// kPfBlock elements and, before each block, prefetches every array's lines of the block
// kPfAhead elements further on, within the tensor (across span boundaries, never past the
// tensor's end). One thread, 15.8M parameters in 148 tensors, CPU time, the candidates in
// random order, each timed warm (three runs on a machine loaded by other work): AdamW 14.5,
// 17.6, 11.2 ms without the prefetch, 10.6, 12.2, 11.5 with it (torch's fused 16.3, 18.6,
// 12.8); SGD with momentum 11.8, 11.0, 7.4 without, 7.7, 8.4, 6.3 with (torch's 12.1, 12.6,
// 8.7); at 1M parameters (arrays in the caches) the same within 1%. Into L2 (prefetcht1)
// rather than L1: 32 KiB ahead in four arrays would crowd a 48 KiB L1, and prefetcht0 was
// no faster; for AdamW 32 KiB ahead was faster than 16, 64 or 128 KiB (for SGD 64 KiB about
// the same).
// The loop body and the elements each instance steps are those of one loop over the span:
// the blocks start at multiples of kPfBlock (a multiple of every vector width) from the
// span's start, so the same elements go through the vector body and its remainder, and the
// results are the same bits (tests/test_optim.py checks positions and thread splits bit for
// bit). A prefetch never faults; the addresses are computed as integers so that one past an
// array's end is not a pointer either.
// Where the prefetch runs (prefetch_rule, found once per call): everywhere on an Intel CPU
// (the figures above; an unknown vendor is treated the same), but on an AMD CPU (Zen 4 EPYC,
// 1 MiB L2 per core, 32 MiB L3) the in-place loops run without it, one loop a span, and the
// 16-bit register blocks prefetch only when the step's arrays outgrow the L3 the core reads
// from (the cache-topology leaf's size of one L3, not glibc's sum over the package). There,
// medians of 12-25 interleaved rounds in one process, one thread (thread CPU time), a loaded
// machine, the prefetch off against the prefetch on: float32 SGD with momentum at 1M
// parameters 0.139-0.151 against 0.207-0.220 ms (torch's fused 0.176-0.201), at 15.8M in 148
// tensors 5.15 against 5.74 ms (torch's 5.33); float32 AdamW 0.271 against 0.301 ms at 1M,
// 8.30 against 8.96 at 15.8M (torch's 8.31); blocks without the prefetch were in between
// (0.177 ms at 1M: the blocking itself costs there), and no distance (2048 to 16384
// elements) or kind (prefetcht0/t2/nta) was faster than none. bfloat16 with float32 state
// (the register blocks) at 1M: SGD 0.101 against 0.112 ms (two threads), AdamW 0.360 against
// 0.374 (one); at 15.8M the prefetch still helps SGD (3.99 and 3.89 ms with, 4.48 and 4.25
// without, two runs) and is even for AdamW (7.04 against 7.13).
constexpr int64_t kPfBlock = 64;    // elements per block (4 cache lines of float32 an array)
constexpr int64_t kPfAhead = 8192;  // elements ahead (32 KiB of float32 an array)


// Where a call's spans prefetch (the rule above): loops = the in-place loops
// (prefetched_blocks), blocks16 = the 16-bit register blocks (blocks16_avx512).
struct PrefetchRule {
  bool loops, blocks16;
};

// bytes: the size of the step's arrays (its elements x the bytes an element has in p, g and
// the state).
inline PrefetchRule prefetch_rule(int64_t bytes) {
#if FUSEDREG_X86_DISPATCH
  static const bool amd = __builtin_cpu_is("amd");
  if (amd) return {false, bytes > cpu::l3_bytes()};
#endif
  (void)bytes;
  return {true, true};
}

// Prefetches into L2 the lines of elements [i, i + kPfBlock) of array a (nullptr: nothing).
template <typename T>
inline FUSEDREG_ALWAYS_INLINE void prefetch_block(const T* a, int64_t i) {
  if (a == nullptr) return;
  const uintptr_t base = reinterpret_cast<uintptr_t>(a) + uintptr_t(i) * sizeof(T);
  for (uintptr_t off = 0; off < uintptr_t(kPfBlock) * sizeof(T); off += 64) {
    __builtin_prefetch(reinterpret_cast<const void*>(base + off), 0, 2);
  }
}

// body(b, len) on the blocks [b, b + len) of a span's n elements, each array (the span's
// pointers) prefetched kPfAhead elements ahead while that stays inside the tensor: avail =
// the tensor's elements from the span's first on; avail = 0: no prefetch, body(0, n), one
// loop over the span.
template <typename Body, typename... A>
inline FUSEDREG_ALWAYS_INLINE void prefetched_blocks(int64_t n, int64_t avail, const Body& body,
                                                     const A*... arrays) {
  if (avail == 0) return body(0, n);
  for (int64_t b = 0; b < n; b += kPfBlock) {
    if (b + kPfAhead < avail) (prefetch_block(arrays, b + kPfAhead), ...);
    body(b, std::min(kPfBlock, n - b));
  }
}

// ---- element access ----------------------------------------------------------------------
// The loops read and write their arrays through these: float and double as they are, and
// bfloat16 through its bits — c10::BFloat16's own conversions (bf16 -> float: the bits
// shifted up; float -> bf16: round to nearest even, any NaN to 0x7FC0), written as integer
// operations the vectorizer takes (c10's go through memcpy and a branch on isnan, which kept
// these loops scalar: 5-25x slower than torch's fused optimizers on bf16). Bit for bit the
// same values. float16 arrays never reach the loops: half_span (below) converts them. At the
// AVX-512 level bfloat16 does not either (blocks16_span).
template <typename S, typename T>
inline FUSEDREG_ALWAYS_INLINE S load_as(const T* a, int64_t i) {
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    return std::bit_cast<float>(uint32_t(reinterpret_cast<const uint16_t*>(a)[i]) << 16);
  } else {
    static_assert(!std::is_same_v<T, c10::Half>, "float16 is stepped through half_span");
    return static_cast<S>(a[i]);
  }
}

template <typename T, typename S>
inline FUSEDREG_ALWAYS_INLINE void store_as(T* a, int64_t i, S v) {
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    const uint32_t u = std::bit_cast<uint32_t>(v);
    const uint32_t rounded = (u + (((u >> 16) & 1u) + 0x7FFFu)) >> 16;
    // NaN -> 0x7FC0 with a mask rather than a select: a second select after the L1 step's
    // kept the loop scalar
    const uint32_t nan = 0u - uint32_t((u & 0x7FFFFFFFu) > 0x7F800000u);
    reinterpret_cast<uint16_t*>(a)[i] = uint16_t(rounded ^ ((rounded ^ 0x7FC0u) & nan));
  } else {
    static_assert(!std::is_same_v<T, c10::Half>, "float16 is stepped through half_span");
    a[i] = static_cast<T>(v);
  }
}

// 16-bit spans at the AVX-512 level (blocks16_span, below; float16 and bfloat16): one pass
// over blocks of 16 elements, each array's block converted to float in registers (c10's
// values bit for bit: vcvtph2ps / vcvtps2ph with NaN lanes made sign | 0x7E00; bfloat16 by
// the integer formulas of load_as / store_as), stepped by the same float32 loop on those 16
// values, converted back and stored; a span's last n % 16 elements go through the same code
// on a zero-padded copy. One pass matters for float16 because AdamW's float32 step is bound
// by the divider (two divisions and a square root per element): conversions in the same loop
// run on the other ports while it works, where separate conversion passes (half_chunks)
// added their whole time to the step (fp16 AdamW with fp16 state was 0.53x torch's fused,
// which also converts in its loop). For bfloat16, a block's conversions are 512-bit integer
// operations where the vectorized in-place loops below use two 256-bit halves (bf16 SGD with
// bf16 state was 0.85-0.95x torch's fused).
// Below AVX-512 (or capped by FUSEDREG_CPU_ISA), bfloat16 runs the loops below in place, and
// float16 runs half_chunks: each chunk converted to float scratch (fusedreg/cpu/
// half_convert.h: the F16C instructions where the CPU has them, c10's values bit for bit),
// stepped by the float32 loops, converted back. Every path gives c10's values and the same
// float32 math: the same bits (tests/test_optim.py compares the levels). p and 16-bit state
// arrays are written back; g is only read; float32 state (the default) is stepped in its
// arrays (half_chunks) or loaded and stored with the block (blocks16_span).
constexpr int64_t kHalfChunk = 256;

template <typename M, size_t NS, typename Body>
inline void half_chunks(c10::Half* p, const c10::Half* g, const std::array<M*, NS>& state,
                        int64_t n, const Body& body) {
  alignas(64) float pf[kHalfChunk], gf[kHalfChunk];
  alignas(64) float sf[NS > 0 ? NS : 1][kHalfChunk];
  constexpr bool kHalfState = std::is_same_v<M, c10::Half>;
  for (int64_t b = 0; b < n; b += kHalfChunk) {
    const int64_t len = std::min(kHalfChunk, n - b);
    cpu::half_to_float(p + b, pf, len);
    cpu::half_to_float(g + b, gf, len);
    std::array<float*, NS> sp{};
    for (size_t k = 0; k < NS; ++k) {
      if (state[k] == nullptr) continue;
      if constexpr (kHalfState) {
        cpu::half_to_float(state[k] + b, sf[k], len);
        sp[k] = sf[k];
      } else {
        sp[k] = state[k] + b;
      }
    }
    dispatch_isa([&](auto isa) FUSEDREG_ALWAYS_INLINE { body(pf, gf, sp, len, isa); });
    cpu::half_from_float(pf, p + b, len);
    if constexpr (kHalfState) {
      for (size_t k = 0; k < NS; ++k) {
        if (state[k] != nullptr) cpu::half_from_float(sf[k], state[k] + b, len);
      }
    }
  }
}

#if FUSEDREG_X86_DISPATCH
// 16-bit parameters (float16, bfloat16; T) at the AVX-512 level: n (a multiple of 16) elements
// in blocks of 16, each block's arrays loaded and converted into pf, gf and sf (fusedreg/cpu/
// half_convert.h: load16, and store16; c10's values bit for bit), stepped by body(pf, gf, sp, 16,
// level tag) — inlined here, compiled for AVX-512, its loop of 16 one vector iteration — converted back
// and stored. The scratch arrays are locals the compiler keeps in registers. The body is
// taken by value and the ops' lambdas capture by value, so that their constants are locals
// here that no store can alias (kept in registers rather than reloaded after each block's
// stores). sp holds sf's rows whether a state array is present or not (the body reads only
// the ones it has), so that the compiler sees where they point. Every array is prefetched
// kPfAhead elements ahead (software prefetch, above) while that stays below avail, the
// tensor's elements from p on (0: no prefetch).
template <typename T, typename M, size_t NS, typename Body>
FUSEDREG_TARGET_AVX512 __attribute__((noinline)) void blocks16_avx512(
    T* p, const T* g, const std::array<M*, NS> state, int64_t n, const Body body, int64_t avail) {
  constexpr int64_t kB = cpu::kHalfBlock;
  alignas(64) float pf[kB], gf[kB];
  alignas(64) float sf[NS > 0 ? NS : 1][kB];
  std::array<float*, NS> sp{};
  for (size_t k = 0; k < NS; ++k) sp[k] = sf[k];
  for (int64_t b = 0; b < n; b += kB) {
    if (b % kPfBlock == 0 && b + kPfAhead < avail) {  // software prefetch (above)
      prefetch_block(p, b + kPfAhead);
      prefetch_block(g, b + kPfAhead);
      for (size_t k = 0; k < NS; ++k) prefetch_block(state[k], b + kPfAhead);
    }
    _mm512_store_ps(pf, cpu::load16(p + b));
    _mm512_store_ps(gf, cpu::load16(g + b));
    for (size_t k = 0; k < NS; ++k) {
      if (state[k] != nullptr) _mm512_store_ps(sf[k], cpu::load16(state[k] + b));
    }
    body(pf, gf, sp, std::integral_constant<int64_t, kB>{}, cpu::IsaTag<cpu::Isa::kAvx512>{});
    cpu::store16(p + b, _mm512_load_ps(pf));
    for (size_t k = 0; k < NS; ++k) {
      if (state[k] != nullptr) cpu::store16(state[k] + b, _mm512_load_ps(sf[k]));
    }
  }
}

// The last n % 16 elements: copied into zero-padded blocks of 16, stepped by the same
// blocks16_avx512 (the same machine code as every other block: a tail compiled apart may
// contract a different product into an FMA, and so round differently), copied back.
template <typename T, typename M, size_t NS, typename Body>
void tail16_avx512(T* p, const T* g, const std::array<M*, NS>& state, int64_t len,
                   const Body& body) {
  constexpr int64_t kB = cpu::kHalfBlock;
  T tp[kB] = {}, tg[kB] = {};
  M ts[NS > 0 ? NS : 1][kB] = {};
  std::array<M*, NS> tstate{};
  std::memcpy(tp, p, size_t(len) * sizeof(T));
  std::memcpy(tg, g, size_t(len) * sizeof(T));
  for (size_t k = 0; k < NS; ++k) {
    if (state[k] == nullptr) continue;
    std::memcpy(ts[k], state[k], size_t(len) * sizeof(M));
    tstate[k] = ts[k];
  }
  blocks16_avx512(tp, tg, tstate, kB, body, 0);
  std::memcpy(p, tp, size_t(len) * sizeof(T));
  for (size_t k = 0; k < NS; ++k) {
    if (state[k] != nullptr) std::memcpy(state[k], ts[k], size_t(len) * sizeof(M));
  }
}
#endif

// Whether 16-bit parameters are stepped in register blocks (blocks16_span).
inline bool use_blocks16() {
#if FUSEDREG_X86_DISPATCH
  return cpu::cpu_has_avx512();
#else
  return false;
#endif
}

// A span of 16-bit parameters in register blocks (only when use_blocks16()). body(pf, gf, sp,
// len, isa) runs the float32 loop on len values (len an integral_constant) compiled for the
// instruction-set level of the tag isa (cpu::IsaTag).
template <typename T, typename M, size_t NS, typename Body>
inline void blocks16_span(T* p, const T* g, const std::array<M*, NS>& state, int64_t n,
                          int64_t avail, const Body& body) {
#if FUSEDREG_X86_DISPATCH
  const int64_t full = n - n % cpu::kHalfBlock;
  if (full > 0) blocks16_avx512(p, g, state, full, body, avail);
  if (full < n) {
    std::array<M*, NS> rest{};
    for (size_t k = 0; k < NS; ++k) rest[k] = state[k] == nullptr ? nullptr : state[k] + full;
    tail16_avx512(p + full, g + full, rest, n - full, body);
  }
#endif
}

// A float16 span: blocks16_span at the AVX-512 level, else half_chunks.
template <typename M, size_t NS, typename Body>
inline void half_span(c10::Half* p, const c10::Half* g, const std::array<M*, NS>& state,
                      int64_t n, int64_t avail, const Body& body) {
  if (use_blocks16()) return blocks16_span(p, g, state, n, avail, body);
  half_chunks(p, g, state, n, body);
}

// ---- the loops (force-inlined into each instruction-set variant of the dispatch) --------
// p, g: parameter and gradient (T); m, v, vm / buf: state (M: S, or T when the state is kept
// in the parameter's dtype); math in S; n elements of the tensors' storage.
// RCP: sqrt(v) / bc2 through div_by_recip (fusedreg/optim_math.h) with rbc2 = 1 / bc2.
template <typename T, typename S, typename M, bool AMS, bool L1, bool RCP>
inline FUSEDREG_ALWAYS_INLINE void adam_loop(const AdamConsts<S>& cref, S nss, S bc2, S rbc2, T* p,
                                             const T* g, M* m, M* v, M* vm, int64_t n) {
  // A local copy: the constants cannot alias the stores, so they stay in registers and the
  // selects on them (lerp's form) are if-converted instead of blocking vectorization.
  const AdamConsts<S> c = cref;
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    S pv = load_as<S>(p, i), mv = load_as<S>(m, i), vv = load_as<S>(v, i);
    S vmv = AMS ? load_as<S>(vm, i) : S(0);
    adam_update<S, AMS, L1, RCP>(c, nss, bc2, pv, load_as<S>(g, i), mv, vv, vmv, rbc2);
    if constexpr (AMS) store_as(vm, i, vmv);
    store_as(m, i, mv);
    store_as(v, i, vv);
    store_as(p, i, pv);
  }
}

template <typename T, typename S, typename M, bool MOM, bool L1>
inline FUSEDREG_ALWAYS_INLINE void sgd_loop(const SgdConsts<S>& cref, T* p, const T* g, M* buf, int64_t n) {
  const SgdConsts<S> c = cref;
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    S pv = load_as<S>(p, i);
    S bv = MOM ? load_as<S>(buf, i) : S(0);
    sgd_update<S, MOM, L1>(c, pv, load_as<S>(g, i), &bv);
    if constexpr (MOM) store_as(buf, i, bv);
    store_as(p, i, pv);
  }
}

template <typename T, typename S, typename M, bool L1>
inline FUSEDREG_ALWAYS_INLINE void lion_loop(const LionConsts<S>& cref, T* p, const T* g, M* m, int64_t n) {
  const LionConsts<S> c = cref;
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    S pv = load_as<S>(p, i), mv = load_as<S>(m, i);
    lion_update<S, L1>(c, pv, load_as<S>(g, i), mv);
    store_as(m, i, mv);
    store_as(p, i, pv);
  }
}

// f(std::bool_constant<b>) for the runtime b: the loops' switches are template parameters.
template <typename F>
void with_bool(bool b, const F& f) {
  if (b) {
    f(std::true_type{});
  } else {
    f(std::false_type{});
  }
}

// with_bool for a switch that only float math has (S = double: always false, one instance).
template <typename S, typename F>
void with_float_bool(bool b, const F& f) {
  if constexpr (std::is_same_v<S, float>) {
    with_bool(b, f);
  } else {
    f(std::false_type{});
  }
}

// Whether the instruction-set level of a dispatch tag (cpu::IsaTag) has FMA (AVX2 and
// AVX-512 do).
template <typename Tag>
constexpr bool kHasFma = Tag::value != cpu::Isa::kBaseline;

// A span's pointer into the storage of list[s.tensor] (dense in any layout: the flat range
// from the data pointer).
template <typename S>
S* state_ptr(at::TensorList list, const Span& s) {
  return list.empty() ? nullptr : list[s.tensor].data_ptr<S>() + s.begin;
}

// ---- the ops (registered through adam_step_op & co., fusedreg/optim_args.h) ------------
void adam_step_cpu(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                   at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs,
                   at::TensorList steps, const AdamHyper& h) {
  const bool amsgrad = h.amsgrad;
  const at::ScalarType sdtype =
      check_lists("fusedreg::adam_step", at::kCPU, params, grads,
                  {exp_avgs, exp_avg_sqs, amsgrad ? max_exp_avg_sqs : at::TensorList()});
  TORCH_CHECK(exp_avgs.size() == params.size() && exp_avg_sqs.size() == params.size() &&
                  steps.size() == params.size() && (!amsgrad || max_exp_avg_sqs.size() == params.size()),
              "fusedreg::adam_step: expected one state tensor and one step per parameter");
  if (params.empty()) return;
  const std::vector<double> counts = increment_steps(steps);  // every check has passed
  const Plan spans = make_plan(params);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, params[0].scalar_type(), "adam_step", [&] {
    using S = at::opmath_type<scalar_t>;
    const AdamConsts<S> c = make_adam_consts<S>(h);
    std::vector<S> nss(params.size()), bc2(params.size()), rbc2(params.size());
    bool rcp_ok = std::is_same_v<S, float>;  // every bc2 in div_by_recip's range
    for (size_t t = 0; t < params.size(); ++t) {
      const AdamBiasCorrection bc = adam_bias_correction(h, counts[t]);
      nss[t] = S(bc.neg_step_size);
      bc2[t] = S(bc.bc2_sqrt);
      rbc2[t] = S(1) / bc2[t];  // rounded to nearest, as div_by_recip needs
      if constexpr (std::is_same_v<S, float>) rcp_ok = rcp_ok && adam_rcp_ok(bc2[t]);
    }
    with_state_type<scalar_t, S>(sdtype, [&](auto state_type) {
      using M = typename decltype(state_type)::type;
      // where this call prefetches (prefetch_rule, by the size of its arrays)
      const PrefetchRule pf =
          prefetch_rule(spans.first.back() * int64_t(2 * sizeof(scalar_t) + (amsgrad ? 3 : 2) * sizeof(M)));
      with_bool(amsgrad, [&](auto ams) {
        with_bool(h.l1 != 0.0, [&](auto has_l1) {
         with_float_bool<S>(rcp_ok, [&](auto rcp) {
          constexpr bool kAms = decltype(ams)::value, kL1 = decltype(has_l1)::value;
          // the reciprocal's FMAs at the AVX2 and AVX-512 levels (the baseline has no FMA)
          constexpr bool kRcp = decltype(rcp)::value;
          parallel_spans(spans, [&](const Span& s) {
            scalar_t* p = params[s.tensor].data_ptr<scalar_t>() + s.begin;
            const scalar_t* g = grads[s.tensor].const_data_ptr<scalar_t>() + s.begin;
            // the span's elements, and the tensor's from the span's first on (prefetch bound; 0 where
            // pf says no prefetch)
            const int64_t n = s.end - s.begin, avail = params[s.tensor].numel() - s.begin;
            M* m = state_ptr<M>(exp_avgs, s);
            M* v = state_ptr<M>(exp_avg_sqs, s);
            M* vm = amsgrad ? state_ptr<M>(max_exp_avg_sqs, s) : nullptr;
            const S a = nss[s.tensor], b = bc2[s.tensor], rb = rbc2[s.tensor];
            if constexpr (std::is_same_v<scalar_t, c10::Half>) {
              half_span(p, g, std::array<M*, 3>{m, v, vm}, n, pf.blocks16 ? avail : 0,
                        [=](float* pf, const float* gf, const std::array<float*, 3>& st, auto len, auto isa)
                            FUSEDREG_ALWAYS_INLINE {
                              adam_loop<float, S, float, kAms, kL1, kRcp && kHasFma<decltype(isa)>>(
                                  c, a, b, rb, pf, gf, st[0], st[1], st[2], len);
                            });
            } else if (std::is_same_v<scalar_t, c10::BFloat16> && use_blocks16()) {
              if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
                blocks16_span(p, g, std::array<M*, 3>{m, v, vm}, n, pf.blocks16 ? avail : 0,
                              [=](float* pf, const float* gf, const std::array<float*, 3>& st, auto len, auto isa)
                                  FUSEDREG_ALWAYS_INLINE {
                                    adam_loop<float, S, float, kAms, kL1, kRcp && kHasFma<decltype(isa)>>(
                                        c, a, b, rb, pf, gf, st[0], st[1], st[2], len);
                                  });
              }
            } else {
              dispatch_isa([&](auto isa) FUSEDREG_ALWAYS_INLINE {
                prefetched_blocks(
                    n, pf.loops ? avail : 0,
                    [&](int64_t i, int64_t len) FUSEDREG_ALWAYS_INLINE {
                      adam_loop<scalar_t, S, M, kAms, kL1, kRcp && kHasFma<decltype(isa)>>(
                          c, a, b, rb, p + i, g + i, m + i, v + i, kAms ? vm + i : vm, len);
                    },
                    p, g, m, v, vm);
              });
            }
          });
         });
        });
      });
    });
  });
}

void sgd_step_cpu(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers,
                  const SgdHyper& h) {
  const bool has_momentum = h.momentum != 0.0;
  const at::ScalarType sdtype = check_lists("fusedreg::sgd_step", at::kCPU, params, grads,
                                            {has_momentum ? momentum_buffers : at::TensorList()});
  TORCH_CHECK(!has_momentum || momentum_buffers.size() == params.size(),
              "fusedreg::sgd_step: momentum needs one buffer per parameter");
  if (params.empty()) return;
  const Plan spans = make_plan(params);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, params[0].scalar_type(), "sgd_step", [&] {
    using S = at::opmath_type<scalar_t>;
    const SgdConsts<S> c = make_sgd_consts<S>(h);
    with_state_type<scalar_t, S>(sdtype, [&](auto state_type) {
      using M = typename decltype(state_type)::type;
      // where this call prefetches (prefetch_rule, by the size of its arrays)
      const PrefetchRule pf =
          prefetch_rule(spans.first.back() * int64_t(2 * sizeof(scalar_t) + (has_momentum ? 1 : 0) * sizeof(M)));
      with_bool(has_momentum, [&](auto mom) {
        with_bool(h.l1 != 0.0, [&](auto has_l1) {
          constexpr bool kMom = decltype(mom)::value, kL1 = decltype(has_l1)::value;
          parallel_spans(spans, [&](const Span& s) {
            scalar_t* p = params[s.tensor].data_ptr<scalar_t>() + s.begin;
            const scalar_t* g = grads[s.tensor].const_data_ptr<scalar_t>() + s.begin;
            // the span's elements, and the tensor's from the span's first on (prefetch bound; 0 where
            // pf says no prefetch)
            const int64_t n = s.end - s.begin, avail = params[s.tensor].numel() - s.begin;
            M* buf = has_momentum ? state_ptr<M>(momentum_buffers, s) : nullptr;
            if constexpr (std::is_same_v<scalar_t, c10::Half>) {
              half_span(p, g, std::array<M*, 1>{buf}, n, pf.blocks16 ? avail : 0,
                        [=](float* pf, const float* gf, const std::array<float*, 1>& st, auto len, auto)
                            FUSEDREG_ALWAYS_INLINE { sgd_loop<float, S, float, kMom, kL1>(c, pf, gf, st[0], len); });
            } else if (std::is_same_v<scalar_t, c10::BFloat16> && use_blocks16()) {
              if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
                blocks16_span(p, g, std::array<M*, 1>{buf}, n, pf.blocks16 ? avail : 0,
                              [=](float* pf, const float* gf, const std::array<float*, 1>& st, auto len, auto)
                                  FUSEDREG_ALWAYS_INLINE { sgd_loop<float, S, float, kMom, kL1>(c, pf, gf, st[0], len); });
              }
            } else {
              dispatch_isa([&](auto) FUSEDREG_ALWAYS_INLINE {
                prefetched_blocks(
                    n, pf.loops ? avail : 0,
                    [&](int64_t i, int64_t len) FUSEDREG_ALWAYS_INLINE {
                      sgd_loop<scalar_t, S, M, kMom, kL1>(c, p + i, g + i, kMom ? buf + i : buf,
                                                          len);
                    },
                    p, g, buf);
              });
            }
          });
        });
      });
    });
  });
}

void lion_step_cpu(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                   const LionHyper& h) {
  const at::ScalarType sdtype =
      check_lists("fusedreg::lion_step", at::kCPU, params, grads, {exp_avgs});
  TORCH_CHECK(exp_avgs.size() == params.size(), "fusedreg::lion_step: one exp_avg per parameter");
  if (params.empty()) return;
  const Plan spans = make_plan(params);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, params[0].scalar_type(), "lion_step", [&] {
    using S = at::opmath_type<scalar_t>;
    const LionConsts<S> c = make_lion_consts<S>(h);
    with_state_type<scalar_t, S>(sdtype, [&](auto state_type) {
      using M = typename decltype(state_type)::type;
      // where this call prefetches (prefetch_rule, by the size of its arrays)
      const PrefetchRule pf = prefetch_rule(spans.first.back() * int64_t(2 * sizeof(scalar_t) + sizeof(M)));
      with_bool(h.l1 != 0.0, [&](auto has_l1) {
        constexpr bool kL1 = decltype(has_l1)::value;
        parallel_spans(spans, [&](const Span& s) {
          scalar_t* p = params[s.tensor].data_ptr<scalar_t>() + s.begin;
          const scalar_t* g = grads[s.tensor].const_data_ptr<scalar_t>() + s.begin;
          const int64_t n = s.end - s.begin, avail = params[s.tensor].numel() - s.begin;
          M* m = state_ptr<M>(exp_avgs, s);
          if constexpr (std::is_same_v<scalar_t, c10::Half>) {
            half_span(p, g, std::array<M*, 1>{m}, n, pf.blocks16 ? avail : 0,
                      [=](float* pf, const float* gf, const std::array<float*, 1>& st, auto len, auto)
                          FUSEDREG_ALWAYS_INLINE { lion_loop<float, S, float, kL1>(c, pf, gf, st[0], len); });
          } else if (std::is_same_v<scalar_t, c10::BFloat16> && use_blocks16()) {
            if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
              blocks16_span(p, g, std::array<M*, 1>{m}, n, pf.blocks16 ? avail : 0,
                            [=](float* pf, const float* gf, const std::array<float*, 1>& st, auto len, auto)
                                FUSEDREG_ALWAYS_INLINE { lion_loop<float, S, float, kL1>(c, pf, gf, st[0], len); });
            }
          } else {
            dispatch_isa([&](auto) FUSEDREG_ALWAYS_INLINE {
              prefetched_blocks(
                  n, pf.loops ? avail : 0,
                  [&](int64_t i, int64_t len) FUSEDREG_ALWAYS_INLINE {
                    lion_loop<scalar_t, S, M, kL1>(c, p + i, g + i, m + i, len);
                  },
                  p, g, m);
            });
          }
        });
      });
    });
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(fusedreg, CPU, m) {
  m.impl("adam_step", &adam_step_op<adam_step_cpu>);
  m.impl("sgd_step", &sgd_step_op<sgd_step_cpu>);
  m.impl("lion_step", &lion_step_op<lion_step_cpu>);
}

// ---- the direct calls (fusedreg._C.adam_step / sgd_step / lion_step) ------------------------
// A call through torch.ops parses its arguments against the schema in Python's op binding:
// about 10 us per call on this project's CPU machine (torch's own torch._fused_sgd_ costs 3 us
// called directly, 13 us through torch.ops.aten), which is most of an optimizer step on a small
// model. The optimizers' cpu backend therefore calls these: the same op body (the checks of
// fusedreg/optim_args.h, then the kernel) reached without the dispatcher, for the one case
// where the dispatcher would route straight to the CPU kernel anyway. Each returns False
// before touching anything when that is not certain (a tensor subclass or wrapper, a tensor
// key beyond plain CPU, a dispatch or torch-function mode, a thread-local included key): the
// caller then makes the torch.ops call. Arguments are positional, in the schema's order.
namespace {

using cpu::direct_call_allowed;

// A list of plain CPU tensors as a vector, or false (nothing parsed is kept).
bool tensor_list(PyObject* obj, std::vector<at::Tensor>& out) {
  if (!PyList_Check(obj) && !PyTuple_Check(obj)) return false;
  PyObject* seq = obj;
  const Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
  PyObject** items = PySequence_Fast_ITEMS(seq);
  out.reserve(size_t(n));
  for (Py_ssize_t i = 0; i < n; ++i) {
    if (!cpu::plain_cpu_tensor(items[i])) return false;
    out.push_back(THPVariable_Unpack(items[i]));
  }
  return true;
}

// One positional argument of an op, by the op's parameter type: parse() is false (nothing
// raised) when the object is not what the direct call takes.
template <typename T>
struct DirectArg;

template <>
struct DirectArg<at::TensorList> {
  std::vector<at::Tensor> value;
  bool parse(PyObject* obj) { return tensor_list(obj, value); }
  at::TensorList get() const { return value; }
};

template <>
struct DirectArg<double> {
  double value = 0.0;
  bool parse(PyObject* obj) {
    if (!PyFloat_CheckExact(obj) && !PyLong_CheckExact(obj)) return false;
    value = PyFloat_AsDouble(obj);  // an int too large for a double: declined, not raised
    if (value == -1.0 && PyErr_Occurred()) {
      PyErr_Clear();
      return false;
    }
    return true;
  }
  double get() const { return value; }
};

template <>
struct DirectArg<bool> {
  bool value = false;
  bool parse(PyObject* obj) {
    if (!PyBool_Check(obj)) return false;
    value = obj == Py_True;
    return true;
  }
  bool get() const { return value; }
};

// The direct call of an op body `Op` (adam_step_op<adam_step_cpu>, ...): its arguments are
// parsed by the op's own parameter types, in order, so the call cannot drift from the
// schema's argument list; False when the call is declined, True once the op has run.
template <typename F>
struct Direct;

template <typename... A>
struct Direct<void (*)(A...)> {
  template <void (*Op)(A...), const char* kName>
  static PyObject* call(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
    HANDLE_TH_ERRORS
    if (!direct_call_allowed() || nargs != Py_ssize_t(sizeof...(A))) Py_RETURN_FALSE;
    std::tuple<DirectArg<A>...> parsed;
    const bool ok = std::apply(
        [&](auto&... arg) {
          Py_ssize_t i = 0;
          return (arg.parse(args[i++]) && ...);  // left to right, stops at the first miss
        },
        parsed);
    if (!ok) Py_RETURN_FALSE;
    RECORD_FUNCTION(kName, std::vector<c10::IValue>());
    {
      pybind11::gil_scoped_release no_gil;
      std::apply([](const auto&... arg) { Op(arg.get()...); }, parsed);
    }
    Py_RETURN_TRUE;
    END_HANDLE_TH_ERRORS
  }
};

template <auto Op, const char* kName>
PyObject* direct(PyObject* self, PyObject* const* args, Py_ssize_t nargs) {
  return Direct<decltype(Op)>::template call<Op, kName>(self, args, nargs);
}

constexpr char kAdamName[] = "fusedreg::adam_step";
constexpr char kSgdName[] = "fusedreg::sgd_step";
constexpr char kLionName[] = "fusedreg::lion_step";

template <PyObject* (*F)(PyObject*, PyObject* const*, Py_ssize_t)>
PyCFunction as_method() {
  return reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(F));
}

// fusedreg._C._adam_div_by_recip(x, c): div_by_recip(x, c, 1 / c) (fusedreg/optim_math.h) on
// every element of a contiguous float32 CPU tensor, in the loop the Adam kernels inline it in,
// at the same instruction-set level (tests/test_optim.py compares it with x / c bit for bit).
PyObject* adam_div_by_recip(PyObject*, PyObject* args) {
  HANDLE_TH_ERRORS
  PyObject* obj = nullptr;
  double c = 0.0;
  if (!PyArg_ParseTuple(args, "Od", &obj, &c)) return nullptr;
  TORCH_CHECK(THPVariable_Check(obj), "_adam_div_by_recip: expected a tensor");
  const at::Tensor x = THPVariable_Unpack(obj);
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat && x.is_contiguous(),
              "_adam_div_by_recip: expected a contiguous float32 CPU tensor");
  const float cf = float(c);
  TORCH_CHECK(adam_rcp_ok(cf), "_adam_div_by_recip: c outside the range Adam uses it for");
  const float rc = 1.0f / cf;
  at::Tensor out = at::empty_like(x);
  const float* xp = x.const_data_ptr<float>();
  float* op = out.data_ptr<float>();
  const int64_t n = x.numel();
  dispatch_isa([&](auto isa) FUSEDREG_ALWAYS_INLINE {
    if constexpr (kHasFma<decltype(isa)>) {
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) op[i] = div_by_recip(xp[i], cf, rc);
    } else {
      for (int64_t i = 0; i < n; ++i) op[i] = xp[i] / cf;  // what the baseline kernels do
    }
  });
  return THPVariable_Wrap(std::move(out));
  END_HANDLE_TH_ERRORS
}

PyMethodDef kDirectMethods[] = {
    {"adam_step", as_method<direct<&adam_step_op<adam_step_cpu>, kAdamName>>(), METH_FASTCALL,
     "fusedreg::adam_step on plain CPU tensors without the dispatcher"},
    {"sgd_step", as_method<direct<&sgd_step_op<sgd_step_cpu>, kSgdName>>(), METH_FASTCALL,
     "fusedreg::sgd_step on plain CPU tensors without the dispatcher"},
    {"lion_step", as_method<direct<&lion_step_op<lion_step_cpu>, kLionName>>(), METH_FASTCALL,
     "fusedreg::lion_step on plain CPU tensors without the dispatcher"},
    {"_adam_div_by_recip", adam_div_by_recip, METH_VARARGS,
     "Adam's correctly rounded x / c by a reciprocal and FMAs (for the tests)"},
    {nullptr, nullptr, 0, nullptr}};

}  // namespace

PyMethodDef* optim_direct_methods() { return kDirectMethods; }

}  // namespace fusedreg
