"""torch.nn modules backed by the fused ops."""
from __future__ import annotations

import torch
from torch import nn

from . import functional as F
from ._activations import activation_code
from ._checks import check_probability

__all__ = ["BiasDropout", "Dropout", "DropoutAddLayerNorm", "LayerNorm", "RMSNorm"]


class _Traceable:
    """torch.jit.script cannot compile these modules (their forward runs Python argument
    checks before a registered op): it raises this error, naming what works instead."""

    def __prepare_scriptable__(self):
        raise RuntimeError(
            f"torch.jit.script cannot compile fusedreg.nn.{type(self).__name__}: its forward "
            "checks arguments in Python before calling a registered custom op. Use "
            "torch.jit.trace, torch.export.export or torch.compile (all supported), or "
            "fusedreg.unpatch(model) before scripting.")


class Dropout(_Traceable, nn.Dropout):
    """Drop-in for ``torch.nn.Dropout`` (same arguments, repr and state) whose mask comes
    from a seed (docs/design.md, "The dropout mask") and is recomputed in backward instead of
    being stored."""

    def __init__(self, p: float = 0.5, inplace: bool = False) -> None:
        check_probability(p)
        super().__init__(p=p, inplace=inplace)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return F.dropout(input, self.p, self.training, inplace=self.inplace)


class BiasDropout(_Traceable, nn.Module):
    """``residual + dropout(act(x + bias))`` with a learned bias of shape (features,)."""

    def __init__(self, features: int, p: float = 0.5, activation=None, device=None, dtype=None) -> None:
        super().__init__()
        if isinstance(features, bool) or not isinstance(features, int) or features <= 0:
            raise ValueError(f"features must be a positive int, got {features!r}")
        self.p = check_probability(p)
        activation_code(activation)
        self.activation = activation
        self.bias = nn.Parameter(torch.zeros(features, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        bias = self.bias if self.bias.dtype == x.dtype else self.bias.to(x.dtype)
        return F.bias_dropout(x, bias, residual, p=self.p, training=self.training,
                              activation=self.activation)

    def extra_repr(self) -> str:
        return f"{self.bias.shape[0]}, p={self.p}, activation={self.activation!r}"


class LayerNorm(_Traceable, nn.LayerNorm):
    """Drop-in for ``torch.nn.LayerNorm``: same constructor, parameters and ``state_dict``
    (a state dict moves between the two either way), forward by ``fusedreg.functional.layer_norm``."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(input, self.normalized_shape, self.weight, self.bias, self.eps)


class RMSNorm(_Traceable, nn.RMSNorm):
    """Drop-in for ``torch.nn.RMSNorm`` (eps=None means the epsilon of the compute type,
    float32's for float16/bfloat16/float32 input, as torch's)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, self.normalized_shape, self.weight, self.eps)


class DropoutAddLayerNorm(_Traceable, nn.Module):
    """``norm(residual + dropout(x))`` with a learned weight (and bias, unless ``rms``);
    ``forward(x, residual=None)`` returns y, or (y, h) with ``prenorm=True`` where h is the
    sum before the norm (the next block's residual). See
    ``fusedreg.functional.dropout_add_layer_norm``."""

    def __init__(self, normalized_shape, p: float = 0.0, eps: float = 1e-5, prenorm: bool = False,
                 rms: bool = False, residual_in_fp32: bool = False, device=None, dtype=None) -> None:
        super().__init__()
        if isinstance(normalized_shape, int) and not isinstance(normalized_shape, bool):
            normalized_shape = (normalized_shape,)
        self.normalized_shape = tuple(normalized_shape)
        if not self.normalized_shape or any(
                isinstance(d, bool) or not isinstance(d, int) or d < 0 for d in self.normalized_shape):
            raise ValueError(f"normalized_shape must be a non-empty tuple of ints >= 0, got {normalized_shape!r}")
        self.p = check_probability(p)
        self.eps = eps
        self.prenorm, self.rms, self.residual_in_fp32 = prenorm, rms, residual_in_fp32
        self.weight = nn.Parameter(torch.ones(self.normalized_shape, device=device, dtype=dtype))
        if rms:
            self.register_parameter("bias", None)
        else:
            self.bias = nn.Parameter(torch.zeros(self.normalized_shape, device=device, dtype=dtype))

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        return F.dropout_add_layer_norm(x, residual, self.weight, self.bias, p=self.p, eps=self.eps,
                                        training=self.training, prenorm=self.prenorm, rms=self.rms,
                                        residual_in_fp32=self.residual_in_fp32)

    def extra_repr(self) -> str:
        return (f"{self.normalized_shape}, p={self.p}, eps={self.eps}, prenorm={self.prenorm}, "
                f"rms={self.rms}, residual_in_fp32={self.residual_in_fp32}")
