// Output allocation for the CPU kernels.
//
// A fresh multi-megabyte tensor comes from mmap, and first-touching it costs one page fault
// per 4 KiB page -- as much time as a full copy of the bytes. Advising the kernel to back it
// with transparent huge pages (where THP is in "madvise" mode) cuts the faults ~512x: what
// torch's own CPU allocator does for every tensor under THP_MEM_ALLOC_ENABLE=1. The advice
// is per allocation; nothing global changes.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace fusedreg {
namespace cpu {

inline void advise_huge_pages(const at::Tensor& t) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kPage = 4096, kHuge = uintptr_t(2) << 20;
  if (t.nbytes() < 2 * kHuge) return;
  const uintptr_t begin = reinterpret_cast<uintptr_t>(t.data_ptr());
  const uintptr_t b = (begin + kPage - 1) & ~(kPage - 1);
  const uintptr_t e = (begin + t.nbytes()) & ~(kPage - 1);
  if (e > b) madvise(reinterpret_cast<void*>(b), e - b, MADV_HUGEPAGE);
#else
  (void)t;
#endif
}

// at::empty_like(ref) (contiguous), advised for huge pages when large.
inline at::Tensor empty_output_like(const at::Tensor& ref) {
  at::Tensor t = at::empty_like(ref, at::MemoryFormat::Contiguous);
  advise_huge_pages(t);
  return t;
}

}  // namespace cpu
}  // namespace fusedreg
