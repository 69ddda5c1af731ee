"""fusedreg: fused regularization kernels for PyTorch.

Dropout + bias (+ activation, + residual), LayerNorm/RMSNorm, and optimizer steps with
decoupled weight decay and an L1 proximal step, each in one pass, in four backends
(reference, cpu, triton, cuda). Importing never fails because the C++ extension, Triton or
a GPU is missing: see ``backend_status()``.
"""
from . import backends
from .backends import (
    BACKENDS,
    BackendUnavailableError,
    available_backends,
    backend_status,
    get_backend,
    set_backend,
    use_backend,
)
from . import ops  # noqa: F401  (registers the custom ops)
from . import autograd, functional, nn, optim
from . import patching
from .patching import patch, patched_modules, unpatch  # fusedreg.patch(model): the function
from .compiling import compile, compile_backend  # noqa: A004 (fusedreg.compile(model): the function)

__version__ = "0.1.0"

__all__ = [
    "BACKENDS", "BackendUnavailableError", "autograd", "available_backends", "backend_status",
    "compile", "compile_backend",
    "backends", "functional", "get_backend", "nn", "optim", "patch", "patched_modules", "patching",
    "set_backend", "unpatch",
    "use_backend",
]
