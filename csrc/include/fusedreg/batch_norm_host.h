// Host-side argument checks and input preparation of the batch_norm ops, shared by
// csrc/cpu/batch_norm.cpp and csrc/cuda/batch_norm.cu (ATen only, no kernels).
//
// x is stored as a contiguous (N, C, S) tensor, or (N, S, C) when channels_last
// (fusedreg/ops/batch_norm.py); residual, dy like x; mean, invstd, weight, bias, the backward
// sums: (C,) in the compute type (float32; float64 for float64 x).
#pragma once

#include <ATen/ATen.h>

#include <cmath>
#include <optional>
#include <tuple>
#include <utility>

namespace fusedreg {

struct BnDims {
  int64_t N, C, S;
};

inline BnDims bn_dims(const at::Tensor& x, bool channels_last) {
  TORCH_CHECK(x.dim() == 3, "fusedreg::batch_norm: x must be stored as (N, C, S) or (N, S, C), got ",
              x.dim(), " dims");
  return channels_last ? BnDims{x.size(0), x.size(2), x.size(1)} : BnDims{x.size(0), x.size(1), x.size(2)};
}

inline at::ScalarType bn_compute_type(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

inline void bn_check_x(const at::Tensor& x, at::DeviceType device_type) {
  TORCH_CHECK(x.device().type() == device_type, "fusedreg::batch_norm (", device_type,
              "): x must be a ", device_type, " tensor");
  const auto t = x.scalar_type();
  TORCH_CHECK(t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16,
              "fusedreg::batch_norm: x must be float16, bfloat16, float32 or float64");
}

// A (C,) vector in the compute type on x's device, contiguous (undefined if absent).
inline at::Tensor bn_vec(const std::optional<at::Tensor>& v, const char* name, const at::Tensor& x,
                         int64_t C) {
  if (!v || !v->defined()) return at::Tensor();
  TORCH_CHECK(v->dim() == 1 && v->size(0) == C, "fusedreg::batch_norm: ", name, " must have shape (",
              C, ",)");
  TORCH_CHECK(v->scalar_type() == bn_compute_type(x.scalar_type()), "fusedreg::batch_norm: ", name,
              " must be in the compute type (float32, float64 for float64 x)");
  TORCH_CHECK(v->device() == x.device(), "fusedreg::batch_norm: ", name, " must be on x's device");
  return v->contiguous();
}

// A tensor like x (same shape, dtype and device), contiguous (undefined if absent).
inline at::Tensor bn_like_x(const std::optional<at::Tensor>& t, const char* name, const at::Tensor& x) {
  if (!t || !t->defined()) return at::Tensor();
  TORCH_CHECK(t->sizes() == x.sizes() && t->scalar_type() == x.scalar_type() && t->device() == x.device(),
              "fusedreg::batch_norm: ", name, " must match x in shape, dtype and device");
  return t->contiguous();
}

inline uint64_t bn_seed(const at::Tensor& seed) {
  TORCH_CHECK(seed.device().is_cpu() && seed.scalar_type() == at::kLong && seed.numel() == 1,
              "fusedreg::batch_norm: seed must be a 1-element int64 CPU tensor");
  return static_cast<uint64_t>(seed.item<int64_t>());
}

// The per-channel affine map of z = (x - mean) * scale + shift: scale = invstd * weight (invstd
// without a weight), shift = bias (0 without one).
inline std::pair<at::Tensor, at::Tensor> bn_affine(const at::Tensor& invstd, const at::Tensor& weight,
                                                   const at::Tensor& bias) {
  at::Tensor scale = weight.defined() ? invstd * weight : invstd.clone();
  at::Tensor shift = bias.defined() ? bias.clone() : at::zeros_like(invstd);
  return {scale.contiguous(), shift.contiguous()};
}

// The statistics op's checked input and its outputs: (C,) mean and var in the compute type,
// NaN for an empty batch (``empty`` then says there is nothing left to compute).
struct BnStatsIO {
  at::Tensor x, mean, var;
  BnDims d;
  bool empty;
};

inline BnStatsIO bn_stats_io(const at::Tensor& x_in, bool channels_last, at::DeviceType device_type) {
  bn_check_x(x_in, device_type);
  BnStatsIO io;
  io.d = bn_dims(x_in, channels_last);
  io.x = x_in.contiguous();
  const auto ct = bn_compute_type(io.x.scalar_type());
  io.mean = at::empty({io.d.C}, io.x.options().dtype(ct));
  io.var = at::empty({io.d.C}, io.x.options().dtype(ct));
  io.empty = io.d.C == 0 || io.d.N * io.d.S == 0;
  if (io.d.C != 0 && io.empty) {
    io.mean.fill_(NAN);
    io.var.fill_(NAN);
  }
  return io;
}

// The checked, contiguous inputs of batch_norm_fwd (dy undefined), batch_norm_bwd_reduce and
// batch_norm_bwd_elemt, with the per-channel affine map folded from invstd, weight and bias.
struct BnInputs {
  at::Tensor dy, x, residual, mean, invstd, scale, shift;
  BnDims d;
  uint64_t seed;
};

inline BnInputs bn_inputs(const at::Tensor* dy, const at::Tensor& x_in,
                          const std::optional<at::Tensor>& residual_in,
                          const std::optional<at::Tensor>& weight_in,
                          const std::optional<at::Tensor>& bias_in, const at::Tensor& mean_in,
                          const at::Tensor& invstd_in, int64_t activation, const at::Tensor& seed,
                          bool channels_last, at::DeviceType device_type) {
  bn_check_x(x_in, device_type);
  BnInputs b;
  b.d = bn_dims(x_in, channels_last);
  b.x = x_in.contiguous();
  if (dy != nullptr) b.dy = bn_like_x(*dy, "dy", b.x);
  b.residual = bn_like_x(residual_in, "residual", b.x);
  const at::Tensor weight = bn_vec(weight_in, "weight", b.x, b.d.C);
  const at::Tensor bias = bn_vec(bias_in, "bias", b.x, b.d.C);
  b.mean = bn_vec(mean_in, "mean", b.x, b.d.C);
  b.invstd = bn_vec(invstd_in, "invstd", b.x, b.d.C);
  TORCH_CHECK(activation >= 0 && activation <= 4, "fusedreg::batch_norm: unknown activation code ",
              activation);
  b.seed = bn_seed(seed);
  std::tie(b.scale, b.shift) = bn_affine(b.invstd, weight, bias);
  return b;
}

// The backward sums of batch_norm_bwd_elemt in training (count > 0), checked like the vectors.
inline std::pair<at::Tensor, at::Tensor> bn_sums(const at::Tensor& sum_dz, const at::Tensor& sum_dz_xhat,
                                                 double count, const BnInputs& b) {
  TORCH_CHECK(count > 0, "fusedreg::batch_norm_bwd_elemt: count must be positive in training");
  return {bn_vec(sum_dz, "sum_dz", b.x, b.d.C), bn_vec(sum_dz_xhat, "sum_dz_xhat", b.x, b.d.C)};
}

}  // namespace fusedreg
