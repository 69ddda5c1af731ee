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
from .._activations import NAMES
from .._dtypes import compute_dtype
from ..reference import bias_dropout as ref
from ..reference.philox import apply_dropout
from ._common import Kernels, direct_kernels, extension_call, register_kernels

__all__ = ["BiasDropoutConfig", "BiasDropoutFunction", "run_forward"]

OP = "bias_dropout"
_is_grad_enabled, _is_compiling = torch.is_grad_enabled, torch.compiler.is_compiling


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
    """The non-tensor arguments of ``BiasDropoutFunction`` (checked by its forward)."""
    p: float          # drop probability in [0, 1] (0: no dropout, no seed read)
    activation: int   # a code of fusedreg._activations.ACTIVATIONS
    backend: str      # a name of fusedreg.backends.BACKENDS that implements bias_dropout


def run_forward(x, bias, residual, seed, config: BiasDropoutConfig):
    """``BiasDropoutFunction``'s forward without autograd, for arguments already checked (the
    functional API calls it directly when nothing needs a gradient)."""
    return _kernels(config.backend).fwd(x, bias, residual, config.p, config.activation, seed)


def _kernels(backend: str) -> Kernels:
    """The backend's registered ops; in an eager call the cpu backend's direct-first ones
    (fusedreg.ops._common.direct_kernels)."""
    kernels = backends.implementation(OP, backend)
    return kernels if _is_compiling() else direct_kernels(kernels)


class BiasDropoutFunction(torch.autograd.Function):
    """``BiasDropoutFunction.apply(x, bias, residual, seed, config)``: autograd over the
    registered ops of ``config.backend``; ``seed`` is a 0-dim int64 CPU tensor.
    ``fusedreg.functional.bias_dropout`` checks the arguments and calls it."""

    # forward takes ctx (no setup_context): Function.apply binds the arguments to forward's
    # signature on every call of a Function with a setup_context, which cost more than a small
    # call's kernel. torch.func transforms do not reach this Function (fusedreg.functional
    # routes them to the differentiable composite); torch.compile traces it either way.
    @staticmethod
    def forward(ctx, x, bias, residual, seed, config: BiasDropoutConfig):
        check_config(config)
        kernels = _kernels(config.backend)
        out = kernels.fwd(x, bias, residual, config.p, config.activation, seed)
        ctx.config = config
        ctx.bwd = kernels.bwd  # looked up once, here (the backward is on a small call's path)
        ctx.has_bias = bias is not None
        need_x, need_bias, _, _, _ = ctx.needs_input_grad
        if need_x or need_bias:
            # x and the bias enter the backward only through act'(x + bias); without an
            # activation the bias is kept only for grad_bias's shape and dtype.
            act = config.activation != 0
            ctx.save_for_backward(x if act else None, bias if (act or need_bias) else None, seed)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        need_x, need_bias, need_residual, _, _ = ctx.needs_input_grad
        grad_x = grad_bias = None
        if need_x or need_bias:
            x, bias, seed = ctx.saved_tensors
            cfg = ctx.config
            if _is_grad_enabled():  # create_graph: the gradient must be differentiable
                grad_x, grad_bias = _differentiable_backward(grad_out, x, bias, seed, cfg,
                                                             need_x, need_bias and ctx.has_bias)
                return grad_x, grad_bias, grad_out if need_residual else None, None, None
            grad_x, grad_bias = ctx.bwd(grad_out, x, bias, cfg.p, cfg.activation, seed,
                                        need_bias and ctx.has_bias)
            if not need_x:
                grad_x = None
            if not need_bias:
                grad_bias = None
        return grad_x, grad_bias, grad_out if need_residual else None, None, None


# fusedreg._C.bias_dropout_train: the Function below as a C++ autograd node (csrc/ops.cpp), or None
_CPU_NODE = extension_call("bias_dropout_train")


def apply(x, bias, residual, seed, config: BiasDropoutConfig):
    """``BiasDropoutFunction.apply`` for arguments the functional API checked, in an eager call
    that records a backward: for the cpu backend on plain CPU tensors the same computation as a
    C++ autograd node (``fusedreg._C.bias_dropout_train``: the Python Function's apply and
    backward cost more than a small dropout's kernels); anything else, or a declined call, the
    Function."""
    if _CPU_NODE is not None and config.backend == "cpu":
        out = _CPU_NODE(x, bias, residual, config.p, config.activation, seed)
        if out is not None:
            return out
    return BiasDropoutFunction.apply(x, bias, residual, seed, config)


def check_config(config) -> None:
    """The config's values, for callers of ``BiasDropoutFunction.apply`` that skip the
    functional API's checks: a clear error instead of a kernel given nonsense."""
    if not isinstance(config, BiasDropoutConfig):
        raise TypeError(f"config must be a BiasDropoutConfig, got {type(config).__name__}")
    p, activation, backend = config
    if type(p) is float and 0.0 <= p <= 1.0 and type(activation) is int and activation in NAMES \
            and type(backend) is str:  # what the functional API builds, checked fast
        return
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= p <= 1.0:
        raise ValueError(f"BiasDropoutConfig.p must be a number in [0, 1], got {p!r}")
    if isinstance(activation, bool) or activation not in NAMES:
        raise ValueError(f"BiasDropoutConfig.activation must be one of the codes {sorted(NAMES)} "
                         f"(fusedreg._activations.ACTIVATIONS), got {activation!r}")
    if not isinstance(backend, str):
        raise TypeError(f"BiasDropoutConfig.backend must be a backend name, got {backend!r}")


def _differentiable_backward(grad_out, x, bias, seed, cfg, need_x, need_bias):
    """(grad_x, grad_bias) as differentiable torch ops of grad_out, x and the bias — the
    reference backward (the mask of ``seed`` times act'(x + bias), written out in
    fusedreg/reference/bias_dropout.py: activate_grad) — so that a second backward
    (create_graph=True: gradient penalties, Hessian-vector products) sees its true derivative.
    Written out rather than taken with autograd.grad of the forward, which would return total
    derivatives where x itself depends on the bias."""
    ct = compute_dtype(grad_out.dtype)
    d = apply_dropout(grad_out.to(ct), cfg.p, seed)
    if cfg.activation != 0:
        z = x.to(ct)
        if bias is not None:
            z = z + bias.to(ct)
        d = d * ref.activate_grad(z, cfg.activation)
    grad_x = d.to(grad_out.dtype) if need_x else None
    grad_bias = d.reshape(-1, bias.shape[0]).sum(0).to(bias.dtype) if need_bias else None
    return grad_x, grad_bias
