"""Triton multi-tensor optimizer steps: one launch steps every tensor of a list (one device,
one dtype), whatever their number and sizes.

Each call builds two small int64 tables on the host and copies them to the device:
  ADDR  (n_tensors, K)   the addresses of the K tensors of one parameter (p, g, state...)
  WORK  (n_programs, 3)  per program: tensor index, first element, numel of that tensor
Program i steps elements [start, start + CHUNK) of tensor WORK[i, 0], BLOCK at a time,
after turning the addresses into typed pointers: the elements of a tensor's storage, which
is the tensor itself for any dense layout (the host checks that p, g and the state share
strides). State is loaded as M_DTYPE (the compute type, or the parameter's dtype with
state_dtype="param") and computed in the compute type S_DTYPE. Per-tensor scalars (Adam's bias
corrections) come from SCAL (n_tensors, 2), the per-call constants from CONSTS (its layout is
named once, below): both in the compute type (float32, or float64 for float64 parameters),
rounded once from the double values that the host computes, as the C++ kernels do
(csrc/include/fusedreg/optim_math.h).

The per-element math is that header's, in the same order:
  g ← g·gscale + wd_l2·p;  p ← p·decay;  p ← p − lr·update;  p ← soft_threshold(p, lr·l1)
Divisions and square roots are the IEEE-rounded ones (div_rn, sqrt_rn) as in torch.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .._dtypes import compute_dtype

_BLOCK = 1024
_CHUNK = 16 * _BLOCK  # elements per program: ~7,600 programs for 124M parameters


@triton.jit
def _soft_threshold(p, thr):
    return tl.where(p > thr, p - thr, tl.where(p < -thr, p + thr, 0.0))


@triton.jit
def _sqrt_div(x, d, IS_FP64: tl.constexpr):
    """sqrt(x) / d, IEEE-rounded (div_rn/sqrt_rn are fp32-only; fp64 ones already are)."""
    if IS_FP64:
        return tl.sqrt(x) / d
    else:
        return tl.div_rn(tl.sqrt_rn(x), d)


@triton.jit
def _div(a, b, IS_FP64: tl.constexpr):
    if IS_FP64:
        return a / b
    else:
        return tl.div_rn(a, b)


@triton.jit
def _work(WORK, ADDR, K: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    t = tl.load(WORK + pid * 3)
    start = tl.load(WORK + pid * 3 + 1)
    numel = tl.load(WORK + pid * 3 + 2)
    return t, start, numel, ADDR + t * K


# ---- CONSTS: the per-call constants, one vector per call ---------------------------------
# The index of each constant in CONSTS, named once: the kernels load by these names and the
# host (``_pack``) writes by them. The common ones first; each algorithm's own after them.
_GSCALE = tl.constexpr(0)    # ±1/grad_scale (− when maximize)
_WD_L2 = tl.constexpr(1)     # L2 decay added to the gradient (0 when decoupled)
_DECAY = tl.constexpr(2)     # 1 − lr·weight_decay when decoupled, else 1
_THR = tl.constexpr(3)       # lr·l1, the soft threshold
_NEG_LR = tl.constexpr(4)    # −lr (SGD, Lion)
_ADAM_W1 = tl.constexpr(5)   # torch.lerp's coefficient for 1 − beta1 (see optim_math.h)
_ADAM_BETA2 = tl.constexpr(6)
_ADAM_OMB2 = tl.constexpr(7)  # 1 − beta2
_ADAM_EPS = tl.constexpr(8)
_SGD_MOMENTUM = tl.constexpr(5)
_SGD_DAMP1 = tl.constexpr(6)  # 1 − dampening
_LION_BETA1 = tl.constexpr(5)
_LION_OMB1 = tl.constexpr(6)  # 1 − beta1
_LION_BETA2 = tl.constexpr(7)
_LION_OMB2 = tl.constexpr(8)  # 1 − beta2
_N_CONSTS = 9


@triton.jit
def _ptr(row, k, DTYPE: tl.constexpr):
    """The k-th address of a tensor's ADDR row as a typed pointer."""
    return tl.load(row + k).to(tl.pointer_type(DTYPE))


@triton.jit
def _common_consts(CONSTS):
    """(gscale, wd_l2, decay, −lr, lr·l1): the constants every algorithm reads."""
    return (tl.load(CONSTS + _GSCALE), tl.load(CONSTS + _WD_L2), tl.load(CONSTS + _DECAY),
            tl.load(CONSTS + _NEG_LR), tl.load(CONSTS + _THR))


@triton.jit
def _adam_kernel(
    ADDR,    # (n_tensors, 5) int64: addresses of p, g, exp_avg, exp_avg_sq, max_exp_avg_sq
    WORK,    # (n_programs, 3) int64: tensor index, first element, numel
    SCAL,    # (n_tensors, 2) compute type: −lr/(1 − beta1^step), sqrt(1 − beta2^step)
    CONSTS,  # (_N_CONSTS,) compute type, at the indices below
    FOUND_INF,  # (1,) any float type: non-zero skips the step (read only with HAS_FOUND_INF)
    P_DTYPE: tl.constexpr, S_DTYPE: tl.constexpr, M_DTYPE: tl.constexpr, IS_FP64: tl.constexpr,
    W1_SMALL: tl.constexpr, AMSGRAD: tl.constexpr, HAS_L1: tl.constexpr,
    HAS_FOUND_INF: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr,
):
    t, start, numel, row = _work(WORK, ADDR, 5)
    if HAS_FOUND_INF:  # an inf/nan step (GradScaler) touches nothing: every access masked off
        numel = tl.where(tl.load(FOUND_INF) == 0, numel, 0)
    p_ptr, g_ptr = _ptr(row, 0, P_DTYPE), _ptr(row, 1, P_DTYPE)
    m_ptr, v_ptr, vm_ptr = _ptr(row, 2, M_DTYPE), _ptr(row, 3, M_DTYPE), _ptr(row, 4, M_DTYPE)
    nss = tl.load(SCAL + t * 2)
    bc2 = tl.load(SCAL + t * 2 + 1)
    gscale, wd_l2, decay, _, thr = _common_consts(CONSTS)
    w1 = tl.load(CONSTS + _ADAM_W1)
    beta2 = tl.load(CONSTS + _ADAM_BETA2)
    omb2 = tl.load(CONSTS + _ADAM_OMB2)
    eps = tl.load(CONSTS + _ADAM_EPS)
    for off in range(0, CHUNK, BLOCK):
        idx = start + off + tl.arange(0, BLOCK)
        mask = idx < numel
        p = tl.load(p_ptr + idx, mask=mask, other=0.0).to(S_DTYPE)
        g = tl.load(g_ptr + idx, mask=mask, other=0.0).to(S_DTYPE)
        m = tl.load(m_ptr + idx, mask=mask, other=0.0).to(S_DTYPE)
        v = tl.load(v_ptr + idx, mask=mask, other=0.0).to(S_DTYPE)
        g = g * gscale + wd_l2 * p
        p = p * decay
        if W1_SMALL:  # torch.lerp's two forms (see optim_math.h)
            m = m + w1 * (g - m)
        else:
            m = g + w1 * (g - m)
        v = v * beta2 + omb2 * g * g
        if AMSGRAD:
            vm = tl.maximum(tl.load(vm_ptr + idx, mask=mask, other=0.0).to(S_DTYPE), v)
            tl.store(vm_ptr + idx, vm.to(M_DTYPE), mask=mask)
            denom = _sqrt_div(vm, bc2, IS_FP64) + eps
        else:
            denom = _sqrt_div(v, bc2, IS_FP64) + eps
        p = p + nss * _div(m, denom, IS_FP64)
        if HAS_L1:
            p = _soft_threshold(p, thr)
        tl.store(m_ptr + idx, m.to(M_DTYPE), mask=mask)
        tl.store(v_ptr + idx, v.to(M_DTYPE), mask=mask)
        tl.store(p_ptr + idx, p.to(P_DTYPE), mask=mask)


@triton.jit
def _sgd_kernel(
    ADDR,    # (n_tensors, 3) int64: addresses of p, g, momentum_buffer
    WORK,    # (n_programs, 3) int64: tensor index, first element, numel
    CONSTS,  # (_N_CONSTS,) compute type, at the indices below
    P_DTYPE: tl.constexpr, S_DTYPE: tl.constexpr, M_DTYPE: tl.constexpr, MOMENTUM: tl.constexpr,
    FIRST: tl.constexpr, NESTEROV: tl.constexpr, HAS_L1: tl.constexpr, CHUNK: tl.constexpr,
    BLOCK: tl.constexpr,
):
    t, start, numel, row = _work(WORK, ADDR, 3)
    p_ptr, g_ptr, b_ptr = _ptr(row, 0, P_DTYPE), _ptr(row, 1, P_DTYPE), _ptr(row, 2, M_DTYPE)
    gscale, wd_l2, decay, neg_lr, thr = _common_consts(CONSTS)
    momentum = tl.load(CONSTS + _SGD_MOMENTUM)
    damp1 = tl.load(CONSTS + _SGD_DAMP1)
    for off in range(0, CHUNK, BLOCK):
        idx = start + off + tl.arange(0, BLOCK)
        mask = idx < numel
        p = tl.load(p_ptr + idx, mask=mask, other=0.0).to(S_DTYPE)
        g = tl.load(g_ptr + idx, mask=mask, other=0.0).to(S_DTYPE)
        g = g * gscale + wd_l2 * p
        p = p * decay
        d = g
        if MOMENTUM:
            if FIRST:
                b = g
            else:
                b = tl.load(b_ptr + idx, mask=mask, other=0.0).to(S_DTYPE) * momentum + damp1 * g
            tl.store(b_ptr + idx, b.to(M_DTYPE), mask=mask)
            if NESTEROV:
                d = g + momentum * b
            else:
                d = b
        p = p + neg_lr * d
        if HAS_L1:
            p = _soft_threshold(p, thr)
        tl.store(p_ptr + idx, p.to(P_DTYPE), mask=mask)


@triton.jit
def _lion_kernel(
    ADDR,    # (n_tensors, 3) int64: addresses of p, g, exp_avg
    WORK,    # (n_programs, 3) int64: tensor index, first element, numel
    CONSTS,  # (_N_CONSTS,) compute type, at the indices below
    P_DTYPE: tl.constexpr, S_DTYPE: tl.constexpr, M_DTYPE: tl.constexpr, HAS_L1: tl.constexpr,
    CHUNK: tl.constexpr, BLOCK: tl.constexpr,
):
    t, start, numel, row = _work(WORK, ADDR, 3)
    p_ptr, g_ptr, m_ptr = _ptr(row, 0, P_DTYPE), _ptr(row, 1, P_DTYPE), _ptr(row, 2, M_DTYPE)
    gscale, _, decay, neg_lr, thr = _common_consts(CONSTS)
    beta1 = tl.load(CONSTS + _LION_BETA1)
    omb1 = tl.load(CONSTS + _LION_OMB1)
    beta2 = tl.load(CONSTS + _LION_BETA2)
    omb2 = tl.load(CONSTS + _LION_OMB2)
    for off in range(0, CHUNK, BLOCK):
        idx = start + off + tl.arange(0, BLOCK)
        mask = idx < numel
        p = tl.load(p_ptr + idx, mask=mask, other=0.0).to(S_DTYPE)
        g = tl.load(g_ptr + idx, mask=mask, other=0.0).to(S_DTYPE) * gscale
        m = tl.load(m_ptr + idx, mask=mask, other=0.0).to(S_DTYPE)
        p = p * decay
        u = m * beta1 + g * omb1
        p = p + neg_lr * tl.where(u > 0, 1.0, tl.where(u < 0, -1.0, 0.0)).to(S_DTYPE)
        m = m * beta2 + g * omb2
        if HAS_L1:
            p = _soft_threshold(p, thr)
        tl.store(m_ptr + idx, m.to(M_DTYPE), mask=mask)
        tl.store(p_ptr + idx, p.to(P_DTYPE), mask=mask)


# ---- host side ------------------------------------------------------------------------------
_TL_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16,
              torch.float64: tl.float64}


def _host_tables(lists):
    """ADDR rows (one per parameter: the K addresses) and WORK rows as host lists, from K
    parallel tensor lists (an empty list reuses the params' addresses: a constexpr switch keeps
    the kernel off them); the chunk and block sizes."""
    params = lists[0]
    cols = [lst if lst else params for lst in lists]
    addr = [[c[i].data_ptr() for c in cols] for i in range(len(params))]
    longest = max(p.numel() for p in params)
    chunk = min(_CHUNK, max(16, triton.next_power_of_2(longest)))
    block = min(_BLOCK, chunk)
    work = [(i, s, p.numel()) for i, p in enumerate(params) for s in range(0, p.numel(), chunk)]
    return addr, work, chunk, block


def _tables(lists, device):
    """ADDR (n, K) and WORK (n_programs, 3) on ``device`` (copied from the host); chunk sizes."""
    addr, work, chunk, block = _host_tables(lists)
    as_dev = lambda x: torch.tensor(x, dtype=torch.int64).to(device, non_blocking=True)  # noqa: E731
    return as_dev(addr), as_dev(work), len(work), chunk, block


def _pack(consts: dict, ct, device):
    """CONSTS from {index: value}: computed in double (as torch's Python does), rounded once
    to the compute type ``ct``, as the C++ kernels do (csrc/include/fusedreg/optim_math.h)."""
    values = [0.0] * _N_CONSTS
    for index, value in consts.items():
        values[index.value] = value
    return torch.tensor(values, dtype=torch.float64).to(ct).to(device, non_blocking=True)


def _common(lr, weight_decay, l1, l1_lr_scaled, maximize, decoupled, inv_scale):
    return {_GSCALE: -inv_scale if maximize else inv_scale,
            _WD_L2: 0.0 if decoupled else weight_decay,
            _DECAY: 1.0 - lr * weight_decay if decoupled else 1.0,
            _THR: lr * l1 if l1_lr_scaled else l1, _NEG_LR: -lr}


def _state_dtype(states, ct):
    """The Triton type of the state tensors: the compute type, or the parameters' dtype."""
    for lst in states:
        if lst:
            return _TL_DTYPES[lst[0].dtype]
    return _TL_DTYPES[ct]


def _empty(params) -> bool:
    return not params or all(p.numel() == 0 for p in params)


def adam_step(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, *, lr, beta1, beta2,
              eps, weight_decay, l1, l1_lr_scaled, amsgrad, maximize, decoupled, inv_scale):
    if _empty(params):
        return
    device, ct = params[0].device, compute_dtype(params[0].dtype)
    addr, work, n_prog, chunk, block = _tables(
        [params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs if amsgrad else []], device)
    scal = torch.tensor([[-(lr / (1.0 - beta1 ** s)), math.sqrt(1.0 - beta2 ** s)] for s in steps],
                        dtype=torch.float64).to(ct).to(device, non_blocking=True)
    w1 = torch.tensor(1.0 - beta1, dtype=ct).item()  # rounded like the C++ S(1 − beta1)
    w1_small = abs(w1) < 0.5
    consts = _pack({**_common(lr, weight_decay, l1, l1_lr_scaled, maximize, decoupled, inv_scale),
                    _ADAM_W1: w1 if w1_small else -(1.0 - w1), _ADAM_BETA2: beta2,
                    _ADAM_OMB2: 1.0 - beta2, _ADAM_EPS: eps}, ct, device)
    _adam_kernel[(n_prog,)](
        addr, work, scal, consts, consts, P_DTYPE=_TL_DTYPES[params[0].dtype],
        S_DTYPE=_TL_DTYPES[ct], M_DTYPE=_state_dtype([exp_avgs], ct), IS_FP64=ct == torch.float64,
        W1_SMALL=w1_small, AMSGRAD=bool(amsgrad), HAS_L1=l1 != 0.0, HAS_FOUND_INF=False,
        CHUNK=chunk, BLOCK=block, num_warps=4)


# ---- capturable Adam ------------------------------------------------------------------------
# adam_step_capturable launches the same kernel, but nothing it reads is copied from the host
# per call: a CUDA graph replays the launches with the arguments of the capture, and a
# host-to-device copy from pageable memory cannot be captured (nor replayed with new data).
#   - ADDR is made per call by kernels that take the addresses as arguments (a zero fill and
#     one torch._foreach_add_ with a scalar list, _device_values): a graph keeps kernel
#     arguments by value, so the tensors of the capture (gradients allocated inside it
#     included) are the ones its replays step;
#   - WORK (a function of the sizes only) and the host-only constants (betas, eps, wd, l1) are
#     made the same way once per distinct value and cached for the life of the process
#     (never evicted: a captured graph may read them);
#   - SCAL and the lr- and grad_scale-dependent CONSTS entries are computed per call by a few
#     float64 device tensor ops from the step tensors, the lr tensor and grad_scale, rounded
#     once to the compute type (the host path's rule);
#   - found_inf is passed as a pointer (HAS_FOUND_INF): non-zero masks every access off.
_CACHE: dict = {}


def _device_values(values, dtype, device):
    """A 1-D tensor on ``device`` holding the host ``values``, written by kernels that take
    them as arguments (no host-to-device copy; capturable)."""
    t = torch.zeros(len(values), dtype=dtype, device=device)
    if values:
        torch._foreach_add_(list(t.unbind(0)), list(values))
    return t


def _cached(key, make):
    t = _CACHE.get(key)
    if t is None:
        t = _CACHE[key] = make()
    return t


def _adam_const_rows(ct, beta1, beta2, eps, weight_decay, l1, l1_lr_scaled, maximize, decoupled):
    """(A0, A1, A2): CONSTS = A0 + A1·inv_scale + A2·lr, entry by entry (each constant is
    affine in inv_scale and lr; torch.addcmul / add(alpha=) evaluate a0 + a·x with the host
    path's double roundings: 1 − lr·wd, lr·l1, −lr, ±inv_scale)."""
    w1 = torch.tensor(1.0 - beta1, dtype=ct).item()  # a host rounding, as in adam_step
    a0, a1, a2 = ([0.0] * _N_CONSTS for _ in range(3))
    a1[_GSCALE.value] = -1.0 if maximize else 1.0
    a0[_WD_L2.value] = 0.0 if decoupled else weight_decay
    a0[_DECAY.value] = 1.0
    a2[_DECAY.value] = -weight_decay if decoupled else 0.0
    a0[_THR.value], a2[_THR.value] = (0.0, l1) if l1_lr_scaled else (l1, 0.0)
    a2[_NEG_LR.value] = -1.0
    a0[_ADAM_W1.value] = w1 if abs(w1) < 0.5 else -(1.0 - w1)
    a0[_ADAM_BETA2.value], a0[_ADAM_OMB2.value], a0[_ADAM_EPS.value] = beta2, 1.0 - beta2, eps
    return a0, a1, a2


def capturable_scalars(like, steps, lr_tensor, grad_scale, *, lr, beta1, beta2, eps,
                       weight_decay, l1, l1_lr_scaled, maximize, decoupled):
    """(CONSTS, SCAL) of adam_step for ``like``'s device and compute type, made by device
    tensor ops from the device step counts, lr tensor and grad_scale (a float ``lr`` and
    inv_scale = 1 without grad_scale enter as host scalars of those ops, which a CUDA graph
    keeps by value): float64 math, one rounding to the compute type."""
    device, ct = like.device, compute_dtype(like.dtype)
    rows = _adam_const_rows(ct, beta1, beta2, eps, weight_decay, l1, l1_lr_scaled, maximize,
                            decoupled)
    a = _cached((device, "consts", ct) + tuple(map(tuple, rows)),
                lambda: _device_values([v for r in rows for v in r], torch.float64,
                                       device).view(3, _N_CONSTS))
    if grad_scale is None:
        consts = a[0].add(a[1])  # inv_scale = 1
    else:
        consts = torch.addcmul(a[0], a[1], grad_scale.reshape(()).to(torch.float64).reciprocal())
    if lr_tensor is None:
        lr64 = torch.full((), lr, dtype=torch.float64, device=device)
    else:
        lr64 = lr_tensor.reshape(()).to(torch.float64)
    consts = torch.addcmul(consts, a[2], lr64).to(ct)
    s = torch.stack([t.reshape(()) for t in steps]).to(torch.float64)
    neg_step_size = torch.div(lr64, 1.0 - torch.pow(beta1, s)).neg_()
    bc2_sqrt = torch.sqrt(1.0 - torch.pow(beta2, s))
    return consts, torch.stack([neg_step_size, bc2_sqrt], dim=1).to(ct)


def adam_step_capturable(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, lr_tensor,
                         grad_scale, found_inf, *, lr, beta1, beta2, eps, weight_decay, l1,
                         l1_lr_scaled, amsgrad, maximize, decoupled):
    if _empty(params):
        return
    device, ct = params[0].device, compute_dtype(params[0].dtype)
    lists = [params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs if amsgrad else []]
    addr_rows, work_rows, chunk, block = _host_tables(lists)
    addr = _device_values([a for row in addr_rows for a in row], torch.int64, device)
    work = _cached((device, "work", tuple(p.numel() for p in params)),
                   lambda: _device_values([w for row in work_rows for w in row], torch.int64,
                                          device))
    n_prog = len(work_rows)
    consts, scal = capturable_scalars(params[0], steps, lr_tensor, grad_scale, lr=lr,
                                      beta1=beta1, beta2=beta2, eps=eps,
                                      weight_decay=weight_decay, l1=l1,
                                      l1_lr_scaled=l1_lr_scaled, maximize=maximize,
                                      decoupled=decoupled)
    w1_small = abs(torch.tensor(1.0 - beta1, dtype=ct).item()) < 0.5
    _adam_kernel[(n_prog,)](
        addr, work, scal, consts, found_inf if found_inf is not None else consts,
        P_DTYPE=_TL_DTYPES[params[0].dtype], S_DTYPE=_TL_DTYPES[ct],
        M_DTYPE=_state_dtype([exp_avgs], ct), IS_FP64=ct == torch.float64, W1_SMALL=w1_small,
        AMSGRAD=bool(amsgrad), HAS_L1=l1 != 0.0, HAS_FOUND_INF=found_inf is not None,
        CHUNK=chunk, BLOCK=block, num_warps=4)


def sgd_step(params, grads, momentum_buffers, *, lr, momentum, dampening, weight_decay, l1,
             l1_lr_scaled, nesterov, maximize, decoupled, first_step, inv_scale):
    if _empty(params):
        return
    device, ct = params[0].device, compute_dtype(params[0].dtype)
    has_momentum = momentum != 0.0
    addr, work, n_prog, chunk, block = _tables(
        [params, grads, momentum_buffers if has_momentum else []], device)
    consts = _pack({**_common(lr, weight_decay, l1, l1_lr_scaled, maximize, decoupled, inv_scale),
                    _SGD_MOMENTUM: momentum, _SGD_DAMP1: 1.0 - dampening}, ct, device)
    _sgd_kernel[(n_prog,)](
        addr, work, consts, P_DTYPE=_TL_DTYPES[params[0].dtype], S_DTYPE=_TL_DTYPES[ct],
        M_DTYPE=_state_dtype([momentum_buffers if has_momentum else []], ct), MOMENTUM=has_momentum, FIRST=bool(first_step), NESTEROV=bool(nesterov),
        HAS_L1=l1 != 0.0, CHUNK=chunk, BLOCK=block, num_warps=4)


def lion_step(params, grads, exp_avgs, *, lr, beta1, beta2, weight_decay, l1, l1_lr_scaled, maximize,
              inv_scale):
    if _empty(params):
        return
    device, ct = params[0].device, compute_dtype(params[0].dtype)
    addr, work, n_prog, chunk, block = _tables([params, grads, exp_avgs], device)
    consts = _pack({**_common(lr, weight_decay, l1, l1_lr_scaled, maximize, True, inv_scale),
                    _LION_BETA1: beta1, _LION_OMB1: 1.0 - beta1, _LION_BETA2: beta2,
                    _LION_OMB2: 1.0 - beta2}, ct, device)
    _lion_kernel[(n_prog,)](
        addr, work, consts, P_DTYPE=_TL_DTYPES[params[0].dtype], S_DTYPE=_TL_DTYPES[ct],
        M_DTYPE=_state_dtype([exp_avgs], ct), HAS_L1=l1 != 0.0, CHUNK=chunk, BLOCK=block, num_warps=4)


# ---- compile specs (tests/test_triton_compile.py compiles each for sm_80 and sm_90) ---------
def _adam_sig(sname):
    """Adam's pointer arguments; FOUND_INF is float32 (GradScaler's found_inf)."""
    return {"ADDR": "*i64", "WORK": "*i64", "SCAL": f"*{sname}", "CONSTS": f"*{sname}",
            "FOUND_INF": "*fp32"}


def _specs():
    specs = []
    for p_dt, pname in ((tl.float32, "fp32"), (tl.bfloat16, "bf16"), (tl.float16, "fp16"),
                        (tl.float64, "fp64")):
        s_dt = tl.float64 if pname == "fp64" else tl.float32
        sname = "fp64" if pname == "fp64" else "fp32"
        base = dict(P_DTYPE=p_dt, S_DTYPE=s_dt, M_DTYPE=s_dt, CHUNK=_CHUNK, BLOCK=_BLOCK)
        for ams in (False, True):
            for l1 in (False, True):
                specs.append((_adam_kernel, _adam_sig(sname),
                              dict(base, IS_FP64=pname == "fp64", W1_SMALL=True, AMSGRAD=ams,
                                   HAS_L1=l1, HAS_FOUND_INF=l1)))
        specs.append((_adam_kernel, _adam_sig(sname),
                      dict(base, IS_FP64=pname == "fp64", W1_SMALL=False, AMSGRAD=False,
                           HAS_L1=False, HAS_FOUND_INF=True)))
        for mom, first, nest in ((False, False, False), (True, True, False), (True, False, False),
                                 (True, False, True)):
            for l1 in (False, True):
                specs.append((_sgd_kernel, {"ADDR": "*i64", "WORK": "*i64", "CONSTS": f"*{sname}"},
                              dict(base, MOMENTUM=mom, FIRST=first, NESTEROV=nest, HAS_L1=l1)))
        for l1 in (False, True):
            specs.append((_lion_kernel, {"ADDR": "*i64", "WORK": "*i64", "CONSTS": f"*{sname}"},
                          dict(base, HAS_L1=l1)))
        if pname in ("bf16", "fp16"):  # state in the parameter's dtype (state_dtype="param")
            low = dict(base, M_DTYPE=p_dt)
            specs.append((_adam_kernel, _adam_sig(sname),
                          dict(low, IS_FP64=False, W1_SMALL=True, AMSGRAD=True, HAS_L1=True,
                               HAS_FOUND_INF=True)))
            specs.append((_sgd_kernel, {"ADDR": "*i64", "WORK": "*i64", "CONSTS": f"*{sname}"},
                          dict(low, MOMENTUM=True, FIRST=False, NESTEROV=True, HAS_L1=True)))
            specs.append((_lion_kernel, {"ADDR": "*i64", "WORK": "*i64", "CONSTS": f"*{sname}"},
                          dict(low, HAS_L1=True)))
    return specs


COMPILE_SPECS = _specs()
