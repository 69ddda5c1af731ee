"""torch.nn modules backed by the fused ops."""
from __future__ import annotations

import torch
from torch import nn

from . import functional as F
from ._activations import activation_code
from ._checks import check_probability

__all__ = ["Dropout", "BiasDropout"]


class Dropout(nn.Dropout):
    """Drop-in for ``torch.nn.Dropout`` (same arguments, repr and state) whose mask comes
    from a seed (DESIGN.md §3) and is recomputed in backward instead of being stored."""

    def __init__(self, p: float = 0.5, inplace: bool = False) -> None:
        check_probability(p)
        super().__init__(p=p, inplace=inplace)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return F.dropout(input, self.p, self.training, inplace=self.inplace)


class BiasDropout(nn.Module):
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
