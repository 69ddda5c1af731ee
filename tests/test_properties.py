"""A property-based sweep: the cpu backend (and, on a small subset, the Triton interpreter)
computes what the reference computes, forward and backward, over random cases of every op.

Each case draws a dtype, a shape (0-size dims, N = 1, odd N, now and then a row past 64K
elements), the layout of each operand (contiguous, transposed, stepped, expanded,
channels_last, at a storage offset: each a differentiable view of a leaf, so the gradients
reach the leaf through the view), special values (inf, -inf, NaN, huge finite values) and
the op's arguments (p, activation, bias/residual presence, eps, seed anywhere in 64 bits).
Both backends run the functional API on the same tensors; outputs and the leaves' gradients
must agree within the tolerances of tests/tolerances.py (NaN where NaN, inf where inf).

Hypothesis runs derandomized (the same cases on every run, so CI is reproducible), 30-60 s
in all by default; FUSEDREG_HYPOTHESIS_EXAMPLES=N runs N cases per cpu test (N // 10 for the
Triton ones) for a longer local search.
"""
import math
import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fusedreg
from fusedreg import backends
from fusedreg import functional as F
from tolerances import ELEMENTWISE, REDUCTION

_N = int(os.environ.get("FUSEDREG_HYPOTHESIS_EXAMPLES", "0"))


def _settings(default: int, triton: bool = False):
    n = (max(_N // 10, 1) if triton else _N) if _N else default
    return settings(max_examples=n, derandomize=True, deadline=None, database=None,
                    suppress_health_check=list(HealthCheck), print_blob=True)


def _need(backend: str, op: str):
    if backend not in backends.implemented_backends(op, "cpu"):
        pytest.skip(f"{backend} does not run {op} here")


DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
LAYOUTS = ["contiguous", "transposed", "stepped", "expanded", "channels_last", "offset"]
ACTIVATIONS = [None, "relu", "gelu", "gelu_tanh", "silu"]
DIMS = [0, 1, 2, 3, 4, 5, 7, 8, 16, 33, 64]


# ---- building the inputs ------------------------------------------------------------------

def _values(draw, shape, dtype, specials, huge):
    """A float tensor of ``shape`` with non-zero mean, some entries replaced by special values."""
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(shape, generator=g, dtype=torch.float64) * draw(st.sampled_from([1.0, 3.0, 100.0]))
    t = t + draw(st.sampled_from([0.0, 0.5, -2.0]))
    t = t.to(dtype)
    if specials and t.numel():
        pool = [math.inf, -math.inf, math.nan]
        if huge:
            fmax = torch.finfo(dtype).max
            pool += [fmax, -fmax, min(3e38, fmax), -min(3e38, fmax), min(1e20, fmax)]
        flat = t.view(-1)
        for _ in range(draw(st.integers(1, 3))):
            flat[draw(st.integers(0, flat.numel() - 1))] = draw(st.sampled_from(pool))
    return t


def _layout_ok(layout, shape):
    if layout == "transposed":
        return len(shape) >= 2
    if layout == "channels_last":
        return len(shape) == 4
    if layout == "expanded":
        return len(shape) >= 1 and shape[0] > 1
    return True


def operand(draw, shape, dtype, specials=False, huge=False, layout=None, constant_ok=True):
    """(leaf, view): ``view`` has ``shape`` in a drawn layout and is a differentiable view of
    the leaf ``leaf`` (requires_grad), which receives the gradient."""
    shape = tuple(shape)
    if layout is None:
        ok = [l for l in LAYOUTS if _layout_ok(l, shape) and (constant_ok or l != "expanded"
                                                              or len(shape) > 1)]
        layout = draw(st.sampled_from(ok))
    if layout == "transposed":
        base = _values(draw, shape[:-2] + (shape[-1], shape[-2]), dtype, specials, huge)
        leaf = base.requires_grad_()
        return leaf, leaf.transpose(-1, -2)
    if layout == "stepped":
        base = _values(draw, shape[:-1] + (2 * shape[-1],) if shape else (2,), dtype, specials, huge)
        leaf = base.requires_grad_()
        return leaf, (leaf[..., ::2] if shape else leaf[0])
    if layout == "expanded":
        leaf = _values(draw, (1,) + shape[1:], dtype, specials, huge).requires_grad_()
        return leaf, leaf.expand(shape)
    if layout == "channels_last":
        base = _values(draw, shape, dtype, specials, huge).contiguous(memory_format=torch.channels_last)
        leaf = base.detach().requires_grad_()
        return leaf, leaf
    if layout == "offset":
        off = draw(st.integers(1, 3))
        n = math.prod(shape)
        leaf = _values(draw, (n + off,), dtype, specials, huge).requires_grad_()
        return leaf, leaf[off:].view(shape)
    leaf = _values(draw, shape, dtype, specials, huge).requires_grad_()
    return leaf, leaf


def _shape(draw, max_numel=2048, min_ndim=1, max_ndim=4, no_zero_last=False):
    if max_numel >= 2048 and draw(st.integers(0, 19)) == 0:  # now and then a row past 64K
        return (draw(st.sampled_from([1, 2])), draw(st.sampled_from([65537, 65540])))
    while True:
        ndim = draw(st.integers(min_ndim, max_ndim))
        shape = tuple(draw(st.sampled_from(DIMS)) for _ in range(ndim))
        if no_zero_last and shape and shape[-1] == 0:
            continue
        if math.prod(shape) <= max_numel:
            return shape


# ---- comparing ----------------------------------------------------------------------------

def _max_finite(t) -> float:
    t = t.detach().double()
    t = t[t.isfinite()]
    return t.abs().max().item() if t.numel() else 0.0


def assert_same(got, want, tol, what, scaled=False, scale=1.0):
    """got == want within ``tol`` (atol/rtol; with ``scaled``, atol relative to the largest
    finite |want| or ``scale``, at least 1), NaN where NaN, the same infinities."""
    assert got.shape == want.shape and got.dtype == want.dtype, (what, got.shape, want.shape)
    g, w = got.detach().double(), want.detach().double()
    assert torch.equal(g.isnan(), w.isnan()), f"{what}: NaN at different places"
    inf = w.isinf()
    assert torch.equal(g.isinf(), inf) and torch.equal(g[inf], w[inf]), f"{what}: inf differs"
    fin = w.isfinite()
    if not fin.any():
        return
    atol = tol["atol"]
    if scaled:
        atol = atol * max(1.0, scale, w[fin].abs().max().item())
    err = (g[fin] - w[fin]).abs()
    bound = atol + tol["rtol"] * w[fin].abs()
    assert (err <= bound).all(), f"{what}: max excess {(err - bound).max().item():.3g}"


def _run(backend, fn, leaves, grad_out):
    """fn() under ``backend`` with fresh grads; returns (outputs, grads of the leaves)."""
    for leaf in leaves:
        leaf.grad = None
    with fusedreg.use_backend(backend):
        out = fn()
        outs = out if isinstance(out, tuple) else (out,)
        diff = [(o, g) for o, g in zip(outs, grad_out) if o.requires_grad]
        if diff:
            torch.autograd.backward([o for o, _ in diff], [g for _, g in diff])
    return [o.detach() for o in outs], [None if l.grad is None else l.grad.clone() for l in leaves]


# ---- bias_dropout -------------------------------------------------------------------------

@st.composite
def bias_dropout_cases(draw, max_numel=2048, triton=False):
    dtype = draw(st.sampled_from(DTYPES))
    shape = _shape(draw, max_numel=max_numel, max_ndim=2 if triton else 4)
    act = draw(st.sampled_from(ACTIVATIONS))
    has_bias = draw(st.booleans()) and len(shape) >= 1
    has_res = draw(st.booleans())
    specials = draw(st.integers(0, 3)) == 0
    # huge finite values overflow sums in an order-dependent way: not with a bias gradient
    huge = specials and not has_bias
    x_leaf, x = operand(draw, shape, dtype, specials, huge)
    leaves, args = [x_leaf], dict(x=x)
    if has_bias:
        b_leaf, b = operand(draw, shape[-1:], dtype, specials and draw(st.booleans()), False)
        leaves.append(b_leaf)
        args["bias"] = b
    if has_res:
        r_leaf, r = operand(draw, shape, dtype, specials and draw(st.booleans()), huge)
        leaves.append(r_leaf)
        args["residual"] = r
    p = draw(st.one_of(st.sampled_from([0.0, 0.1, 0.5, 1.0]), st.floats(0.0, 1.0)))
    seed = draw(st.integers(-(2**63), 2**64 - 1))
    grad = _values(draw, shape, dtype, specials and draw(st.booleans()), False)
    return dtype, leaves, args, dict(p=p, activation=act, seed=seed), grad


def check_bias_dropout(backend, case):
    dtype, leaves, args, kw, grad = case
    fn = lambda: F.bias_dropout(**args, **kw)  # noqa: E731
    got, got_g = _run(backend, fn, leaves, [grad])
    want, want_g = _run("reference", fn, leaves, [grad])
    # the kept values are scaled by 1 / (1 - p): so is the absolute error of act (erf's 2e-7)
    p = kw["p"]
    amp = 1.0 / (1.0 - p) if p < 1.0 else 1.0
    tol = lambda t: dict(atol=t["atol"] * amp, rtol=t["rtol"])  # noqa: E731
    assert_same(got[0], want[0], tol(ELEMENTWISE[dtype]), "out")
    # a gradient's error is relative to grad_out's scale (act' combines terms of order 1);
    # a leaf with fewer elements than x (bias, an expanded leaf) is a sum over rows
    for i, (g, w) in enumerate(zip(got_g, want_g)):
        assert (g is None) == (w is None)
        if g is not None:
            red = g.numel() < math.prod(args["x"].shape)
            assert_same(g, w, tol(REDUCTION[dtype] if red else ELEMENTWISE[dtype]),
                        f"grad of leaf {i}", scaled=True, scale=_max_finite(grad))


@_settings(800)
@given(case=bias_dropout_cases())
def test_bias_dropout_cpu_matches_reference(case):
    _need("cpu", "bias_dropout")
    check_bias_dropout("cpu", case)


@_settings(40, triton=True)
@given(case=bias_dropout_cases(max_numel=256, triton=True))
def test_bias_dropout_triton_matches_reference(case):
    _need("triton", "bias_dropout")
    check_bias_dropout("triton", case)


# ---- layer_norm, rms_norm, dropout_add_layer_norm -----------------------------------------

NORM_TOL = {  # two fp32-statistics implementations, relative to the output's scale (>= 1)
    torch.float64: dict(atol=1e-9, rtol=0.0),
    torch.float32: dict(atol=1e-4, rtol=0.0),   # row/column sums in another order
    torch.float16: dict(atol=2e-2, rtol=0.0),   # one rounding of y (or h) on either side
    torch.bfloat16: dict(atol=4e-2, rtol=0.0),
}


@st.composite
def norm_cases(draw, max_numel=2048, triton=False):
    dtype = draw(st.sampled_from(DTYPES))
    shape = _shape(draw, max_numel=max_numel, max_ndim=2 if triton else 4, no_zero_last=True)
    norm_ndim = draw(st.integers(1, min(2, len(shape))))
    norm_shape = shape[-norm_ndim:]
    if math.prod(norm_shape) == 0:
        norm_shape, norm_ndim = shape[-1:], 1
    kind = draw(st.sampled_from(["layer_norm", "rms_norm", "dropout_add"]))
    # inf/NaN only: huge finite values overflow the variance order-dependently; no constant
    # rows (a 1-d x expanded): rstd = 1/sqrt(eps) there amplifies rounding beyond any scale
    specials = draw(st.integers(0, 3)) == 0
    x_leaf, x = operand(draw, shape, dtype, specials, constant_ok=False)
    leaves = [x_leaf]
    pdt = dtype if dtype == torch.float64 or draw(st.booleans()) else torch.float32
    w = b = None
    if draw(st.booleans()):
        w_leaf, w = operand(draw, norm_shape, pdt)
        leaves.append(w_leaf)
    if draw(st.booleans()) and kind != "rms_norm":
        b_leaf, b = operand(draw, norm_shape, pdt)
        leaves.append(b_leaf)
    eps = draw(st.sampled_from([1e-5, 1e-6, 1e-2]))
    grads = [_values(draw, shape, dtype, False, False)]
    if kind == "layer_norm":
        fn = lambda: F.layer_norm(x, norm_shape, w, b, eps=eps)  # noqa: E731
    elif kind == "rms_norm":
        fn = lambda: F.rms_norm(x, norm_shape, w, eps=eps)  # noqa: E731
    else:
        wide = dtype != torch.float64
        fp32_res = wide and draw(st.booleans())
        res = None
        if draw(st.booleans()):
            r_leaf, res = operand(draw, shape, torch.float32 if wide and draw(st.booleans()) else dtype)
            leaves.append(r_leaf)
        kw = dict(p=draw(st.sampled_from([0.0, 0.1, 0.5, 1.0])), eps=eps,
                  prenorm=draw(st.booleans()), rms=draw(st.booleans()),
                  residual_in_fp32=fp32_res, seed=draw(st.integers(-(2**63), 2**64 - 1)))
        fn = lambda: F.dropout_add_layer_norm(x, res, w, b, **kw)  # noqa: E731
        h_dtype = (torch.float32 if fp32_res else (res.dtype if res is not None else dtype))
        grads.append(_values(draw, shape, h_dtype, False, False))
    return dtype, leaves, fn, grads


def check_norm(backend, case):
    dtype, leaves, fn, grads = case
    got, got_g = _run(backend, fn, leaves, grads)
    want, want_g = _run("reference", fn, leaves, grads)
    assert len(got) == len(want)
    # tolerances by x's dtype: an fp32 h or weight gradient of fp16/bf16 x carries the roundings
    # of the half-precision operands it is computed from
    for i, (g, w) in enumerate(zip(got, want)):
        assert_same(g, w, NORM_TOL[dtype], f"output {i}", scaled=True)
    # a gradient's error is relative to the scale of the terms it combines (grad_out's)
    scale = max(_max_finite(g) for g in grads)
    for i, (g, w) in enumerate(zip(got_g, want_g)):
        assert (g is None) == (w is None)
        if g is not None:
            assert_same(g, w, NORM_TOL[dtype], f"grad of leaf {i}", scaled=True, scale=scale)


@_settings(600)
@given(case=norm_cases())
def test_norms_cpu_match_reference(case):
    _need("cpu", "layer_norm")
    check_norm("cpu", case)


@_settings(40, triton=True)
@given(case=norm_cases(max_numel=256, triton=True))
def test_norms_triton_match_reference(case):
    _need("triton", "layer_norm")
    check_norm("triton", case)
