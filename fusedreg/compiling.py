"""``fusedreg.compile(model)`` (the function; this module is ``fusedreg.compiling``):
``torch.compile`` with the fusions of
``fusedreg.patching.fx`` (dropout -> residual add (-> LayerNorm/RMSNorm), bias ->
activation (-> dropout)) put in the Dynamo graph as fusedreg's fused ops, then Inductor.

``torch.compile(model, backend=fusedreg.compile_backend)`` is the same backend for a model
that was not patched (its torch LayerNorm/RMSNorm/Dropout calls are fused; other libraries'
norm classes are not recognized without ``patch``); ``fusedreg.compile`` patches the model's
norms first so that the Llama/T5/timm norms are seen as norms too.
"""
from __future__ import annotations

import torch

from .patching import _calls
from .patching import fx as _fx
from .patching import patch as _patch

__all__ = ["compile", "compile_backend", "compile_stats"]

_GRAPHS: list = []  # the stats of every graph compile_backend rewrote in this process


def compile_backend(gm, example_inputs):
    """A ``torch.compile`` backend: fusedreg's FX rewrite, then Inductor's ``compile_fx``."""
    return _fx.make_backend(_GRAPHS, inductor=True)(gm, example_inputs)


def compile_stats() -> dict:
    """{pattern: count} over every graph ``compile_backend`` or ``fusedreg.compile`` rewrote
    in this process (what was fused, and the dropouts and norms left in torch)."""
    return _fx._total(_GRAPHS)


def compile(model: torch.nn.Module, **compile_kwargs):  # noqa: A001 (torch.compile's name)
    """``fusedreg.patch(model)`` (modules, norms, dropout call sites), then
    ``torch.compile(model, backend=<fusedreg's rewrite + Inductor>, **compile_kwargs)``.
    Returns the compiled module; ``fusedreg.patching.report(model)`` lists what was fused."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"fusedreg.compile expects a torch.nn.Module, got {type(model).__name__}")
    if "backend" in compile_kwargs:
        raise TypeError("fusedreg.compile chooses the backend; use torch.compile(model, "
                        "backend=fusedreg.compile_backend) to combine it differently")
    _patch(model)
    # the root runs compiled: no call-site hooks there (_calls.install says why); its blocks
    # keep theirs for an eager call of the model itself
    _calls.install(model, root=False)
    graphs = model.__dict__.setdefault(_fx.STATS, [])
    compiled = torch.compile(model, backend=_fx.make_backend(graphs, inductor=True), **compile_kwargs)
    compiled.forward = _fx.run_captured(compiled.forward)
    return compiled
