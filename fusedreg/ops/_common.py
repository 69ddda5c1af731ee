"""Registration helpers shared by the ops modules: each op's Python signature is declared
once, and its reference and Triton custom ops are made from that declaration."""
from __future__ import annotations

import importlib
import inspect
from typing import Callable, NamedTuple, Optional, Sequence

import torch

from .. import backends
from .._seed import seed_value


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


def python_ops(signature: Callable, impls: dict[str, Optional[Callable]], *,
               fake: Callable, mutates_args: Sequence[str] = ()) -> dict:
    """Registers ``fusedreg::<name>_<backend>`` for each backend of ``impls`` (None entries are
    skipped), all with the schema inferred once from ``signature`` (a typed, body-less
    function named like the C++ op; its docstring documents the op) and the fake function
    ``fake``. Each implementation takes the signature's arguments in the same order, except
    that a ``seed`` argument reaches it as a Python int. Returns {backend: op}."""
    name = signature.__name__
    schema = torch.library.infer_schema(signature, mutates_args=tuple(mutates_args))
    params = list(inspect.signature(signature).parameters)
    seed_at = params.index("seed") if "seed" in params else None
    ops = {}
    for backend, impl in impls.items():
        if impl is None:
            continue
        if seed_at is None:
            fn = impl
        else:
            def fn(*args, _impl=impl, **kwargs):
                args = list(args)
                args[seed_at] = seed_value(args[seed_at])
                return _impl(*args, **kwargs)
        op = torch.library.custom_op(f"fusedreg::{name}_{backend}", fn,
                                     mutates_args=tuple(mutates_args), schema=schema)
        op.register_fake(fake)
        ops[backend] = op
    return ops


def cpp_backends(name: str, fake: Callable) -> dict:
    """{"cpu": op, "cuda": op} for the C++ op ``name`` (only the backends this build has),
    with ``fake`` registered as its fake function."""
    op = cpp_op(name)
    if op is None:
        return {}
    torch.library.register_fake(f"fusedreg::{name}")(fake)
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
                fake: Callable, mutates_args: Sequence[str] = ()) -> dict:
    """{backend: op} for one op in every backend this build has: the reference and Triton
    custom ops made from ``signature`` over ``reference`` and ``triton`` (None without
    Triton), and the C++ op of the signature's name."""
    ops = python_ops(signature, {"reference": reference, "triton": triton}, fake=fake,
                     mutates_args=mutates_args)
    ops.update(cpp_backends(signature.__name__, fake))
    return ops


def register_kernels(op: str, fwd_signature: Callable, bwd_signature: Callable, reference,
                     *, fwd_fake: Callable, bwd_fake: Callable) -> None:
    """Registers ``op``'s forward/backward pair in every backend this build has, over
    ``reference``'s and ``fusedreg.triton.<op>``'s functions of the signatures' names."""
    tri = triton_module(op)
    fwd, bwd = (backend_ops(sig, getattr(reference, sig.__name__),
                            tri and getattr(tri, sig.__name__), fake=fake)
                for sig, fake in ((fwd_signature, fwd_fake), (bwd_signature, bwd_fake)))
    for backend in fwd:
        backends.register(op, backend, Kernels(fwd[backend], bwd[backend]))
