// Bulk generation of the dropout uniforms on the CPU: one Philox call per aligned group
// of four flat indices, in a loop the compiler vectorizes.
#pragma once

#include <cstdint>

#include "fusedreg/philox.h"

namespace fusedreg {

// u[k] = dropout_uniform(seed, start + k) for k in [0, len).
inline void fill_uniforms(uint64_t seed, int64_t start, int64_t len, float* u) {
  int64_t i = start;
  const int64_t end = start + len;
  for (; i < end && (i & 3) != 0; ++i) *u++ = dropout_uniform(seed, i);
  const int64_t groups = (end - i) >> 2;
  const uint64_t g0 = static_cast<uint64_t>(i) >> 2;
#pragma omp simd
  for (int64_t k = 0; k < groups; ++k) {
    const Philox4 r = philox4x32_10(seed, g0 + static_cast<uint64_t>(k));
    u[4 * k + 0] = uint_to_uniform(r.w[0]);
    u[4 * k + 1] = uint_to_uniform(r.w[1]);
    u[4 * k + 2] = uint_to_uniform(r.w[2]);
    u[4 * k + 3] = uint_to_uniform(r.w[3]);
  }
  i += groups * 4;
  u += groups * 4;
  for (; i < end; ++i) *u++ = dropout_uniform(seed, i);
}

}  // namespace fusedreg
