// Instruction-set dispatch of the CPU kernels: the one mechanism every CPU op uses.
//
// Why it exists: the extension is built for baseline x86-64 (it must load on any x86-64 CPU),
// but its element loops run several times faster with wide vectors (the dropout mask's
// Philox multiplies most of all). So each hot loop is compiled for three levels and the CPU's
// level, detected once, picks one at run time:
//     dispatch_isa([&](auto isa) FUSEDREG_ALWAYS_INLINE { kernel(...); });
// calls the lambda from run_avx512, run_avx2 or run_baseline, templates that carry the target
// attribute. The lambda and the kernel it calls are force-inlined (fusedreg/macros.h), so
// their loops are compiled for that target; `isa` (an IsaTag) tells the body which one, for
// the code that uses intrinsics (fusedreg/cpu/uniforms.h).
//
// Why runtime dispatch rather than GCC's target_clones (which it replaced): a clone's callees
// are compiled for the baseline unless the inliner happens to take them, and for "arch="
// clones it refuses to (the callee's arch must match); hand-written intrinsics cannot be a
// clone and so needed a second feature check of their own; the resolver is an ifunc
// (GCC/glibc only). The targets below are feature lists without "arch=", so every ordinary
// inline function can be inlined into every variant, the intrinsics and the loops share
// cpu_isa(), and a test can force the baseline (FUSEDREG_CPU_ISA, below).
//
// What it costs: three copies of every dispatched kernel (build time and .so size of those
// loops); one predictable switch per dispatched call, so call it per row block, chunk or
// span, never per element; and the AVX2 and AVX-512 variants contract a * b + c into FMA
// while the baseline cannot, so results may differ in the last bits between CPUs of
// different levels (more where exp amplifies a rounding of its argument), never between
// runs at one level. Under GCC's default -ftrapping-math, a loop whose selects compare
// floats (the dropout keep test, Lion's sign) is if-converted only with AVX-512's masks:
// in the AVX2 and baseline variants such loops stayed scalar, so the extension is built with
// -fno-trapping-math (setup.py); some loops also keep integer tests of float bits written for
// the default (they vectorize either way).
//
// Levels (each needs everything the one below does):
//   avx512    avx512f, avx512bw, avx512cd, avx512dq, avx512vl (the AVX-512 of x86-64-v4)
//   avx2      avx2, fma, bmi, bmi2, popcnt (x86-64-v3 less f16c, lzcnt and movbe, which these
//             loops do not use and which clang's __builtin_cpu_supports cannot check)
//   baseline  x86-64 (SSE2)
// FUSEDREG_CPU_ISA=baseline|avx2|avx512 in the environment caps the level (read once, at the
// first dispatch); it never raises it. On other architectures, other compilers and in CUDA
// translation units the target macros expand to nothing and everything runs the baseline.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <type_traits>

#include <unistd.h>

#include "fusedreg/macros.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__)) && !defined(__CUDACC__)
#define FUSEDREG_X86_DISPATCH 1
#include <cpuid.h>
#define FUSEDREG_TARGET_AVX2 __attribute__((target("avx2,fma,bmi,bmi2,popcnt")))
#define FUSEDREG_TARGET_AVX512 \
  __attribute__((target("avx2,fma,bmi,bmi2,popcnt,avx512f,avx512bw,avx512cd,avx512dq,avx512vl")))
// AVX-512 plus the BF16 conversions: not a level of its own (no kernel is compiled for it);
// single out-of-line helpers use it after checking cpu_has_avx512bf16().
#define FUSEDREG_TARGET_AVX512BF16 \
  __attribute__((target("avx2,fma,bmi,bmi2,popcnt,avx512f,avx512bw,avx512cd,avx512dq,avx512vl,avx512bf16")))
#else
#define FUSEDREG_X86_DISPATCH 0
#define FUSEDREG_TARGET_AVX2
#define FUSEDREG_TARGET_AVX512
#define FUSEDREG_TARGET_AVX512BF16
#endif

// The run_* variants stay out of line: each is then one symbol, compiled for one target (what
// objdump shows), and a dispatch nested in an inlined helper (fill_uniforms) does not copy
// the other levels' code into its caller.
#if defined(__GNUC__) || defined(__clang__)
#define FUSEDREG_ISA_VARIANT __attribute__((noinline))
#else
#define FUSEDREG_ISA_VARIANT
#endif

namespace fusedreg {
namespace cpu {

enum class Isa : int { kBaseline = 0, kAvx2 = 1, kAvx512 = 2 };

template <Isa I>
using IsaTag = std::integral_constant<Isa, I>;

namespace detail {

inline Isa detect_isa() {
#if FUSEDREG_X86_DISPATCH
  __builtin_cpu_init();
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                    __builtin_cpu_supports("bmi") && __builtin_cpu_supports("bmi2") &&
                    __builtin_cpu_supports("popcnt");
  const bool avx512 = avx2 && __builtin_cpu_supports("avx512f") &&
                      __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512cd") &&
                      __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl");
  Isa best = avx512 ? Isa::kAvx512 : (avx2 ? Isa::kAvx2 : Isa::kBaseline);
  if (const char* cap = std::getenv("FUSEDREG_CPU_ISA")) {
    const Isa c = std::strcmp(cap, "baseline") == 0 ? Isa::kBaseline
                  : std::strcmp(cap, "avx2") == 0   ? Isa::kAvx2
                                                    : Isa::kAvx512;
    if (static_cast<int>(c) < static_cast<int>(best)) best = c;
  }
  return best;
#else
  return Isa::kBaseline;
#endif
}

}  // namespace detail

// The level the kernels run at: the CPU's (its features and the OS's support for their
// registers, as __builtin_cpu_supports reports), capped by FUSEDREG_CPU_ISA.
inline Isa cpu_isa() {
  static const Isa isa = detail::detect_isa();
  return isa;
}

inline bool cpu_has_avx512() { return cpu_isa() == Isa::kAvx512; }

// Whether the kernels run at the AVX-512 level (not capped below it) on a CPU with the
// AVX-512 BF16 conversions (vcvtne2ps2bf16).
inline bool cpu_has_avx512bf16() {
#if FUSEDREG_X86_DISPATCH
  static const bool has = cpu_has_avx512() && __builtin_cpu_supports("avx512bf16");
  return has;
#else
  return false;
#endif
}

// The bytes of the last-level cache (L3) a call can count on, which the kernels compare their
// operands with to choose store kinds, step sizes and prefetch: on an AMD CPU one L3 instance
// from its cache-topology cpuid leaf 0x8000001D, since sysconf(_SC_LEVEL3_CACHE_SIZE) gave
// 384 MiB on the EPYC VM (every L3 of the package, most of which this core never reads from);
// elsewhere sysconf's, at most kL3CapBytes; 32 MiB when neither says. FUSEDREG_CPU_L3_MIB=<n>
// in the environment replaces it (read once, at the first call).
//
// The cap: the Intel Xeon VM reports its host package's 480 MiB (sysconf and cpuid leaf 4,
// "shared by 2" logical CPUs), but its two cores stream as from memory well before that. The
// benchmark's 1R1W probe, two threads: ordinary stores as fast as non-temporal ones up to
// 25.7 MB arrays (57-58 GB/s both), non-temporal ones 1.7x as fast at 64 MB (33 against 56
// GB/s). With the cap at 64 MiB (against the 480 MiB reported; min of 2-3 rounds of alternating
// processes, two threads): footprints over it take 0.64-0.96 of the time (BatchNorm eval of
// 64x64x112x112 float32 0.77, channels-last 0.76, bf16 0.89; bias_dropout float32 16384x2048
// 0.89, with GELU 0.91-0.92 at 8192x1024; bf16 layer_norm / rms_norm 16384x2048 0.73 / 0.64),
// those between 32 and 64 MiB are within 0.94-1.03 (a 32 MiB cap made some of them 2-8%
// slower). A machine whose L3 really holds more for one process gives up some cache residency
// of outputs past 64 MiB; FUSEDREG_CPU_L3_MIB restores its size.
constexpr int64_t kL3CapBytes = int64_t(64) << 20;

inline int64_t l3_bytes() {
  static const int64_t bytes = [] {
    if (const char* mib = std::getenv("FUSEDREG_CPU_L3_MIB")) {
      char* end = nullptr;
      const long long v = std::strtoll(mib, &end, 10);
      if (end != mib && *end == '\0' && v > 0 && v < (int64_t(1) << 24)) return int64_t(v) << 20;
    }
#if FUSEDREG_X86_DISPATCH
    if (__builtin_cpu_is("amd")) {
      unsigned a = 0, b = 0, c = 0, d = 0;
      for (unsigned i = 0; i < 8; ++i) {
        if (__get_cpuid_count(0x8000001D, i, &a, &b, &c, &d) == 0 || (a & 31u) == 0) break;
        if (((a >> 5) & 7u) == 3) {  // level 3: ways x partitions x line size x sets
          return (int64_t((b >> 22) & 0x3FFu) + 1) * (int64_t((b >> 12) & 0x3FFu) + 1) *
                 (int64_t(b & 0xFFFu) + 1) * (int64_t(c) + 1);
        }
      }
      return int64_t(32) << 20;
    }
#endif
#if defined(_SC_LEVEL3_CACHE_SIZE)
    const long s = sysconf(_SC_LEVEL3_CACHE_SIZE);
    if (s > 0) return std::min(int64_t(s), kL3CapBytes);
#endif
    return int64_t(32) << 20;
  }();
  return bytes;
}

template <typename F>
FUSEDREG_ISA_VARIANT FUSEDREG_TARGET_AVX512 decltype(auto) run_avx512(const F& f) {
  return f(IsaTag<Isa::kAvx512>{});
}

template <typename F>
FUSEDREG_ISA_VARIANT FUSEDREG_TARGET_AVX2 decltype(auto) run_avx2(const F& f) {
  return f(IsaTag<Isa::kAvx2>{});
}

template <typename F>
FUSEDREG_ISA_VARIANT decltype(auto) run_baseline(const F& f) {
  return f(IsaTag<Isa::kBaseline>{});
}

// f(IsaTag<level>) compiled for, and run at, the level of this CPU. f must be a lambda marked
// FUSEDREG_ALWAYS_INLINE whose hot callees are FUSEDREG_ALWAYS_INLINE too: what is not
// inlined into the run_* function is compiled for the baseline.
template <typename F>
decltype(auto) dispatch_isa(const F& f) {
#if FUSEDREG_X86_DISPATCH
  switch (cpu_isa()) {
    case Isa::kAvx512:
      return run_avx512(f);
    case Isa::kAvx2:
      return run_avx2(f);
    default:
      break;
  }
#endif
  return run_baseline(f);
}

}  // namespace cpu
}  // namespace fusedreg
