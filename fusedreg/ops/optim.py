"""Optimizer steps: registered in-place ops per backend (multi-tensor, one call per group of
tensors of one device and dtype), with their fake functions.

Ops per backend (same arguments everywhere, mutation declared in the schema):
  reference  fusedreg::adam_step_reference, sgd_step_reference, lion_step_reference
  triton     fusedreg::adam_step_triton, sgd_step_triton, lion_step_triton
  cpu, cuda  fusedreg::adam_step, sgd_step, lion_step          (C++, csrc/ops.cpp)
Parameters and gradients share a dtype; state tensors are in the compute type (float32 for
fp16/bf16/fp32 parameters, float64 for float64). Every tensor is contiguous and of the
parameter's shape; the optimizer classes (fusedreg/optim) check that before any call.
``steps`` are the already-incremented step counts (Adam), ``inv_scale`` is 1/grad_scale.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..reference import optim as ref
from ._common import cpp_ops, register, triton_available

OP = "optim"

_ADAM_MUTATES = ("params", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs")


def _adam_fake(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, lr, beta1, beta2,
               eps, weight_decay, l1, amsgrad, maximize, decoupled, inv_scale) -> None:
    torch._check(len(grads) == len(params) == len(exp_avgs) == len(exp_avg_sqs) == len(steps),
                 lambda: "adam_step: tensor lists must have the same length")
    torch._check(not amsgrad or len(max_exp_avg_sqs) == len(params),
                 lambda: "adam_step: amsgrad needs one max_exp_avg_sq per parameter")


def _sgd_fake(params, grads, momentum_buffers, lr, momentum, dampening, weight_decay, l1,
              nesterov, maximize, decoupled, first_step, inv_scale) -> None:
    torch._check(len(grads) == len(params), lambda: "sgd_step: one grad per parameter")
    torch._check(momentum == 0.0 or len(momentum_buffers) == len(params),
                 lambda: "sgd_step: momentum needs one buffer per parameter")


def _lion_fake(params, grads, exp_avgs, lr, beta1, beta2, weight_decay, l1, maximize,
               inv_scale) -> None:
    torch._check(len(grads) == len(params) == len(exp_avgs),
                 lambda: "lion_step: tensor lists must have the same length")


# ---- reference: the single-tensor functions, one tensor after another ---------------------
@torch.library.custom_op("fusedreg::adam_step_reference", mutates_args=_ADAM_MUTATES)
def _adam_reference(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor],
                    exp_avg_sqs: list[Tensor], max_exp_avg_sqs: list[Tensor], steps: list[float],
                    lr: float, beta1: float, beta2: float, eps: float, weight_decay: float,
                    l1: float, amsgrad: bool, maximize: bool, decoupled: bool,
                    inv_scale: float) -> None:
    for i, p in enumerate(params):
        ref.adam_step(p, grads[i], exp_avgs[i], exp_avg_sqs[i],
                      max_exp_avg_sqs[i] if amsgrad else None, steps[i], lr=lr, beta1=beta1,
                      beta2=beta2, eps=eps, weight_decay=weight_decay, l1=l1, amsgrad=amsgrad,
                      maximize=maximize, decoupled=decoupled, inv_scale=inv_scale)


@torch.library.custom_op("fusedreg::sgd_step_reference", mutates_args=("params", "momentum_buffers"))
def _sgd_reference(params: list[Tensor], grads: list[Tensor], momentum_buffers: list[Tensor],
                   lr: float, momentum: float, dampening: float, weight_decay: float, l1: float,
                   nesterov: bool, maximize: bool, decoupled: bool, first_step: bool,
                   inv_scale: float) -> None:
    for i, p in enumerate(params):
        ref.sgd_step(p, grads[i], momentum_buffers[i] if momentum != 0.0 else None, first_step,
                     lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                     l1=l1, nesterov=nesterov, maximize=maximize, decoupled=decoupled,
                     inv_scale=inv_scale)


@torch.library.custom_op("fusedreg::lion_step_reference", mutates_args=("params", "exp_avgs"))
def _lion_reference(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor], lr: float,
                    beta1: float, beta2: float, weight_decay: float, l1: float, maximize: bool,
                    inv_scale: float) -> None:
    for i, p in enumerate(params):
        ref.lion_step(p, grads[i], exp_avgs[i], lr=lr, beta1=beta1, beta2=beta2,
                      weight_decay=weight_decay, l1=l1, maximize=maximize, inv_scale=inv_scale)


_adam_reference.register_fake(_adam_fake)
_sgd_reference.register_fake(_sgd_fake)
_lion_reference.register_fake(_lion_fake)
_IMPLS = {"reference": {"adam": _adam_reference, "sgd": _sgd_reference, "lion": _lion_reference}}

# ---- triton: multi-tensor kernels (a pointer table per call) ------------------------------
if triton_available():
    @torch.library.custom_op("fusedreg::adam_step_triton", mutates_args=_ADAM_MUTATES)
    def _adam_triton(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor],
                     exp_avg_sqs: list[Tensor], max_exp_avg_sqs: list[Tensor], steps: list[float],
                     lr: float, beta1: float, beta2: float, eps: float, weight_decay: float,
                     l1: float, amsgrad: bool, maximize: bool, decoupled: bool,
                     inv_scale: float) -> None:
        from ..triton import optim as tri

        tri.adam_step(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, lr, beta1,
                      beta2, eps, weight_decay, l1, amsgrad, maximize, decoupled, inv_scale)

    @torch.library.custom_op("fusedreg::sgd_step_triton", mutates_args=("params", "momentum_buffers"))
    def _sgd_triton(params: list[Tensor], grads: list[Tensor], momentum_buffers: list[Tensor],
                    lr: float, momentum: float, dampening: float, weight_decay: float, l1: float,
                    nesterov: bool, maximize: bool, decoupled: bool, first_step: bool,
                    inv_scale: float) -> None:
        from ..triton import optim as tri

        tri.sgd_step(params, grads, momentum_buffers, lr, momentum, dampening, weight_decay, l1,
                     nesterov, maximize, decoupled, first_step, inv_scale)

    @torch.library.custom_op("fusedreg::lion_step_triton", mutates_args=("params", "exp_avgs"))
    def _lion_triton(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor],
                     lr: float, beta1: float, beta2: float, weight_decay: float, l1: float,
                     maximize: bool, inv_scale: float) -> None:
        from ..triton import optim as tri

        tri.lion_step(params, grads, exp_avgs, lr, beta1, beta2, weight_decay, l1, maximize,
                      inv_scale)

    _adam_triton.register_fake(_adam_fake)
    _sgd_triton.register_fake(_sgd_fake)
    _lion_triton.register_fake(_lion_fake)
    _IMPLS["triton"] = {"adam": _adam_triton, "sgd": _sgd_triton, "lion": _lion_triton}

# ---- cpu / cuda: the C++ ops -------------------------------------------------------------
_cpp = cpp_ops("adam_step", "sgd_step", "lion_step")
if _cpp is not None:
    torch.library.register_fake("fusedreg::adam_step")(_adam_fake)
    torch.library.register_fake("fusedreg::sgd_step")(_sgd_fake)
    torch.library.register_fake("fusedreg::lion_step")(_lion_fake)
    _IMPLS["cpu"] = _IMPLS["cuda"] = dict(zip(("adam", "sgd", "lion"), _cpp))

OPS: dict = {}
register(OP, OPS, _IMPLS)
