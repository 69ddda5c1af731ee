// The dropout mask (docs/design.md, "The dropout mask"), written once for the CPU and CUDA
// backends.
//
// Element i (flat int64 index into the logical, contiguous tensor) is kept iff
// uniform(seed, i) >= p, where the uniform comes from lane i % 4 of
// Philox4x32-10(key = (seed_lo, seed_hi), counter = (g_lo, g_hi, 0, 0)), g = i / 4,
// converted exactly as Triton's uint_to_uniform_float does. The reference
// (fusedreg/reference/philox.py) and Triton (fusedreg/triton/philox.py) implement the
// same function; tests check all three bit for bit.
#pragma once

#include <cstdint>

#include "fusedreg/macros.h"

namespace fusedreg {

struct Philox4 {
  uint32_t w[4];
};

FUSEDREG_INLINE uint32_t mulhilo32(uint32_t a, uint32_t b, uint32_t* hi) {
  const uint64_t prod = static_cast<uint64_t>(a) * static_cast<uint64_t>(b);
  *hi = static_cast<uint32_t>(prod >> 32);
  return static_cast<uint32_t>(prod);
}

// Philox4x32-10 of counter (g_lo, g_hi, 0, 0) under the 64-bit key `seed`.
FUSEDREG_INLINE Philox4 philox4x32_10(uint64_t seed, uint64_t group) {
  uint32_t c0 = static_cast<uint32_t>(group);
  uint32_t c1 = static_cast<uint32_t>(group >> 32);
  uint32_t c2 = 0u;
  uint32_t c3 = 0u;
  uint32_t k0 = static_cast<uint32_t>(seed);
  uint32_t k1 = static_cast<uint32_t>(seed >> 32);
#if defined(__CUDACC__)
#pragma unroll
#endif
  for (int round = 0; round < 10; ++round) {
    uint32_t hi0, hi1;
    const uint32_t lo0 = mulhilo32(0xD2511F53u, c0, &hi0);
    const uint32_t lo1 = mulhilo32(0xCD9E8D57u, c2, &hi1);
    c0 = hi1 ^ c1 ^ k0;
    c2 = hi0 ^ c3 ^ k1;
    c1 = lo1;
    c3 = lo0;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  return Philox4{{c0, c1, c2, c3}};
}

// Triton's uint_to_uniform_float for 32-bit words: a value in [0, 1).
FUSEDREG_INLINE float uint_to_uniform(uint32_t w) {
  int32_t x = static_cast<int32_t>(w);
  x = x < 0 ? ~x : x;
  return static_cast<float>(x) * 4.6566127342e-10f;
}

// The uniform for one flat element index.
FUSEDREG_INLINE float dropout_uniform(uint64_t seed, int64_t index) {
  const Philox4 r = philox4x32_10(seed, static_cast<uint64_t>(index) >> 2);
  return uint_to_uniform(r.w[index & 3]);
}

// 1 / (1 - p) in float32, as every backend computes it; unused when p == 1.
FUSEDREG_INLINE float dropout_scale(float p) {
  return p < 1.0f ? 1.0f / (1.0f - p) : 0.0f;
}

}  // namespace fusedreg
