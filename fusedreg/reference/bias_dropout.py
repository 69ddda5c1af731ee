"""bias_dropout in plain PyTorch: out = residual + dropout(act(x + bias)).

Math in float32 (float64 for float64 inputs), one cast at the end; the mask is the seeded
function of fusedreg/reference/philox.py (docs/design.md, "The dropout mask").
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .._dtypes import compute_dtype
from .philox import apply_dropout


def _exact_at_inf(z: torch.Tensor, v: torch.Tensor, at_pos, at_neg) -> torch.Tensor:
    """v with the exact limits at z = +inf / -inf (torch's own ops give NaN there: 0 * inf)."""
    return torch.where(z == math.inf, at_pos, torch.where(z == -math.inf, at_neg, v))


def activate(z: torch.Tensor, activation: int) -> torch.Tensor:
    """act(z) as torch's eager op computes it, with the exact value where torch's own
    arithmetic overflows (docs/design.md, "Numerics"): the limits at +-inf (act(+inf) = +inf,
    act(-inf) = -0), and gelu written out as 0.5 z (1 + erf(z / sqrt 2)) (torch's F.gelu
    gives inf for z > 1.7e38 in float32)."""
    if activation == 0:
        return z
    if activation == 1:
        return torch.relu(z)
    if activation == 2:
        c = 1.0 + torch.erf(z * (1.0 / math.sqrt(2.0)))
        return torch.where(c == 0, -0.0, 0.5 * z * c)
    if activation == 3:
        v = F.gelu(z, approximate="tanh")
    elif activation == 4:
        v = F.silu(z)
    else:
        raise ValueError(f"unknown activation code {activation}")
    return _exact_at_inf(z, v, math.inf, -0.0)


def activate_grad(z: torch.Tensor, activation: int) -> torch.Tensor:
    """d act(z) / dz, written out (the formulas of csrc/include/fusedreg/activation.h, with
    its guards: where a factor has rounded to 0 its term is 0, not 0 * inf = NaN)."""
    if activation == 0:
        return torch.ones_like(z)
    if activation == 1:
        return (~(z <= 0)).to(z.dtype)  # 1 at NaN, as torch's relu backward
    if activation == 2:
        cdf = 0.5 * (1.0 + torch.erf(z * (1.0 / math.sqrt(2.0))))
        pdf = torch.exp(-0.5 * z * z) * (1.0 / math.sqrt(2.0 * math.pi))
        g = torch.where(pdf == 0, cdf, cdf + z * pdf)
    elif activation == 3:
        k = math.sqrt(2.0 / math.pi)
        t = torch.tanh(k * (z + 0.044715 * z * z * z))
        q = 1.0 - t * t
        g = torch.where(q == 0, 0.5 * (1.0 + t),
                        0.5 * (1.0 + t) + 0.5 * z * q * k * (1.0 + 3.0 * 0.044715 * z * z))
    elif activation == 4:
        s = torch.sigmoid(z)
        g = torch.where((s == 0) | (s == 1), s, s * (1.0 + z * (1.0 - s)))
    else:
        raise ValueError(f"unknown activation code {activation}")
    return _exact_at_inf(z, g, 1.0, 0.0)


def bias_dropout_fwd(x, bias, residual, p: float, activation: int, seed: int) -> torch.Tensor:
    out = bias_dropout_composite(x, bias, residual, p, activation, seed)
    # a registered op's output may not alias its input (p == 0, no activation, no bias)
    return out.clone() if out.data_ptr() == x.data_ptr() else out.contiguous()


def bias_dropout_bwd(grad_out, x, bias, p: float, activation: int, seed: int, need_grad_bias: bool):
    ct = compute_dtype(grad_out.dtype)
    d = apply_dropout(grad_out.to(ct), p, seed)
    if activation != 0:
        z = x.to(ct)
        if bias is not None:
            z = z + bias.to(ct)
        d = d * activate_grad(z, activation)
    grad_x = d.to(grad_out.dtype)
    if grad_x.data_ptr() == grad_out.data_ptr():
        grad_x = grad_x.clone()
    if need_grad_bias:
        n = bias.shape[0]  # (a 0-element d cannot be reshaped to (-1, 0))
        grad_bias = (d.reshape(-1, n).sum(0) if d.numel() else d.new_zeros(n)).to(bias.dtype)
    else:
        grad_bias = grad_out.new_empty(0)
    return grad_x.contiguous(), grad_bias


def bias_dropout_composite(x, bias, residual, p: float, activation: int, seed) -> torch.Tensor:
    """The forward above as one differentiable expression (no copies, no data pointers): what
    the autograd Function differentiates when a gradient must itself be differentiable
    (double backward) and what runs under torch.func transforms and forward-mode AD. ``seed``
    is an int64 tensor (batched under vmap) or an int."""
    ct = compute_dtype(x.dtype)
    z = x.to(ct)
    if bias is not None:
        z = z + bias.to(ct)
    v = apply_dropout(activate(z, activation), p, seed)
    if residual is not None:
        v = v + residual.to(ct)
    return v.to(x.dtype)
