"""Backend dispatch: which implementation serves a call. One place, one table.

Policy: an explicit choice (``set_backend``, ``use_backend``, env ``FUSEDREG_BACKEND``) is
honoured or refused with the reason; ``auto`` picks per op and device from ``_AUTO``, the
fastest available backend, never ``reference`` on a GPU when a fused backend is built.
"""
from __future__ import annotations

import contextlib
import importlib
import os

import torch

BACKENDS = ("reference", "cpu", "triton", "cuda")
_CHOICES = ("auto",) + BACKENDS

# auto: preference order per device type; per-op overrides justified by GPU benchmarks go
# in _AUTO_BY_OP (op -> device type -> order).
_AUTO = {"cpu": ("cpu", "reference"), "cuda": ("cuda", "triton", "reference")}
_AUTO_BY_OP: dict[str, dict[str, tuple[str, ...]]] = {}


class BackendUnavailableError(RuntimeError):
    """A backend was asked for that cannot serve the call; the message says why."""


def _probe_extension():
    try:
        importlib.import_module("fusedreg._C")
    except ImportError as e:  # not built, or built against another torch
        return False, False, f"the C++ extension fusedreg._C is not importable ({e})"
    # CUDA kernels exist if any fusedreg C++ op has one (all .cu files build together).
    has_cuda = any(
        torch._C._dispatch_has_kernel_for_dispatch_key(name, "CUDA")
        for name in torch._C._dispatch_get_all_op_names() if name.startswith("fusedreg::")
    )
    return True, has_cuda, None


def _probe_triton():
    try:
        importlib.import_module("triton")
    except ImportError as e:
        return f"triton is not installed ({e})"
    return None


_EXT_OK, _EXT_CUDA, _EXT_WHY = _probe_extension()
_TRITON_WHY = _probe_triton()
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_interpreter() -> bool:
    """True when Triton kernels run in the interpreter (CPU tensors), set before import."""
    return _INTERPRET


def _cuda_available() -> bool:
    return torch.cuda.is_available()


def _why_unusable(backend: str, device_type: str | None = None) -> str | None:
    """None if ``backend`` can run on ``device_type`` (any device if None), else the reason."""
    if backend == "reference":
        return None
    if backend == "cpu":
        if not _EXT_OK:
            return _EXT_WHY
        if device_type not in (None, "cpu"):
            return f"the cpu backend runs on CPU tensors, not {device_type}"
        return None
    if backend == "cuda":
        if not _EXT_OK:
            return _EXT_WHY
        if not _EXT_CUDA:
            return "fusedreg._C was built without CUDA kernels (CPU-only torch or no nvcc at build time)"
        if not _cuda_available():
            return "no CUDA device is available"
        if device_type not in (None, "cuda"):
            return f"the cuda backend runs on CUDA tensors, not {device_type}"
        return None
    if backend == "triton":
        if _TRITON_WHY:
            return _TRITON_WHY
        if device_type == "cpu" or (device_type is None and not _cuda_available()):
            if not _INTERPRET:
                return ("triton runs on CUDA tensors; set TRITON_INTERPRET=1 before importing "
                        "fusedreg to run it on CPU tensors in the interpreter")
            return None
        if device_type not in (None, "cuda"):
            return f"the triton backend runs on CUDA tensors, not {device_type}"
        if not _cuda_available():
            return "no CUDA device is available"
        return None
    raise ValueError(f"unknown backend {backend!r}; expected one of {', '.join(_CHOICES)}")


def backend_status() -> dict[str, str]:
    """For each backend, "available" or the reason it is not usable here."""
    return {b: (_why_unusable(b) or "available") for b in BACKENDS}


def available_backends() -> list[str]:
    return [b for b in BACKENDS if _why_unusable(b) is None]


def _check_choice(name: str) -> str:
    if not isinstance(name, str) or name not in _CHOICES:
        raise ValueError(f"unknown backend {name!r}; expected one of {', '.join(_CHOICES)}")
    if name != "auto":
        why = _why_unusable(name)
        if why:
            raise BackendUnavailableError(f"backend {name!r} is not usable: {why}")
    return name


_state = {"backend": "auto"}


def _init_from_env():
    env = os.environ.get("FUSEDREG_BACKEND")
    if env:
        _state["backend"] = _check_choice(env.strip().lower())


def set_backend(name: str) -> None:
    """Selects the backend for all later calls: "auto" or one of ``BACKENDS``."""
    _state["backend"] = _check_choice(name)


def get_backend() -> str:
    return _state["backend"]


@contextlib.contextmanager
def use_backend(name: str):
    """``with fusedreg.use_backend("triton"): ...`` selects a backend inside the block."""
    previous = _state["backend"]
    _state["backend"] = _check_choice(name)
    try:
        yield
    finally:
        _state["backend"] = previous


_IMPLEMENTED: dict[str, set[str]] = {}


def register_impl(op: str, backend: str) -> None:
    """Called by fusedreg/ops/<op>.py for each backend it registered."""
    _IMPLEMENTED.setdefault(op, set()).add(backend)


def resolve(op: str, device: torch.device) -> str:
    """The backend that serves ``op`` for tensors on ``device``; raises with the reason."""
    choice = _state["backend"]
    implemented = _IMPLEMENTED.get(op, set())
    if choice != "auto":
        why = _why_unusable(choice, device.type)
        if why is None and choice not in implemented:
            why = f"{op} has no {choice} implementation in this build"
        if why:
            raise BackendUnavailableError(f"{op}: backend {choice!r} cannot run here: {why}")
        return choice
    order = _AUTO_BY_OP.get(op, {}).get(device.type) or _AUTO.get(device.type, ("reference",))
    for backend in order:
        if backend in implemented and _why_unusable(backend, device.type) is None:
            return backend
    return "reference"


_init_from_env()
