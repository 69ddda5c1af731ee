"""``fusedreg.patch(model)``: the one-line switch of an existing model to fusedreg
(docs/design.md, "Modules and drop-in use"). The function is ``fusedreg.patch``; this package
is ``fusedreg.patching`` (``from fusedreg.patching import patched_modules, report``).

What ``patch`` does, each part switchable:

- **modules** (``layer_norm``, ``rms_norm``, ``dropout``, ``batch_norm``): every exact
  ``torch.nn.LayerNorm``, ``RMSNorm``, ``Dropout``, ``BatchNorm1d/2d/3d`` and ``SyncBatchNorm``
  (and timm's ``BatchNormAct2d`` when timm is loaded) becomes the fusedreg module of the same
  name by swapping the
  object's class in place (``SWAPS``: one row per torch class, easy to extend). The fusedreg
  classes subclass torch's with the same constructor and state, so the object, its Parameters
  (an optimizer built before keeps working), buffers, hooks and ``state_dict`` keys stay.
  Subclasses of those torch classes are not swapped (they may override ``forward``).
- **norms of other libraries** (``norms``): classes recognized by what they compute
  (``fusedreg/patching/_norms.py``: T5LayerNorm, Llama/Qwen2/Mistral, Gemma's ``1 + weight``,
  OLMo2's RMSNorm, timm's LayerNorm, LayerNorm2d, RmsNorm, ...) get a class that runs fusedreg's
  norm on their own Parameters; a class that cannot be shown equal is left alone and reported.
- **functional dropouts** (``dropout``): ``nn.functional.dropout`` / ``dropout1d/2d/3d`` calls
  made inside the model's forward go to fusedreg too (``_calls.py``: routers that stand in
  for those functions only while a patched forward runs, and send only that thread's calls
  to fusedreg).
- **fusions** (``fuse=True``): dropout + residual add (+ LayerNorm/RMSNorm) and bias +
  activation (+ dropout) fused without rewriting the model (``fusedreg/patching/fx.py``).

``report(model)`` says, per kind, what was replaced, what was left alone and why, and, for
the last training forward, how many dropout calls ran fused and how many stayed in torch.
``unpatch(model)`` undoes everything.
"""
from __future__ import annotations

import logging
import sys
from typing import NamedTuple, Optional

from torch import nn

from .. import nn as fnn
from . import _acts, _calls, _norms, fx

__all__ = ["Dropout", "LayerNorm", "PatchReport", "RMSNorm", "SWAPS", "patch", "patched_modules", "report", "unpatch"]

log = logging.getLogger("fusedreg.patch")


# What patch swaps torch's classes for: fusedreg.nn's class of the same name, which while
# fusedreg's compile path traces (fx.capturing()) presents torch's op to Dynamo, so that the
# FX pass sees it and can fuse it with its neighbours.

class Dropout(fnn.Dropout):
    """``fusedreg.nn.Dropout`` that also counts its calls for ``report``."""

    def forward(self, input):
        if fx.capturing():
            return nn.Dropout.forward(self, input)
        if self.training and self.p > 0.0:
            _calls.count_module_call()
        return super().forward(input)


class LayerNorm(fnn.LayerNorm):
    """``fusedreg.nn.LayerNorm`` (see above)."""

    def forward(self, input):
        return nn.LayerNorm.forward(self, input) if fx.capturing() else super().forward(input)


class RMSNorm(fnn.RMSNorm):
    """``fusedreg.nn.RMSNorm`` (see above)."""

    def forward(self, x):
        return nn.RMSNorm.forward(self, x) if fx.capturing() else super().forward(x)


class Swap(NamedTuple):
    torch_class: type
    fused_class: type
    # a fused_class instance configured like module m (on the meta device where there is
    # state): checks that the fused class is a drop-in, and gives the swapped object any plain
    # attribute that the fusedreg constructor sets and the torch one does not
    template: object
    # the patch() option that switches it (None: the row's key)
    option: Optional[str] = None


def _batch_norm_template(cls, m):
    kwargs = dict(eps=m.eps, momentum=m.momentum, affine=m.affine,
                  track_running_stats=m.track_running_stats, device="meta")
    if issubclass(cls, nn.SyncBatchNorm):
        kwargs["process_group"] = m.process_group
    if issubclass(cls, fnn.BatchNormAct2d):  # the object keeps its own drop and act modules
        kwargs["apply_act"] = False
    return cls(m.num_features, **kwargs)


def _timm_swaps() -> dict:
    """timm's BatchNormAct2d row, only when timm is already loaded (a timm model's is; importing
    timm here would cost every patch call a second)."""
    norm_act = sys.modules.get("timm.layers.norm_act")
    if norm_act is None:
        return {}
    return {"timm_batch_norm_act2d": Swap(norm_act.BatchNormAct2d, fnn.BatchNormAct2d,
                                          _batch_norm_template, "batch_norm")}


# option -> the swap it switches; to add a module kind, add a row (and its option to patch)
SWAPS = {
    "layer_norm": Swap(nn.LayerNorm, LayerNorm, lambda cls, m: cls(
        m.normalized_shape, eps=m.eps, elementwise_affine=m.elementwise_affine,
        bias=getattr(m, "bias", None) is not None, device="meta")),
    "rms_norm": Swap(nn.RMSNorm, RMSNorm, lambda cls, m: cls(
        m.normalized_shape, eps=m.eps, elementwise_affine=m.elementwise_affine, device="meta")),
    "dropout": Swap(nn.Dropout, Dropout, lambda cls, m: cls(p=m.p, inplace=m.inplace)),
    **{name: Swap(getattr(nn, cls), getattr(fnn, cls), _batch_norm_template, "batch_norm")
       for name, cls in (("batch_norm1d", "BatchNorm1d"), ("batch_norm2d", "BatchNorm2d"),
                         ("batch_norm3d", "BatchNorm3d"), ("sync_batch_norm", "SyncBatchNorm"))},
}
OPTIONS = tuple(dict.fromkeys(s.option or k for k, s in SWAPS.items())) + (
    "norms", "activations", "fuse")
_EXACT = {s.torch_class for s in SWAPS.values()}

# Set on each replaced module: (the class it was, attributes patch added to it)
_MARK = "_fusedreg_patched_from"
_OPTIONS = "_fusedreg_patch_options"   # on the root: the options it was patched with
_LEFT = "_fusedreg_norms_left"         # on the root: {class name: why it was left alone}


def _class_name(cls: type) -> str:
    if cls.__module__.startswith("torch.nn"):
        return f"torch.nn.{cls.__name__}"
    return f"{cls.__module__}.{cls.__qualname__}"


def _check_model(model, fn: str) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"fusedreg.{fn} expects a torch.nn.Module, got {type(model).__name__}")


def _swap(module: nn.Module, swap: Swap) -> None:
    """Turns ``module`` (exactly of the torch class) into an instance of the fused class."""
    name = swap.torch_class.__name__
    try:
        template = swap.template(swap.fused_class, module)
    except (TypeError, ValueError) as e:
        raise RuntimeError(f"fusedreg.patch: cannot build fusedreg.nn.{name} like {module!r}: {e}") from e
    for kind in ("_parameters", "_buffers", "_modules"):
        extra = set(getattr(template, kind)) - set(getattr(module, kind))
        if extra:  # state the class swap cannot create: the fusedreg class is no drop-in
            raise RuntimeError(f"fusedreg.nn.{name} has {kind[1:]} {sorted(extra)} that "
                               f"torch.nn.{name} lacks; it cannot replace it in place")
    added = tuple(k for k in vars(template) if k not in vars(module))
    for k in added:
        module.__dict__[k] = vars(template)[k]
    module.__class__ = swap.fused_class
    module.__dict__[_MARK] = (swap.torch_class, added)


def patch(model: nn.Module, layer_norm: bool = True, rms_norm: bool = True, dropout: bool = True,
          batch_norm: bool = True, norms: bool = True, activations: bool = True, fuse: bool = False,
          **unknown) -> nn.Module:
    """Switches ``model`` to fusedreg in place (see the package doc); returns ``model``.

    ``layer_norm`` / ``rms_norm`` / ``dropout`` / ``batch_norm``: swap torch's modules of that
    kind (``dropout`` also routes functional dropouts called in the forward; ``batch_norm``
    covers BatchNorm1d/2d/3d, SyncBatchNorm and timm's BatchNormAct2d); ``norms``: recognized norm classes
    of other libraries; ``activations``: activation classes written as Python formulas
    (Hugging Face's ``NewGELUActivation``) become torch's single op; ``fuse``: the dropout/residual/norm and bias/activation fusions
    (``fusedreg.patching.fx``). Patching twice changes nothing. A one-line summary is logged at
    WARNING on the ``fusedreg.patch`` logger; ``report(model)`` has the details.
    """
    if unknown:
        raise TypeError(f"fusedreg.patch: unknown option(s) {', '.join(map(repr, unknown))}; "
                        f"valid options: {', '.join(OPTIONS)}")
    _check_model(model, "patch")
    chosen = {"layer_norm": layer_norm, "rms_norm": rms_norm, "dropout": dropout,
              "batch_norm": batch_norm, "norms": norms, "activations": activations, "fuse": fuse}
    for option, value in chosen.items():
        if not isinstance(value, bool):
            raise TypeError(f"fusedreg.patch: {option} must be True or False, got {value!r}")
    swaps = {s.torch_class: s for key, s in {**SWAPS, **_timm_swaps()}.items()
             if chosen[s.option or key]}

    left = model.__dict__.get(_LEFT, {})
    for name, module in list(model.named_modules(remove_duplicate=True)):
        if _MARK in module.__dict__:
            continue
        swap = swaps.get(type(module))
        if swap is not None:
            _swap(module, swap)
            log.info("%s: %s -> %s", name or "<model>", _class_name(swap.torch_class),
                     _class_name(swap.fused_class))
        elif norms:
            spec, why = _norms.recognize(module, type(module) in _EXACT)
            if spec is not None:
                original = _norms.adopt(module, spec)
                module.__dict__[_MARK] = (original, ())
                log.info("%s: %s -> fusedreg (%s)", name, _class_name(original), spec.describe())
            elif why is not None:
                left[_class_name(type(module))] = why
        if activations and _MARK not in module.__dict__:
            op = _acts.recognize(module)
            if op is not None:
                module.__dict__[_MARK] = (_acts.adopt(module, op), ())
                log.info("%s: %s -> torch's %s", name, _class_name(type(module).__base__), op)
    model.__dict__[_LEFT] = left
    if dropout:
        # a fused or fusedreg.compile'd model's root runs compiled: no hooks there (install)
        _calls.install(model, root=not fuse and fx.STATS not in model.__dict__)
    model.__dict__[_OPTIONS] = chosen
    if fuse:
        fx.fuse(model)
    log.warning("fusedreg.patch: %s", report(model).summary())
    return model


def unpatch(model: nn.Module) -> nn.Module:
    """Restores what ``patch`` changed (classes, hooks, fusions); returns ``model``."""
    _check_model(model, "unpatch")
    if fx.STATS in model.__dict__:
        fx.unfuse(model)
    _calls.uninstall(model)
    restored = 0
    for name, module in list(model.named_modules(remove_duplicate=True)):
        mark = module.__dict__.pop(_MARK, None)
        if mark is None:
            continue
        original_cls, added = mark
        for k in added:
            module.__dict__.pop(k, None)
        _norms.release(module, original_cls)
        _acts.release(module)
        restored += 1
    model.__dict__.pop(_OPTIONS, None)
    model.__dict__.pop(_LEFT, None)
    log.info("fusedreg.unpatch: restored %d module(s) in %s", restored, type(model).__name__)
    return model


def patched_modules(model: nn.Module) -> dict[str, tuple[type, type]]:
    """{qualified name: (original class, its fusedreg class)} of the modules ``patch`` replaced."""
    _check_model(model, "patched_modules")
    return {name: (m.__dict__[_MARK][0], type(m)) for name, m in model.named_modules()
            if _MARK in m.__dict__}


class PatchReport(NamedTuple):
    """What ``patch`` did to a model (``report(model)``)."""
    modules: dict        # original class name -> number of modules replaced
    left_alone: dict     # norm-like class name -> why it was left alone
    dropout_calls: dict  # call-site kind -> {"fused": n, "left in torch": n}, last forward
    fusions: dict        # pattern -> count, in the graphs fusedreg's compile path rewrote
                         # (patterns "... left in torch" count what it could not replace)
    options: dict

    def summary(self) -> str:
        mods = sum(self.modules.values())
        parts = [f"{mods} module(s) replaced"]
        if self.left_alone:
            parts.append(f"{len(self.left_alone)} norm class(es) left alone "
                         f"({', '.join(sorted(k.rsplit('.', 1)[-1] for k in self.left_alone))})")
        if self.dropout_calls:
            fused = sum(v["fused"] for v in self.dropout_calls.values())
            left = sum(v["left in torch"] for v in self.dropout_calls.values())
            parts.append(f"last forward: {fused} dropout call(s) fused, {left} left in torch")
        fused = {k: n for k, n in self.fusions.items() if "left in torch" not in k}
        left = {k: n for k, n in self.fusions.items() if "left in torch" in k}
        if fused:
            parts.append("in graphs: " + ", ".join(f"{n} x {k}" for k, n in fused.items()))
        if left:
            parts.append(", ".join(f"{n} x {k}" for k, n in left.items()))
        return "; ".join(parts)

    def __str__(self) -> str:
        lines = [f"fusedreg.patch: {self.summary()}"]
        for k, n in sorted(self.modules.items()):
            lines.append(f"  replaced  {n:4d} x {k}")
        for k, why in sorted(self.left_alone.items()):
            lines.append(f"  left      {k}: {why}")
        for k, v in self.dropout_calls.items():
            note = f" ({_calls.NOT_FUSABLE[k]})" if k in _calls.NOT_FUSABLE else ""
            lines.append(f"  dropout   {k}: {v['fused']} fused, {v['left in torch']} left in torch{note}")
        for k, n in self.fusions.items():
            lines.append(f"  {'graph' if 'left in torch' in k else 'fused':9s} {n:4d} x {k}")
        return "\n".join(lines)


def report(model: nn.Module) -> PatchReport:
    """What ``patch`` replaced and left alone in ``model``, and what ran in its last forward:
    dropout calls per call-site kind, fused or left in torch (counted as they run, so
    attention-dropout modules that never run because SDPA drops by itself count nothing, and
    SDPA's own dropout counts as left in torch)."""
    _check_model(model, "report")
    modules: dict = {}
    for original, _ in patched_modules(model).values():
        modules[_class_name(original)] = modules.get(_class_name(original), 0) + 1
    last = model.__dict__.get(_calls.LAST)
    fusions = fx.stats(model)
    return PatchReport(modules, dict(model.__dict__.get(_LEFT, {})),
                       last.as_dict() if last is not None else {}, fusions,
                       dict(model.__dict__.get(_OPTIONS, {})))
