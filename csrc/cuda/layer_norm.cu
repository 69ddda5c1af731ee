// CUDA kernels of layer_norm: y = norm(h) * w + b with h = residual + dropout(x) (LayerNorm,
// or RMSNorm when rms). Semantics are those of csrc/cpu/layer_norm.cpp and
// fusedreg/reference/layer_norm.py; the mask is fusedreg/philox.h, recomputed, never stored.
//
// x, residual, h, y, dy: (M, N) contiguous; weight, bias: (N,); mean, rstd: (M,).
//
// Forward: one block per row. Threads walk the row by aligned Philox groups of four flat
// indices (one Philox call per four elements whatever N % 4 is), form h (stored to H when
// asked), keep it in shared memory when the row fits (else re-read it from H or x), and
// accumulate a Welford (count, mean, M2) per thread, combined across the block (Chan et al.).
// Any N works: long rows are just more iterations.
//
// Backward: a fixed number of programs (blocks), each owning a contiguous range of rows
// (fixed by M and N only). Per row: a block reduction of c1 = mean(g), c2 = mean(g * xhat),
// then the grads. dW and dB accumulate per column in shared memory (or, for long rows, in
// the program's own global partial row) in row order; a second kernel sums the partial rows
// in program order. No atomics: bitwise deterministic.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "fusedreg/philox.h"
#include "fusedreg/host.h"

namespace fusedreg {
namespace {

constexpr int kMaxThreads = 1024;
constexpr int64_t kSmemBytes = 40 * 1024;  // row cache / accumulators under the 48 KB default

int threads_for(int64_t N) {
  if (N <= 1024) return 128;
  if (N <= 4096) return 256;
  if (N <= 16384) return 512;
  return kMaxThreads;
}

// ---- block reductions ----------------------------------------------------------------------

template <typename T>
__device__ __forceinline__ void welford_combine(T& n, T& mean, T& m2, T n_b, T mean_b, T m2_b) {
  const T total = n + n_b;
  if (total == T(0)) return;
  const T delta = mean_b - mean;
  const T w = n_b / total;
  mean += delta * w;
  m2 += m2_b + delta * delta * n * w;
  n = total;
}

// Combines every thread's (n, mean, m2); all threads get the result. scratch: 3 * 32 values.
template <typename T>
__device__ void block_welford(T& n, T& mean, T& m2, T* scratch) {
  for (int off = 16; off > 0; off >>= 1) {
    const T n_b = __shfl_xor_sync(0xffffffffu, n, off);
    const T mean_b = __shfl_xor_sync(0xffffffffu, mean, off);
    const T m2_b = __shfl_xor_sync(0xffffffffu, m2, off);
    welford_combine(n, mean, m2, n_b, mean_b, m2_b);
  }
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, n_warps = blockDim.x / 32;
  __syncthreads();  // scratch may still be read by a previous reduction
  if (lane == 0) {
    scratch[warp] = n;
    scratch[32 + warp] = mean;
    scratch[64 + warp] = m2;
  }
  __syncthreads();
  n = scratch[0];
  mean = scratch[32];
  m2 = scratch[64];
  for (int w = 1; w < n_warps; ++w) welford_combine(n, mean, m2, scratch[w], scratch[32 + w], scratch[64 + w]);
}

// Sums a and b over the block (in a fixed order); all threads get the result.
template <typename T>
__device__ void block_sum2(T& a, T& b, T* scratch) {
  for (int off = 16; off > 0; off >>= 1) {
    a += __shfl_xor_sync(0xffffffffu, a, off);
    b += __shfl_xor_sync(0xffffffffu, b, off);
  }
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, n_warps = blockDim.x / 32;
  __syncthreads();
  if (lane == 0) {
    scratch[warp] = a;
    scratch[32 + warp] = b;
  }
  __syncthreads();
  a = 0;
  b = 0;
  for (int w = 0; w < n_warps; ++w) {
    a += scratch[w];
    b += scratch[32 + w];
  }
}

// The four uniforms of Philox group g (flat indices 4g .. 4g + 3).
__device__ __forceinline__ void group_uniforms(uint64_t seed, int64_t g, float u[4]) {
  const Philox4 r = philox4x32_10(seed, static_cast<uint64_t>(g));
#pragma unroll
  for (int k = 0; k < 4; ++k) u[k] = uint_to_uniform(r.w[k]);
}

// ---- forward ---------------------------------------------------------------------------------

template <typename x_t, typename w_t, typename h_t>
__global__ void __launch_bounds__(kMaxThreads) layer_norm_fwd_kernel(
    const x_t* __restrict__ X,      // (M, N)
    const h_t* __restrict__ R,      // (M, N) residual or null
    const w_t* __restrict__ W,      // (N,) or null
    const w_t* __restrict__ B,      // (N,) or null
    x_t* __restrict__ Y,            // (M, N)
    h_t* __restrict__ H,            // (M, N) or null
    at::opmath_type<x_t>* __restrict__ MEAN,  // (M,) or null (rms)
    at::opmath_type<x_t>* __restrict__ RSTD,  // (M,)
    int64_t N, at::opmath_type<x_t> eps, float p, uint64_t seed, bool rms, bool cache_row) {
  using acc_t = at::opmath_type<x_t>;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  acc_t* scratch = reinterpret_cast<acc_t*>(smem_raw);  // 96 values
  acc_t* cache = scratch + 96;                          // N values when cache_row
  const int64_t row = blockIdx.x;
  const int64_t s = row * N;
  const bool dropout = p > 0.0f;
  const acc_t scale = static_cast<acc_t>(dropout_scale(p));
  acc_t n = 0, mean = 0, m2 = 0;
  for (int64_t g = (s >> 2) + threadIdx.x; g <= (s + N - 1) >> 2; g += blockDim.x) {
    float u[4] = {1.f, 1.f, 1.f, 1.f};
    if (dropout) group_uniforms(seed, g, u);
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      const int64_t j = 4 * g + k - s;
      if (j < 0 || j >= N) continue;
      acc_t v = static_cast<acc_t>(X[s + j]);
      if (dropout) v = u[k] >= p ? v * scale : acc_t(0);
      if (R) v += static_cast<acc_t>(R[s + j]);
      const h_t vh = static_cast<h_t>(v);
      if (H) H[s + j] = vh;
      v = static_cast<acc_t>(vh);
      if (cache_row) cache[j] = v;
      if (rms) {
        n += 1;
        m2 += v * v;  // mean stays 0: Chan's combination then just adds the m2
      } else {
        n += 1;
        const acc_t d = v - mean;
        mean += d / n;
        m2 += d * (v - mean);
      }
    }
  }
  block_welford(n, mean, m2, scratch);
  if (rms) mean = 0;
  const acc_t rstd = acc_t(1) / sqrt(m2 / static_cast<acc_t>(N) + eps);
  if (threadIdx.x == 0) {
    if (MEAN) MEAN[row] = mean;
    RSTD[row] = rstd;
  }
  __syncthreads();  // the cache is complete
  for (int64_t j = threadIdx.x; j < N; j += blockDim.x) {
    const acc_t v = cache_row ? cache[j] : H ? static_cast<acc_t>(H[s + j]) : static_cast<acc_t>(X[s + j]);
    acc_t y = (v - mean) * rstd;
    if (W) y *= static_cast<acc_t>(W[j]);
    if (B) y += static_cast<acc_t>(B[j]);
    Y[s + j] = static_cast<x_t>(y);
  }
}

// ---- backward --------------------------------------------------------------------------------
// xhat = (h - mean) * rstd (RMS: h * rstd), g = dy * w; c1 = mean(g) (0 for RMS),
// c2 = mean(g * xhat); dh = rstd * (g - c1 - xhat * c2) + dh_out; grad_residual = dh;
// grad_x = dh * keep * scale; dW += dy * xhat, dB += dy.

template <typename x_t, typename w_t, typename h_t>
__global__ void __launch_bounds__(kMaxThreads) layer_norm_bwd_kernel(
    const x_t* __restrict__ DY,     // (M, N)
    const h_t* __restrict__ DHO,    // (M, N) grad of the returned h, or null
    const h_t* __restrict__ H,      // (M, N)
    const w_t* __restrict__ W,      // (N,) or null
    const at::opmath_type<x_t>* __restrict__ MEAN,  // (M,) (unused for rms)
    const at::opmath_type<x_t>* __restrict__ RSTD,  // (M,)
    x_t* __restrict__ DX,           // (M, N)
    h_t* __restrict__ DR,           // (M, N) or null
    at::opmath_type<x_t>* __restrict__ PW,  // (n_programs, N) partial dW, or null
    at::opmath_type<x_t>* __restrict__ PB,  // (n_programs, N) partial dB, or null
    int64_t M, int64_t N, int64_t rows_per_program, float p, uint64_t seed, bool rms,
    bool smem_acc) {
  using acc_t = at::opmath_type<x_t>;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  acc_t* scratch = reinterpret_cast<acc_t*>(smem_raw);  // 96 values
  acc_t* acc_w = PW ? (smem_acc ? scratch + 96 : PW + blockIdx.x * N) : nullptr;
  acc_t* acc_b = PB ? (smem_acc ? scratch + 96 + (PW ? N : 0) : PB + blockIdx.x * N) : nullptr;
  // The accumulators start at zero (global partials are zeroed by the launcher).
  if (smem_acc) {
    for (int64_t j = threadIdx.x; j < N; j += blockDim.x) {
      if (acc_w) acc_w[j] = 0;
      if (acc_b) acc_b[j] = 0;
    }
  }
  const bool dropout = p > 0.0f;
  const acc_t scale = static_cast<acc_t>(dropout_scale(p));
  const int64_t r0 = blockIdx.x * rows_per_program;
  const int64_t r1 = r0 + rows_per_program < M ? r0 + rows_per_program : M;
  for (int64_t row = r0; row < r1; ++row) {
    const int64_t s = row * N;
    const acc_t mu = rms ? acc_t(0) : MEAN[row];
    const acc_t rstd = RSTD[row];
    acc_t c1 = 0, c2 = 0;
    for (int64_t j = threadIdx.x; j < N; j += blockDim.x) {
      const acc_t xhat = (static_cast<acc_t>(H[s + j]) - mu) * rstd;
      acc_t g = static_cast<acc_t>(DY[s + j]);
      if (W) g *= static_cast<acc_t>(W[j]);
      c1 += g;
      c2 += g * xhat;
    }
    block_sum2(c1, c2, scratch);
    c1 = rms ? acc_t(0) : c1 / static_cast<acc_t>(N);
    c2 /= static_cast<acc_t>(N);
    for (int64_t g4 = (s >> 2) + threadIdx.x; g4 <= (s + N - 1) >> 2; g4 += blockDim.x) {
      float u[4] = {1.f, 1.f, 1.f, 1.f};
      if (dropout) group_uniforms(seed, g4, u);
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        const int64_t j = 4 * g4 + k - s;
        if (j < 0 || j >= N) continue;
        const acc_t xhat = (static_cast<acc_t>(H[s + j]) - mu) * rstd;
        const acc_t dy = static_cast<acc_t>(DY[s + j]);
        const acc_t g = W ? dy * static_cast<acc_t>(W[j]) : dy;
        acc_t dh = rstd * (g - c1 - xhat * c2);
        if (DHO) dh += static_cast<acc_t>(DHO[s + j]);
        if (DR) DR[s + j] = static_cast<h_t>(dh);
        if (dropout) dh = u[k] >= p ? dh * scale : acc_t(0);
        DX[s + j] = static_cast<x_t>(dh);
        // Column j belongs to one thread within a row; rows are separated by the
        // __syncthreads of block_sum2, so the accumulation order is the row order.
        if (acc_w) acc_w[j] += dy * xhat;
        if (acc_b) acc_b[j] += dy;
      }
    }
  }
  if (smem_acc) {
    __syncthreads();
    for (int64_t j = threadIdx.x; j < N; j += blockDim.x) {
      if (acc_w) PW[blockIdx.x * N + j] = acc_w[j];
      if (acc_b) PB[blockIdx.x * N + j] = acc_b[j];
    }
  }
}

// grad[j] = sum over programs, in program order, of partial[prog, j].
template <typename acc_t, typename w_t>
__global__ void sum_partials_kernel(const acc_t* __restrict__ PW, const acc_t* __restrict__ PB,
                                    w_t* __restrict__ GW, w_t* __restrict__ GB, int64_t n_programs,
                                    int64_t N) {
  const int64_t j = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (j >= N) return;
  acc_t sw = 0, sb = 0;
  for (int64_t q = 0; q < n_programs; ++q) {
    if (PW) sw += PW[q * N + j];
    if (PB) sb += PB[q * N + j];
  }
  if (GW) GW[j] = static_cast<w_t>(sw);
  if (GB) GB[j] = static_cast<w_t>(sb);
}

// ---- host (dtype dispatch: dispatch_wh, fusedreg/host.h) --------------------------------------

void check_cuda(const at::Tensor& t, const char* name, const at::Tensor& ref) {
  TORCH_CHECK(t.device() == ref.device(), "fusedreg::layer_norm (cuda): ", name, " must be on ", ref.device());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> layer_norm_fwd_cuda(
    const at::Tensor& x_in, const std::optional<at::Tensor>& residual_in,
    const std::optional<at::Tensor>& weight_in, const std::optional<at::Tensor>& bias_in, double eps,
    double p, const at::Tensor& seed, bool rms, at::ScalarType h_dtype, bool store_h) {
  TORCH_CHECK(x_in.dim() == 2 && x_in.is_cuda(), "fusedreg::layer_norm_fwd (cuda): x must be a CUDA (M, N) tensor");
  check_layer_norm_args(x_in, h_dtype, eps, p, seed, "layer_norm_fwd");
  const c10::cuda::CUDAGuard guard(x_in.device());
  const int64_t M = x_in.size(0), N = x_in.size(1);
  const at::Tensor x = x_in.contiguous();
  at::Tensor residual, weight, bias;
  if (residual_in) {
    check_cuda(*residual_in, "residual", x);
    TORCH_CHECK(residual_in->sizes() == x.sizes() && residual_in->scalar_type() == h_dtype,
                "fusedreg::layer_norm: residual must have x's shape and h_dtype");
    residual = residual_in->contiguous();
  }
  if (weight_in) weight = weight_in->contiguous();
  if (bias_in) bias = bias_in->contiguous();
  for (const at::Tensor* t : {&weight, &bias}) {
    if (!t->defined()) continue;
    check_cuda(*t, "weight/bias", x);
    TORCH_CHECK(t->dim() == 1 && t->size(0) == N, "fusedreg::layer_norm: weight/bias must have shape (N,)");
  }
  TORCH_CHECK(!weight.defined() || !bias.defined() || weight.scalar_type() == bias.scalar_type(),
              "fusedreg::layer_norm: weight and bias must have the same dtype");
  const at::ScalarType w_type = weight.defined() ? weight.scalar_type()
                                : bias.defined() ? bias.scalar_type() : x.scalar_type();
  const at::ScalarType st = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor y = at::empty({M, N}, x.options());
  // h is materialized whenever it is not x itself, so that y normalizes the rounded h.
  const bool need_h = store_h || residual.defined() || p > 0.0 || h_dtype != x.scalar_type();
  at::Tensor h = need_h ? at::empty({M, N}, x.options().dtype(h_dtype)) : at::empty({0}, x.options().dtype(h_dtype));
  at::Tensor mean = at::empty({rms ? 0 : M}, x.options().dtype(st));
  at::Tensor rstd = at::empty({M}, x.options().dtype(st));
  if (M > 0 && N > 0) {
    TORCH_CHECK(M <= INT32_MAX, "fusedreg::layer_norm (cuda): at most 2^31 - 1 rows");
    const uint64_t s = static_cast<uint64_t>(seed.item<int64_t>());
    const int threads = threads_for(N);
    const size_t acc_size = st == at::kDouble ? 8 : 4;
    const bool cache_row = static_cast<int64_t>(N * acc_size) <= kSmemBytes;
    const size_t smem = acc_size * (96 + (cache_row ? N : 0));
    cudaStream_t stream = at::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "layer_norm_fwd_cuda", [&] {
      using x_t = scalar_t;
      using acc_t = at::opmath_type<x_t>;
      dispatch_wh<x_t>(w_type, h_dtype, [&](auto w_tag, auto h_tag) {
        using w_t = decltype(w_tag);
        using h_t = decltype(h_tag);
        layer_norm_fwd_kernel<x_t, w_t, h_t><<<static_cast<unsigned>(M), threads, smem, stream>>>(
            x.const_data_ptr<x_t>(), residual.defined() ? residual.const_data_ptr<h_t>() : nullptr,
            weight.defined() ? weight.const_data_ptr<w_t>() : nullptr,
            bias.defined() ? bias.const_data_ptr<w_t>() : nullptr, y.mutable_data_ptr<x_t>(),
            need_h ? h.mutable_data_ptr<h_t>() : nullptr, rms ? nullptr : mean.mutable_data_ptr<acc_t>(),
            rstd.mutable_data_ptr<acc_t>(), N, static_cast<acc_t>(eps), static_cast<float>(p), s, rms,
            cache_row);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
  }
  if (need_h && !store_h) h = at::empty({0}, x.options().dtype(h_dtype));
  return {y, h, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> layer_norm_bwd_cuda(
    const at::Tensor& dy_in, const std::optional<at::Tensor>& dh_out_in, const at::Tensor& h_in,
    const std::optional<at::Tensor>& weight_in, const std::optional<at::Tensor>& bias_in,
    const at::Tensor& mean_in, const at::Tensor& rstd_in, double p, const at::Tensor& seed, bool rms,
    at::ScalarType x_dtype, bool need_grad_residual, bool need_grad_weight, bool need_grad_bias) {
  TORCH_CHECK(h_in.dim() == 2 && h_in.is_cuda(), "fusedreg::layer_norm_bwd (cuda): h must be a CUDA (M, N) tensor");
  check_cuda(dy_in, "dy", h_in);
  TORCH_CHECK(dy_in.sizes() == h_in.sizes() && dy_in.scalar_type() == x_dtype,
              "fusedreg::layer_norm_bwd: dy must have h's shape and x_dtype");
  check_layer_norm_args(dy_in, h_in.scalar_type(), 0.0, p, seed, "layer_norm_bwd");
  TORCH_CHECK(!need_grad_weight || weight_in, "fusedreg::layer_norm_bwd: need_grad_weight without a weight");
  TORCH_CHECK(!need_grad_bias || bias_in, "fusedreg::layer_norm_bwd: need_grad_bias without a bias");
  const c10::cuda::CUDAGuard guard(h_in.device());
  const int64_t M = h_in.size(0), N = h_in.size(1);
  const at::ScalarType st = x_dtype == at::kDouble ? at::kDouble : at::kFloat;
  check_statistics(mean_in, rstd_in, rms, M, st, h_in.device());
  const at::Tensor dy = dy_in.contiguous(), h = h_in.contiguous();
  const at::Tensor rstd = rstd_in.contiguous(), mean = rms ? rstd : mean_in.contiguous();
  at::Tensor dh_out, weight, bias;
  if (dh_out_in) {
    check_cuda(*dh_out_in, "dh_out", h);
    TORCH_CHECK(dh_out_in->sizes() == h.sizes() && dh_out_in->scalar_type() == h.scalar_type(),
                "fusedreg::layer_norm_bwd: dh_out must match h");
    dh_out = dh_out_in->contiguous();
  }
  if (weight_in) weight = weight_in->contiguous();
  if (bias_in) bias = bias_in->contiguous();
  for (const at::Tensor* t : {&weight, &bias}) {
    if (!t->defined()) continue;
    check_cuda(*t, "weight/bias", h);
    TORCH_CHECK(t->dim() == 1 && t->size(0) == N, "fusedreg::layer_norm_bwd: weight/bias must have shape (N,)");
  }
  const at::ScalarType w_type = weight.defined() ? weight.scalar_type()
                                : bias.defined() ? bias.scalar_type() : x_dtype;
  TORCH_CHECK(!bias.defined() || bias.scalar_type() == w_type, "fusedreg::layer_norm_bwd: weight/bias dtypes differ");
  at::Tensor gx = at::empty({M, N}, dy.options());
  at::Tensor gres = need_grad_residual ? at::empty({M, N}, h.options()) : at::empty({0}, dy.options());
  at::Tensor gw = need_grad_weight ? at::zeros_like(weight) : at::empty({0}, dy.options());
  at::Tensor gb = need_grad_bias ? at::zeros_like(bias) : at::empty({0}, dy.options());
  if (M == 0 || N == 0) return {gx, gres, gw, gb};
  const uint64_t s = static_cast<uint64_t>(seed.item<int64_t>());
  // Programs: fixed by (M, N) only; at most ~16M partial elements.
  const int64_t max_programs = std::max<int64_t>(1, std::min<int64_t>(1024, (int64_t(1) << 24) / N));
  const int64_t rows_per_program = (M + std::min(M, max_programs) - 1) / std::min(M, max_programs);
  const int64_t n_programs = (M + rows_per_program - 1) / rows_per_program;
  const size_t acc_size = st == at::kDouble ? 8 : 4;
  const int n_acc = (need_grad_weight ? 1 : 0) + (need_grad_bias ? 1 : 0);
  const bool smem_acc = n_acc > 0 && static_cast<int64_t>(n_acc * N * acc_size) <= kSmemBytes;
  const size_t smem = acc_size * (96 + (smem_acc ? n_acc * N : 0));
  // Global partials are accumulated in place when they do not fit shared memory: zero them.
  auto partial = [&](bool need) {
    if (!need) return at::Tensor();
    return smem_acc ? at::empty({n_programs, N}, dy.options().dtype(st)) : at::zeros({n_programs, N}, dy.options().dtype(st));
  };
  at::Tensor pw = partial(need_grad_weight), pb = partial(need_grad_bias);
  const int threads = threads_for(N);
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x_dtype, "layer_norm_bwd_cuda", [&] {
    using x_t = scalar_t;
    using acc_t = at::opmath_type<x_t>;
    dispatch_wh<x_t>(w_type, h.scalar_type(), [&](auto w_tag, auto h_tag) {
      using w_t = decltype(w_tag);
      using h_t = decltype(h_tag);
      acc_t* pw_ptr = pw.defined() ? pw.mutable_data_ptr<acc_t>() : nullptr;
      acc_t* pb_ptr = pb.defined() ? pb.mutable_data_ptr<acc_t>() : nullptr;
      layer_norm_bwd_kernel<x_t, w_t, h_t><<<static_cast<unsigned>(n_programs), threads, smem, stream>>>(
          dy.const_data_ptr<x_t>(), dh_out.defined() ? dh_out.const_data_ptr<h_t>() : nullptr,
          h.const_data_ptr<h_t>(), weight.defined() ? weight.const_data_ptr<w_t>() : nullptr,
          mean.const_data_ptr<acc_t>(), rstd.const_data_ptr<acc_t>(), gx.mutable_data_ptr<x_t>(),
          need_grad_residual ? gres.mutable_data_ptr<h_t>() : nullptr, pw_ptr, pb_ptr, M, N,
          rows_per_program, static_cast<float>(p), s, rms, smem_acc);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      if (n_acc > 0) {
        const int t = 256;
        sum_partials_kernel<acc_t, w_t><<<static_cast<unsigned>((N + t - 1) / t), t, 0, stream>>>(
            pw_ptr, pb_ptr, need_grad_weight ? gw.mutable_data_ptr<w_t>() : nullptr,
            need_grad_bias ? gb.mutable_data_ptr<w_t>() : nullptr, n_programs, N);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
    });
  });
  return {gx, gres, gw, gb};
}

}  // namespace

TORCH_LIBRARY_IMPL(fusedreg, CUDA, m) {
  m.impl("layer_norm_fwd", &layer_norm_fwd_cuda);
  m.impl("layer_norm_bwd", &layer_norm_bwd_cuda);
}

}  // namespace fusedreg
