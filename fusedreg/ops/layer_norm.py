"""layer_norm: registered forward/backward ops per backend and the public autograd Functions
``LayerNormFunction``, ``RMSNormFunction`` and ``DropoutAddLayerNormFunction``.

One op family serves all three: y = norm(h) * w + b with h = residual + dropout(x) (the math
is written out in fusedreg/reference/layer_norm.py). Ops per backend:
  reference  fusedreg::layer_norm_fwd_reference / _bwd_reference (Python custom ops)
  triton     fusedreg::layer_norm_fwd_triton / _bwd_triton       (Python custom ops)
  cpu, cuda  fusedreg::layer_norm_fwd / _bwd                      (C++, csrc/ops.cpp)
The ops see x as (M, N) rows; the Functions reshape. Backward saves h (x itself when there is
no residual and no dropout), weight, bias, mean, rstd and the 8-byte seed: never a mask.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from .._seed import seed_value
from ..reference import layer_norm as ref
from ._common import cpp_ops, register, triton_available

OP = "layer_norm"


def stat_dtype(dtype: torch.dtype) -> torch.dtype:
    """mean and rstd are float32, float64 for float64 inputs (so that gradcheck is exact)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _fwd_fake(x, residual, weight, bias, eps, p, seed, rms, h_dtype, store_h):
    torch._check(x.dim() == 2, lambda: "x must be (M, N)")
    M, N = x.shape
    torch._check(residual is None or residual.shape == x.shape, lambda: "residual must match x")
    torch._check(weight is None or weight.shape == (N,), lambda: "weight must have shape (N,)")
    torch._check(bias is None or bias.shape == (N,), lambda: "bias must have shape (N,)")
    st = stat_dtype(x.dtype)
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


@torch.library.custom_op("fusedreg::layer_norm_fwd_reference", mutates_args=())
def _fwd_reference(x: Tensor, residual: Optional[Tensor], weight: Optional[Tensor],
                   bias: Optional[Tensor], eps: float, p: float, seed: Tensor, rms: bool,
                   h_dtype: torch.dtype, store_h: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return ref.layer_norm_fwd(x, residual, weight, bias, eps, p, seed_value(seed), rms, h_dtype, store_h)


@torch.library.custom_op("fusedreg::layer_norm_bwd_reference", mutates_args=())
def _bwd_reference(dy: Tensor, dh_out: Optional[Tensor], h: Tensor, weight: Optional[Tensor],
                   bias: Optional[Tensor], mean: Tensor, rstd: Tensor, p: float, seed: Tensor,
                   rms: bool, x_dtype: torch.dtype, need_grad_residual: bool,
                   need_grad_weight: bool, need_grad_bias: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return ref.layer_norm_bwd(dy, dh_out, h, weight, bias, mean, rstd, p, seed_value(seed), rms,
                              x_dtype, need_grad_residual, need_grad_weight, need_grad_bias)


_fwd_reference.register_fake(_fwd_fake)
_bwd_reference.register_fake(_bwd_fake)
_IMPLS = {"reference": (_fwd_reference, _bwd_reference)}

if triton_available():
    @torch.library.custom_op("fusedreg::layer_norm_fwd_triton", mutates_args=())
    def _fwd_triton(x: Tensor, residual: Optional[Tensor], weight: Optional[Tensor],
                    bias: Optional[Tensor], eps: float, p: float, seed: Tensor, rms: bool,
                    h_dtype: torch.dtype, store_h: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        from ..triton import layer_norm as tri

        return tri.layer_norm_fwd(x, residual, weight, bias, eps, p, seed_value(seed), rms, h_dtype, store_h)

    @torch.library.custom_op("fusedreg::layer_norm_bwd_triton", mutates_args=())
    def _bwd_triton(dy: Tensor, dh_out: Optional[Tensor], h: Tensor, weight: Optional[Tensor],
                    bias: Optional[Tensor], mean: Tensor, rstd: Tensor, p: float, seed: Tensor,
                    rms: bool, x_dtype: torch.dtype, need_grad_residual: bool,
                    need_grad_weight: bool, need_grad_bias: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        from ..triton import layer_norm as tri

        return tri.layer_norm_bwd(dy, dh_out, h, weight, bias, mean, rstd, p, seed_value(seed), rms,
                                  x_dtype, need_grad_residual, need_grad_weight, need_grad_bias)

    _fwd_triton.register_fake(_fwd_fake)
    _bwd_triton.register_fake(_bwd_fake)
    _IMPLS["triton"] = (_fwd_triton, _bwd_triton)

_cpp = cpp_ops("layer_norm_fwd", "layer_norm_bwd")
if _cpp is not None:
    torch.library.register_fake("fusedreg::layer_norm_fwd")(_fwd_fake)
    torch.library.register_fake("fusedreg::layer_norm_bwd")(_bwd_fake)
    _IMPLS["cpu"] = _IMPLS["cuda"] = _cpp

OPS: dict = {}
register(OP, OPS, _IMPLS)


# ---- autograd -------------------------------------------------------------------------------
# The three Functions share _forward/_backward. They use forward(ctx, ...) rather than
# setup_context because backward needs mean, rstd and h, which are not outputs of the op.

def _forward(ctx, x, residual, weight, bias, ndim, eps, p, seed, rms, h_dtype, store_h, backend):
    """Runs the op on x viewed as (M, N); N is the product of x's last ``ndim`` dims."""
    lead = x.shape[:x.dim() - ndim]
    M, N = math.prod(lead), math.prod(x.shape[x.dim() - ndim:])
    fwd, _ = OPS[backend]
    x2 = x.reshape(M, N)
    # The ops take the residual in h's dtype (a bf16 residual with residual_in_fp32 is cast).
    r2 = residual.reshape(M, N).to(h_dtype) if residual is not None else None
    w = weight.reshape(N) if weight is not None else None
    b = bias.reshape(N) if bias is not None else None
    y, h, mean, rstd = fwd(x2, r2, w, b, eps, p, seed, rms, h_dtype, store_h)
    ctx.save_for_backward(h if store_h else x2, w, b, mean, rstd, seed)
    ctx.shapes = (x.shape, None if weight is None else weight.shape, None if bias is None else bias.shape)
    ctx.x_dtype, ctx.p, ctx.rms, ctx.backend = x.dtype, p, rms, backend
    ctx.has_residual = residual is not None
    ctx.residual_dtype = residual.dtype if residual is not None else None
    ctx.set_materialize_grads(False)
    return y.view(x.shape), (h.view(x.shape) if store_h else None)


def _backward(ctx, dy, dh_out, need_x, need_residual, need_w, need_b):
    """(grad_x, grad_residual, grad_weight, grad_bias), each None unless needed."""
    h, w, b, mean, rstd, seed = ctx.saved_tensors
    x_shape, w_shape, b_shape = ctx.shapes
    need_w = bool(need_w and w is not None)
    need_b = bool(need_b and b is not None)
    need_residual = bool(need_residual and ctx.has_residual)
    if not (need_x or need_residual or need_w or need_b):
        return None, None, None, None
    M, N = h.shape
    dy = torch.zeros_like(h, dtype=ctx.x_dtype) if dy is None else dy.reshape(M, N)
    dh_out = dh_out.reshape(M, N) if dh_out is not None else None
    # grad_residual equals the grad of h; the op writes it separately only when it differs
    # from grad_x (dropout, or another dtype).
    separate = need_residual and (ctx.p > 0.0 or h.dtype != ctx.x_dtype)
    _, bwd = OPS[ctx.backend]
    gx, gr, gw, gb = bwd(dy, dh_out, h, w, b, mean, rstd, ctx.p, seed, ctx.rms, ctx.x_dtype,
                         separate, need_w, need_b)
    grad_x = gx.view(x_shape) if need_x else None
    grad_residual = (gr if separate else gx).view(x_shape).to(ctx.residual_dtype) if need_residual else None
    grad_w = gw.view(w_shape) if need_w else None
    grad_b = gb.view(b_shape) if need_b else None
    return grad_x, grad_residual, grad_w, grad_b


def _no_seed():
    return torch.zeros((), dtype=torch.int64)


class LayerNormFunction(torch.autograd.Function):
    """``LayerNormFunction.apply(x, weight, bias, ndim, eps, backend)``: LayerNorm over the
    last ``ndim`` dims of x; weight and bias (optional) have those dims' shape and x's dtype,
    or float32 with float16/bfloat16 x. ``fusedreg.functional.layer_norm`` checks and calls it."""

    @staticmethod
    def forward(ctx, x, weight, bias, ndim, eps, backend):
        y, _ = _forward(ctx, x, None, weight, bias, ndim, eps, 0.0, _no_seed(), False, x.dtype, False, backend)
        return y

    @staticmethod
    def backward(ctx, dy):
        gx, _, gw, gb = _backward(ctx, dy, None, ctx.needs_input_grad[0], False, *ctx.needs_input_grad[1:3])
        return gx, gw, gb, None, None, None


class RMSNormFunction(torch.autograd.Function):
    """``RMSNormFunction.apply(x, weight, ndim, eps, backend)``: RMSNorm over the last
    ``ndim`` dims of x (eps a float: ``fusedreg.functional.rms_norm`` resolves eps=None)."""

    @staticmethod
    def forward(ctx, x, weight, ndim, eps, backend):
        y, _ = _forward(ctx, x, None, weight, None, ndim, eps, 0.0, _no_seed(), True, x.dtype, False, backend)
        return y

    @staticmethod
    def backward(ctx, dy):
        gx, _, gw, _ = _backward(ctx, dy, None, ctx.needs_input_grad[0], False, ctx.needs_input_grad[1], False)
        return gx, gw, None, None, None


class DropoutAddLayerNormFunction(torch.autograd.Function):
    """``DropoutAddLayerNormFunction.apply(x, residual, weight, bias, ndim, eps, p, seed, rms,
    h_dtype, prenorm, backend)`` -> ``(y, h)``: h = residual + dropout(x) (residual may be
    None), y = norm(h) * weight + bias; ``h`` is None unless ``prenorm``. ``seed`` is a 0-dim
    int64 CPU tensor, ``h_dtype`` the dtype of h. ``fusedreg.functional.dropout_add_layer_norm``
    checks and calls it."""

    @staticmethod
    def forward(ctx, x, residual, weight, bias, ndim, eps, p, seed, rms, h_dtype, prenorm, backend):
        # h is stored when it differs from x (backward normalizes it again) or is returned.
        store_h = prenorm or residual is not None or p > 0.0 or h_dtype != x.dtype
        y, h = _forward(ctx, x, residual, weight, bias, ndim, eps, p, seed, rms, h_dtype, store_h, backend)
        return y, (h if prenorm else None)

    @staticmethod
    def backward(ctx, dy, dh_out):
        gx, gr, gw, gb = _backward(ctx, dy, dh_out, *ctx.needs_input_grad[:4])
        return gx, gr, gw, gb, None, None, None, None, None, None, None, None
