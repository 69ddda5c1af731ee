"""bias_dropout: out = residual + dropout(act(x + bias)) — the registered forward/backward ops
of every backend and ``BiasDropoutFunction``, the autograd Function over them.

Ops: ``fusedreg::bias_dropout_fwd`` / ``_bwd`` (C++, schemas in csrc/ops.cpp) serve the cpu and
cuda backends; ``fusedreg::bias_dropout_fwd_reference`` / ``_triton`` (and ``_bwd_…``) are
made from the one Python declaration below. Backward saves x (only with an activation), the
bias and the 8-byte seed: never a mask.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import Tensor

from .. import backends
from ..reference import bias_dropout as ref
from ._common import Kernels, register_kernels  # noqa: F401  (Kernels: what is registered)

__all__ = ["BiasDropoutConfig", "BiasDropoutFunction"]

OP = "bias_dropout"


def bias_dropout_fwd(x: Tensor, bias: Optional[Tensor], residual: Optional[Tensor], p: float,
                     activation: int, seed: Tensor) -> Tensor:
    """residual + dropout(act(x + bias), p) with the mask of ``seed`` (a 0-dim int64 CPU
    tensor); bias (N,) over x's last dim; ``activation`` a code of fusedreg._activations."""


def bias_dropout_bwd(grad_out: Tensor, x: Optional[Tensor], bias: Optional[Tensor], p: float,
                     activation: int, seed: Tensor, need_grad_bias: bool) -> tuple[Tensor, Tensor]:
    """(grad_x, grad_bias); x is needed only with an activation; grad_bias is empty unless
    ``need_grad_bias``."""


def _fwd_fake(x, bias, residual, p, activation, seed):
    torch._check(bias is None or bias.shape == (x.shape[-1],), lambda: "bias must have shape (N,)")
    torch._check(residual is None or residual.shape == x.shape, lambda: "residual must match x")
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _bwd_fake(grad_out, x, bias, p, activation, seed, need_grad_bias):
    gx = torch.empty_like(grad_out, memory_format=torch.contiguous_format)
    gb = torch.empty_like(bias) if need_grad_bias else grad_out.new_empty(0)
    return gx, gb


register_kernels(OP, bias_dropout_fwd, bias_dropout_bwd, ref, fwd_fake=_fwd_fake,
                 bwd_fake=_bwd_fake)
if backends.extension_available():
    torch.library.register_fake("fusedreg::dropout_uniform")(
        lambda seed, start, count, device_like: device_like.new_empty((count,), dtype=torch.float32))


class BiasDropoutConfig(NamedTuple):
    """The non-tensor arguments of ``BiasDropoutFunction``."""
    p: float          # drop probability in [0, 1] (0: no dropout, no seed read)
    activation: int   # a code of fusedreg._activations.ACTIVATIONS
    backend: str      # a name of fusedreg.backends.BACKENDS that implements bias_dropout


class BiasDropoutFunction(torch.autograd.Function):
    """``BiasDropoutFunction.apply(x, bias, residual, seed, config)``: autograd over the
    registered ops of ``config.backend``; ``seed`` is a 0-dim int64 CPU tensor.
    ``fusedreg.functional.bias_dropout`` checks the arguments and calls it."""

    @staticmethod
    def forward(x, bias, residual, seed, config: BiasDropoutConfig):
        fwd = backends.implementation(OP, config.backend).fwd
        return fwd(x, bias, residual, config.p, config.activation, seed)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, bias, residual, seed, config = inputs
        ctx.config = config
        ctx.has_bias = bias is not None
        need_x, need_bias = ctx.needs_input_grad[:2]
        if not (need_x or need_bias):
            return
        # x and the bias enter the backward only through act'(x + bias); without an
        # activation the bias is kept only for grad_bias's shape and dtype.
        act = config.activation != 0
        ctx.save_for_backward(x if act else None, bias if (act or need_bias) else None, seed)

    @staticmethod
    def backward(ctx, grad_out):
        need_x, need_bias, need_residual = ctx.needs_input_grad[:3]
        grad_x = grad_bias = None
        if need_x or need_bias:
            x, bias, seed = ctx.saved_tensors
            cfg = ctx.config
            bwd = backends.implementation(OP, cfg.backend).bwd
            grad_x, grad_bias = bwd(grad_out, x, bias, cfg.p, cfg.activation, seed,
                                    bool(need_bias and ctx.has_bias))
            grad_x = grad_x if need_x else None
            grad_bias = grad_bias if need_bias else None
        return grad_x, grad_bias, grad_out if need_residual else None, None, None
