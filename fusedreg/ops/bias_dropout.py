"""bias_dropout: registered forward/backward ops per backend and ``BiasDropoutFunction``.

out = residual + dropout(act(x + bias)). Ops per backend:
  reference  fusedreg::bias_dropout_fwd_reference / _bwd_reference (Python custom ops)
  triton     fusedreg::bias_dropout_fwd_triton / _bwd_triton       (Python custom ops)
  cpu, cuda  fusedreg::bias_dropout_fwd / _bwd                      (C++, csrc/ops.cpp)
Backward saves x (only with an activation), the bias and the 8-byte seed: never a mask.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .._seed import seed_value
from ..reference import bias_dropout as ref
from ._common import cpp_ops, register, triton_available

OP = "bias_dropout"


def _fwd_fake(x, bias, residual, p, activation, seed):
    torch._check(bias is None or bias.shape == (x.shape[-1],), lambda: "bias must have shape (N,)")
    torch._check(residual is None or residual.shape == x.shape, lambda: "residual must match x")
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _bwd_fake(grad_out, x, bias, p, activation, seed, need_grad_bias):
    gx = torch.empty_like(grad_out, memory_format=torch.contiguous_format)
    gb = torch.empty_like(bias) if need_grad_bias else grad_out.new_empty(0)
    return gx, gb


@torch.library.custom_op("fusedreg::bias_dropout_fwd_reference", mutates_args=())
def _fwd_reference(x: Tensor, bias: Optional[Tensor], residual: Optional[Tensor], p: float,
                   activation: int, seed: Tensor) -> Tensor:
    return ref.bias_dropout_fwd(x, bias, residual, p, activation, seed_value(seed))


@torch.library.custom_op("fusedreg::bias_dropout_bwd_reference", mutates_args=())
def _bwd_reference(grad_out: Tensor, x: Optional[Tensor], bias: Optional[Tensor], p: float,
                   activation: int, seed: Tensor, need_grad_bias: bool) -> tuple[Tensor, Tensor]:
    return ref.bias_dropout_bwd(grad_out, x, bias, p, activation, seed_value(seed), need_grad_bias)


_fwd_reference.register_fake(_fwd_fake)
_bwd_reference.register_fake(_bwd_fake)
_IMPLS = {"reference": (_fwd_reference, _bwd_reference)}

if triton_available():
    @torch.library.custom_op("fusedreg::bias_dropout_fwd_triton", mutates_args=())
    def _fwd_triton(x: Tensor, bias: Optional[Tensor], residual: Optional[Tensor], p: float,
                    activation: int, seed: Tensor) -> Tensor:
        from ..triton import bias_dropout as tri

        return tri.bias_dropout_fwd(x, bias, residual, p, activation, seed_value(seed))

    @torch.library.custom_op("fusedreg::bias_dropout_bwd_triton", mutates_args=())
    def _bwd_triton(grad_out: Tensor, x: Optional[Tensor], bias: Optional[Tensor], p: float,
                    activation: int, seed: Tensor, need_grad_bias: bool) -> tuple[Tensor, Tensor]:
        from ..triton import bias_dropout as tri

        return tri.bias_dropout_bwd(grad_out, x, bias, p, activation, seed_value(seed), need_grad_bias)

    _fwd_triton.register_fake(_fwd_fake)
    _bwd_triton.register_fake(_bwd_fake)
    _IMPLS["triton"] = (_fwd_triton, _bwd_triton)

_cpp = cpp_ops("bias_dropout_fwd", "bias_dropout_bwd")
if _cpp is not None:
    torch.library.register_fake("fusedreg::bias_dropout_fwd")(_fwd_fake)
    torch.library.register_fake("fusedreg::bias_dropout_bwd")(_bwd_fake)
    _IMPLS["cpu"] = _IMPLS["cuda"] = _cpp

OPS: dict = {}
register(OP, OPS, _IMPLS)


class BiasDropoutFunction(torch.autograd.Function):
    """Autograd over the registered ops of one backend.

    ``BiasDropoutFunction.apply(x, bias, residual, p, activation, seed, backend)`` with
    ``activation`` a code of ``fusedreg._activations.ACTIVATIONS``, ``seed`` a 0-dim int64 CPU
    tensor and ``backend`` a name from ``fusedreg.backends.BACKENDS``;
    ``fusedreg.functional.bias_dropout`` checks the arguments and calls it.
    """

    @staticmethod
    def forward(x, bias, residual, p, activation, seed, backend):
        fwd, _ = OPS[backend]
        return fwd(x, bias, residual, p, activation, seed)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, bias, residual, p, activation, seed, backend = inputs
        ctx.p, ctx.activation, ctx.backend = p, activation, backend
        ctx.has_bias = bias is not None
        ctx.save_for_backward(x if activation != 0 else None, bias, seed)

    @staticmethod
    def backward(ctx, grad_out):
        x, bias, seed = ctx.saved_tensors
        need_x, need_bias, need_residual = ctx.needs_input_grad[:3]
        grad_x = grad_bias = None
        if need_x or need_bias:
            _, bwd = OPS[ctx.backend]
            grad_x, grad_bias = bwd(grad_out, x, bias, ctx.p, ctx.activation, seed,
                                    bool(need_bias and ctx.has_bias))
            grad_x = grad_x if need_x else None
            grad_bias = grad_bias if need_bias else None
        grad_residual = grad_out if need_residual else None
        return grad_x, grad_bias, grad_residual, None, None, None, None


if _cpp is not None:
    @torch.library.register_fake("fusedreg::dropout_uniform")
    def _uniform_fake(seed, start, count, device_like):
        return device_like.new_empty((count,), dtype=torch.float32)
