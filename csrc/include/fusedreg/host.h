// Host-side helpers shared by the CPU (csrc/cpu/) and CUDA (csrc/cuda/) implementations of
// an op: shape views and argument checks (ATen only, no kernels).
#pragma once

#include <ATen/ATen.h>

#include <cmath>
#include <optional>
#include <type_traits>

namespace fusedreg {

// A tensor seen as (M, N) rows over its last dimension (a 0-dim tensor is one element).
struct Rows {
  int64_t M, N;
};

inline Rows as_rows(const at::Tensor& x) {
  const int64_t N = x.dim() == 0 ? 1 : x.size(-1);
  return {N == 0 ? 0 : x.numel() / N, N};
}

// The scalar arguments every registered op checks before it allocates or launches anything
// (user code can call an op directly, with any value its schema types allow). NaN fails
// every range check.
inline void check_seed(const at::Tensor& seed, const char* op) {
  TORCH_CHECK(seed.device().is_cpu() && seed.scalar_type() == at::kLong && seed.numel() == 1,
              "fusedreg::", op, ": seed must be a 1-element int64 CPU tensor, got ",
              seed.scalar_type(), " of ", seed.numel(), " elements on ", seed.device());
}

inline void check_probability(double p, const char* op) {
  TORCH_CHECK(p >= 0.0 && p <= 1.0, "fusedreg::", op, ": p must be in [0, 1], got ", p);
}

// The codes of fusedreg/_activations.py (Activation in fusedreg/activation.h).
inline void check_activation(int64_t activation, const char* op) {
  TORCH_CHECK(activation >= 0 && activation <= 4, "fusedreg::", op,
              ": activation must be a code in [0, 4] (none, relu, gelu, gelu_tanh, silu), got ",
              activation);
}

inline void check_eps(double eps, const char* op) {
  // Any finite eps, as torch's layer_norm/rms_norm accept (its own tests use negative ones).
  TORCH_CHECK(std::isfinite(eps), "fusedreg::", op, ": eps must be finite, got ", eps);
}

inline void check_floating(at::ScalarType st, const char* name, const char* op) {
  TORCH_CHECK(st == at::kDouble || st == at::kFloat || st == at::kHalf || st == at::kBFloat16,
              "fusedreg::", op, ": ", name, " must be float64, float32, float16 or bfloat16, got ",
              st);
}

inline void check_floating(const at::Tensor& t, const char* name, const char* op) {
  check_floating(t.scalar_type(), name, op);
}

// bias_dropout's arguments: x a floating tensor on `device_type`, p a probability, an
// activation code, the seed a 1-element int64 CPU tensor, bias (N,) and residual (x's shape)
// of x's dtype and device.
inline void check_bias_dropout_inputs(const at::Tensor& x, const std::optional<at::Tensor>& bias,
                                      const std::optional<at::Tensor>& residual, double p,
                                      int64_t activation, const at::Tensor& seed,
                                      at::DeviceType device_type) {
  TORCH_CHECK(x.device().type() == device_type, "fusedreg::bias_dropout (", device_type,
              "): x must be a ", device_type, " tensor");
  check_floating(x, "x", "bias_dropout");
  check_probability(p, "bias_dropout");
  check_activation(activation, "bias_dropout");
  check_seed(seed, "bias_dropout");
  if (bias) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == (x.dim() ? x.size(-1) : 1),
                "fusedreg::bias_dropout: bias must have shape (x.shape[-1],)");
    TORCH_CHECK(bias->scalar_type() == x.scalar_type() && bias->device() == x.device(),
                "fusedreg::bias_dropout: bias must match x in dtype and device");
  }
  if (residual) {
    TORCH_CHECK(residual->sizes() == x.sizes(), "fusedreg::bias_dropout: residual must match x");
    TORCH_CHECK(residual->scalar_type() == x.scalar_type() && residual->device() == x.device(),
                "fusedreg::bias_dropout: residual must match x in dtype and device");
  }
}

// layer_norm's scalar arguments and the dtype of x (dy in backward) and h.
inline void check_layer_norm_args(const at::Tensor& x, at::ScalarType h_dtype, double eps,
                                  double p, const at::Tensor& seed, const char* op) {
  check_floating(x, "x", op);
  check_floating(h_dtype, "h", op);
  check_eps(eps, op);
  check_probability(p, op);
  check_seed(seed, op);
}

// The statistics the backward reads: (M,) tensors of the compute type on x's device (mean
// only for LayerNorm).
inline void check_statistics(const at::Tensor& mean, const at::Tensor& rstd, bool rms, int64_t M,
                             at::ScalarType st, const at::Device& device) {
  for (const at::Tensor* t : {&rstd, &mean}) {
    if (rms && t == &mean) continue;
    TORCH_CHECK(t->scalar_type() == st && t->numel() == M && t->device() == device,
                "fusedreg::layer_norm_bwd: mean/rstd must be (M,) ", st, " tensors on ", device,
                ", got ", t->scalar_type(), " of ", t->numel(), " elements on ", t->device());
  }
}

// layer_norm's dtype combinations: x_t is the activation type; w_t (weight, bias) and h_t
// (residual, h) are x_t, or float when x is half/bfloat16 (fusedreg/_checks.py:
// check_norm_param). Calls f(w_t(), h_t()).
template <typename x_t, typename F>
void dispatch_wh(at::ScalarType w_type, at::ScalarType h_type, F f) {
  const at::ScalarType xs = c10::CppTypeToScalarType<x_t>::value;
  TORCH_CHECK(w_type == xs || w_type == at::kFloat, "fusedreg::layer_norm: weight/bias dtype ",
              w_type, " not supported with x of dtype ", xs);
  TORCH_CHECK(h_type == xs || h_type == at::kFloat, "fusedreg::layer_norm: residual/h dtype ",
              h_type, " not supported with x of dtype ", xs);
  if (w_type == xs && h_type == xs) return f(x_t(), x_t());
  if constexpr (!std::is_same_v<x_t, float> && !std::is_same_v<x_t, double>) {
    if (w_type == at::kFloat && h_type == xs) return f(float(), x_t());
    if (w_type == xs && h_type == at::kFloat) return f(x_t(), float());
    return f(float(), float());
  }
  TORCH_CHECK(false, "fusedreg::layer_norm: unsupported dtype combination");
}

}  // namespace fusedreg
