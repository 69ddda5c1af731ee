"""Optimizer steps: the registered in-place ops of every backend (multi-tensor: one call steps
a list of tensors of one device and dtype), declared once each, with their fake functions.

Ops: ``fusedreg::adam_step``, ``sgd_step``, ``lion_step`` (C++, schemas in csrc/ops.cpp) serve
the cpu and cuda backends; ``fusedreg::<op>_reference`` / ``_triton`` are made from the
declarations below. The tensor lists are positional, every hyperparameter is keyword-only
(they are passed by name, so two adjacent floats cannot be swapped). Parameters and
gradients share a dtype; state tensors are in the compute type (fusedreg._dtypes). Every
tensor has its parameter's shape; the optimizer classes (fusedreg/optim) check everything
before the first call. ``steps`` are the already-incremented step counts (Adam),
``inv_scale`` is 1/grad_scale (1 without AMP).
"""
from __future__ import annotations

import torch
from torch import Tensor

from .. import backends
from ..reference import optim as ref
from ._common import backend_ops, triton_module

__all__ = ["ALGORITHMS"]

ALGORITHMS = ("adam", "sgd", "lion")  # each is an op name of the registry


def adam_step(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor],
              exp_avg_sqs: list[Tensor], max_exp_avg_sqs: list[Tensor], steps: list[float], *,
              lr: float, beta1: float, beta2: float, eps: float, weight_decay: float, l1: float,
              amsgrad: bool, maximize: bool, decoupled: bool, inv_scale: float) -> None:
    """Adam/AdamW; max_exp_avg_sqs is empty unless amsgrad; decoupled: p·(1 − lr·wd) instead
    of L2 added to the gradient; l1: soft threshold lr·l1 after the update."""


def sgd_step(params: list[Tensor], grads: list[Tensor], momentum_buffers: list[Tensor], *,
             lr: float, momentum: float, dampening: float, weight_decay: float, l1: float,
             nesterov: bool, maximize: bool, decoupled: bool, first_step: bool,
             inv_scale: float) -> None:
    """SGD; momentum_buffers is empty when momentum == 0; first_step: the buffers are new
    (buf ← g, as torch does)."""


def lion_step(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor], *, lr: float,
              beta1: float, beta2: float, weight_decay: float, l1: float, maximize: bool,
              inv_scale: float) -> None:
    """Lion with decoupled weight decay."""


def _adam_fake(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, **hyper) -> None:
    torch._check(len(grads) == len(params) == len(exp_avgs) == len(exp_avg_sqs) == len(steps),
                 lambda: "adam_step: tensor lists must have the same length")
    torch._check(not hyper["amsgrad"] or len(max_exp_avg_sqs) == len(params),
                 lambda: "adam_step: amsgrad needs one max_exp_avg_sq per parameter")


def _sgd_fake(params, grads, momentum_buffers, **hyper) -> None:
    torch._check(len(grads) == len(params), lambda: "sgd_step: one grad per parameter")
    torch._check(hyper["momentum"] == 0.0 or len(momentum_buffers) == len(params),
                 lambda: "sgd_step: momentum needs one buffer per parameter")


def _lion_fake(params, grads, exp_avgs, **hyper) -> None:
    torch._check(len(grads) == len(params) == len(exp_avgs),
                 lambda: "lion_step: tensor lists must have the same length")


_MUTATES = {"adam": ("params", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs"),
            "sgd": ("params", "momentum_buffers"),
            "lion": ("params", "exp_avgs")}


def _register() -> None:
    tri = triton_module("optim")
    for algo, signature, fake in (("adam", adam_step, _adam_fake), ("sgd", sgd_step, _sgd_fake),
                                  ("lion", lion_step, _lion_fake)):
        name = signature.__name__
        ops = backend_ops(signature, getattr(ref, f"multi_{name}"), tri and getattr(tri, name),
                          fake=fake, mutates_args=_MUTATES[algo])
        for backend, op in ops.items():
            backends.register(algo, backend, op)


_register()
