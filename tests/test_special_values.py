"""Special values through the activations and the dropout, on every backend.

The contract (docs/design.md, "Numerics"): for +-inf, NaN, +-3e38, +-1e20 and each dtype's
largest finite values, every activation, forward and backward, returns the exact value of
the function at that point, rounded to the dtype: its limit at +-inf (act(+inf) = +inf,
act(-inf) = 0, act'(+inf) = 1, act'(-inf) = 0), NaN for NaN (except relu'(NaN) = 1, which is
what torch's relu backward gives). That is what torch's eager op returns wherever torch's own
arithmetic does not overflow; where it does (gelu/silu at +-inf: 0 * inf; gelu_tanh's
derivative once z^3 overflows) torch gives NaN and fusedreg the exact value, which the table
below checks too. The exact values come from mpmath at 50 digits, not from any backend.

Dropped means exactly zero: an inf or NaN that the mask drops gives 0 in the output (and its
gradient 0), on every backend, also inside dropout_add_layer_norm's rows.

The CPU kernels are checked at every instruction-set level (FUSEDREG_CPU_ISA, a fresh process
per level), since each level is a separately compiled copy of the element loops.
"""
import json
import math
import os
import subprocess
import sys

import mpmath
import pytest
import torch
import torch.nn.functional as TF

import fusedreg
from fusedreg import backends
from fusedreg import functional as F
from conftest import cpu_backends

ACTS = {None: 0, "relu": 1, "gelu": 2, "gelu_tanh": 3, "silu": 4}
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
# Relative tolerance per dtype: a few roundings of the compute type, and the output rounding
# of the half types (these points are all saturated or simple, no cancellation is involved).
RTOL = {torch.float64: 1e-13, torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}

mpmath.mp.dps = 50
_K = mpmath.sqrt(2 / mpmath.pi)
_C = mpmath.mpf("0.044715")


def _values(dtype):
    """The special points, as dtype values (3e38 and 1e20 overflow to inf in float16)."""
    fmax = torch.finfo(dtype).max
    vals = [math.inf, -math.inf, math.nan, 3e38, -3e38, fmax, -fmax, 1e20, -1e20, 1e4, -1e4,
            1.0, -1.0, 0.0]
    return torch.tensor(vals, dtype=torch.float64).to(dtype)


def _exact(act, z: float, grad: bool) -> float:
    """act(z) (act'(z) when grad) exactly, as a float64 (rounded once to dtype by the caller)."""
    if math.isnan(z):
        # the identity's derivative is 1 everywhere; relu's backward passes NaN's gradient
        return 1.0 if (grad and act in (None, "relu")) else math.nan
    if act is None:
        return 1.0 if grad else z
    if act == "relu":
        return (1.0 if z > 0 else 0.0) if grad else max(z, 0.0)
    if abs(z) > 1000.0:
        # +-inf, and points where the function is within e^-900 of its limit (below float64's
        # resolution, and beyond what mpmath's erfc takes)
        return (1.0 if z > 0 else 0.0) if grad else (z if z > 0 else -0.0)
    x = mpmath.mpf(z)
    if act == "gelu":
        cdf = mpmath.ncdf(x)
        v = cdf + x * mpmath.npdf(x) if grad else x * cdf
    elif act == "gelu_tanh":
        u = _K * (x + _C * x**3)
        s = 1 / (1 + mpmath.exp(-2 * u))
        v = s + 2 * x * s * (1 - s) * _K * (1 + 3 * _C * x**2) if grad else x * s
    else:  # silu
        s = 1 / (1 + mpmath.exp(-x))
        v = s * (1 + x * (1 - s)) if grad else x * s
    return float(v)


def expected(act, x: torch.Tensor, grad: bool) -> torch.Tensor:
    out = [_exact(act, z, grad) for z in x.double().tolist()]
    return torch.tensor(out, dtype=torch.float64).to(x.dtype)


def mismatches(got: torch.Tensor, want: torch.Tensor, dtype) -> torch.Tensor:
    """Where got differs from want beyond the dtype's tolerance (NaN matches NaN only)."""
    g, w = got.double(), want.double()
    close = (g == w) | (g.isnan() & w.isnan())
    fin = torch.isfinite(w) & torch.isfinite(g)
    tol = RTOL[dtype] * w.abs() + torch.finfo(dtype).tiny
    close |= fin & ((g - w).abs() <= tol)
    return ~close


def run_backend(backend: str, act, x: torch.Tensor):
    """(forward, backward with grad_out = 1) of the registered ops of ``backend``."""
    k = backends.implementation("bias_dropout", backend)
    seed = torch.zeros((), dtype=torch.int64)
    xs = x.reshape(1, -1)
    y = k.fwd(xs, None, None, 0.0, ACTS[act], seed)
    g = k.bwd(torch.ones_like(xs), xs, None, 0.0, ACTS[act], seed, False)[0]
    return y.flatten(), g.flatten()


def table_failures(backend: str) -> list:
    """Every (dtype, activation, direction, input, got, want) where ``backend`` breaks the table."""
    bad = []
    for dtype in DTYPES:
        x = _values(dtype)
        for act in ACTS:
            got = run_backend(backend, act, x)
            for grad, g in ((False, got[0]), (True, got[1])):
                want = expected(act, x, grad)
                for i in mismatches(g, want, dtype).nonzero().flatten().tolist():
                    bad.append((str(dtype), act, "backward" if grad else "forward",
                                x[i].item(), g[i].item(), want[i].item()))
    return bad


@pytest.mark.parametrize("backend", cpu_backends("bias_dropout"))
def test_activation_table(backend):
    bad = table_failures(backend)
    assert not bad, f"{len(bad)} wrong (dtype, act, dir, x, got, want): {bad[:12]}"


@pytest.mark.parametrize("level", ["baseline", "avx2"])
def test_activation_table_cpu_isa_levels(level):
    """The same table with the CPU kernels capped at ``level`` (read once per process)."""
    if "cpu" not in backends.implemented_backends("bias_dropout", "cpu"):
        pytest.skip("the C++ extension is not built")
    code = ("import sys, json; sys.path[:0] = {path!r}; import test_special_values as t; "
            "print(json.dumps(t.table_failures('cpu')))")
    out = subprocess.run([sys.executable, "-c", code.format(path=[os.path.dirname(__file__)] + sys.path)],
                         env={**os.environ, "FUSEDREG_CPU_ISA": level}, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    bad = json.loads(out.stdout.strip().splitlines()[-1])
    assert not bad, f"{len(bad)} wrong at {level}: {bad[:12]}"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_torch_agrees_where_it_does_not_overflow(dtype):
    """The table is torch's eager op wherever torch's own arithmetic does not overflow: the
    only differences are points where torch gives NaN (0 * inf, inf / inf) or inf (gelu's
    z * (1 + erf) past float's max) and the exact value is a number — the cases the design
    notes name."""
    ops = {None: lambda z: z * 1.0, "relu": torch.relu, "gelu": TF.gelu,
           "gelu_tanh": lambda z: TF.gelu(z, approximate="tanh"), "silu": TF.silu}
    x = _values(dtype)
    torch_overflows = []
    for act, fn in ops.items():
        xt = x.clone().requires_grad_()
        y = fn(xt)
        (g,) = torch.autograd.grad(y.sum(), xt)
        for grad, t in ((False, y.detach()), (True, g)):
            want = expected(act, x, grad)
            wrong = mismatches(t, want, dtype)
            overflow = t.isnan() | (t.isinf() & want.isfinite())
            assert not (wrong & ~overflow).any(), (act, grad, x[wrong], t[wrong], want[wrong])
            torch_overflows += [(act, grad, v) for v in x[wrong].tolist()]
    # where: at +-inf; gelu_tanh's derivative once z^2 overflows; gelu past about 1.7e38
    for act, grad, v in torch_overflows:
        assert (math.isinf(v) or (act == "gelu_tanh" and grad and abs(v) >= 1e19)
                or (act == "gelu" and not grad and abs(v) >= 1.7e38)), (act, grad, v)


def test_exact_values_are_not_trivial():
    """The oracle itself: saturating points, and a mid-range one that must not saturate."""
    assert _exact("silu", -3e38, False) == 0.0 and _exact("gelu", 3e38, True) == 1.0
    assert _exact("gelu", -3e38, True) == 0.0 and _exact("gelu_tanh", 1e20, False) == 1e20
    assert abs(_exact("silu", -1.0, True) - 0.0723294) < 1e-6
    assert math.isnan(_exact("gelu", math.nan, True)) and _exact("relu", math.nan, True) == 1.0


# ---- dropped means zero ------------------------------------------------------------------

SPECIAL = [math.inf, -math.inf, math.nan]


@pytest.mark.parametrize("backend", cpu_backends("bias_dropout"))
@pytest.mark.parametrize("value", SPECIAL, ids=str)
def test_dropped_special_value_is_zero(backend, value):
    seed = 1234
    x = torch.full((4, 37), value)
    keep = F.dropout_mask(x.shape, 0.5, seed)
    assert 0 < keep.sum() < keep.numel()
    with fusedreg.use_backend(backend):
        assert torch.equal(F.dropout(x, p=1.0, seed=seed), torch.zeros_like(x))
        y = F.bias_dropout(x, torch.zeros(37), torch.ones_like(x), p=0.5, activation="gelu", seed=seed)
        assert torch.equal(y[~keep], torch.ones_like(y[~keep]))  # dropped: 0 + residual
        # the gradient through a dropped element is exactly 0, even for an inf/nan grad_out
        # (for x itself NaN it is NaN, as in torch: 0 * gelu'(NaN))
        xg = (torch.randn_like(x) + 0.5).requires_grad_()
        y = F.bias_dropout(xg, torch.zeros(37), None, p=0.5, activation="gelu", seed=seed)
        (g,) = torch.autograd.grad(y, xg, torch.full_like(x, value))
        assert torch.equal(g[~keep], torch.zeros_like(g[~keep]))


@pytest.mark.parametrize("backend", cpu_backends("layer_norm"))
@pytest.mark.parametrize("value", SPECIAL, ids=str)
def test_dropped_special_value_leaves_norm_row_finite(backend, value):
    """dropout_add_layer_norm: an inf/nan of x that is dropped must not reach its row."""
    seed, N = 99, 64
    keep = F.dropout_mask((3, N), 0.5, seed)
    x = torch.randn(3, N) + 0.5
    x[~keep] = value  # every dropped element special, every kept one a number
    residual = torch.randn(3, N)
    w, b = torch.rand(N) + 0.5, torch.randn(N)
    with fusedreg.use_backend(backend):
        xg = x.clone().requires_grad_()
        y, h = F.dropout_add_layer_norm(xg, residual, w, b, p=0.5, prenorm=True, seed=seed)
        (g,) = torch.autograd.grad(y, xg, torch.randn_like(y))
    with fusedreg.use_backend("reference"):
        y_ref = F.dropout_add_layer_norm(x.masked_fill(~keep, 0.0), residual, w, b, p=0.5,
                                         seed=seed)
    assert torch.isfinite(y).all() and torch.isfinite(h).all() and torch.isfinite(g).all()
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    assert torch.equal(g[~keep], torch.zeros_like(g[~keep]))
