"""Functional API: argument checks, backend choice, then the autograd Function of the op.

Other paths leave the Function aside, each computing the same thing (``_route``):
- when no operand needs a gradient (no_grad, inference), the registered forward op alone;
- under torch.func transforms (vmap, grad, jacrev, jacfwd, hessian, functional_call with
  wrapped tensors) and forward-mode AD (``torch.autograd.forward_ad``), a differentiable
  composite of the reference math with the same seeded mask; the seed is drawn with a torch
  random op, so vmap's ``randomness`` rules apply to it as to torch's dropout;
- under a ``__torch_function__`` override (fx symbolic tracing, tensor subclasses, modes), the
  call is handed to it, so an fx graph calls these functions.
"""
from __future__ import annotations

import math
import numbers

import torch
from torch.overrides import handle_torch_function, has_torch_function_variadic

from . import backends
from ._activations import ACTIVATIONS as _ACTIVATION_CODES
from ._activations import activation_code
from ._checks import (DTypeError, ShapeError, check_bool, check_like, check_norm_param,
                      check_normalized_shape, check_number, check_probability, check_seed,
                      check_tensor, is_symbolic)
from ._dtypes import compute_dtype
from ._seed import _UNUSED as _UNUSED_SEED
from ._seed import seed_tensor, unused_seed
from .ops.batch_norm import BatchNormConfig as _BatchNormConfig
from .ops.batch_norm import _CPU_EVAL as _BN_EVAL
from .ops.batch_norm import _CPU_TRAIN as _BN_TRAIN
from .ops.batch_norm import batch_norm_act as _batch_norm_fused
from .ops.batch_norm import node_serves as _bn_node_serves
from .ops.bias_dropout import BiasDropoutConfig, BiasDropoutFunction
from .ops.bias_dropout import apply as _bias_dropout_apply
from .ops.bias_dropout import run_forward as _bias_dropout_forward
from .ops.layer_norm import LayerNormConfig, LayerNormFunction
from .ops.layer_norm import apply as _layer_norm_apply
from .ops.layer_norm import node_serves as _layer_norm_node_serves
from .ops.layer_norm import run_forward as _layer_norm_forward
from .reference import batch_norm as _ref_batch_norm
from .reference import bias_dropout as _ref_bias_dropout
from .reference import layer_norm as _ref_layer_norm
from .reference.philox import dropout_keep

__all__ = ["bias_dropout", "dropout", "dropout_add_layer_norm", "dropout_mask", "layer_norm",
           "rms_norm"]
__all__ += ["batch_norm", "batch_norm_act"]

try:
    from torch._C._functorch import is_functorch_wrapped_tensor as _is_functorch_wrapped
except ImportError:  # pragma: no cover - every supported torch has it
    def _is_functorch_wrapped(t):
        return False
from torch.autograd import forward_ad as _forward_ad

try:
    from torch._C._functorch import maybe_current_level as _functorch_level
except ImportError:  # pragma: no cover - every supported torch has it
    def _functorch_level():
        return None

_Tensor, _F32, _F64 = torch.Tensor, torch.float32, torch.float64
_BF16, _F16 = torch.bfloat16, torch.float16
_autocast_on = torch.is_autocast_enabled
_INF = math.inf
# bound once: _torch_small_norm's budget is about a microsecond (Dynamo knows these functions
# by identity, whatever name they are called through)
_is_compiling, _is_tracing, _is_grad_enabled = (torch.compiler.is_compiling, torch._C._is_tracing,
                                                torch.is_grad_enabled)
_auto_torch_limits = backends.auto_torch_limits
_EVERY_SIZE = backends.EVERY_SIZE
_table_limits = backends.table_limits
_FINFO_EPS = {_F32: float(torch.finfo(_F32).eps), _F64: float(torch.finfo(_F64).eps)}
_PLAIN = (torch.Tensor, torch.nn.Parameter)
_STRIDED = torch.strided
_FLOATS = frozenset((_F32, _BF16, _F16, _F64))
_SHAPE_TYPES = (tuple, torch.Size, list)  # normalized_shape forms the small-norm path takes
_NEVER = (0, 0)  # torch_norm's limits for the cpu backend named: the fused call at every size
_get_backend, _resolve_type = backends.get_backend, backends.resolve_type
try:
    from ._C import torch_norm as _torch_norm
except ImportError:  # no C++ extension, or one built before it had the call
    _torch_norm = None
try:
    from ._C import torch_batch_norm as _torch_batch_norm
except ImportError:
    _torch_batch_norm = None


# How a call runs (``_route``): the registered forward op alone when nothing needs a gradient
# (no autograd Function: its apply costs more than a small call's kernel), the autograd
# Function over the registered ops, or the differentiable composite of the reference math.
# _TRACED runs the Function too (while torch.compile or torch.jit.trace traces); it is told
# apart only so that a small plain norm under auto (torch's own op, ``_norm``) is an eager
# choice: a traced graph always holds the fused op.
_OP, _FUNCTION, _COMPOSITE, _TRACED = 0, 1, 2, 3


def _route(*tensors) -> int:
    """_COMPOSITE under a torch.func transform (a functorch-wrapped operand) or inside a
    forward-mode AD level; _OP when grad mode is off or no operand requires grad; else
    _FUNCTION. While torch.compile or torch.jit.trace traces, always _TRACED, which runs the
    Function (Dynamo traces the Function and handles the transforms it traces itself; a jit
    trace must record the same graph whether or not its check run needs gradients)."""
    if _is_compiling() or _is_tracing():
        return _TRACED
    if _forward_ad._current_level >= 0:
        return _COMPOSITE
    if _functorch_level() is not None:  # a torch.func transform is active
        grad = False
        for t in tensors:
            if t is not None:
                if _is_functorch_wrapped(t):
                    return _COMPOSITE
                grad = grad or t.requires_grad
        return _FUNCTION if grad and _is_grad_enabled() else _OP
    if not _is_grad_enabled():  # no_grad / inference: nothing records a backward
        return _OP
    for t in tensors:
        if t is not None and t.requires_grad:
            return _FUNCTION
    return _OP


def _common_dtype(*tensors):
    """The dtype torch's type promotion gives the tensors (None entries skipped)."""
    dtype = None
    for t in tensors:
        if t is not None:
            dtype = t.dtype if dtype is None else torch.promote_types(dtype, t.dtype)
    return dtype


def _distinct(t, *others):
    """``t``, or a view of it when it is the very tensor of another operand (``bias_dropout(x,
    b, x)``): torch.compile cannot trace an autograd Function given one tensor twice."""
    if t is not None:
        for o in others:
            if t is o:
                return t.view_as(t)
    return t


def _device_type(x) -> str:
    """x.device.type without making a torch.device (a third of a microsecond per call)."""
    return "cpu" if x.is_cpu else x.device.type


def bias_dropout(x, bias=None, residual=None, p: float = 0.5, training: bool = True,
                 activation=None, seed=None):
    """``residual + dropout(act(x + bias), p)`` in one pass, forward and backward.

    Args:
        x: input of any shape (..., N), float16/bfloat16/float32/float64.
        bias: optional (N,) tensor added over the last dimension before the activation.
        residual: optional tensor of x's shape added after dropout.
        p: drop probability in [0, 1]; kept values are scaled by 1 / (1 - p).
        training: if False, no dropout (the mask is not drawn). A bool, as torch's dropout
            requires.
        activation: None, "relu", "gelu", "gelu_tanh" or "silu".
        seed: 64-bit seed of the mask (docs/design.md, "The dropout mask"); None draws one
            from torch's default generator. The same seed gives the same mask on every
            backend and device.

    bias and residual may have another float dtype than x (fp32 ones with bf16 activations
    under autocast): the result has the dtype torch's composite would have (type promotion),
    computed in float32 (float64 for float64).
    """
    if has_torch_function_variadic(x, bias, residual):
        return handle_torch_function(bias_dropout, (x, bias, residual), x, bias, residual, p=p,
                                     training=training, activation=activation, seed=seed)
    check_tensor(x, "x")
    p = check_probability(p)
    if type(training) is not bool:
        check_bool(training, "training")
    act = activation_code(activation)
    if seed is not None:
        check_seed(seed)
    dtype = x.dtype
    mixed = False  # an operand of another dtype: type promotion below
    if bias is not None:
        if x.dim() == 0:
            raise ShapeError("x must have at least one dimension when a bias is given")
        check_like(bias, "bias", x, "x", shape=x.shape[-1:], same_dtype=False)
        mixed = bias.dtype is not dtype
    if residual is not None:
        check_like(residual, "residual", x, "x", shape=x.shape, same_dtype=False)
        mixed = mixed or residual.dtype is not dtype
        if residual is x or residual is bias:
            residual = _distinct(residual, x, bias)
    if mixed:
        dtype = _common_dtype(x, bias, residual)
        if x.dtype != dtype:
            x = x.to(dtype)
        if bias is not None and bias.dtype != dtype:
            bias = bias.to(dtype)
        if residual is not None and residual.dtype != dtype:
            residual = residual.to(dtype)
    if not training:
        p = 0.0
    seed_t = seed_tensor(seed) if p > 0.0 else unused_seed()
    route = _route(x, bias, residual)
    if route == _COMPOSITE:
        return _ref_bias_dropout.bias_dropout_composite(x, bias, residual, p, act, seed_t)
    config = BiasDropoutConfig(p, act, backends.resolve_type("bias_dropout", _device_type(x)))
    if route == _OP:
        return _bias_dropout_forward(x, bias, residual, seed_t, config)
    if route == _FUNCTION:
        return _bias_dropout_apply(x, bias, residual, seed_t, config)
    return BiasDropoutFunction.apply(x, bias, residual, seed_t, config)


def dropout(x, p: float = 0.5, training: bool = True, seed=None, inplace: bool = False):
    """Dropout with the seeded mask (docs/design.md, "The dropout mask"):
    ``torch.nn.functional.dropout``'s arguments plus ``seed``. With ``training=False`` or
    ``p == 0`` it returns ``x``."""
    if has_torch_function_variadic(x):
        return handle_torch_function(dropout, (x,), x, p=p, training=training, seed=seed,
                                     inplace=inplace)
    check_tensor(x, "x")
    p = check_probability(p)
    if type(training) is not bool:
        check_bool(training, "training")
    if seed is not None:
        check_seed(seed)
    if not training or p == 0.0:
        return x
    seed_t = seed_tensor(seed)
    route = _route(x)
    if route == _COMPOSITE:
        out = _ref_bias_dropout.bias_dropout_composite(x, None, None, p, 0, seed_t)
    else:
        config = BiasDropoutConfig(p, 0, backends.resolve_type("bias_dropout", _device_type(x)))
        if route == _OP:
            out = _bias_dropout_forward(x, None, None, seed_t, config)
        elif route == _FUNCTION:
            out = _bias_dropout_apply(x, None, None, seed_t, config)
        else:
            out = BiasDropoutFunction.apply(x, None, None, seed_t, config)
    if inplace:
        return x.copy_(out)
    return out


def dropout_mask(shape, p: float, seed: int) -> torch.Tensor:
    """The boolean keep mask that every backend uses for a tensor of ``shape`` (CPU tensor)."""
    p = check_probability(p)
    check_seed(seed)
    if seed is None:
        raise TypeError("dropout_mask needs an explicit seed")
    try:
        shape = tuple(shape)
    except TypeError:
        raise TypeError(f"shape must be a sequence of ints, got {type(shape).__name__}") from None
    if any(isinstance(d, bool) or not isinstance(d, numbers.Integral) for d in shape):
        raise TypeError(f"shape must hold ints, got {shape!r}")
    if any(d < 0 for d in shape):
        raise ValueError(f"shape must hold sizes >= 0, got {shape!r}")
    return dropout_keep(tuple(int(d) for d in shape), p, seed)


# ---- LayerNorm, RMSNorm, dropout + residual + norm --------------------------------------------

def _norm_params(x, weight, bias, shape):
    if weight is not None:
        check_norm_param(weight, "weight", x, shape)
    if bias is not None:
        check_norm_param(bias, "bias", x, shape)
        if weight is not None and bias.dtype != weight.dtype:
            raise DTypeError(f"bias has dtype {bias.dtype} but weight has dtype {weight.dtype}")


def _norm_eps(eps, x):
    """eps as torch takes it: any finite number (0 and negative ones too: torch computes
    rsqrt(var + eps) whatever its sign); None for RMSNorm means the epsilon of the compute
    type (float32 for float16/bfloat16 inputs), as torch's rms_norm."""
    if type(eps) is float and -math.inf < eps < math.inf:  # the common case, checked fast
        return eps
    if eps is None:
        return float(torch.finfo(compute_dtype(x.dtype)).eps)
    if is_symbolic(eps):  # traced with a symbolic value (torch.compile, dynamic=True)
        return eps
    return check_number(eps, "eps")


def layer_norm(x, normalized_shape, weight=None, bias=None, eps: float = 1e-5):
    """``torch.nn.functional.layer_norm`` (same arguments and result) in one fused pass
    forward and one backward. weight and bias have x's dtype, or float32 with float16/bfloat16
    x; the output has x's dtype."""
    if has_torch_function_variadic(x, weight, bias):
        return handle_torch_function(layer_norm, (x, weight, bias), x, normalized_shape,
                                     weight=weight, bias=bias, eps=eps)
    if type(eps) is float and -_INF < eps < _INF:
        y = _torch_small_norm(x, normalized_shape, weight, bias, eps, "layer_norm")
        if y is not None:
            return y
    return _norm(x, normalized_shape, weight, bias, eps, rms=False)


def rms_norm(x, normalized_shape, weight=None, eps=None):
    """``torch.nn.functional.rms_norm``: eps=None means the epsilon of the compute type
    (``torch.finfo(torch.float32).eps`` for float16/bfloat16/float32 x), as torch's. The weight
    may have any float dtype (torch's rule): the result has x's dtype."""
    if has_torch_function_variadic(x, weight):
        return handle_torch_function(rms_norm, (x, weight), x, normalized_shape, weight=weight,
                                     eps=eps)
    if eps is None or type(eps) is float and -_INF < eps < _INF:
        y = _torch_small_norm(x, normalized_shape, weight, None, eps, "rms_norm")
        if y is not None:
            return y
    return _norm(x, normalized_shape, weight, None, eps, rms=True)


def _torch_small_norm(x, normalized_shape, weight, bias, eps, norm: str):
    """Under auto, a small plain norm (backends.AUTO_TORCH_BELOW) is served by torch's own op:
    its result (torch's autograd records the backward), or None for any other call, which
    ``_norm`` then checks and routes as always. A float32/float64 plain norm — or a
    float16/bfloat16 layer_norm with weight and bias None or of x's dtype — from the limit up
    (under auto) or at any size (the cpu backend named) whose backend is cpu is served by the
    fused call from the same C++ call (``torch_norm`` given the unused seed: the cpu kernel, or
    with autograd the C++ node), without ``_norm``'s Python checks and routing.

    Recognised here, before ``_norm``'s checks (a small call's budget is about a microsecond),
    is only the common case: an exact torch.Tensor x, float32 or float64 (the dtypes that CPU
    autocast leaves alone) — or float16/bfloat16 for layer_norm outside CPU autocast, under
    the "layer_norm_half" entry — on CPU; a tuple, torch.Size or list of one int for normalized_shape
    (``self.weight.shape`` is common in models' own norms); weight and bias
    None or plain tensors (rms_norm's weight on CPU and of x's dtype); eps a finite float (None
    for rms_norm); eager (no torch.compile or jit trace, no forward-mode AD level, no torch.func
    transform), so that the route would be the registered op or the Function. The rest of
    ``_norm``'s checks torch's op makes before its kernel runs (below): when it raises, the call
    goes through ``_norm``, whose checks raise fusedreg's error."""
    if _is_compiling() or _is_tracing() or _forward_ad._current_level >= 0 \
            or _functorch_level() is not None:
        return None
    limits = _auto_torch_limits(norm, "cpu")
    if limits is None:  # not auto: the cpu backend named takes the fused call below
        if _torch_norm is None or _get_backend() != "cpu":
            return None
        limits = _NEVER
    half = False
    if limits is not _NEVER:
        dtype = getattr(x, "dtype", None)
        if dtype is _BF16 or dtype is _F16:
            # float16/bfloat16 (layer_norm): its own AUTO_TORCH_BELOW entry (auto is the choice
            # in force here), and only outside CPU autocast, whose dtype rules _norm follows (the
            # C++ call declines under it; the Python one below checks)
            if norm != "layer_norm":
                return None
            limits = _table_limits("layer_norm_half", "cpu")
            if limits is None:
                return None
            half = True
    if _torch_norm is not None and type(normalized_shape) in _SHAPE_TYPES \
            and len(normalized_shape) == 1 and type(normalized_shape[0]) is int:
        # The calls in one C++ call (csrc/ops.cpp): the tensor checks below and
        # torch's op without Python's argument parsing; from the limit up the fused call when
        # the cpu backend's C++ node serves it (given the seed), else False (the fused path's);
        # None for anything else, which the checks below or _norm's then see. Whether the node
        # serves (a third of a microsecond to find out) is asked only where a fused call may
        # follow: upfront where every call is fused, else after a False.
        n, rms = normalized_shape[0], norm == "rms_norm"
        every = limits[0] == 0 and limits[1] == 0
        seed = _UNUSED_SEED if every and _layer_norm_node_serves(
            _resolve_type("layer_norm", "cpu")) else None
        y = _torch_norm(x, n, weight, bias, eps, rms, *limits, seed)
        if y is False and not every and _layer_norm_node_serves(
                _resolve_type("layer_norm", "cpu")):
            y = _torch_norm(x, n, weight, bias, eps, rms, *limits, _UNUSED_SEED)
        if y is not None:
            return None if y is False else y
    if limits is _NEVER:
        return None
    if type(x) is not _Tensor:
        return None
    grad = x.requires_grad
    if weight is not None:
        if type(weight) not in _PLAIN:
            return None
        grad = grad or weight.requires_grad
    if bias is not None:
        if type(bias) not in _PLAIN:
            return None
        grad = grad or bias.requires_grad
    dtype = x.dtype
    if (dtype is not _F32 and dtype is not _F64 and not half) or (half and _autocast_on("cpu")):
        return None
    if x.numel() >= limits[1 if grad and _is_grad_enabled() else 0] or not x.is_cpu \
            or type(normalized_shape) not in _SHAPE_TYPES or len(normalized_shape) != 1 \
            or type(normalized_shape[0]) is not int:
        return None
    # What is left unchecked here torch's op checks before its kernel runs: the layouts,
    # normalized_shape against the shapes and, for layer_norm, the weight's and bias's device
    # and dtype (torch's CPU layer_norm takes x's dtype, or float32 with a float16/bfloat16 x,
    # fusedreg's rule too; its
    # rms_norm takes any, with another result dtype than fusedreg's rule, so they are checked
    # here). When it raises, ``_norm``'s checks raise fusedreg's error.
    try:
        if norm == "layer_norm":
            return torch.layer_norm(x, normalized_shape, weight, bias, eps, False)
        if weight is not None and (weight.dtype is not dtype or not weight.is_cpu):
            return None
        return torch.rms_norm(x, normalized_shape, weight, _FINFO_EPS[dtype] if eps is None else eps)
    except Exception:
        return None


def _norm(x, normalized_shape, weight, bias, eps, rms: bool):
    """layer_norm / rms_norm: the norm of x alone (no residual, no dropout)."""
    check_tensor(x, "x")
    shape = check_normalized_shape(normalized_shape, x)
    if rms and weight is not None:
        check_tensor(weight, "weight")
        if weight.dtype != x.dtype and not (weight.dtype == torch.float32
                                            and x.dtype in (torch.float16, torch.bfloat16)):
            # torch multiplies x (in its compute type) by the weight and rounds to x's dtype
            weight = weight.to(compute_dtype(x.dtype))
    if x.is_cuda and not rms and torch.is_autocast_enabled("cuda"):
        # torch's CUDA autocast runs layer_norm in float32 (its "fp32" list)
        x, weight, bias = (t.float() if t is not None and t.dtype in (torch.float16, torch.bfloat16)
                           else t for t in (x, weight, bias))
    _norm_params(x, weight, bias, shape)
    eps = _norm_eps(eps, x)
    route = _route(x, weight, bias)
    device_type = _device_type(x)
    if route <= _FUNCTION:
        name = "rms_norm" if rms else "layer_norm_half" if x.dtype in (_BF16, _F16) else "layer_norm"
        limits = backends.auto_torch_limits(name, device_type)
        if limits is not None and x.numel() < limits[1 if route == _FUNCTION else 0] \
                and (weight is None or weight.dtype == x.dtype) \
                and (bias is None or bias.dtype == x.dtype) \
                and not torch.is_autocast_enabled(device_type):
            # auto, a small plain norm that _torch_small_norm did not recognise (a list for
            # normalized_shape, a Parameter x, half precision...): torch's own op as there.
            if rms:
                return torch.rms_norm(x, shape, weight, eps)
            return torch.layer_norm(x, shape, weight, bias, eps, False)
    if route == _COMPOSITE:
        return _ref_layer_norm.layer_norm_composite(x, None, weight, bias, len(shape), eps, 0.0, 0,
                                                    rms, x.dtype)[0]
    config = LayerNormConfig(len(shape), eps, 0.0, rms, x.dtype, False,
                             backends.resolve_type("layer_norm", device_type))
    if route == _OP:
        return _layer_norm_forward(x, None, weight, bias, unused_seed(), config)[0]
    if route == _FUNCTION:
        return _layer_norm_apply(x, None, weight, bias, unused_seed(), config)[0]
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
    if has_torch_function_variadic(x, residual, weight, bias):
        return handle_torch_function(
            dropout_add_layer_norm, (x, residual, weight, bias), x, residual, weight, bias, p=p,
            eps=eps, training=training, prenorm=prenorm, rms=rms,
            residual_in_fp32=residual_in_fp32, seed=seed)
    if type(p) is float and 0.0 <= p <= 1.0 and type(eps) is float and -_INF < eps < _INF \
            and type(training) is bool and type(prenorm) is bool and type(rms) is bool \
            and type(residual_in_fp32) is bool and _plain_cpu_rows(x, residual, weight, bias):
        ndim = 1  # the common case, in which _check_dropout_add_layer_norm passes
        if seed is not None:
            check_seed(seed)
    else:
        p, eps, ndim = _check_dropout_add_layer_norm(x, residual, weight, bias, p, eps, training,
                                                     prenorm, rms, residual_in_fp32, seed)
    if residual is x:
        residual = _distinct(residual, x)
    if bias is not None and bias is weight:
        bias = _distinct(bias, weight)
    if not training:
        p = 0.0
    h_dtype = residual.dtype if residual is not None else x.dtype
    if residual_in_fp32 and h_dtype != torch.float64:
        h_dtype = torch.float32
    seed_t = seed_tensor(seed) if p > 0.0 else unused_seed()
    route = _route(x, residual, weight, bias)
    if route == _COMPOSITE:
        y, h = _ref_layer_norm.layer_norm_composite(x, residual, weight, bias, ndim, eps, p,
                                                    seed_t, rms, h_dtype)
    else:
        config = LayerNormConfig(ndim, eps, p, rms, h_dtype, prenorm,
                                 backends.resolve_type("layer_norm", _device_type(x)))
        run = _layer_norm_forward if route == _OP else \
            _layer_norm_apply if route == _FUNCTION else LayerNormFunction.apply
        y, h, _, _ = run(x, residual, weight, bias, seed_t, config)
    return (y, h) if prenorm else y


def _plain_cpu_rows(x, residual, weight, bias) -> bool:
    """dropout_add_layer_norm's operands in the common case, which its checks all pass: plain
    CPU tensors of one float dtype, dense, x with at least one dim, weight and bias (N,) or
    None, the residual x's shape or None."""
    if type(x) not in _PLAIN or not x.is_cpu or x.layout is not _STRIDED:
        return False
    dtype, shape = x.dtype, x.shape
    if not shape or dtype not in _FLOATS:
        return False
    if weight is not None or bias is not None:
        row = shape[-1:]
        for t in (weight, bias):
            if t is not None and (type(t) not in _PLAIN or t.dtype is not dtype or not t.is_cpu
                                  or t.layout is not _STRIDED or t.shape != row):
                return False
    return residual is None or (type(residual) in _PLAIN and residual.dtype is dtype
                                and residual.is_cpu and residual.layout is _STRIDED
                                and residual.shape == shape)


def _check_dropout_add_layer_norm(x, residual, weight, bias, p, eps, training, prenorm, rms,
                                  residual_in_fp32, seed):
    """Every check of dropout_add_layer_norm's arguments; returns p and eps as floats and the
    number of normalized dims."""
    check_tensor(x, "x")
    p = check_probability(p)
    check_seed(seed)
    if not (type(training) is bool and type(prenorm) is bool and type(rms) is bool
            and type(residual_in_fp32) is bool):
        for flag, name in ((training, "training"), (prenorm, "prenorm"), (rms, "rms"),
                           (residual_in_fp32, "residual_in_fp32")):
            check_bool(flag, name)
    for t, name in ((weight, "weight"), (bias, "bias")):
        if t is not None:
            check_tensor(t, name)
    ref = weight if weight is not None else bias
    shape = check_normalized_shape(tuple(ref.shape) if ref is not None else x.shape[-1:], x)
    _norm_params(x, weight, bias, shape)
    if residual is not None:
        check_norm_param(residual, "residual", x, x.shape)
    return p, _norm_eps(eps, x), len(shape)


# ---- BatchNorm, alone and fused with residual add, activation and dropout ---------------------

def batch_norm(input, running_mean, running_var, weight=None, bias=None, training: bool = False,
               momentum: float = 0.1, eps: float = 1e-5):
    """``torch.nn.functional.batch_norm`` (same arguments and result): per-channel statistics
    of input (N, C, *spatial) — the batch's in training (fp32 accumulation, running stats
    updated in place with the unbiased variance: r ← (1 − momentum)·r + momentum·stat), the
    running ones in eval, where they fold into one scale and shift per channel. Contiguous and
    channels-last inputs (y keeps the channels-last layout); float16/bfloat16 input with
    float32 (or input-dtype) parameters and running stats."""
    if has_torch_function_variadic(input, running_mean, running_var, weight, bias):
        return handle_torch_function(batch_norm, (input, running_mean, running_var, weight, bias),
                                     input, running_mean, running_var, weight=weight, bias=bias,
                                     training=training, momentum=momentum, eps=eps)
    y = _torch_small_batch_norm(input, running_mean, running_var, weight, bias, training,
                                momentum, eps)
    if y is None:
        y = _cpu_eval_batch_norm(input, running_mean, running_var, weight, bias, training,
                                 momentum, eps)
        if y is None:
            y = _cpu_train_batch_norm(input, running_mean, running_var, weight, bias, training,
                                      momentum, eps)
    if y is not None:
        return y
    return _batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps,
                       None, None, 0.0, None)


def _cpu_eval_batch_norm(x, running_mean, running_var, weight, bias, training, momentum, eps,
                         activation=None, residual=None):
    """An eval batch_norm(_act) without dropout on CPU (plain, or with a residual and/or an
    activation), served by the cpu backend's ``batch_norm_fwd`` straight away from C++
    (``fusedreg._C.batch_norm_eval``: the storage views, rsqrt(running_var + eps), the kernel —
    what ``_batch_norm`` runs for it, the same values — and, where x, weight, bias or the
    residual needs a gradient, the C++ node in eval, BatchNormFunction's forward and backward),
    or None for any other call, which ``_batch_norm`` then checks and routes as always. Served
    is only the common case (the C++ call declines the rest): exact tensors (parameters and
    buffers may be Parameters) on CPU, x of a float dtype with at least 2 dims and elements,
    parameters and running stats 1-D of C elements in the compute type or x's half dtype
    (converted as the Python path converts them), a residual of x's shape and dtype, one of
    the fused activations, running stats that need no gradient, a float momentum, eps in (0, inf),
    eager (no compile or jit trace, no forward-mode AD level, no torch.func transform or
    mode), and the cpu backend the one in force. Each step costs more after the kernel has streamed the tensor through the
    caches: at (32, 256, 14, 14) float32 the full path's checks and dispatch took 60 us around
    the kernel's 420 at one thread, the Python version of this one about 15."""
    if training is not False or type(momentum) is not float or _BN_EVAL is None \
            or not _bn_cpp_serves():
        return None
    act = _ACTIVATION_CODES.get(activation) if type(activation) is str or activation is None \
        else None
    if act is None:
        return None
    return _BN_EVAL(x, running_mean, running_var, weight, bias, eps, residual, act)


def _bn_cpp_serves() -> bool:
    """BatchNorm's C++ calls (``_cpu_eval_batch_norm``, ``_cpu_train_batch_norm``) may serve
    this call: eager (not traced by torch.compile, no forward-mode AD level; the C++ calls
    themselves decline under modes, functorch layers and tracers) and the cpu backend, with its
    built-in kernels, is the one in force."""
    return not (_is_compiling() or _forward_ad._current_level >= 0) \
        and _bn_node_serves(backends.resolve_type("batch_norm", "cpu"))


def _cpu_train_batch_norm(x, running_mean, running_var, weight, bias, training, momentum, eps,
                          activation=None, residual=None):
    """A local training batch_norm(_act) without dropout on CPU under the cpu backend, as one
    C++ autograd node (``fusedreg._C.batch_norm_train``, csrc/ops.cpp: the storage views,
    BatchNormFunction's kernels, saved tensors, outputs and gradients, and ``_update_running``'s
    running-stat update, without the Python Function's apply, ctx and backward: about 25 us of
    a small BatchNorm's forward and 30 of its backward), or None for any other call (the C++
    call declines what ``_batch_norm``'s checks own, see there), which ``_batch_norm`` then
    checks and routes as always."""
    if training is not True or _BN_TRAIN is None or not _bn_cpp_serves():
        return None
    act = _ACTIVATION_CODES.get(activation) if type(activation) is str or activation is None \
        else None
    if act is None:
        return None
    return _BN_TRAIN(x, running_mean, running_var, weight, bias, momentum, eps, residual, act)


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
    if has_torch_function_variadic(input, running_mean, running_var, weight, bias, residual):
        return handle_torch_function(
            batch_norm_act, (input, running_mean, running_var, weight, bias, residual), input,
            running_mean, running_var, weight=weight, bias=bias, training=training,
            momentum=momentum, eps=eps, activation=activation, residual=residual, p=p, seed=seed)
    y = _torch_small_batch_norm(input, running_mean, running_var, weight, bias, training,
                                momentum, eps, activation, residual, p, seed)
    if y is None and seed is None and type(p) is float and (
            p == 0.0 or (training is False and 0.0 < p <= 1.0)):  # dropout is training's only
        y = _cpu_eval_batch_norm(input, running_mean, running_var, weight, bias, training,
                                 momentum, eps, activation, residual)
        if y is None and p == 0.0:
            y = _cpu_train_batch_norm(input, running_mean, running_var, weight, bias, training,
                                      momentum, eps, activation, residual)
    if y is not None:
        return y
    return _batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps,
                       activation, residual, p, seed)


# torch's form of batch_norm_act's other activations, for _torch_small_batch_norm (out of
# place: their backwards read their input)
_BN_TORCH_ACTIVATIONS = {"silu": torch.nn.functional.silu, "gelu": torch.nn.functional.gelu,
                         "gelu_tanh": lambda t: torch.nn.functional.gelu(t, approximate="tanh")}


def _short_ncs_rows(x):
    """Whether x is a contiguous (N, C, S...) tensor with under 64 values a row (maps of 1x1 to
    7x7). With silu, gelu or gelu_tanh and grad, the fused backward's per-row work outweighs
    those rows' own (it evaluates act' in both passes, each row a 16-value step): 1.02-2.09x
    torch's forward + backward time in float32 at (8, 1152, 3, 3), (8, 480, 6, 6), (8, 256, 5,
    5) and (8, 512, 7, 7) (2026-12-07, two threads), so under auto those calls are torch's at
    every size."""
    if not isinstance(x, _Tensor):
        return False
    shape = x.shape
    if len(shape) < 3 or not x.is_contiguous():
        return False
    rows = shape[0] * shape[1]
    return rows > 0 and x.numel() < 64 * rows


def _torch_small_batch_norm(x, running_mean, running_var, weight, bias, training, momentum, eps,
                            activation=None, residual=None, p=0.0, seed=None):
    """Under auto, a small batch_norm (backends.AUTO_TORCH_BELOW: "batch_norm" /
    "batch_norm_eval" for a plain one, "batch_norm_act" / "batch_norm_act_eval" with a
    residual and/or relu, "batch_norm_silu" / "batch_norm_gelu" / "batch_norm_gelu_tanh" and
    their "_eval" with that activation) with nothing to fuse that torch's ops would not do as
    fast is served by torch: ``torch.batch_norm``, then ``add_(residual)`` and the activation
    (``relu_``; ``silu`` / ``gelu`` out of place), as the small plain norms are
    (``_torch_small_norm``); "small" is every size where the fused kernel measured slower than
    torch's ops at every size (the limit is then ``backends.EVERY_SIZE``). Returns the result,
    or None for any other call, which ``_batch_norm`` then checks and routes as always (dropout
    in training, an explicit seed: always fusedreg's kernels).

    The checks and torch's ops are one C++ call (``fusedreg._C.torch_batch_norm``, the same
    rules, a Parameter x too; without the extension the Python below). Recognised here, before
    ``_batch_norm``'s checks (a small call's budget is a microsecond or two), is only the
    common case: an exact torch.Tensor float32/float64 x on CPU with at least 2 dims (bfloat16
    and float16 too, with the "..._bf16" / "..._f16" entries' limits);
    parameters and buffers 1-D; a residual of x's shape; a bool ``training``, a
    finite float momentum and eps > 0; both running stats or (training) neither; more than one
    value per channel in training; eager (no torch.compile or jit trace, no forward-mode AD
    level, no torch.func transform). The rest of ``_batch_norm``'s checks torch's op makes
    before it writes anything — on CPU it refuses any parameter, buffer or residual of another
    dtype or device than a float32/float64 x (a float16/bfloat16 x takes parameters and buffers
    all of its dtype or all float32), and a vector whose length is not C: when it
    raises, the call goes through ``_batch_norm``, whose checks raise fusedreg's error."""
    if type(training) is not bool or seed is not None or type(p) is not float \
            or not (p == 0.0 or (not training and 0.0 < p <= 1.0)):
        return None
    if residual is None and activation is None:
        table = "batch_norm" if training else "batch_norm_eval"
    elif activation is None or activation == "relu":
        table = "batch_norm_act" if training else "batch_norm_act_eval"
    elif type(activation) is str and activation in _BN_TORCH_ACTIVATIONS:
        table = "batch_norm_" + activation + ("" if training else "_eval")
    else:
        return None
    dtype = getattr(x, "dtype", None)
    if dtype is _BF16:  # torch's half-precision batch_norm has limits of its own
        table += "_bf16"
    elif dtype is _F16:
        table += "_f16"
    limits = _auto_torch_limits(table, "cpu")
    if limits is None or _forward_ad._current_level >= 0 or _is_compiling():
        return None
    if activation in _BN_TORCH_ACTIVATIONS and _short_ncs_rows(x):  # (a str by here)
        limits = (limits[0], _EVERY_SIZE)
    if _torch_batch_norm is not None:  # the checks and torch's ops in one C++ call
        return _torch_batch_norm(x, running_mean, running_var, weight, bias, training, momentum,
                                 eps, residual, _ACTIVATION_CODES[activation], *limits)
    if type(x) is not _Tensor or _functorch_level() is not None or _is_tracing():
        return None
    if dtype not in (_F32, _F64, _F16, _BF16) or not x.is_cpu or x.dim() < 2 \
            or type(eps) is not float or not 0.0 < eps < _INF \
            or type(momentum) is not float or not -_INF < momentum < _INF \
            or (weight is not None and weight.dim() != 1) or (bias is not None and bias.dim() != 1):
        return None
    if running_mean is None or running_var is None:
        if running_mean is not running_var or not training:
            return None
    elif running_mean.dim() != 1 or running_var.dim() != 1:
        return None
    if residual is not None and (residual.dtype is not dtype or not residual.is_cpu
                                 or residual.shape != x.shape):
        return None  # checked before torch.batch_norm writes the running stats
    numel = x.numel()
    limit = limits[0]
    if limits[1] != limit and _is_grad_enabled() and (
            x.requires_grad or (weight is not None and weight.requires_grad)
            or (bias is not None and bias.requires_grad)
            or (residual is not None and residual.requires_grad)):
        limit = limits[1]
    if numel >= limit or numel == 0 or (training and numel == x.shape[1]):
        return None
    try:
        y = torch.batch_norm(x, weight, bias, running_mean, running_var, training, momentum,
                             eps, False)
        if residual is not None:
            y = y.add_(residual)  # y is torch's fresh output; its backward does not read it
    except Exception:
        return None
    if activation is None:
        return y
    return torch.relu_(y) if activation == "relu" else _BN_TORCH_ACTIVATIONS[activation](y)


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
    if type(momentum) is not float or is_symbolic(momentum):
        momentum = check_number(momentum, "momentum")
    if type(eps) is not float or not -_INF < eps < _INF:
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
    unbiased = var * (count / (count - 1)) if count > 1 else var
    if running_mean.dtype is mean.dtype and running_var.dtype is mean.dtype \
            and not (running_mean.requires_grad or running_var.requires_grad):
        # buffers in the compute type (the common case): r + momentum·(stat − r) in place, the
        # same value to rounding in one op each (a small call's ops cost more than its kernel)
        running_mean.lerp_(mean, momentum)
        running_var.lerp_(unbiased, momentum)
        return
    with torch.no_grad():
        for r, stat in ((running_mean, mean), (running_var, unbiased)):
            r.copy_((r.to(stat.dtype) * (1.0 - momentum) + stat * momentum).to(r.dtype))


def _plain_stat(t):
    """The value of a statistic computed under torch.func transforms / forward-mode AD as a
    plain tensor (no tangent, no functorch wrapper), for the in-place running-stat update of
    buffers the transforms do not see; a RuntimeError under vmap, where the statistic is one
    per batch entry and the buffers one (torch's batch_norm refuses the same)."""
    t = t.detach()
    while _is_functorch_wrapped(t):
        if torch._C._functorch.is_batchedtensor(t):
            raise RuntimeError(
                "batch_norm (fusedreg): vmap over a batched input in training would update "
                "running_mean and running_var, which are not batched, in place; as with torch's "
                "batch_norm, use track_running_stats=False (running_mean=None), eval mode, or "
                "batched running stats")
        t = torch._C._functorch.get_unwrapped(t)
    return t


def _batch_norm_composite(x, running_mean, running_var, weight, bias, training, momentum, eps,
                          act, residual, p, seed_t):
    """batch_norm_act as the differentiable composite of the reference math (torch.func
    transforms, forward-mode AD), with the running-stat update of torch's batch_norm: in
    place with the statistics' plain values (nothing is written when vmap refuses)."""
    y, mean, var = _ref_batch_norm.batch_norm_composite(x, running_mean, running_var, weight,
                                                        bias, training, eps, act, residual, p,
                                                        seed_t)
    if training and running_mean is not None and x.numel() > 0:
        count = x.numel() // x.shape[1]
        if _is_functorch_wrapped(running_mean) or _is_functorch_wrapped(running_var):
            # buffers batched by vmap: one update per entry, through the transforms
            _update_running(running_mean, running_var, mean.detach(), var.detach(), count,
                            momentum)
        else:
            # plain buffers, updated below the transforms as torch's kernel updates them (a
            # transform refuses an in-place op on a tensor it captured)
            mean, var = _plain_stat(mean), _plain_stat(var)
            with torch._C._DisableFuncTorch():
                _update_running(running_mean, running_var, mean, var, count, momentum)
    return y


def _batch_norm(x, running_mean, running_var, weight, bias, training, momentum, eps,
                activation, residual, p, seed, process_group=None):
    """batch_norm / batch_norm_act, and SyncBatchNorm's forward when ``process_group`` is
    given (training: statistics over every rank's batch)."""
    momentum, eps = _check_batch_norm(x, running_mean, running_var, weight, bias, training,
                                      momentum, eps, residual)
    act = activation_code(activation) if activation is not None else 0
    p = check_probability(p)
    check_seed(seed)
    if not training:
        p = 0.0
    seed_t = seed_tensor(seed) if p > 0.0 else unused_seed()
    route = _route(x, residual, weight, bias, running_mean, running_var)
    if route == _COMPOSITE:
        if process_group is not None:
            raise NotImplementedError("SyncBatchNorm (fusedreg) does not support torch.func "
                                      "transforms or forward-mode AD in training")
        return _batch_norm_composite(x, running_mean, running_var, weight, bias, training,
                                     momentum, eps, act, residual, p, seed_t)
    config = _BatchNormConfig(training, eps, act, p,
                              backends.resolve_type("batch_norm", _device_type(x)))
    y, mean, var, count = _batch_norm_fused(x, residual, weight, bias, running_mean, running_var,
                                            seed_t, config,
                                            process_group if training else None, route != _OP)
    if training and running_mean is not None and count > 0:
        _update_running(running_mean, running_var, mean, var, count, momentum)
    return y
