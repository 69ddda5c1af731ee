"""Dropout call sites that are functions, not modules: while a patched model's forward runs,
``torch.nn.functional.dropout`` / ``dropout1d`` / ``dropout2d`` / ``dropout3d`` (and
``torch.dropout``, ``alpha_dropout``, ``feature_alpha_dropout``,
``scaled_dot_product_attention``) called on that thread go to fusedreg, and what ran fused and
what stayed in torch in the last forward is counted per call-site kind.

Why: Hugging Face and timm forwards call ``nn.functional.dropout(x, p, training=...)`` inline,
so there is no module to swap. How: a forward pre-hook on the patched root module and on every
member of a ``ModuleList`` (the blocks that gradient checkpointing recomputes in backward: the
recomputation must draw the same fusedreg masks as the forward) turns routing on for the
calling thread and, while any patched forward runs, puts a router in place of each of those
functions -- in ``torch.nn.functional`` and ``torch`` (reached as ``F.dropout``,
``nn.functional.dropout``, ``torch.dropout``, and by ``torch.nn.functional``'s own functions)
and under any other name a patched module's forward module binds it to (``from
torch.nn.functional import dropout as drop``: found when the model is patched). A forward hook
(``always_call=True``, so an exception too) turns routing off, and the last forward on any
thread puts torch's functions back. A router on a thread that is not in a patched forward, or
under ``torch.compile``'s tracing, is torch's function plus one check (about 0.2 us).

The price is paid per patched forward (about 7 us: the hooks and the name swaps) and per
dropout call (about 3 us for one torch keeps; measured by ``fusedreg.bench.models``), not by the
other torch calls of the forward: an earlier ``TorchFunctionMode`` saw every
torch function called in the forward and cost about 2 us on each of them, which made small
patched models slower than unpatched ones. What this cannot see: a dropout bound under another
name in a module other than the patched modules' own (a helper library doing ``from
torch.nn.functional import dropout``), or a reference taken before the forward started; such
calls run torch's dropout and are not counted. Under ``torch.compile`` the hooks do nothing:
Dynamo sees the model's own calls (``fusedreg.compile`` rewrites them in the graph instead);
a model that always runs compiled has none on its root (``install``).

Channel-wise dropouts (``dropout1d/2d/3d``) draw one fusedreg mask element per (sample,
channel) and multiply: the mask is the seeded function of docs/design.md at the channel
shape. Attention dropout inside ``scaled_dot_product_attention`` runs fusedreg's dropout
where torch would run its math kernel (on CPU: ``_attention.py``); where torch runs a fused
attention kernel (GPU), it stays there. ``alpha_dropout`` and ``feature_alpha_dropout`` have no fusedreg
kernel. What stays in torch is counted as such.
"""
from __future__ import annotations

import functools
import threading

import torch
import torch.nn.functional as TF

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
               SDPA: "left in torch where torch runs a fused attention kernel, which draws its "
                     f"own mask, and for calls with under {_attention.MIN_SCORES} attention scores "
                     "(batch x heads x L x S), where torch's own call is faster"}

_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class CallCounts:
    """Per call-site kind: calls that dropped something, fused (fusedreg) or left in torch."""

    def __init__(self):
        self.fused = dict.fromkeys(KINDS, 0)
        self.left = dict.fromkeys(KINDS, 0)

    def as_dict(self) -> dict:
        return {k: {"fused": self.fused[k], "left in torch": self.left[k]} for k in KINDS
                if self.fused[k] or self.left[k]}


# per thread: .counts, the CallCounts of the forward running here; .routing, the same while
# dropout calls go to fusedreg (None inside a handler); .depth, patched forwards entered
_state = threading.local()


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
    if func is _TORCH_DROPOUT:  # torch.dropout(input, p, train)
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


# ---- the routers, and the names they stand in for while a patched forward runs -------------

_TORCH_DROPOUT = torch.dropout
_HANDLERS = {TF.dropout: _dropout, _TORCH_DROPOUT: _dropout,
             TF.dropout1d: _channel_dropout, TF.dropout2d: _channel_dropout,
             TF.dropout3d: _channel_dropout,
             TF.alpha_dropout: _alpha, TF.feature_alpha_dropout: _alpha,
             TF.scaled_dot_product_attention: _sdpa}


def _router(original, handler):
    """``original`` with this thread's routing: the handler while a patched forward runs here
    (with routing off, so that the handler's own torch calls are torch's), else ``original``."""
    def routed(*args, **kwargs):
        if not torch.compiler.is_compiling():
            counts = getattr(_state, "routing", None)
            if counts is not None:
                _state.routing = None
                try:
                    return handler(counts, original, args, kwargs)
                finally:
                    _state.routing = counts
        return original(*args, **kwargs)
    functools.update_wrapper(routed, original)
    return routed


ROUTERS = {f: _router(f, h) for f, h in _HANDLERS.items()}
_BY_ID = {id(f): f for f in _HANDLERS}       # identity lookups: a namespace may hold
_ORIGINAL = {id(r): f for f, r in ROUTERS.items()}  # unhashable values


class _Names:
    """The (namespace dict, name) slots that hold one of ``_HANDLERS``' functions: torch.nn.
    functional's and torch's own, and those found in patched modules' forward modules. While at
    least one patched forward runs (on any thread), each holds its router."""

    def __init__(self):
        self.lock = threading.Lock()
        self.running = 0
        self.slots: dict = {}  # (id(namespace), name) -> (namespace, name, original)
        for ns in (vars(TF), vars(torch)):
            self.add(ns)

    def add(self, ns: dict) -> None:
        found = [(name, v) for name, v in list(ns.items())
                 if v is not None and _BY_ID.get(id(v)) is v]
        with self.lock:
            for name, f in found:
                self.slots.setdefault((id(ns), name), (ns, name, f))
                if self.running and ns.get(name) is f:
                    ns[name] = ROUTERS[f]

    def enter(self) -> None:
        with self.lock:
            self.running += 1
            if self.running == 1:
                for ns, name, f in self.slots.values():
                    if ns.get(name) is f:
                        ns[name] = ROUTERS[f]

    def exit(self) -> None:
        with self.lock:
            self.running -= 1
            if self.running == 0:
                for ns, name, f in self.slots.values():
                    if ns.get(name) is ROUTERS[f]:
                        ns[name] = f


NAMES = _Names()


def original(fn):
    """torch's function for ``fn`` (itself, or the one a router stands in for)."""
    f = _ORIGINAL.get(id(fn))
    return f if f is not None and ROUTERS[f] is fn else fn


# ---- the hooks that turn routing on during a patched forward -------------------------------

def _pre_hook(module, args):
    if torch.compiler.is_compiling():
        return
    depth = getattr(_state, "depth", 0)
    if depth == 0:  # outermost patched module on this thread: a new forward
        _state.counts = _state.routing = CallCounts()
        NAMES.enter()
    _state.depth = depth + 1


def _post_hook(module, args, output):
    if torch.compiler.is_compiling():
        return
    depth = getattr(_state, "depth", 0)
    if depth == 0:
        return
    _state.depth = depth - 1
    if depth == 1:
        _state.routing = None
        NAMES.exit()
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


def install(model: torch.nn.Module, root: bool = True) -> int:
    """Hooks on the entry points (``root``: the root's too, else none there, and any it has
    are removed). A model that always runs compiled (``patch(model, fuse=True)``,
    ``fusedreg.compile``) gets none on its root: there they never route (Dynamo traces them,
    see the module doc), and a root with hooks makes Dynamo compile the pre-hook, the forward
    and the hook as three frames, each looked up and guarded on every call (Llama, width 256,
    4 layers, batch 1 x 32, patch(fuse=True): three cache lookups per forward under the
    profiler, one without them; the training step's time did not change measurably, within
    the 2% noise of 80-300 interleaved rounds here, at that size nor at width 64, batch
    1 x 8 under fusedreg.compile); the members' hooks are inlined into the graph."""
    # dropout functions bound under other names where forwards live: each module namespace
    # once (a model has many modules of few classes)
    namespaces = {id(ns): ns for ns in (getattr(getattr(type(m), "forward", None), "__globals__", None)
                                        for m in model.modules())
                  if isinstance(ns, dict) and ns is not vars(TF) and ns is not vars(torch)}
    for ns in namespaces.values():
        NAMES.add(ns)
    n = 0
    if not root:
        _remove(model)
    for m in entry_points(model):
        if HOOKS in m.__dict__ or (m is model and not root):
            continue
        m.__dict__[HOOKS] = (m.register_forward_pre_hook(_pre_hook),
                             m.register_forward_hook(_post_hook, always_call=True))
        n += 1
    return n


def _remove(m: torch.nn.Module) -> None:
    handles = m.__dict__.pop(HOOKS, None)
    if handles:
        for h in handles:
            h.remove()


def uninstall(model: torch.nn.Module) -> None:
    for m in model.modules():
        _remove(m)
        m.__dict__.pop(LAST, None)
