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
// allocator, so its memory reporting (the profiler's) does not count them, nor the cached
// blocks below. Outputs under 4 MiB are ordinary at::empty tensors.
//
// Reuse (the steady state of a training loop): a training step allocates the same output
// shapes every iteration and frees each before the next. A freshly mapped block pays the page
// faults (and the kernel's zeroing of every page) again on each call -- for a 32 MiB output
// more than the kernel's own time. So freed blocks go to a small cache, bucketed by their
// rounded length, and the next request of that length takes the most recently freed one
// (still warm in the caches). The cache is bounded: FUSEDREG_CPU_CACHE_MB (read once; 0
// turns it off), by default min(1 GiB, RAM / 16). It is released on memory pressure: a
// freed block is kept only while the machine's available memory (MemAvailable) stays above
// an eighth of RAM, otherwise it and every cached block go back to the system; a failed
// allocation also empties the cache and retries once.
#pragma once

#include <ATen/ATen.h>
#include <ATen/EmptyTensor.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <mutex>
#include <unordered_map>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#include <sys/sysinfo.h>
#endif

namespace fusedreg {
namespace cpu {

#if defined(__linux__) && defined(MADV_HUGEPAGE)
class BlockCache {
 public:
  struct Block {
    void* ptr;
    size_t len;
  };

  // The process-wide cache (never destroyed: tensors may be freed during interpreter exit).
  static BlockCache& get() {
    static BlockCache* cache = new BlockCache();
    return *cache;
  }

  // A cached block of exactly len bytes, or nullptr.
  Block* take(size_t len) {
    std::lock_guard<std::mutex> lock(mutex_);
    auto it = free_.find(len);
    if (it == free_.end() || it->second.empty()) return nullptr;
    Block* b = it->second.back();
    it->second.pop_back();
    cached_ -= len;
    return b;
  }

  // Keeps b for reuse, or frees it (cache full, disabled, or memory low).
  void give(Block* b) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      if (cap_ > 0 && cached_ + b->len <= cap_ && !memory_low()) {
        free_[b->len].push_back(b);
        cached_ += b->len;
        return;
      }
    }
    if (memory_low()) release();
    destroy(b);
  }

  // Frees every cached block.
  void release() {
    std::vector<Block*> all;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      for (auto& kv : free_) all.insert(all.end(), kv.second.begin(), kv.second.end());
      free_.clear();
      cached_ = 0;
    }
    for (Block* b : all) destroy(b);
  }

  static void destroy(Block* b) {
    std::free(b->ptr);
    delete b;
  }

 private:
  BlockCache() {
    struct sysinfo si {};
    const uint64_t ram = sysinfo(&si) == 0 ? uint64_t(si.totalram) * si.mem_unit : 0;
    total_ram_ = ram;
    cap_ = static_cast<size_t>(std::min<uint64_t>(uint64_t(1) << 30, ram / 16));
    if (const char* env = std::getenv("FUSEDREG_CPU_CACHE_MB")) {
      char* end = nullptr;
      const long long mb = std::strtoll(env, &end, 10);
      if (end != env && mb >= 0) cap_ = static_cast<size_t>(mb) << 20;
    }
  }

  // True when MemAvailable is under an eighth of RAM. sysinfo's free + buffer RAM (a
  // syscall, no parsing) answers first; only when that alone is low is /proc/meminfo read
  // (MemAvailable also counts the page cache the kernel can drop).
  bool memory_low() const {
    if (total_ram_ == 0) return false;
    const uint64_t threshold = total_ram_ / 8;
    struct sysinfo si {};
    if (sysinfo(&si) == 0 && (uint64_t(si.freeram) + si.bufferram) * si.mem_unit > threshold)
      return false;
    std::FILE* f = std::fopen("/proc/meminfo", "r");
    if (!f) return false;
    char line[256];
    unsigned long long kb = 0;
    bool found = false;
    while (std::fgets(line, sizeof line, f)) {
      if (std::sscanf(line, "MemAvailable: %llu kB", &kb) == 1) {
        found = true;
        break;
      }
    }
    std::fclose(f);
    return found && uint64_t(kb) * 1024 < threshold;
  }

  std::mutex mutex_;
  std::unordered_map<size_t, std::vector<Block*>> free_;
  size_t cached_ = 0;
  size_t cap_ = 0;
  uint64_t total_ram_ = 0;
};

struct HugeAlignedAllocator final : c10::Allocator {
  static constexpr size_t kHuge = size_t(2) << 20;
  static void free_block(void* ctx) {
    if (ctx) BlockCache::get().give(static_cast<BlockCache::Block*>(ctx));
  }
  c10::DataPtr allocate(size_t n) override {
    if (n == 0) return {nullptr, nullptr, &free_block, at::Device(at::kCPU)};
    const size_t len = (n + kHuge - 1) / kHuge * kHuge;
    BlockCache& cache = BlockCache::get();
    BlockCache::Block* b = cache.take(len);
    if (b == nullptr) {
      void* p = nullptr;
      if (posix_memalign(&p, kHuge, len) != 0) {
        cache.release();
        TORCH_CHECK(posix_memalign(&p, kHuge, len) == 0, "fusedreg: out of memory allocating ", n,
                    " bytes");
      }
      madvise(p, len, MADV_HUGEPAGE);  // a hint: failure leaves small pages, nothing worse
      b = new BlockCache::Block{p, len};
    }
    return {b->ptr, b, &free_block, at::Device(at::kCPU)};
  }
  c10::DeleterFnPtr raw_deleter() const override { return nullptr; }
  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }
};

// at::empty(sizes, options) (contiguous, CPU); from HugeAlignedAllocator (and its cache of
// freed blocks) when 4 MiB or more.
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
