"""Functional API: argument checks, backend choice, then the autograd Function of the op."""
from __future__ import annotations

import torch

from . import backends
from ._activations import activation_code
from ._checks import check_like, check_probability, check_seed, check_tensor
from ._seed import seed_tensor, unused_seed
from .ops.bias_dropout import BiasDropoutFunction
from .reference.philox import dropout_keep

__all__ = ["bias_dropout", "dropout", "dropout_mask"]


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
        seed: 64-bit seed of the mask (DESIGN.md §3); None draws one from torch's default
            generator. The same seed gives the same mask on every backend and device.
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
    return BiasDropoutFunction.apply(x, bias, residual, p, act, seed_t, backend)


def dropout(x, p: float = 0.5, training: bool = True, seed=None, inplace: bool = False):
    """Dropout with the seeded mask of DESIGN.md §3 (``torch.nn.functional.dropout``'s
    arguments plus ``seed``). With ``training=False`` or ``p == 0`` it returns ``x``."""
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
