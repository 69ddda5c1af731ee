"""Dropout seeds as 0-dim int64 CPU tensors (read on the host by every kernel launcher)."""
from __future__ import annotations

import torch


def seed_to_int64(seed: int) -> int:
    """The 64 bits of a seed in [-2**63, 2**64) as a signed int64 (two's complement)."""
    seed = int(seed)
    if not -(2**63) <= seed < 2**64:
        raise ValueError(f"seed must fit in 64 bits, got {seed}")
    return seed - 2**64 if seed >= 2**63 else seed


_HIGH = 2**63 - 1
_is_compiling = torch.compiler.is_compiling
try:
    from ._C import draw_seed as _draw
except ImportError:  # no C++ extension, or one built before it had the call
    _draw = None


def seed_tensor(seed) -> torch.Tensor:
    """The seed to pass to an op: ``seed`` if given, else a draw from torch's default CPU
    generator, so that ``torch.manual_seed`` makes runs reproducible."""
    if seed is None:
        if _draw is not None and not _is_compiling():
            # the same draw in C++ (csrc/ops.cpp; a graph records torch.randint), None when
            # it declines
            drawn = _draw()
            if drawn is not None:
                return drawn
        # torch.randint(0, 2**63 - 1, (), dtype=torch.int64) draws the same value (low 0 and
        # int64 are randint's defaults); the short form parses faster on every call.
        return torch.randint(_HIGH, ())
    return torch.tensor(seed_to_int64(seed), dtype=torch.int64)


_UNUSED = torch.zeros((), dtype=torch.int64)


_FAKE = torch._C._TorchDispatchModeKey.FAKE


def unused_seed() -> torch.Tensor:
    """A placeholder for calls that draw no mask (p == 0): draws nothing. One shared tensor
    (no op reads or writes it: allocating one per call was a tenth of a small norm's time),
    except while a graph is traced with fake tensors (a compile backend's AOT/Inductor pass over
    a graph that calls fusedreg's functions), where a real tensor may not enter an op."""
    if torch.compiler.is_compiling() or torch._C._get_dispatch_mode(_FAKE) is not None:
        return torch.zeros((), dtype=torch.int64)
    return _UNUSED


def seed_value(seed: torch.Tensor) -> int:
    """The seed's 64 bits as a Python int (signed)."""
    return int(seed.item())
