// Portability macros shared by the CPU (C++) and CUDA translation units.
#pragma once

#if defined(__CUDACC__) || defined(__HIPCC__)
#define FUSEDREG_HOST_DEVICE __host__ __device__
#define FUSEDREG_DEVICE __device__
#else
#define FUSEDREG_HOST_DEVICE
#define FUSEDREG_DEVICE
#endif

#define FUSEDREG_INLINE FUSEDREG_HOST_DEVICE inline

// Forces inlining: `inline FUSEDREG_ALWAYS_INLINE T f()` on a function (host, device or both;
// nvcc's __forceinline__ is this same attribute), `[&]() FUSEDREG_ALWAYS_INLINE { ... }` on a
// lambda. The CPU kernels need it to be a guarantee rather than a hint: an element loop is
// compiled for an instruction set only where it is inlined into a function of that target
// (fusedreg/cpu/isa.h), and GCC reports an error, instead of silently calling a baseline
// copy, when it cannot inline. Expands to nothing for compilers without the attribute.
#if defined(__GNUC__) || defined(__clang__)
#define FUSEDREG_ALWAYS_INLINE __attribute__((always_inline))
#else
#define FUSEDREG_ALWAYS_INLINE
#endif
