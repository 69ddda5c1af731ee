// CUDA kernels of batch_norm: y = dropout(act((x - mean) * invstd * w + b + residual)).
// Semantics are those of csrc/cpu/batch_norm.cpp and fusedreg/reference/batch_norm.py; the
// mask is fusedreg/philox.h at the logical (N, C, S) index, recomputed, never stored.
//
// x, residual, dy, the grads: stored (N, C, S), or (N, S, C) = (L, C) rows when channels_last;
// mean, invstd, weight, bias, the backward sums: (C,) in the compute type.
//
// Element-wise passes (forward, backward element-wise): a grid-stride loop over the stored
// elements; each element finds its channel and logical index from its offset.
//
// Per-channel reductions (statistics, backward sums) are two-level and deterministic, no
// atomics: the elements of a channel are cut into blocks fixed by the shape; one CUDA block
// reduces one (reduction block, channel tile) with a fixed-shape tree in shared memory and
// writes a partial to a (n_blocks, C) array; a second kernel combines the partials of each
// channel in block order. Statistics use sums of (x - K) and (x - K)^2 with K the block's
// first value of the channel (shifted sums: no cancellation when the mean is large next to
// the spread), combined across blocks by Chan et al.'s formula.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "fusedreg/activation.h"
#include "fusedreg/batch_norm_host.h"
#include "fusedreg/philox.h"

namespace fusedreg {
namespace {

constexpr int kThreads = 256;
constexpr int kTileC = 32;   // channels-last reductions: 32 channels x 8 rows per CUDA block
constexpr int kTileR = kThreads / kTileC;
constexpr int64_t kMaxPartials = 1024;

__host__ __device__ __forceinline__ int64_t imin(int64_t a, int64_t b) { return a < b ? a : b; }

struct Geometry {
  int64_t N, C, S;
  bool cl;
};

// Channel and logical (N, C, S) index of stored offset i.
__device__ __forceinline__ void locate(const Geometry& g, int64_t i, int64_t& c, int64_t& logical) {
  if (g.cl) {
    c = i % g.C;
    const int64_t row = i / g.C;
    logical = (row / g.S) * g.C * g.S + c * g.S + row % g.S;
  } else {
    c = (i / g.S) % g.C;
    logical = i;
  }
}

template <typename acc_t>
struct Vecs {
  const acc_t* mean;
  const acc_t* invstd;
  const acc_t* scale;  // invstd * w
  const acc_t* shift;  // b
};

template <Activation A, typename x_t, typename acc_t>
__global__ void forward_kernel(const x_t* __restrict__ x, const x_t* __restrict__ r, x_t* __restrict__ y,
                               Vecs<acc_t> v, Geometry g, int64_t total, float p, acc_t dscale,
                               uint64_t seed) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total;
       i += int64_t(gridDim.x) * blockDim.x) {
    int64_t c, logical;
    locate(g, i, c, logical);
    acc_t z = (static_cast<acc_t>(x[i]) - v.mean[c]) * v.scale[c] + v.shift[c];
    if (r) z += static_cast<acc_t>(r[i]);
    acc_t t = activate<A, acc_t>(z);
    if (p > 0.0f) t = dropout_uniform(seed, logical) >= p ? t * dscale : acc_t(0);
    y[i] = static_cast<x_t>(t);
  }
}

// dz = dy * keep * dscale * act'(z) and xhat at stored offset i of channel c.
template <Activation A, typename x_t, typename acc_t>
__device__ __forceinline__ acc_t dz_at(const x_t* dy, const x_t* x, const x_t* r, const Vecs<acc_t>& v,
                                       int64_t i, int64_t c, int64_t logical, float p, acc_t dscale,
                                       uint64_t seed, acc_t& xhat) {
  const acc_t d = static_cast<acc_t>(x[i]) - v.mean[c];
  xhat = d * v.invstd[c];
  acc_t dz = static_cast<acc_t>(dy[i]);
  if constexpr (A != Activation::kNone) {
    acc_t z = d * v.scale[c] + v.shift[c];
    if (r) z += static_cast<acc_t>(r[i]);
    dz *= activate_grad<A, acc_t>(z);
  }
  if (p > 0.0f) dz = dropout_uniform(seed, logical) >= p ? dz * dscale : acc_t(0);
  return dz;
}

template <Activation A, typename x_t, typename acc_t>
__global__ void elemt_kernel(const x_t* __restrict__ dy, const x_t* __restrict__ x, const x_t* __restrict__ r,
                             Vecs<acc_t> v, const acc_t* __restrict__ sum_dz, const acc_t* __restrict__ sum_dzx,
                             acc_t inv_count, Geometry g, int64_t total, float p, acc_t dscale, uint64_t seed,
                             bool training, x_t* __restrict__ gx, x_t* __restrict__ gr) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total;
       i += int64_t(gridDim.x) * blockDim.x) {
    int64_t c, logical;
    locate(g, i, c, logical);
    acc_t xhat;
    const acc_t dz = dz_at<A>(dy, x, r, v, i, c, logical, p, dscale, seed, xhat);
    if (gr) gr[i] = static_cast<x_t>(dz);
    if (gx) {
      const acc_t k = v.scale[c];
      gx[i] = static_cast<x_t>(training ? k * (dz - sum_dz[c] * inv_count - xhat * sum_dzx[c] * inv_count)
                                        : k * dz);
    }
  }
}

// ---- reductions -----------------------------------------------------------------------------

// The blocks of a channel's reduction: `per_block` units (CL rows, or NCS samples) each.
struct Blocks {
  int64_t units, per_block, n_blocks, per_unit;
};

// At most kMaxPartials blocks per channel; a channels-last block is at least 4 * kTileR rows
// (of kTileC channels per CUDA block), an (N, C, S) block at least ~2K values of its channel.
Blocks reduction_blocks(const Geometry& g) {
  const int64_t units = g.cl ? g.N * g.S : g.N;
  const int64_t per_unit = g.cl ? 1 : g.S;
  const int64_t min_units = g.cl ? 4 * kTileR : (2048 + g.S - 1) / std::max<int64_t>(g.S, 1);
  const int64_t per_block = std::max<int64_t>(min_units, (units + kMaxPartials - 1) / kMaxPartials);
  return {units, per_block, (units + per_block - 1) / per_block, per_unit};
}

// STATS: P1 = block mean, P2 = block m2 of x; else P1 = sum dz, P2 = sum dz * xhat.
// Grid (channel tiles, n_blocks): NCS one channel per CUDA block, CL kTileC channels.
template <bool STATS, Activation A, typename x_t, typename acc_t>
__global__ void reduce_kernel(const x_t* __restrict__ dy, const x_t* __restrict__ x, const x_t* __restrict__ r,
                              Vecs<acc_t> v, Geometry g, Blocks b, float p, acc_t dscale, uint64_t seed,
                              acc_t* __restrict__ P1, acc_t* __restrict__ P2) {
  __shared__ acc_t s1[kThreads];
  __shared__ acc_t s2[kThreads];
  const int64_t blk = blockIdx.y;
  const int64_t u0 = blk * b.per_block, u1 = imin(b.units, u0 + b.per_block);
  acc_t a1 = 0, a2 = 0;
  int64_t c;
  if (g.cl) {
    c = int64_t(blockIdx.x) * kTileC + threadIdx.x % kTileC;
    if (c < g.C) {
      const acc_t k = STATS ? static_cast<acc_t>(x[u0 * g.C + c]) : acc_t(0);
      for (int64_t row = u0 + threadIdx.x / kTileC; row < u1; row += kTileR) {
        const int64_t i = row * g.C + c;
        if constexpr (STATS) {
          const acc_t d = static_cast<acc_t>(x[i]) - k;
          a1 += d;
          a2 += d * d;
        } else {
          const int64_t logical = (row / g.S) * g.C * g.S + c * g.S + row % g.S;
          acc_t xhat;
          const acc_t dz = dz_at<A>(dy, x, r, v, i, c, logical, p, dscale, seed, xhat);
          a1 += dz;
          a2 += dz * xhat;
        }
      }
    }
  } else {
    c = blockIdx.x;
    const acc_t k = STATS ? static_cast<acc_t>(x[(u0 * g.C + c) * g.S]) : acc_t(0);
    const int64_t n_el = (u1 - u0) * g.S;
    for (int64_t e = threadIdx.x; e < n_el; e += kThreads) {
      const int64_t n = u0 + e / g.S, s = e % g.S;
      const int64_t i = (n * g.C + c) * g.S + s;
      if constexpr (STATS) {
        const acc_t d = static_cast<acc_t>(x[i]) - k;
        a1 += d;
        a2 += d * d;
      } else {
        acc_t xhat;
        const acc_t dz = dz_at<A>(dy, x, r, v, i, c, i, p, dscale, seed, xhat);
        a1 += dz;
        a2 += dz * xhat;
      }
    }
  }
  s1[threadIdx.x] = a1;
  s2[threadIdx.x] = a2;
  __syncthreads();
  // A fixed tree: NCS over all threads; CL over the kTileR threads of each channel.
  const int stop = g.cl ? kTileC : 1;
  for (int off = kThreads / 2; off >= stop; off >>= 1) {
    if (threadIdx.x < off) {
      s1[threadIdx.x] += s1[threadIdx.x + off];
      s2[threadIdx.x] += s2[threadIdx.x + off];
    }
    __syncthreads();
  }
  if (threadIdx.x >= stop || c >= g.C) return;
  acc_t t1 = s1[threadIdx.x], t2 = s2[threadIdx.x];
  if constexpr (STATS) {
    const acc_t n = static_cast<acc_t>((u1 - u0) * b.per_unit);
    const acc_t k = g.cl ? static_cast<acc_t>(x[u0 * g.C + c]) : static_cast<acc_t>(x[(u0 * g.C + c) * g.S]);
    t2 = t2 - t1 * t1 / n;
    t1 = k + t1 / n;
  }
  P1[blk * g.C + c] = t1;
  P2[blk * g.C + c] = t2;
}

// Per channel, the partials in block order: STATS gives (mean, biased var), else the sums.
template <bool STATS, typename acc_t>
__global__ void combine_kernel(const acc_t* __restrict__ P1, const acc_t* __restrict__ P2, Blocks b, int64_t C,
                               acc_t* __restrict__ out1, acc_t* __restrict__ out2) {
  const int64_t c = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (c >= C) return;
  if constexpr (STATS) {
    const acc_t n = static_cast<acc_t>(b.units * b.per_unit);
    acc_t s = 0;
    for (int64_t k = 0; k < b.n_blocks; ++k) {
      const int64_t nb = (imin(b.units, (k + 1) * b.per_block) - k * b.per_block) * b.per_unit;
      s += static_cast<acc_t>(nb) * P1[k * C + c];
    }
    const acc_t mean = s / n;
    acc_t m2 = 0;
    for (int64_t k = 0; k < b.n_blocks; ++k) {
      const int64_t nb = (imin(b.units, (k + 1) * b.per_block) - k * b.per_block) * b.per_unit;
      const acc_t d = P1[k * C + c] - mean;
      m2 += P2[k * C + c] + static_cast<acc_t>(nb) * d * d;
    }
    out1[c] = mean;
    out2[c] = m2 / n;
  } else {
    acc_t s1 = 0, s2 = 0;
    for (int64_t k = 0; k < b.n_blocks; ++k) {
      s1 += P1[k * C + c];
      s2 += P2[k * C + c];
    }
    out1[c] = s1;
    out2[c] = s2;
  }
}

template <bool STATS, Activation A, typename x_t>
void reduce(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& r, const Vecs<at::opmath_type<x_t>>& v,
            const Geometry& g, float p, uint64_t seed, at::Tensor& out1, at::Tensor& out2) {
  using acc_t = at::opmath_type<x_t>;
  const Blocks b = reduction_blocks(g);
  at::Tensor p1 = at::empty({b.n_blocks, g.C}, out1.options());
  at::Tensor p2 = at::empty({b.n_blocks, g.C}, out1.options());
  const dim3 grid(static_cast<unsigned>(g.cl ? (g.C + kTileC - 1) / kTileC : g.C), static_cast<unsigned>(b.n_blocks));
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  reduce_kernel<STATS, A, x_t, acc_t><<<grid, kThreads, 0, stream>>>(
      dy.defined() ? dy.const_data_ptr<x_t>() : nullptr, x.const_data_ptr<x_t>(),
      r.defined() ? r.const_data_ptr<x_t>() : nullptr, v, g, b, p, static_cast<acc_t>(dropout_scale(p)), seed,
      p1.mutable_data_ptr<acc_t>(), p2.mutable_data_ptr<acc_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  combine_kernel<STATS, acc_t><<<static_cast<unsigned>((g.C + 127) / 128), 128, 0, stream>>>(
      p1.const_data_ptr<acc_t>(), p2.const_data_ptr<acc_t>(), b, g.C, out1.mutable_data_ptr<acc_t>(),
      out2.mutable_data_ptr<acc_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

unsigned elementwise_blocks(int64_t total) {
  return static_cast<unsigned>(std::min<int64_t>((total + kThreads - 1) / kThreads, int64_t(1) << 20));
}

// ---- the ops -----------------------------------------------------------------------------------

std::tuple<at::Tensor, at::Tensor> batch_norm_stats_cuda(const at::Tensor& x_in, bool channels_last) {
  const c10::cuda::CUDAGuard guard(x_in.device());
  BnStatsIO io = bn_stats_io(x_in, channels_last, at::kCUDA);
  if (io.empty) return {io.mean, io.var};
  const Geometry g{io.d.N, io.d.C, io.d.S, channels_last};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, io.x.scalar_type(), "batch_norm_stats_cuda", [&] {
    reduce<true, Activation::kNone, scalar_t>(at::Tensor(), io.x, at::Tensor(), {}, g, 0.0f, 0, io.mean, io.var);
  });
  return {io.mean, io.var};
}

inline Geometry geometry_of(const BnInputs& b, bool channels_last) {
  return Geometry{b.d.N, b.d.C, b.d.S, channels_last};
}

template <typename acc_t>
Vecs<acc_t> vecs_of(const BnInputs& b) {
  return Vecs<acc_t>{b.mean.const_data_ptr<acc_t>(), b.invstd.const_data_ptr<acc_t>(), b.scale.const_data_ptr<acc_t>(),
                     b.shift.const_data_ptr<acc_t>()};
}

at::Tensor batch_norm_fwd_cuda(const at::Tensor& x_in, const std::optional<at::Tensor>& residual_in,
                               const std::optional<at::Tensor>& weight_in, const std::optional<at::Tensor>& bias_in,
                               const at::Tensor& mean_in, const at::Tensor& invstd_in, int64_t activation,
                               double p, const at::Tensor& seed, bool channels_last) {
  const c10::cuda::CUDAGuard guard(x_in.device());
  const BnInputs b = bn_inputs(nullptr, x_in, residual_in, weight_in, bias_in, mean_in, invstd_in, activation, seed,
                               channels_last, at::kCUDA);
  at::Tensor y = at::empty_like(b.x);
  const int64_t total = b.x.numel();
  if (total == 0) return y;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, b.x.scalar_type(), "batch_norm_fwd_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    FUSEDREG_DISPATCH_ACTIVATION(static_cast<Activation>(activation), A, [&] {
      forward_kernel<A, scalar_t, acc_t><<<elementwise_blocks(total), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
          b.x.const_data_ptr<scalar_t>(), b.residual.defined() ? b.residual.const_data_ptr<scalar_t>() : nullptr,
          y.mutable_data_ptr<scalar_t>(), vecs_of<acc_t>(b), geometry_of(b, channels_last), total,
          static_cast<float>(p), static_cast<acc_t>(dropout_scale(static_cast<float>(p))), b.seed);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return y;
}

std::tuple<at::Tensor, at::Tensor> batch_norm_bwd_reduce_cuda(
    const at::Tensor& dy, const at::Tensor& x, const std::optional<at::Tensor>& residual,
    const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias, const at::Tensor& mean,
    const at::Tensor& invstd, int64_t activation, double p, const at::Tensor& seed, bool channels_last) {
  const c10::cuda::CUDAGuard guard(x.device());
  const BnInputs b = bn_inputs(&dy, x, residual, weight, bias, mean, invstd, activation, seed, channels_last, at::kCUDA);
  at::Tensor sum_dz = at::zeros({b.d.C}, b.mean.options());
  at::Tensor sum_dzx = at::zeros({b.d.C}, b.mean.options());
  if (b.x.numel() == 0) return {sum_dz, sum_dzx};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, b.x.scalar_type(), "batch_norm_bwd_reduce_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    FUSEDREG_DISPATCH_ACTIVATION(static_cast<Activation>(activation), A, [&] {
      reduce<false, A, scalar_t>(b.dy, b.x, b.residual, vecs_of<acc_t>(b), geometry_of(b, channels_last),
                                 static_cast<float>(p), b.seed, sum_dz, sum_dzx);
    });
  });
  return {sum_dz, sum_dzx};
}

std::tuple<at::Tensor, at::Tensor> batch_norm_bwd_elemt_cuda(
    const at::Tensor& dy, const at::Tensor& x, const std::optional<at::Tensor>& residual,
    const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias, const at::Tensor& mean,
    const at::Tensor& invstd, const at::Tensor& sum_dz_in, const at::Tensor& sum_dzx_in, double count,
    int64_t activation, double p, const at::Tensor& seed, bool channels_last, bool training,
    bool need_grad_input, bool need_grad_residual) {
  const c10::cuda::CUDAGuard guard(x.device());
  const BnInputs b = bn_inputs(&dy, x, residual, weight, bias, mean, invstd, activation, seed, channels_last, at::kCUDA);
  at::Tensor gx = need_grad_input ? at::empty_like(b.x) : at::empty({0}, b.x.options());
  at::Tensor gr = need_grad_residual ? at::empty_like(b.x) : at::empty({0}, b.x.options());
  const int64_t total = b.x.numel();
  if (total == 0 || !(need_grad_input || need_grad_residual)) return {gx, gr};
  const bool use_sums = training && need_grad_input;
  at::Tensor s1, s2;
  if (use_sums) std::tie(s1, s2) = bn_sums(sum_dz_in, sum_dzx_in, count, b);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, b.x.scalar_type(), "batch_norm_bwd_elemt_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    FUSEDREG_DISPATCH_ACTIVATION(static_cast<Activation>(activation), A, [&] {
      elemt_kernel<A, scalar_t, acc_t><<<elementwise_blocks(total), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
          b.dy.const_data_ptr<scalar_t>(), b.x.const_data_ptr<scalar_t>(),
          b.residual.defined() ? b.residual.const_data_ptr<scalar_t>() : nullptr, vecs_of<acc_t>(b),
          use_sums ? s1.const_data_ptr<acc_t>() : nullptr, use_sums ? s2.const_data_ptr<acc_t>() : nullptr,
          use_sums ? static_cast<acc_t>(1.0 / count) : acc_t(0), geometry_of(b, channels_last), total,
          static_cast<float>(p), static_cast<acc_t>(dropout_scale(static_cast<float>(p))), b.seed, use_sums,
          need_grad_input ? gx.mutable_data_ptr<scalar_t>() : nullptr,
          need_grad_residual ? gr.mutable_data_ptr<scalar_t>() : nullptr);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return {gx, gr};
}

}  // namespace

TORCH_LIBRARY_IMPL(fusedreg, CUDA, m) {
  m.impl("batch_norm_stats", &batch_norm_stats_cuda);
  m.impl("batch_norm_fwd", &batch_norm_fwd_cuda);
  m.impl("batch_norm_bwd_reduce", &batch_norm_bwd_reduce_cuda);
  m.impl("batch_norm_bwd_elemt", &batch_norm_bwd_elemt_cuda);
}

}  // namespace fusedreg
