"""Norm classes of other libraries (Hugging Face transformers, timm, user code), recognized by
what they compute rather than by their source text.

A module is a candidate when its class name says "Norm", it holds only ``weight`` (and maybe
``bias``) parameters, no buffers or children, and an ``eps`` / ``variance_epsilon`` /
``epsilon`` float. Its class's ``forward`` is then run on a copy of it with random parameters
(``probe``) and compared with the fusedreg formulas:

- LayerNorm or RMSNorm over the trailing dims (or over dim 1 of (N, C, H, W): timm's
  ``LayerNorm2d``), scaled by ``weight`` or by ``1 + weight`` (Gemma), plus ``bias``;
- the output dtype rule for half-precision inputs and weights: the input's (torch, timm,
  OLMo2, Gemma), ``promote(input, weight)`` (Llama: ``weight * x.to(input_dtype)``), or the
  weight's when it is half and else at least float32 (T5LayerNorm).

The probe inputs separate the formulas: rows with a non-zero mean (LayerNorm vs RMSNorm),
rows whose variance is about eps (where eps sits), random weights around 0 (``w`` vs
``1 + w``), inputs of rank 2 and 3 (a GroupNorm over channels is not a LayerNorm over the last
dim), and the dtype pairs (fp32, fp32), (bf16, bf16), (bf16, fp32), (fp32, bf16), (fp16, fp16).
A candidate is adopted only if one formula matches in float32 (1e-4 of the output scale) and,
for every dtype pair the class accepts, fusedreg returns the class's dtype with an error
against a float64 evaluation of the formula at most twice the class's own plus the norm atol
of docs/design.md "Numerics". That is evidence on chosen inputs, not a proof for arbitrary
code: a forward whose result depends on something the probe does not vary (a global flag, a
data-dependent branch) could still differ. A class that fails is left alone and reported with
the reason.

An adopted module keeps its object: its class is swapped for a subclass (``Fused<Name>``,
made once per class) whose ``forward`` runs fusedreg's norm with the module's own Parameters,
so ``isinstance`` checks, hooks, ``state_dict`` keys and an optimizer built before all keep
working; ``unpatch`` swaps the class back.
"""
from __future__ import annotations

import copy
import functools
import warnings
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as TF
from torch import nn

from .. import functional as F
from . import fx

HALF = (torch.float16, torch.bfloat16)
_EPS_NAMES = ("eps", "variance_epsilon", "epsilon")
# the error rule's atol per output dtype (docs/design.md "Numerics", forward)
_ATOL = {torch.float64: 1e-12, torch.float32: 2e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}
_DTYPE_PAIRS = ((torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                (torch.bfloat16, torch.float32), (torch.float32, torch.bfloat16),
                (torch.float16, torch.float16))
OUT_RULES = ("input", "promote", "weight_half")


class NormSpec(NamedTuple):
    """What a recognized norm computes (see the module doc)."""
    rms: bool
    offset: bool            # scales by (1 + weight), the sum in float32
    channels_first: bool    # normalizes dim 1 of (N, C, H, W)
    shape: tuple            # normalized shape
    eps: float
    out: str                # one of OUT_RULES

    def describe(self) -> str:
        kind = "RMSNorm" if self.rms else "LayerNorm"
        scale = "(1 + weight)" if self.offset else "weight"
        where = "over dim 1" if self.channels_first else f"over {self.shape}"
        return f"{kind} {where}, scale {scale}, eps={self.eps}, output dtype: {self.out}"


SPEC = "_fusedreg_norm_spec"


def _out_dtype(rule: str, x_dtype, w: Optional[torch.Tensor]):
    if rule == "input" or w is None and rule == "promote":
        return x_dtype
    if rule == "promote":
        return torch.promote_types(x_dtype, w.dtype)
    # weight_half: T5LayerNorm
    if w is not None and w.dtype in HALF:
        return w.dtype
    out = torch.promote_types(x_dtype, torch.float32)
    return out if w is None else torch.promote_types(out, w.dtype)


def _conform(t, dtype):
    """A weight or bias for an input of ``dtype``: fusedreg takes x's dtype, or float32 with
    a half-precision x."""
    if t is None or t.dtype == dtype or (dtype in HALF and t.dtype == torch.float32):
        return t
    return t.to(torch.float32 if dtype in HALF else dtype)


def _norm(spec: NormSpec, x, weight, bias, fused: bool):
    """y for input x, computed by fusedreg (``fused``) or by torch's functional norms."""
    out = _out_dtype(spec.out, x.dtype, weight)
    if out != x.dtype and torch.promote_types(out, x.dtype) == out:
        x = x.to(out)  # the class computes in the wider dtype
    if weight is not None and spec.offset:
        weight = 1.0 + weight.float()
    weight, bias = _conform(weight, x.dtype), _conform(bias, x.dtype)
    if weight is not None and bias is not None and weight.dtype != bias.dtype:
        weight, bias = weight.float(), bias.float()
    if spec.channels_first:
        x = x.movedim(1, -1)
    if not fused:
        if spec.rms and bias is None:
            y = TF.rms_norm(x, spec.shape, weight, spec.eps)
        elif spec.rms:
            y = TF.rms_norm(x, spec.shape, weight, spec.eps) + bias
        else:
            y = TF.layer_norm(x, spec.shape, weight, bias, spec.eps)
    elif spec.rms and bias is None:
        y = F.rms_norm(x, spec.shape, weight, spec.eps)
    elif spec.rms:
        y = F.dropout_add_layer_norm(x, None, weight, bias, 0.0, spec.eps, rms=True)
    else:
        y = F.layer_norm(x, spec.shape, weight, bias, spec.eps)
    if spec.channels_first:
        y = y.movedim(-1, 1)
    return y if y.dtype == out else y.to(out)


def _torch_ok(x, weight, bias) -> bool:
    """torch's functional norms take these dtypes (all equal)."""
    return all(t is None or t.dtype == x.dtype for t in (weight, bias))


def fused_forward(self, x):
    spec = self.__dict__[SPEC]
    weight, bias = self._parameters.get("weight"), self._parameters.get("bias")
    # While fusedreg's compile path traces, the torch form goes in the graph, where the FX
    # pass fuses it with its neighbours
    if fx.capturing() and _torch_ok(x, weight, bias) and not spec.offset:
        return _norm(spec, x, weight, bias, fused=False)
    return _norm(spec, x, weight, bias, fused=True)


@functools.lru_cache(maxsize=None)
def fused_class(cls: type) -> type:
    """The subclass of ``cls`` whose forward is ``fused_forward`` (one per class)."""
    return type(f"Fused{cls.__name__}", (cls,),
                {"forward": fused_forward, "__module__": __name__,
                 "__doc__": f"{cls.__qualname__} computed by fusedreg (fusedreg.patch)."})


# ---- recognizing a class by probing it -----------------------------------------------------

def _eps_of(module):
    for name in _EPS_NAMES:
        v = module.__dict__.get(name)
        if isinstance(v, float) and v > 0:
            return v
    return None


def candidate(module: nn.Module, exact_torch: bool):
    """(spec skeleton, why not): whether ``module`` may be probed at all."""
    cls = type(module)
    if exact_torch or "norm" not in cls.__name__.lower() or SPEC in module.__dict__:
        return None, None
    if cls.__module__.startswith("torch.") or cls.__module__.startswith("fusedreg."):
        return None, None
    if set(module._parameters) - {"weight", "bias"}:
        return None, f"has parameters {sorted(set(module._parameters) - {'weight', 'bias'})}"
    if any(b is not None for b in module._buffers.values()) or module._modules:
        return None, "has buffers or submodules"
    weight, bias = module._parameters.get("weight"), module._parameters.get("bias")
    if weight is not None:
        shape = tuple(weight.shape)
    else:
        shape = tuple(getattr(module, "normalized_shape", ()) or ())
    if not shape or not all(isinstance(d, int) and d > 0 for d in shape):
        return None, "no normalized shape (weight or normalized_shape)"
    if bias is not None and tuple(bias.shape) != shape:
        return None, "bias and weight shapes differ"
    eps = _eps_of(module)
    if eps is None:
        return None, "no float eps / variance_epsilon / epsilon attribute"
    return (shape, eps), None


def _formula(spec: NormSpec, x, w, b):
    """float64 evaluation of a candidate formula."""
    x = x.double()
    if spec.channels_first:
        x = x.movedim(1, -1)
    dims = tuple(range(-len(spec.shape), 0))
    if spec.rms:
        y = x * torch.rsqrt(x.pow(2).mean(dims, keepdim=True) + spec.eps)
    else:
        mu = x.mean(dims, keepdim=True)
        y = (x - mu) * torch.rsqrt((x - mu).pow(2).mean(dims, keepdim=True) + spec.eps)
    if w is not None:
        y = y * ((1.0 + w.double()) if spec.offset else w.double())
    if b is not None:
        y = y + b.double()
    return y.movedim(-1, 1) if spec.channels_first else y


def _err(out, ref):
    return float((out.double() - ref).abs().max() / max(1.0, float(ref.abs().max())))


def _inputs(shape, channels_first, g):
    """Probe inputs: rows with non-zero means, rows of variance ~1e-6 (eps's size), large rows."""
    if channels_first:  # (N, C, H, W): rows of eps's size, unit and large scale along H
        x1 = torch.randn(2, shape[0], 3, 2, generator=g) * torch.tensor([1e-3, 1.0, 20.0]).view(1, 1, 3, 1) + 0.7
        x2 = torch.randn(1, shape[0], 1, 5, generator=g) * 2.0 - 1.0
        return [x1, x2]
    scales = torch.tensor([1e-3, 1.0, 20.0, 1e-3, 3.0, 0.5]).view(6, *([1] * len(shape)))
    means = torch.tensor([0.0, 1.5, -4.0, 1e-3, 0.0, 2.0]).view(6, *([1] * len(shape)))
    x2 = torch.randn(6, *shape, generator=g) * scales + means
    x3 = (torch.randn(2, 3, *shape, generator=g) * 2.0 + 0.5)
    return [x2, x3]


def _probe_copy(module, weight, bias):
    clone = copy.copy(module)  # shallow: the class's attributes, fresh parameter dict
    clone._parameters = dict(module._parameters)
    clone._forward_hooks, clone._forward_pre_hooks = {}, {}
    for name, t in (("weight", weight), ("bias", bias)):
        if name in module._parameters:
            clone._parameters[name] = None if t is None else nn.Parameter(t, requires_grad=False)
    return clone


def _run(cls, clone, x):
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = cls.forward(clone, x)
    except Exception:  # the class refuses this input: no evidence either way
        return None
    return out if isinstance(out, torch.Tensor) and out.shape == x.shape else None


def probe(module: nn.Module, shape: tuple, eps: float):
    """(NormSpec, None) if fusedreg can compute what ``module`` computes, else (None, why)."""
    cls = type(module)
    g = torch.Generator().manual_seed(1234)
    has_w = module._parameters.get("weight") is not None
    has_b = module._parameters.get("bias") is not None
    w = torch.randn(shape, generator=g) * 0.5 + 0.2 if has_w else None
    b = torch.randn(shape, generator=g) * 0.5 if has_b else None
    clone = _probe_copy(module, w, b)
    layouts = [False] + ([True] if len(shape) == 1 else [])
    matches = []
    for channels_first in layouts:
        xs = _inputs(shape, channels_first, g)
        outs = [_run(cls, clone, x) for x in xs]
        if any(o is None or o.dtype != torch.float32 for o in outs):
            continue
        for rms in (False, True):
            for offset in ((False, True) if has_w else (False,)):
                spec = NormSpec(rms, offset, channels_first, shape, eps, "input")
                if all(_err(o, _formula(spec, x, w, b)) <= 1e-4 for o, x in zip(outs, xs)):
                    matches.append(spec)
    if not matches:
        return None, ("computes none of LayerNorm / RMSNorm / (1 + weight) RMSNorm over the last "
                      "dims or channels-first on the probe inputs")
    spec = matches[0]
    x = _inputs(shape, spec.channels_first, g)[0]
    rules = list(OUT_RULES)
    for x_dtype, w_dtype in _DTYPE_PAIRS:
        wl = None if w is None else w.to(w_dtype)
        bl = None if b is None else b.to(w_dtype)
        xl = x.to(x_dtype)
        out = _run(cls, _probe_copy(module, wl, bl), xl)
        if out is None:
            continue  # the class refuses this pair; fusedreg may accept more
        rules = [r for r in rules if _out_dtype(r, x_dtype, wl) == out.dtype]
        if not rules:
            return None, f"output dtype {out.dtype} for input {x_dtype} and weight {w_dtype} follows no known rule"
        trial = spec._replace(out=rules[0])
        try:
            with torch.no_grad():
                mine = _norm(trial, xl, wl, bl, fused=True)
        except (TypeError, ValueError) as e:
            return None, f"fusedreg refuses input {x_dtype} with weight {w_dtype}: {e}"
        ref = _formula(spec, xl, wl, bl)
        low = x_dtype if x_dtype in HALF else out.dtype
        if _err(mine, ref) > 2 * _err(out, ref) + _ATOL[low]:
            return None, (f"fusedreg's error at input {x_dtype}, weight {w_dtype} exceeds twice "
                          f"the class's own plus atol")
    return spec._replace(out=rules[0]), None


def recognize(module: nn.Module, exact_torch: bool):
    """(NormSpec or None, reason or None); reason is None for modules that are no candidate."""
    skel, why = candidate(module, exact_torch)
    if skel is None:
        return None, why
    shape, eps = skel
    # instance attributes that may change what forward does (timm's _fast_norm, flags)
    attrs = tuple(sorted((k, v) for k, v in vars(module).items()
                         if not k.startswith("_fusedreg") and k != "training"
                         and isinstance(v, (bool, int, float, str, type(None)))))
    key = (type(module), attrs, shape, "weight" in module._parameters and module.weight is not None,
           module._parameters.get("bias") is not None)
    if key not in _CACHE:
        _CACHE[key] = probe(module, shape, eps)
    return _CACHE[key]


_CACHE: dict = {}


def adopt(module: nn.Module, spec: NormSpec) -> type:
    original = type(module)
    module.__dict__[SPEC] = spec
    module.__class__ = fused_class(original)
    return original


def release(module: nn.Module, original: type) -> None:
    module.__dict__.pop(SPEC, None)
    module.__class__ = original
