"""layer_norm benchmark: LayerNorm, RMSNorm and dropout + residual + LayerNorm, forward,
backward and forward+backward; fusedreg (every fused backend usable on the device) against
eager torch, ``torch.compile`` of the eager expression, and liger-kernel / apex when they are
installed (GPU).

Cases: on CPU the headline shape (fp32 8192 x 1024; --quick 2048 x 1024); on CUDA rows of
N in {1024, 4096, 8192, 16384, 65536, 262144} at a fixed total of 2^28 elements (--quick
2^24). ``--sizes MxN,...`` overrides both.

Minimal bytes (GB/s and the fraction of the limit of the same access pattern use them,
fusedreg/bench/limits.py; parameters and statistics are negligible and left out):
  layer_norm / rms_norm      fwd: read x, write y                      2·M·N elements
                             bwd: read dy and x, write dx              3·M·N
  dropout_add_layer_norm     fwd: read x, residual, write y, h         4·M·N
  (h = residual + dropout(x) bwd: read dy and h, write dx, dresidual   4·M·N
   is what backward needs)
Backward alone is timed on one retained forward graph (``retain_graph=True``); where that
is impossible (torch.compile's donated buffers) it is reported as fwd+bwd minus fwd.
"""
from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F

import fusedreg

from .. import backends
from .harness import Context, Row, Timing, fused_backends
from .limits import Pattern

OP = "layer_norm"
P = 0.1

_CPU_SIZES = {False: [(8192, 1024)], True: [(2048, 1024)]}
_GPU_N = [1024, 4096, 8192, 16384, 65536, 262144]
_GPU_TOTAL = {False: 1 << 28, True: 1 << 24}
VARIANTS = ("layer_norm", "rms_norm", "dropout_add_layer_norm")




def _sizes(ctx: Context):
    if ctx.sizes:
        for s in ctx.sizes:
            if len(s) != 2:
                raise ValueError(f"layer_norm sizes are rows x features, got {'x'.join(map(str, s))}")
        return [tuple(s) for s in ctx.sizes]
    if ctx.sweep:
        from .bias_dropout import sweep_sizes
        return sweep_sizes(ctx)
    if ctx.device.type == "cpu":
        return _CPU_SIZES[ctx.quick]
    total = _GPU_TOTAL[ctx.quick]
    return [(total // n, n) for n in _GPU_N]


def _patterns(variant) -> dict:
    if variant == "dropout_add_layer_norm":
        fwd, bwd = Pattern("stream", 2, 2), Pattern("stream", 2, 2)
    else:
        fwd, bwd = Pattern("stream", 1, 1), Pattern("stream", 2, 1)
    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": (fwd, bwd)}


def _minimal_bytes(variant, M, N, itemsize) -> dict:
    n = M * N * itemsize
    fwd, bwd = (4 * n, 4 * n) if variant == "dropout_add_layer_norm" else (2 * n, 3 * n)
    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}


# ---- candidates: fn(x, residual, weight, bias) -> y ------------------------------------------

def _fused(variant):
    """fusedreg's call; the caller scopes the backend around the timing (fusedreg.use_backend)."""
    def fn(x, r, w, b):
        if variant == "layer_norm":
            return fusedreg.functional.layer_norm(x, w.shape, w, b)
        if variant == "rms_norm":
            return fusedreg.functional.rms_norm(x, w.shape, w)
        return fusedreg.functional.dropout_add_layer_norm(x, r, w, b, p=P)
    return fn


def _eager(variant):
    def fn(x, r, w, b):
        if variant == "layer_norm":
            return F.layer_norm(x, w.shape, w, b)
        if variant == "rms_norm":
            return F.rms_norm(x, w.shape, w)
        return F.layer_norm(F.dropout(x, P, training=True) + r, w.shape, w, b)
    return fn


def _peers(variant, device):
    """(name, fn) of liger-kernel and apex where installed and applicable (CUDA only)."""
    if device.type != "cuda" or variant == "dropout_add_layer_norm":
        return []
    peers = []
    try:
        if variant == "layer_norm":
            from liger_kernel.ops.layer_norm import LigerLayerNormFunction
            peers.append(("liger", lambda x, r, w, b: LigerLayerNormFunction.apply(x, w, b, 1e-5)))
        else:
            from liger_kernel.ops.rms_norm import LigerRMSNormFunction
            peers.append(("liger", lambda x, r, w, b: LigerRMSNormFunction.apply(x, w, 1e-6)))
    except Exception:
        pass
    try:
        from apex.normalization.fused_layer_norm import fused_layer_norm_affine, fused_rms_norm_affine
        if variant == "layer_norm":
            peers.append(("apex", lambda x, r, w, b: fused_layer_norm_affine(x, w, b, w.shape, 1e-5)))
        else:
            peers.append(("apex", lambda x, r, w, b: fused_rms_norm_affine(x, w, w.shape, 1e-6)))
    except Exception:
        pass
    return peers


# ---- timing -------------------------------------------------------------------------------------

def _nan_rows(ctx, op, case, dtype, impl, nbytes, pats, array_bytes, note):
    nan = Timing(math.nan, math.nan, math.nan, 0)
    return [ctx.row(op, case, dtype, impl, pass_, nan, nbytes[pass_], pattern=pats[pass_],
                    array_bytes=array_bytes, note=note)
            for pass_ in nbytes if ctx.wants(impl, pass_)]


def _measure(ctx, op, case, dtype, impl, fn, inputs, grad, nbytes, pats, array_bytes, note=""):
    diff = [t for t in inputs if t is not None]
    grad_of = lambda out, **kw: torch.autograd.grad(out, diff, grad, **kw)  # noqa: E731
    nan = Timing(math.nan, math.nan, math.nan, 0)
    want = {p: ctx.wants(impl, p) for p in ("fwd", "bwd", "fwd+bwd")}
    fwd = ctx.time(lambda: fn(*inputs)) if want["fwd"] else nan
    both = ctx.time(lambda: grad_of(fn(*inputs))) if want["fwd+bwd"] else nan
    bwd = nan
    if want["bwd"]:
        try:
            out = fn(*inputs)
            bwd = ctx.time(lambda: grad_of(out, retain_graph=True))
        except RuntimeError:  # e.g. torch.compile's donated buffers
            if not want["fwd"]:
                fwd = ctx.time(lambda: fn(*inputs))
            if not want["fwd+bwd"]:
                both = ctx.time(lambda: grad_of(fn(*inputs)))
            d = both.median_ms - fwd.median_ms
            bwd = Timing(d, d, d, 0)
            note = "; ".join(filter(None, [note, "bwd = fwd+bwd - fwd"]))
    return [ctx.row(op, case, dtype, impl, pass_, t, nbytes[pass_], pattern=pats[pass_],
                    array_bytes=array_bytes, note=note)
            for pass_, t in (("fwd", fwd), ("bwd", bwd), ("fwd+bwd", both)) if want[pass_]]


def _case(ctx, variant, M, N, dtype, fused) -> list[Row]:
    case = f"{M}x{N}" + (f" p={P} +res" if variant == "dropout_add_layer_norm" else "")
    if ctx.skip_case(variant, case):
        return []
    gen = torch.Generator(device=ctx.device).manual_seed(0)
    make = lambda *s: (torch.randn(*s, generator=gen, device=ctx.device) + 0.5).to(dtype)  # noqa: E731
    x, r = make(M, N).requires_grad_(), make(M, N).requires_grad_()
    w, b = make(N).requires_grad_(), make(N).requires_grad_()
    inputs = {"layer_norm": (x, None, w, b), "rms_norm": (x, None, w, None),
              "dropout_add_layer_norm": (x, r, w, b)}[variant]
    grad = make(M, N)
    nbytes = _minimal_bytes(variant, M, N, x.element_size())
    pats, array_bytes = _patterns(variant), M * N * x.element_size()

    def measure(impl, fn, note=""):
        if not any(ctx.wants(impl, p) for p in nbytes):
            return []
        try:
            return _measure(ctx, variant, case, dtype, impl, fn, inputs, grad, nbytes, pats,
                            array_bytes, note)
        except Exception as e:  # one broken candidate must not hide the others
            return _nan_rows(ctx, variant, case, dtype, impl, nbytes, pats, array_bytes,
                             f"failed: {type(e).__name__}: {_first_line(e)}")

    rows = []
    for backend in fused or ["reference"]:
        with fusedreg.use_backend(backend):  # around the timing, not inside each timed call
            rows += measure(f"fusedreg[{backend}]", _fused(variant),
                            "" if fused else "no fused backend built for this device")
    if ctx.sweep and fused and backends.AUTO_TORCH_BELOW.get(variant, {}).get(ctx.device.type):
        # what a user gets by default: under auto a small plain norm is torch's own op
        # (backends.AUTO_TORCH_BELOW), so the sweep shows auto beside the named backend
        with fusedreg.use_backend("auto"):
            rows += measure("fusedreg[auto]", _fused(variant))
    eager = _eager(variant)
    rows += measure("torch eager", eager)
    for name, fn in _peers(variant, ctx.device):
        rows += measure(name, fn)
    if ctx.sweep or not any(ctx.wants("torch.compile", p) for p in nbytes):
        return rows  # the sweep compares with eager (and peers) only
    torch._dynamo.reset()
    compiled = torch.compile(eager, dynamic=False)
    try:
        t0 = time.perf_counter()
        diff = [t for t in inputs if t is not None]
        torch.autograd.grad(compiled(*inputs), diff, grad)
        note = f"compiled in {time.perf_counter() - t0:.0f} s"
    except Exception as e:  # compile needs a working toolchain: skip, say why
        return rows + _nan_rows(ctx, variant, case, dtype, "torch.compile", nbytes, pats, array_bytes,
                                f"torch.compile failed: {type(e).__name__}: {_first_line(e)}")
    return rows + measure("torch.compile", compiled, note)


def benchmark(ctx: Context) -> list[Row]:
    rows = []
    fused = fused_backends(OP, ctx.device)
    for dtype in ctx.dtypes:
        for M, N in _sizes(ctx):
            for variant in VARIANTS:
                rows += _case(ctx, variant, M, N, dtype, fused)
    return rows


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:120] if text else ""
