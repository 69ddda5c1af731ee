// The schemas of every fusedreg op, defined once. Implementations live in
// csrc/cpu/<op>.cpp and csrc/cuda/<op>.cu (TORCH_LIBRARY_IMPL per dispatch key);
// fake functions and autograd live in fusedreg/ops/<op>.py.
//
// Conventions: tensors are made contiguous by the Python wrappers; a dropout seed is a
// 0-dim int64 CPU tensor holding the 64 bits of the seed (read on the host, so a CUDA
// kernel launch never waits on it); `activation` is the code of fusedreg/_activations.py.
#include <Python.h>

#include <torch/library.h>

// Importing fusedreg._C runs the static registrations below; the module itself is empty.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
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
}
