"""Argument checks shared by the functional API, modules and optimizers.

Every check runs before any kernel, and raises ValueError (bad value or shape) or TypeError
(bad type or dtype) with a message that names the argument. Where torch's own op raises
RuntimeError for the same input (a norm's shape or dtype mismatch), the error is also a
RuntimeError (``ShapeError``, ``DTypeError``), so that code catching either type works.
"""
from __future__ import annotations

import math
import numbers

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


_PLAIN = (torch.Tensor, torch.nn.Parameter)


class ShapeError(ValueError, RuntimeError):
    """A shape that does not fit: a ValueError, and a RuntimeError as torch raises."""


class DTypeError(TypeError, RuntimeError):
    """A dtype combination the op does not take: a TypeError, and a RuntimeError as torch
    raises (``layer_norm`` with a weight of another dtype)."""


def is_symbolic(value) -> bool:
    """A SymInt/SymFloat/SymBool (torch.compile with dynamic shapes or values): its value is
    not known while tracing, so the checks of Python numbers cannot run on it."""
    return isinstance(value, (torch.SymInt, torch.SymFloat, torch.SymBool))


def check_tensor(t, name: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {t.dtype}")
    if t.layout != torch.strided:
        raise TypeError(f"{name} must be a dense (strided) tensor, got layout {t.layout}")


def check_like(t, name: str, ref: torch.Tensor, ref_name: str, shape=None, same_dtype=True) -> None:
    """``t`` is a float tensor on ref's device (and of ref's dtype), of ``shape`` if given."""
    if type(t) in _PLAIN and t.is_cpu and ref.is_cpu and t.layout == torch.strided \
            and t.dtype in FLOAT_DTYPES and (not same_dtype or t.dtype == ref.dtype) \
            and (shape is None or t.shape == shape):  # the common case (CPU), checked fast
        return
    check_tensor(t, name)
    if t.device != ref.device:
        raise ValueError(f"{name} must be on the device of {ref_name} ({ref.device}), got {t.device}")
    if same_dtype and t.dtype != ref.dtype:
        raise TypeError(f"{name} has dtype {t.dtype} but {ref_name} has dtype {ref.dtype}")
    if shape is not None and tuple(t.shape) != tuple(shape):
        raise ShapeError(f"{name} must have shape {tuple(shape)}, got {tuple(t.shape)}")


def check_number(value, name: str, *, low=None, high=None, low_open=False, high_open=False) -> float:
    """A finite real number in the given range; returns it as a float. Written with
    comparisons only (no math.isfinite), so that torch.compile traces it with a symbolic
    value (dynamic=True) as guards instead of a graph break."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    try:
        value = float(value)
    except OverflowError:  # an int beyond float's range (10**400)
        raise ValueError(f"{name} must be finite, got an int of {int(value).bit_length()} bits") from None
    if not -math.inf < value < math.inf:  # also nan
        raise ValueError(f"{name} must be finite, got {value}")
    if low is not None and (value < low or (low_open and value == low)):
        raise ValueError(f"{name} must be {'>' if low_open else '>='} {low}, got {value}")
    if high is not None and (value > high or (high_open and value == high)):
        raise ValueError(f"{name} must be {'<' if high_open else '<='} {high}, got {value}")
    return value


def check_probability(p, name: str = "p") -> float:
    if type(p) is float and 0.0 <= p <= 1.0:  # the common case, checked fast
        return p
    if is_symbolic(p):  # traced with a symbolic value: checked when the graph was made eager
        return p
    msg = f"dropout probability {name} must be a number in [0, 1], got {p!r}"
    if isinstance(p, bool) or not isinstance(p, numbers.Real):
        raise ValueError(msg)
    try:
        value = float(p)
    except OverflowError:  # 10**400: out of float's range, so out of [0, 1]
        raise ValueError(msg) from None
    if not 0.0 <= value <= 1.0:  # also nan
        raise ValueError(msg)
    return value


def check_bool(flag, name: str) -> bool:
    """One rule for flags (``training``, ``prenorm``, ...): a bool, as torch's dropout requires
    of ``training``; anything else is a TypeError."""
    if not isinstance(flag, bool):
        raise TypeError(f"{name} must be a bool, got {type(flag).__name__}")
    return flag


def check_seed(seed) -> None:
    if seed is None:
        return
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise TypeError(f"seed must be an int or None, got {type(seed).__name__}")
    if not -(2**63) <= int(seed) < 2**64:
        raise ValueError(f"seed must fit in 64 bits ([-2**63, 2**64)), got {seed}")


def check_normalized_shape(normalized_shape, x: torch.Tensor) -> tuple:
    """normalized_shape (an int or a sequence of ints) as a tuple matching x's trailing dims."""
    if type(normalized_shape) is tuple and normalized_shape:  # the common case, checked fast
        n = len(normalized_shape)
        if n == 1:
            if type(normalized_shape[0]) is int and x.dim() >= 1 \
                    and x.shape[-1] == normalized_shape[0]:
                return normalized_shape
        elif n <= x.dim() and all(type(d) is int for d in normalized_shape) \
                and x.shape[x.dim() - n:] == normalized_shape:
            return normalized_shape
    if isinstance(normalized_shape, bool):
        raise TypeError("normalized_shape must be an int or a sequence of ints, got bool")
    if isinstance(normalized_shape, numbers.Integral):
        normalized_shape = (normalized_shape,)
    try:
        shape = tuple(normalized_shape)
    except TypeError:
        raise TypeError("normalized_shape must be an int or a sequence of ints, "
                        f"got {type(normalized_shape).__name__}") from None
    if any(isinstance(d, bool) or not isinstance(d, (numbers.Integral, torch.SymInt)) for d in shape):
        raise TypeError(f"normalized_shape must hold ints, got {shape!r}")
    shape = tuple(d if isinstance(d, torch.SymInt) else int(d) for d in shape)
    if len(shape) == 0:
        raise ShapeError("normalized_shape must have at least one dimension")
    if len(shape) > x.dim() or tuple(x.shape[x.dim() - len(shape):]) != shape:
        raise ShapeError(f"normalized_shape {shape} does not match the trailing dimensions of "
                         f"the input of shape {tuple(x.shape)}")
    return shape


def check_norm_param(t, name: str, x: torch.Tensor, shape) -> None:
    """A norm weight/bias (or residual, with shape=x.shape): on x's device, of ``shape``, of
    x's dtype or float32 when x is float16/bfloat16 (fp32 master weights, fp32 residuals)."""
    if type(t) in _PLAIN and t.dtype == x.dtype and t.layout == torch.strided and t.shape == shape \
            and ((t.is_cpu and x.is_cpu) or t.device == x.device):
        return  # the common case (x's dtype and device), checked fast; CPU without torch.device
    check_like(t, name, x, "x", shape=shape, same_dtype=False)
    if t.dtype != x.dtype and not (t.dtype == torch.float32 and x.dtype in (torch.float16, torch.bfloat16)):
        raise DTypeError(f"{name} has dtype {t.dtype} but x has dtype {x.dtype}; expected "
                        f"{x.dtype}" + (" or float32" if x.dtype in (torch.float16, torch.bfloat16) else ""))
