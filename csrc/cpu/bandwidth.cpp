// Bandwidth probes of the benchmark (fusedreg/bench/limits.py): the fastest kernels of each
// memory-access pattern the fused ops have, so that an op's time can be reported as a
// fraction of its own pattern's limit on this machine. They are instruments, not fusedreg
// ops: their own library (`fusedreg_bench`, schemas below, not in csrc/ops.cpp), CPU only,
// no fake functions or autograd.
//
//   stream(reads, writes, nontemporal,   every write[j] = XOR of all reads: reads n arrays once,
//          prefetch=0)                   writes m arrays once (out-of-place streaming)
//   update(rw, reads, nontemporal,       every rw[j] ^= XOR of reads: reads and rewrites the rw
//          prefetch=0)                   arrays in place, reads the others (an optimizer step)
//   reduce(reads, prefetch=0) -> int     XOR of everything read (read-only reduction)
//
// prefetch > 0: each line software-prefetched into L2 that many bytes ahead: every array's
// (with non-temporal stores, the arrays read only: a line about to be streamed out is not
// fetched). For arrays beyond what the caches keep this can beat the plain pass (the
// optimizers' kernels do it), so the limit has to be measured with it too.
//
// All operands have the same number of bytes, a multiple of 64, 64-byte aligned (torch's CPU
// allocator aligns to 64). The XOR keeps every byte read without costing any arithmetic.
// Threads take equal contiguous ranges (at::parallel_for), as a well-threaded streaming
// kernel does. nontemporal: 64-byte streaming stores, which skip the read-for-ownership of
// the destination lines (and bypass the caches: a win only past the last-level cache).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstdint>
#include <vector>

#include "fusedreg/cpu/isa.h"
#include "fusedreg/macros.h"

#if FUSEDREG_X86_DISPATCH
#include <immintrin.h>
#endif

namespace fusedreg {
namespace {

constexpr int64_t kLine = 64;             // bytes per step (one cache line, one zmm)
constexpr int64_t kGrainLines = 1 << 10;  // 64 KiB per thread at least
constexpr int kMaxArrays = 4;             // reads, and writes, per call at most

struct Operands {
  std::vector<const char*> reads;
  std::vector<char*> writes;
  int64_t lines = 0;
  int64_t prefetch = 0;  // bytes ahead (0: no software prefetch)
};

Operands check(const std::vector<at::Tensor>& reads, const std::vector<at::Tensor>& writes,
               const char* name) {
  TORCH_CHECK(!reads.empty() || !writes.empty(), "fusedreg_bench::", name, ": no operands");
  TORCH_CHECK(reads.size() <= kMaxArrays && writes.size() <= kMaxArrays, "fusedreg_bench::", name,
              ": at most ", kMaxArrays, " arrays read and ", kMaxArrays, " written");
  const at::Tensor& first = reads.empty() ? writes[0] : reads[0];
  const int64_t nbytes = first.nbytes();
  TORCH_CHECK(nbytes % kLine == 0, "fusedreg_bench::", name, ": operands must be a multiple of 64 bytes");
  Operands ops;
  ops.lines = nbytes / kLine;
  for (const auto* list : {&reads, &writes}) {
    for (const at::Tensor& t : *list) {
      TORCH_CHECK(t.device().is_cpu() && t.is_contiguous() && t.nbytes() == static_cast<size_t>(nbytes),
                  "fusedreg_bench::", name, ": operands must be contiguous CPU tensors of the same size");
      TORCH_CHECK(reinterpret_cast<uintptr_t>(t.const_data_ptr()) % kLine == 0,
                  "fusedreg_bench::", name, ": operands must be 64-byte aligned");
    }
  }
  for (const at::Tensor& t : reads) ops.reads.push_back(static_cast<const char*>(t.const_data_ptr()));
  for (const at::Tensor& t : writes) ops.writes.push_back(static_cast<char*>(t.mutable_data_ptr()));
  return ops;
}

#if FUSEDREG_X86_DISPATCH
// Lines [begin, end) with AVX-512, NR reads and NW writes known at compile time (so the
// pointers stay in registers and the line loop is straight-line code): one cache line per
// load and store.
template <bool IN_PLACE, int NR, int NW, bool NT, bool PF>
FUSEDREG_TARGET_AVX512 void lines_avx512(const Operands& ops, int64_t begin, int64_t end) {
  const char* r[NR > 0 ? NR : 1];
  char* w[NW > 0 ? NW : 1];
  for (int k = 0; k < NR; ++k) r[k] = ops.reads[k];
  for (int k = 0; k < NW; ++k) w[k] = ops.writes[k];
  const int64_t pf_end = ops.lines * kLine - ops.prefetch;  // never past the arrays' end
  for (int64_t off = begin * kLine; off < end * kLine; off += kLine) {
    if (PF && off < pf_end) {
      for (int k = 0; k < NR; ++k) _mm_prefetch(r[k] + off + ops.prefetch, _MM_HINT_T1);
      if (!NT) {  // a line about to be streamed out is not fetched
        for (int k = 0; k < NW; ++k) _mm_prefetch(w[k] + off + ops.prefetch, _MM_HINT_T1);
      }
    }
    __m512i v = _mm512_setzero_si512();
    for (int k = 0; k < NR; ++k) v = _mm512_xor_si512(v, _mm512_load_si512(r[k] + off));
    for (int k = 0; k < NW; ++k) {
      const __m512i x = IN_PLACE ? _mm512_xor_si512(v, _mm512_load_si512(w[k] + off)) : v;
      if (NT) {
        _mm512_stream_si512(reinterpret_cast<__m512i*>(w[k] + off), x);
      } else {
        _mm512_store_si512(w[k] + off, x);
      }
    }
  }
  if (NT) _mm_sfence();
}

// The variant for ops' counts (reads 0..4, writes 0..4; more is refused by check()).
template <bool IN_PLACE, int NR = 0, int NW = 0>
void lines_avx512_any(const Operands& ops, int64_t begin, int64_t end, bool nontemporal) {
  if constexpr (NR < kMaxArrays) {
    if (static_cast<int>(ops.reads.size()) > NR) return lines_avx512_any<IN_PLACE, NR + 1, NW>(ops, begin, end, nontemporal);
  }
  if constexpr (NW < kMaxArrays) {
    if (static_cast<int>(ops.writes.size()) > NW) return lines_avx512_any<IN_PLACE, NR, NW + 1>(ops, begin, end, nontemporal);
  }
  if (nontemporal) {
    if (ops.prefetch > 0) return lines_avx512<IN_PLACE, NR, NW, true, true>(ops, begin, end);
    return lines_avx512<IN_PLACE, NR, NW, true, false>(ops, begin, end);
  }
  if (ops.prefetch > 0) return lines_avx512<IN_PLACE, NR, NW, false, true>(ops, begin, end);
  lines_avx512<IN_PLACE, NR, NW, false, false>(ops, begin, end);
}
#endif

// Lines [begin, end), 8 bytes at a time (ordinary stores only).
template <bool IN_PLACE>
void lines_portable(const Operands& ops, int64_t begin, int64_t end) {
  const int64_t nr = static_cast<int64_t>(ops.reads.size());
  const int64_t nw = static_cast<int64_t>(ops.writes.size());
  const int64_t pf_end = ops.lines * kLine - ops.prefetch;
  for (int64_t q = begin * (kLine / 8); q < end * (kLine / 8); ++q) {
    if (ops.prefetch > 0 && q % (kLine / 8) == 0 && q * 8 < pf_end) {
      const int64_t at = q * 8 + ops.prefetch;
      for (int64_t k = 0; k < nr; ++k) __builtin_prefetch(ops.reads[k] + at, 0, 2);
      for (int64_t k = 0; k < nw; ++k) __builtin_prefetch(ops.writes[k] + at, 0, 2);
    }
    uint64_t v = 0;
    for (int64_t k = 0; k < nr; ++k) v ^= reinterpret_cast<const uint64_t*>(ops.reads[k])[q];
    for (int64_t k = 0; k < nw; ++k) {
      uint64_t* dst = reinterpret_cast<uint64_t*>(ops.writes[k]) + q;
      *dst = IN_PLACE ? (*dst ^ v) : v;
    }
  }
}

// v = XOR of reads (and of write[j] itself when in place), stored to each write.
template <bool IN_PLACE>
void run(const Operands& ops, bool nontemporal) {
  at::parallel_for(0, ops.lines, kGrainLines, [&](int64_t begin, int64_t end) {
#if FUSEDREG_X86_DISPATCH
    if (cpu::cpu_has_avx512()) return lines_avx512_any<IN_PLACE>(ops, begin, end, nontemporal);
#endif
    lines_portable<IN_PLACE>(ops, begin, end);
  });
}

void check_prefetch(int64_t prefetch, const char* name) {
  TORCH_CHECK(prefetch >= 0 && prefetch % kLine == 0, "fusedreg_bench::", name,
              ": prefetch is a non-negative multiple of 64 bytes, got ", prefetch);
}

void stream_cpu(at::TensorList reads, at::TensorList writes, bool nontemporal, int64_t prefetch) {
  check_prefetch(prefetch, "stream");
  Operands ops = check(reads.vec(), writes.vec(), "stream");
  ops.prefetch = prefetch;
  run<false>(ops, nontemporal);
}

void update_cpu(at::TensorList rw, at::TensorList reads, bool nontemporal, int64_t prefetch) {
  check_prefetch(prefetch, "update");
  TORCH_CHECK(!(nontemporal && prefetch), "fusedreg_bench::update: prefetch is with ordinary "
              "stores (an in-place pass reads every line it writes)");
  Operands ops = check(reads.vec(), rw.vec(), "update");
  ops.prefetch = prefetch;
  run<true>(ops, nontemporal);
}

int64_t reduce_cpu(at::TensorList reads, int64_t prefetch) {
  check_prefetch(prefetch, "reduce");
  const Operands ops = check(reads.vec(), {}, "reduce");
  const int64_t nr = static_cast<int64_t>(ops.reads.size());
  constexpr int64_t kWordsPerLine = kLine / 8;
  constexpr int64_t kBlock = 64 * kWordsPerLine;  // words per step: 4 KiB of each array
  const int64_t words = ops.lines * kWordsPerLine;
  const int64_t pf_end = ops.lines * kLine - prefetch;  // never past the arrays' end
  return at::parallel_reduce(
      int64_t(0), words, kGrainLines * kWordsPerLine, int64_t(0),
      [&](int64_t begin, int64_t end, int64_t acc) {
        return cpu::dispatch_isa([&](auto) FUSEDREG_ALWAYS_INLINE {
          uint64_t v = static_cast<uint64_t>(acc);
          for (int64_t b = begin; b < end; b += kBlock) {
            const int64_t e = b + kBlock < end ? b + kBlock : end;
            for (int64_t k = 0; k < nr; ++k) {
              const uint64_t* r = reinterpret_cast<const uint64_t*>(ops.reads[k]);
              if (prefetch > 0) {
                for (int64_t q = b; q < e && q * 8 < pf_end; q += kWordsPerLine) {
                  __builtin_prefetch(ops.reads[k] + q * 8 + prefetch, 0, 2);
                }
              }
#pragma omp simd reduction(^ : v)
              for (int64_t q = b; q < e; ++q) v ^= r[q];
            }
          }
          return static_cast<int64_t>(v);
        });
      },
      [](int64_t a, int64_t b) { return a ^ b; });
}

// The L3 size the kernels choose their store kinds and steps by (cpu::l3_bytes), for the
// benchmark's header and the test of FUSEDREG_CPU_L3_MIB.
int64_t kernels_l3_bytes() { return fusedreg::cpu::l3_bytes(); }

}  // namespace

TORCH_LIBRARY(fusedreg_bench, m) {
  m.def("l3_bytes() -> int", &kernels_l3_bytes);
  m.def("stream(Tensor[] reads, Tensor(a!)[] writes, bool nontemporal, int prefetch=0) -> ()");
  m.def("update(Tensor(a!)[] rw, Tensor[] reads, bool nontemporal, int prefetch=0) -> ()");
  m.def("reduce(Tensor[] reads, int prefetch=0) -> int");
}

TORCH_LIBRARY_IMPL(fusedreg_bench, CPU, m) {
  m.impl("stream", &stream_cpu);
  m.impl("update", &update_cpu);
  m.impl("reduce", &reduce_cpu);
}

}  // namespace fusedreg
