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
from ._common import register_kernels

__all__ = ["LayerNormConfig", "LayerNormFunction"]

OP = "layer_norm"


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
    """The non-tensor arguments of ``LayerNormFunction``."""
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


class LayerNormFunction(torch.autograd.Function):
    """``LayerNormFunction.apply(x, residual, weight, bias, seed, config)`` -> ``(y, h, mean,
    rstd)``: h = residual + dropout(x) (residual and weight/bias may be None), y = norm(h) *
    weight + bias over the last ``config.ndim`` dims; h is an empty tensor unless
    ``config.prenorm``; mean and rstd (per row, compute type, not differentiable) are what
    the backward reuses. ``fusedreg.functional.layer_norm``, ``rms_norm`` and
    ``dropout_add_layer_norm`` check the arguments and call it."""

    @staticmethod
    def forward(x, residual, weight, bias, seed, config: LayerNormConfig):
        nd = x.dim() - config.ndim
        M, N = math.prod(x.shape[:nd]), math.prod(x.shape[nd:])
        store_h = _stores_h(x, residual, config)
        # The ops take the residual in h's dtype (a bf16 residual with residual_in_fp32 is cast).
        r2 = residual.reshape(M, N).to(config.h_dtype) if residual is not None else None
        w = weight.reshape(N) if weight is not None else None
        b = bias.reshape(N) if bias is not None else None
        fwd = backends.implementation(OP, config.backend).fwd
        y, h, mean, rstd = fwd(x.reshape(M, N), r2, w, b, config.eps, config.p, seed, config.rms,
                               config.h_dtype, store_h)
        h = h.view(x.shape) if store_h else h
        return y.view(x.shape), h, mean, rstd

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, residual, weight, bias, seed, config = inputs
        y, h, mean, rstd = output
        ctx.config = config
        ctx.x_shape, ctx.x_dtype = x.shape, x.dtype
        ctx.residual_dtype = residual.dtype if residual is not None else None
        ctx.has = (residual is not None, weight is not None, bias is not None)
        ctx.mark_non_differentiable(mean, rstd)
        if not config.prenorm:
            ctx.mark_non_differentiable(h)
        ctx.set_materialize_grads(False)
        if not any(ctx.needs_input_grad[:4]):
            return
        # The bias enters the backward only through grad_bias's shape and dtype.
        ctx.save_for_backward(h if _stores_h(x, residual, config) else x, weight,
                              bias if ctx.needs_input_grad[3] else None, mean, rstd, seed)

    @staticmethod
    def backward(ctx, dy, dh_out, _dmean, _drstd):
        cfg = ctx.config
        if not cfg.prenorm:  # h is not an output then: a grad for it (zeros) carries nothing
            dh_out = None
        has_residual, has_weight, has_bias = ctx.has
        need_x, need_residual, need_w, need_b = ctx.needs_input_grad[:4]
        need_residual = bool(need_residual and has_residual)
        need_w, need_b = bool(need_w and has_weight), bool(need_b and has_bias)
        if not (need_x or need_residual or need_w or need_b) or (dy is None and dh_out is None):
            return None, None, None, None, None, None
        h, w, b, mean, rstd, seed = ctx.saved_tensors
        nd = len(ctx.x_shape) - cfg.ndim
        M, N = math.prod(ctx.x_shape[:nd]), math.prod(ctx.x_shape[nd:])
        h = h.reshape(M, N)
        dy = torch.zeros_like(h, dtype=ctx.x_dtype) if dy is None else dy.reshape(h.shape)
        dh_out = dh_out.reshape(h.shape) if dh_out is not None else None
        # grad_residual equals the grad of h; the op writes it separately only when it
        # differs from grad_x (dropout, or another dtype).
        separate = need_residual and (cfg.p > 0.0 or h.dtype != ctx.x_dtype)
        bwd = backends.implementation(OP, cfg.backend).bwd
        gx, gr, gw, gb = bwd(dy, dh_out, h, w.reshape(N) if w is not None else None,
                             b.reshape(N) if b is not None else None, mean, rstd, cfg.p, seed,
                             cfg.rms, ctx.x_dtype, separate, need_w, need_b)
        grad_x = gx.view(ctx.x_shape) if need_x else None
        grad_residual = ((gr if separate else gx).view(ctx.x_shape).to(ctx.residual_dtype)
                         if need_residual else None)
        grad_w = gw.view(w.shape) if need_w else None
        grad_b = gb.view(b.shape) if need_b else None
        return grad_x, grad_residual, grad_w, grad_b, None, None
