// for_each_task: how the CPU kernels spread independent tasks (row blocks) over threads.
//
// Why it exists, rather than at::parallel_for's static split:
// - it is dynamic: on a shared machine a thread that is descheduled takes fewer tasks instead
//   of holding the others at the end of the region;
// - yet each thread starts on its own contiguous range of tasks and takes from the back of
//   the others' ranges only when its own is empty: consecutive tasks write neighbouring rows
//   of the fresh (huge-page advised, fusedreg/cpu/alloc.h) outputs, and two threads that
//   first-touch the same 2 MiB page at once both zero a huge page in the fault handler, one
//   of them for nothing. With one shared counter the threads interleave their tasks and
//   collide on nearly every page.
// What it costs: one 64-bit compare-exchange per task (tasks should be tens of microseconds
// or more: a few rows, not single elements), a cache line per thread for the ranges, and
// tasks run in no fixed order, so a task must not depend on which thread runs it (the
// kernels keep reductions deterministic by fixing their blocks from the shape alone).
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <vector>

namespace fusedreg {
namespace cpu {

// Runs body(next_task) on every thread of the pool; next_task() hands out task indices
// 0..n_tasks-1, each once, then -1. body runs on the calling thread alone when there is one
// task or one thread. A range is one 64-bit word, [lo, hi) packed as two 32-bit halves, so
// that the owner (taking lo) and a thief (taking hi - 1) claim tasks with one
// compare-exchange; beyond 2^31 tasks a shared counter is used instead.
template <typename Body>
void for_each_task(int64_t n_tasks, const Body& body) {
  const int64_t n_threads = std::min<int64_t>(at::get_num_threads(), n_tasks);
  if (n_threads <= 1 || n_tasks >= (int64_t(1) << 31)) {
    std::atomic<int64_t> counter{0};
    auto next_task = [&]() -> int64_t {
      const int64_t t = counter.fetch_add(1, std::memory_order_relaxed);
      return t < n_tasks ? t : -1;
    };
    if (n_threads <= 1) return body(next_task);
    at::parallel_for(0, n_threads, 1, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) body(next_task);
    });
    return;
  }
  struct alignas(64) Range {
    std::atomic<uint64_t> lo_hi;
  };
  std::vector<Range> ranges(n_threads);
  for (int64_t i = 0; i < n_threads; ++i) {
    const uint64_t lo = i * n_tasks / n_threads, hi = (i + 1) * n_tasks / n_threads;
    ranges[i].lo_hi.store(lo | (hi << 32), std::memory_order_relaxed);
  }
  // Claims the front (own range) or back (another's) task of range r; -1 when it is empty.
  auto claim = [&](int64_t r, bool front) -> int64_t {
    std::atomic<uint64_t>& a = ranges[r].lo_hi;
    uint64_t v = a.load(std::memory_order_relaxed);
    for (;;) {
      const uint64_t lo = v & 0xffffffffu, hi = v >> 32;
      if (lo >= hi) return -1;
      const uint64_t nv = front ? (lo + 1) | (hi << 32) : lo | ((hi - 1) << 32);
      if (a.compare_exchange_weak(v, nv, std::memory_order_relaxed)) return front ? lo : hi - 1;
    }
  };
  at::parallel_for(0, n_threads, 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      int64_t k = 0;  // ranges emptied so far, own range first
      auto next_task = [&]() -> int64_t {
        for (; k < n_threads; ++k) {
          const int64_t t = claim((i + k) % n_threads, k == 0);
          if (t >= 0) return t;
        }
        return -1;
      };
      body(next_task);
    }
  });
}

}  // namespace cpu
}  // namespace fusedreg
