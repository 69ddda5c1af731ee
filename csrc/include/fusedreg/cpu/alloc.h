// Output allocation for the CPU kernels.
//
// A fresh multi-megabyte tensor comes from mmap, and first-touching it costs one page fault
// per 4 KiB page -- as much time as the kernel itself on the benchmark shapes. Large outputs
// are therefore backed by transparent huge pages (where THP is in "madvise" mode; ~512x fewer
// faults -- what torch's own CPU allocator does for every tensor under THP_MEM_ALLOC_ENABLE=1).
// madvise on an ordinary allocation only reaches its 2 MiB-aligned interior: a 32 MiB tensor
// that starts at an arbitrary 4 KiB page keeps its partial first and last 2 MiB on small pages
// (512 faults per output). So large outputs come from HugeAlignedAllocator: the block 2 MiB-
// aligned, its length rounded up to 2 MiB, all of it advised. The result is an ordinary
// resizable CPU tensor (resizing allocates from the same allocator); nothing global changes.
// What it costs: up to 2 MiB less one page of slack per large output; a huge page zeroed in
// the fault handler even when only part of it is written; these blocks bypass torch's CPU
// allocator, so its memory reporting (the profiler's) does not count them. Outputs under
// 4 MiB are ordinary at::empty tensors.
#pragma once

#include <ATen/ATen.h>
#include <ATen/EmptyTensor.h>

#include <cstdint>
#include <cstdlib>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace fusedreg {
namespace cpu {

#if defined(__linux__) && defined(MADV_HUGEPAGE)
struct HugeAlignedAllocator final : c10::Allocator {
  static constexpr size_t kHuge = size_t(2) << 20;
  static void free_block(void* p) { std::free(p); }
  c10::DataPtr allocate(size_t n) override {
    if (n == 0) return {nullptr, nullptr, &free_block, at::Device(at::kCPU)};
    const size_t len = (n + kHuge - 1) / kHuge * kHuge;
    void* p = nullptr;
    TORCH_CHECK(posix_memalign(&p, kHuge, len) == 0, "fusedreg: out of memory allocating ", n,
                " bytes");
    madvise(p, len, MADV_HUGEPAGE);  // a hint: failure leaves small pages, nothing worse
    return {p, p, &free_block, at::Device(at::kCPU)};
  }
  c10::DeleterFnPtr raw_deleter() const override { return &free_block; }
  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }
};

// at::empty(sizes, options) (contiguous, CPU); from HugeAlignedAllocator when 4 MiB or more.
inline at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
  static HugeAlignedAllocator allocator;
  int64_t nbytes = options.dtype().itemsize();
  for (const int64_t s : sizes) nbytes *= s;
  if (nbytes < (int64_t(4) << 20)) return at::empty(sizes, options);  // mostly small pages anyway
  return at::detail::empty_generic(sizes, &allocator, c10::DispatchKeySet(c10::DispatchKey::CPU),
                                   options.dtype().toScalarType(), c10::MemoryFormat::Contiguous);
}
#else
inline at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
  return at::empty(sizes, options);
}
#endif

// A contiguous output shaped like ref.
inline at::Tensor empty_output_like(const at::Tensor& ref) {
  return empty_output(ref.sizes(), ref.options());
}

}  // namespace cpu
}  // namespace fusedreg
