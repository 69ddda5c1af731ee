"""Attention dropout inside ``scaled_dot_product_attention``, where torch runs its math kernel
(on CPU every call with ``dropout_p > 0``): the same computation with fusedreg's dropout.

Torch's math kernel computes, for q (..., L, E), k (..., S, E), v (..., S, Ev) and
s = sqrt(scale) (scale = 1/sqrt(E) by default; a negative scale negates q's factor)::

    a = (q * s) @ (k^T * s)  [+ mask: a float one added, a bool one as 0 / -inf; is_causal:
                              the lower-triangular bool mask]
    a = _safe_softmax(a, -1) (softmax; rows that are all -inf give 0, not NaN)
    out = dropout(a, p) @ v

``sdpa`` runs that chain with ``fusedreg.functional.dropout`` (the seeded mask of
docs/design.md, one op forward and one backward) instead of torch's dropout, whose CPU
Bernoulli draw costs about as much as the rest of a small attention call; it applies the scale
once, inside the product (q @ k^T * scale, ``baddbmm``'s alpha: the same value up to rounding,
with one element-wise pass and one transposing copy of k fewer: forward + backward at batch 8,
4 heads, 128 x 128 scores, head dim 64, one thread, 1.04-1.05x the chain that scaled q and k
by sqrt(scale), with or without the causal mask; 300 interleaved rounds, thread CPU time).
It takes over only
calls that torch itself sends to the math kernel (``torch._fused_sdp_choice``) with plain
float32/float64 CPU tensors of one dtype, equal batch and head dims (no GQA broadcast), outside
autocast, torch.compile/jit tracing, torch.func transforms and forward-mode AD, and (eagerly)
with at least ``MIN_SCORES`` attention scores, below which torch's own call is faster; every
other call, and every call torch would refuse, is torch's own (same result, same errors). Used by the
dropout call-site routing (``_calls.py``) and by the FX pass of ``patch(model, fuse=True)``.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as TF
from torch.autograd import forward_ad as _forward_ad

from .. import functional as F

try:
    from torch._C._functorch import maybe_current_level as _functorch_level
except ImportError:  # pragma: no cover - every supported torch has it
    def _functorch_level():
        return None

_Tensor = torch.Tensor
_DTYPES = (torch.float32, torch.float64)
_MATH = int(torch.nn.attention.SDPBackend.MATH)
_torch_sdpa = TF.scaled_dot_product_attention

# Eager calls with fewer attention scores (batch x heads x L x S) than this stay torch's: the
# chain's Python ops cost about 80 us more per forward + backward than torch's C++ math kernel,
# which its Bernoulli draw (about 7 ns a score) outweighs only from here (one thread: torch
# 0.75x fusedreg at 1024 scores, 0.94-0.97x at 8-12K, 1.06x at 16K, 1.48x at 64K).
MIN_SCORES = 1 << 14


def scores(q, k):
    """The attention scores a call computes (and its dropout draws for): batch x heads x L x S,
    for q (..., L, E) and k (..., S, E) of at least two dims."""
    return q.shape[:-1].numel() * k.shape[-2]


def _takes(q, k, v, attn_mask, p, is_causal, scale, enable_gqa, traced=False) -> bool:
    """Whether the call is one that torch computes with its math kernel and fusedreg's chain
    reproduces (see the module doc); ``traced``: decided on the metadata of the tensors a
    compile backend traces (``sdpa_traced``)."""
    # eager: plain tensors only (a subclass has its own semantics); traced: the backend's fake
    # or functional tensors, which stand for plain ones
    plain = (lambda t: isinstance(t, _Tensor)) if traced else (lambda t: type(t) is _Tensor)
    if not (plain(q) and plain(k) and plain(v)):
        return False
    # eager calls under the size limit (fewer than MIN_SCORES scores, batch x heads x L x S),
    # first: the common small call leaves after one product
    if not traced and q.dim() >= 2 and k.dim() >= 2 and scores(q, k) < MIN_SCORES:
        return False
    if type(p) is not float or not 0.0 < p <= 1.0 or type(is_causal) is not bool \
            or type(enable_gqa) is not bool:
        return False
    if scale is not None and (type(scale) is not float or not math.isfinite(scale) or scale == 0.0):
        return False
    if not (q.is_cpu and k.is_cpu and v.is_cpu) or q.dtype not in _DTYPES \
            or k.dtype != q.dtype or v.dtype != q.dtype:
        return False
    if q.is_nested or k.is_nested or v.is_nested or q.layout != torch.strided \
            or k.layout != torch.strided or v.layout != torch.strided:
        return False
    if q.dim() < 2 or q.dim() != k.dim() or q.dim() != v.dim() or q.shape[:-2] != k.shape[:-2] \
            or k.shape[:-1] != v.shape[:-1] or q.shape[-1] != k.shape[-1]:
        return False
    L, S = q.shape[-2], k.shape[-2]
    if S == 0:
        return False
    if attn_mask is not None:
        if is_causal or not plain(attn_mask) or not attn_mask.is_cpu \
                or attn_mask.dtype not in (torch.bool, q.dtype):
            return False
        target = tuple(q.shape[:-2]) + (L, S)
        try:
            if tuple(torch.broadcast_shapes(attn_mask.shape, target)) != target:
                return False
        except RuntimeError:
            return False
    if torch.is_autocast_enabled("cpu"):
        return False
    if not traced and (torch.compiler.is_compiling() or torch._C._is_tracing()
                       or _forward_ad._current_level >= 0 or _functorch_level() is not None):
        return False
    try:
        choice = torch._fused_sdp_choice(q, k, v, attn_mask, p, is_causal, scale=scale,
                                         enable_gqa=enable_gqa)
    except Exception:  # torch raises its own error below
        return False
    return choice == _MATH


def _chain(q, k, v, attn_mask, p, is_causal, scale, traced=False):
    """The math kernel's computation (module doc) on the 3-D views of q, k, v: the scale is
    applied once, by the product of q and k's transpose (``baddbmm``'s alpha), not as
    sqrt(scale) on q and on a transposed copy of k; k is copied (where it is not contiguous
    already) without transposing it, and the product reads its transpose."""
    L, E = q.shape[-2], q.shape[-1]
    S, Ev = k.shape[-2], v.shape[-1]
    if scale is None:
        scale = 1.0 / math.sqrt(E)
    lead = q.shape[:-2]
    n = lead.numel()
    q3, k3, v3 = q.reshape(n, L, E), k.reshape(n, S, E), v.reshape(n, S, Ev)
    a = torch.baddbmm(q3.new_zeros(()), q3, k3.transpose(1, 2), beta=0.0, alpha=scale)
    # a mask is added (a bool one as 0 / -inf): the add's backward passes the gradient on as
    # it is, where masked_fill_'s would be one more pass (batch 8, 4 heads, 128 x 128, causal:
    # 0.95-0.98x with masked_fill_)
    if is_causal:
        attn_mask = torch.ones(L, S, dtype=torch.bool).tril()
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            attn_mask = torch.where(attn_mask, 0.0, -math.inf).to(q.dtype)
        a = (a.view(lead + (L, S)) + attn_mask).view(n, L, S)
    if traced:  # compiled: torch's own op (Inductor fuses its check into the softmax)
        y = torch._safe_softmax(a, -1)
    else:
        # torch's _safe_softmax gives 0 for a row that is all -inf, where softmax gives NaN;
        # such a row (or one with a NaN) is NaN throughout, so its first column shows it:
        # then recompute as torch does (a check of L values instead of _safe_softmax's
        # isneginf, all and where over every score)
        y = torch.softmax(a, -1)
        if bool(y[..., 0].isnan().any()):
            y = torch._safe_softmax(a, -1)
    return torch.bmm(F.dropout(y, p, True), v3).view(lead + (L, Ev))


def bind(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
         enable_gqa=False):
    """The arguments of a ``scaled_dot_product_attention`` call in order (TypeError for
    arguments it does not take)."""
    return query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa


def sdpa_call(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
              enable_gqa=False):
    """(output, fused): ``scaled_dot_product_attention``'s output, with fusedreg's dropout
    where ``_takes`` says so (fused True), else torch's call (fused False)."""
    p = float(dropout_p) if type(dropout_p) is int else dropout_p
    if _takes(q, k, v, attn_mask, p, is_causal, scale, enable_gqa):
        return _chain(q, k, v, attn_mask, p, is_causal, scale), True
    return _torch_sdpa(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                       scale=scale, enable_gqa=enable_gqa), False


def sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
         enable_gqa=False):
    """``torch.nn.functional.scaled_dot_product_attention``'s signature and result, with
    fusedreg's attention dropout where torch would run its math kernel (module doc)."""
    return sdpa_call(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)[0]


def sdpa_traced(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                enable_gqa=False):
    """``sdpa`` for a graph that a compile backend traces (``fusedreg.compile``): decided on the
    traced tensors' metadata, with ``torch._safe_softmax`` (no check of the values)."""
    p = float(dropout_p) if type(dropout_p) is int else dropout_p
    if _takes(query, key, value, attn_mask, p, is_causal, scale, enable_gqa, traced=True):
        return _chain(query, key, value, attn_mask, p, is_causal, scale, traced=True)
    return _torch_sdpa(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p,
                       is_causal=is_causal, scale=scale, enable_gqa=enable_gqa)
