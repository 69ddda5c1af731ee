// CPU kernels of layer_norm: y = norm(h) * w + b with h = residual + dropout(x)
// (LayerNorm, or RMSNorm when rms). The math is written out in fusedreg/reference/layer_norm.py.
//
// x, residual, h, y, dy: (M, N) contiguous rows; weight, bias: (N,); mean, rstd: (M,).
// Row blocks are spread over threads by cpu::for_each_task (fusedreg/cpu/scheduler.h) and run
// at the CPU's instruction-set level (fusedreg/cpu/isa.h). Each row is copied once into an
// fp32 scratch row (L1/L2 resident) so the statistics and the output read it from cache (a
// bf16 or fp16 row of a plain norm, without dropout or residual, is read in place instead, each
// vector widened in registers and y rounded in registers: plain_row), and
// the dropout uniforms of a row are drawn in bulk (fusedreg/cpu/uniforms.h; at the AVX-512
// level 0/1 floats from the Philox words' keep bits instead, fusedreg/cpu/keep_bits.h: read as
// the uniforms are, u >= p, the same decisions and the same loops). Sums run in
// blocks of kSumBlock (a two-level sum: error ~ sqrt(N / kSumBlock) * kSumBlock * eps instead
// of N * eps); the statistics sums run in vectors of the level's width with several accumulators
// (row_sum_vec, bwd_sums), so that they are not bound by the latency of one add chain.
//
// grad_weight / grad_bias: the rows are cut into row blocks that depend only on (M, N); each
// block accumulates its fp32 partial row, and the partials are summed in block order, so
// the result is bitwise the same for any number of threads.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <memory>
#include <type_traits>
#include <vector>

#include "fusedreg/cpu/alloc.h"
#include "fusedreg/cpu/isa.h"
#include "fusedreg/cpu/keep_bits.h"
#include "fusedreg/cpu/philox_stream.h"
#include "fusedreg/cpu/rows.h"
#include "fusedreg/cpu/scheduler.h"
#include "fusedreg/cpu/uniforms.h"
#include "fusedreg/host.h"
#include "fusedreg/macros.h"
#include "fusedreg/philox.h"

namespace fusedreg {
namespace {

constexpr int64_t kSumBlock = 512;

using cpu::dispatch_isa;
using cpu::empty_output;

// Calls of fewer elements run on the calling thread. A parallel region's other threads join it
// a few microseconds late on the 2-vCPU VMs (in a profile of a float32 8x4096 forward at two
// threads, the calling thread ran 85% of the row blocks, taking over the other thread's), so
// a call of a few microseconds lost more to the region than it gained: the ops alone, Intel
// Xeon VM, one / two threads (us, min of 7x500 calls, with the op's dispatch from Python):
// forward float32 8x4096 11.7 / 14.1, 16x4096 18.1 / 13.1; bf16 13.9 / 17.2 and 22.4 / 17.4;
// backward (grad_weight and grad_bias, one row block below 64K elements) float32 4x4096 14.5
// / 17.5, 128x768 41.3 / 52.7, 64x4096 163.5 / 84.9 (the partials' sum below is serial too).
constexpr int64_t kParallelMinElements = int64_t(1) << 16;

// cpu::for_each_task, or (parallel false) body on the calling thread with the tasks in order.
template <typename Body>
void for_each_task(int64_t n_tasks, bool parallel, const Body& body) {
  if (parallel) return cpu::for_each_task(n_tasks, body);
  int64_t t = 0;
  body([&]() -> int64_t { return t < n_tasks ? t++ : -1; });
}

// ---- rows in and out -------------------------------------------------------------------------
// The element loops below run on acc_t rows: a float / double row is read in place, a bf16 /
// fp16 row is first converted into a scratch row (fusedreg/cpu/rows.h, exact). Outputs are
// computed in acc_t and written back rounded as c10 rounds; a large output is written with
// non-temporal stores (Out::nt). Scratch rows are placed per row away from the row's streams
// in their 4 KiB page offset (fusedreg/cpu/rows.h).

// Outputs of at least this many bytes are written with non-temporal stores (AVX-512 level):
// they skip the read-for-ownership of every destination line (a third of a 1-read-1-write
// row's traffic) but leave the output outside the caches, which is where an output this large
// ends up anyway before the next pass reads it. Smaller outputs stay cache resident.
constexpr int64_t kNonTemporalMinBytes = int64_t(8) << 20;

inline bool use_nt(int64_t bytes) { return bytes >= kNonTemporalMinBytes && cpu::cpu_has_avx512(); }

// The forward of a bf16 / fp16 x streams its outputs only when the bytes it reads and writes
// (x, residual, y, h) exceed the L3 (cpu::l3_bytes): at or under it the next call (or op)
// finds them in the L3, and the half-precision forward, whose widening and rounding make it
// less bound by memory than the float one, lost more to the L3 misses than the streaming
// saved (AMD EPYC, 32 MiB L3: bf16 rms_norm 8192x1024, one thread, 1.22 ms streamed against
// 1.17 ms cached, layer_norm 1.57 against 1.48 ms). The float forwards keep use_nt's rule
// (float32 layer_norm 4096x1024, 32 MiB read and written, one thread: 0.76 ms streamed, 1.04
// ms cached).
inline bool fwd_half_nt(int64_t footprint_bytes) {
  return footprint_bytes > cpu::l3_bytes() && use_nt(footprint_bytes);
}

// The float forwards stream their outputs (out_bytes, use_nt's rule) only when the bytes the
// call reads and writes (footprint_bytes) are at least the L3, every backward when they are at
// least half of it: below that the outputs, and the inputs the next call reads, stay cache
// resident. Measured on the Intel Xeon VM (L3 taken as 64 MiB, cpu::l3_bytes; min and median
// of 30-60 alternating calls, one and two threads, against streaming every output of 8 MiB
// or more): float32 forward 512x4096 / 1024x4096 (16 / 32 MiB) 0.91-1.01x torch's time
// against 1.00-1.16x streamed; float32 backward at 512x4096 (24 MiB) 0.77-0.87 of the streamed
// time, at 1024x4096 (48 MiB) 0.99-1.17 of it, bf16 backward 1024x4096 (24 MiB) 0.76 of it on
// two threads, 2048x4096 (48 MiB) 1.08 — hence the backward's half. On the AMD EPYC (32 MiB
// L3) every output of 8 MiB or more still streams in the backward, and the forward's float32
// 4096x1024 (32 MiB, the L3's size) does, which streamed took 0.76 against 1.04 ms cached.
inline bool stream_fwd_rows(int64_t out_bytes, int64_t footprint_bytes) {
  return footprint_bytes >= cpu::l3_bytes() && use_nt(out_bytes);
}
inline bool stream_bwd_rows(int64_t out_bytes, int64_t footprint_bytes) {
  return 2 * footprint_bytes >= cpu::l3_bytes() && use_nt(out_bytes);
}

// Both passes stream at any thread count. The forward used ordinary stores on one thread while
// its streamed rows went through whole-row scratch rows: those rows (y, and h beside the row
// of h the statistics read) crowded the next row's prefetched inputs out of L1. It now stages
// y chunk by chunk and streams h from the row the statistics read (forward_rows), and
// streaming wins on one thread too (float32, one thread, min of blocks: layer_norm 8192x1024
// 2.15 -> 2.06 ms, 2048x4096 2.55 -> 2.46, 4096x1024 1.105 -> 1.054; dropout_add_layer_norm
// 8192x1024 6.97 -> 5.22 ms).

// Calls of at least this many elements place their scratch rows per row (cpu::ScratchRows).
constexpr int64_t kPlaceMinElements = int64_t(1) << 16;

// The backward places its scratch rows (above) only for rows of at least this many bytes (of
// acc_t). The placement depends on the streams' page offsets, the dW / dB partial rows among
// them, and each row block's partial rows lie elsewhere: a call of rows shorter than a page
// searched anew for every block (one search per distinct set of offsets, up to 4096 / row
// bytes of them), about a microsecond per block for rows of 128 floats. Unplaced, such rows
// were as fast or faster (float32, one thread, the op alone, three alternating rounds, us:
// 512x128 32-33 against 33-38, 1024x128 61-64 against 61-77, 1536x128 90-104 against
// 108-119; two threads, 8192x128 258-280 against 277-323).
constexpr int64_t kBwdPlaceMinRowBytes = 1024;

// Backward row blocks of calls of 2^16 to 2^18 elements with rows of up to this many elements
// have 16K elements rather than 64K (backward_kernel), so that such a call has four or more
// blocks and runs on two threads: BERT-width rows (128-768) sat in one or two blocks, on the
// calling thread alone. Intel Xeon VM, two threads, with kBwdPlaceMinRowBytes, the op alone
// with dW and dB, float32 (us): 512x128 24-26 against 35-36 (dropout 0.1 + residual: 42-43
// against 71-77), 1024x128 38-41 against 69-73 (72-78 against 156-164), 96x768 22-23 against
// 26-27, 128x768 26-28 against 34-36 (47-51 against 76-84), 256x768 42-50 against 50-59;
// bf16 512x128 24-29 against 46-47 (43-49 against 82-84). One thread: within the noise
// (512x128 32-33 against 33-38). Longer rows were not shortened: at 1024-2048 elements the
// one-thread time rose 5-10%, and with 64K blocks the calls of 2^18 and more already have
// four or more.
constexpr int64_t kShortRowsMaxN = 768;

// The row as acc_t: src itself, or its conversion into scratch.
template <typename acc_t, typename T>
inline FUSEDREG_ALWAYS_INLINE const acc_t* row_as_acc(const T* src, acc_t* scratch, int64_t n) {
  if (!src) return nullptr;
  if constexpr (std::is_same_v<T, acc_t>) {
    return src;
  } else {
    static_assert(std::is_same_v<acc_t, float>, "bf16/fp16 rows compute in float");
    cpu::row_to_float(src, scratch, n);
    return scratch;
  }
}

// Where the loop writes output row dst (of T) in acc_t: dst itself when T is acc_t and the row
// is stored in place (not non-temporal), else the scratch row that write_row then stores.
template <typename acc_t, typename T>
inline FUSEDREG_ALWAYS_INLINE acc_t* out_row(T* dst, acc_t* scratch, bool nt) {
  if constexpr (std::is_same_v<T, acc_t>) {
    if (!nt) return dst;
  }
  return scratch;
}

// dst[0, n) = the acc_t row src (out_row's answer) rounded to T; bits: an n-element scratch
// of T for the rounded row of a non-temporal store.
template <cpu::Isa ISA, typename acc_t, typename T>
inline FUSEDREG_ALWAYS_INLINE void write_row(T* dst, const acc_t* src, int64_t n, bool nt, T* bits) {
  if constexpr (std::is_same_v<T, acc_t>) {
    if (nt) cpu::store_row_nt<ISA>(dst, src, n * int64_t(sizeof(T)));
  } else {
    static_assert(std::is_same_v<acc_t, float>, "bf16/fp16 rows compute in float");
    if (!nt) return cpu::row_from_float(src, dst, n);
    cpu::row_from_float(src, bits, n);
    cpu::store_row_nt<ISA>(dst, bits, n * int64_t(sizeof(T)));
  }
}

// ---- forward --------------------------------------------------------------------------------

template <typename x_t, typename w_t, typename h_t>
struct FwdArgs {
  using acc_t = at::opmath_type<x_t>;
  const x_t* x;         // (M, N)
  const h_t* residual;  // (M, N) or null
  const w_t* w;         // (N,) or null
  const w_t* b;         // (N,) or null
  x_t* y;               // (M, N)
  h_t* h;               // (M, N) or null (not stored)
  acc_t* mean;          // (M,) or null (rms)
  acc_t* rstd;          // (M,)
  int64_t N;
  acc_t eps;
  float p;
  uint64_t seed;
  bool rms;
  bool nt;              // y and h with non-temporal stores
  uint32_t keep_t;      // cpu::keep_threshold(p) (with dropout)
};

// The hardware prefetchers stop at 4 KiB page boundaries, and a row of 1024 floats is one
// page: left alone, every row would start its input streams cold (the loads of the first
// pass over a row were the hot spot). So the last pass over row r, which works from L1,
// prefetches row r + 1's inputs chunk by chunk (or row r + 2's: kRowsAhead). Only for rows up to kPrefetchRowBytes:
// longer rows would evict the current one, and the prefetchers ramp up within them anyway.
constexpr int64_t kPrefetchChunk = 64;  // elements per prefetch step of the last pass
constexpr int64_t kPrefetchRowBytes = 16384;
// The backward prefetches rows shorter than 16 KiB: its store pass over a row of 4096 floats
// reads g and h (32 KiB) from L2 already, and the next row's 32 KiB prefetched into the 48 KiB
// L1 beside them evicted what the pass was reading (2048x4096 float32, one thread: 5.0 ms
// without the prefetch against 5.8 ms with it; rows of 1024 gain from it).
constexpr int64_t kBwdPrefetchRowBytes = kPrefetchRowBytes - 1;
// Rows of at least this many bytes (AVX-512 level, with dW or dB to accumulate) go through the
// backward's sums pass two at a time: the weight row and the dW / dB partial rows, which no
// longer fit in L1 beside a row of dy and h, are loaded and stored once for both rows
// (float32, one thread, with dW and dB: 2048x4096 4.5 ms against 5.0 ms, 1024x1024 0.50
// against 0.555 ms, 256x1024 0.120 against 0.136 ms; 4096x1024 1.70-1.73 ms either way).
constexpr int64_t kPairRowBytes = 4096;
// kPairPrefetch: a pair's second row was not prefetched (only the row after the pair, in
// the second store pass), and the pair loop waited on its loads of dy and h from memory:
// on the AMD EPYC (Zen 5) machine, float32 8192x1024 with dW and dB, one thread, perf put
// about half of the kernel's samples on the instructions after those two loads. The store
// passes now prefetch both rows of the next pair, side by side, half of each row in each
// store pass, in the order the pair loop reads them: one thread, the op alone, alternating
// processes (min of 15 blocks, loaded machine), 3.29-3.59 ms before, 2.55-2.66 ms with each
// store pass prefetching one of the rows (the first pass the first row), 2.36-2.87 ms side
// by side (against 2.66-3.37 ms in the same alternation). Only for calls whose outputs
// stream (Out::nt, 8 MiB and more: the inputs come from memory): at 1024x1024, in the
// caches, the side-by-side prefetches made the backward slower (0.208-0.223 against
// 0.184-0.196 ms), and such calls keep the one prefetched row after the pair. Builds that
// differ only in how these prefetch loops are written moved both sizes by 5-10% either way
// (code layout: prefetch_chunk loops inside store_grads against this callable, as two
// separately linked builds, 8192x1024 2.56-2.76 against 2.53-2.72 ms, 1024x1024 0.186-0.204
// against 0.176-0.187 ms); differences of that size here are not the prefetches'.
// Elements per step of a row's last pass, which also generates dropout uniforms and stores
// the outputs step by step: 32 Philox groups, the AVX-512 kernel's widest block (uniforms.h).
constexpr int64_t kStoreChunk = 2 * kPrefetchChunk;

// Prefetches the cache lines of p[j0, j0 + kPrefetchChunk) (nothing when p is null).
template <typename T>
inline FUSEDREG_ALWAYS_INLINE void prefetch_chunk(const T* p, int64_t j0) {
  if (!p) return;
  const char* c = reinterpret_cast<const char*>(p + j0);
  for (int64_t k = 0; k < kPrefetchChunk * int64_t(sizeof(T)); k += 64) __builtin_prefetch(c + k, 0, 3);
}

// Prefetches the cache lines of p[a, b) (nothing when p is null).
template <typename T>
inline FUSEDREG_ALWAYS_INLINE void prefetch_range(const T* p, int64_t a, int64_t b) {
  if (!p) return;
  const char* c = reinterpret_cast<const char*>(p);
  for (int64_t k = a * int64_t(sizeof(T)) & ~int64_t(63); k < b * int64_t(sizeof(T)); k += 64)
    __builtin_prefetch(c + k, 0, 3);
}

// Row r + 1 of a (rows, N) array, or null when there is none or rows are too long to prefetch.
// limit: the longest row prefetched, in bytes.
// Whether rows of N elements of x_t and of h_t are a whole number of 4 KiB pages long: then
// every row starts at the same page offsets as the first, and the first row's scratch
// placement (cpu::ScratchRows::place) holds for all. Placing once saves a lookup per row
// (which, until its key was packed in registers, read back wide a key just stored narrow and
// waited for every store still buffered: with a row's outputs in flight, 8% of the dropout
// forward's time).
template <typename x_t, typename h_t>
constexpr bool same_page_offsets(int64_t N) {
  return (N * int64_t(sizeof(x_t))) % 4096 == 0 && (N * int64_t(sizeof(h_t))) % 4096 == 0;
}

template <typename T>
inline FUSEDREG_ALWAYS_INLINE const T* next_row(const T* a, int64_t r, int64_t rows, int64_t N,
                                                int64_t limit = kPrefetchRowBytes) {
  return a && r + 1 < rows && N * int64_t(sizeof(T)) <= limit ? a + (r + 1) * N : nullptr;
}

// kRowsAhead: how many rows on the last pass over a row prefetches. One row of 1024 floats,
// fetched during the last pass over the row before it, came too late on the AMD EPYC
// (Zen 5) machine: that pass is a third of a row's time, shorter than the fetch, and perf
// put about a third of the float32 forward's samples (8192x1024, one thread) on the first
// pass's loads. Two rows ahead, float32, one thread, alternating processes (min of 15-20
// blocks, load 2-3): layer_norm forward 8192x1024 1.97-2.07 -> 1.53-1.55 ms, 4096x1024
// 0.66-0.84 -> 0.64-0.70 ms, dropout_add_layer_norm forward 8192x1024 4.59-4.75 -> 4.20-4.67
// ms, the backward's single rows (no pairs) 4096x768 0.88-0.93 -> 0.75-0.77 ms. Only for
// calls whose outputs stream (Out::nt: 8 MiB and more, so the inputs come from memory) and
// float/double rows: at 1024x1024 (cache resident) the forward was no faster (0.136-0.137
// against 0.132-0.138 ms), the backward at 256x768 slower (0.048-0.049 against 0.045-0.046
// ms), and the bf16 forwards, bound by their conversions rather than by memory, slower
// (layer_norm 8192x1024 1.71-1.72 against 1.59-1.63 ms, rms_norm 1024x1024 0.159-0.164
// against 0.143-0.144 ms).
template <typename x_t>
inline int64_t rows_ahead(bool nt) {
  return nt && std::is_same_v<x_t, at::opmath_type<x_t>> ? 2 : 1;
}

// v = h = residual + dropout(x) (acc_t rows; stored to hr if STORE_H); returns sum(v).
// The switches are template parameters so that each variant is one vectorized loop.
template <bool DROPOUT, bool RESIDUAL, bool STORE_H, typename acc_t>
inline FUSEDREG_ALWAYS_INLINE acc_t load_h(const acc_t* xr, const acc_t* rr, const float* u, acc_t* hr, acc_t* v,
                                           int64_t N, float p, acc_t scale) {
  acc_t sum = 0;
  for (int64_t j0 = 0; j0 < N; j0 += kSumBlock) {
    const int64_t j1 = std::min(N, j0 + kSumBlock);
    acc_t s = 0;
#pragma omp simd reduction(+ : s)
    for (int64_t j = j0; j < j1; ++j) {
      acc_t t = xr[j];
      if constexpr (DROPOUT) t = u[j] >= p ? t * scale : acc_t(0);
      if constexpr (RESIDUAL) t += rr[j];
      if constexpr (STORE_H) hr[j] = t;
      v[j] = t;
      s += t;
    }
    sum += s;
  }
  return sum;
}

// bf16 rows read in place (the AVX-512 level's vectors of 16 floats): a bf16 is the high half of
// its float, so 16 bf16 widen to 16 floats by interleaving them with zero words, and 16 floats'
// bf16 roundings are their rounded words' high halves. (Widened by __builtin_convertvector and
// a shift, GCC made four instructions of it; the shuffle is one. These are not templates: GCC
// rejects the vector builtins on a vector type that depends on a template parameter.)
typedef uint16_t HalfX16 __attribute__((vector_size(32)));
typedef uint16_t HalfX32 __attribute__((vector_size(64)));
typedef uint32_t BitsX16 __attribute__((vector_size(64)));
typedef float FloatX16 __attribute__((vector_size(64)));
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wpsabi"  // inlined into the AVX-512 level's code only
inline FUSEDREG_ALWAYS_INLINE HalfX32 widen(HalfX16 h) {
  return __builtin_shufflevector(h, HalfX16{}, 16, 0, 16, 1, 16, 2, 16, 3, 16, 4, 16, 5, 16, 6, 16, 7, 16, 8, 16, 9,
                                 16, 10, 16, 11, 16, 12, 16, 13, 16, 14, 16, 15);
}
inline FUSEDREG_ALWAYS_INLINE HalfX16 high_halves(HalfX32 w) {
  return __builtin_shufflevector(w, w, 1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
}

// A vector V of floats (or doubles) from p: loaded, or from 16 bf16 or fp16 widened in
// registers (exact).
// fp16 is widened by vcvtph2ps written as inline assembly: this template has no target
// attribute (it serves every level), GCC refuses to inline an AVX-512 intrinsic (a function of
// that target) into it even where it is itself inlined into the AVX-512 level's code, and
// GCC 12 makes a scalar conversion per element of __builtin_convertvector from _Float16. The
// assembly is not volatile and names the 32 bytes it reads, so GCC schedules it as a load.
typedef uint16_t HalfX16Alias __attribute__((vector_size(32), may_alias));
template <typename V, typename T>
inline FUSEDREG_ALWAYS_INLINE V load_vec(const T* p) {
  V a;
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    static_assert(sizeof(V) == sizeof(FloatX16), "bf16 rows are read in place at the AVX-512 level only");
    HalfX16 h;
    std::memcpy(&h, p, sizeof(h));
    const HalfX32 u = widen(h);
    std::memcpy(&a, &u, sizeof(V));
  } else if constexpr (std::is_same_v<T, c10::Half>) {
    static_assert(sizeof(V) == sizeof(FloatX16) && FUSEDREG_X86_DISPATCH,
                  "fp16 rows are read in place at the AVX-512 level only");
    FloatX16 f;
    asm("vcvtph2ps %1, %0" : "=v"(f) : "m"(*reinterpret_cast<const HalfX16Alias*>(p)));
    std::memcpy(&a, &f, sizeof(V));
  } else {
    std::memcpy(&a, p, sizeof(V));
  }
  return a;
}

// The 16 floats a rounded to bf16 at p as c10 rounds (to nearest even; a NaN becomes 0x7FC0):
// cpu::row_from_float's integer path, in registers.
inline FUSEDREG_ALWAYS_INLINE void store_bf16(c10::BFloat16* p, FloatX16 a) {
  BitsX16 w;
  std::memcpy(&w, &a, sizeof(w));
  const BitsX16 r = (w & 0x7FFFFFFFu) > 0x7F800000u ? BitsX16{} + 0x7FC00000u : w + ((w >> 16) & 1u) + 0x7FFFu;
  HalfX32 words;
  std::memcpy(&words, &r, sizeof(words));
  const HalfX16 h = high_halves(words);
  std::memcpy(p, &h, sizeof(h));
}
#pragma GCC diagnostic pop

// The bytes of the vectors the statistics sums use at an instruction-set level: its register
// width. A 64-byte vector type at the AVX2 or baseline level is not one register of that level,
// and GCC's code for it there was slow: at AVX2 the forward at 1024x1024 (one thread) took
// 2.5x the time of the `omp simd` sums the vectors replaced (871 against 350 us).
template <cpu::Isa ISA>
constexpr int kSumVecBytes = ISA == cpu::Isa::kAvx512 ? 64 : (ISA == cpu::Isa::kAvx2 ? 32 : 16);

// sum(v) (SQ false) or sum((v - mu)^2) (SQ true) over a row, in vectors of the level's width
// (GCC/clang vector extensions, kSumVecBytes): four vector accumulators per block
// of kSumBlock, the block's vector sum added to the row's vector, whose lanes are added once at
// the end (pairwise); the elements past the last whole vector of a block in a scalar sum. One
// accumulator (the `omp simd` reduction) made each vector wait for the previous one's add or
// FMA, about 4 cycles, so these passes over an L1-resident row ran at a quarter of the loads'
// rate or less.
// T: acc_t, or bf16 / fp16 read in place (each vector widened in registers: the same values, so the
// same sums as over its fp32 copy).
// CENTER false (with SQ): sum(v^2), for RMSNorm, whose mu is 0: v - 0 is v for every v (-0 and
// NaN included), so the same sums as with CENTER, without a subtraction per vector.
template <cpu::Isa ISA, bool SQ, typename acc_t, typename T, bool CENTER = true>
inline FUSEDREG_ALWAYS_INLINE acc_t row_sum_vec(const T* v, int64_t N, acc_t mu) {
  typedef acc_t V __attribute__((vector_size(kSumVecBytes<ISA>)));
  constexpr int64_t L = kSumVecBytes<ISA> / int64_t(sizeof(acc_t));
  auto term = [&](int64_t j) FUSEDREG_ALWAYS_INLINE {
    V a = load_vec<V>(v + j);
    if constexpr (SQ) {
      if constexpr (CENTER) a -= mu;
      a *= a;
    }
    return a;
  };
  V row = {};
  acc_t tail = 0;
  for (int64_t j0 = 0; j0 < N; j0 += kSumBlock) {
    const int64_t j1 = std::min(N, j0 + kSumBlock);
    V s0 = {}, s1 = {}, s2 = {}, s3 = {};
    int64_t j = j0;
    for (; j + 4 * L <= j1; j += 4 * L) {
      s0 += term(j);
      s1 += term(j + L);
      s2 += term(j + 2 * L);
      s3 += term(j + 3 * L);
    }
    for (; j + L <= j1; j += L) s0 += term(j);
    acc_t t = 0;
    for (; j < j1; ++j) {
      const acc_t e = static_cast<acc_t>(v[j]);
      if constexpr (CENTER) {
        t += SQ ? (e - mu) * (e - mu) : e;
      } else {
        t += SQ ? e * e : e;
      }
    }
    row += (s0 + s1) + (s2 + s3);
    tail += t;
  }
  for (int64_t w = L / 2; w >= 1; w /= 2)
    for (int64_t l = 0; l < w; ++l) row[l] += row[l + w];
  return row[0] + tail;
}

template <cpu::Isa ISA, typename acc_t>
inline FUSEDREG_ALWAYS_INLINE acc_t row_sum(const acc_t* v, int64_t N) {
  return row_sum_vec<ISA, false>(v, N, acc_t(0));
}

// forward_rows' output expression for one vector (or element) v of a row, at column j: F & 1
// with the weight w, F & 2 with the bias b. F & 4 (RMSNorm's plain rows, mu 0): v * rs for
// (v - mu) * rs, the same values (v - 0 is v for every v, -0 and NaN included).
template <int F, typename V>
inline FUSEDREG_ALWAYS_INLINE V out_expr(V v, const float* w, const float* b, float mu, float rs, int64_t j) {
  if constexpr ((F & 4) != 0) {
    if constexpr ((F & 3) == 3) {
      return v * rs * load_vec<V>(w + j) + load_vec<V>(b + j);
    } else if constexpr ((F & 3) == 1) {
      return v * rs * load_vec<V>(w + j);
    } else if constexpr ((F & 3) == 2) {
      return v * rs + load_vec<V>(b + j);
    } else {
      return v * rs;
    }
  } else if constexpr (F == 3) {
    return (v - mu) * rs * load_vec<V>(w + j) + load_vec<V>(b + j);
  } else if constexpr (F == 1) {
    return (v - mu) * rs * load_vec<V>(w + j);
  } else if constexpr (F == 2) {
    return (v - mu) * rs + load_vec<V>(b + j);
  } else {
    return (v - mu) * rs;
  }
}

#if FUSEDREG_X86_DISPATCH
// lo and hi, 32 floats, rounded to bf16 at p as c10 rounds: by one vcvtne2ps2bf16 (round to
// nearest even, as c10), unless one of them is a NaN or a denormal, which the instruction
// rounds otherwise (it flushes denormal inputs and keeps a NaN's payload): then store_bf16.
FUSEDREG_TARGET_AVX512BF16 inline FUSEDREG_ALWAYS_INLINE void store_bf16x32_insn(c10::BFloat16* p, FloatX16 lo,
                                                                                FloatX16 hi) {
  constexpr int kNanOrDenormal = 0x01 | 0x80 | 0x20;  // quiet NaN, signaling NaN, denormal
  const __mmask16 klo = _mm512_fpclass_ps_mask((__m512)lo, kNanOrDenormal);
  const __mmask16 khi = _mm512_fpclass_ps_mask((__m512)hi, kNanOrDenormal);
  if (_kortestz_mask16_u8(klo, khi)) {
    _mm512_storeu_si512(p, (__m512i)_mm512_cvtne2ps_pbh((__m512)hi, (__m512)lo));  // lo in the low half
  } else {
    store_bf16(p, lo);
    store_bf16(p + 16, hi);
  }
}

// plain_row's output loop for a bf16 row at the AVX-512 level on a CPU with the BF16
// conversions: 32 rounded at a time by store_bf16x32_insn (the values cpu::row_from_float
// gives), kStoreChunk elements at a time with the next row nx prefetched and y streamed
// through bits when nt; F as out_expr's. The whole row in one call of this
// target (as half_plain_row): with a call per chunk of y, the calls' setup was a measurable
// part of a row of 1024 (two threads, the rows from the L3).
template <int F>
FUSEDREG_TARGET_AVX512BF16 __attribute__((noinline)) void bf16_row_out_avx512bf16(
    const c10::BFloat16* xr, c10::BFloat16* yr, const c10::BFloat16* nx, int64_t N, const float* w,
    const float* b, float mu, float rs, c10::BFloat16* bits, bool nt) {
  for (int64_t j0 = 0; j0 < N; j0 += kStoreChunk) {
    const int64_t j1 = std::min(N, j0 + kStoreChunk);
    for (int64_t k = j0; k < j1; k += kPrefetchChunk) prefetch_chunk(nx, k);
    c10::BFloat16* yc = nt ? bits : yr + j0;  // y[j] at yc[j - j0]
    int64_t j = j0;
    for (; j + 32 <= j1; j += 32) {
      store_bf16x32_insn(yc + (j - j0), out_expr<F>(load_vec<FloatX16>(xr + j), w, b, mu, rs, j),
                         out_expr<F>(load_vec<FloatX16>(xr + j + 16), w, b, mu, rs, j + 16));
    }
    for (; j + 16 <= j1; j += 16)
      store_bf16(yc + (j - j0), out_expr<F>(load_vec<FloatX16>(xr + j), w, b, mu, rs, j));
    for (; j < j1; ++j) yc[j - j0] = c10::BFloat16(out_expr<F>(static_cast<float>(xr[j]), w, b, mu, rs, j));
    if (nt) cpu::store_row_nt<cpu::Isa::kAvx512>(yr + j0, bits, (j1 - j0) * int64_t(sizeof(c10::BFloat16)));
  }
}
#endif

// y[0, n) = (x - mu) * rs * w + b (w, b: null when absent) rounded to bf16, from the bf16 row x
// read in place: forward_rows' output loop (the same expressions, so the same bits) with the
// row's fp32 copy and the fp32 staging of y left out. (A CPU with the BF16 conversions takes
// bf16_row_out_avx512bf16 instead.)
template <cpu::Isa ISA, int F>
inline FUSEDREG_ALWAYS_INLINE void bf16_out(const c10::BFloat16* x, const float* w, const float* b, float mu,
                                            float rs, c10::BFloat16* y, int64_t n) {
  static_assert(kSumVecBytes<ISA> == sizeof(FloatX16), "the AVX-512 level's vectors");
  int64_t j = 0;
  for (; j + 16 <= n; j += 16) store_bf16(y + j, out_expr<F>(load_vec<FloatX16>(x + j), w, b, mu, rs, j));
  for (; j < n; ++j) y[j] = c10::BFloat16(out_expr<F>(static_cast<float>(x[j]), w, b, mu, rs, j));
}

template <cpu::Isa ISA>
inline FUSEDREG_ALWAYS_INLINE void bf16_out(const c10::BFloat16* x, const float* w, const float* b, float mu,
                                            float rs, c10::BFloat16* y, int64_t n, bool rms) {
  if (rms) {
    if (w && b) return bf16_out<ISA, 7>(x, w, b, mu, rs, y, n);
    if (w) return bf16_out<ISA, 5>(x, w, b, mu, rs, y, n);
    if (b) return bf16_out<ISA, 6>(x, w, b, mu, rs, y, n);
    return bf16_out<ISA, 4>(x, w, b, mu, rs, y, n);
  }
  if (w && b) return bf16_out<ISA, 3>(x, w, b, mu, rs, y, n);
  if (w) return bf16_out<ISA, 1>(x, w, b, mu, rs, y, n);
  if (b) return bf16_out<ISA, 2>(x, w, b, mu, rs, y, n);
  bf16_out<ISA, 0>(x, w, b, mu, rs, y, n);
}

// The statistics of a plain norm's row x read in place (bf16 or fp16: each vector widened in
// registers): mean (rms: 0) and rstd.
template <cpu::Isa ISA, typename x_t>
inline FUSEDREG_ALWAYS_INLINE void plain_stats(const x_t* xr, int64_t N, bool rms, float eps, float& mu, float& rs) {
  mu = rms ? 0.0f : row_sum_vec<ISA, false>(xr, N, 0.0f) / N;
  const float var = rms ? row_sum_vec<ISA, true, float, x_t, false>(xr, N, 0.0f) : row_sum_vec<ISA, true>(xr, N, mu);
  rs = 1.0f / std::sqrt(var / N + eps);
}

// One bf16 row x of a plain norm (no dropout, no residual, no stored h) read in place, y
// written (streamed when nt: through bits, a chunk of scratch); nx: the next row to prefetch,
// or null; mean (null for RMS) and rstd: where the statistics go.
template <cpu::Isa ISA, typename x_t>
inline FUSEDREG_ALWAYS_INLINE void plain_row(const x_t* xr, x_t* yr, const x_t* nx, int64_t N, bool rms, float eps,
                                             const float* w, const float* b, float* mean, float* rstd, x_t* bits,
                                             bool nt) {
  float mu, rs;
  plain_stats<ISA>(xr, N, rms, eps, mu, rs);
  if (mean) *mean = mu;
  *rstd = rs;
#if FUSEDREG_X86_DISPATCH
  if constexpr (ISA == cpu::Isa::kAvx512) {
    if (cpu::cpu_has_avx512bf16()) {
      switch ((w ? 1 : 0) | (b ? 2 : 0) | (rms ? 4 : 0)) {
#define FUSEDREG_CASE(F) \
  case F: return bf16_row_out_avx512bf16<F>(xr, yr, nx, N, w, b, mu, rs, bits, nt);
        FUSEDREG_CASE(0) FUSEDREG_CASE(1) FUSEDREG_CASE(2) FUSEDREG_CASE(3)
        FUSEDREG_CASE(4) FUSEDREG_CASE(5) FUSEDREG_CASE(6) default: FUSEDREG_CASE(7)
#undef FUSEDREG_CASE
      }
    }
  }
#endif
  for (int64_t j0 = 0; j0 < N; j0 += kStoreChunk) {
    const int64_t j1 = std::min(N, j0 + kStoreChunk);
    for (int64_t k = j0; k < j1; k += kPrefetchChunk) prefetch_chunk(nx, k);
    const float* wc = w ? w + j0 : nullptr;
    const float* bc = b ? b + j0 : nullptr;
    if (nt) {
      bf16_out<ISA>(xr + j0, wc, bc, mu, rs, bits, j1 - j0, rms);
      cpu::store_row_nt<ISA>(yr + j0, bits, (j1 - j0) * int64_t(sizeof(x_t)));
    } else {
      bf16_out<ISA>(xr + j0, wc, bc, mu, rs, yr + j0, j1 - j0, rms);
    }
  }
}

#if FUSEDREG_X86_DISPATCH
// plain_row's output loop for an fp16 row: y rounded by vcvtps2ph with the NaN lanes set to
// sign | 0x7E00 (rows.h's cpu::half16_store); F as out_expr's (weight, bias, RMSNorm).
template <int F>
FUSEDREG_TARGET_AVX512 inline FUSEDREG_ALWAYS_INLINE void half_row_out(const c10::Half* xr, c10::Half* yr,
                                                                      const c10::Half* nx, int64_t N,
                                                                      const float* w, const float* b, float mu,
                                                                      float rs, c10::Half* bits, bool nt) {
  for (int64_t j0 = 0; j0 < N; j0 += kStoreChunk) {
    const int64_t j1 = std::min(N, j0 + kStoreChunk);
    for (int64_t k = j0; k < j1; k += kPrefetchChunk) prefetch_chunk(nx, k);
    c10::Half* yc = nt ? bits : yr + j0;  // y[j] at yc[j - j0]
    int64_t j = j0;
    // 32 a step, one test for NaN lanes (half16_store's fix-up) per 32: the common step is
    // two conversions and two stores, no branch per vector
    for (; j + 32 <= j1; j += 32) {
      const __m512 lo = (__m512)out_expr<F>(load_vec<FloatX16>(xr + j), w, b, mu, rs, j);
      const __m512 hi = (__m512)out_expr<F>(load_vec<FloatX16>(xr + j + 16), w, b, mu, rs, j + 16);
      const __mmask16 nlo = _mm512_cmp_ps_mask(lo, lo, _CMP_UNORD_Q);
      const __mmask16 nhi = _mm512_cmp_ps_mask(hi, hi, _CMP_UNORD_Q);
      if (__builtin_expect(_kortestz_mask16_u8(nlo, nhi), 1)) {
        constexpr int kRound = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
        __m256i* out = reinterpret_cast<__m256i*>(yc + (j - j0));
        _mm256_storeu_si256(out, _mm512_maskz_cvtps_ph(cpu::kAll16, lo, kRound));
        _mm256_storeu_si256(out + 1, _mm512_maskz_cvtps_ph(cpu::kAll16, hi, kRound));
      } else {
        cpu::half16_store(yc + (j - j0), lo);
        cpu::half16_store(yc + (j - j0) + 16, hi);
      }
    }
    for (; j + 16 <= j1; j += 16)
      cpu::half16_store(yc + (j - j0), (__m512)out_expr<F>(load_vec<FloatX16>(xr + j), w, b, mu, rs, j));
    for (; j < j1; ++j) yc[j - j0] = c10::Half(out_expr<F>(static_cast<float>(xr[j]), w, b, mu, rs, j));
    if (nt) cpu::store_row_nt<cpu::Isa::kAvx512>(yr + j0, bits, (j1 - j0) * int64_t(sizeof(c10::Half)));
  }
}

// plain_row of an fp16 row (AVX-512 level), out of line with this target, so that the output
// loop's intrinsics (half16_store) inline into it (3-5% faster than a call per chunk of y).
// Inlined into forward_rows, this code also changed how GCC compiled the copy path's sums
// there, and with it which NaN a LayerNorm row's sums kept where an input NaN met inf - inf:
// in 364 of 12336 hashed forward outputs the NaN in mean, rstd and y had the other sign than
// the previous build's; out of line, 218 (142 with a call per chunk), each in an fp16
// LayerNorm row holding a NaN and both infinities; every other bit is the previous build's.
// When two NaNs meet, which one an add keeps is its operands' order, which the compiler picks.
FUSEDREG_TARGET_AVX512 __attribute__((noinline)) void half_plain_row(const c10::Half* xr, c10::Half* yr,
                                                                   const c10::Half* nx, int64_t N, bool rms,
                                                                   float eps, const float* w, const float* b,
                                                                   float* mean, float* rstd, c10::Half* bits,
                                                                   bool nt) {
  float mu, rs;
  plain_stats<cpu::Isa::kAvx512>(xr, N, rms, eps, mu, rs);
  if (mean) *mean = mu;
  *rstd = rs;
  switch ((w ? 1 : 0) | (b ? 2 : 0) | (rms ? 4 : 0)) {
#define FUSEDREG_CASE(F) \
  case F: return half_row_out<F>(xr, yr, nx, N, w, b, mu, rs, bits, nt);
    FUSEDREG_CASE(0) FUSEDREG_CASE(1) FUSEDREG_CASE(2) FUSEDREG_CASE(3)
    FUSEDREG_CASE(4) FUSEDREG_CASE(5) FUSEDREG_CASE(6) default: FUSEDREG_CASE(7)
#undef FUSEDREG_CASE
  }
}
#endif

// Scratch rows of the forward (cpu::ScratchRows indices).
enum FwdScratch { kFwdH, kFwdX, kFwdRes, kFwdY, kFwdBits, kFwdRows };

// Rows [r0, r1); w, b: the weight and bias as acc_t rows (or null); sc: this thread's scratch.
template <cpu::Isa ISA, typename x_t, typename w_t, typename h_t>
inline FUSEDREG_ALWAYS_INLINE void forward_rows(const FwdArgs<x_t, w_t, h_t>& a, int64_t r0, int64_t r1,
                                                const at::opmath_type<x_t>* w, const at::opmath_type<x_t>* b,
                                                cpu::ScratchRows<at::opmath_type<x_t>>& sc, float* u, float* u_next) {
  using acc_t = at::opmath_type<x_t>;
  static_assert(std::is_same_v<h_t, x_t> || std::is_same_v<h_t, acc_t>, "h is x's dtype or the compute type");
  const int64_t N = a.N;
  const bool dropout = a.p > 0.0f;
  const float p = a.p;
  const bool nt = a.nt;
  const acc_t scale = static_cast<acc_t>(dropout_scale(p));
  const cpu::PhiloxKeys keys(a.seed);
  // The dropout uniforms of row r are in u: the first row's generated here, each next row's
  // during the last pass over the row before it (see below).
  if (dropout && r0 < r1) cpu::fill_keep_at<ISA>(keys, a.seed, a.keep_t, r0 * N, N, u);
  // The last pass over row r prefetches row r + ahead (kRowsAhead); with two, row r0 + 1 here.
  const int64_t ahead = rows_ahead<x_t>(nt);
  if (ahead == 2) {
    prefetch_range(next_row(a.x, r0, r1, N), 0, N);
    prefetch_range(next_row(a.residual, r0, r1, N), 0, N);
  }
  // A float/double call without dropout, residual or stored h reads x in place and writes y
  // in place: no scratch row to place.
  const bool scratch = nt || dropout || a.residual || a.h || !std::is_same_v<x_t, acc_t>;
  // Rows a whole number of pages long keep the first row's scratch placement: place() is
  // called once (same_page_offsets).
  const bool same_offsets = same_page_offsets<x_t, h_t>(N);
  // A plain bf16 / fp16 norm whose rows are whole vectors of the AVX-512 level: plain_row below.
  [[maybe_unused]] const bool plain = !dropout && !a.residual && !a.h && N % 16 == 0;
  for (int64_t r = r0; r < r1; ++r) {
    const x_t* xr = a.x + r * N;
    const h_t* rr = a.residual ? a.residual + r * N : nullptr;
    h_t* hr = a.h ? a.h + r * N : nullptr;
    x_t* yr = a.y + r * N;
    if constexpr ((std::is_same_v<x_t, c10::BFloat16> || std::is_same_v<x_t, c10::Half>) &&
                  ISA == cpu::Isa::kAvx512 && FUSEDREG_X86_DISPATCH) {
      // A plain bf16 or fp16 norm reads its row in place (plain_row): the statistics sums and
      // the output widen each vector in registers, and y is rounded in registers and stored
      // (streamed: through a chunk of scratch). The same values as the copy's, so the same
      // bits (but for the sign of some NaNs: half_plain_row), where the
      // statistics sums are whole vectors: at the AVX-512 level for N a multiple of 16. The
      // scalar tails of row_sum_vec's blocks did not reproduce the float instantiation's bits
      // in the bf16 one (layer_norm's variance: at AVX-512 N = 1000, 7 of 4000 rows differed
      // in rstd's last bit, at AVX2 N = 1031, 3 of 8200; presumably GCC vectorizing or
      // FMA-contracting the float tail differently), so those rows and levels keep the copy.
      if (plain) {
        x_t* bits = sc.template at_as<x_t>(kFwdBits);
        float* mean = a.mean ? a.mean + r : nullptr;
        if constexpr (std::is_same_v<x_t, c10::BFloat16>) {
          plain_row<ISA>(xr, yr, next_row(a.x, r, r1, N), N, a.rms, a.eps, w, b, mean, a.rstd + r, bits, nt);
        } else {
          half_plain_row(xr, yr, next_row(a.x, r, r1, N), N, a.rms, a.eps, w, b, mean, a.rstd + r, bits, nt);
        }
        continue;
      }
    }
    if (scratch && (r == r0 || !same_offsets)) sc.place({xr, rr, w, b}, {nt ? nullptr : hr, nt ? nullptr : yr});
    const acc_t* xv = row_as_acc(xr, sc.at(kFwdX), N);
    const acc_t* rv = row_as_acc(rr, sc.at(kFwdRes), N);
    // h = residual + dropout(x), rounded to h_t, as an acc_t row vr; sum(h) on the way.
    acc_t sum = 0;
    const acc_t* vr = sc.at(kFwdH);
    const acc_t* h_late = nullptr;  // h's row (float/double h, streamed): stored chunk by chunk below
    if (!dropout && !rr && !hr) {
      vr = xv;  // h is x itself: read it in place
      if (!a.rms) sum = row_sum<ISA>(vr, N);  // RMS: no mean, so no pass for it
    } else if constexpr (std::is_same_v<h_t, acc_t>) {
      // h is stored by the loop itself: one loop for both, so the two give the same bits.
      // Streamed, h is the row v itself, stored chunk by chunk in the last pass beside y (so
      // that no second row of h takes L1 room, and h's stores overlap that pass's work).
      acc_t* v = sc.at(kFwdH);
      acc_t* ho = hr && !nt ? reinterpret_cast<acc_t*>(hr) : nullptr;
      if (hr && nt) h_late = v;
      switch ((dropout ? 1 : 0) | (rv ? 2 : 0) | (ho ? 4 : 0)) {
#define FUSEDREG_CASE(F) \
  case F: sum = load_h<(F & 1) != 0, (F & 2) != 0, (F & 4) != 0>(xv, rv, u, ho, v, N, p, scale); break;
        FUSEDREG_CASE(0) FUSEDREG_CASE(1) FUSEDREG_CASE(2) FUSEDREG_CASE(3)
        FUSEDREG_CASE(4) FUSEDREG_CASE(5) FUSEDREG_CASE(6) default: FUSEDREG_CASE(7)
#undef FUSEDREG_CASE
      }
    } else {
      // bf16 / fp16 h: computed in float, rounded to h_t, and read back rounded.
      acc_t* v = sc.at(kFwdH);
      h_t* bits = sc.template at_as<h_t>(kFwdBits);
      switch ((dropout ? 1 : 0) | (rv ? 2 : 0)) {
#define FUSEDREG_CASE(F) \
  case F: load_h<(F & 1) != 0, (F & 2) != 0, false>(xv, rv, u, static_cast<acc_t*>(nullptr), v, N, p, scale); break;
        FUSEDREG_CASE(0) FUSEDREG_CASE(1) FUSEDREG_CASE(2) default: FUSEDREG_CASE(3)
#undef FUSEDREG_CASE
      }
      cpu::row_from_float(v, bits, N);
      cpu::row_to_float(bits, v, N);
      if (!a.rms) sum = row_sum<ISA>(static_cast<const acc_t*>(v), N);
      if (hr) {
        if (nt) cpu::store_row_nt<ISA>(hr, bits, N * int64_t(sizeof(h_t)));
        else std::memcpy(hr, bits, N * sizeof(h_t));
      }
    }
    const acc_t mu = a.rms ? acc_t(0) : sum / N;
    const acc_t var = row_sum_vec<ISA, true>(vr, N, mu);
    const acc_t rs = acc_t(1) / std::sqrt(var / N + a.eps);
    if (a.mean) a.mean[r] = mu;
    a.rstd[r] = rs;
    // y in place, or (streamed, or rounded to bf16/fp16) computed chunk by chunk into the
    // first kStoreChunk elements of a scratch row and stored from there.
    acc_t* yo = out_row(yr, sc.at(kFwdY), nt);
    const bool y_copy = yo != reinterpret_cast<acc_t*>(yr);
    const x_t* nx = next_row(a.x, r + ahead - 1, r1, N);
    const h_t* nr = next_row(a.residual, r + ahead - 1, r1, N);
    // kStoreChunk elements at a time: the next row's inputs prefetched, the next row's dropout
    // uniforms generated (overlapping the prefetches and stores in flight), then the chunk of
    // y computed and stored.
    const bool next_u = dropout && r + 1 < r1;
    for (int64_t j0 = 0; j0 < N; j0 += kStoreChunk) {
      const int64_t j1 = std::min(N, j0 + kStoreChunk);
      for (int64_t k = j0; k < j1; k += kPrefetchChunk) {
        prefetch_chunk(nx, k);
        prefetch_chunk(nr, k);
      }
      if (next_u) cpu::fill_keep_at<ISA>(keys, a.seed, a.keep_t, (r + 1) * N + j0, j1 - j0, u_next + j0);
      acc_t* yc = y_copy ? yo : yo + j0;  // y[j] at yc[j - j0]
      if (w && b) {
#pragma omp simd
        for (int64_t j = j0; j < j1; ++j) yc[j - j0] = (vr[j] - mu) * rs * w[j] + b[j];
      } else if (w) {
#pragma omp simd
        for (int64_t j = j0; j < j1; ++j) yc[j - j0] = (vr[j] - mu) * rs * w[j];
      } else if (b) {
#pragma omp simd
        for (int64_t j = j0; j < j1; ++j) yc[j - j0] = (vr[j] - mu) * rs + b[j];
      } else {
#pragma omp simd
        for (int64_t j = j0; j < j1; ++j) yc[j - j0] = (vr[j] - mu) * rs;
      }
      if (y_copy) write_row<ISA>(yr + j0, static_cast<const acc_t*>(yc), j1 - j0, nt, sc.template at_as<x_t>(kFwdBits));
      if constexpr (std::is_same_v<h_t, acc_t>) {
        if (h_late) cpu::store_row_nt<ISA>(hr + j0, h_late + j0, (j1 - j0) * int64_t(sizeof(h_t)));
      }
    }
    std::swap(u, u_next);
  }
}

// The weight (or bias) as an acc_t row: w itself, or its conversion into buf, at the start of
// a page. Each thread converts its own copy, in its task body: a copy written by the calling
// thread and read by the others crossed cores on every call (the other threads read its lines
// from the calling core's cache, which then takes them back to write the next call's copy).
// A standalone loop of float32 rows on the Intel Xeon VM, two threads, 8x4096: 7.1 us with
// the weights read in place, 18.9 with copies the calling thread wrote, 8.3 with a copy per
// thread. (The copy's page offset is fixed, so that placements can count on it: weight_place.)
template <typename acc_t, typename w_t>
const acc_t* weight_as_acc(const w_t* w, std::unique_ptr<char[]>& buf, int64_t N) {
  if (!w) return nullptr;
  if constexpr (std::is_same_v<w_t, acc_t>) {
    return w;
  } else {
    buf.reset(new char[N * sizeof(acc_t) + 4096]);
    acc_t* row = reinterpret_cast<acc_t*>(cpu::page_start(buf.get()));
    for (int64_t j = 0; j < N; ++j) row[j] = static_cast<acc_t>(w[j]);
    return row;
  }
}

// Where weight_as_acc's row of w lies, as far as the page-offset placements (place_scratch)
// see it: w itself, or (a converted copy, one per thread) any pointer at a page's start.
template <typename acc_t, typename w_t>
const void* weight_place(const w_t* w) {
  if constexpr (std::is_same_v<w_t, acc_t>) {
    return w;
  } else {
    return w ? reinterpret_cast<const void*>(uintptr_t(4096)) : nullptr;
  }
}

template <typename x_t, typename w_t, typename h_t>
void forward_kernel(const FwdArgs<x_t, w_t, h_t>& a, int64_t M) {
  using acc_t = at::opmath_type<x_t>;
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(a.N, 1));
  // Dispatched here, not inside the task body: for_each_task instantiates the body three times.
  auto run_task = [&](int64_t t, cpu::ScratchRows<acc_t>& sc, float* u, bool last, const acc_t* w,
                      const acc_t* b) {
    dispatch_isa([&](auto isa) FUSEDREG_ALWAYS_INLINE {
      forward_rows<decltype(isa)::value>(a, t * grain, std::min(M, (t + 1) * grain), w, b, sc, u, u + a.N);
      if (last) cpu::store_fence<decltype(isa)::value>();
    });
  };
  for_each_task((M + grain - 1) / grain, M * a.N >= kParallelMinElements, [&](auto next_task) {
    std::unique_ptr<char[]> wbuf, bbuf;  // this thread's (weight_as_acc)
    const acc_t* w = weight_as_acc<acc_t>(a.w, wbuf, a.N);
    const acc_t* b = weight_as_acc<acc_t>(a.b, bbuf, a.N);
    cpu::ScratchRows<acc_t> sc(a.N, kFwdRows, M * a.N >= kPlaceMinElements);
    // two rows of dropout uniforms: this row's and the next one's
    std::unique_ptr<float[]> u(new float[a.p > 0.0f ? 2 * a.N : 0]);
    for (int64_t t = next_task(); t >= 0;) {
      const int64_t next = next_task();
      run_task(t, sc, u.get(), next < 0 && a.nt, w, b);
      t = next;
    }
  });
}

// ---- backward -------------------------------------------------------------------------------
// Per row, with xhat = (h - mean) * rstd (RMS: h * rstd) and g = dy * w:
//   c1 = mean(g) (0 for RMS),  c2 = mean(g * xhat)
//   dh = rstd * (g - c1 - xhat * c2) + dh_out;  grad_x = dh * keep * scale;  grad_residual = dh
//   grad_w += dy * xhat,  grad_b += dy   (into the row block's fp32 partial row)

template <typename x_t, typename w_t, typename h_t>
struct BwdArgs {
  using acc_t = at::opmath_type<x_t>;
  const x_t* dy;        // (M, N)
  const h_t* dh_out;    // (M, N) or null
  const h_t* h;         // (M, N)
  const w_t* w;         // (N,) or null
  const acc_t* mean;    // (M,) (unused for rms)
  const acc_t* rstd;    // (M,)
  x_t* gx;              // (M, N)
  h_t* gres;            // (M, N) or null
  int64_t N;
  float p;
  uint64_t seed;
  bool rms;
  bool nt;              // gx and gres with non-temporal stores
  uint32_t keep_t;      // cpu::keep_threshold(p) (with dropout)
};

// g = dy * w (stored: store_grads must see the very same rounded g that c1 sums, or an
// FMA-contracted recomputation leaves g - c1 != 0 where it is exactly 0, e.g. N = 1);
// aw += dy * xhat, ab += dy; c1 = sum(g), c2 = sum(g * xhat). xhat is recomputed by
// store_grads from the L1-resident row of h rather than stored. For R rows at once (1 or 2:
// kPairRowBytes): row i's dy, h, g, mu, rs, c1, c2 at index i; each row's sums and g are the
// bits of a one-row call, and aw / ab get the rows' terms added in row order, as R calls would.
// dy_t, h_t: acc_t (rows read in place or from their acc_t copies), or bf16 / fp16 rows read in
// place with each vector widened in registers (load_vec: the same values, so the same sums, for
// N a multiple of the vectors' 16 elements: backward_rows' in-place rows).
template <cpu::Isa ISA, int R, bool HAS_W, bool NEED_W, bool NEED_B, typename acc_t, typename dy_t, typename h_t>
inline FUSEDREG_ALWAYS_INLINE void bwd_sums(const dy_t* const* dyr, const h_t* const* hr, const acc_t* w, acc_t* aw,
                                            acc_t* ab, acc_t* const* g, int64_t N, const acc_t* mu, const acc_t* rs,
                                            acc_t* c1, acc_t* c2) {
  // In vectors of the level's width with two accumulators per sum, as row_sum_vec (the
  // reasons there).
  typedef acc_t V __attribute__((vector_size(kSumVecBytes<ISA>)));
  constexpr int64_t L = kSumVecBytes<ISA> / int64_t(sizeof(acc_t));
  auto ld = [](const acc_t* p) FUSEDREG_ALWAYS_INLINE {
    V a;
    std::memcpy(&a, p, sizeof(V));
    return a;
  };
  auto st = [](acc_t* p, const V& a) FUSEDREG_ALWAYS_INLINE { std::memcpy(p, &a, sizeof(V)); };
  // One vector of each of the R rows: the partials loaded and stored once for all R, the
  // rows' terms added to them in row order (the additions of R calls of one row each).
  auto step = [&](int64_t j, V* s1, V* s2) FUSEDREG_ALWAYS_INLINE {
    V vw, vaw, vab;
    if constexpr (HAS_W) vw = ld(w + j);
    if constexpr (NEED_W) vaw = ld(aw + j);
    if constexpr (NEED_B) vab = ld(ab + j);
    for (int i = 0; i < R; ++i) {
      const V d = load_vec<V>(dyr[i] + j);
      const V xh = (load_vec<V>(hr[i] + j) - mu[i]) * rs[i];
      V gj = d;
      if constexpr (HAS_W) gj *= vw;
      if constexpr (NEED_W) vaw = vaw + d * xh;
      if constexpr (NEED_B) vab = vab + d;
      st(g[i] + j, gj);
      s1[i] += gj;
      s2[i] += gj * xh;
    }
    if constexpr (NEED_W) st(aw + j, vaw);
    if constexpr (NEED_B) st(ab + j, vab);
  };
  V r1[R] = {}, r2[R] = {};
  acc_t t1[R] = {}, t2[R] = {};
  for (int64_t j0 = 0; j0 < N; j0 += kSumBlock) {
    const int64_t j1 = std::min(N, j0 + kSumBlock);
    V a1[R] = {}, a2[R] = {}, b1[R] = {}, b2[R] = {};
    int64_t j = j0;
    for (; j + 2 * L <= j1; j += 2 * L) {
      step(j, a1, a2);
      step(j + L, b1, b2);
    }
    for (; j + L <= j1; j += L) step(j, a1, a2);
    // The tail row by row, each row's the loop of a one-row call (a loop over both rows per
    // element was compiled differently and moved a last bit of c2).
    for (int i = 0; i < R; ++i) {
      const dy_t* dyi = dyr[i];
      const h_t* hi = hr[i];
      acc_t* gi = g[i];
      const acc_t mi = mu[i], ri = rs[i];
      acc_t u1 = t1[i], u2 = t2[i];
      for (int64_t k = j; k < j1; ++k) {
        const acc_t d = static_cast<acc_t>(dyi[k]);
        const acc_t xh = (static_cast<acc_t>(hi[k]) - mi) * ri;
        acc_t gj = d;
        if constexpr (HAS_W) gj *= w[k];
        if constexpr (NEED_W) aw[k] += d * xh;
        if constexpr (NEED_B) ab[k] += d;
        gi[k] = gj;
        u1 += gj;
        u2 += gj * xh;
      }
      t1[i] = u1;
      t2[i] = u2;
    }
    for (int i = 0; i < R; ++i) {
      r1[i] += a1[i] + b1[i];
      r2[i] += a2[i] + b2[i];
    }
  }
  for (int i = 0; i < R; ++i) {
    for (int64_t k = L / 2; k >= 1; k /= 2)
      for (int64_t l = 0; l < k; ++l) r1[i][l] += r1[i][l + k], r2[i][l] += r2[i][l + k];
    c1[i] = r1[i][0] + t1[i];
    c2[i] = r2[i][0] + t2[i];
  }
}

// dh = rs * (g - c1 - xhat * c2) + dh_out; grad_residual = dh; grad_x = dh * keep * scale
// (acc_t rows), kStoreChunk elements at a time: per chunk [j0, j1), prefetch(j0, j1) fetches
// its share of the rows the next passes read, the chunk's dropout uniforms generated (u, from element
// `start` of the seed's stream) and, after the chunk, emit(j0, j1, grc, gxc) stores it. The
// Philox arithmetic of a chunk then overlaps the prefetches and stores in flight, rather than
// running alone between the row's memory passes. grr / gxr: the output rows themselves, or
// (staged: gr_staged / gx_staged) a chunk-sized buffer that every chunk reuses, so that a
// streamed or rounded output takes kStoreChunk elements of L1 rather than a row.

template <cpu::Isa ISA, bool DOUT, bool GRES, bool DROPOUT, typename acc_t, typename Prefetch, typename Emit>
inline FUSEDREG_ALWAYS_INLINE void store_grads(const acc_t* g, const acc_t* hr, const acc_t* dor, acc_t* grr,
                                               acc_t* gxr, bool gr_staged, bool gx_staged, float* u,
                                               const cpu::PhiloxKeys& keys, uint64_t seed, uint32_t keep_t,
                                               int64_t start, int64_t N, acc_t mu, acc_t rs, acc_t c1, acc_t c2,
                                               float p, acc_t scale, const Prefetch& prefetch, const Emit& emit) {
  for (int64_t j0 = 0; j0 < N; j0 += kStoreChunk) {
    const int64_t j1 = std::min(N, j0 + kStoreChunk);
    prefetch(j0, j1);
    if constexpr (DROPOUT) cpu::fill_keep_at<ISA>(keys, seed, keep_t, start + j0, j1 - j0, u + j0);
    acc_t* grc = GRES ? (gr_staged ? grr : grr + j0) : nullptr;  // element j at [j - j0]
    acc_t* gxc = gx_staged ? gxr : gxr + j0;
#pragma omp simd
    for (int64_t j = j0; j < j1; ++j) {
      const acc_t xhat = (hr[j] - mu) * rs;
      acc_t dh = rs * (g[j] - c1 - xhat * c2);
      if constexpr (DOUT) dh += dor[j];
      if constexpr (GRES) grc[j - j0] = dh;
      if constexpr (DROPOUT) dh = u[j] >= p ? dh * scale : acc_t(0);
      gxc[j - j0] = dh;
    }
    emit(j0, j1, static_cast<const acc_t*>(grc), static_cast<const acc_t*>(gxc));
  }
}

#if FUSEDREG_X86_DISPATCH
// store_grads for a bf16 / fp16 grad_x at the AVX-512 level, with h (h_t) read in place and
// grad_x rounded in registers: the same expressions on the same values, 16 at a time, so the
// same bits as store_grads over the rows' fp32 copies followed by write_row, without the copy
// of h, the fp32 staging of grad_x and its separate rounding pass (perf, bf16 layer_norm
// 1024x1024, one thread: the copies of dy and h took a third of the kernel's samples, the
// rounding pass an eighth; docs/design.md, "Norm rows" (11)). N and kStoreChunk are
// multiples of 16. OUT: how the vectors are rounded (HalfRound). grad_residual, when asked
// (GRES), is staged in fp32 and written by emit(j0, j1, grc) as before. gx: the row itself,
// or (nt) bits, a chunk of x_t from which each chunk is streamed. One call per row, of this
// target (as bf16_row_out_avx512bf16, whose reasons hold here), for all three kinds.
enum HalfRound { kRoundBf16, kRoundBf16Insn, kRoundHalf };

template <int OUT, bool DOUT, bool GRES, bool DROPOUT, typename x_t, typename h_t, typename Prefetch, typename Emit>
FUSEDREG_TARGET_AVX512BF16 __attribute__((noinline)) void store_grads_half(
    const float* g, const h_t* hr, const float* dor, float* grr, bool gr_staged, x_t* gxr, x_t* bits, bool nt,
    float* u, const cpu::PhiloxKeys& keys, uint64_t seed, uint32_t keep_t, int64_t start, int64_t N, float mu,
    float rs, float c1, float c2, float p, float scale, const Prefetch& prefetch, const Emit& emit) {
  for (int64_t j0 = 0; j0 < N; j0 += kStoreChunk) {
    const int64_t j1 = std::min(N, j0 + kStoreChunk);
    prefetch(j0, j1);
    if constexpr (DROPOUT) cpu::fill_keep_at<cpu::Isa::kAvx512>(keys, seed, keep_t, start + j0, j1 - j0, u + j0);
    float* grc = GRES ? (gr_staged ? grr : grr + j0) : nullptr;  // element j at [j - j0]
    x_t* gxc = nt ? bits : gxr + j0;
    // store_grads' loop body for the 16 elements at j.
    auto dh_at = [&](int64_t j) FUSEDREG_ALWAYS_INLINE {
      const FloatX16 xhat = (load_vec<FloatX16>(hr + j) - mu) * rs;
      FloatX16 dh = rs * (load_vec<FloatX16>(g + j) - c1 - xhat * c2);
      if constexpr (DOUT) dh += load_vec<FloatX16>(dor + j);
      if constexpr (GRES) std::memcpy(grc + (j - j0), &dh, sizeof(dh));
      if constexpr (DROPOUT) dh = load_vec<FloatX16>(u + j) >= p ? dh * scale : FloatX16{};
      return dh;
    };
    int64_t j = j0;
    if constexpr (OUT == kRoundBf16Insn) {
      for (; j + 32 <= j1; j += 32) {
        const FloatX16 lo = dh_at(j), hi = dh_at(j + 16);
        store_bf16x32_insn(reinterpret_cast<c10::BFloat16*>(gxc + (j - j0)), lo, hi);
      }
    }
    for (; j < j1; j += 16) {
      const FloatX16 dh = dh_at(j);
      if constexpr (OUT == kRoundHalf) {
        cpu::half16_store(reinterpret_cast<c10::Half*>(gxc + (j - j0)), (__m512)dh);
      } else {
        store_bf16(reinterpret_cast<c10::BFloat16*>(gxc + (j - j0)), dh);
      }
    }
    if (nt) cpu::store_row_nt<cpu::Isa::kAvx512>(gxr + j0, bits, (j1 - j0) * int64_t(sizeof(x_t)));
    if constexpr (GRES) emit(j0, j1, static_cast<const float*>(grc));  // (grc is null otherwise)
  }
}
#endif

// Scratch rows of the backward (cpu::ScratchRows indices).
enum BwdScratch { kBwdDy, kBwdH, kBwdDo, kBwdG, kBwdU, kBwdGres, kBwdGx, kBwdBits, kBwdDy2, kBwdH2, kBwdG2, kBwdRows };

// Rows [r0, r1); aw/ab: this row block's fp32 partial rows (or null); w: the weight as an
// acc_t row (or null); sc: this thread's scratch.
template <cpu::Isa ISA, typename x_t, typename w_t, typename h_t>
inline FUSEDREG_ALWAYS_INLINE void backward_rows(const BwdArgs<x_t, w_t, h_t>& a, int64_t r0, int64_t r1,
                                                 at::opmath_type<x_t>* aw, at::opmath_type<x_t>* ab,
                                                 const at::opmath_type<x_t>* w,
                                                 cpu::ScratchRows<at::opmath_type<x_t>>& sc) {
  using acc_t = at::opmath_type<x_t>;
  const int64_t N = a.N;
  const bool dropout = a.p > 0.0f;
  const float p = a.p;
  const bool nt = a.nt;
  const acc_t scale = static_cast<acc_t>(dropout_scale(p));
  const cpu::PhiloxKeys keys(a.seed);
  // Long rows with partials to accumulate go in pairs through the sums pass (AVX-512 level:
  // 32 vector registers hold both rows' accumulators).
  const bool pairs = ISA == cpu::Isa::kAvx512 && (aw || ab) && N * int64_t(sizeof(acc_t)) >= kPairRowBytes;
  // As in the forward: rows a whole number of pages long keep the first placement (one per
  // row count R, whose loops stream different rows).
  const bool same_offsets = same_page_offsets<x_t, h_t>(N);
  int placed = 0;
  // Single rows prefetch `ahead` rows on, as in the forward (kRowsAhead); pairs the next pair.
  const int64_t ahead = pairs ? 1 : rows_ahead<x_t>(nt);
  if (ahead == 2) {
    prefetch_range(next_row(a.dy, r0, r1, N, kBwdPrefetchRowBytes), 0, N);
    prefetch_range(next_row(a.h, r0, r1, N, kBwdPrefetchRowBytes), 0, N);
  }
  // A bf16 / fp16 backward at the AVX-512 level with N a multiple of 16 reads dy and h in
  // place, each vector widened in registers, and rounds grad_x in registers (store_grads_half):
  // no fp32 copies of dy and h, no fp32 staging of grad_x. The same expressions on the same
  // values in whole vectors, so the same bits as the copies' loops (at other N the vector
  // sums' scalar tails need not be: forward_rows' plain rows say why).
  constexpr bool kHalfRows = cpu::kIsHalfType<x_t> && ISA == cpu::Isa::kAvx512 && FUSEDREG_X86_DISPATCH;
  auto run_rows = [&](auto in_place_tag) FUSEDREG_ALWAYS_INLINE {
    constexpr bool IN_PLACE = decltype(in_place_tag)::value;
    using dy_in = std::conditional_t<IN_PLACE, x_t, acc_t>;
    using h_in = std::conditional_t<IN_PLACE, h_t, acc_t>;
    for (int64_t r = r0; r < r1;) {
      const int R = pairs && r + 1 < r1 ? 2 : 1;
      const x_t* dyr[2] = {a.dy + r * N, R == 2 ? a.dy + (r + 1) * N : nullptr};
      const h_t* hr[2] = {a.h + r * N, R == 2 ? a.h + (r + 1) * N : nullptr};
      if (same_offsets && R == placed) {
        // the previous step's placement holds
      } else if (R == 2) {
        sc.place({dyr[0], hr[0], dyr[1], hr[1], w, aw, ab}, {nt ? nullptr : a.gx + r * N, aw, ab});
      } else {
        sc.place({dyr[0], hr[0], a.dh_out ? a.dh_out + r * N : nullptr, w, aw, ab},
                 {nt ? nullptr : a.gx + r * N, nt || !a.gres ? nullptr : a.gres + r * N, aw, ab});
      }
      placed = R;
      const dy_in* dyv[2];
      const h_in* hv[2];
      if constexpr (IN_PLACE) {
        dyv[0] = dyr[0], dyv[1] = dyr[1], hv[0] = hr[0], hv[1] = hr[1];
      } else {
        dyv[0] = row_as_acc(dyr[0], sc.at(kBwdDy), N), dyv[1] = row_as_acc(dyr[1], sc.at(kBwdDy2), N);
        hv[0] = row_as_acc(hr[0], sc.at(kBwdH), N), hv[1] = row_as_acc(hr[1], sc.at(kBwdH2), N);
      }
      acc_t* g[2] = {sc.at(kBwdG), sc.at(kBwdG2)};
      acc_t mu[2] = {}, rs[2] = {}, c1[2] = {}, c2[2] = {};
      for (int i = 0; i < R; ++i) {
        mu[i] = a.rms ? acc_t(0) : a.mean[r + i];
        rs[i] = a.rstd[r + i];
      }
      if (R == 1) {
        switch ((w ? 1 : 0) | (aw ? 2 : 0) | (ab ? 4 : 0)) {
#define FUSEDREG_CASE(F) \
  case F: bwd_sums<ISA, 1, (F & 1) != 0, (F & 2) != 0, (F & 4) != 0>(dyv, hv, w, aw, ab, g, N, mu, rs, c1, c2); break;
          FUSEDREG_CASE(0) FUSEDREG_CASE(1) FUSEDREG_CASE(2) FUSEDREG_CASE(3)
          FUSEDREG_CASE(4) FUSEDREG_CASE(5) FUSEDREG_CASE(6) default: FUSEDREG_CASE(7)
#undef FUSEDREG_CASE
        }
      } else if constexpr (ISA == cpu::Isa::kAvx512) {
        switch ((w ? 1 : 0) | (aw ? 2 : 0) | (ab ? 4 : 0)) {
#define FUSEDREG_CASE(F) \
  case F: bwd_sums<ISA, 2, (F & 1) != 0, (F & 2) != 0, (F & 4) != 0>(dyv, hv, w, aw, ab, g, N, mu, rs, c1, c2); break;
          FUSEDREG_CASE(2) FUSEDREG_CASE(3) FUSEDREG_CASE(4) FUSEDREG_CASE(5) FUSEDREG_CASE(6) default: FUSEDREG_CASE(7)
#undef FUSEDREG_CASE
        }
      }
      for (int i = 0; i < R; ++i) {
        const int64_t ri = r + i;
        const h_t* dor = a.dh_out ? a.dh_out + ri * N : nullptr;
        h_t* grr = a.gres ? a.gres + ri * N : nullptr;
        x_t* gxr = a.gx + ri * N;
        const acc_t* dov = row_as_acc(dor, sc.at(kBwdDo), N);
        const acc_t c1i = a.rms ? acc_t(0) : c1[i] / N;
        const acc_t c2i = c2[i] / N;
        float* u = sc.template at_as<float>(kBwdU);
        acc_t* gro = grr ? out_row(grr, sc.at(kBwdGres), nt) : nullptr;
        acc_t* gxo = out_row(gxr, sc.at(kBwdGx), nt);
        const bool gr_copy = gro && gro != reinterpret_cast<acc_t*>(grr);
        const bool gx_copy = gxo != reinterpret_cast<acc_t*>(gxr);
        auto emit = [&](int64_t j0, int64_t j1, const acc_t* grc, const acc_t* gxc) FUSEDREG_ALWAYS_INLINE {
          // (grc is null where store_grads has no grad_residual: gr_copy is false then too)
          if (gr_copy && grc) write_row<ISA>(grr + j0, grc, j1 - j0, nt, sc.template at_as<h_t>(kBwdBits));
          if (gx_copy) write_row<ISA>(gxr + j0, gxc, j1 - j0, nt, sc.template at_as<x_t>(kBwdBits));
        };
        // The store passes prefetch the next step's rows of dy and h (not past the block: the
        // next block's first row is likely another thread's), which the next sums pass reads,
        // and the next row's dh_out, which the next store pass reads. With pairs of a streamed
        // call, the next pair's two rows side by side, half of each in each store pass, in
        // the order the pair loop reads them (kPairPrefetch); otherwise the last store pass of
        // the step prefetches the next step's first row.
        const x_t* ndy0 = next_row(a.dy, r + R - 2 + ahead, r1, N, kBwdPrefetchRowBytes);
        const h_t* nh0 = next_row(a.h, r + R - 2 + ahead, r1, N, kBwdPrefetchRowBytes);
        const bool side_by_side = R == 2 && nt;
        const x_t* ndy1 = side_by_side ? next_row(a.dy, r + R, r1, N, kBwdPrefetchRowBytes) : nullptr;
        const h_t* nh1 = side_by_side ? next_row(a.h, r + R, r1, N, kBwdPrefetchRowBytes) : nullptr;
        const h_t* ndo = next_row(a.dh_out, ri, r1, N, kBwdPrefetchRowBytes);
        // (prefetch_chunk's fixed count per step: a loop over a computed range of lines made
        // the cache-resident 1024x1024 backward 13% slower.)
        const x_t* pdy = side_by_side || i + 1 == R ? ndy0 : nullptr;
        const h_t* ph = side_by_side || i + 1 == R ? nh0 : nullptr;
        auto prefetch = [&](int64_t j0, int64_t j1) FUSEDREG_ALWAYS_INLINE {
          if (side_by_side) {
            for (int64_t k = (i * N + j0) / 2; k < (i * N + j1) / 2; k += kPrefetchChunk) {
              prefetch_chunk(pdy, k);
              prefetch_chunk(ph, k);
              prefetch_chunk(ndy1, k);
              prefetch_chunk(nh1, k);
            }
          } else {
            for (int64_t k = j0; k < j1; k += kPrefetchChunk) {
              prefetch_chunk(pdy, k);
              prefetch_chunk(ph, k);
              prefetch_chunk(ndo, k);
            }
          }
          if (side_by_side) {
            for (int64_t k = j0; k < j1; k += kPrefetchChunk) prefetch_chunk(ndo, k);
          }
        };
        const acc_t* gi = g[i];
        const h_in* hvi = hv[i];
#if FUSEDREG_X86_DISPATCH
        if constexpr (IN_PLACE) {
          // grad_residual as before (staged and written by write_row), grad_x rounded in place.
          auto emit_gr = [&](int64_t j0, int64_t j1, const float* grc) FUSEDREG_ALWAYS_INLINE {
            if (gr_copy) write_row<ISA>(grr + j0, grc, j1 - j0, nt, sc.template at_as<h_t>(kBwdBits));
          };
          x_t* gx_bits = sc.template at_as<x_t>(kBwdGx);
          constexpr bool kBf16 = std::is_same_v<x_t, c10::BFloat16>;
          constexpr int kOut = kBf16 ? kRoundBf16 : kRoundHalf;
          constexpr int kInsn = kBf16 ? kRoundBf16Insn : kRoundHalf;  // (fp16: cases 8-15 unused)
          const bool insn = kBf16 && cpu::cpu_has_avx512bf16();
          switch ((dov ? 1 : 0) | (gro ? 2 : 0) | (dropout ? 4 : 0) | (insn ? 8 : 0)) {
#define FUSEDREG_CASE(F)                                                                                     \
  case F:                                                                                                    \
    store_grads_half<(F & 8) != 0 ? kInsn : kOut, (F & 1) != 0, (F & 2) != 0, (F & 4) != 0>(                 \
        gi, hvi, dov, gro, gr_copy, gxr, gx_bits, nt, u, keys, a.seed, a.keep_t, ri * N, N, mu[i], rs[i], c1i, c2i, \
        p, scale, prefetch, emit_gr);                                                                        \
    break;
            FUSEDREG_CASE(0) FUSEDREG_CASE(1) FUSEDREG_CASE(2) FUSEDREG_CASE(3)
            FUSEDREG_CASE(4) FUSEDREG_CASE(5) FUSEDREG_CASE(6) FUSEDREG_CASE(7)
            FUSEDREG_CASE(8) FUSEDREG_CASE(9) FUSEDREG_CASE(10) FUSEDREG_CASE(11)
            FUSEDREG_CASE(12) FUSEDREG_CASE(13) FUSEDREG_CASE(14) default: FUSEDREG_CASE(15)
#undef FUSEDREG_CASE
          }
        } else
#endif
        {
          switch ((dov ? 1 : 0) | (gro ? 2 : 0) | (dropout ? 4 : 0)) {
#define FUSEDREG_CASE(F)                                                                                  \
  case F:                                                                                                 \
    store_grads<ISA, (F & 1) != 0, (F & 2) != 0, (F & 4) != 0>(gi, hvi, dov, gro, gxo, gr_copy, gx_copy, u, keys, a.seed, a.keep_t, ri * N, \
                                                               N, mu[i], rs[i], c1i, c2i, p, scale, prefetch, emit); \
    break;
            FUSEDREG_CASE(0) FUSEDREG_CASE(1) FUSEDREG_CASE(2) FUSEDREG_CASE(3)
            FUSEDREG_CASE(4) FUSEDREG_CASE(5) FUSEDREG_CASE(6) default: FUSEDREG_CASE(7)
#undef FUSEDREG_CASE
          }
        }
      }
      r += R;
    }
  };
  if constexpr (kHalfRows) {
    if (N % 16 == 0) return run_rows(std::true_type{});
  }
  run_rows(std::false_type{});
}

// out[c] = sum of p[blk * stride + c] over blk = 0..n_blocks-1 in that order, for c in
// [c0, c1): the same additions in the same order for any thread count.
template <typename acc_t, typename w_t>
void sum_partials(const acc_t* p, int64_t n_blocks, int64_t stride, int64_t c0, int64_t c1, w_t* out) {
  constexpr int64_t kCols = 256;
  acc_t s[kCols];
  for (int64_t a = c0; a < c1; a += kCols) {
    const int64_t n = std::min(kCols, c1 - a);
    std::fill(s, s + n, acc_t(0));
    for (int64_t blk = 0; blk < n_blocks; ++blk) {
      const acc_t* q = p + blk * stride + a;
#pragma omp simd
      for (int64_t j = 0; j < n; ++j) s[j] += q[j];
    }
    for (int64_t j = 0; j < n; ++j) out[a + j] = static_cast<w_t>(s[j]);
  }
}

template <typename x_t, typename w_t, typename h_t>
void backward_kernel(const BwdArgs<x_t, w_t, h_t>& a, int64_t M, w_t* gw, w_t* gb) {
  using acc_t = at::opmath_type<x_t>;
  const int64_t N = a.N;
  const bool partials = gw || gb;
  // Row blocks: at most 256, and at most ~4M partial elements in all; fixed by (M, N), so
  // the partials do not depend on which thread takes which block.
  const int64_t max_blocks = std::max<int64_t>(1, std::min<int64_t>(256, (int64_t(1) << 22) / std::max<int64_t>(N, 1)));
  // At least ~64K elements per block, so that the partial rows (zeroed, then summed) stay
  // small next to the rows themselves; 16K in calls of 2^16 to 2^18 elements with rows of up
  // to kShortRowsMaxN elements, so that two threads share them (kShortRowsMaxN).
  const bool short_blocks = N <= kShortRowsMaxN && M * N >= kParallelMinElements && M * N < (int64_t(1) << 18);
  const int64_t min_rows = std::max<int64_t>(1, (short_blocks ? 16384 : 65536) / std::max<int64_t>(N, 1));
  const int64_t rows_per_block = partials ? std::max((M + max_blocks - 1) / max_blocks, min_rows)
                                          : std::max<int64_t>(1, 16384 / std::max<int64_t>(N, 1));
  const int64_t n_blocks = (M + rows_per_block - 1) / rows_per_block;
  // The partial rows: rows of a page or more are a whole number of pages apart, at a page
  // offset away from the streams' (fusedreg/cpu/rows.h), since each row block's loop loads
  // and stores its partial rows beside the rows of dy and h it streams. Zeroed by the task
  // that fills them (in its cache, in parallel), not here: `new acc_t[n]` leaves them
  // uninitialized (C++17; torch 2.11 builds extensions as C++17, so no
  // make_unique_for_overwrite).
  const int64_t row_bytes = N * int64_t(sizeof(acc_t));
  const int64_t stride = row_bytes >= 2048 ? (row_bytes + 4095) / 4096 * 4096 / int64_t(sizeof(acc_t)) : N;
  const int64_t n_partials = (gw ? 1 : 0) + (gb ? 1 : 0);
  std::unique_ptr<char[]> pbuf;
  acc_t *pw = nullptr, *pb = nullptr;
  if (partials) {
    pbuf.reset(new char[n_partials * n_blocks * stride * sizeof(acc_t) + 8192]);
    const int64_t off = cpu::place_scratch({a.dy, a.h, a.dh_out, weight_place<acc_t>(a.w)},
                                           {a.nt ? nullptr : a.gx, a.nt ? nullptr : a.gres});
    char* base = cpu::page_start(pbuf.get()) + off;
    pw = gw ? reinterpret_cast<acc_t*>(base) : nullptr;
    pb = gb ? reinterpret_cast<acc_t*>(base) + (gw ? n_blocks * stride : 0) : nullptr;
  }
  // Dispatched here, not inside the task body: for_each_task instantiates the body three times.
  auto run_task = [&](int64_t blk, cpu::ScratchRows<acc_t>& sc, bool last, const acc_t* w) {
    acc_t* aw = gw ? pw + blk * stride : nullptr;
    acc_t* ab = gb ? pb + blk * stride : nullptr;
    if (aw) std::fill(aw, aw + N, acc_t(0));
    if (ab) std::fill(ab, ab + N, acc_t(0));
    dispatch_isa([&](auto isa) FUSEDREG_ALWAYS_INLINE {
      backward_rows<decltype(isa)::value>(a, blk * rows_per_block, std::min(M, (blk + 1) * rows_per_block), aw,
                                          ab, w, sc);
      if (last) cpu::store_fence<decltype(isa)::value>();
    });
  };
  // In parallel from kParallelMinElements, and with partials from three row blocks: two (64K
  // elements each, min_rows) took longer on two threads than on one (float32 32x4096 67.7 /
  // 76.6 us, 128x768 36.8 / 43.1; bf16 32x4096 58.9 / 62.7), four half the time (64x4096
  // 168.3 / 78.4).
  const bool parallel = partials ? n_blocks >= 3 : M * N >= kParallelMinElements;
  for_each_task(n_blocks, parallel, [&](auto next_task) {
    std::unique_ptr<char[]> wbuf;  // this thread's (weight_as_acc)
    const acc_t* w = weight_as_acc<acc_t>(a.w, wbuf, N);
    cpu::ScratchRows<acc_t> sc(N, kBwdRows, M * N >= kPlaceMinElements && N * int64_t(sizeof(acc_t)) >= kBwdPlaceMinRowBytes);
    for (int64_t blk = next_task(); blk >= 0;) {
      const int64_t next = next_task();
      run_task(blk, sc, next < 0 && a.nt, w);
      blk = next;
    }
  });
  if (!partials) return;
  // Column chunks in parallel; within a chunk the blocks are added in block order, rows of
  // contiguous columns at a time (vectorized) rather than one strided column at a time.
  // A sum of fewer than kParallelMinElements partial elements is the calling thread's (the
  // region cost more than the sum: float32 4x4096 with one row block, 14.5 us at one thread,
  // 17.5 at two before).
  const auto sum = [&](int64_t begin, int64_t end) {
    if (gw) sum_partials(pw, n_blocks, stride, begin, end, gw);
    if (gb) sum_partials(pb, n_blocks, stride, begin, end, gb);
  };
  if (n_blocks * N < kParallelMinElements) return sum(0, N);
  at::parallel_for(0, N, 256, sum);
}

// ---- the ops (outputs from cpu::empty_output, dtype combinations from dispatch_wh) ------------

void check_row_input(const at::Tensor& t, const char* name, const at::Tensor& x) {
  TORCH_CHECK(t.device().is_cpu(), "fusedreg::layer_norm (cpu): ", name, " must be a CPU tensor");
  TORCH_CHECK(t.sizes() == x.sizes(), "fusedreg::layer_norm: ", name, " must have x's shape");
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> layer_norm_fwd_cpu(
    const at::Tensor& x_in, const std::optional<at::Tensor>& residual_in,
    const std::optional<at::Tensor>& weight_in, const std::optional<at::Tensor>& bias_in, double eps,
    double p, const at::Tensor& seed, bool rms, at::ScalarType h_dtype, bool store_h) {
  TORCH_CHECK(x_in.dim() == 2, "fusedreg::layer_norm_fwd: x must be (M, N)");
  TORCH_CHECK(x_in.device().is_cpu(), "fusedreg::layer_norm (cpu): x must be a CPU tensor");
  check_layer_norm_args(x_in, h_dtype, eps, p, seed, "layer_norm_fwd");
  const int64_t M = x_in.size(0), N = x_in.size(1);
  const at::Tensor x = x_in.contiguous();
  at::Tensor residual, weight, bias;
  if (residual_in) {
    check_row_input(*residual_in, "residual", x);
    TORCH_CHECK(residual_in->scalar_type() == h_dtype, "fusedreg::layer_norm: residual must have h_dtype");
    residual = residual_in->contiguous();
  }
  for (auto [t, in, name] : {std::tuple{&weight, &weight_in, "weight"}, std::tuple{&bias, &bias_in, "bias"}}) {
    if (!*in) continue;
    TORCH_CHECK((*in)->dim() == 1 && (*in)->size(0) == N && (*in)->device().is_cpu(),
                "fusedreg::layer_norm: ", name, " must be a CPU tensor of shape (N,)");
    *t = (*in)->contiguous();
  }
  TORCH_CHECK(!weight.defined() || !bias.defined() || weight.scalar_type() == bias.scalar_type(),
              "fusedreg::layer_norm: weight and bias must have the same dtype");
  const at::ScalarType w_type = weight.defined() ? weight.scalar_type()
                                : bias.defined() ? bias.scalar_type() : x.scalar_type();
  const at::ScalarType st = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor y = empty_output({M, N}, x.options());
  const std::vector<int64_t> h_shape = store_h ? std::vector<int64_t>{M, N} : std::vector<int64_t>{0};
  at::Tensor h = empty_output(h_shape, x.options().dtype(h_dtype));
  at::Tensor mean = at::empty({rms ? 0 : M}, x.options().dtype(st));
  at::Tensor rstd = at::empty({M}, x.options().dtype(st));
  if (M == 0 || N == 0) return {y, h, mean, rstd};
  const uint64_t s = static_cast<uint64_t>(*seed.const_data_ptr<int64_t>());  // checked: 1 int64 on the CPU
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "layer_norm_fwd", [&] {
    using x_t = scalar_t;
    using acc_t = at::opmath_type<x_t>;
    dispatch_wh<x_t>(w_type, h_dtype, [&](auto w_tag, auto h_tag) {
      using w_t = decltype(w_tag);
      using h_t = decltype(h_tag);
      const int64_t rows_bytes = M * N * int64_t(sizeof(x_t));
      const int64_t footprint = rows_bytes * 2 + M * N * int64_t(sizeof(h_t)) *
                                                     ((residual.defined() ? 1 : 0) + (store_h ? 1 : 0));
      const bool nt = std::is_same_v<x_t, acc_t> ? stream_fwd_rows(rows_bytes, footprint) : fwd_half_nt(footprint);
      const FwdArgs<x_t, w_t, h_t> args{
          x.const_data_ptr<x_t>(), residual.defined() ? residual.const_data_ptr<h_t>() : nullptr,
          weight.defined() ? weight.const_data_ptr<w_t>() : nullptr,
          bias.defined() ? bias.const_data_ptr<w_t>() : nullptr, y.mutable_data_ptr<x_t>(),
          store_h ? h.mutable_data_ptr<h_t>() : nullptr, rms ? nullptr : mean.mutable_data_ptr<acc_t>(),
          rstd.mutable_data_ptr<acc_t>(), N, static_cast<acc_t>(eps), static_cast<float>(p), s, rms,
          nt, p > 0.0 ? cpu::keep_threshold(static_cast<float>(p)) : 0u};
      forward_kernel(args, M);
    });
  });
  return {y, h, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> layer_norm_bwd_cpu(
    const at::Tensor& dy_in, const std::optional<at::Tensor>& dh_out_in, const at::Tensor& h_in,
    const std::optional<at::Tensor>& weight_in, const std::optional<at::Tensor>& bias_in,
    const at::Tensor& mean_in, const at::Tensor& rstd_in, double p, const at::Tensor& seed, bool rms,
    at::ScalarType x_dtype, bool need_grad_residual, bool need_grad_weight, bool need_grad_bias) {
  TORCH_CHECK(h_in.dim() == 2 && h_in.device().is_cpu(), "fusedreg::layer_norm_bwd: h must be a CPU (M, N) tensor");
  check_row_input(dy_in, "dy", h_in);
  TORCH_CHECK(dy_in.scalar_type() == x_dtype, "fusedreg::layer_norm_bwd: dy must have x_dtype");
  check_layer_norm_args(dy_in, h_in.scalar_type(), 0.0, p, seed, "layer_norm_bwd");
  TORCH_CHECK(!need_grad_weight || weight_in, "fusedreg::layer_norm_bwd: need_grad_weight without a weight");
  TORCH_CHECK(!need_grad_bias || bias_in, "fusedreg::layer_norm_bwd: need_grad_bias without a bias");
  const int64_t M = h_in.size(0), N = h_in.size(1);
  const at::ScalarType st = x_dtype == at::kDouble ? at::kDouble : at::kFloat;
  check_statistics(mean_in, rstd_in, rms, M, st, h_in.device());
  const at::Tensor dy = dy_in.contiguous(), h = h_in.contiguous();
  const at::Tensor rstd = rstd_in.contiguous(), mean = rms ? rstd : mean_in.contiguous();
  at::Tensor dh_out, weight, bias;
  if (dh_out_in) {
    check_row_input(*dh_out_in, "dh_out", h);
    TORCH_CHECK(dh_out_in->scalar_type() == h.scalar_type(), "fusedreg::layer_norm_bwd: dh_out must have h's dtype");
    dh_out = dh_out_in->contiguous();
  }
  if (weight_in) weight = weight_in->contiguous();
  if (bias_in) bias = bias_in->contiguous();
  for (const at::Tensor* t : {&weight, &bias})
    TORCH_CHECK(!t->defined() || (t->dim() == 1 && t->size(0) == N && t->device().is_cpu()),
                "fusedreg::layer_norm_bwd: weight/bias must be CPU tensors of shape (N,)");
  const at::ScalarType w_type = weight.defined() ? weight.scalar_type()
                                : bias.defined() ? bias.scalar_type() : x_dtype;
  TORCH_CHECK(!bias.defined() || bias.scalar_type() == w_type, "fusedreg::layer_norm_bwd: weight/bias dtypes differ");
  at::Tensor gx = empty_output({M, N}, dy.options());
  at::Tensor gres = need_grad_residual ? empty_output({M, N}, h.options()) : at::empty({0}, dy.options());
  // grad_weight / grad_bias: written whole by the partials' sum when there are rows, zeros
  // otherwise (a zeroing op call is a microsecond or two of a small call).
  auto param_grad = [&](bool need, const at::Tensor& t) {
    if (!need) return at::empty({0}, dy.options());
    return M > 0 && N > 0 ? at::empty({N}, t.options()) : at::zeros_like(t);
  };
  at::Tensor gw = param_grad(need_grad_weight, weight);
  at::Tensor gb = param_grad(need_grad_bias, bias);
  if (M == 0 || N == 0) return {gx, gres, gw, gb};
  const uint64_t s = static_cast<uint64_t>(*seed.const_data_ptr<int64_t>());  // checked: 1 int64 on the CPU
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x_dtype, "layer_norm_bwd", [&] {
    using x_t = scalar_t;
    using acc_t = at::opmath_type<x_t>;
    dispatch_wh<x_t>(w_type, h.scalar_type(), [&](auto w_tag, auto h_tag) {
      using w_t = decltype(w_tag);
      using h_t = decltype(h_tag);
      const int64_t gx_bytes = M * N * int64_t(sizeof(x_t));
      const int64_t footprint = gx_bytes * 2 + M * N * int64_t(sizeof(h_t)) *
                                                   (1 + (dh_out.defined() ? 1 : 0) + (need_grad_residual ? 1 : 0));
      const BwdArgs<x_t, w_t, h_t> args{
          dy.const_data_ptr<x_t>(), dh_out.defined() ? dh_out.const_data_ptr<h_t>() : nullptr,
          h.const_data_ptr<h_t>(), weight.defined() ? weight.const_data_ptr<w_t>() : nullptr,
          mean.const_data_ptr<acc_t>(), rstd.const_data_ptr<acc_t>(), gx.mutable_data_ptr<x_t>(),
          need_grad_residual ? gres.mutable_data_ptr<h_t>() : nullptr, N, static_cast<float>(p), s, rms,
          stream_bwd_rows(gx_bytes, footprint), p > 0.0 ? cpu::keep_threshold(static_cast<float>(p)) : 0u};
      backward_kernel(args, M, need_grad_weight ? gw.mutable_data_ptr<w_t>() : nullptr,
                      need_grad_bias ? gb.mutable_data_ptr<w_t>() : nullptr);
    });
  });
  return {gx, gres, gw, gb};
}

}  // namespace

TORCH_LIBRARY_IMPL(fusedreg, CPU, m) {
  m.impl("layer_norm_fwd", &layer_norm_fwd_cpu);
  m.impl("layer_norm_bwd", &layer_norm_bwd_cpu);
}

}  // namespace fusedreg
