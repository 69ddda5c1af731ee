// Dropout uniforms generated inside a streaming loop (the bits of fusedreg/philox.h).
//
// Why it exists, beside fill_uniforms() (fusedreg/cpu/uniforms.h, one buffer per call): a
// kernel that first fills a large buffer of uniforms and then streams its operands runs the
// Philox arithmetic and the memory traffic one after the other. fill_uniforms_at<isa>() is
// called from inside an already dispatched loop (no dispatch of its own; one call of the
// AVX-512 kernel of uniforms.h per call), a few hundred elements at a time, so the
// out-of-order core and the hardware prefetchers overlap the next loads with the Philox
// rounds, and the uniforms stay in L1.
#pragma once

#include <cstdint>

#include "fusedreg/cpu/isa.h"
#include "fusedreg/cpu/uniforms.h"
#include "fusedreg/macros.h"
#include "fusedreg/philox.h"

#if FUSEDREG_X86_DISPATCH
#include <immintrin.h>
#endif

namespace fusedreg {
namespace cpu {

// u[k] = dropout_uniform(seed, start + k) for k in [0, len), at instruction-set level ISA:
// call it from a dispatch_isa body (it dispatches nothing itself). Any start and len.
template <Isa ISA>
inline FUSEDREG_ALWAYS_INLINE void fill_uniforms_at(const PhiloxKeys& keys, uint64_t seed,
                                                    int64_t start, int64_t len, float* __restrict u) {
  int64_t i = start;
  const int64_t end = start + len;
  for (; i < end && (i & 3) != 0; ++i) *u++ = dropout_uniform(seed, i);
  uint64_t g = static_cast<uint64_t>(i) >> 2;
  int64_t groups = (end - i) >> 2;
#if FUSEDREG_X86_DISPATCH
  if constexpr (ISA == Isa::kAvx512) {
    const int64_t blocks = groups / 16;
    philox_uniforms_avx512(keys, g, blocks, u);
    groups -= 16 * blocks;
    g += 16 * blocks;
    u += 64 * blocks;
    i += 64 * blocks;
  }
#endif
  fusedreg::detail::fill_uniform_groups_scalar(seed, g, groups, u);
  i += groups * 4;
  u += groups * 4;
  for (; i < end; ++i) *u++ = dropout_uniform(seed, i);
}

}  // namespace cpu
}  // namespace fusedreg
