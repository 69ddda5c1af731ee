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
