"""The dropout mask function (docs/design.md, "The dropout mask") in plain int64 torch ops.

Philox4x32-10 with 32-bit words held in int64 tensors; the 32x32-bit multiplies are split
into 16-bit halves so that no intermediate leaves int64. This is the readable definition the
C++ header (csrc/include/fusedreg/philox.h) and the Triton helper
(fusedreg/triton/philox.py) are tested against, bit for bit.
"""
from __future__ import annotations

import torch

from .._seed import seed_to_int64

_MASK32 = 0xFFFFFFFF
_ROUND_A, _ROUND_B = 0xD2511F53, 0xCD9E8D57
_KEY_A, _KEY_B = 0x9E3779B9, 0xBB67AE85
_UNIFORM_SCALE = 4.6566127342e-10


def _mulhilo(a: int, b: torch.Tensor):
    """(hi, lo) 32-bit words of the 64-bit product of constant ``a`` and words ``b``."""
    a_lo, a_hi = a & 0xFFFF, a >> 16
    b_lo, b_hi = b & 0xFFFF, b >> 16
    ll = a_lo * b_lo
    lh = a_lo * b_hi
    hl = a_hi * b_lo
    hh = a_hi * b_hi
    mid = (ll >> 16) + (lh & 0xFFFF) + (hl & 0xFFFF)
    lo = ((mid & 0xFFFF) << 16) | (ll & 0xFFFF)
    hi = (hh + (lh >> 16) + (hl >> 16) + (mid >> 16)) & _MASK32
    return hi, lo


def philox4x32_10(seed, group: torch.Tensor):
    """The four 32-bit words (as int64 tensors) of Philox4x32-10 for counters
    (group_lo, group_hi, 0, 0) under the key (seed_lo, seed_hi). ``seed`` is an int or an
    int64 tensor (a 0-dim one, or one seed per entry of a vmap batch: the key words are then
    tensors and broadcast like any operand, which is how ``vmap(randomness="different")``
    gets a mask per batch entry)."""
    if isinstance(seed, torch.Tensor):
        seed = seed.to(group.device)
        k0, k1 = seed & _MASK32, (seed >> 32) & _MASK32  # arithmetic shift, then the low word
    else:
        s = seed_to_int64(seed) & 0xFFFFFFFFFFFFFFFF
        k0, k1 = s & _MASK32, s >> 32
    c0 = group & _MASK32
    c1 = (group >> 32) & _MASK32
    c2 = torch.zeros_like(group)
    c3 = torch.zeros_like(group)
    for _ in range(10):
        hi0, lo0 = _mulhilo(_ROUND_A, c0)
        hi1, lo1 = _mulhilo(_ROUND_B, c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0 = (k0 + _KEY_A) & _MASK32
        k1 = (k1 + _KEY_B) & _MASK32
    return c0, c1, c2, c3


def uint_to_uniform(word: torch.Tensor) -> torch.Tensor:
    """Triton's uint_to_uniform_float: bit-cast to int32, fold negatives, scale to [0, 1)."""
    x = torch.where(word >= 2**31, word - 2**32, word)  # the int32 with the same bits
    x = torch.where(x < 0, -x - 1, x)
    return x.to(torch.float32) * torch.tensor(_UNIFORM_SCALE, dtype=torch.float32)


def dropout_uniform(seed, numel: int, device=None) -> torch.Tensor:
    """uniform(seed, i) for i in [0, numel), float32."""
    n_groups = (numel + 3) // 4
    group = torch.arange(n_groups, dtype=torch.int64, device=device)
    words = torch.stack(philox4x32_10(seed, group), dim=1).reshape(-1)[:numel]
    return uint_to_uniform(words)


def dropout_keep(shape, p: float, seed, device=None) -> torch.Tensor:
    """The boolean keep mask of a tensor of ``shape``: element i kept iff u(seed, i) >= p."""
    shape = torch.Size(shape)
    u = dropout_uniform(seed, shape.numel(), device=device)
    return (u >= torch.tensor(p, dtype=torch.float32)).reshape(shape)


def dropout_scale(p: float) -> float:
    """1 / (1 - p) rounded through float32, as every backend computes it (0 when p == 1)."""
    p32 = torch.tensor(p, dtype=torch.float32)
    return 0.0 if p >= 1.0 else float(torch.tensor(1.0, dtype=torch.float32) / (1.0 - p32))


def apply_dropout(v: torch.Tensor, p: float, seed) -> torch.Tensor:
    """v with the elements that the mask of ``seed`` (an int or an int64 tensor) drops set to
    zero and the kept ones scaled by 1 / (1 - p) (v unchanged when p == 0). Differentiable in
    v (the mask is a constant), so it also serves the composites of the autograd paths."""
    if p <= 0.0:
        return v
    keep = dropout_keep(v.shape, p, seed, device=v.device)
    return torch.where(keep, v * dropout_scale(p), torch.zeros((), dtype=v.dtype, device=v.device))
