"""Optimizer steps: the registered in-place ops of every backend (multi-tensor: one call steps
a list of tensors of one device and dtype), declared once each, with their fake functions.

Ops: ``fusedreg::adam_step``, ``sgd_step``, ``lion_step`` (C++, schemas in csrc/ops.cpp) serve
the cpu and cuda backends; ``fusedreg::<op>_reference`` / ``_triton`` are made from the
declarations below. The tensor lists are positional, every hyperparameter is keyword-only
(they are passed by name, so two adjacent floats cannot be swapped). Parameters and
gradients share a dtype; state tensors are all in the compute type (fusedreg._dtypes) or all
in the parameters' dtype. Every tensor has its parameter's size, and its layout: each
parameter is dense and non-overlapping (contiguous, channels_last, transposed...) and the
kernels step its storage as a flat range. The optimizer classes (fusedreg/optim) check
everything before the first call; every op checks its arguments again (a raw call from user
code) before any write, in C++ (fusedreg/optim_args.h) or in the checks below, which the
fake functions run too (a list mixing CPU and meta tensors dispatches to them). ``steps``
(Adam) are the parameters' step counts, torch's ``state["step"]`` (1-element float32 CPU
tensors, finite and >= 0): after its checks the op adds one to each, in float32 as torch's
``step += 1``, and steps with the new counts — one call checks, counts and updates, with no
write before every check has passed. ``inv_scale`` is 1/grad_scale (1 without
AMP), ``l1_lr_scaled``: the L1 threshold is lr·l1 (else l1).

``adam_step_capturable`` (algorithm "adam_capturable": reference, triton, cuda — no cpu
kernel: on CPU parameters a host read synchronizes nothing, so the cpu backend's adam_step
serves capturable groups there) is Adam for ``capturable=True``: everything
that can change between two replays of a captured step stays on the parameters' device and
is read there, never on the host — ``steps`` (0-dim float32 tensors, already incremented),
``lr_tensor`` (a 1-element float tensor; None: the float ``lr``), ``grad_scale`` (None: 1)
and ``found_inf`` (None: 0; non-zero: nothing is written). Its checks are host-side only
(lengths, dtypes, devices, layouts, the host hyperparameters): no device value is read.
"""
from __future__ import annotations

import math
import operator
from typing import Optional

import torch
from torch import Tensor

from .. import backends
from ..reference import optim as ref
from ._common import backend_ops, cpp_op, python_ops, triton_module

__all__ = ["ALGORITHMS", "is_dense"]

ALGORITHMS = ("adam", "sgd", "lion")  # each is an op name of the registry
CAPTURABLE = "adam_capturable"  # the registry's name of adam_step_capturable


def adam_step(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor],
              exp_avg_sqs: list[Tensor], max_exp_avg_sqs: list[Tensor], steps: list[Tensor], *,
              lr: float, beta1: float, beta2: float, eps: float, weight_decay: float, l1: float,
              l1_lr_scaled: bool, amsgrad: bool, maximize: bool, decoupled: bool,
              inv_scale: float) -> None:
    """Adam/AdamW; max_exp_avg_sqs is empty unless amsgrad; steps: the step counts (1-element
    float32 CPU tensors), incremented by the op; decoupled: p·(1 − lr·wd) instead of L2
    added to the gradient; l1: soft threshold lr·l1 (l1 when not l1_lr_scaled) after the
    update."""


def adam_step_capturable(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor],
                         exp_avg_sqs: list[Tensor], max_exp_avg_sqs: list[Tensor],
                         steps: list[Tensor], lr_tensor: Optional[Tensor],
                         grad_scale: Optional[Tensor], found_inf: Optional[Tensor], *, lr: float,
                         beta1: float, beta2: float, eps: float, weight_decay: float, l1: float,
                         l1_lr_scaled: bool, amsgrad: bool, maximize: bool,
                         decoupled: bool) -> None:
    """adam_step with the per-step values on the device: ``steps`` (0-dim float32, already
    incremented), ``lr_tensor`` (or the float ``lr``), ``grad_scale`` and ``found_inf``
    (found_inf != 0: nothing is written), each read by the kernels, never on the host."""


def sgd_step(params: list[Tensor], grads: list[Tensor], momentum_buffers: list[Tensor], *,
             lr: float, momentum: float, dampening: float, weight_decay: float, l1: float,
             l1_lr_scaled: bool, nesterov: bool, maximize: bool, decoupled: bool,
             first_step: bool, inv_scale: float) -> None:
    """SGD; momentum_buffers is empty when momentum == 0; first_step: the buffers are new
    (buf ← g, as torch does)."""


def lion_step(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor], *, lr: float,
              beta1: float, beta2: float, weight_decay: float, l1: float, l1_lr_scaled: bool,
              maximize: bool, inv_scale: float) -> None:
    """Lion with decoupled weight decay."""


# ---- argument checks: the fake functions and the Python backends run them (the C++ ops run
# the same checks in fusedreg/optim_args.h) ------------------------------------------------------
_FLOAT = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _fail(op: str, msg: str):
    raise RuntimeError(f"fusedreg::{op}: {msg}")


def is_dense(t: Tensor) -> bool:
    """Dense and non-overlapping (ATen's is_non_overlapping_and_dense): the elements fill
    exactly numel slots of storage from the data pointer, in some order of the dims — what
    the kernels step as one flat range."""
    if t.is_contiguous():
        return True
    expected = 1
    for stride, size in sorted((st, sz) for sz, st in zip(t.shape, t.stride()) if sz != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def _same_storage_order(t: Tensor, p: Tensor) -> bool:
    """As the C++ check: both contiguous, or the same sizes and strides (size-1 dims aside)."""
    if p.is_contiguous():
        return t.is_contiguous()
    return t.shape == p.shape and all(n == 1 or a == b
                                      for n, a, b in zip(p.shape, t.stride(), p.stride()))


def _check_lists(op: str, params, grads, states) -> None:
    if len(grads) != len(params):
        _fail(op, f"expected one grad per parameter, got {len(grads)} grads for {len(params)} params")
    for s in states:
        if s and len(s) != len(params):
            _fail(op, f"expected one state tensor per parameter, got {len(s)} for {len(params)} params")
    if not params:
        return
    dtype, device = params[0].dtype, params[0].device
    if dtype not in _FLOAT:
        _fail(op, f"params must be float16, bfloat16, float32 or float64, got {dtype}")
    ct = torch.float64 if dtype == torch.float64 else torch.float32
    sdt = next((s[0].dtype for s in states if s), ct)
    if sdt not in (ct, dtype):
        _fail(op, f"state tensors must be {ct} or {dtype} for {dtype} params, got {sdt}")
    for i, p in enumerate(params):
        g = grads[i]
        if p.dtype != dtype or p.device != device:
            _fail(op, f"all params of one call must share a dtype and a device (param {i} is "
                      f"{p.dtype} on {p.device}, param 0 {dtype} on {device})")
        if not is_dense(p):
            _fail(op, f"param {i} must be dense and non-overlapping (any memory format)")
        if g.dtype != dtype or g.device != device or g.numel() != p.numel():
            _fail(op, f"grad {i} must match its parameter in dtype, device and size (got "
                      f"{g.dtype} on {g.device})")
        if not _same_storage_order(g, p):
            _fail(op, f"grad {i} must have its parameter's layout (strides)")
        for s in states:
            if s and (s[i].dtype != sdt or s[i].device != device or s[i].numel() != p.numel()
                      or not _same_storage_order(s[i], p)):
                _fail(op, f"state tensor {i} must be a {sdt} tensor on {device} with the "
                          "parameter's size and layout")


def _check_hyper(op: str, hyper: dict) -> None:
    for name in ("lr", "eps", "weight_decay", "l1", "momentum", "dampening"):
        if name in hyper:
            v = hyper[name]
            if not (math.isfinite(v) and v >= 0.0):
                _fail(op, f"{name} must be finite and >= 0, got {v}")
    for name in ("beta1", "beta2"):
        if name in hyper and not 0.0 <= hyper[name] < 1.0:
            _fail(op, f"{name} must be in [0, 1), got {hyper[name]}")
    if hyper.get("nesterov") and not (hyper["momentum"] > 0.0 and hyper["dampening"] == 0.0):
        _fail(op, "nesterov needs momentum > 0 and dampening == 0")
    if not (math.isfinite(hyper["inv_scale"]) and hyper["inv_scale"] > 0.0):
        _fail(op, f"inv_scale must be finite and > 0, got {hyper['inv_scale']}")


def _check_step_tensors(op: str, steps, n: int) -> None:
    """adam_step's counts: one 1-element float32 CPU tensor per parameter (metadata only: the
    fake functions cannot read values)."""
    if len(steps) != n:
        _fail(op, f"expected one step per parameter, got {len(steps)} for {n} params")
    for i, s in enumerate(steps):
        if not (isinstance(s, Tensor) and s.layout == torch.strided and s.dtype == torch.float32
                and s.numel() == 1 and s.device.type in ("cpu", "meta")):
            _fail(op, f"step {i} must be a 1-element float32 CPU tensor, got {_describe(s)}")


def _adam_fake(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, **hyper) -> None:
    amsgrad = hyper["amsgrad"]
    if not (len(exp_avgs) == len(exp_avg_sqs) == len(steps) == len(params)) or (
            amsgrad and len(max_exp_avg_sqs) != len(params)):
        _fail("adam_step", "expected one state tensor and one step per parameter")
    _check_lists("adam_step", params, grads,
                 (exp_avgs, exp_avg_sqs, max_exp_avg_sqs if amsgrad else []))
    _check_hyper("adam_step", hyper)
    _check_step_tensors("adam_step", steps, len(params))


def _counted(impl):
    """A Python backend's adam_step body over ``impl`` (which takes the new counts as floats):
    the checks (the fake's, then the count values, read on the host), the increment, the
    kernel — as the C++ op does."""
    if impl is None:
        return None

    def run(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, **hyper):
        _adam_fake(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, **hyper)
        if not params:
            return
        flat = [s.reshape(()) for s in steps]
        for i, v in enumerate(torch.stack(flat).tolist()):
            if not (math.isfinite(v) and v >= 0.0):
                _fail("adam_step", f"step {i} must be finite and >= 0, got {v}")
        for s in flat:  # one at a time: a tensor listed twice counts twice, as in C++
            s.add_(1.0)
        impl(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, torch.stack(flat).tolist(),
             **hyper)
    return run


def _check_device_scalar(op: str, name: str, t, device) -> None:
    if t is None:
        return
    if not isinstance(t, Tensor) or t.numel() != 1 or not t.is_floating_point() \
            or t.device != device:
        _fail(op, f"{name} must be None or a 1-element float tensor on {device} (the "
                  f"parameters' device), got {_describe(t)}")


def _describe(t) -> str:
    if not isinstance(t, Tensor):
        return type(t).__name__
    return f"a {t.dtype} tensor of shape {tuple(t.shape)} on {t.device}"


def _adam_capturable_fake(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps,
                          lr_tensor, grad_scale, found_inf, **hyper) -> None:
    """Host-side checks only: no device value is read (a read would synchronize)."""
    op = "adam_step_capturable"
    amsgrad = hyper["amsgrad"]
    if not (len(exp_avgs) == len(exp_avg_sqs) == len(steps) == len(params)) or (
            amsgrad and len(max_exp_avg_sqs) != len(params)):
        _fail(op, "expected one state tensor and one step per parameter")
    _check_lists(op, params, grads, (exp_avgs, exp_avg_sqs, max_exp_avg_sqs if amsgrad else []))
    _check_hyper(op, dict(hyper, inv_scale=1.0))
    if not params:
        return
    device = params[0].device
    for i, s in enumerate(steps):
        if s.dtype != torch.float32 or s.numel() != 1 or s.device != device:
            _fail(op, f"step {i} must be a 1-element float32 tensor on {device}, got "
                      f"{_describe(s)}")
    for name, t in (("lr_tensor", lr_tensor), ("grad_scale", grad_scale),
                    ("found_inf", found_inf)):
        _check_device_scalar(op, name, t, device)


def _sgd_fake(params, grads, momentum_buffers, **hyper) -> None:
    has_momentum = hyper["momentum"] != 0.0
    if has_momentum and len(momentum_buffers) != len(params):
        _fail("sgd_step", "momentum needs one buffer per parameter")
    _check_lists("sgd_step", params, grads, (momentum_buffers if has_momentum else [],))
    _check_hyper("sgd_step", hyper)


def _lion_fake(params, grads, exp_avgs, **hyper) -> None:
    if len(exp_avgs) != len(params):
        _fail("lion_step", "one exp_avg per parameter")
    _check_lists("lion_step", params, grads, (exp_avgs,))
    _check_hyper("lion_step", hyper)


def _checked(impl, check):
    """A Python backend's op body: the checks first (as the C++ ops), then the kernel."""
    if impl is None:
        return None

    def run(*args, **kwargs):
        check(*args, **kwargs)
        impl(*args, **kwargs)
    return run


_MUTATES = {"adam": ("params", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs", "steps"),
            CAPTURABLE: ("params", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs"),
            "sgd": ("params", "momentum_buffers"),
            "lion": ("params", "exp_avgs")}


# The cpu backend's optimizer steps as the optimizers call them: fusedreg._C's direct calls
# (csrc/cpu/optim.cpp: the op's checks and kernel without the dispatcher, about 10 us less per
# call), falling back to the torch.ops call whenever the direct call declines (it returns False
# before touching anything for a tensor subclass, a non-plain-CPU tensor, or an active dispatch
# or torch-function mode) and while Dynamo traces (the op call is what a graph records).
DIRECT: dict = {}  # algorithm -> callable with the op's signature


def _direct(op):
    """The op with fusedreg._C's direct call first; the keyword arguments go to it positionally
    in the schema's order (the order the C function parses them in)."""
    if op is None:
        return None
    import importlib
    fast = getattr(importlib.import_module("fusedreg._C"), op._schema.name.split("::")[1], None)
    if fast is None:
        return op
    names = tuple(a.name for a in op._schema.arguments if a.kwarg_only)
    in_order = operator.itemgetter(*names)
    compiling = torch.compiler.is_compiling

    def run(*lists, **hyper):
        try:
            values = None if len(hyper) != len(names) else in_order(hyper)
        except KeyError:
            values = None
        if values is None or compiling() or not fast(*lists, *values):
            op(*lists, **hyper)  # (a wrong keyword raises torch.ops' own error here)
    return run


def _register() -> None:
    tri = triton_module("optim")
    for algo, signature, fake, wrap in (
            ("adam", adam_step, _adam_fake, _counted),
            ("sgd", sgd_step, _sgd_fake, lambda impl: _checked(impl, _sgd_fake)),
            ("lion", lion_step, _lion_fake, lambda impl: _checked(impl, _lion_fake))):
        name = signature.__name__
        ops = backend_ops(signature, wrap(getattr(ref, f"multi_{name}")),
                          wrap(tri and getattr(tri, name)),
                          fake=fake, mutates_args=_MUTATES[algo])
        for backend, op in ops.items():
            backends.register(algo, backend, op)
        direct = _direct(ops.get("cpu"))
        if direct is not None:
            DIRECT[algo] = direct
    # capturable Adam: reference and Triton custom ops; the C++ op has a CUDA kernel only
    ops = python_ops(adam_step_capturable,
                     {"reference": _checked(ref.multi_adam_step_capturable, _adam_capturable_fake),
                      "triton": _checked(tri and tri.adam_step_capturable, _adam_capturable_fake)},
                     fake=_adam_capturable_fake, mutates_args=_MUTATES[CAPTURABLE])
    cpp = cpp_op("adam_step_capturable")
    if cpp is not None:
        torch.library.register_fake("fusedreg::adam_step_capturable")(_adam_capturable_fake)
        if backends.extension_available(with_cuda=True):
            ops["cuda"] = cpp
    for backend, op in ops.items():
        backends.register(CAPTURABLE, backend, op)


_register()
