// Host-side argument checks of the optimizer ops (csrc/ops.cpp "optimizers"), shared by the
// CPU and CUDA implementations. The Python optimizers check everything before the first
// call; these checks guard direct calls of the ops and run before any tensor is written.
#pragma once

#include <ATen/ATen.h>

#include <string>

namespace fusedreg {
namespace optim {

// The compute type of the state tensors for a parameter dtype.
inline at::ScalarType state_dtype(at::ScalarType param) {
  return param == at::kDouble ? at::kDouble : at::kFloat;
}

// params[i], grads[i] (and each non-empty state list's [i]) share a device and a numel; all
// params have one dtype (that of grads too), all state the compute type; all contiguous.
inline void check_lists(const char* op, at::DeviceType device_type, at::TensorList params,
                        at::TensorList grads, std::initializer_list<at::TensorList> states) {
  TORCH_CHECK(grads.size() == params.size(), op, ": expected one grad per parameter, got ",
              grads.size(), " grads for ", params.size(), " params");
  if (params.empty()) return;
  const at::ScalarType dtype = params[0].scalar_type();
  const at::Device device = params[0].device();
  TORCH_CHECK(device.type() == device_type, op, ": tensors must be on ",
              c10::DeviceTypeName(device_type), ", got ", device);
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf ||
                  dtype == at::kBFloat16,
              op, ": params must be float16, bfloat16, float32 or float64, got ", dtype);
  for (size_t i = 0; i < params.size(); ++i) {
    const at::Tensor& p = params[i];
    TORCH_CHECK(p.scalar_type() == dtype && p.device() == device, op,
                ": all params of one call must share a dtype and a device (param ", i, ")");
    TORCH_CHECK(p.is_contiguous() && grads[i].is_contiguous(), op,
                ": params and grads must be contiguous (param ", i, ")");
    TORCH_CHECK(grads[i].scalar_type() == dtype && grads[i].device() == device &&
                    grads[i].numel() == p.numel(),
                op, ": grad ", i, " must match its parameter in dtype, device and size");
    for (const at::TensorList& s : states) {
      if (s.empty()) continue;
      TORCH_CHECK(s.size() == params.size(), op, ": expected one state tensor per parameter");
      TORCH_CHECK(s[i].scalar_type() == state_dtype(dtype) && s[i].device() == device &&
                      s[i].numel() == p.numel() && s[i].is_contiguous(),
                  op, ": state tensor ", i, " must be a contiguous ", state_dtype(dtype),
                  " tensor on ", device, " with the parameter's size");
    }
  }
}

}  // namespace optim
}  // namespace fusedreg
