"""bias_dropout benchmark: ``residual + dropout(act(x + bias), p)``, forward, backward and
forward+backward, fusedreg (every fused backend usable on the device) against eager torch
(``F.dropout(act(x + bias), p) + residual``) and ``torch.compile`` of that expression.

Every candidate runs in training mode on inputs that require grad (x, bias, residual), as in
a training step. Backward uses ``torch.autograd.grad`` so that nothing accumulates into
``.grad`` between repetitions; the backward-only pass runs an untimed forward before each
timed backward (torch.compile's donated buffers forbid ``retain_graph``).

Minimal bytes (what a perfect fused kernel must move; GB/s and the fraction of the limit use
them; the limit is that of the same access pattern, fusedreg/bench/limits.py):
  fwd:  read x and residual, write out                   3·M·N elements (+ the N of bias)
  bwd:  read grad_out, write grad_x                      2·M·N elements (+ N for grad_bias)
        (+ read x with an activation, whose derivative needs it: 3·M·N)
        grad_residual is grad_out itself, nothing to move.
Bytes saved for backward: the tensors autograd saves during the forward, captured with
``torch.autograd.graph.saved_tensors_hooks``, each storage counted once, EXCLUDING the inputs
x, bias and residual themselves (they exist anyway); the note says which inputs are kept.
"""
from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F

import fusedreg

from .harness import Context, Row, Timing, fused_backends
from .limits import Pattern

OP = "bias_dropout"
P = 0.1

# (M, N) cases per device: the headline case last (the largest), smaller ones for the
# size sweep of the plots; the activation variant only at the target size.
_SIZES = {
    ("cpu", False): [(1024, 1024), (4096, 1024), (8192, 1024)],
    ("cpu", True): [(2048, 1024)],
    ("cuda", False): [(1024, 8192), (4096, 8192), (16384, 8192)],
    ("cuda", True): [(16384, 8192)],
}
_ACTIVATION = "gelu"  # the variant with an activation: exact (erf) GELU, F.gelu's default
_TORCH_ACT = {None: lambda t: t, "gelu": F.gelu}




def _fused(activation):
    """fusedreg's call; the caller scopes the backend around the timing (fusedreg.use_backend)."""
    def fn(x, bias, residual):
        return fusedreg.functional.bias_dropout(x, bias, residual, p=P, activation=activation)
    return fn


def _eager(activation):
    act = _TORCH_ACT[activation]

    def fn(x, bias, residual):
        return F.dropout(act(x + bias), P, training=True) + residual
    return fn


def patterns(activation) -> dict:
    """Each pass's access pattern: fwd reads x and residual, writes out; bwd reads grad_out
    (and x with an activation), writes grad_x."""
    fwd = Pattern("stream", 2, 1)
    bwd = Pattern("stream", 2 if activation else 1, 1)
    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": (fwd, bwd)}


def minimal_bytes(M, N, itemsize, activation) -> dict:
    n = M * N
    fwd = (3 * n + N) * itemsize
    bwd = ((3 if activation else 2) * n + N) * itemsize
    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}


def saved_for_backward(fn, inputs) -> tuple[int, list[str]]:
    """(bytes autograd saves in ``fn(*inputs)`` beyond the inputs, names of inputs it keeps)."""
    named = {t.untyped_storage().data_ptr(): name for name, t in zip(("x", "bias", "residual"), inputs)}
    seen, kept = {}, []

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr in named:
            kept.append(named[ptr])
        else:
            seen[ptr] = max(seen.get(ptr, 0), t.untyped_storage().nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn(*inputs)
    del out
    return sum(seen.values()), sorted(set(kept))


def _skipped(ctx, case, dtype, impl, note, nbytes, pats, array_bytes) -> list[Row]:
    nan = Timing(math.nan, math.nan, math.nan, 0)
    return [ctx.row(OP, case, dtype, impl, pass_, nan, nbytes[pass_], pattern=pats[pass_],
                    array_bytes=array_bytes, note=note)
            for pass_ in nbytes if ctx.wants(impl, pass_)]


def _measure(ctx: Context, case, dtype, impl, fn, inputs, grad, nbytes, pats, array_bytes,
             note="") -> list[Row]:
    if ctx.select is None:  # a steady-state worker calls nothing but what it times
        saved, kept = saved_for_backward(fn, inputs)
    else:
        saved, kept = None, []
    if kept:
        note = "; ".join(filter(None, [note, "keeps input " + "+".join(kept)]))
    grad_of = lambda out: torch.autograd.grad(out, inputs, grad)
    timings = {
        "fwd": lambda: ctx.time(lambda: fn(*inputs)),
        "bwd": lambda: ctx.time(grad_of, setup=lambda: fn(*inputs)),  # a fresh forward graph each time
        "fwd+bwd": lambda: ctx.time(lambda: grad_of(fn(*inputs))),
    }
    return [ctx.row(OP, case, dtype, impl, pass_, timed(), nbytes[pass_], pattern=pats[pass_],
                    array_bytes=array_bytes, saved_bytes=saved, note=note)
            for pass_, timed in timings.items() if ctx.wants(impl, pass_)]


def _cases(ctx: Context):
    if ctx.sizes:
        sizes = []
        for s in ctx.sizes:
            if isinstance(s, int) or len(s) != 2:
                shown = s if isinstance(s, int) else "x".join(map(str, s))
                raise ValueError(f"bias_dropout sizes are rows x features (e.g. 8192x1024), got {shown}")
            sizes.append(tuple(s))
    elif ctx.sweep:
        sizes = sweep_sizes(ctx)
    else:
        sizes = _SIZES[(ctx.device.type, ctx.quick)]
    cases = [(M, N, None) for M, N in sizes]
    if not ctx.quick and not ctx.sweep:
        M, N = max(sizes, key=lambda s: s[0] * s[1])
        cases.append((M, N, _ACTIVATION))
    return cases


def benchmark(ctx: Context) -> list[Row]:
    rows = []
    fused = fused_backends(OP, ctx.device)
    for dtype in ctx.dtypes:
        for M, N, activation in _cases(ctx):
            rows += _case(ctx, M, N, activation, dtype, fused)
    return rows


def _case(ctx, M, N, activation, dtype, fused) -> list[Row]:
    case = f"{M}x{N} {activation + '+' if activation else ''}bias+res p={P}"
    if ctx.skip_case(OP, case):
        return []
    gen = torch.Generator(device=ctx.device).manual_seed(0)
    make = lambda *shape: (torch.randn(*shape, generator=gen, device=ctx.device) + 0.5).to(dtype)
    inputs = tuple(t.requires_grad_() for t in (make(M, N), make(N), make(M, N)))
    grad = make(M, N)
    nbytes = minimal_bytes(M, N, inputs[0].element_size(), activation)
    pats, array_bytes = patterns(activation), M * N * inputs[0].element_size()

    def measure(impl, fn, note=""):
        if not any(ctx.wants(impl, p) for p in nbytes):
            return []
        try:
            return _measure(ctx, case, dtype, impl, fn, inputs, grad, nbytes, pats, array_bytes, note=note)
        except Exception as e:  # one broken candidate must not hide the others' results
            return _skipped(ctx, case, dtype, impl, f"failed: {type(e).__name__}: {_first_line(e)}",
                            nbytes, pats, array_bytes)

    rows = []
    for backend in fused:
        with fusedreg.use_backend(backend):  # around the timing, not inside each timed call
            rows += measure(f"fusedreg[{backend}]", _fused(activation))
    if not fused:
        with fusedreg.use_backend("reference"):
            rows += measure("fusedreg[reference]", _fused(activation),
                            note="no fused backend built for this device")

    eager = _eager(activation)
    rows += measure("torch eager", eager)
    if ctx.sweep or not any(ctx.wants("torch.compile", p) for p in nbytes):
        return rows  # the sweep compares with eager only (a compile per size is too slow)

    # torch.compile of the same expression: compiled (forward and backward graphs) before
    # timing; a fresh dynamo cache per case keeps the recompile limit out of the way and
    # each size gets kernels specialized for it (dynamic=False).
    torch._dynamo.reset()
    compiled = torch.compile(eager, dynamic=False)
    try:
        t0 = time.perf_counter()
        torch.autograd.grad(compiled(*inputs), inputs, grad)
        note = f"compiled in {time.perf_counter() - t0:.0f} s"
    except Exception as e:  # compile needs a working C++/Triton toolchain: skip, say why
        return rows + _skipped(ctx, case, dtype, "torch.compile",
                               f"torch.compile failed: {type(e).__name__}: {_first_line(e)}", nbytes,
                               pats, array_bytes)
    rows += measure("torch.compile", compiled, note=note)
    return rows


# --sweep: from one row of GPT-2 small's width to 32768 x 4096; the largest only with
# --sweep-max on a CPU (512 MB per operand, and minutes of eager time).
SWEEP = [(1, 768), (4, 768), (32, 768), (256, 768), (1024, 1024), (4096, 1024), (8192, 1024),
         (2048, 4096), (8192, 4096), (32768, 4096)]


def sweep_sizes(ctx: Context) -> list:
    if ctx.sweep_max or ctx.device.type == "cuda":
        return list(SWEEP)
    return [s for s in SWEEP if s[0] * s[1] <= 8192 * 4096]


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:120] if text else ""
