// Host-side helpers shared by the CPU (csrc/cpu/) and CUDA (csrc/cuda/) implementations of
// an op: shape views and argument checks (ATen only, no kernels).
#pragma once

#include <ATen/ATen.h>

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

// bias_dropout's inputs: x on `device_type`, the seed a 1-element int64 CPU tensor, bias (N,)
// and residual (x's shape) of x's dtype and device.
inline void check_bias_dropout_inputs(const at::Tensor& x, const std::optional<at::Tensor>& bias,
                                      const std::optional<at::Tensor>& residual,
                                      const at::Tensor& seed, at::DeviceType device_type) {
  TORCH_CHECK(x.device().type() == device_type, "fusedreg::bias_dropout (", device_type,
              "): x must be a ", device_type, " tensor");
  TORCH_CHECK(seed.device().is_cpu() && seed.scalar_type() == at::kLong && seed.numel() == 1,
              "fusedreg::bias_dropout: seed must be a 1-element int64 CPU tensor");
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
