"""batch_norm in plain PyTorch: y = dropout(act(bn(x) + residual)), per channel c.

Every backend implements these four functions over x stored as a contiguous 3-D tensor: (N, C, S)
(NCHW, NCL: S = the product of the spatial dims) or, with ``channels_last``, (N, S, C)
(channels_last / channels_last_3d, and (N, C) inputs as (N, 1, C)). Whatever the storage, the
dropout mask index of element (n, c, s) is its flat index in the logical contiguous (N, C, S)
tensor, n * C * S + c * S + s (docs/design.md, "The dropout mask"), so a layout change never
changes the mask.

stats     mean[c] = mean over (n, s) of x;  var[c] = mean of (x - mean[c])^2 (biased; two
          passes, so a mean of 1e3 with a std of 1e-2 keeps its digits)
forward   xhat = (x - mean) * invstd;  z = xhat * w + b (+ residual)
          y    = dropout(act(z))                         (rounded once to x's dtype)
backward  dz   = dy * keep * scale * act'(z)             (= grad_residual; 0 where dropped,
                                                          even for an inf/NaN dy or act'(z))
          sum_dz[c] = sum dz (= grad_bias), sum_dz_xhat[c] = sum dz * xhat (= grad_weight)
          training: grad_x = w * invstd * (dz - sum_dz / count - xhat * sum_dz_xhat / count)
          eval:     grad_x = w * invstd * dz            (mean and invstd are constants then)

mean, invstd, weight and bias reach the kernels in the compute type (float32; float64 for
float64 x), (C,); ``count`` is the number of values per channel the statistics were taken
over (larger than N * S under SyncBatchNorm, whose reductions are summed over ranks).
"""
from __future__ import annotations

import torch

from .._dtypes import compute_dtype
from .bias_dropout import activate, activate_grad
from .philox import apply_dropout


def _logical(t: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """(N, C, S) view of a stored tensor."""
    return t.transpose(1, 2) if channels_last else t


def _stored(t: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """A fresh contiguous tensor, never a view (element-wise ops on a transposed view keep its
    strides, so .contiguous() could return a view, and an op's output must not be one)."""
    return (t.transpose(1, 2) if channels_last else t).clone(memory_format=torch.contiguous_format)


def _bc(v: torch.Tensor) -> torch.Tensor:
    return v[None, :, None]


def batch_norm_stats(x, channels_last: bool):
    """x: stored (N, C, S) or (N, S, C). Returns (mean, var) per channel, biased, (C,), in
    the compute dtype."""
    xl = _logical(x, channels_last).to(compute_dtype(x.dtype))
    if xl.numel() == 0:
        mean = xl.mean(dim=(0, 2))
    else:  # the mean of the deviations from each channel's first value: a mean of 1e3 with a
        # std of 1e-2 keeps its digits (a plain float32 mean rounds at 1e3's ulp)
        k = xl[0, :, 0]
        mean = k + (xl - _bc(k)).mean(dim=(0, 2))
    var = (xl - _bc(mean)).square().mean(dim=(0, 2))
    return mean, var


def _z(x, residual, weight, bias, mean, invstd, channels_last):
    ct = mean.dtype
    xhat = (_logical(x, channels_last).to(ct) - _bc(mean)) * _bc(invstd)
    z = xhat
    if weight is not None:
        z = z * _bc(weight)
    if bias is not None:
        z = z + _bc(bias)
    if residual is not None:
        z = z + _logical(residual, channels_last).to(ct)
    return xhat, z


def batch_norm_fwd(x, residual, weight, bias, mean, invstd, activation: int, p: float, seed: int,
                   channels_last: bool):
    """y = dropout(act((x - mean) * invstd * w + b + residual)) in x's layout and dtype."""
    _, z = _z(x, residual, weight, bias, mean, invstd, channels_last)
    y = apply_dropout(activate(z, activation), p, seed)
    return _stored(y.to(x.dtype), channels_last)


def _dz(dy, x, residual, weight, bias, mean, invstd, activation, p, seed, channels_last):
    xhat, z = _z(x, residual, weight, bias, mean, invstd, channels_last)
    dz = _logical(dy, channels_last).to(mean.dtype)
    if activation != 0:
        dz = dz * activate_grad(z, activation)
    # dropout last: a dropped element's dz is 0 even where dy or act'(z) is inf or NaN
    return xhat, apply_dropout(dz, p, seed)


def batch_norm_bwd_reduce(dy, x, residual, weight, bias, mean, invstd, activation: int, p: float,
                          seed: int, channels_last: bool):
    """(sum_dz, sum_dz_xhat) per channel, (C,), compute dtype."""
    xhat, dz = _dz(dy, x, residual, weight, bias, mean, invstd, activation, p, seed, channels_last)
    return dz.sum(dim=(0, 2)), (dz * xhat).sum(dim=(0, 2))


def batch_norm_bwd_elemt(dy, x, residual, weight, bias, mean, invstd, sum_dz, sum_dz_xhat,
                         count: float, activation: int, p: float, seed: int, channels_last: bool,
                         training: bool, need_grad_input: bool, need_grad_residual: bool):
    """(grad_x, grad_residual) in x's layout and dtype; each empty unless asked for."""
    xhat, dz = _dz(dy, x, residual, weight, bias, mean, invstd, activation, p, seed, channels_last)
    empty = dy.new_empty(0)
    grad_res = _stored(dz.to(x.dtype), channels_last) if need_grad_residual else empty
    if need_grad_input:
        k = _bc(invstd * weight if weight is not None else invstd)
        if training:
            gx = k * (dz - _bc(sum_dz / count) - xhat * _bc(sum_dz_xhat / count))
        else:
            gx = k * dz
        grad_x = _stored(gx.to(x.dtype), channels_last)
    else:
        grad_x = empty
    return grad_x, grad_res


def batch_norm_composite(x, running_mean, running_var, weight, bias, training: bool, eps: float,
                         activation: int, residual, p: float, seed):
    """(y, mean, var) for x (N, C, *spatial) in its logical shape (any layout), as one
    differentiable expression of x, residual, weight and bias (the statistics too in training:
    torch's batch_norm differentiates through them): what runs under torch.func transforms and
    forward-mode AD. mean and the biased var are the batch's in training (in the compute
    type, for the caller's running-stat update), the running ones in eval. ``seed`` is an
    int64 tensor (batched under vmap) or an int; the mask is indexed by the logical position,
    as in the kernels."""
    ct = compute_dtype(x.dtype)
    shape = (1, x.shape[1]) + (1,) * (x.dim() - 2)
    xc = x.to(ct)
    if training:
        dims = (0,) + tuple(range(2, x.dim()))
        mean = xc.mean(dims)
        var = (xc - mean.view(shape)).square().mean(dims)
    else:
        mean, var = running_mean.to(ct), running_var.to(ct)
    z = (xc - mean.view(shape)) * torch.rsqrt(var + eps).view(shape)
    if weight is not None:
        z = z * weight.to(ct).view(shape)
    if bias is not None:
        z = z + bias.to(ct).view(shape)
    if residual is not None:
        z = z + residual.to(ct)
    y = apply_dropout(activate(z, activation), p, seed)
    return y.to(x.dtype), mean, var
