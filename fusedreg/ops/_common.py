"""Registration helpers shared by the ops modules: each op's Python signature is declared
once, and its reference and Triton custom ops are made from that declaration."""
from __future__ import annotations

import importlib
import inspect
import math
from typing import Callable, NamedTuple, Optional, Sequence

import torch

from .. import backends
from .._activations import NAMES as _ACTIVATION_NAMES
from .._dtypes import compute_dtype
from .._seed import seed_value

_FLOAT_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)


class Kernels(NamedTuple):
    """One backend's forward and backward ops of an op with autograd."""
    fwd: Callable
    bwd: Callable


def cpp_op(name: str):
    """``torch.ops.fusedreg.<name>.default`` if the C++ extension registered it, else None.
    It serves the "cpu" backend (CPU kernel) and, when built, the "cuda" one."""
    if not backends.extension_available():
        return None
    try:
        return getattr(torch.ops.fusedreg, name).default
    except (AttributeError, RuntimeError):
        return None


def _fail(name: str, msg: str):
    raise RuntimeError(f"fusedreg::{name}: {msg}")


def _wide_ok(dtype, x_dtype) -> bool:
    """A norm's weight/bias/residual/h dtype: x's, or float32 with float16/bfloat16 x."""
    return dtype == x_dtype or (dtype == torch.float32 and x_dtype in (torch.float16, torch.bfloat16))


def check_kernel_args(name: str, args: dict, shapes: bool = True) -> None:
    """What the C++ ops check (csrc/include/fusedreg/host.h), for the Python ones: an op called
    directly (torch.ops.fusedreg.<name>_<backend>) raises RuntimeError, as a TORCH_CHECK does,
    before any kernel runs. The arguments follow the schemas' naming (csrc/ops.cpp): the first
    tensor is the main one (x, grad_out or dy), the others must be on its device; ``bias``
    and ``weight`` are (N,), ``residual``, ``x``, ``h`` and ``dh_out`` have the main one's
    shape; the norms' main tensor is (M, N) with ``mean``/``rstd`` (M,). It serves the ops of
    ``register_kernels`` (bias_dropout, layer_norm); the optimizer and batch_norm ops pass
    checks of their own. The fake functions run
    the checks without ``shapes`` (a mixed-device call dispatches to them: a meta operand makes
    the dispatcher pick the fake, where torch's own ops would raise)."""
    items = list(args.items())
    if not items or not isinstance(items[0][1], torch.Tensor):
        return
    main_name, main = items[0]
    seed = args.get("seed")
    if seed is not None and not (isinstance(seed, torch.Tensor) and seed.device.type == "cpu"
                                 and seed.dtype == torch.int64 and seed.numel() == 1):
        _fail(name, "seed must be a 1-element int64 CPU tensor")
    if "p" in args and not 0.0 <= args["p"] <= 1.0:
        _fail(name, f"p must be in [0, 1], got {args['p']}")
    if "activation" in args and args["activation"] not in _ACTIVATION_NAMES:
        _fail(name, f"activation must be a code in [0, 4] (none, relu, gelu, gelu_tanh, silu), "
                    f"got {args['activation']}")
    if "eps" in args and not math.isfinite(args["eps"]):  # any finite eps, as torch accepts
        _fail(name, f"eps must be finite, got {args['eps']}")
    for key in ("h_dtype", "x_dtype"):
        if key in args and args[key] not in _FLOAT_DTYPES:
            _fail(name, f"{key} must be a floating dtype, got {args[key]}")
    norm = "rstd" in args or "h_dtype" in args
    for key, t in items:
        if key != "seed" and isinstance(t, torch.Tensor) and t.device != main.device:
            _fail(name, f"{key} must be on {main_name}'s device {main.device}, got {t.device}")
    if not shapes:
        return
    if norm and main.dim() != 2:
        _fail(name, f"{main_name} must be (M, N), got shape {tuple(main.shape)}")
    N = main.shape[-1] if main.dim() else 1
    x_dtype = args.get("x_dtype", main.dtype)
    for key, t in items:
        if key == "seed" or not isinstance(t, torch.Tensor):
            continue
        if t.dtype not in _FLOAT_DTYPES:
            _fail(name, f"{key} must be float64, float32, float16 or bfloat16, got {t.dtype}")
        if key in ("bias", "weight") and tuple(t.shape) != (N,):
            _fail(name, f"{key} must have shape ({N},), got {tuple(t.shape)}")
        if key in ("residual", "x", "dy", "dh_out", "h") and t.shape != main.shape:
            _fail(name, f"{key} must have {main_name}'s shape {tuple(main.shape)}, got {tuple(t.shape)}")
        if key in ("mean", "rstd") and not (args["rms"] and key == "mean"):
            if tuple(t.shape) != (main.shape[0],) or t.dtype != compute_dtype(x_dtype):
                _fail(name, f"{key} must be ({main.shape[0]},) {compute_dtype(x_dtype)}, got "
                            f"{tuple(t.shape)} {t.dtype}")
        # dtypes: bias_dropout's tensors all have x's; a norm's follow fusedreg/_checks.py
        if not norm and t.dtype != main.dtype:
            _fail(name, f"{key} must have {main_name}'s dtype {main.dtype}, got {t.dtype}")
        if norm and key in ("bias", "weight") and not _wide_ok(t.dtype, x_dtype):
            _fail(name, f"{key} dtype {t.dtype} is not supported with x of dtype {x_dtype}")
    if norm:
        w, b = args.get("weight"), args.get("bias")
        if w is not None and b is not None and w.dtype != b.dtype:
            _fail(name, "weight and bias must have the same dtype")
        h_dtype = args.get("h_dtype", main.dtype if "rstd" in args else None)
        if not _wide_ok(h_dtype, x_dtype):
            _fail(name, f"h dtype {h_dtype} is not supported with x of dtype {x_dtype}")
        if "h_dtype" in args and args.get("residual") is not None and args["residual"].dtype != h_dtype:
            _fail(name, f"residual must have h_dtype {h_dtype}")
        if "rstd" in args:
            if args.get("dy") is not None and args["dy"].dtype != x_dtype:
                _fail(name, f"dy must have x_dtype {x_dtype}, got {args['dy'].dtype}")
            if args.get("dh_out") is not None and args["dh_out"].dtype != args["h"].dtype:
                _fail(name, "dh_out must have h's dtype")
    for flag, key in (("need_grad_bias", "bias"), ("need_grad_weight", "weight")):
        if args.get(flag) and args.get(key) is None:
            _fail(name, f"{flag} without a {key}")
    if args.get("activation") and "x" in args and args["x"] is None:
        _fail(name, "x is required with an activation")


def python_ops(signature: Callable, impls: dict[str, Optional[Callable]], *,
               fake: Callable, mutates_args: Sequence[str] = (),
               check: Optional[Callable] = None) -> dict:
    """Registers ``fusedreg::<name>_<backend>`` for each backend of ``impls`` (None entries are
    skipped), all with the schema inferred once from ``signature`` (a typed, body-less
    function named like the C++ op; its docstring documents the op) and the fake function
    ``fake``. Each implementation takes the signature's arguments in the same order, except
    that a ``seed`` argument reaches it as a Python int. ``check(name, arguments, shapes)``
    (``check_kernel_args`` for the ops whose schemas follow its naming) validates every call
    before the kernel, and the fake function's calls without ``shapes``. Returns {backend: op}."""
    name = signature.__name__
    schema = torch.library.infer_schema(signature, mutates_args=tuple(mutates_args))
    sig = inspect.signature(signature)
    params = list(sig.parameters)
    seed_at = params.index("seed") if "seed" in params else None
    ops = {}
    for backend, impl in impls.items():
        if impl is None:
            continue

        def fn(*args, _impl=impl, **kwargs):
            if check is not None:
                check(name, sig.bind(*args, **kwargs).arguments)
            if seed_at is not None:
                args = list(args)
                args[seed_at] = seed_value(args[seed_at])
            return _impl(*args, **kwargs)
        op = torch.library.custom_op(f"fusedreg::{name}_{backend}", fn,
                                     mutates_args=tuple(mutates_args), schema=schema)
        op.register_fake(_checked_fake(signature, fake, check))
        ops[backend] = op
    return ops


def _checked_fake(signature: Callable, fake: Callable, check: Optional[Callable]) -> Callable:
    """``fake`` after ``check``'s device and value checks (``fake`` itself without a check)."""
    if check is None:
        return fake
    sig = inspect.signature(signature)

    def checked(*args, **kwargs):
        check(signature.__name__, sig.bind(*args, **kwargs).arguments, shapes=False)
        return fake(*args, **kwargs)
    return checked


# The registered C++ ops with a direct CPU call in fusedreg._C (csrc/ops.cpp: the op's CPU
# kernel on plain CPU tensors without torch.ops' argument parsing and boxed dispatch, a few
# microseconds less per call), each mapped to a callable with the op's positional signature
# that tries the direct call first and makes the torch.ops call when it declines (any tensor
# not a plain CPU one, a dispatch or torch-function mode, a functorch layer, the jit tracer).
_DIRECT: dict = {}  # the cpu backend's registered Kernels -> the direct-first ones


def extension_call(name: str):
    """``fusedreg._C``'s function ``name`` (a direct call or C++ autograd node, csrc/ops.cpp), or
    None without the extension or in one built before it had the call."""
    if not backends.extension_available():
        return None
    return getattr(importlib.import_module("fusedreg._C"), name, None)


def _with_direct(op):
    fast = getattr(importlib.import_module("fusedreg._C"), op._schema.name.split("::")[1], None)
    if fast is None:
        return op

    def run(*args):
        out = fast(*args)
        return op(*args) if out is None else out
    return run


def direct_kernels(kernels: Kernels) -> Kernels:
    """``kernels`` (a backend's registered ops) with each op that has a direct CPU call
    replaced by its direct-first callable (positional arguments only). Eager calls only: while
    torch.compile traces, the caller keeps the registered ops, which the graph records."""
    return _DIRECT.get(kernels, kernels)


def cpp_backends(name: str, fake: Callable, signature: Optional[Callable] = None,
                 check: Optional[Callable] = None) -> dict:
    """{"cpu": op, "cuda": op} for the C++ op ``name`` (only the backends this build has),
    with ``fake`` registered as its fake function (after ``check`` of ``signature``'s
    arguments when given)."""
    op = cpp_op(name)
    if op is None:
        return {}
    torch.library.register_fake(f"fusedreg::{name}")(
        fake if signature is None else _checked_fake(signature, fake, check))
    out = {"cpu": op}
    if backends.extension_available(with_cuda=True):
        out["cuda"] = op
    return out


def triton_module(name: str):
    """``fusedreg.triton.<name>`` if Triton is installed, else None. Imported with fusedreg
    (no kernel is compiled then), so that a broken kernel module fails at import."""
    if not backends.triton_available():
        return None
    return importlib.import_module(f"fusedreg.triton.{name}")


def backend_ops(signature: Callable, reference: Callable, triton: Optional[Callable], *,
                fake: Callable, mutates_args: Sequence[str] = (),
                check: Optional[Callable] = None) -> dict:
    """{backend: op} for one op in every backend this build has: the reference and Triton
    custom ops made from ``signature`` over ``reference`` and ``triton`` (None without
    Triton), and the C++ op of the signature's name."""
    ops = python_ops(signature, {"reference": reference, "triton": triton}, fake=fake,
                     mutates_args=mutates_args, check=check)
    ops.update(cpp_backends(signature.__name__, fake, signature, check))
    return ops


def register_kernels(op: str, fwd_signature: Callable, bwd_signature: Callable, reference,
                     *, fwd_fake: Callable, bwd_fake: Callable) -> None:
    """Registers ``op``'s forward/backward pair in every backend this build has, over
    ``reference``'s and ``fusedreg.triton.<op>``'s functions of the signatures' names."""
    tri = triton_module(op)
    fwd, bwd = (backend_ops(sig, getattr(reference, sig.__name__),
                            tri and getattr(tri, sig.__name__), fake=fake,
                            check=check_kernel_args)
                for sig, fake in ((fwd_signature, fwd_fake), (bwd_signature, bwd_fake)))
    for backend in fwd:
        kernels = Kernels(fwd[backend], bwd[backend])
        backends.register(op, backend, kernels)
        if backend == "cpu":
            _DIRECT[kernels] = Kernels(_with_direct(kernels.fwd), _with_direct(kernels.bwd))
