"""Argument checks shared by the functional API, modules and optimizers.

Every check runs before any kernel, and raises ValueError (bad value or shape) or TypeError
(bad type or dtype) with a message that names the argument.
"""
from __future__ import annotations

import math
import numbers

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_tensor(t, name: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {t.dtype}")
    if t.layout != torch.strided:
        raise TypeError(f"{name} must be a dense (strided) tensor, got layout {t.layout}")


def check_like(t, name: str, ref: torch.Tensor, ref_name: str, shape=None, same_dtype=True) -> None:
    """``t`` is a float tensor on ref's device (and of ref's dtype), of ``shape`` if given."""
    check_tensor(t, name)
    if t.device != ref.device:
        raise ValueError(f"{name} must be on the device of {ref_name} ({ref.device}), got {t.device}")
    if same_dtype and t.dtype != ref.dtype:
        raise TypeError(f"{name} has dtype {t.dtype} but {ref_name} has dtype {ref.dtype}")
    if shape is not None and tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(t.shape)}")


def check_number(value, name: str, *, low=None, high=None, low_open=False, high_open=False) -> float:
    """A finite real number in the given range; returns it as a float."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    if low is not None and (value < low or (low_open and value == low)):
        raise ValueError(f"{name} must be {'>' if low_open else '>='} {low}, got {value}")
    if high is not None and (value > high or (high_open and value == high)):
        raise ValueError(f"{name} must be {'<' if high_open else '<='} {high}, got {value}")
    return value


def check_probability(p, name: str = "p") -> float:
    if isinstance(p, bool) or not isinstance(p, numbers.Real) or math.isnan(float(p)):
        raise ValueError(f"dropout probability {name} must be a number in [0, 1], got {p!r}")
    return check_number(p, name, low=0.0, high=1.0)


def check_seed(seed) -> None:
    if seed is None:
        return
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise TypeError(f"seed must be an int or None, got {type(seed).__name__}")
    if not -(2**63) <= int(seed) < 2**64:
        raise ValueError(f"seed must fit in 64 bits ([-2**63, 2**64)), got {seed}")
