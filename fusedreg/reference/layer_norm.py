"""layer_norm in plain PyTorch: LayerNorm / RMSNorm of h = residual + dropout(x).

Every backend implements these two functions over x viewed as (M, N):

forward   h    = residual + dropout(x)          (h = x when there is neither)
          h    is rounded once to h's dtype (residual's, or fp32 with residual_in_fp32),
               and the rounded h is what gets normalized, so y == norm(h) for the h returned
          xhat = (h - mean) * rstd              (RMS: xhat = h * rstd, no mean)
          y    = xhat * w + b                   (rounded once to x's dtype)
backward  g    = dy * w
          dh   = rstd * (g - mean(g) - xhat * mean(g * xhat))   (RMS: without the mean(g) term)
               + dh_out                          (the grad of the returned h, prenorm)
          grad_residual = dh,  grad_x = dh * keep * scale,
          grad_w = sum_rows(dy * xhat),  grad_b = sum_rows(dy)

Statistics (mean, rstd) are float32 (float64 for float64 inputs); math in that type.
"""
from __future__ import annotations

import torch

from .._dtypes import compute_dtype
from .philox import apply_dropout


def layer_norm_fwd(x, residual, weight, bias, eps: float, p: float, seed: int, rms: bool,
                   h_dtype: torch.dtype, store_h: bool):
    """x, residual: (M, N); weight, bias: (N,) or None. Returns (y, h, mean, rstd):
    y (M, N) in x's dtype; h (M, N) in h_dtype if store_h else empty; mean (M,) (empty for
    RMS) and rstd (M,) in the compute dtype."""
    ct = compute_dtype(x.dtype)
    h = apply_dropout(x.to(ct), p, seed)
    if residual is not None:
        h = h + residual.to(ct)
    h_rounded = h.to(h_dtype)
    h = h_rounded.to(ct)
    if rms:
        mean = h.new_empty(0)
        rstd = torch.rsqrt(h.square().mean(-1) + eps)
        xhat = h * rstd[:, None]
    else:
        mean = h.mean(-1)
        centered = h - mean[:, None]
        rstd = torch.rsqrt(centered.square().mean(-1) + eps)
        xhat = centered * rstd[:, None]
    y = xhat
    if weight is not None:
        y = y * weight.to(ct)
    if bias is not None:
        y = y + bias.to(ct)
    y = y.to(x.dtype).contiguous()
    if y.data_ptr() == x.data_ptr():
        y = y.clone()
    if store_h:
        h_out = h_rounded.contiguous()
        if h_out.data_ptr() in (x.data_ptr(), residual.data_ptr() if residual is not None else -1):
            h_out = h_out.clone()
    else:
        h_out = torch.empty(0, dtype=h_dtype, device=x.device)
    return y, h_out, mean, rstd


def layer_norm_bwd(dy, dh_out, h, weight, bias, mean, rstd, p: float, seed: int, rms: bool,
                   x_dtype: torch.dtype, need_grad_residual: bool, need_grad_weight: bool,
                   need_grad_bias: bool):
    """dy: (M, N) grad of y; dh_out: (M, N) grad of the returned h or None; h: (M, N) the
    normalized input. Returns (grad_x in x_dtype, grad_residual in h's dtype or empty,
    grad_weight, grad_bias (each empty unless asked))."""
    ct = compute_dtype(rstd.dtype)
    hc = h.to(ct)
    r = rstd[:, None]
    xhat = hc * r if rms else (hc - mean[:, None]) * r
    dyc = dy.to(ct)
    g = dyc * weight.to(ct) if weight is not None else dyc
    c2 = (g * xhat).mean(-1, keepdim=True)
    if rms:
        dh = r * (g - xhat * c2)
    else:
        dh = r * (g - g.mean(-1, keepdim=True) - xhat * c2)
    if dh_out is not None:
        dh = dh + dh_out.to(ct)
    grad_residual = dh.to(h.dtype).contiguous() if need_grad_residual else dy.new_empty(0)
    grad_x = apply_dropout(dh, p, seed).to(x_dtype).contiguous()
    grad_w = (dyc * xhat).sum(0).to(weight.dtype) if need_grad_weight else dy.new_empty(0)
    grad_b = dyc.sum(0).to(bias.dtype) if need_grad_bias else dy.new_empty(0)
    if grad_x.data_ptr() == dy.data_ptr():
        grad_x = grad_x.clone()
    return grad_x, grad_residual, grad_w, grad_b


def norm_composite(h, weight, bias, ndim: int, eps: float, rms: bool, out_dtype: torch.dtype):
    """y = norm(h) * weight + bias over h's last ``ndim`` dims as one differentiable expression
    (math in the compute type, one cast to ``out_dtype``): the norm of
    ``layer_norm_composite``."""
    ct = compute_dtype(h.dtype)
    dims = tuple(range(h.dim() - ndim, h.dim()))
    hc = h.to(ct)
    if rms:
        xhat = hc * torch.rsqrt(hc.square().mean(dims, keepdim=True) + eps)
    else:
        centered = hc - hc.mean(dims, keepdim=True)
        xhat = centered * torch.rsqrt(centered.square().mean(dims, keepdim=True) + eps)
    y = xhat
    if weight is not None:
        y = y * weight.to(ct)
    if bias is not None:
        y = y + bias.to(ct)
    return y.to(out_dtype)


def layer_norm_composite(x, residual, weight, bias, ndim: int, eps: float, p: float, seed,
                         rms: bool, h_dtype: torch.dtype):
    """(y, h) of the forward above for x of any shape (the norm over its last ``ndim`` dims),
    as one differentiable expression: what runs under torch.func transforms and forward-mode
    AD. ``seed`` is an int64 tensor (batched under vmap) or an int."""
    ct = compute_dtype(x.dtype)
    h = apply_dropout(x.to(ct), p, seed)
    if residual is not None:
        h = h + residual.to(ct)
    h = h.to(h_dtype)
    return norm_composite(h, weight, bias, ndim, eps, rms, x.dtype), h


def norm_backward_composite(dy, h, weight, ndim: int, eps: float, rms: bool):
    """(dh, grad_weight, grad_bias) of ``norm_composite`` — the backward formulas of the module
    docstring over h's last ``ndim`` dims, with mean and rstd recomputed from h — as one
    differentiable expression in dy, h and weight: what the autograd Function's backward
    computes when its result must itself be differentiable (create_graph=True). dh is in the
    compute type; grad_weight and grad_bias (sums over the leading dims) in weight's dtype."""
    ct = compute_dtype(h.dtype)
    dims = tuple(range(h.dim() - ndim, h.dim()))
    lead = tuple(range(h.dim() - ndim))
    hc = h.to(ct)
    if rms:
        rstd = torch.rsqrt(hc.square().mean(dims, keepdim=True) + eps)
        xhat = hc * rstd
    else:
        centered = hc - hc.mean(dims, keepdim=True)
        rstd = torch.rsqrt(centered.square().mean(dims, keepdim=True) + eps)
        xhat = centered * rstd
    dyc = dy.to(ct)
    g = dyc * weight.to(ct) if weight is not None else dyc
    c2 = (g * xhat).mean(dims, keepdim=True)
    if rms:
        dh = rstd * (g - xhat * c2)
    else:
        dh = rstd * (g - g.mean(dims, keepdim=True) - xhat * c2)
    wdtype = weight.dtype if weight is not None else h.dtype
    grad_w = (dyc * xhat).sum(lead).to(wdtype)
    grad_b = dyc.sum(lead).to(wdtype)
    return dh, grad_w, grad_b
