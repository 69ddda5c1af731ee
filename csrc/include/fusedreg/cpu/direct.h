// When a direct call (fusedreg._C.<op>: positional arguments parsed in C, then the op's
// registered CPU kernel, without torch.ops' Python argument parsing and boxed dispatch) may
// run: only where the dispatcher itself would route straight to the CPU kernel. Used by the
// row ops' calls (csrc/ops.cpp) and the optimizers' (csrc/cpu/optim.cpp); anything else
// declines, and the caller makes the torch.ops call.
#pragma once

#include <Python.h>

#include <ATen/ATen.h>
#include <ATen/PythonTorchFunctionTLS.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <c10/core/impl/TorchDispatchModeTLS.h>
#include <torch/csrc/autograd/python_variable.h>

namespace fusedreg {
namespace cpu {

// The keys of a plain CPU tensor (Tensor or Parameter): anything else goes through torch.ops.
inline const c10::DispatchKeySet kPlainCpu{c10::DispatchKey::CPU, c10::DispatchKey::ADInplaceOrView,
                                           c10::DispatchKey::AutogradCPU, c10::DispatchKey::AutocastCPU};

// The keys every thread includes by default; any other included key (functorch's layers, a
// Python mode's, the jit tracer's) means the dispatcher would not go straight to the kernel.
inline const c10::DispatchKeySet kDefaultIncluded{c10::DispatchKey::BackendSelect,
                                                  c10::DispatchKey::ADInplaceOrView};

// No dispatch or torch-function mode and no thread-local included key beyond the defaults.
inline bool direct_call_allowed() {
  return c10::impl::TorchDispatchModeTLS::stack_len() == 0 &&
         at::impl::PythonTorchFunctionTLS::stack_len() == 0 &&
         (c10::impl::tls_local_dispatch_key_set().included_ - kDefaultIncluded).empty();
}

// A tensor whose keys are those of a plain CPU tensor.
inline bool plain_cpu(const at::Tensor& t) {
  const c10::DispatchKeySet ks = t.key_set();
  return ks.has(c10::DispatchKey::CPU) && (ks | kPlainCpu) == kPlainCpu;
}

// obj is exactly a torch.Tensor or Parameter (no subclass) holding a plain CPU tensor.
inline bool plain_cpu_tensor(PyObject* obj) {
  return THPVariable_CheckExact(obj) && plain_cpu(THPVariable_Unpack(obj));
}

}  // namespace cpu
}  // namespace fusedreg
