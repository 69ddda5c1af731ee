"""Helpers for registering one op's forward/backward in every backend."""
from __future__ import annotations

import torch

from .. import backends


def cpp_ops(*names: str):
    """The C++ ops ``torch.ops.fusedreg.<name>`` if the extension registered them, else None.
    They serve the "cpu" backend (CPU kernel) and the "cuda" backend (CUDA kernel)."""
    if not backends._EXT_OK:
        return None
    try:
        return tuple(getattr(torch.ops.fusedreg, n).default for n in names)
    except (AttributeError, RuntimeError):
        return None


def triton_available() -> bool:
    return backends._TRITON_WHY is None


def register(op: str, table: dict, impls: dict) -> None:
    """Records ``impls`` (backend -> ops) in ``table`` and tells the dispatcher."""
    for backend, ops in impls.items():
        if ops is None:
            continue
        if backend == "cuda" and not backends._EXT_CUDA:
            continue
        table[backend] = ops
        backends.register_impl(op, backend)
