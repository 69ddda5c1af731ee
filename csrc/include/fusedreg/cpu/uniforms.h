// Bulk generation of the dropout uniforms on the CPU: one Philox call per aligned group
// of four flat indices, in a loop the compiler vectorizes. The loop is compiled for AVX-512,
// AVX2 and baseline x86-64 (GCC/Clang function multiversioning, picked at load time), so
// the build stays portable while the 32x32->64-bit multiplies run 8 or 16 wide.
#pragma once

#include <cstdint>

#include "fusedreg/philox.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__)) && !defined(__CUDACC__)
#define FUSEDREG_CPU_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define FUSEDREG_CPU_CLONES
#endif

namespace fusedreg {

namespace detail {
// u[4k + j] = uint_to_uniform(Philox(seed, g0 + k).w[j]) for k in [0, groups).
FUSEDREG_CPU_CLONES __attribute__((noinline)) inline void fill_uniform_groups(
    uint64_t seed, uint64_t g0, int64_t groups, float* __restrict u) {
#pragma omp simd
  for (int64_t k = 0; k < groups; ++k) {
    const Philox4 r = philox4x32_10(seed, g0 + static_cast<uint64_t>(k));
    u[4 * k + 0] = uint_to_uniform(r.w[0]);
    u[4 * k + 1] = uint_to_uniform(r.w[1]);
    u[4 * k + 2] = uint_to_uniform(r.w[2]);
    u[4 * k + 3] = uint_to_uniform(r.w[3]);
  }
}
}  // namespace detail

// u[k] = dropout_uniform(seed, start + k) for k in [0, len).
inline void fill_uniforms(uint64_t seed, int64_t start, int64_t len, float* u) {
  int64_t i = start;
  const int64_t end = start + len;
  for (; i < end && (i & 3) != 0; ++i) *u++ = dropout_uniform(seed, i);
  const int64_t groups = (end - i) >> 2;
  detail::fill_uniform_groups(seed, static_cast<uint64_t>(i) >> 2, groups, u);
  i += groups * 4;
  u += groups * 4;
  for (; i < end; ++i) *u++ = dropout_uniform(seed, i);
}

}  // namespace fusedreg
