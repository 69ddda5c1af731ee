"""Reference optimizer steps: readable single-tensor functions, the oracle of every backend.

Each function steps one parameter in place, in the compute type (float32 for fp16/bf16/fp32
parameters, float64 for float64 ones), with the operations of torch's single-tensor
optimizers in torch's order, so that with ``l1 = 0`` the result is torch's:

    g ← g / grad_scale, negated when maximize
    g ← g + wd·p            (L2 weight decay: Adam, SGD unless decoupled)
    p ← p·(1 − lr·wd)       (decoupled weight decay: AdamW, Lion, decoupled Adam/SGD)
    p ← p − lr·update(g, state)
    p ← sign(p)·max(|p| − thr, 0)       (L1 proximal step, only when l1 > 0; thr = lr·l1,
                                         or l1 when not l1_lr_scaled)

State tensors are in the compute type, or in the parameter's dtype (then the math runs on
compute-type copies, written back once); ``step`` is the already-incremented count (a float).
Every tensor may have any layout (torch's ops follow the strides).
"""
from __future__ import annotations

import torch
from torch import Tensor

from .._dtypes import compute_dtype


def soft_threshold_(p: Tensor, thr: float) -> Tensor:
    """p ← sign(p)·max(|p| − thr, 0), in place."""
    return p.copy_(torch.sign(p) * torch.clamp(p.abs() - thr, min=0.0))


def _prologue(param: Tensor, grad: Tensor, inv_scale: float, maximize: bool):
    """The parameter and gradient in the compute type (copies for low precision)."""
    ct = compute_dtype(param.dtype)
    p = param if param.dtype == ct else param.to(ct)
    g = grad if grad.dtype == ct else grad.to(ct)
    if inv_scale != 1.0:
        g = g * inv_scale
    if maximize:
        g = -g
    return p, g


def _weight_decay(p: Tensor, g: Tensor, lr: float, weight_decay: float, decoupled: bool) -> Tensor:
    """Decoupled: p ← p·(1 − lr·wd) in place; else L2: returns g + wd·p."""
    if weight_decay != 0.0:
        if decoupled:
            p.mul_(1.0 - lr * weight_decay)
        else:
            g = g.add(p, alpha=weight_decay)
    return g


def _epilogue(param: Tensor, p: Tensor, lr: float, l1: float, l1_lr_scaled: bool) -> None:
    if l1 != 0.0:
        soft_threshold_(p, lr * l1 if l1_lr_scaled else l1)
    if p is not param:
        param.copy_(p)


def _upcast(states, ct):
    """The state tensors in the compute type: themselves, or copies (see _writeback)."""
    return [s if s is None or s.dtype == ct else s.to(ct) for s in states]


def _writeback(states, work) -> None:
    for s, w in zip(states, work):
        if s is not None and w is not s:
            s.copy_(w)


def adam_step(param: Tensor, grad: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor,
              max_exp_avg_sq: Tensor | None, step: float, *, lr: float, beta1: float,
              beta2: float, eps: float, weight_decay: float, l1: float, amsgrad: bool,
              maximize: bool, decoupled: bool, inv_scale: float = 1.0,
              l1_lr_scaled: bool = True) -> None:
    p, g = _prologue(param, grad, inv_scale, maximize)
    states = (exp_avg, exp_avg_sq, max_exp_avg_sq)
    exp_avg, exp_avg_sq, max_exp_avg_sq = work = _upcast(states, p.dtype)
    g = _weight_decay(p, g, lr, weight_decay, decoupled)
    exp_avg.lerp_(g, 1.0 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(g, g, value=1.0 - beta2)
    bias_correction1 = 1.0 - beta1 ** step
    bias_correction2_sqrt = (1.0 - beta2 ** step) ** 0.5
    step_size = lr / bias_correction1
    if amsgrad:
        torch.maximum(max_exp_avg_sq, exp_avg_sq, out=max_exp_avg_sq)
        denom = (max_exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)
    else:
        denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)
    p.addcdiv_(exp_avg, denom, value=-step_size)
    _epilogue(param, p, lr, l1, l1_lr_scaled)
    _writeback(states, work)


def sgd_step(param: Tensor, grad: Tensor, momentum_buffer: Tensor | None, first_step: bool, *,
             lr: float, momentum: float, dampening: float, weight_decay: float, l1: float,
             nesterov: bool, maximize: bool, decoupled: bool, inv_scale: float = 1.0,
             l1_lr_scaled: bool = True) -> None:
    """``momentum_buffer`` (allocated by the caller when momentum != 0) is set to g on the
    first step (``first_step``), as torch does with a fresh buffer."""
    p, g = _prologue(param, grad, inv_scale, maximize)
    work = _upcast([momentum_buffer], p.dtype)
    g = _weight_decay(p, g, lr, weight_decay, decoupled)
    if momentum != 0.0:
        buf = work[0]
        if first_step:
            buf.copy_(g)
        else:
            buf.mul_(momentum).add_(g, alpha=1.0 - dampening)
        g = g.add(buf, alpha=momentum) if nesterov else buf
    p.add_(g, alpha=-lr)
    _epilogue(param, p, lr, l1, l1_lr_scaled)
    _writeback([momentum_buffer], work)


def lion_step(param: Tensor, grad: Tensor, exp_avg: Tensor, *, lr: float, beta1: float,
              beta2: float, weight_decay: float, l1: float, maximize: bool,
              inv_scale: float = 1.0, l1_lr_scaled: bool = True) -> None:
    """Lion (Chen et al. 2023, Algorithm 2): decoupled decay, then the sign update."""
    p, g = _prologue(param, grad, inv_scale, maximize)
    state = exp_avg
    (exp_avg,) = _upcast([state], p.dtype)
    if weight_decay != 0.0:
        p.mul_(1.0 - lr * weight_decay)
    update = (exp_avg * beta1).add_(g, alpha=1.0 - beta1).sign_()
    p.add_(update, alpha=-lr)
    exp_avg.mul_(beta2).add_(g, alpha=1.0 - beta2)
    _epilogue(param, p, lr, l1, l1_lr_scaled)
    _writeback([state], [exp_avg])


# ---- the multi-tensor ops of the reference backend: one tensor after another ------------------

def multi_adam_step(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, *, lr, beta1,
                    beta2, eps, weight_decay, l1, l1_lr_scaled, amsgrad, maximize, decoupled,
                    inv_scale) -> None:
    for i, p in enumerate(params):
        adam_step(p, grads[i], exp_avgs[i], exp_avg_sqs[i], max_exp_avg_sqs[i] if amsgrad else None,
                  steps[i], lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay,
                  l1=l1, amsgrad=amsgrad, maximize=maximize, decoupled=decoupled,
                  inv_scale=inv_scale, l1_lr_scaled=l1_lr_scaled)


def multi_sgd_step(params, grads, momentum_buffers, *, lr, momentum, dampening, weight_decay, l1,
                   l1_lr_scaled, nesterov, maximize, decoupled, first_step, inv_scale) -> None:
    for i, p in enumerate(params):
        sgd_step(p, grads[i], momentum_buffers[i] if momentum != 0.0 else None, first_step,
                 lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay, l1=l1,
                 nesterov=nesterov, maximize=maximize, decoupled=decoupled, inv_scale=inv_scale,
                 l1_lr_scaled=l1_lr_scaled)


def multi_lion_step(params, grads, exp_avgs, *, lr, beta1, beta2, weight_decay, l1, l1_lr_scaled,
                    maximize, inv_scale) -> None:
    for i, p in enumerate(params):
        lion_step(p, grads[i], exp_avgs[i], lr=lr, beta1=beta1, beta2=beta2,
                  weight_decay=weight_decay, l1=l1, maximize=maximize, inv_scale=inv_scale,
                  l1_lr_scaled=l1_lr_scaled)


# ---- capturable Adam: every per-step value read on the device ----------------------------------

def _device_value(t: Tensor | None, default: float, like: Tensor) -> Tensor:
    """A 0-dim float64 tensor on ``like``'s device: ``t`` (a 1-element tensor there) or
    ``default`` — made by a fill, never by a host read or a host-to-device copy."""
    if t is None:
        return torch.full((), default, dtype=torch.float64, device=like.device)
    return t.reshape(()).to(torch.float64)


def adam_step_capturable(param: Tensor, grad: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor,
                         max_exp_avg_sq: Tensor | None, step: Tensor, lr: Tensor,
                         inv_scale: Tensor, skip: Tensor, *, beta1: float, beta2: float,
                         eps: float, weight_decay: float, l1: float, amsgrad: bool,
                         maximize: bool, decoupled: bool, l1_lr_scaled: bool = True) -> None:
    """adam_step with ``step`` (the incremented count), ``lr`` and ``inv_scale`` as 0-dim
    float64 tensors on the parameter's device, and ``skip`` a 0-dim bool tensor there (True:
    nothing changes, as torch's fused Adam with found_inf). Tensor ops only, no host read:
    the new values are computed into copies and written back with torch.where(skip, old,
    new). The per-step scalars are computed in float64 and rounded once to the compute type,
    as the host computes them for adam_step: the result is adam_step's bit for bit (and so
    torch's single-tensor Adam's)."""
    ct = compute_dtype(param.dtype)
    p = param.to(ct, copy=True)
    g = grad.to(ct) * (-inv_scale if maximize else inv_scale).to(ct)
    states = (exp_avg, exp_avg_sq, max_exp_avg_sq)
    m, v, vm = (None if s is None else s.to(ct, copy=True) for s in states)
    if weight_decay != 0.0:
        if decoupled:
            p.mul_((1.0 - lr * weight_decay).to(ct))
        else:
            g = g.add(p, alpha=weight_decay)
    m.lerp_(g, 1.0 - beta1)
    v.mul_(beta2).addcmul_(g, g, value=1.0 - beta2)
    # adam_step's double arithmetic, with tensors: (1 − beta2^step)^0.5 as its ** 0.5, and
    # addcdiv's p + (value·m)/denom written out (addcdiv takes no tensor value)
    neg_step_size = (-(lr / (1.0 - torch.pow(beta1, step)))).to(ct)
    bias_correction2_sqrt = torch.pow(1.0 - torch.pow(beta2, step), 0.5).to(ct)
    if amsgrad:
        torch.maximum(vm, v, out=vm)
    denom = ((vm if amsgrad else v).sqrt() / bias_correction2_sqrt).add_(eps)
    p.add_((neg_step_size * m) / denom)
    if l1 != 0.0:
        thr = (lr * l1).to(ct) if l1_lr_scaled else l1
        p.copy_(torch.sign(p) * torch.clamp(p.abs() - thr, min=0.0))
    for dst, new in ((param, p), (exp_avg, m), (exp_avg_sq, v), (max_exp_avg_sq, vm)):
        if dst is not None:
            dst.copy_(torch.where(skip, dst, new.to(dst.dtype)))


def multi_adam_step_capturable(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps,
                               lr_tensor, grad_scale, found_inf, *, lr, beta1, beta2, eps,
                               weight_decay, l1, l1_lr_scaled, amsgrad, maximize,
                               decoupled) -> None:
    if not params:
        return
    like = params[0]
    lr_t = _device_value(lr_tensor, lr, like)
    inv_scale = (_device_value(grad_scale, 1.0, like).reciprocal() if grad_scale is not None
                 else _device_value(None, 1.0, like))
    skip = _device_value(found_inf, 0.0, like) != 0.0
    for i, p in enumerate(params):
        adam_step_capturable(p, grads[i], exp_avgs[i], exp_avg_sqs[i],
                             max_exp_avg_sqs[i] if amsgrad else None,
                             steps[i].reshape(()).to(torch.float64), lr_t, inv_scale, skip,
                             beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay, l1=l1,
                             amsgrad=amsgrad, maximize=maximize, decoupled=decoupled,
                             l1_lr_scaled=l1_lr_scaled)
