// CUDA kernels of bias_dropout: out = residual + dropout(act(x + bias)).
// The semantics are those of csrc/cpu/bias_dropout.cpp: x, residual, out are (M, N)
// contiguous, bias is (N,); math in float (double for float64), one cast at the end; the
// mask is recomputed from the seed with fusedreg/philox.h (bit-identical to the CPU) and
// never stored.
//
// Work decomposition (memory bound: the goal is full-width loads and one Philox call per
// four elements, which keeps the integer work under the memory time on an H200):
// - forward, and backward without a bias gradient: the tensor is walked flat in chunks of
//   V elements (16 bytes of fp32/fp16/bf16, 32 of fp64), V a multiple of 4, so that a chunk
//   is always whole Philox groups and whole 16-byte loads, whatever N is. Only the bias
//   depends on N: its column is carried from chunk to chunk (no division in the loop).
//   Grid-stride loop over a grid of exactly the resident blocks (one wave, no tail).
// - backward with a bias gradient: (32 column lanes x 8 row lanes) blocks over a
//   (n_row_blocks x n_col_blocks) grid; each thread accumulates its V columns over its rows
//   in fp32 (fp64 for double), the 8 row lanes are summed in a fixed order in shared memory
//   into partial[row_block, :], and a second kernel sums the partials in a fixed order. The
//   row split depends only on (M, N): grad_bias is bitwise deterministic, no atomics.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>

#include "fusedreg/activation.h"
#include "fusedreg/host.h"
#include "fusedreg/philox.h"

namespace fusedreg {
namespace {

constexpr int kThreads = 256;   // flat kernels
constexpr int kColLanes = 32;   // rows kernel: threadIdx.x, V columns each
constexpr int kRowLanes = 8;    // rows kernel: threadIdx.y, every 8th row
constexpr int kMinRowsPerBlock = 64;   // partial traffic <= 2/64 of the gradient traffic
constexpr int kTargetBlocks = 4096;    // rows kernel: several waves, so the tail is small

// Elements per thread and step: 16 bytes of the input type, at least one Philox group.
template <typename T>
constexpr int elems_per_thread() {
  return sizeof(T) >= 4 ? 4 : 8;
}

// Minimum resident blocks per SM for __launch_bounds__, which caps the registers at
// 65536 / (256 * n): 4 (64 registers, 1024 threads) for the memory-bound variants without an
// activation, or with relu in the flat kernels, which fit there without spilling (ptxas
// otherwise takes up to 128 and halves the threads in flight); 2 where erf/exp/tanh or the
// rows kernel's two rows of x need more; 1 for fp64, whose erf/exp need more than 128.
template <typename T, Activation A, bool ROWS_KERNEL = false>
constexpr int min_blocks() {
  if (sizeof(T) == 8) return 1;
  if (A == Activation::kNone || (A == Activation::kRelu && !ROWS_KERNEL)) return 4;
  return 2;
}

template <typename T, int n>
struct alignas(sizeof(T) * n) Pack {
  T v[n];
};

// n consecutive elements at p, read in aligned pieces of at most 16 bytes.
template <int n, typename T, typename acc_t>
__device__ __forceinline__ void load_vec(const T* __restrict__ p, acc_t* out) {
  constexpr int kPiece = (n * sizeof(T) <= 16) ? n : int(16 / sizeof(T));
#pragma unroll
  for (int j = 0; j < n; j += kPiece) {
    const Pack<T, kPiece> pk = *reinterpret_cast<const Pack<T, kPiece>*>(p + j);
#pragma unroll
    for (int k = 0; k < kPiece; ++k) out[j + k] = static_cast<acc_t>(pk.v[k]);
  }
}

template <int n, typename T, typename acc_t>
__device__ __forceinline__ void store_vec(T* __restrict__ p, const acc_t* in) {
  constexpr int kPiece = (n * sizeof(T) <= 16) ? n : int(16 / sizeof(T));
#pragma unroll
  for (int j = 0; j < n; j += kPiece) {
    Pack<T, kPiece> pk;
#pragma unroll
    for (int k = 0; k < kPiece; ++k) pk.v[k] = static_cast<T>(in[j + k]);
    *reinterpret_cast<Pack<T, kPiece>*>(p + j) = pk;
  }
}

// The uniforms of the 4 * G elements of Philox groups g .. g + G - 1, in flat order.
template <int G>
__device__ __forceinline__ void group_uniforms(uint64_t seed, uint64_t g, float* u) {
#pragma unroll
  for (int j = 0; j < G; ++j) {
    const Philox4 r = philox4x32_10(seed, g + j);
#pragma unroll
    for (int k = 0; k < 4; ++k) u[4 * j + k] = uint_to_uniform(r.w[k]);
  }
}

// The uniforms of the n elements e .. e + n - 1 for any e (rows not group-aligned): the
// n / 4 + 1 groups that cover them, and for element k word k + (e & 3) of their words,
// picked with selects on the run-time shift (a register array indexed at run time would
// go to local memory).
template <int n>
__device__ __forceinline__ void shifted_uniforms(uint64_t seed, uint64_t e, float* u) {
  constexpr int G = n / 4 + 1;
  uint32_t w[4 * G];
#pragma unroll
  for (int j = 0; j < G; ++j) {
    const Philox4 r = philox4x32_10(seed, (e >> 2) + j);
#pragma unroll
    for (int k = 0; k < 4; ++k) w[4 * j + k] = r.w[k];
  }
  const uint32_t s = static_cast<uint32_t>(e) & 3u;
#pragma unroll
  for (int k = 0; k < n; ++k) {
    const uint32_t lo = s & 1u ? w[k + 1] : w[k];
    const uint32_t hi = s & 1u ? w[k + 3] : w[k + 2];
    u[k] = uint_to_uniform(s & 2u ? hi : lo);
  }
}

// n bias values from column col on (col < N), wrapping to column 0 at the end of a row.
// vec4: N % 4 == 0 and col % 4 == 0, so every group of four is one aligned load. Otherwise
// element k reads b[k - wraps * N] from b = bias + col, and the wraps are counted in 32 bits:
// the next wrap comes at k == next (next < n), then every min(N, n) elements.
template <int n, typename T, typename acc_t>
__device__ __forceinline__ void load_bias(const T* __restrict__ bias, int64_t col, int64_t N,
                                          bool vec4, acc_t* b) {
  if (vec4) {
#pragma unroll
    for (int j = 0; j < n; j += 4) {
      load_vec<4>(bias + col, b + j);
      col += 4;
      if (col == N) col = 0;
    }
  } else {
    const T* src = bias + col;
    const int n_min = N < n ? static_cast<int>(N) : n;
    int next = N - col < n ? static_cast<int>(N - col) : n;
#pragma unroll
    for (int k = 0; k < n; ++k) {
      if (k == next) {
        src -= N;
        next += n_min;
      }
      b[k] = static_cast<acc_t>(src[k]);
    }
  }
}

template <typename scalar_t, Activation A>
__global__ void __launch_bounds__(kThreads, min_blocks<scalar_t, A>()) bias_dropout_fwd_kernel(
    const scalar_t* __restrict__ x,         // (M, N) input
    const scalar_t* __restrict__ bias,      // (N,) bias, or nullptr
    const scalar_t* __restrict__ residual,  // (M, N) residual, or nullptr
    scalar_t* __restrict__ out,             // (M, N) output
    int64_t total, int64_t N,
    int64_t col_step,  // (gridDim.x * kThreads * V) % N: the bias column advance per step
    float p, uint64_t seed, bool bias_vec4) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int V = elems_per_thread<scalar_t>();
  const bool has_bias = bias != nullptr, has_residual = residual != nullptr;
  const bool dropout = p > 0.0f;
  const acc_t scale = static_cast<acc_t>(dropout_scale(p));
  const int64_t n_full = total / V;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads;
  int64_t c = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  int64_t col = has_bias ? (c * V) % N : 0;  // once per thread, not per step

  for (; c < n_full; c += stride) {
    const int64_t e0 = c * V;
    acc_t v[V], b[V], r[V];
    float u[V];
    load_vec<V>(x + e0, v);
    if (has_residual) load_vec<V>(residual + e0, r);
    if (has_bias) load_bias<V>(bias, col, N, bias_vec4, b);
    if (dropout) group_uniforms<V / 4>(seed, static_cast<uint64_t>(e0) >> 2, u);
#pragma unroll
    for (int k = 0; k < V; ++k) {
      acc_t z = v[k];
      if (has_bias) z += b[k];
      acc_t a = activate<A>(z);
      if (dropout) a = u[k] >= p ? a * scale : acc_t(0);
      if (has_residual) a += r[k];
      v[k] = a;
    }
    store_vec<V>(out + e0, v);
    if (has_bias) {
      col += col_step;
      if (col >= N) col -= N;
    }
  }

  // The last total % V elements, element by element, by one thread (bias columns wrap
  // within the bias, so load_bias reads in bounds).
  if (blockIdx.x == 0 && threadIdx.x == 0 && n_full * V < total) {
    const int64_t e0 = n_full * V;
    const int n_left = static_cast<int>(total - e0);
    acc_t b[V];
    float u[V];
    if (has_bias) load_bias<V>(bias, e0 % N, N, bias_vec4, b);
    if (dropout) group_uniforms<V / 4>(seed, static_cast<uint64_t>(e0) >> 2, u);
#pragma unroll
    for (int k = 0; k < V; ++k) {
      if (k < n_left) {
        acc_t z = static_cast<acc_t>(x[e0 + k]);
        if (has_bias) z += b[k];
        acc_t a = activate<A>(z);
        if (dropout) a = u[k] >= p ? a * scale : acc_t(0);
        if (has_residual) a += static_cast<acc_t>(residual[e0 + k]);
        out[e0 + k] = static_cast<scalar_t>(a);
      }
    }
  }
}

// grad_x = grad_out * keep * scale * act'(x + bias), flat, without a bias gradient.
template <typename scalar_t, Activation A>
__global__ void __launch_bounds__(kThreads, min_blocks<scalar_t, A>()) bias_dropout_bwd_kernel(
    const scalar_t* __restrict__ g,     // (M, N) grad_out
    const scalar_t* __restrict__ x,     // (M, N) input, if A != kNone
    const scalar_t* __restrict__ bias,  // (N,) bias, or nullptr (read only if A != kNone)
    scalar_t* __restrict__ gx,          // (M, N) grad_x
    int64_t total, int64_t N, int64_t col_step, float p, uint64_t seed, bool bias_vec4) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int V = elems_per_thread<scalar_t>();
  constexpr bool kAct = A != Activation::kNone;
  const bool has_bias = kAct && bias != nullptr;
  const bool dropout = p > 0.0f;
  const acc_t scale = static_cast<acc_t>(dropout_scale(p));
  const int64_t n_full = total / V;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads;
  int64_t c = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  int64_t col = has_bias ? (c * V) % N : 0;

  for (; c < n_full; c += stride) {
    const int64_t e0 = c * V;
    acc_t d[V], z[V], b[V];
    float u[V];
    load_vec<V>(g + e0, d);
    if (kAct) load_vec<V>(x + e0, z);
    if (has_bias) load_bias<V>(bias, col, N, bias_vec4, b);
    if (dropout) group_uniforms<V / 4>(seed, static_cast<uint64_t>(e0) >> 2, u);
#pragma unroll
    for (int k = 0; k < V; ++k) {
      if (dropout) d[k] = u[k] >= p ? d[k] * scale : acc_t(0);
      if (kAct) {
        if (has_bias) z[k] += b[k];
        d[k] *= activate_grad<A>(z[k]);
      }
    }
    store_vec<V>(gx + e0, d);
    if (has_bias) {
      col += col_step;
      if (col >= N) col -= N;
    }
  }

  if (blockIdx.x == 0 && threadIdx.x == 0 && n_full * V < total) {
    const int64_t e0 = n_full * V;
    const int n_left = static_cast<int>(total - e0);
    acc_t b[V];
    float u[V];
    if (has_bias) load_bias<V>(bias, e0 % N, N, bias_vec4, b);
    if (dropout) group_uniforms<V / 4>(seed, static_cast<uint64_t>(e0) >> 2, u);
#pragma unroll
    for (int k = 0; k < V; ++k) {
      if (k < n_left) {
        acc_t d = static_cast<acc_t>(g[e0 + k]);
        if (dropout) d = u[k] >= p ? d * scale : acc_t(0);
        if (kAct) {
          acc_t z = static_cast<acc_t>(x[e0 + k]);
          if (has_bias) z += b[k];
          d *= activate_grad<A>(z);
        }
        gx[e0 + k] = static_cast<scalar_t>(d);
      }
    }
  }
}

// R rows (R = 2 in the main loop, so that two rows' loads are in flight at once) of one
// thread of the rows kernel below: elements e + r * step + k, k < n_in; adds grad_x to acc.
template <typename scalar_t, Activation A, bool ALIGNED, int R>
__device__ __forceinline__ void bwd_rows_step(
    const scalar_t* __restrict__ g, const scalar_t* __restrict__ x, scalar_t* __restrict__ gx,
    int64_t e, int64_t step, int n_in, const at::opmath_type<scalar_t>* b,
    at::opmath_type<scalar_t>* acc, bool dropout, float p, at::opmath_type<scalar_t> scale,
    uint64_t seed) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int V = elems_per_thread<scalar_t>();
  constexpr bool kAct = A != Activation::kNone;
  acc_t d[R][V], z[R][V];
  float u[R][V];
#pragma unroll
  for (int r = 0; r < R; ++r) {
    const int64_t er = e + r * step;
    if (ALIGNED) {
      load_vec<V>(g + er, d[r]);
      if (kAct) load_vec<V>(x + er, z[r]);
    } else {
#pragma unroll
      for (int k = 0; k < V; ++k) {
        const bool in = k < n_in;
        d[r][k] = in ? static_cast<acc_t>(g[er + k]) : acc_t(0);
        if (kAct) z[r][k] = in ? static_cast<acc_t>(x[er + k]) : acc_t(0);
      }
    }
  }
#pragma unroll
  for (int r = 0; r < R; ++r) {
    const int64_t er = e + r * step;
    if (dropout) {
      if (ALIGNED) {
        group_uniforms<V / 4>(seed, static_cast<uint64_t>(er) >> 2, u[r]);
      } else {
        shifted_uniforms<V>(seed, static_cast<uint64_t>(er), u[r]);
      }
    }
#pragma unroll
    for (int k = 0; k < V; ++k) {
      if (dropout) d[r][k] = u[r][k] >= p ? d[r][k] * scale : acc_t(0);
      if (kAct) d[r][k] *= activate_grad<A>(z[r][k] + b[k]);
      acc[k] += d[r][k];  // row order: the sum is the same whatever R is
    }
    if (ALIGNED) {
      store_vec<V>(gx + er, d[r]);
    } else {
#pragma unroll
      for (int k = 0; k < V; ++k)
        if (k < n_in) gx[er + k] = static_cast<scalar_t>(d[r][k]);
    }
  }
}

// Backward with a bias gradient. Block (kColLanes, kRowLanes) covers columns
// [blockIdx.x * kColLanes * V, +kColLanes * V) of rows [blockIdx.y * rows_per_block, +rows_per_block);
// thread (tx, ty) takes V columns and every kRowLanes-th row from ty. ALIGNED: N % V == 0,
// so each thread's V columns are whole Philox groups and whole 16-byte loads.
//   grad_x = grad_out * keep * scale * act'(x + bias);   partial[blockIdx.y, c] = sum of grad_x[r, c]
template <typename scalar_t, Activation A, bool ALIGNED>
__global__ void __launch_bounds__(kColLanes* kRowLanes, min_blocks<scalar_t, A, true>()) bias_dropout_bwd_rows_kernel(
    const scalar_t* __restrict__ g,     // (M, N) grad_out
    const scalar_t* __restrict__ x,     // (M, N) input, if A != kNone
    const scalar_t* __restrict__ bias,  // (N,) bias
    scalar_t* __restrict__ gx,          // (M, N) grad_x
    at::opmath_type<scalar_t>* __restrict__ partial,  // (n_row_blocks, N) partial sums
    int64_t M, int64_t N, int64_t rows_per_block, float p, uint64_t seed) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int V = elems_per_thread<scalar_t>();
  __shared__ acc_t lanes[kRowLanes][V][kColLanes];  // [row lane][column in V][column lane]
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int64_t col = (static_cast<int64_t>(blockIdx.x) * kColLanes + tx) * V;
  const int64_t row0 = static_cast<int64_t>(blockIdx.y) * rows_per_block + ty;
  const int64_t row_block_end = static_cast<int64_t>(blockIdx.y + 1) * rows_per_block;
  const int64_t row_end = row_block_end < M ? row_block_end : M;
  const bool dropout = p > 0.0f;
  const acc_t scale = static_cast<acc_t>(dropout_scale(p));
  acc_t acc[V];
#pragma unroll
  for (int k = 0; k < V; ++k) acc[k] = acc_t(0);

  if (col < N) {
    // Columns of this thread inside the row: V when ALIGNED, else up to V (32-bit compares
    // in the loop).
    const int n_in = ALIGNED || N - col >= V ? V : static_cast<int>(N - col);
    acc_t b[V];
#pragma unroll
    for (int k = 0; k < V; ++k)
      b[k] = A != Activation::kNone && k < n_in ? static_cast<acc_t>(bias[col + k]) : acc_t(0);
    // The row count fits 32 bits (rows_per_block < 2^31 is checked on the host); only the
    // element offset needs 64.
    const int n_rows = row0 < row_end ? static_cast<int>((row_end - row0 + kRowLanes - 1) / kRowLanes) : 0;
    const int64_t step = kRowLanes * N;
    int64_t e = row0 * N + col;
    int it = 0;
    for (; it + 2 <= n_rows; it += 2, e += 2 * step)
      bwd_rows_step<scalar_t, A, ALIGNED, 2>(g, x, gx, e, step, n_in, b, acc, dropout, p, scale, seed);
    if (it < n_rows)
      bwd_rows_step<scalar_t, A, ALIGNED, 1>(g, x, gx, e, step, n_in, b, acc, dropout, p, scale, seed);
  }

  // Sum the row lanes in a fixed order (lane 0 first).
#pragma unroll
  for (int k = 0; k < V; ++k) lanes[ty][k][tx] = acc[k];
  __syncthreads();
  for (int k = ty; k < V; k += kRowLanes) {
    if (col + k < N) {
      acc_t s = lanes[0][k][tx];
#pragma unroll
      for (int j = 1; j < kRowLanes; ++j) s += lanes[j][k][tx];
      partial[static_cast<int64_t>(blockIdx.y) * N + col + k] = s;
    }
  }
}

// grad_bias[c] = sum over row blocks rb = 0, 1, ... of partial[rb, c], in a fixed order:
// row lane ty sums rb = ty, ty + 8, ...; then the lanes are summed from lane 0.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kColLanes* kRowLanes) bias_grad_reduce_kernel(
    const acc_t* __restrict__ partial,  // (n_row_blocks, N)
    scalar_t* __restrict__ grad_bias,   // (N,)
    int n_row_blocks, int64_t N) {
  __shared__ acc_t lanes[kRowLanes][kColLanes];
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int64_t col = static_cast<int64_t>(blockIdx.x) * kColLanes + tx;
  acc_t s = acc_t(0);
  if (col < N)
    for (int rb = ty; rb < n_row_blocks; rb += kRowLanes) s += partial[rb * N + col];
  lanes[ty][tx] = s;
  __syncthreads();
  if (ty == 0 && col < N) {
    acc_t t = lanes[0][tx];
#pragma unroll
    for (int j = 1; j < kRowLanes; ++j) t += lanes[j][tx];
    grad_bias[col] = static_cast<scalar_t>(t);
  }
}

// ---- host side ---------------------------------------------------------------------------


// Contiguous, with a 16-byte aligned data pointer (the kernels' vector loads need it). A
// view at an odd storage offset is copied; fresh allocations are always aligned.
at::Tensor aligned(const at::Tensor& t) {
  at::Tensor c = t.contiguous();
  if (reinterpret_cast<uintptr_t>(c.const_data_ptr()) % 16 != 0) c = c.clone();
  return c;
}

std::optional<at::Tensor> aligned(const std::optional<at::Tensor>& t) {
  return t ? std::optional<at::Tensor>(aligned(*t)) : std::nullopt;
}

// Blocks of `kernel` resident on one multiprocessor, asked once per kernel (the process is
// assumed to use one GPU architecture).
template <typename Kernel>
int resident_blocks(Kernel kernel, int threads) {
  int per_sm = 0;
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, threads, 0));
  return std::max(per_sm, 1) * at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
}

// Grid of a flat kernel: one block per kThreads chunks, at most one wave of resident blocks.
int64_t flat_grid(int64_t total, int V, int max_blocks) {
  const int64_t chunks = total / V;
  return std::max<int64_t>(1, std::min<int64_t>((chunks + kThreads - 1) / kThreads, max_blocks));
}

template <typename scalar_t, Activation A>
void launch_fwd(const at::Tensor& x, const std::optional<at::Tensor>& bias,
                const std::optional<at::Tensor>& residual, at::Tensor& out, Rows rows, float p,
                uint64_t seed) {
  constexpr int V = elems_per_thread<scalar_t>();
  auto kernel = bias_dropout_fwd_kernel<scalar_t, A>;
  static const int max_blocks = resident_blocks(kernel, kThreads);
  const int64_t total = rows.M * rows.N;
  const int64_t blocks = flat_grid(total, V, max_blocks);
  const int64_t col_step = (blocks * kThreads * V) % rows.N;
  kernel<<<static_cast<unsigned>(blocks), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
      x.const_data_ptr<scalar_t>(), bias ? bias->const_data_ptr<scalar_t>() : nullptr,
      residual ? residual->const_data_ptr<scalar_t>() : nullptr, out.mutable_data_ptr<scalar_t>(),
      total, rows.N, col_step, p, seed, rows.N % 4 == 0);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename scalar_t, Activation A>
void launch_bwd(const at::Tensor& g, const at::Tensor& x, const at::Tensor& bias, at::Tensor& gx,
                at::Tensor& gb, Rows rows, float p, uint64_t seed) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int V = elems_per_thread<scalar_t>();
  constexpr bool kAct = A != Activation::kNone;
  const scalar_t* x_ptr = kAct ? x.const_data_ptr<scalar_t>() : nullptr;
  const scalar_t* b_ptr = bias.defined() ? bias.const_data_ptr<scalar_t>() : nullptr;
  const auto stream = at::cuda::getCurrentCUDAStream();
  const int64_t total = rows.M * rows.N;
  if (!gb.defined()) {
    auto kernel = bias_dropout_bwd_kernel<scalar_t, A>;
    static const int max_blocks = resident_blocks(kernel, kThreads);
    const int64_t blocks = flat_grid(total, V, max_blocks);
    const int64_t col_step = (blocks * kThreads * V) % rows.N;
    kernel<<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
        g.const_data_ptr<scalar_t>(), x_ptr, b_ptr, gx.mutable_data_ptr<scalar_t>(), total,
        rows.N, col_step, p, seed, rows.N % 4 == 0);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return;
  }
  // The row split depends on (M, N) only, so grad_bias is the same on every run and device.
  const int64_t n_col_blocks = (rows.N + kColLanes * V - 1) / (kColLanes * V);
  const int64_t max_row_blocks = std::max<int64_t>(1, rows.M / kMinRowsPerBlock);
  int64_t n_row_blocks = std::min<int64_t>(
      max_row_blocks, std::max<int64_t>(1, (kTargetBlocks + n_col_blocks - 1) / n_col_blocks));
  const int64_t rows_per_block = (rows.M + n_row_blocks - 1) / n_row_blocks;
  n_row_blocks = (rows.M + rows_per_block - 1) / rows_per_block;
  TORCH_CHECK(rows_per_block < (int64_t(1) << 31) && n_row_blocks <= 65535,
              "fusedreg::bias_dropout_bwd (cuda): too many rows");
  at::Tensor partial = at::empty({n_row_blocks, rows.N}, g.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
  const dim3 block(kColLanes, kRowLanes);
  const dim3 grid(static_cast<unsigned>(n_col_blocks), static_cast<unsigned>(n_row_blocks));
  auto rows_kernel = rows.N % V == 0 ? bias_dropout_bwd_rows_kernel<scalar_t, A, true>
                                     : bias_dropout_bwd_rows_kernel<scalar_t, A, false>;
  rows_kernel<<<grid, block, 0, stream>>>(
      g.const_data_ptr<scalar_t>(), x_ptr, b_ptr, gx.mutable_data_ptr<scalar_t>(),
      partial.mutable_data_ptr<acc_t>(), rows.M, rows.N, rows_per_block, p, seed);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const dim3 reduce_grid(static_cast<unsigned>((rows.N + kColLanes - 1) / kColLanes));
  bias_grad_reduce_kernel<scalar_t, acc_t><<<reduce_grid, block, 0, stream>>>(
      partial.const_data_ptr<acc_t>(), gb.mutable_data_ptr<scalar_t>(),
      static_cast<int>(n_row_blocks), rows.N);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor bias_dropout_fwd_cuda(const at::Tensor& x_in, const std::optional<at::Tensor>& bias_in,
                                 const std::optional<at::Tensor>& residual_in, double p,
                                 int64_t activation, const at::Tensor& seed) {
  check_bias_dropout_inputs(x_in, bias_in, residual_in, p, activation, seed, at::kCUDA);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = aligned(x_in);
  const std::optional<at::Tensor> bias = aligned(bias_in);
  const std::optional<at::Tensor> residual = aligned(residual_in);
  at::Tensor out = at::empty_like(x, at::MemoryFormat::Contiguous);
  if (x.numel() == 0) return out;
  const uint64_t s = static_cast<uint64_t>(seed.item<int64_t>());  // a CPU tensor: no sync
  const Rows rows = as_rows(x);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bias_dropout_fwd_cuda", [&] {
    FUSEDREG_DISPATCH_ACTIVATION(static_cast<Activation>(activation), A, [&] {
      launch_fwd<scalar_t, A>(x, bias, residual, out, rows, static_cast<float>(p), s);
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> bias_dropout_bwd_cuda(
    const at::Tensor& grad_in, const std::optional<at::Tensor>& x_in,
    const std::optional<at::Tensor>& bias_in, double p, int64_t activation,
    const at::Tensor& seed, bool need_grad_bias) {
  TORCH_CHECK(activation == 0 || x_in.has_value(),
              "fusedreg::bias_dropout_bwd: x is required with an activation");
  check_bias_dropout_inputs(grad_in, bias_in, std::nullopt, p, activation, seed, at::kCUDA);
  TORCH_CHECK(!need_grad_bias || bias_in.has_value(),
              "fusedreg::bias_dropout_bwd: need_grad_bias without a bias");
  const c10::cuda::CUDAGuard guard(grad_in.device());
  const at::Tensor g = aligned(grad_in);
  at::Tensor x;
  if (x_in) {
    TORCH_CHECK(x_in->sizes() == g.sizes() && x_in->scalar_type() == g.scalar_type() &&
                    x_in->device() == g.device(),
                "fusedreg::bias_dropout_bwd: x must match grad_out");
    if (activation != 0) x = aligned(*x_in);
  }
  const at::Tensor bias = bias_in ? aligned(*bias_in) : at::Tensor();
  at::Tensor gx = at::empty_like(g, at::MemoryFormat::Contiguous);
  if (g.numel() == 0) {
    return {gx, need_grad_bias ? at::zeros_like(bias) : at::empty({0}, g.options())};
  }
  at::Tensor gb = need_grad_bias ? at::empty_like(bias, at::MemoryFormat::Contiguous) : at::Tensor();
  const uint64_t s = static_cast<uint64_t>(seed.item<int64_t>());
  const Rows rows = as_rows(g);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), "bias_dropout_bwd_cuda", [&] {
    FUSEDREG_DISPATCH_ACTIVATION(static_cast<Activation>(activation), A, [&] {
      launch_bwd<scalar_t, A>(g, x, bias, gx, gb, rows, static_cast<float>(p), s);
    });
  });
  return {gx, need_grad_bias ? gb : at::empty({0}, g.options())};
}

}  // namespace

TORCH_LIBRARY_IMPL(fusedreg, CUDA, m) {
  m.impl("bias_dropout_fwd", &bias_dropout_fwd_cuda);
  m.impl("bias_dropout_bwd", &bias_dropout_bwd_cuda);
}

}  // namespace fusedreg
