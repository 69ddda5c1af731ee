// The host side of the optimizer ops (csrc/ops.cpp "optimizers"), shared by the CPU and CUDA
// implementations: the hyperparameters as one named struct per algorithm, their checks, the
// tensor-list checks, and the per-call constants of fusedreg/optim_math.h computed from them.
//
// The ops' hyperparameters are keyword-only in the schemas, and the op entry points
// (adam_step_op, ... below, what both backends register) copy them into the struct by name,
// with designated initializers, then check them, then call the backend's implementation
// with the struct: nothing after the schema passes a run of adjacent doubles by position.
// The Python optimizers check everything before the first call; these checks guard direct
// calls of the ops and run before any tensor is written.
#pragma once

#include <ATen/ATen.h>

#include <cmath>
#include <optional>
#include <string>
#include <utility>
#include <type_traits>
#include <vector>

#include "fusedreg/optim_math.h"

namespace fusedreg {
namespace optim {

// ---- hyperparameters (the ops' keyword arguments, same names) ------------------------------
struct AdamHyper {
  double lr, beta1, beta2, eps, weight_decay, l1;
  bool l1_lr_scaled, amsgrad, maximize, decoupled;
  double inv_scale;
};

struct SgdHyper {
  double lr, momentum, dampening, weight_decay, l1;
  bool l1_lr_scaled, nesterov, maximize, decoupled, first_step;
  double inv_scale;
};

struct LionHyper {
  double lr, beta1, beta2, weight_decay, l1;
  bool l1_lr_scaled, maximize;
  double inv_scale;
};

// The ranges the Python optimizers enforce (fusedreg/optim: lr, eps, weight_decay, l1,
// momentum, dampening finite and >= 0; betas in [0, 1); nesterov needs momentum > 0 and no
// dampening), plus inv_scale finite and > 0; Adam's step counts are checked by check_steps.
namespace detail {
inline void check_nonneg(const char* op, const char* name, double v) {
  TORCH_CHECK(std::isfinite(v) && v >= 0.0, op, ": ", name, " must be finite and >= 0, got ", v);
}
inline void check_beta(const char* op, const char* name, double v) {
  TORCH_CHECK(v >= 0.0 && v < 1.0, op, ": ", name, " must be in [0, 1), got ", v);
}
inline void check_inv_scale(const char* op, double v) {
  TORCH_CHECK(std::isfinite(v) && v > 0.0, op, ": inv_scale must be finite and > 0, got ", v);
}
}  // namespace detail

inline void check_hyper(const AdamHyper& h, const char* op = "fusedreg::adam_step") {
  detail::check_nonneg(op, "lr", h.lr);
  detail::check_beta(op, "beta1", h.beta1);
  detail::check_beta(op, "beta2", h.beta2);
  detail::check_nonneg(op, "eps", h.eps);
  detail::check_nonneg(op, "weight_decay", h.weight_decay);
  detail::check_nonneg(op, "l1", h.l1);
  detail::check_inv_scale(op, h.inv_scale);
}

// ---- Adam's step counts ------------------------------------------------------------------
// adam_step's `steps`: one count per parameter, torch's state["step"] (a 1-element float32
// CPU tensor: read and written on the host, also for CUDA parameters, as torch keeps them
// without capturable), finite and >= 0 before the step. The op entry point checks them
// (check_steps, no write); the implementation, after its tensor-list checks, increments
// every count by one in float32 (torch's `step += 1`) and takes the new counts
// (increment_steps): one call checks, counts and steps, with no per-tensor op for the
// increment and no write before every check has passed.
inline void check_steps(const char* op, at::TensorList steps, size_t n_params) {
  TORCH_CHECK(steps.size() == n_params, op, ": expected one step per parameter, got ",
              steps.size(), " for ", n_params, " params");
  for (size_t i = 0; i < steps.size(); ++i) {
    const at::Tensor& s = steps[i];
    TORCH_CHECK(s.defined() && s.layout() == at::kStrided && s.scalar_type() == at::kFloat &&
                    s.numel() == 1 && s.device().is_cpu(),
                op, ": step ", i, " must be a 1-element float32 CPU tensor");
    const float v = *s.const_data_ptr<float>();
    TORCH_CHECK(std::isfinite(v) && v >= 0.0f, op, ": step ", i,
                " must be finite and >= 0, got ", v);
  }
}

// Adds one to every count (all first, then the reads: a tensor listed twice counts twice and
// both parameters see its final value, as with torch's _foreach_add_) and returns the new
// counts. Only after check_steps and the implementation's other checks.
inline std::vector<double> increment_steps(at::TensorList steps) {
  for (const at::Tensor& s : steps) {
    float* v = s.mutable_data_ptr<float>();
    *v = *v + 1.0f;
  }
  std::vector<double> counts(steps.size());
  for (size_t i = 0; i < steps.size(); ++i) counts[i] = *steps[i].const_data_ptr<float>();
  return counts;
}

inline void check_hyper(const SgdHyper& h) {
  constexpr const char* op = "fusedreg::sgd_step";
  detail::check_nonneg(op, "lr", h.lr);
  detail::check_nonneg(op, "momentum", h.momentum);
  detail::check_nonneg(op, "dampening", h.dampening);
  detail::check_nonneg(op, "weight_decay", h.weight_decay);
  detail::check_nonneg(op, "l1", h.l1);
  TORCH_CHECK(!h.nesterov || (h.momentum > 0.0 && h.dampening == 0.0), op,
              ": nesterov needs momentum > 0 and dampening == 0");
  detail::check_inv_scale(op, h.inv_scale);
}

inline void check_hyper(const LionHyper& h) {
  constexpr const char* op = "fusedreg::lion_step";
  detail::check_nonneg(op, "lr", h.lr);
  detail::check_beta(op, "beta1", h.beta1);
  detail::check_beta(op, "beta2", h.beta2);
  detail::check_nonneg(op, "weight_decay", h.weight_decay);
  detail::check_nonneg(op, "l1", h.l1);
  detail::check_inv_scale(op, h.inv_scale);
}

// ---- tensor lists -------------------------------------------------------------------------
// The compute type of the state tensors for a parameter dtype.
inline at::ScalarType state_dtype(at::ScalarType param) {
  return param == at::kDouble ? at::kDouble : at::kFloat;
}

// Whether `t` covers the same storage positions, element for element, as `p` (a dense,
// non-overlapping tensor), so that a kernel can step both as flat arrays from their data
// pointers: both contiguous, or the same sizes and the same strides (size-1 dims aside).
inline bool same_storage_order(const at::Tensor& t, const at::Tensor& p) {
  if (p.is_contiguous()) return t.is_contiguous();
  if (t.sizes() != p.sizes()) return false;
  for (int64_t d = 0; d < p.dim(); ++d) {
    if (p.size(d) > 1 && t.stride(d) != p.stride(d)) return false;
  }
  return true;
}

// params[i], grads[i] (and each non-empty state list's [i]) share a device and a numel; all
// params have one dtype (that of grads too); all state tensors one dtype, the compute type or
// the params' dtype; every param dense and non-overlapping (any layout: contiguous,
// channels_last, transposed), its grad and state in the same storage order. Returns the
// state dtype (the compute type when there is no state).
inline at::ScalarType check_lists(const char* op, at::DeviceType device_type,
                                  at::TensorList params, at::TensorList grads,
                                  std::initializer_list<at::TensorList> states) {
  TORCH_CHECK(grads.size() == params.size(), op, ": expected one grad per parameter, got ",
              grads.size(), " grads for ", params.size(), " params");
  for (const at::TensorList& s : states) {
    TORCH_CHECK(s.empty() || s.size() == params.size(), op,
                ": expected one state tensor per parameter, got ", s.size(), " for ",
                params.size(), " params");
  }
  if (params.empty()) return at::kFloat;
  const at::ScalarType dtype = params[0].scalar_type();
  const at::Device device = params[0].device();
  TORCH_CHECK(device.type() == device_type, op, ": tensors must be on ",
              c10::DeviceTypeName(device_type), ", got ", device);
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf ||
                  dtype == at::kBFloat16,
              op, ": params must be float16, bfloat16, float32 or float64, got ", dtype);
  at::ScalarType sdtype = state_dtype(dtype);
  for (const at::TensorList& s : states) {
    if (!s.empty()) {
      sdtype = s[0].scalar_type();
      break;
    }
  }
  TORCH_CHECK(sdtype == state_dtype(dtype) || sdtype == dtype, op, ": state tensors must be ",
              state_dtype(dtype), " or ", dtype, " for ", dtype, " params, got ", sdtype);
  for (size_t i = 0; i < params.size(); ++i) {
    const at::Tensor& p = params[i];
    TORCH_CHECK(p.defined() && grads[i].defined(), op, ": undefined tensor (param ", i, ")");
    TORCH_CHECK(p.scalar_type() == dtype && p.device() == device, op,
                ": all params of one call must share a dtype and a device (param ", i, " is ",
                p.scalar_type(), " on ", p.device(), ", param 0 ", dtype, " on ", device, ")");
    TORCH_CHECK(p.is_non_overlapping_and_dense(), op, ": param ", i,
                " must be dense and non-overlapping (any memory format)");
    TORCH_CHECK(grads[i].scalar_type() == dtype && grads[i].device() == device &&
                    grads[i].numel() == p.numel(),
                op, ": grad ", i, " must match its parameter in dtype, device and size (got ",
                grads[i].scalar_type(), " on ", grads[i].device(), ")");
    TORCH_CHECK(same_storage_order(grads[i], p), op, ": grad ", i,
                " must have its parameter's layout (strides)");
    for (const at::TensorList& s : states) {
      if (s.empty()) continue;
      TORCH_CHECK(s[i].defined() && s[i].scalar_type() == sdtype && s[i].device() == device &&
                      s[i].numel() == p.numel() && same_storage_order(s[i], p),
                  op, ": state tensor ", i, " must be a ", sdtype, " tensor on ", device,
                  " with the parameter's size and layout");
    }
  }
  return sdtype;
}

template <typename M>
struct StateType {
  using type = M;
};

// f(StateType<M>) with M the state's storage type: S (the compute type), or the
// parameter's type T when the state is kept in the parameter's dtype (fp16/bf16 only).
template <typename T, typename S, typename F>
void with_state_type(at::ScalarType sdtype, const F& f) {
  if constexpr (std::is_same_v<T, S>) {
    f(StateType<S>{});
  } else if (sdtype == c10::CppTypeToScalarType<T>::value) {
    f(StateType<T>{});
  } else {
    f(StateType<S>{});
  }
}

// ---- per-call constants (double math, one rounding to S) ---------------------------------
// The soft threshold of the L1 proximal step: lr·l1, or l1 itself when not l1_lr_scaled.
template <typename H>
inline double l1_threshold(const H& h) {
  return h.l1_lr_scaled ? h.lr * h.l1 : h.l1;
}

template <typename S>
inline AdamConsts<S> make_adam_consts(const AdamHyper& h) {
  return adam_consts<S>(h.lr, h.inv_scale, h.beta1, h.beta2, h.eps, h.weight_decay, h.l1,
                        h.l1_lr_scaled, h.maximize, h.decoupled);
}

template <typename S>
inline SgdConsts<S> make_sgd_consts(const SgdHyper& h) {
  return SgdConsts<S>{S(h.maximize ? -h.inv_scale : h.inv_scale),
                      S(h.decoupled ? 0.0 : h.weight_decay),
                      S(h.decoupled ? 1.0 - h.lr * h.weight_decay : 1.0),
                      S(-h.lr), S(h.momentum), S(1.0 - h.dampening), S(l1_threshold(h)), h.first_step,
                      h.nesterov};
}

template <typename S>
inline LionConsts<S> make_lion_consts(const LionHyper& h) {
  return LionConsts<S>{S(h.maximize ? -h.inv_scale : h.inv_scale), S(1.0 - h.lr * h.weight_decay),
                       S(-h.lr), S(h.beta1), S(1.0 - h.beta1), S(h.beta2), S(1.0 - h.beta2),
                       S(l1_threshold(h))};
}

inline AdamBiasCorrection adam_bias_correction(const AdamHyper& h, double step) {
  return adam_bias_correction(h.lr, h.beta1, h.beta2, step);
}

// ---- capturable Adam ---------------------------------------------------------------------
// adam_step_capturable's arguments beyond adam_step's: one 1-element float32 step tensor per
// parameter and the optional 1-element float tensors lr_tensor, grad_scale, found_inf, all on
// the parameters' device. Metadata only: no device value is read here (a read would
// synchronize the host with the device, which a CUDA graph capture forbids).
inline void check_capturable(const char* op, at::TensorList params, at::TensorList steps,
                             const std::optional<at::Tensor>& lr_tensor,
                             const std::optional<at::Tensor>& grad_scale,
                             const std::optional<at::Tensor>& found_inf) {
  TORCH_CHECK(steps.size() == params.size(), op, ": expected one step per parameter, got ",
              steps.size(), " for ", params.size(), " params");
  if (params.empty()) return;
  const at::Device device = params[0].device();
  for (size_t i = 0; i < steps.size(); ++i) {
    TORCH_CHECK(steps[i].defined() && steps[i].scalar_type() == at::kFloat &&
                    steps[i].numel() == 1 && steps[i].device() == device,
                op, ": step ", i, " must be a 1-element float32 tensor on ", device);
  }
  const std::pair<const char*, const std::optional<at::Tensor>*> scalars[] = {
      {"lr_tensor", &lr_tensor}, {"grad_scale", &grad_scale}, {"found_inf", &found_inf}};
  for (const auto& [name, t] : scalars) {
    if (!t->has_value() || !(*t)->defined()) continue;
    const at::Tensor& v = **t;
    TORCH_CHECK(v.numel() == 1 && at::isFloatingType(v.scalar_type()) && v.device() == device,
                op, ": ", name, " must be None or a 1-element float tensor on ", device,
                " (the parameters' device), got a ", v.scalar_type(), " tensor of ", v.numel(),
                " elements on ", v.device());
  }
}

// ---- op entry points ----------------------------------------------------------------------
// What each backend registers for the schemas of csrc/ops.cpp: the positional C++ signature
// the dispatcher calls, turned into the struct by name, checked, and handed to the backend's
// implementation (`impl`), e.g. m.impl("adam_step", &adam_step_op<adam_step_cpu>).
using AdamImpl = void (*)(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                          at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs,
                          at::TensorList steps, const AdamHyper& h);
using SgdImpl = void (*)(at::TensorList params, at::TensorList grads,
                         at::TensorList momentum_buffers, const SgdHyper& h);
using LionImpl = void (*)(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                          const LionHyper& h);

// The ops' Adam arguments as the implementations' struct (both Adam ops build it here).
inline AdamHyper adam_hyper(double lr, double beta1, double beta2, double eps, double weight_decay,
                            double l1, bool l1_lr_scaled, bool amsgrad, bool maximize,
                            bool decoupled, double inv_scale) {
  return AdamHyper{.lr = lr,
                   .beta1 = beta1,
                   .beta2 = beta2,
                   .eps = eps,
                   .weight_decay = weight_decay,
                   .l1 = l1,
                   .l1_lr_scaled = l1_lr_scaled,
                   .amsgrad = amsgrad,
                   .maximize = maximize,
                   .decoupled = decoupled,
                   .inv_scale = inv_scale};
}

template <AdamImpl impl>
void adam_step_op(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                  at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs,
                  at::TensorList steps, double lr, double beta1, double beta2, double eps,
                  double weight_decay, double l1, bool l1_lr_scaled, bool amsgrad, bool maximize,
                  bool decoupled, double inv_scale) {
  const AdamHyper h = adam_hyper(lr, beta1, beta2, eps, weight_decay, l1, l1_lr_scaled, amsgrad,
                                 maximize, decoupled, inv_scale);
  check_hyper(h);
  check_steps("fusedreg::adam_step", steps, params.size());
  impl(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, h);
}

// adam_step_capturable: the hyperparameters' struct with inv_scale = 1 (grad_scale, when
// given, is read on the device) and lr the float used when lr_tensor is None.
using AdamCapturableImpl = void (*)(at::TensorList params, at::TensorList grads,
                                    at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                                    at::TensorList max_exp_avg_sqs, at::TensorList steps,
                                    const std::optional<at::Tensor>& lr_tensor,
                                    const std::optional<at::Tensor>& grad_scale,
                                    const std::optional<at::Tensor>& found_inf,
                                    const AdamHyper& h);

template <AdamCapturableImpl impl>
void adam_step_capturable_op(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                             at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs,
                             at::TensorList steps, const std::optional<at::Tensor>& lr_tensor,
                             const std::optional<at::Tensor>& grad_scale,
                             const std::optional<at::Tensor>& found_inf, double lr, double beta1,
                             double beta2, double eps, double weight_decay, double l1,
                             bool l1_lr_scaled, bool amsgrad, bool maximize, bool decoupled) {
  // inv_scale = 1: grad_scale, when given, is read on the device
  const AdamHyper h = adam_hyper(lr, beta1, beta2, eps, weight_decay, l1, l1_lr_scaled, amsgrad,
                                 maximize, decoupled, 1.0);
  check_hyper(h, "fusedreg::adam_step_capturable");
  check_capturable("fusedreg::adam_step_capturable", params, steps, lr_tensor, grad_scale,
                   found_inf);
  impl(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, lr_tensor, grad_scale,
       found_inf, h);
}

template <SgdImpl impl>
void sgd_step_op(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers,
                 double lr, double momentum, double dampening, double weight_decay, double l1,
                 bool l1_lr_scaled, bool nesterov, bool maximize, bool decoupled, bool first_step,
                 double inv_scale) {
  const SgdHyper h{.lr = lr,
                   .momentum = momentum,
                   .dampening = dampening,
                   .weight_decay = weight_decay,
                   .l1 = l1,
                   .l1_lr_scaled = l1_lr_scaled,
                   .nesterov = nesterov,
                   .maximize = maximize,
                   .decoupled = decoupled,
                   .first_step = first_step,
                   .inv_scale = inv_scale};
  check_hyper(h);
  impl(params, grads, momentum_buffers, h);
}

template <LionImpl impl>
void lion_step_op(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, double lr,
                  double beta1, double beta2, double weight_decay, double l1, bool l1_lr_scaled,
                  bool maximize, double inv_scale) {
  const LionHyper h{.lr = lr,
                    .beta1 = beta1,
                    .beta2 = beta2,
                    .weight_decay = weight_decay,
                    .l1 = l1,
                    .l1_lr_scaled = l1_lr_scaled,
                    .maximize = maximize,
                    .inv_scale = inv_scale};
  check_hyper(h);
  impl(params, grads, exp_avgs, h);
}

}  // namespace optim
}  // namespace fusedreg
