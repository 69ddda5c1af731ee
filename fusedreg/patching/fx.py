"""Fusions without rewriting the model: one FX pass over the graphs that Dynamo captures from
the model's own forward, used two ways.

- ``fusedreg.compile(model)`` (or ``torch.compile(model, backend=fusedreg.compile_backend)``):
  the pass, then Inductor (``torch._inductor.compile_fx.compile_fx``) compiles the rest.
- ``fusedreg.patch(model, fuse=True)``: the pass, then the rewritten graph runs eagerly
  (no code generation): ``model.compile(backend=...)`` with a backend that returns the
  rewritten ``GraphModule``. Dynamo captures each graph once per input shape/mode (its guards
  decide when to capture again); whatever it cannot capture runs as plain eager code, with
  the patched modules.

While fusedreg captures a graph (``capturing()``), the modules ``patch`` swapped present
torch's functional ops to Dynamo (``torch.nn.functional.dropout``, ``layer_norm``,
``rms_norm``, ``gelu``), so the pass sees the model's dataflow; outside a fusedreg capture
(eager, or a plain ``torch.compile``) they run fusedreg's kernels as before.

The patterns, matched on the Dynamo graph (torch-level calls), each replaced by one fusedreg
call only when the dtypes and shapes are the ones that call computes exactly (same dtype for
input and residual, weights of that dtype or float32 with half inputs, and the replaced node's
traced dtype equal to what fusedreg returns: an autocast region that changes a dtype is left
alone):

    act(x + b) [-> dropout] [-> + r]      ->  F.bias_dropout(x, b, r, p, activation=act)
        (x + b also as ``F.linear(x, W, b)`` or ``addmm(b, x, W)`` [-> view]: the bias is
        split off the matmul; without a bias only when a dropout follows)
    dropout(x) -> + r -> norm             ->  F.dropout_add_layer_norm(x, r, w, b, p, prenorm=
                                              the sum is used again, rms=RMSNorm)
    x + r -> norm                         ->  F.dropout_add_layer_norm(..., p=0)
    dropout(x) -> + r                     ->  F.bias_dropout(x, None, r, p)
    dropout(x), layer_norm(x), rms_norm(x) alone -> the fusedreg function of the same name
    scaled_dot_product_attention(..., dropout_p > 0) -> _attention.sdpa (torch's math-kernel
                                              chain with fusedreg's dropout, where torch
                                              would run that kernel)

An activation with no dropout after it is replaced only where that is faster
(``ACT_WITHOUT_DROPOUT``: per device and activation, from a number of elements up); so are a
layer_norm alone, or x + r -> layer_norm, or an rms_norm alone, which under the auto backend keep torch's nodes below ``AUTO_TORCH_BELOW``'s size limit
for that norm (``_torch_norm_faster``; fusedreg's function would call torch's op there anyway);
for Inductor only the patterns with an active dropout are replaced (it fuses the others
itself), and those only from ``INDUCTOR_DROPOUT_FROM`` elements up.

Masks come from fusedreg's seeded function (docs/design.md, "The dropout mask") with a seed
drawn per call from torch's generator, as in eager fusedreg. What the pass could not replace is
counted: ``stats(model)`` / ``fusedreg.patching.report(model)``.
"""
from __future__ import annotations

import operator
import os

import torch
import torch.nn.functional as TF
from torch import fx

from .. import backends
from .. import functional as F
from . import _attention

# torch's functions as graphs name them (bound now: while a patched eager forward runs, the
# torch.nn.functional names hold fusedreg's routers, patching/_calls.py)
_DROPOUT, _SDPA = TF.dropout, TF.scaled_dot_product_attention
_ALL_DROPOUTS = (TF.dropout, TF.dropout1d, TF.dropout2d, TF.dropout3d, TF.alpha_dropout,
                 TF.feature_alpha_dropout, torch.dropout)

# ---- capture flag: read by the patched modules' forward ------------------------------------

_active = False


def capturing() -> bool:
    """True while fusedreg's own torch.compile path traces (Dynamo guards on it)."""
    return _active and torch.compiler.is_compiling()


_DYNAMO = torch._dynamo.config


def _enter():
    """Turns the capture flag on; returns what ``_exit`` restores. Dropout probabilities and
    eps go in the graph as constants (``specialize_float``: Dynamo would otherwise turn a float
    that changed between captures into a graph input the pass cannot read). Set directly on
    every call of a captured model: ``config.patch`` cost about 140 us per forward, this 10."""
    global _active
    before, floats = _active, _DYNAMO.specialize_float
    _active = True
    if not floats:
        _DYNAMO.specialize_float = True
    return before, floats


def _exit(state) -> None:
    global _active
    _active, floats = state
    if not floats:
        _DYNAMO.specialize_float = False


# ---- pattern names -----------------------------------------------------------------------

BIAS_ACT = "bias + activation (+ dropout) (+ residual add)"
DROPOUT_ADD_NORM = "dropout + residual add + norm"
ADD_NORM = "residual add + norm"
DROPOUT_ADD = "dropout + residual add"
DROPOUT = "dropout alone"
NORM = "norm alone"
LEFT_DROPOUT = "dropout left in torch"
ATTENTION = "attention dropout (torch's math-kernel chain with fusedreg's dropout)"
LEFT_SDPA = "attention dropout inside scaled_dot_product_attention left in torch"
LEFT_NORM = "norm left in torch"
SMALL_NORM = "norm left in torch (under auto's size limit, where torch's op is faster)"
SMALL_DROPOUT = "dropout left to Inductor (fewer elements than INDUCTOR_DROPOUT_FROM)"

# Under Inductor a dropout pattern is replaced from this many elements (of the dropout's
# input; for SDPA's dropout, attention scores) up; a smaller one is left to Inductor, which fuses it into its neighbours' kernel
# with its own random numbers. Measured on CPU, fp32, one thread, forward + backward of a
# linear -> dropout -> add -> layer_norm -> gelu -> dropout block, torch.compile against
# fusedreg.compile (interleaved, 200 rounds): fusedreg's calls cost more than the dropout they
# replace at 256 and 1024 elements (0.81x, 0.88-0.90x), break even at 2048 (0.98-1.02x) and win
# from 4096 (1.17-1.26x, 1.83x at 16K); GPT-2 at batch 1 x 8 tokens trained 0.96x as fast as
# under torch.compile while its 64-score attention dropouts were replaced, 1.00x left to
# Inductor. A symbolic size is always replaced. The same limit
# serves CUDA, not measured there yet (a kernel launch per fusedreg call favours Inductor's
# fused kernel at small sizes too).
INDUCTOR_DROPOUT_FROM = 2048

_HALF = (torch.float16, torch.bfloat16)
_FLOATS = _HALF + (torch.float32, torch.float64)


def _val(node):
    v = node.meta.get("example_value") if isinstance(node, fx.Node) else None
    return v if isinstance(v, torch.Tensor) else None


def _ok_tensor(node) -> bool:
    v = _val(node)
    return v is not None and v.dtype in _FLOATS and v.device.type in ("cpu", "cuda")


def _arg(node, i, name, default):
    if len(node.args) > i:
        return node.args[i]
    return node.kwargs.get(name, default)


def _dropout_args(node):
    """(x, p, active) of a dropout node fusedreg can compute, else None."""
    if node.op != "call_function" or node.target is not _DROPOUT:
        return None
    x = _arg(node, 0, "input", None)
    p, training = _arg(node, 1, "p", 0.5), _arg(node, 2, "training", True)
    inplace = _arg(node, 3, "inplace", False)
    if (not isinstance(x, fx.Node) or not _ok_tensor(x) or inplace is not False
            or not isinstance(training, bool) or isinstance(p, bool)
            or not isinstance(p, (int, float)) or not 0.0 <= p <= 1.0):
        return None
    return x, float(p), training and p > 0.0


def _add_args(node):
    """(a, b) of a tensor + tensor of one shape and dtype (torch.add without alpha)."""
    if node.op != "call_function" or node.target not in (operator.add, torch.add):
        return None
    if len(node.args) != 2 or node.kwargs:
        return None
    a, b = node.args
    va, vb = _val(a), _val(b)
    if va is None or vb is None or va.shape != vb.shape or va.dtype != vb.dtype:
        return None
    return a, b


_NORMS = (TF.layer_norm, TF.rms_norm, torch.rms_norm)  # Dynamo records F.rms_norm as torch's


def _norm_args(node):
    """(x, shape, weight, bias, eps, rms) of a layer_norm / rms_norm node, else None."""
    if node.op != "call_function" or node.target not in _NORMS:
        return None
    rms = node.target in (TF.rms_norm, torch.rms_norm)
    x = _arg(node, 0, "input", None)
    shape = _arg(node, 1, "normalized_shape", None)
    weight = _arg(node, 2, "weight", None)
    bias = None if rms else _arg(node, 3, "bias", None)
    eps = _arg(node, 3 if rms else 4, "eps", None if rms else 1e-5)
    vx = _val(x)
    if vx is None or not _ok_tensor(x) or isinstance(shape, fx.Node):
        return None
    shape = (shape,) if isinstance(shape, int) else tuple(shape)
    if not shape or not all(isinstance(d, int) for d in shape) or tuple(vx.shape[-len(shape):]) != shape:
        return None
    if eps is None:
        eps = float(torch.finfo(vx.dtype).eps)
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps > 0:
        return None
    for t in (weight, bias):
        if t is None:
            continue
        vt = _val(t)
        if (vt is None or tuple(vt.shape) != shape or vt.device != vx.device
                or not (vt.dtype == vx.dtype or (vx.dtype in _HALF and vt.dtype == torch.float32))):
            return None
    if weight is not None and bias is not None and _val(weight).dtype != _val(bias).dtype:
        return None
    vy = _val(node)
    if vy is None or vy.dtype != vx.dtype:  # autocast changed the dtype: not what fusedreg returns
        return None
    return x, shape, weight, bias, float(eps), rms


def _torch_norm_faster(rms: bool, x, weight, bias) -> bool:
    """Whether, eagerly under the auto backend, torch's own norm node is faster than
    fusedreg's call at the traced size: fewer elements than ``backends.AUTO_TORCH_BELOW``'s
    limit for a plain norm of that kind and dtype (with or without grad), the size below which
    fusedreg's functional norm itself calls torch's op. Decided when the graph is captured
    (False for a symbolic size, or under an explicit backend)."""
    vx = _val(x)
    n = vx.numel()
    if not isinstance(n, int):
        return False
    name = "rms_norm" if rms else "layer_norm"
    if vx.dtype in _HALF:
        if rms:
            return False
        name += "_half"
    limits = backends.auto_torch_limits(name, vx.device.type)
    if limits is None:
        return False
    grad = torch.is_grad_enabled() and any(
        v is not None and v.requires_grad for v in (vx, _val(weight), _val(bias)))
    return n < limits[1 if grad else 0]


_ACTIVATIONS = {TF.relu: "relu", torch.relu: "relu", TF.silu: "silu", TF.gelu: None}


def _activation(node):
    """(input, fusedreg activation name) of an activation node, else None."""
    if node.op != "call_function" or node.target not in _ACTIVATIONS:
        return None
    name = _ACTIVATIONS[node.target]
    if node.target is TF.gelu:
        approx = _arg(node, 1, "approximate", "none")
        name = {"none": "gelu", "tanh": "gelu_tanh"}.get(approx)
    elif _arg(node, 1, "inplace", False) is not False:
        return None
    x = node.args[0] if node.args else None
    if name is None or not isinstance(x, fx.Node) or _val(node) is None:
        return None
    return x, name


_LEVELS = ("baseline", "avx2", "avx512")


def _cpu_kernels_level() -> str:
    """The instruction-set level fusedreg's CPU kernels run at (fusedreg/cpu/isa.h): the CPU's,
    which torch checks for the same features, unless FUSEDREG_CPU_ISA caps it."""
    is_avx512 = getattr(torch.cpu, "_is_avx512_supported", None)
    is_avx2 = getattr(torch.cpu, "_is_avx2_supported", None)
    level = "avx512" if is_avx512 and is_avx512() else ("avx2" if is_avx2 and is_avx2() else "baseline")
    cap = os.environ.get("FUSEDREG_CPU_ISA")
    if cap in _LEVELS and _LEVELS.index(cap) < _LEVELS.index(level):
        level = cap
    return level


def _cpu_kernels_at_avx512() -> bool:
    """Whether fusedreg's CPU kernels run at the AVX-512 level."""
    return _cpu_kernels_level() == "avx512"


# bias + activation with no dropout after it: replaced only where fusedreg's kernel is faster
# than torch's activation (torch adds the bias inside the matmul, addmm, at no cost), from the
# number of elements given here up. Measured on CPU, fp32, one thread, forward + backward and
# under no_grad, rows x 768: gelu_tanh 1.5-2.2x faster from 32 rows (16K elements) up, but
# 0.62x at one row and 0.92x at 8 (the op's Python call costs more than torch's activation
# there); relu and silu no faster. gelu (erf), mm + fused call against torch's addmm + gelu,
# rows x 1024 for 1 to 8192 rows, 256 and 768 wide for 1 to 64 rows: 1.2-1.6x forward and
# 1.05-1.5x forward + backward at every size, so from 0 up -- where the kernels run at the
# AVX-512 level (their float32 GELU forward is a table of polynomials there, fusedreg/cpu/
# vmath.h); capped at AVX2 (FUSEDREG_CPU_ISA=avx2, torch at AVX2 too) it was 0.1-0.6x from 8
# rows up, so it is left to torch there; gelu_tanh at the baseline level (SSE2, no AVX2) was
# 0.79x torch's at 64 x 768 (98 against 78 us, forward), so it is left to torch there too. On
# CUDA (not measured yet) every activation, one pass instead of the bias and activation
# kernels. Under Inductor never: it fuses them itself.
def _cpu_activation_limits(level: str) -> dict:
    """ACT_WITHOUT_DROPOUT["cpu"] for kernels running at ``level`` (see above)."""
    limits = {}
    if level in ("avx2", "avx512"):
        limits["gelu_tanh"] = 1 << 14
    if level == "avx512":
        limits["gelu"] = 0
    return limits


ACT_WITHOUT_DROPOUT = {"cpu": _cpu_activation_limits(_cpu_kernels_level()),
                       "cuda": {"relu": 0, "gelu": 0, "gelu_tanh": 0, "silu": 0}}


def _activation_faster(name: str, vy) -> bool:
    """Whether fusedreg's bias + activation beats torch's at the traced output ``vy`` (no
    dropout after it): ``ACT_WITHOUT_DROPOUT`` (a limit of 0 holds at every size, symbolic
    ones too; any other limit is False for a symbolic size)."""
    least = ACT_WITHOUT_DROPOUT.get(vy.device.type, {}).get(name)
    n = vy.numel()
    return least is not None and (least == 0 or (isinstance(n, int) and n >= least))


class _Rewriter:
    """``inductor``: the graph goes to Inductor, which fuses element-wise chains, norms and
    bias + activation itself; only the patterns with an active dropout are replaced there
    (fusedreg's seeded dropout is what Inductor cannot do as well). Eagerly every pattern is."""

    def __init__(self, gm: fx.GraphModule, inductor: bool = False):
        self.gm, self.g = gm, gm.graph
        self.inductor = inductor
        self.stats: dict = {}

    def count(self, what, n=1):
        self.stats[what] = self.stats.get(what, 0) + n

    def small_for_inductor(self, node=None, n=None) -> bool:
        """Whether a dropout of ``node``'s value (or of ``n`` elements) is left to Inductor
        (INDUCTOR_DROPOUT_FROM; a symbolic or unknown size is not)."""
        if node is not None:
            v = _val(node)
            n = v.numel() if v is not None else None
        return self.inductor and isinstance(n, int) and n < INDUCTOR_DROPOUT_FROM

    def only_user(self, node):
        users = list(node.users)
        return users[0] if len(users) == 1 else None

    def call(self, before, fn, *args, **kwargs):
        with self.g.inserting_before(before):
            return self.g.call_function(fn, args, kwargs)

    def replace(self, old, new, val=None):
        old.replace_all_uses_with(new)
        new.meta["example_value"] = _val(old) if val is None else val

    def split_bias(self, t):
        """(build, b, dead) when t is x + b, linear(x, W, b) or [view of] addmm(b, x, W) with a
        1-D bias over the last dim: ``build()`` inserts the bias-free x before t."""
        if t.op == "call_method" and t.target == "view" and len(t.users) == 1:
            mm = t.args[0]
            if (isinstance(mm, fx.Node) and mm.op == "call_function" and mm.target is torch.addmm
                    and len(mm.args) == 3 and not mm.kwargs and len(mm.users) == 1):
                b, x2, w = mm.args

                def build():
                    with self.g.inserting_before(t):
                        m = self.g.call_function(torch.mm, (x2, w))
                        v = self.g.call_method("view", (m,) + tuple(t.args[1:]), dict(t.kwargs))
                    m.meta["example_value"], v.meta["example_value"] = _val(mm), _val(t)
                    return v
                return build, b, [t, mm]
            return None
        if t.op != "call_function" or len(t.users) != 1:
            return None
        if t.target in (operator.add, torch.add) and len(t.args) == 2 and not t.kwargs:
            for x, b in (t.args, t.args[::-1]):
                vx, vb = _val(x), _val(b)
                if vx is not None and vb is not None and vb.dim() == 1 and vx.dim() >= 1 \
                        and vb.shape[0] == vx.shape[-1] and vx.shape == _val(t).shape \
                        and vx.dtype == vb.dtype == _val(t).dtype:  # no type promotion
                    return (lambda x=x: x), b, [t]
            return None
        if t.target is TF.linear:
            x_in = _arg(t, 0, "input", None)
            w, b = _arg(t, 1, "weight", None), _arg(t, 2, "bias", None)
            if not isinstance(b, fx.Node):
                return None

            def build():
                with self.g.inserting_before(t):
                    n = self.g.call_function(TF.linear, (x_in, w))
                n.meta["example_value"] = _val(t)
                return n
            return build, b, [t]
        return None

    # act(x + b) [-> dropout] [-> + r]
    def bias_activation(self, act):
        found = _activation(act)
        if found is None:
            return
        t, name = found
        if not isinstance(t, fx.Node) or self.only_user(t) is not act:
            return
        split = self.split_bias(t)
        vy = _val(act)
        user = self.only_user(act)
        d = _dropout_args(user) if user is not None else None
        dropped = d is not None and d[0] is act and d[2]
        if dropped and self.small_for_inductor(act):
            return
        if not dropped and (self.inductor or vy is None or not _activation_faster(name, vy)):
            return
        if split is None:  # no bias: worth a call only when a dropout follows (T5's relu)
            if not dropped or not _ok_tensor(act):
                return
            split = ((lambda: t), None, [])
        build, b, dead = split
        vb = _val(b) if b is not None else vy.new_empty(vy.shape[-1:])
        if (vb is None or vy is None or vb.dtype != vy.dtype or vb.dim() != 1
                or vb.shape[0] != vy.shape[-1] or not _ok_tensor(act)):
            return
        end, p, residual, drop = act, 0.0, None, None
        user = self.only_user(act)
        if user is not None:
            d = _dropout_args(user)
            if d is not None and d[0] is act:
                drop = user
                end, p = drop, (d[1] if d[2] else 0.0)
        add = self.only_user(end)
        if add is not None:
            a = _add_args(add)
            if a is not None and end in a and a[0] is not a[1] and _val(add).shape == vy.shape:
                residual = a[1] if a[0] is end else a[0]  # an input of add: before it
                end = add
        x = build()
        new = self.call(end, F.bias_dropout, x, b, residual, p, True, name)
        self.replace(end, new)
        self.count(BIAS_ACT)
        self.dead.extend(n for n in (end, drop, act) + tuple(dead) if n is not None)

    def dropout_chain(self, node):
        """node: a dropout, or an add with a norm user."""
        d = _dropout_args(node)
        if d is not None:
            x, p, active = d
            if not active:
                p = 0.0
            if p and self.small_for_inductor(x):
                return
            add = self.only_user(node)
            a = _add_args(add) if add is not None else None
            if a is not None and a[0] is not a[1]:
                residual = a[1] if a[0] is node else a[0]
                if self.add_norm(add, x, residual, p, DROPOUT_ADD_NORM if p else ADD_NORM, node):
                    return
                if p:
                    new = self.call(add, F.bias_dropout, x, None, residual, p, True)
                    self.replace(add, new)
                    self.dead.extend((add, node))
                    self.count(DROPOUT_ADD)
                    return
            if p:
                new = self.call(node, F.dropout, x, p, True)
                self.replace(node, new)
                self.dead.append(node)
                self.count(DROPOUT)
            return
        a = _add_args(node)
        if a is not None and a[0] is not a[1]:
            self.add_norm(node, a[0], a[1], 0.0, ADD_NORM, None)

    def add_norm(self, add, x, residual, p, what, drop):
        if self.inductor and not p:
            return False
        norms = [u for u in add.users if _norm_args(u) is not None and _norm_args(u)[0] is add]
        if len(norms) != 1:
            return False
        norm = norms[0]
        _, shape, weight, bias, eps, rms = _norm_args(norm)
        vx, vr = _val(x), _val(residual)
        if vx is None or vr is None or vx.dtype != vr.dtype or vx.shape != vr.shape:
            return False
        if weight is None and bias is None and len(shape) != 1:
            return False  # dropout_add_layer_norm takes the norm's shape from weight or bias
        if not p and not rms and _torch_norm_faster(rms, add, weight, bias):
            # torch's add and layer_norm are faster than the fused call at this size (one
            # thread, forward + backward: 0.61x at 8x768, 0.79x at 512x128, 0.87x at 1024x256,
            # 1.34x at 4096x768); an RMSNorm's fused add + norm beats torch's add and
            # rms_norm (a composite) at every size (1.2x at 8x64, 1.6x at 512x128)
            return False
        prenorm = len(add.users) > 1
        new = self.call(norm if not prenorm else add, F.dropout_add_layer_norm, x, residual,
                        weight, bias, p, eps, True, prenorm, rms)
        if prenorm:
            # the sum is used before the norm runs in the graph's order: the call goes at the
            # sum's place, which every input of the norm precedes only if they are defined
            # before it; else leave this pattern
            if not all(self.before(a, add) for a in (weight, bias) if isinstance(a, fx.Node)):
                self.g.erase_node(new)
                return False
            with self.g.inserting_after(new):
                y = self.g.call_function(operator.getitem, (new, 0))
            with self.g.inserting_after(y):
                h = self.g.call_function(operator.getitem, (new, 1))
            self.replace(norm, y)
            self.replace(add, h)
        else:
            self.replace(norm, new)
        self.dead.extend(n for n in (norm, add, drop) if n is not None)
        self.count(what)
        return True

    def before(self, a, b):
        if a not in self.order or b not in self.order:  # a node this pass made
            self.order = {n: i for i, n in enumerate(self.g.nodes)}
        return self.order[a] < self.order[b]

    def leftovers(self, node):
        if node.op != "call_function":
            return
        if node.target is _SDPA:
            p = _arg(node, 4, "dropout_p", 0.0)
            vq, vy = _val(_arg(node, 0, "query", None)), _val(node)
            vk = _val(_arg(node, 1, "key", None))
            if p and vq is not None and vk is not None and vq.dim() >= 2 and vk.dim() >= 2 \
                    and self.small_for_inductor(n=_attention.scores(vq, vk)):
                self.count(SMALL_DROPOUT)
                return
            if p and vq is not None and vy is not None and vy.dtype == vq.dtype:
                # the same call, which runs the math kernel's chain with fusedreg's dropout
                # where torch would run its math kernel (_attention.py), else torch's (an
                # autocast dtype change is left alone)
                node.target = _attention.sdpa_traced if self.inductor else _attention.sdpa
                self.count(ATTENTION)
            elif p:
                self.count(LEFT_SDPA)
        elif node.target in _ALL_DROPOUTS:
            p = _arg(node, 1, "p", 0.5)
            training = _arg(node, 2, "training", True)
            x = _arg(node, 0, "input", None)
            if training is not False and p:
                self.count(SMALL_DROPOUT if self.small_for_inductor(x) else LEFT_DROPOUT)
        elif node.target in _NORMS and not self.inductor:
            n = _norm_args(node)
            if n is None:
                self.count(LEFT_NORM)
                return
            x, shape, weight, bias, eps, rms = n
            if _torch_norm_faster(rms, x, weight, bias):
                self.count(SMALL_NORM)  # what fusedreg's function would call anyway
                return
            if rms:
                new = self.call(node, F.rms_norm, x, shape, weight, eps)
            else:
                new = self.call(node, F.layer_norm, x, shape, weight, bias, eps)
            self.replace(node, new)
            self.dead.append(node)
            self.count(NORM)

    def run(self):
        self.dead = []
        self.order = {n: i for i, n in enumerate(self.g.nodes)}
        for node in list(self.g.nodes):
            if node.op == "call_function" and node not in self.dead:
                self.bias_activation(node)
        self._sweep()
        self.order = {n: i for i, n in enumerate(self.g.nodes)}
        for node in list(self.g.nodes):
            if node.op == "call_function" and node not in self.dead:
                self.dropout_chain(node)
        self._sweep()
        for node in list(self.g.nodes):
            self.leftovers(node)
        self._sweep()
        self.g.lint()
        self.gm.recompile()
        return self.stats

    def _sweep(self):
        for node in reversed(list(self.g.nodes)):
            if node in self.dead and not node.users:
                self.g.erase_node(node)
        self.dead = []


def rewrite(gm: fx.GraphModule, inductor: bool = False) -> dict:
    """Rewrites a Dynamo graph in place (for Inductor: only the patterns with a dropout);
    returns {pattern: count}."""
    return _Rewriter(gm, inductor).run()


def make_backend(stats: list, inductor: bool):
    """A torch.compile backend: the rewrite, then Inductor (or the eager graph)."""
    def backend(gm: fx.GraphModule, example_inputs):
        stats.append(rewrite(gm, inductor))
        if not inductor:
            return gm.forward
        from torch._inductor.compile_fx import compile_fx
        return compile_fx(gm, example_inputs)
    return backend


# ---- patch(model, fuse=True) ---------------------------------------------------------------

STATS = "_fusedreg_fx_stats"


def _total(graphs: list) -> dict:
    out: dict = {}
    for s in graphs:
        for k, n in s.items():
            out[k] = out.get(k, 0) + n
    return out


def stats(model) -> dict:
    """{pattern: count} summed over the graphs captured so far for ``model``."""
    return _total(model.__dict__.get(STATS, []))


def run_captured(fn):
    """Calls the compiled ``fn`` with the capture flag on (see the module doc)."""
    def call(*args, **kwargs):
        state = _enter()
        try:
            return fn(*args, **kwargs)
        finally:
            _exit(state)
    return call


def fuse(model) -> None:
    if model.__dict__.get(STATS) is not None:
        return
    graphs: list = []
    model.__dict__[STATS] = graphs
    model.compile(backend=make_backend(graphs, inductor=False))
    model._compiled_call_impl = run_captured(model._compiled_call_impl)


def unfuse(model) -> None:
    model.__dict__.pop(STATS, None)
    model._compiled_call_impl = None
