"""Functional API: argument checks, backend choice, then the autograd Function of the op."""
from __future__ import annotations

import math
import numbers

import torch

from . import backends
from ._activations import activation_code
from ._checks import (check_like, check_norm_param, check_normalized_shape, check_number,
                      check_probability, check_seed, check_tensor)
from ._seed import seed_tensor, unused_seed
from .ops.bias_dropout import BiasDropoutConfig, BiasDropoutFunction
from .ops.layer_norm import LayerNormConfig, LayerNormFunction
from .reference.philox import dropout_keep

__all__ = ["bias_dropout", "dropout", "dropout_add_layer_norm", "dropout_mask", "layer_norm",
           "rms_norm"]
__all__ += ["batch_norm", "batch_norm_act"]


def bias_dropout(x, bias=None, residual=None, p: float = 0.5, training: bool = True,
                 activation=None, seed=None):
    """``residual + dropout(act(x + bias), p)`` in one pass, forward and backward.

    Args:
        x: input of any shape (..., N), float16/bfloat16/float32/float64.
        bias: optional (N,) tensor added over the last dimension before the activation.
        residual: optional tensor of x's shape added after dropout.
        p: drop probability in [0, 1]; kept values are scaled by 1 / (1 - p).
        training: if False, no dropout (the mask is not drawn).
        activation: None, "relu", "gelu", "gelu_tanh" or "silu".
        seed: 64-bit seed of the mask (docs/design.md, "The dropout mask"); None draws one
            from torch's default generator. The same seed gives the same mask on every
            backend and device.
    """
    check_tensor(x, "x")
    p = check_probability(p)
    act = activation_code(activation)
    check_seed(seed)
    if bias is not None:
        if x.dim() == 0:
            raise ValueError("x must have at least one dimension when a bias is given")
        check_like(bias, "bias", x, "x", shape=(x.shape[-1],))
    if residual is not None:
        check_like(residual, "residual", x, "x", shape=x.shape)
    if not training:
        p = 0.0
    seed_t = seed_tensor(seed) if p > 0.0 else unused_seed()
    backend = backends.resolve("bias_dropout", x.device)
    return BiasDropoutFunction.apply(x, bias, residual, seed_t, BiasDropoutConfig(p, act, backend))


def dropout(x, p: float = 0.5, training: bool = True, seed=None, inplace: bool = False):
    """Dropout with the seeded mask (docs/design.md, "The dropout mask"):
    ``torch.nn.functional.dropout``'s arguments plus ``seed``. With ``training=False`` or
    ``p == 0`` it returns ``x``."""
    check_tensor(x, "x")
    p = check_probability(p)
    check_seed(seed)
    if not training or p == 0.0:
        return x
    out = bias_dropout(x, p=p, training=True, seed=seed)
    if inplace:
        return x.copy_(out)
    return out


def dropout_mask(shape, p: float, seed: int) -> torch.Tensor:
    """The boolean keep mask that every backend uses for a tensor of ``shape`` (CPU tensor)."""
    p = check_probability(p)
    check_seed(seed)
    if seed is None:
        raise TypeError("dropout_mask needs an explicit seed")
    return dropout_keep(tuple(shape), p, seed)


# ---- LayerNorm, RMSNorm, dropout + residual + norm --------------------------------------------

def _norm_params(x, weight, bias, shape):
    if weight is not None:
        check_norm_param(weight, "weight", x, shape)
    if bias is not None:
        check_norm_param(bias, "bias", x, shape)
        if weight is not None and bias.dtype != weight.dtype:
            raise TypeError(f"bias has dtype {bias.dtype} but weight has dtype {weight.dtype}")


def _norm_eps(eps, x):
    if eps is None:
        return float(torch.finfo(x.dtype).eps)
    if isinstance(eps, numbers.Real) and not isinstance(eps, bool) and math.isnan(float(eps)):
        raise ValueError("eps must be a positive number, got nan")
    return check_number(eps, "eps", low=0.0, low_open=True)


def layer_norm(x, normalized_shape, weight=None, bias=None, eps: float = 1e-5):
    """``torch.nn.functional.layer_norm`` (same arguments and result) in one fused pass
    forward and one backward. weight and bias have x's dtype, or float32 with float16/bfloat16
    x; the output has x's dtype."""
    return _norm(x, normalized_shape, weight, bias, eps, rms=False)


def rms_norm(x, normalized_shape, weight=None, eps=None):
    """``torch.nn.functional.rms_norm``: eps=None means ``torch.finfo(x.dtype).eps``."""
    return _norm(x, normalized_shape, weight, None, eps, rms=True)


def _norm(x, normalized_shape, weight, bias, eps, rms: bool):
    """layer_norm / rms_norm: the norm of x alone (no residual, no dropout)."""
    check_tensor(x, "x")
    shape = check_normalized_shape(normalized_shape, x)
    _norm_params(x, weight, bias, shape)
    eps = _norm_eps(eps, x)
    config = LayerNormConfig(len(shape), eps, 0.0, rms, x.dtype, False,
                             backends.resolve("layer_norm", x.device))
    return LayerNormFunction.apply(x, None, weight, bias, unused_seed(), config)[0]


def dropout_add_layer_norm(x, residual, weight, bias, p: float = 0.0, eps: float = 1e-5,
                           training: bool = True, prenorm: bool = False, rms: bool = False,
                           residual_in_fp32: bool = False, seed=None):
    """h = residual + dropout(x, p); y = norm(h) * weight + bias, in one pass forward and one
    backward; the mask is the seeded one (docs/design.md, "The dropout mask"), recomputed in
    backward.

    The norm runs over weight's shape (bias's if weight is None, else x's last dim); residual
    (optional) has x's shape and x's dtype or float32. h has residual's dtype (x's without a
    residual), float32 with ``residual_in_fp32`` (float64 stays float64); y has x's dtype.
    ``rms=True`` gives RMSNorm (a bias is still added if given). Returns y, or (y, h) with
    ``prenorm=True`` so that h can be the next block's residual.
    """
    check_tensor(x, "x")
    p = check_probability(p)
    check_seed(seed)
    for flag, name in ((training, "training"), (prenorm, "prenorm"), (rms, "rms"),
                       (residual_in_fp32, "residual_in_fp32")):
        if not isinstance(flag, bool):
            raise TypeError(f"{name} must be a bool, got {type(flag).__name__}")
    for t, name in ((weight, "weight"), (bias, "bias")):
        if t is not None:
            check_tensor(t, name)
    ref = weight if weight is not None else bias
    shape = check_normalized_shape(tuple(ref.shape) if ref is not None else x.shape[-1:], x)
    _norm_params(x, weight, bias, shape)
    if residual is not None:
        check_norm_param(residual, "residual", x, x.shape)
    eps = _norm_eps(eps, x)
    if not training:
        p = 0.0
    h_dtype = residual.dtype if residual is not None else x.dtype
    if residual_in_fp32 and h_dtype != torch.float64:
        h_dtype = torch.float32
    seed_t = seed_tensor(seed) if p > 0.0 else unused_seed()
    config = LayerNormConfig(len(shape), eps, p, rms, h_dtype, prenorm,
                             backends.resolve("layer_norm", x.device))
    y, h, _, _ = LayerNormFunction.apply(x, residual, weight, bias, seed_t, config)
    return (y, h) if prenorm else y


# ---- BatchNorm, alone and fused with residual add, activation and dropout ---------------------

def batch_norm(input, running_mean, running_var, weight=None, bias=None, training: bool = False,
               momentum: float = 0.1, eps: float = 1e-5):
    """``torch.nn.functional.batch_norm`` (same arguments and result): per-channel statistics
    of input (N, C, *spatial) — the batch's in training (fp32 accumulation, running stats
    updated in place with the unbiased variance: r ← (1 − momentum)·r + momentum·stat), the
    running ones in eval, where they fold into one scale and shift per channel. Contiguous and
    channels-last inputs (y keeps the channels-last layout); float16/bfloat16 input with
    float32 (or input-dtype) parameters and running stats."""
    return _batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps,
                       None, None, 0.0, None)


def batch_norm_act(input, running_mean, running_var, weight=None, bias=None,
                   training: bool = False, momentum: float = 0.1, eps: float = 1e-5,
                   activation=None, residual=None, p: float = 0.0, seed=None):
    """``dropout(act(batch_norm(input) + residual), p)`` in one pass forward (two in training:
    the statistics, then the rest) and two backward, in this order: normalize with the
    batch (or running) statistics, scale and shift by weight and bias, add ``residual``
    (x's shape and dtype, optional), apply ``activation`` (None, "relu", "silu", "gelu",
    "gelu_tanh"), then dropout with drop probability ``p`` (training only; the seeded mask of
    docs/design.md, "The dropout mask", recomputed in backward, indexed by the logical NCHW
    position whatever the memory layout). ResNet's ``relu(bn(x) + identity)`` is
    ``activation="relu", residual=identity``; timm's ``BatchNormAct2d`` (bn, then its drop
    layer, then the activation) is this with residual=None where drop and activation commute
    (dropout with relu or no activation). Arguments and running-stat update as
    ``batch_norm``."""
    return _batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps,
                       activation, residual, p, seed)


def _check_batch_norm(x, running_mean, running_var, weight, bias, training, momentum, eps,
                      residual):
    """Every check of batch_norm / batch_norm_act, with torch's messages where torch has one.
    Returns (momentum, eps) as floats."""
    check_tensor(x, "input")
    if x.dim() < 2:
        raise ValueError(f"batch_norm expects an input of shape (N, C, ...) with at least 2 "
                         f"dimensions, got {tuple(x.shape)}")
    if not isinstance(training, bool):
        raise TypeError(f"training must be a bool, got {type(training).__name__}")
    C = x.shape[1]
    if (running_mean is None) != (running_var is None):
        raise ValueError("running_mean and running_var must either both be None or neither be None")
    if running_mean is None and not training:
        raise ValueError("running_mean must be defined in evaluation mode")
    for t, name in ((running_mean, "running_mean"), (running_var, "running_var"),
                    (weight, "weight"), (bias, "bias")):
        if t is not None:
            check_tensor(t, name)
            if t.numel() != C or t.dim() != 1:
                raise ValueError(f"{name} should contain {C} elements (shape ({C},)), got shape "
                                 f"{tuple(t.shape)}")
            check_norm_param(t, name, x, (C,))
    if residual is not None:
        check_like(residual, "residual", x, "input", shape=x.shape)
    if momentum is None:
        raise TypeError("momentum must be a float, not None (modules pass 1 / num_batches_tracked "
                        "for a cumulative average)")
    momentum = check_number(momentum, "momentum")
    eps = check_number(eps, "eps")
    if training and eps <= 0:
        raise ValueError(f"batch_norm eps must be positive during training, but got {eps}")
    if eps < 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    if training and x.numel() > 0 and x.numel() // max(C, 1) == 1:
        raise ValueError(f"Expected more than 1 value per channel when training, got input size "
                         f"{x.shape}")
    return momentum, eps


def _update_running(running_mean, running_var, mean, var, count, momentum):
    """r ← (1 − momentum)·r + momentum·stat, with the unbiased variance, in the compute type."""
    with torch.no_grad():
        unbiased = var * (count / (count - 1)) if count > 1 else var
        for r, stat in ((running_mean, mean), (running_var, unbiased)):
            r.copy_((r.to(stat.dtype) * (1.0 - momentum) + stat * momentum).to(r.dtype))


def _batch_norm(x, running_mean, running_var, weight, bias, training, momentum, eps,
                activation, residual, p, seed, process_group=None):
    """batch_norm / batch_norm_act, and SyncBatchNorm's forward when ``process_group`` is
    given (training: statistics over every rank's batch)."""
    from .ops.batch_norm import BatchNormConfig, batch_norm_act as fused

    momentum, eps = _check_batch_norm(x, running_mean, running_var, weight, bias, training,
                                      momentum, eps, residual)
    act = activation_code(activation)
    p = check_probability(p)
    check_seed(seed)
    if not training:
        p = 0.0
    seed_t = seed_tensor(seed) if p > 0.0 else unused_seed()
    config = BatchNormConfig(training, eps, act, p, backends.resolve("batch_norm", x.device))
    y, mean, var, count = fused(x, residual, weight, bias, running_mean, running_var, seed_t,
                                config, process_group if training else None)
    if training and running_mean is not None and count > 0:
        _update_running(running_mean, running_var, mean, var, count, momentum)
    return y
