// CPU kernels of layer_norm: y = norm(h) * w + b with h = residual + dropout(x)
// (LayerNorm, or RMSNorm when rms). The math is written out in fusedreg/reference/layer_norm.py.
//
// x, residual, h, y, dy: (M, N) contiguous rows; weight, bias: (N,); mean, rstd: (M,).
// Row blocks are spread over threads by cpu::for_each_task (fusedreg/cpu/scheduler.h) and run
// at the CPU's instruction-set level (fusedreg/cpu/isa.h). Each row is copied once into an
// fp32 scratch row (L1/L2 resident) so the statistics and the output read it from cache, and
// the dropout uniforms of a row are drawn in bulk (fusedreg/cpu/uniforms.h). Sums run in
// blocks of kSumBlock (a two-level sum: error ~ sqrt(N / kSumBlock) * kSumBlock * eps instead
// of N * eps).
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
#include <memory>
#include <type_traits>
#include <vector>

#include "fusedreg/cpu/alloc.h"
#include "fusedreg/cpu/isa.h"
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
using cpu::for_each_task;

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
};

// The hardware prefetchers stop at 4 KiB page boundaries, and a row of 1024 floats is one
// page: left alone, every row would start its input streams cold (the loads of the first
// pass over a row were the hot spot). So the last pass over row r, which works from L1,
// prefetches row r + 1's inputs chunk by chunk. Only for rows up to kPrefetchRowBytes:
// longer rows would evict the current one, and the prefetchers ramp up within them anyway.
constexpr int64_t kPrefetchChunk = 64;  // elements per prefetch step of the last pass
constexpr int64_t kPrefetchRowBytes = 16384;

// Prefetches the cache lines of p[j0, j0 + kPrefetchChunk) (nothing when p is null).
template <typename T>
inline FUSEDREG_ALWAYS_INLINE void prefetch_chunk(const T* p, int64_t j0) {
  if (!p) return;
  const char* c = reinterpret_cast<const char*>(p + j0);
  for (int64_t k = 0; k < kPrefetchChunk * int64_t(sizeof(T)); k += 64) __builtin_prefetch(c + k, 0, 3);
}

// Row r + 1 of a (rows, N) array, or null when there is none or rows are too long to prefetch.
template <typename T>
inline FUSEDREG_ALWAYS_INLINE const T* next_row(const T* a, int64_t r, int64_t rows, int64_t N) {
  return a && r + 1 < rows && N * int64_t(sizeof(T)) <= kPrefetchRowBytes ? a + (r + 1) * N : nullptr;
}

// v = h = residual + dropout(x) rounded to h_t (stored to hr if STORE_H); returns sum(v).
// The switches are template parameters so that each variant is one vectorized loop.
template <bool DROPOUT, bool RESIDUAL, bool STORE_H, typename x_t, typename h_t, typename acc_t>
inline FUSEDREG_ALWAYS_INLINE acc_t load_h(const x_t* xr, const h_t* rr, const float* u, h_t* hr, acc_t* v,
                                    int64_t N, float p, acc_t scale) {
  acc_t sum = 0;
  for (int64_t j0 = 0; j0 < N; j0 += kSumBlock) {
    const int64_t j1 = std::min(N, j0 + kSumBlock);
    acc_t s = 0;
#pragma omp simd reduction(+ : s)
    for (int64_t j = j0; j < j1; ++j) {
      acc_t t = static_cast<acc_t>(xr[j]);
      if constexpr (DROPOUT) t = u[j] >= p ? t * scale : acc_t(0);
      if constexpr (RESIDUAL) t += static_cast<acc_t>(rr[j]);
      const h_t th = static_cast<h_t>(t);
      if constexpr (STORE_H) hr[j] = th;
      t = static_cast<acc_t>(th);
      v[j] = t;
      s += t;
    }
    sum += s;
  }
  return sum;
}

// Rows [r0, r1); v: N-element scratch, u: N uniforms (dropout only).
template <typename x_t, typename w_t, typename h_t>
inline FUSEDREG_ALWAYS_INLINE void forward_rows(const FwdArgs<x_t, w_t, h_t>& a, int64_t r0, int64_t r1,
                                      at::opmath_type<x_t>* v, float* u) {
  using acc_t = at::opmath_type<x_t>;
  const int64_t N = a.N;
  const bool dropout = a.p > 0.0f;
  const float p = a.p;
  const acc_t scale = static_cast<acc_t>(dropout_scale(p));
  for (int64_t r = r0; r < r1; ++r) {
    const x_t* xr = a.x + r * N;
    // h = residual + dropout(x), rounded to h_t, kept in v; sum(h) on the way.
    if (dropout) fill_uniforms(a.seed, r * N, N, u);
    const h_t* rr = a.residual ? a.residual + r * N : nullptr;
    h_t* hr = a.h ? a.h + r * N : nullptr;
    acc_t sum = 0;
    const acc_t* vr = v;  // the row of h the statistics and y read
    if (std::is_same_v<x_t, acc_t> && !dropout && !rr && !hr) {
      // h is x itself: read x in place rather than copying it to v.
      vr = reinterpret_cast<const acc_t*>(xr);
      for (int64_t j0 = 0; j0 < N; j0 += kSumBlock) {
        const int64_t j1 = std::min(N, j0 + kSumBlock);
        acc_t s = 0;
#pragma omp simd reduction(+ : s)
        for (int64_t j = j0; j < j1; ++j) s += vr[j];
        sum += s;
      }
    } else {
      switch ((dropout ? 1 : 0) | (rr ? 2 : 0) | (hr ? 4 : 0)) {
#define FUSEDREG_CASE(F) \
  case F: sum = load_h<(F & 1) != 0, (F & 2) != 0, (F & 4) != 0>(xr, rr, u, hr, v, N, p, scale); break;
        FUSEDREG_CASE(0) FUSEDREG_CASE(1) FUSEDREG_CASE(2) FUSEDREG_CASE(3)
        FUSEDREG_CASE(4) FUSEDREG_CASE(5) FUSEDREG_CASE(6) default: FUSEDREG_CASE(7)
#undef FUSEDREG_CASE
      }
    }
    const acc_t mu = a.rms ? acc_t(0) : sum / N;
    acc_t var = 0;
    for (int64_t j0 = 0; j0 < N; j0 += kSumBlock) {
      const int64_t j1 = std::min(N, j0 + kSumBlock);
      acc_t s = 0;
#pragma omp simd reduction(+ : s)
      for (int64_t j = j0; j < j1; ++j) s += (vr[j] - mu) * (vr[j] - mu);
      var += s;
    }
    const acc_t rs = acc_t(1) / std::sqrt(var / N + a.eps);
    if (a.mean) a.mean[r] = mu;
    a.rstd[r] = rs;
    x_t* yr = a.y + r * N;
    const w_t* w = a.w;
    const w_t* b = a.b;
    const x_t* nx = next_row(a.x, r, r1, N);
    const h_t* nr = next_row(a.residual, r, r1, N);
    for (int64_t j0 = 0; j0 < N; j0 += kPrefetchChunk) {
      prefetch_chunk(nx, j0);
      prefetch_chunk(nr, j0);
      const int64_t j1 = std::min(N, j0 + kPrefetchChunk);
      if (w && b) {
#pragma omp simd
        for (int64_t j = j0; j < j1; ++j)
          yr[j] = static_cast<x_t>((vr[j] - mu) * rs * static_cast<acc_t>(w[j]) + static_cast<acc_t>(b[j]));
      } else if (w) {
#pragma omp simd
        for (int64_t j = j0; j < j1; ++j) yr[j] = static_cast<x_t>((vr[j] - mu) * rs * static_cast<acc_t>(w[j]));
      } else if (b) {
#pragma omp simd
        for (int64_t j = j0; j < j1; ++j) yr[j] = static_cast<x_t>((vr[j] - mu) * rs + static_cast<acc_t>(b[j]));
      } else {
#pragma omp simd
        for (int64_t j = j0; j < j1; ++j) yr[j] = static_cast<x_t>((vr[j] - mu) * rs);
      }
    }
  }
}

template <typename x_t, typename w_t, typename h_t>
void forward_kernel(const FwdArgs<x_t, w_t, h_t>& a, int64_t M) {
  using acc_t = at::opmath_type<x_t>;
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(a.N, 1));
  // Dispatched here, not inside the task body: for_each_task instantiates the body twice.
  auto run_task = [&](int64_t t, acc_t* v, float* u) {
    dispatch_isa([&](auto) FUSEDREG_ALWAYS_INLINE {
      forward_rows(a, t * grain, std::min(M, (t + 1) * grain), v, u);
    });
  };
  for_each_task((M + grain - 1) / grain, [&](auto next_task) {
    std::vector<acc_t> v(a.N);
    std::vector<float> u(a.p > 0.0f ? a.N : 0);
    for (int64_t t = next_task(); t >= 0; t = next_task()) run_task(t, v.data(), u.data());
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
};

// g = dy * w (stored: store_grads must see the very same rounded g that c1 sums, or an
// FMA-contracted recomputation leaves g - c1 != 0 where it is exactly 0, e.g. N = 1);
// aw += dy * xhat, ab += dy; c1 = sum(g), c2 = sum(g * xhat). xhat is recomputed by
// store_grads from the L1-resident row of h rather than stored.
template <bool HAS_W, bool NEED_W, bool NEED_B, typename x_t, typename h_t, typename w_t, typename acc_t>
inline FUSEDREG_ALWAYS_INLINE void bwd_sums(const x_t* dyr, const h_t* hr, const w_t* w, acc_t* aw, acc_t* ab,
                                     acc_t* g, int64_t N, acc_t mu, acc_t rs, acc_t& c1, acc_t& c2) {
  for (int64_t j0 = 0; j0 < N; j0 += kSumBlock) {
    const int64_t j1 = std::min(N, j0 + kSumBlock);
    acc_t s1 = 0, s2 = 0;
#pragma omp simd reduction(+ : s1, s2)
    for (int64_t j = j0; j < j1; ++j) {
      const acc_t d = static_cast<acc_t>(dyr[j]);
      const acc_t xh = (static_cast<acc_t>(hr[j]) - mu) * rs;
      acc_t gj = d;
      if constexpr (HAS_W) gj *= static_cast<acc_t>(w[j]);
      if constexpr (NEED_W) aw[j] += d * xh;
      if constexpr (NEED_B) ab[j] += d;
      g[j] = gj;
      s1 += gj;
      s2 += gj * xh;
    }
    c1 += s1;
    c2 += s2;
  }
}

// dh = rs * (g - c1 - xhat * c2) + dh_out; grad_residual = dh; grad_x = dh * keep * scale.
// ndy, nh, ndo: the next row of dy, h, dh_out to prefetch (or null).
template <bool DOUT, bool GRES, bool DROPOUT, typename x_t, typename h_t, typename acc_t>
inline FUSEDREG_ALWAYS_INLINE void store_grads(const acc_t* g, const h_t* hr, const h_t* dor, h_t* grr,
                                        x_t* gxr, const float* u, int64_t N, acc_t mu, acc_t rs,
                                        acc_t c1, acc_t c2, float p, acc_t scale, const x_t* ndy,
                                        const h_t* nh, const h_t* ndo) {
  for (int64_t j0 = 0; j0 < N; j0 += kPrefetchChunk) {
    prefetch_chunk(ndy, j0);
    prefetch_chunk(nh, j0);
    if constexpr (DOUT) prefetch_chunk(ndo, j0);
    const int64_t j1 = std::min(N, j0 + kPrefetchChunk);
#pragma omp simd
    for (int64_t j = j0; j < j1; ++j) {
      const acc_t xhat = (static_cast<acc_t>(hr[j]) - mu) * rs;
      acc_t dh = rs * (g[j] - c1 - xhat * c2);
      if constexpr (DOUT) dh += static_cast<acc_t>(dor[j]);
      if constexpr (GRES) grr[j] = static_cast<h_t>(dh);
      if constexpr (DROPOUT) dh = u[j] >= p ? dh * scale : acc_t(0);
      gxr[j] = static_cast<x_t>(dh);
    }
  }
}

// Rows [r0, r1); aw/ab: this row block's fp32 partial rows (or null); g: N-element scratch;
// u: N uniforms (dropout only).
template <typename x_t, typename w_t, typename h_t>
inline FUSEDREG_ALWAYS_INLINE void backward_rows(const BwdArgs<x_t, w_t, h_t>& a, int64_t r0, int64_t r1,
                                       at::opmath_type<x_t>* aw, at::opmath_type<x_t>* ab,
                                       at::opmath_type<x_t>* g, float* u) {
  using acc_t = at::opmath_type<x_t>;
  const int64_t N = a.N;
  const bool dropout = a.p > 0.0f;
  const float p = a.p;
  const acc_t scale = static_cast<acc_t>(dropout_scale(p));
  const w_t* w = a.w;
  for (int64_t r = r0; r < r1; ++r) {
    const x_t* dyr = a.dy + r * N;
    const h_t* hr = a.h + r * N;
    const acc_t mu = a.rms ? acc_t(0) : a.mean[r];
    const acc_t rs = a.rstd[r];
    acc_t c1 = 0, c2 = 0;
    switch ((w ? 1 : 0) | (aw ? 2 : 0) | (ab ? 4 : 0)) {
#define FUSEDREG_CASE(F) \
  case F: bwd_sums<(F & 1) != 0, (F & 2) != 0, (F & 4) != 0>(dyr, hr, w, aw, ab, g, N, mu, rs, c1, c2); break;
      FUSEDREG_CASE(0) FUSEDREG_CASE(1) FUSEDREG_CASE(2) FUSEDREG_CASE(3)
      FUSEDREG_CASE(4) FUSEDREG_CASE(5) FUSEDREG_CASE(6) default: FUSEDREG_CASE(7)
#undef FUSEDREG_CASE
    }
    c1 = a.rms ? acc_t(0) : c1 / N;
    c2 /= N;
    const h_t* dor = a.dh_out ? a.dh_out + r * N : nullptr;
    h_t* grr = a.gres ? a.gres + r * N : nullptr;
    x_t* gxr = a.gx + r * N;
    if (dropout) fill_uniforms(a.seed, r * N, N, u);
    // The next row of this block (the next block's first row is likely another thread's).
    const x_t* ndy = next_row(a.dy, r, r1, N);
    const h_t* nh = next_row(a.h, r, r1, N);
    const h_t* ndo = next_row(a.dh_out, r, r1, N);
    switch ((dor ? 1 : 0) | (grr ? 2 : 0) | (dropout ? 4 : 0)) {
#define FUSEDREG_CASE(F) \
  case F: store_grads<(F & 1) != 0, (F & 2) != 0, (F & 4) != 0>(g, hr, dor, grr, gxr, u, N, mu, rs, c1, c2, p, scale, ndy, nh, ndo); break;
      FUSEDREG_CASE(0) FUSEDREG_CASE(1) FUSEDREG_CASE(2) FUSEDREG_CASE(3)
      FUSEDREG_CASE(4) FUSEDREG_CASE(5) FUSEDREG_CASE(6) default: FUSEDREG_CASE(7)
#undef FUSEDREG_CASE
    }
  }
}

// out[c] = sum of p[blk * N + c] over blk = 0..n_blocks-1 in that order, for c in [c0, c1):
// the same additions in the same order for any thread count.
template <typename acc_t, typename w_t>
void sum_partials(const acc_t* p, int64_t n_blocks, int64_t N, int64_t c0, int64_t c1, w_t* out) {
  constexpr int64_t kCols = 256;
  acc_t s[kCols];
  for (int64_t a = c0; a < c1; a += kCols) {
    const int64_t n = std::min(kCols, c1 - a);
    std::fill(s, s + n, acc_t(0));
    for (int64_t blk = 0; blk < n_blocks; ++blk) {
      const acc_t* q = p + blk * N + a;
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
  // small next to the rows themselves.
  const int64_t min_rows = std::max<int64_t>(1, 65536 / std::max<int64_t>(N, 1));
  const int64_t rows_per_block = partials ? std::max((M + max_blocks - 1) / max_blocks, min_rows)
                                          : std::max<int64_t>(1, 16384 / std::max<int64_t>(N, 1));
  const int64_t n_blocks = (M + rows_per_block - 1) / rows_per_block;
  // Zeroed by the task that fills them (in its cache, in parallel), not here: `new acc_t[n]`
  // leaves them uninitialized (C++17; torch 2.11 builds extensions as C++17, so no
  // make_unique_for_overwrite).
  std::unique_ptr<acc_t[]> pw, pb;
  if (gw) pw.reset(new acc_t[n_blocks * N]);
  if (gb) pb.reset(new acc_t[n_blocks * N]);
  // Dispatched here, not inside the task body: for_each_task instantiates the body twice.
  auto run_task = [&](int64_t blk, acc_t* g, float* u) {
    acc_t* aw = gw ? pw.get() + blk * N : nullptr;
    acc_t* ab = gb ? pb.get() + blk * N : nullptr;
    if (aw) std::fill(aw, aw + N, acc_t(0));
    if (ab) std::fill(ab, ab + N, acc_t(0));
    dispatch_isa([&](auto) FUSEDREG_ALWAYS_INLINE {
      backward_rows(a, blk * rows_per_block, std::min(M, (blk + 1) * rows_per_block), aw, ab, g, u);
    });
  };
  for_each_task(n_blocks, [&](auto next_task) {
    std::vector<acc_t> g(N);
    std::vector<float> u(a.p > 0.0f ? N : 0);
    for (int64_t blk = next_task(); blk >= 0; blk = next_task()) run_task(blk, g.data(), u.data());
  });
  if (!partials) return;
  // Column chunks in parallel; within a chunk the blocks are added in block order, rows of
  // contiguous columns at a time (vectorized) rather than one strided column at a time.
  at::parallel_for(0, N, 256, [&](int64_t begin, int64_t end) {
    if (gw) sum_partials(pw.get(), n_blocks, N, begin, end, gw);
    if (gb) sum_partials(pb.get(), n_blocks, N, begin, end, gb);
  });
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
  const uint64_t s = static_cast<uint64_t>(seed.item<int64_t>());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "layer_norm_fwd", [&] {
    using x_t = scalar_t;
    using acc_t = at::opmath_type<x_t>;
    dispatch_wh<x_t>(w_type, h_dtype, [&](auto w_tag, auto h_tag) {
      using w_t = decltype(w_tag);
      using h_t = decltype(h_tag);
      const FwdArgs<x_t, w_t, h_t> args{
          x.const_data_ptr<x_t>(), residual.defined() ? residual.const_data_ptr<h_t>() : nullptr,
          weight.defined() ? weight.const_data_ptr<w_t>() : nullptr,
          bias.defined() ? bias.const_data_ptr<w_t>() : nullptr, y.mutable_data_ptr<x_t>(),
          store_h ? h.mutable_data_ptr<h_t>() : nullptr, rms ? nullptr : mean.mutable_data_ptr<acc_t>(),
          rstd.mutable_data_ptr<acc_t>(), N, static_cast<acc_t>(eps), static_cast<float>(p), s, rms};
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
  at::Tensor gw = need_grad_weight ? at::zeros_like(weight) : at::empty({0}, dy.options());
  at::Tensor gb = need_grad_bias ? at::zeros_like(bias) : at::empty({0}, dy.options());
  if (M == 0 || N == 0) return {gx, gres, gw, gb};
  const uint64_t s = static_cast<uint64_t>(seed.item<int64_t>());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x_dtype, "layer_norm_bwd", [&] {
    using x_t = scalar_t;
    using acc_t = at::opmath_type<x_t>;
    dispatch_wh<x_t>(w_type, h.scalar_type(), [&](auto w_tag, auto h_tag) {
      using w_t = decltype(w_tag);
      using h_t = decltype(h_tag);
      const BwdArgs<x_t, w_t, h_t> args{
          dy.const_data_ptr<x_t>(), dh_out.defined() ? dh_out.const_data_ptr<h_t>() : nullptr,
          h.const_data_ptr<h_t>(), weight.defined() ? weight.const_data_ptr<w_t>() : nullptr,
          mean.const_data_ptr<acc_t>(), rstd.const_data_ptr<acc_t>(), gx.mutable_data_ptr<x_t>(),
          need_grad_residual ? gres.mutable_data_ptr<h_t>() : nullptr, N, static_cast<float>(p), s, rms};
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
