// The schemas of every fusedreg op, defined once. Implementations live in
// csrc/cpu/<op>.cpp and csrc/cuda/<op>.cu (TORCH_LIBRARY_IMPL per dispatch key);
// fake functions and autograd live in fusedreg/ops/<op>.py.
//
// Conventions: tensors are made contiguous by the Python wrappers; a dropout seed is a
// 0-dim int64 CPU tensor holding the 64 bits of the seed (read on the host, so a CUDA
// kernel launch never waits on it); `activation` is the code of fusedreg/_activations.py.
#include <Python.h>

#include <torch/library.h>

namespace fusedreg {
PyMethodDef* optim_direct_methods();  // csrc/cpu/optim.cpp
}

// Importing fusedreg._C runs the static registrations below. The module's only functions are
// the optimizers' direct CPU calls (csrc/cpu/optim.cpp says why they exist); every op is
// reached through torch.ops.fusedreg.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1,
                                          fusedreg::optim_direct_methods()};
  return PyModule_Create(&module_def);
}

TORCH_LIBRARY(fusedreg, m) {
  // ---- bias_dropout: out = residual + dropout(act(x + bias)) ----------------------------
  m.def(
      "bias_dropout_fwd(Tensor x, Tensor? bias, Tensor? residual, float p, int activation, "
      "Tensor seed) -> Tensor");
  // x is needed only with an activation; grad_bias is empty unless need_grad_bias.
  m.def(
      "bias_dropout_bwd(Tensor grad_out, Tensor? x, Tensor? bias, float p, int activation, "
      "Tensor seed, bool need_grad_bias) -> (Tensor grad_x, Tensor grad_bias)");
  // The mask's uniforms u(seed, i) for i in [start, start + count), float32 on `device_like`'s
  // device: lets tests check the kernels' Philox at any index (e.g. beyond 2^34) cheaply.
  m.def("dropout_uniform(Tensor seed, int start, int count, Tensor device_like) -> Tensor");

  // ---- layer_norm (LayerNorm, RMSNorm, dropout + residual + norm) -----------------------
  // x, residual, h: (M, N) rows; weight, bias: (N,). h = residual + dropout(x) rounded to
  // h_dtype, y = norm(h) * weight + bias. h is returned only when store_h (else empty); mean
  // is empty for rms. mean and rstd are float32 (float64 for float64 x).
  m.def(
      "layer_norm_fwd(Tensor x, Tensor? residual, Tensor? weight, Tensor? bias, float eps, "
      "float p, Tensor seed, bool rms, ScalarType h_dtype, bool store_h) "
      "-> (Tensor y, Tensor h, Tensor mean, Tensor rstd)");
  // dh_out is the grad of the returned h (prenorm); grad_residual (h's dtype) is written only
  // when need_grad_residual, grad_weight/grad_bias only when asked (else empty tensors).
  m.def(
      "layer_norm_bwd(Tensor dy, Tensor? dh_out, Tensor h, Tensor? weight, Tensor? bias, "
      "Tensor mean, Tensor rstd, float p, Tensor seed, bool rms, ScalarType x_dtype, "
      "bool need_grad_residual, bool need_grad_weight, bool need_grad_bias) "
      "-> (Tensor grad_x, Tensor grad_residual, Tensor grad_weight, Tensor grad_bias)");

  // ---- optimizers ---------------------------------------------------------------------
  // One call steps a list of parameters of one device and dtype (multi-tensor), in place.
  // The hyperparameters are keyword-only (after `*`): several are adjacent floats that a
  // positional call could swap unnoticed. Both backends turn them into one named struct and
  // check their ranges before any write (fusedreg/optim_args.h).
  // params/grads: same dtype and shape; state tensors (exp_avgs, ...) all in one dtype, the
  // compute type (float32 for fp16/bf16/fp32 params, float64 for float64) or the params'.
  // Each param is dense and non-overlapping in any layout (contiguous, channels_last,
  // transposed); its grad and state tensors have its strides: the kernels step the storage.
  // steps: Adam's step count per parameter, torch's state["step"] (1-element float32 CPU
  // tensors, read and written on the host, so a CUDA launch never waits), incremented by the
  // op after its checks (one call counts and steps); inv_scale: 1/grad_scale (1 without AMP); l1: the L1 proximal
  // strength (threshold lr·l1 after the update; l1 itself when not l1_lr_scaled);
  // decoupled: weight decay as p·(1 − lr·wd) instead of L2 added to the gradient. max_exp_avg_sqs is empty unless amsgrad,
  // momentum_buffers empty when momentum == 0; first_step: buffers are new (buf ← g).
  m.def(
      "adam_step(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, "
      "Tensor(c!)[] exp_avg_sqs, Tensor(d!)[] max_exp_avg_sqs, Tensor(e!)[] steps, *, float lr, "
      "float beta1, float beta2, float eps, float weight_decay, float l1, bool l1_lr_scaled, "
      "bool amsgrad, bool maximize, bool decoupled, float inv_scale) -> ()");
  // adam_step for capturable=True: the values that change from step to step are device
  // tensors read by the kernel, never on the host (a CUDA graph replays the capture):
  // steps (1-element float32, already incremented), lr_tensor (None: the float lr),
  // grad_scale (None: 1) and found_inf (None: 0; non-zero: nothing is written). CUDA only.
  m.def(
      "adam_step_capturable(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, "
      "Tensor(c!)[] exp_avg_sqs, Tensor(d!)[] max_exp_avg_sqs, Tensor[] steps, "
      "Tensor? lr_tensor, Tensor? grad_scale, Tensor? found_inf, *, float lr, float beta1, "
      "float beta2, float eps, float weight_decay, float l1, bool l1_lr_scaled, bool amsgrad, "
      "bool maximize, bool decoupled) -> ()");
  m.def(
      "sgd_step(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] momentum_buffers, *, "
      "float lr, float momentum, float dampening, float weight_decay, float l1, "
      "bool l1_lr_scaled, bool nesterov, bool maximize, bool decoupled, bool first_step, "
      "float inv_scale) -> ()");
  m.def(
      "lion_step(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, *, float lr, "
      "float beta1, float beta2, float weight_decay, float l1, bool l1_lr_scaled, bool maximize, "
      "float inv_scale) -> ()");

  // ---- batch_norm: y = dropout(act((x - mean) * invstd * weight + bias + residual)) ------------
  // x (and residual, dy, the grads) stored as contiguous (N, C, S), or (N, S, C) when
  // channels_last; mean, invstd, weight, bias and the backward sums are (C,) in the compute type
  // (float32, float64 for float64 x). The dropout mask index is the flat index in the logical
  // (N, C, S) tensor. stats: per-channel mean and biased variance; bwd_reduce: sum dz and
  // sum dz * xhat (dz = dy * keep * scale * act'(z)); bwd_elemt: grad_x (training: with the
  // sums over `count` values per channel; eval: without) and grad_residual = dz, each empty
  // unless asked for.
  m.def("batch_norm_stats(Tensor x, bool channels_last) -> (Tensor mean, Tensor var)");
  m.def(
      "batch_norm_fwd(Tensor x, Tensor? residual, Tensor? weight, Tensor? bias, Tensor mean, "
      "Tensor invstd, int activation, float p, Tensor seed, bool channels_last) -> Tensor");
  m.def(
      "batch_norm_bwd_reduce(Tensor dy, Tensor x, Tensor? residual, Tensor? weight, Tensor? bias, "
      "Tensor mean, Tensor invstd, int activation, float p, Tensor seed, bool channels_last) "
      "-> (Tensor sum_dz, Tensor sum_dz_xhat)");
  m.def(
      "batch_norm_bwd_elemt(Tensor dy, Tensor x, Tensor? residual, Tensor? weight, Tensor? bias, "
      "Tensor mean, Tensor invstd, Tensor sum_dz, Tensor sum_dz_xhat, float count, int activation, "
      "float p, Tensor seed, bool channels_last, bool training, bool need_grad_input, "
      "bool need_grad_residual) -> (Tensor grad_x, Tensor grad_residual)");
}
