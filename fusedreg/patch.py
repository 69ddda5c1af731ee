"""``fusedreg.patch(model)``: the one-line switch of an existing model to fusedreg's modules.

Every ``torch.nn.LayerNorm``, ``torch.nn.RMSNorm`` and ``torch.nn.Dropout`` in the module tree
becomes the fusedreg module of the same name by swapping the module's class in place. The
fusedreg modules subclass the torch ones with the same constructor and state,
so the module object, its Parameter objects (an optimizer built before patching keeps
working), buffers, hooks and ``state_dict`` keys all stay as they were, wherever the module
is referenced (Sequential, ModuleList, ModuleDict, plain attributes, shared modules, the root).
Only exact torch classes are swapped: a user subclass may override ``forward`` and is left
alone. ``fusedreg.unpatch(model)`` swaps back what ``patch`` swapped.

With ``rms_norm=True``, the Llama-style RMSNorm classes of Hugging Face transformers
(``LlamaRMSNorm``, ``MistralRMSNorm``, ``Qwen2RMSNorm``, ...: ``weight * x / rms(x)`` with the
statistics in fp32) are replaced too. They are not torch.nn.RMSNorm subclasses, so each is
rebuilt as a fusedreg RMSNorm holding the SAME weight Parameter (``state_dict`` key "weight"
unchanged) and put in its parent's place; ``unpatch`` puts the original object back. A class
qualifies only if its ``forward`` is, line for line, LlamaRMSNorm's: GemmaRMSNorm
(``1 + weight``) and the like are left alone.
"""
from __future__ import annotations

import functools
import inspect
import logging

from torch import nn

from . import nn as fnn

__all__ = ["patch", "unpatch", "patched_modules"]

log = logging.getLogger("fusedreg.patch")

# option -> (torch class, fusedreg.nn class, constructor call reproducing a module's
# configuration; used to check that the fusedreg class is a drop-in, and to give the swapped
# object any plain attribute that the fusedreg constructor sets and the torch one does not)
_TARGETS = {
    "layer_norm": (nn.LayerNorm, fnn.LayerNorm, lambda cls, m: cls(
        m.normalized_shape, eps=m.eps, elementwise_affine=m.elementwise_affine,
        bias=getattr(m, "bias", None) is not None, device="meta")),
    "rms_norm": (nn.RMSNorm, fnn.RMSNorm, lambda cls, m: cls(
        m.normalized_shape, eps=m.eps, elementwise_affine=m.elementwise_affine, device="meta")),
    "dropout": (nn.Dropout, fnn.Dropout, lambda cls, m: cls(p=m.p, inplace=m.inplace)),
}
OPTIONS = tuple(_TARGETS)

# Set on each swapped module: (the class it was, attributes patch added to it, and the
# original object when patch rebuilt the module instead of swapping its class).
_MARK = "_fusedreg_patched_from"


def _class_name(cls: type) -> str:
    if cls.__module__.startswith("torch.nn"):
        return f"torch.nn.{cls.__name__}"
    return f"{cls.__module__}.{cls.__qualname__}"


def _check_model(model, fn: str) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"fusedreg.{fn} expects a torch.nn.Module, got {type(model).__name__}")


def _swap(module: nn.Module, option: str, cls: type) -> None:
    """Turns ``module`` (exactly of the torch class) into an instance of ``cls`` in place."""
    torch_cls, _, construct = _TARGETS[option]
    name = torch_cls.__name__
    try:
        template = construct(cls, module)
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
    module.__class__ = cls
    module.__dict__[_MARK] = (torch_cls, added, None)


@functools.lru_cache(maxsize=None)
def _llama_rmsnorm_forward():
    """Source of transformers' LlamaRMSNorm.forward, the one semantics rebuilt as RMSNorm."""
    try:
        from transformers.models.llama.modeling_llama import LlamaRMSNorm
        return inspect.getsource(LlamaRMSNorm.forward)
    except Exception:  # transformers missing or changed: rebuild nothing
        return None


@functools.lru_cache(maxsize=None)
def _is_llama_style_class(cls: type) -> bool:
    if not (cls.__module__.startswith("transformers.") and cls.__name__.endswith("RMSNorm")):
        return False
    try:
        source = inspect.getsource(cls.forward)
    except (OSError, TypeError):
        return False
    return source == _llama_rmsnorm_forward()


def _is_llama_style_rmsnorm(module: nn.Module) -> bool:
    weight = module._parameters.get("weight")
    return (set(module._parameters) == {"weight"} and weight is not None and weight.dim() == 1
            and not module._buffers and not module._modules
            and isinstance(getattr(module, "variance_epsilon", None), float)
            and _is_llama_style_class(type(module)))


def _rebuild_rmsnorm(module: nn.Module, cls: type) -> nn.Module:
    """A fusedreg RMSNorm computing what the Llama-style ``module`` computes, holding the same
    weight Parameter and the same hooks."""
    new = cls(tuple(module.weight.shape), eps=module.variance_epsilon, elementwise_affine=True,
              device="meta")
    new.weight = module.weight
    new.train(module.training)
    for hooks in ("_forward_pre_hooks", "_forward_hooks", "_backward_pre_hooks", "_backward_hooks"):
        getattr(new, hooks).update(getattr(module, hooks))
    new.__dict__[_MARK] = (type(module), (), module)
    return new


def _replace_child(model: nn.Module, old: nn.Module, new: nn.Module) -> None:
    """Puts ``new`` wherever ``old`` is a child in ``model`` (shared modules included)."""
    for parent in model.modules():
        for key, child in parent._modules.items():
            if child is old:
                parent._modules[key] = new


def patch(model: nn.Module, layer_norm: bool = True, rms_norm: bool = True, dropout: bool = True,
          **unknown) -> nn.Module:
    """Replaces, in place, the torch LayerNorm / RMSNorm / Dropout modules of ``model`` (the
    model itself included) by fusedreg's; returns ``model``.

    Each option switches one kind off when False. Patching twice changes nothing. What was
    replaced is logged on the ``fusedreg.patch`` logger (INFO) and listed by
    ``patched_modules(model)`` (``from fusedreg.patch import patched_modules``).
    """
    if unknown:
        raise TypeError(f"fusedreg.patch: unknown option(s) {', '.join(map(repr, unknown))}; "
                        f"valid options: {', '.join(OPTIONS)}")
    _check_model(model, "patch")
    chosen = {"layer_norm": layer_norm, "rms_norm": rms_norm, "dropout": dropout}
    for option, value in chosen.items():
        if not isinstance(value, bool):
            raise TypeError(f"fusedreg.patch: {option} must be True or False, got {value!r}")

    classes = {option: _TARGETS[option][1] for option, on in chosen.items() if on}

    replaced, rebuilt = [], []
    for name, module in list(model.named_modules(remove_duplicate=True)):
        for option, cls in classes.items():
            torch_cls = _TARGETS[option][0]
            if type(module) is torch_cls:
                _swap(module, option, cls)
                replaced.append((name, torch_cls, cls))
                break
        else:
            if "rms_norm" in classes and name and _is_llama_style_rmsnorm(module):
                rebuilt.append((name, module))
    for name, module in rebuilt:
        new = _rebuild_rmsnorm(module, classes["rms_norm"])
        _replace_child(model, module, new)
        replaced.append((name, type(module), type(new)))
    for name, old, new in replaced:
        log.info("%s: %s -> fusedreg.nn.%s", name or "<model>", _class_name(old), new.__name__)
    log.info("fusedreg.patch: replaced %d module(s) in %s", len(replaced), type(model).__name__)
    return model


def unpatch(model: nn.Module) -> nn.Module:
    """Restores the torch classes of the modules that ``patch`` swapped; returns ``model``."""
    _check_model(model, "unpatch")
    restored = 0
    for name, module in list(model.named_modules(remove_duplicate=True)):
        mark = module.__dict__.pop(_MARK, None)
        if mark is None:
            continue
        original_cls, added, original = mark
        fused_cls = type(module)
        if original is not None:  # rebuilt: the original object goes back in its place
            _replace_child(model, module, original)
        else:
            for k in added:
                module.__dict__.pop(k, None)
            module.__class__ = original_cls
        restored += 1
        log.info("%s: fusedreg.nn.%s -> %s", name or "<model>", fused_cls.__name__,
                 _class_name(original_cls))
    log.info("fusedreg.unpatch: restored %d module(s) in %s", restored, type(model).__name__)
    return model


def patched_modules(model: nn.Module) -> dict[str, tuple[type, type]]:
    """{qualified name: (original class, fusedreg class)} of the modules ``patch`` replaced."""
    _check_model(model, "patched_modules")
    return {name: (m.__dict__[_MARK][0], type(m)) for name, m in model.named_modules()
            if _MARK in m.__dict__}

