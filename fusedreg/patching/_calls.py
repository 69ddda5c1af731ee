"""Dropout call sites that are functions, not modules: a ``TorchFunctionMode`` that routes
``torch.nn.functional.dropout`` / ``dropout1d`` / ``dropout2d`` / ``dropout3d`` (and
``torch.dropout``) to fusedreg while a patched model runs, and counts, per call-site kind, what
ran fused and what stayed in torch in the last forward.

Why a mode: Hugging Face and timm forwards call ``nn.functional.dropout(x, p, training=...)``
inline, so there is no module to swap. A ``TorchFunctionMode`` sees every torch function called
on the current thread while it is on the mode stack (and only there: another thread, or code
outside the patched model's forward, is untouched). It is pushed by a forward pre-hook and
popped by a forward hook (``always_call=True``, so an exception pops it too) on the patched
root module and on every member of a ``ModuleList`` (the blocks that gradient checkpointing
recomputes in backward: the recomputation must draw the same fusedreg masks as the forward).
The price is a Python call per torch function while the mode is on (measured in
``fusedreg.bench.models``). Under ``torch.compile`` the hooks do nothing: Dynamo sees the
model's own calls (``fusedreg.compile`` rewrites them in the graph instead).

Channel-wise dropouts (``dropout1d/2d/3d``) draw one fusedreg mask element per (sample,
channel) and multiply: the mask is the seeded function of docs/design.md at the channel
shape. Attention dropout inside ``scaled_dot_product_attention`` runs fusedreg's dropout
where torch would run its math kernel (on CPU: ``_attention.py``); where torch runs a fused
attention kernel (GPU), it stays there. ``alpha_dropout`` and ``feature_alpha_dropout`` have no fusedreg
kernel. What stays in torch is counted as such.
"""
from __future__ import annotations

import threading

import torch
import torch.nn.functional as TF
from torch.overrides import TorchFunctionMode

from .. import functional as F
from . import _attention

# call-site kinds, as the report names them
MODULE = "nn.Dropout modules"
FUNCTIONAL = "functional dropout"
CHANNEL = "functional dropout1d/2d/3d"
ALPHA = "alpha dropout"
SDPA = "attention dropout inside scaled_dot_product_attention"
KINDS = (MODULE, FUNCTIONAL, CHANNEL, ALPHA, SDPA)
NOT_FUSABLE = {ALPHA: "no fusedreg kernel",
               SDPA: "left in torch only where torch runs a fused attention kernel, which draws "
                     "its own mask"}

_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class CallCounts:
    """Per call-site kind: calls that dropped something, fused (fusedreg) or left in torch."""

    def __init__(self):
        self.fused = dict.fromkeys(KINDS, 0)
        self.left = dict.fromkeys(KINDS, 0)

    def as_dict(self) -> dict:
        return {k: {"fused": self.fused[k], "left in torch": self.left[k]} for k in KINDS
                if self.fused[k] or self.left[k]}


_state = threading.local()  # .counts: CallCounts of the forward running on this thread


def count_module_call() -> None:
    """Called by the patched Dropout modules (when they drop something)."""
    counts = getattr(_state, "counts", None)
    if counts is not None:
        counts.fused[MODULE] += 1


def _fusable(x, p, training) -> bool:
    """Whether fusedreg computes exactly what torch would; anything else goes to torch (which
    also raises torch's own error for a bad p)."""
    return (type(x) is torch.Tensor and x.dtype in _FLOATS and x.layout == torch.strided
            and x.device.type in ("cpu", "cuda") and isinstance(p, (int, float))
            and not isinstance(p, bool) and 0.0 <= p <= 1.0 and isinstance(training, bool))


def _bind(args, kwargs, names=("input", "p", "training", "inplace"), defaults=(0.5, True, False)):
    values = list(args) + [None] * (len(names) - len(args))
    for i, name in enumerate(names):
        if name in kwargs:
            values[i] = kwargs[name]
        elif i >= len(args):
            values[i] = defaults[i - 1]
    return values


def _dropout(counts, func, args, kwargs):
    if func is torch.dropout:  # torch.dropout(input, p, train)
        x, p, training = _bind(args, kwargs, ("input", "p", "train"), (0.5, True))
        inplace = False
    else:
        x, p, training, inplace = _bind(args, kwargs)
    if not _fusable(x, p, training) or not isinstance(inplace, bool):
        if training and p:
            counts.left[FUNCTIONAL] += 1
        return func(*args, **kwargs)
    if not training or p == 0.0:
        return func(*args, **kwargs)
    counts.fused[FUNCTIONAL] += 1
    return F.dropout(x, p, True, inplace=inplace)


# dropoutNd: input dims torch treats as batched / unbatched, and whether unbatched
# inputs get a leading batch dim (the mask then has one element per channel only)
_CHANNEL_DIMS = {TF.dropout1d: (3, 2), TF.dropout2d: (4, None), TF.dropout3d: (5, 4)}


def _channel_dropout(counts, func, args, kwargs):
    x, p, training, inplace = _bind(args, kwargs)
    batched, unbatched = _CHANNEL_DIMS[func]
    if (not _fusable(x, p, training) or not isinstance(inplace, bool)
            or x.dim() not in (batched, unbatched)):
        if training and p:
            counts.left[CHANNEL] += 1
        return func(*args, **kwargs)  # torch's warnings and errors for odd ranks
    if not training or p == 0.0:
        return func(*args, **kwargs)
    lead = 2 if x.dim() == batched else 1
    shape = tuple(x.shape[:lead]) + (1,) * (x.dim() - lead)
    mask = F.dropout(torch.ones(shape, dtype=x.dtype, device=x.device), p, True)
    counts.fused[CHANNEL] += 1
    return x.mul_(mask) if inplace else x * mask


def _alpha(counts, func, args, kwargs):
    _, p, training, _ = _bind(args, kwargs)
    if training and p:
        counts.left[ALPHA] += 1
    return func(*args, **kwargs)


def _sdpa(counts, func, args, kwargs):
    p = args[4] if len(args) > 4 else kwargs.get("dropout_p", 0.0)
    if not p:
        return func(*args, **kwargs)
    try:
        bound = _attention.bind(*args, **kwargs)
    except TypeError:  # arguments sdpa's signature does not take: torch's own error
        counts.left[SDPA] += 1
        return func(*args, **kwargs)
    out, fused = _attention.sdpa_call(*bound)
    if fused:
        counts.fused[SDPA] += 1
    else:
        counts.left[SDPA] += 1
    return out


_HANDLERS = {TF.dropout: _dropout, torch.dropout: _dropout,
             TF.dropout1d: _channel_dropout, TF.dropout2d: _channel_dropout,
             TF.dropout3d: _channel_dropout,
             TF.alpha_dropout: _alpha, TF.feature_alpha_dropout: _alpha,
             TF.scaled_dot_product_attention: _sdpa}


class DropoutCallMode(TorchFunctionMode):
    """Routes the functional dropouts called on this thread to fusedreg (see the module doc)."""

    def __init__(self, counts: CallCounts):
        super().__init__()
        self.counts = counts

    def __torch_function__(self, func, types, args=(), kwargs=None):
        handler = _HANDLERS.get(func)
        if handler is None:
            return func(*args, **(kwargs or {}))
        return handler(self.counts, func, args, kwargs or {})


# ---- the hooks that put the mode on the stack during a patched forward ---------------------

def _pre_hook(module, args):
    if torch.compiler.is_compiling():
        return
    depth = getattr(_state, "depth", 0)
    if depth == 0:  # outermost patched module on this thread: a new forward
        _state.counts = CallCounts()
        _state.mode = DropoutCallMode(_state.counts)
        _state.mode.__enter__()
    _state.depth = depth + 1


def _post_hook(module, args, output):
    if torch.compiler.is_compiling():
        return
    depth = getattr(_state, "depth", 0)
    if depth == 0:
        return
    _state.depth = depth - 1
    if depth == 1:
        _state.mode.__exit__(None, None, None)
        _state.mode = None
        module.__dict__[LAST] = _state.counts
        _state.counts = None


LAST = "_fusedreg_last_calls"   # CallCounts of the last forward that started at this module
HOOKS = "_fusedreg_call_hooks"  # the hook handles, removed by unpatch


def entry_points(model: torch.nn.Module):
    """The root and every ModuleList member (a block gradient checkpointing may recompute)."""
    seen = {id(model)}
    yield model
    for m in model.modules():
        if isinstance(m, torch.nn.ModuleList):
            for child in m:
                if id(child) not in seen:
                    seen.add(id(child))
                    yield child


def install(model: torch.nn.Module) -> int:
    n = 0
    for m in entry_points(model):
        if HOOKS in m.__dict__:
            continue
        m.__dict__[HOOKS] = (m.register_forward_pre_hook(_pre_hook),
                             m.register_forward_hook(_post_hook, always_call=True))
        n += 1
    return n


def uninstall(model: torch.nn.Module) -> None:
    for m in model.modules():
        handles = m.__dict__.pop(HOOKS, None)
        if handles:
            for h in handles:
                h.remove()
        m.__dict__.pop(LAST, None)
