"""layer_norm: y = norm(h) * w + b with h = residual + dropout(x) — LayerNorm, RMSNorm and the
fused dropout + residual + norm — the registered forward/backward ops of every backend and
``LayerNormFunction``, the autograd Function over them (the math is written out in
fusedreg/reference/layer_norm.py).

Ops: ``fusedreg::layer_norm_fwd`` / ``_bwd`` (C++, schemas in csrc/ops.cpp) serve the cpu and
cuda backends; ``fusedreg::layer_norm_fwd_reference`` / ``_triton`` (and ``_bwd_…``) are made
from the one Python declaration below. The ops see x as (M, N) rows; the Function reshapes.
Backward saves h (x itself when there is no residual and no dropout), weight, bias, mean,
rstd and the 8-byte seed: never a mask.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch
from torch import Tensor

from .. import backends
from .._dtypes import compute_dtype
from ..reference import layer_norm as ref
from ..reference.philox import apply_dropout
from ._common import Kernels, direct_kernels, extension_call, register_kernels

__all__ = ["LayerNormConfig", "LayerNormFunction", "apply", "run_forward"]

OP = "layer_norm"
_is_grad_enabled, _is_compiling = torch.is_grad_enabled, torch.compiler.is_compiling
_INF = math.inf
_FLOATS = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def layer_norm_fwd(x: Tensor, residual: Optional[Tensor], weight: Optional[Tensor],
                   bias: Optional[Tensor], eps: float, p: float, seed: Tensor, rms: bool,
                   h_dtype: torch.dtype, store_h: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(y, h, mean, rstd) for x, residual: (M, N) and weight, bias: (N,). h (h_dtype) is
    returned only when ``store_h`` (else empty); mean is empty for ``rms``; mean and rstd are
    in the compute type (fusedreg._dtypes)."""


def layer_norm_bwd(dy: Tensor, dh_out: Optional[Tensor], h: Tensor, weight: Optional[Tensor],
                   bias: Optional[Tensor], mean: Tensor, rstd: Tensor, p: float, seed: Tensor,
                   rms: bool, x_dtype: torch.dtype, need_grad_residual: bool,
                   need_grad_weight: bool, need_grad_bias: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(grad_x, grad_residual, grad_weight, grad_bias); dh_out is the grad of the returned h
    (prenorm); each of the last three is empty unless asked for."""


def _fwd_fake(x, residual, weight, bias, eps, p, seed, rms, h_dtype, store_h):
    torch._check(x.dim() == 2, lambda: "x must be (M, N)")
    M, N = x.shape
    torch._check(residual is None or residual.shape == x.shape, lambda: "residual must match x")
    torch._check(weight is None or weight.shape == (N,), lambda: "weight must have shape (N,)")
    torch._check(bias is None or bias.shape == (N,), lambda: "bias must have shape (N,)")
    st = compute_dtype(x.dtype)
    y = x.new_empty((M, N))
    h = x.new_empty((M, N) if store_h else (0,), dtype=h_dtype)
    mean = x.new_empty((0,) if rms else (M,), dtype=st)
    return y, h, mean, x.new_empty((M,), dtype=st)


def _bwd_fake(dy, dh_out, h, weight, bias, mean, rstd, p, seed, rms, x_dtype,
              need_grad_residual, need_grad_weight, need_grad_bias):
    torch._check(dy.shape == h.shape, lambda: "dy must match h")
    gx = dy.new_empty(dy.shape, dtype=x_dtype)
    gr = dy.new_empty(dy.shape, dtype=h.dtype) if need_grad_residual else dy.new_empty(0)
    gw = torch.empty_like(weight) if need_grad_weight else dy.new_empty(0)
    gb = torch.empty_like(bias) if need_grad_bias else dy.new_empty(0)
    return gx, gr, gw, gb


register_kernels(OP, layer_norm_fwd, layer_norm_bwd, ref, fwd_fake=_fwd_fake,
                 bwd_fake=_bwd_fake)


class LayerNormConfig(NamedTuple):
    """The non-tensor arguments of ``LayerNormFunction`` (checked by its forward)."""
    ndim: int              # the norm runs over x's last ``ndim`` dims
    eps: float
    p: float               # dropout of x before the residual add (0: none, seed unread)
    rms: bool              # RMSNorm (no mean) instead of LayerNorm
    h_dtype: torch.dtype   # dtype of h = residual + dropout(x)
    prenorm: bool          # h is returned (and differentiable), as the next residual
    backend: str           # a name of fusedreg.backends.BACKENDS that implements layer_norm


def _stores_h(x, residual, config) -> bool:
    """h is stored when it differs from x (backward normalizes it again) or is returned."""
    return config.prenorm or residual is not None or config.p > 0.0 or config.h_dtype != x.dtype


def run_forward(x, residual, weight, bias, seed, config: LayerNormConfig, store_h=None,
                kernels=None):
    """``LayerNormFunction``'s forward without autograd, for arguments already checked (the
    functional API calls it directly when nothing needs a gradient); ``store_h`` is
    ``_stores_h``'s answer and ``kernels`` the backend's registered ops when the caller has
    them."""
    if store_h is None:
        store_h = _stores_h(x, residual, config)
    if x.dim() == 2 and config.ndim == 1:  # already (M, N): no views to make
        x2, r2, w, b = x, residual, weight, bias
    else:
        nd = x.dim() - config.ndim
        N = math.prod(x.shape[nd:])
        x2 = x.reshape(math.prod(x.shape[:nd]), N)
        r2 = residual.reshape(x2.shape) if residual is not None else None
        w = weight.reshape(N) if weight is not None and weight.dim() != 1 else weight
        b = bias.reshape(N) if bias is not None and bias.dim() != 1 else bias
    # The ops take the residual in h's dtype (a bf16 residual with residual_in_fp32 is cast).
    if r2 is not None and r2.dtype != config.h_dtype:
        r2 = r2.to(config.h_dtype)
    fwd = (kernels or _kernels(config.backend)).fwd
    y, h, mean, rstd = fwd(x2, r2, w, b, config.eps, config.p, seed, config.rms, config.h_dtype,
                           store_h)
    if x2 is x:
        return y, h, mean, rstd
    return y.view(x.shape), (h.view(x.shape) if store_h else h), mean, rstd


def _kernels(backend: str) -> Kernels:
    """The backend's registered ops; in an eager call the cpu backend's direct-first ones
    (fusedreg.ops._common.direct_kernels)."""
    kernels = backends.implementation(OP, backend)
    return kernels if _is_compiling() else direct_kernels(kernels)


def _setup_context(ctx, inputs, output, stores_h):
    """What the backward needs, saved from the forward's inputs and outputs."""
    x, residual, weight, bias, seed, config = inputs
    y, h, mean, rstd = output
    ctx.config = config
    # x's shape and the weight's and bias's are read back only when the backward reshapes
    ctx.shapes = None if x.dim() == 2 and config.ndim == 1 else (
        x.shape, weight.shape if weight is not None else None,
        bias.shape if bias is not None else None)
    ctx.x_dtype = x.dtype
    ctx.residual_dtype = residual.dtype if residual is not None else None
    ctx.has = (residual is not None, weight is not None, bias is not None)
    # A stored h stays differentiable even when it is not returned (prenorm=False): the
    # backward saves it, and a differentiable backward (create_graph=True) reaches x and
    # the residual through it, its grad arriving here as dh_out.
    ctx.stores_h = stores_h
    if stores_h:
        ctx.mark_non_differentiable(mean, rstd)
    else:
        ctx.mark_non_differentiable(h, mean, rstd)
    ctx.set_materialize_grads(False)
    need = ctx.needs_input_grad
    if need[0] or need[1] or need[2] or need[3]:
        # The bias enters the backward only through grad_bias's shape and dtype.
        ctx.save_for_backward(h if stores_h else x, weight, bias if need[3] else None, mean,
                              rstd, seed)


class LayerNormFunction(torch.autograd.Function):
    """``LayerNormFunction.apply(x, residual, weight, bias, seed, config)`` -> ``(y, h, mean,
    rstd)``: h = residual + dropout(x) (residual and weight/bias may be None), y = norm(h) *
    weight + bias over the last ``config.ndim`` dims; h is an empty tensor unless
    ``config.prenorm``; mean and rstd (per row, compute type, not differentiable) are what
    the backward reuses. ``fusedreg.functional.layer_norm``, ``rms_norm`` and
    ``dropout_add_layer_norm`` check the arguments and call it."""

    # forward takes ctx (no setup_context): Function.apply binds the arguments to forward's
    # signature on every call of a Function with a setup_context, which cost more than a small
    # norm's kernel. torch.func transforms do not reach this Function (fusedreg.functional
    # routes them to the differentiable composite); torch.compile traces it either way.
    @staticmethod
    def forward(ctx, x, residual, weight, bias, seed, config: LayerNormConfig):
        check_config(config, x)
        stores_h = _stores_h(x, residual, config)
        kernels = _kernels(config.backend)
        output = run_forward(x, residual, weight, bias, seed, config, stores_h, kernels)
        ctx.bwd = kernels.bwd  # looked up once, here (the backward is on a small call's path)
        _setup_context(ctx, (x, residual, weight, bias, seed, config), output, stores_h)
        return output

    @staticmethod
    def backward(ctx, dy, dh_out, _dmean, _drstd):
        cfg = ctx.config
        if not ctx.stores_h:  # h is an empty placeholder then: a grad for it carries nothing
            dh_out = None
        has_residual, has_weight, has_bias = ctx.has
        need_x, need_residual, need_w, need_b, _, _ = ctx.needs_input_grad
        need_residual = bool(need_residual and has_residual)
        need_w, need_b = bool(need_w and has_weight), bool(need_b and has_bias)
        if not (need_x or need_residual or need_w or need_b) or (dy is None and dh_out is None):
            return None, None, None, None, None, None
        h, w, b, mean, rstd, seed = ctx.saved_tensors
        if _is_grad_enabled():  # create_graph: the gradient must be differentiable
            return _differentiable_backward(cfg, ctx.x_dtype, ctx.residual_dtype, dy, dh_out, h,
                                            w, b, seed, need_x, need_residual, need_w,
                                            need_b) + (None, None)
        shapes = ctx.shapes
        flat = shapes is None  # x already (M, N): no views to make
        if not flat:
            x_shape = shapes[0]
            nd = len(x_shape) - cfg.ndim
            N = math.prod(x_shape[nd:])
            h = h.reshape(math.prod(x_shape[:nd]), N)
            w = w.reshape(N) if w is not None else None
            b = b.reshape(N) if b is not None else None
        if dy is None:
            dy = torch.zeros_like(h, dtype=ctx.x_dtype)
        elif not flat:
            dy = dy.reshape(h.shape)
        if dh_out is not None and not flat:
            dh_out = dh_out.reshape(h.shape)
        # grad_residual equals the grad of h; the op writes it separately only when it
        # differs from grad_x (dropout, or another dtype).
        separate = need_residual and (cfg.p > 0.0 or h.dtype != ctx.x_dtype)
        gx, gr, gw, gb = ctx.bwd(dy, dh_out, h, w, b, mean, rstd, cfg.p, seed, cfg.rms, ctx.x_dtype,
                                 separate, need_w, need_b)
        grad_residual = None
        if need_residual:
            grad_residual = gr if separate else gx
            if grad_residual.dtype != ctx.residual_dtype:  # (a no-op .to is a microsecond)
                grad_residual = grad_residual.to(ctx.residual_dtype)
        if flat:
            return (gx if need_x else None), grad_residual, (gw if need_w else None), \
                (gb if need_b else None), None, None
        grad_x = gx.view(x_shape) if need_x else None
        if grad_residual is not None:
            grad_residual = grad_residual.view(x_shape)
        grad_w = gw.view(shapes[1]) if need_w else None
        grad_b = gb.view(shapes[2]) if need_b else None
        return grad_x, grad_residual, grad_w, grad_b, None, None


# fusedreg._C.layer_norm_train: the Function above as a C++ autograd node (csrc/ops.cpp), or None
_CPU_NODE = extension_call("layer_norm_train")
# the cpu backend's ops as this module registered them: the node runs those, so a call takes
# it only while they are the registered ones (a test or a user may register others)
_CPU_KERNELS = backends.implementation(OP, "cpu") if _CPU_NODE is not None else None
_implementation = backends.implementation


def node_serves(backend: str) -> bool:
    """The C++ calls (``layer_norm_train``, and ``torch_norm``'s fused call) may serve
    ``backend``: it is cpu, whose built-in kernels they run, and those are the registered ones."""
    return _CPU_NODE is not None and backend == "cpu" and _implementation(OP, "cpu") is _CPU_KERNELS


def apply(x, residual, weight, bias, seed, config: LayerNormConfig):
    """``LayerNormFunction.apply`` for arguments the functional API checked, in an eager call
    that records a backward: for the cpu backend on plain CPU tensors the same computation as a
    C++ autograd node (``fusedreg._C.layer_norm_train``: the Python Function's apply, ctx and
    backward cost more than a small norm's kernels); anything else, or a declined call, the
    Function."""
    if node_serves(config.backend):
        out = _CPU_NODE(x, residual, weight, bias, seed, config.ndim, config.eps, config.p,
                        config.rms, config.h_dtype, config.prenorm)
        if out is not None:
            return out
    return LayerNormFunction.apply(x, residual, weight, bias, seed, config)


def check_config(config, x) -> None:
    """The config's values, for callers of ``LayerNormFunction.apply`` that skip the functional
    API's checks: a clear error instead of a kernel given nonsense. Comparisons only, so that
    torch.compile traces them with symbolic values (guards, no graph break)."""
    if not isinstance(config, LayerNormConfig):
        raise TypeError(f"config must be a LayerNormConfig, got {type(config).__name__}")
    ndim, eps, p = config.ndim, config.eps, config.p
    if type(ndim) is int and 1 <= ndim <= x.dim() and type(eps) is float and -_INF < eps < _INF \
            and type(p) is float and 0.0 <= p <= 1.0 and config.h_dtype in _FLOATS:
        return  # what the functional API builds, checked fast
    if isinstance(ndim, bool) or not isinstance(ndim, int) or not 1 <= ndim <= x.dim():
        raise ValueError(f"LayerNormConfig.ndim must be an int in [1, x.dim()] = [1, {x.dim()}], "
                         f"got {ndim!r}")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not -math.inf < eps < math.inf:
        raise ValueError(f"LayerNormConfig.eps must be a finite number, got {eps!r}")
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= p <= 1.0:
        raise ValueError(f"LayerNormConfig.p must be a number in [0, 1], got {p!r}")
    if not isinstance(config.h_dtype, torch.dtype) or not config.h_dtype.is_floating_point:
        raise TypeError(f"LayerNormConfig.h_dtype must be a floating dtype, got {config.h_dtype!r}")


def _differentiable_backward(cfg, x_dtype, residual_dtype, dy, dh_out, h, w, b, seed, need_x,
                             need_residual, need_w, need_b):
    """(grad_x, grad_residual, grad_w, grad_b): the backward as differentiable torch ops of the
    saved h (an output of the forward, or x itself), the weight and dy — the reference formulas
    with mean and rstd recomputed from h, then the same seeded mask — so that a second backward
    (create_graph=True) sees its true derivative: through h it reaches x and the residual,
    through w the weight. Called by LayerNormFunction's backward and by the C++ node's
    (csrc/ops.cpp: LayerNormNode)."""
    if dy is None:
        dy = torch.zeros(h.shape, dtype=x_dtype, device=h.device)
    dh, grad_w, grad_b = ref.norm_backward_composite(dy, h, w, cfg.ndim, cfg.eps, cfg.rms)
    if dh_out is not None:
        dh = dh + dh_out.to(dh.dtype)
    grad_x = apply_dropout(dh, cfg.p, seed).to(x_dtype) if need_x else None
    grad_residual = dh.to(residual_dtype) if need_residual else None
    grad_w = grad_w.reshape(w.shape) if need_w else None
    grad_b = grad_b.to(b.dtype).reshape(b.shape) if need_b else None
    return grad_x, grad_residual, grad_w, grad_b

