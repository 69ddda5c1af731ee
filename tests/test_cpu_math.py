"""The CPU kernels' activation arithmetic, bounded against the formulas of activation.h.

The CPU float32 path evaluates exp and erf with the polynomials of vmath.h (they vectorize;
libm's expf/erff are opaque calls), where CUDA calls its math library; float64 calls libm on
both. This bounds what that costs: for every activation, forward and backward, the cpu
backend's op on a dense float32 sweep is compared with the same formula evaluated in
float64, under an error model built from vmath.h's documented bounds (below). The same
check runs at every instruction-set level of the build (FUSEDREG_CPU_ISA), since the AVX2
and AVX-512 variants contract into FMA and the baseline does not.

Error model, per output element: |got - ref| <= MAX_ULP * ulp32(T) + E, where
  ref  the formula in float64 on the same float32 input, not rounded (the rounding to
       float32 is one of MAX_ULP's); torch's float64 exp/erf (the float64 check below uses
       the C library's, which the kernels call);
  T    the largest magnitude the formula's last additions combine (the result itself where
       nothing cancels): float32 rounding errors are relative to it;
  E    what the float32 evaluation cannot avoid and what vmath.h documents, each measured
       as the change of the float64 formula under that perturbation:
       - erf's absolute error (ERF_ABS_ERR) where the formula uses erf (gelu's derivative
         takes Phi from a one-exp form instead, vmath.h's gelu_grad_t, and gelu's float32
         forward at the AVX-512 level from a table of polynomials, cpu::gelu_avx512; both
         have smaller absolute errors: the same term bounds them;
         test_gelu_backward_tail_is_relative checks the derivative's relative accuracy where
         Phi is small);
       - the float32 rounding of exp's argument (EXP_ARG_ROUNDING relative), which exp
         amplifies by |argument| (the same on CUDA, whose argument is float32 too).
Where an exp argument leaves [-87, 88], e^x is not a normal float32: it is inf, or a
denormal or 0 (vmath.h scales into the denormals as libm does, with less relative precision
there), so those points are only checked to be within SATURATED_ABS of the formula; their
exact special-value behaviour (+-inf, huge |z|, NaN) is tests/test_special_values.py's.
"""
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

try:
    import fusedreg._C  # noqa: F401  (registers the C++ ops)
except ImportError as e:  # pragma: no cover - depends on the build
    pytest.skip(f"fusedreg._C is not built ({e})", allow_module_level=True)

OPS = torch.ops.fusedreg
NONE, RELU, GELU, GELU_TANH, SILU = range(5)  # activation codes of the op schemas

# vmath.h: vexp's error is below 2 ulp; a formula adds at most ~4 float32 roundings of half an
# ulp each (1 + e, the division or product, the final sum), relative to T.
MAX_ULP = 4.0
# vmath.h: |verf(x) - erf(x)| < 2e-7 (7.7e-8 measured: the fit's 2.3e-9 plus float32 rounding);
# the AVX-512 GELU table's Phi is within 6.1e-8, i.e. 1.3e-7 in erf's terms.
ERF_ABS_ERR = 2e-7
# vmath.h: the float32 GELU derivative's Phi(z) for z < 0 (the tail G(s) e) is within 1.5e-6
# relative for |z| <= 8.
PHI_TAIL_REL = 2e-6
# exp's argument is computed in float32 from the input (gelu_tanh: z + 0.044715 z^3, times
# sqrt(2/pi), times -2; gelu's pdf: -0.5 z^2): at most 5 roundings of half an ulp, relative.
EXP_ARG_ROUNDING = 5 * 2.0**-24
# |z| * e^-87, bounded for |z| <= 20 with room: the most a denormal exp can leave behind.
SATURATED_ABS = 2.0**-100
# float64 calls libm on both sides, so only the formula's roundings can differ: not at all in
# the baseline variant (the same operations as here), by FMA contraction in the AVX2 and
# AVX-512 ones, which moves the roundings of the formula and of exp's argument.
MAX_ULP_F64 = 2.0
EXP_ARG_ROUNDING_F64 = 5 * 2.0**-53

GRID = 2**17  # float32 sweep: a fine grid on [-20, 20] (step 3e-4) plus random values


def _sweep():
    g = torch.Generator().manual_seed(0)
    grid = torch.linspace(-20.0, 20.0, GRID + 1, dtype=torch.float64)
    rand = torch.randn(2**15, generator=g, dtype=torch.float64) * 4.0 + 1.5  # non-zero mean
    small = torch.randn(2**12, generator=g, dtype=torch.float64) * 1e-3  # near 0
    return torch.cat([grid, rand, small, torch.tensor([0.0, -0.0])]).to(torch.float32)


# ---- the formulas of activation.h in float64, with hooks for the perturbations ----------------
K_INV_SQRT2 = 0.70710678118654752440
K_INV_SQRT2PI = 0.39894228040143267794
K_SQRT2_OVER_PI = 0.79788456080286535588
K_COEFF = 0.044715


def _exp(a, rel=0.0):
    return torch.exp(a * (1.0 + rel))


def _erf(x, add=0.0):
    return torch.erf(x) + add


def _elementwise(fn):
    return lambda t: torch.from_numpy(np.frompyfunc(fn, 1, 1)(t.numpy()).astype(np.float64))


# The C library's exp and erf, which the float64 kernels call (torch's own may differ by an ulp).
_libm_exp, _libm_erf = _elementwise(math.exp), _elementwise(math.erf)


def _exp_libm(a, rel=0.0):
    return _libm_exp(a * (1.0 + rel))


def _erf_libm(x, add=0.0):
    return _libm_erf(x) + add


def formula(act, z, grad, exp=_exp, erf=_erf):
    """(value, T, exp arguments) of act (or its derivative when grad) at z, float64."""
    one = torch.ones_like(z)
    if act == NONE:
        return (one if grad else z), (one if grad else z.abs()), []
    if act == RELU:
        v = (z > 0).to(z.dtype) if grad else z.clamp(min=0)
        return v, v.abs(), []
    if act == GELU:
        cdf = 0.5 * (1.0 + erf(z * K_INV_SQRT2))
        if not grad:
            v = z * cdf
            return v, v.abs(), [-(z * K_INV_SQRT2) ** 2]
        a = -0.5 * z * z
        zpdf = z * (K_INV_SQRT2PI * exp(a))
        return cdf + zpdf, torch.maximum(cdf.abs(), zpdf.abs()), [a, -(z * K_INV_SQRT2) ** 2]
    if act == GELU_TANH:
        u = K_SQRT2_OVER_PI * (z + K_COEFF * z * z * z)
        a = -2.0 * u
        if not grad:
            v = z / (1.0 + exp(a))
            return v, v.abs(), [a]
        s = 1.0 / (1.0 + exp(a))
        du = K_SQRT2_OVER_PI * (1.0 + 3.0 * K_COEFF * z * z)
        # 1 - s cancels where s -> 1: its error is scaled by 2 z s du
        return s + 2.0 * z * s * (1.0 - s) * du, torch.maximum(s.abs(), (2.0 * z * s * du).abs()), [a]
    # SILU
    a = -z
    if not grad:
        v = z / (1.0 + exp(a))
        return v, v.abs(), [a]
    s = 1.0 / (1.0 + exp(a))
    # 1 - s cancels where s -> 1: its error is scaled by z s
    return s * (1.0 + z * (1.0 - s)), s * torch.maximum(one, z.abs()), [a]


def _ulp(t, dtype):
    """The spacing of `dtype` at |t| (that of its smallest normal number below it)."""
    mantissa_bits = {torch.float32: 23, torch.float64: 52}[dtype]
    t = t.abs().clamp(min=torch.finfo(dtype).tiny)
    return torch.exp2(torch.floor(torch.log2(t)) - mantissa_bits)


def allowed_error(act, z64, grad, max_ulp, arg_rounding, erf_err, dtype):
    """(ref, bound, in_range): the float64 formula, the error allowed (see the module's
    docstring) and where every exp argument gives a normal float32."""
    exp, erf = (_exp, _erf) if dtype == torch.float32 else (_exp_libm, _erf_libm)
    ref, t, args = formula(act, z64, grad, exp=exp, erf=erf)
    bound = max_ulp * _ulp(t, dtype)
    for sign in (1.0, -1.0):
        if arg_rounding and args:
            moved = formula(act, z64, grad, exp=lambda a: exp(a, sign * arg_rounding), erf=erf)[0]
            bound = bound + (moved - ref).abs()
        if erf_err and act == GELU:
            moved = formula(act, z64, grad, exp=exp, erf=lambda x: erf(x, sign * erf_err))[0]
            bound = bound + (moved - ref).abs()
    in_range = torch.ones_like(z64, dtype=torch.bool)
    for a in args:
        in_range &= (a >= -87.0) & (a <= 88.0)
    return ref, bound, in_range


def run_op(act, x, grad):
    seed = torch.zeros((), dtype=torch.int64)
    if not grad:
        return OPS.bias_dropout_fwd(x, None, None, 0.0, act, seed)
    # grad_out = 1: grad_x is the derivative itself
    return OPS.bias_dropout_bwd(torch.ones_like(x), x, None, 0.0, act, seed, False)[0]


def check_float32(act, grad):
    """Max error in units of the bound (<= 1 passes) on the sweep, over two layouts: one long
    row, and rows of 127 (most elements then go through the vector loops' epilogues)."""
    x = _sweep()
    n = x.numel() // 127 * 127
    worst = 0.0
    for xs in (x.reshape(1, -1), x[:n].reshape(-1, 127)):
        got = run_op(act, xs.contiguous(), grad).flatten().double()
        z = xs.flatten().double()
        ref, bound, in_range = allowed_error(act, z, grad, MAX_ULP, EXP_ARG_ROUNDING, ERF_ABS_ERR,
                                             torch.float32)
        err = (got - ref).abs()
        assert torch.isfinite(got).all()
        assert (err[~in_range] <= SATURATED_ABS).all(), "exp outside the normal range is off"
        worst = max(worst, (err[in_range] / bound[in_range]).max().item())
    return worst


ACTS = [(NONE, "none"), (RELU, "relu"), (GELU, "gelu"), (GELU_TANH, "gelu_tanh"), (SILU, "silu")]


@pytest.mark.parametrize("grad", [False, True], ids=["forward", "backward"])
@pytest.mark.parametrize("act", [a for a, _ in ACTS], ids=[n for _, n in ACTS])
def test_float32_within_vmath_error_model(act, grad):
    worst = check_float32(act, grad)
    assert worst <= 1.0, f"error {worst:.2f}x the bound"


@pytest.mark.parametrize("grad", [False, True], ids=["forward", "backward"])
@pytest.mark.parametrize("act", [a for a, _ in ACTS], ids=[n for _, n in ACTS])
def test_float64_matches_the_libm_formula(act, grad):
    x = _sweep().double()
    x = torch.cat([x, x + 1e-9])  # values that are not float32
    got = run_op(act, x.reshape(1, -1), grad).flatten()
    ref, bound, _ = allowed_error(act, x, grad, MAX_ULP_F64, EXP_ARG_ROUNDING_F64, 0.0,
                                  torch.float64)
    err = (got - ref).abs()
    assert (err <= bound).all(), f"max error {(err / bound).max().item():.2f}x the bound"


def test_the_bound_catches_a_one_percent_exp_error():
    """The model is tight enough to matter: exp off by 1% (in the formula, in float32)
    breaks it for every exp-based activation."""
    z = _sweep()[: GRID + 1].double()  # the grid
    for act in (GELU, GELU_TANH, SILU):
        for grad in (False, True):
            # verf is 1 - vexp(...) = 1 - erfc: vexp's error goes to erfc
            off = formula(act, z, grad, exp=lambda a: 1.01 * torch.exp(a),
                          erf=lambda x: torch.sign(x) * (1.0 - 1.01 * torch.erfc(x.abs())))[0]
            off = off.float().double()
            ref, bound, in_range = allowed_error(act, z, grad, MAX_ULP, EXP_ARG_ROUNDING,
                                                 ERF_ABS_ERR, torch.float32)
            assert ((off - ref).abs() > bound)[in_range].any(), (act, grad)


def test_gelu_backward_tail_is_relative():
    """Where Phi(z) is small (z < 0) the float32 GELU derivative is accurate relative to its
    own size: bounded without erf's absolute error, which exceeds the derivative itself below
    z = -5.5 (1 + erf(z / sqrt2) cancels there; vmath.h's gelu_grad_t has no such step). The
    reference takes Phi from erfc for the same reason (float64's 1 + erf is off by 1e-16 there).
    The grid from -8 (the normal-range bound) to -0.25, one long row and rows of 127."""
    z32 = torch.linspace(-8.0, -0.25, 2**15 + 1, dtype=torch.float32)
    n = z32.numel() // 127 * 127
    for zs in (z32.reshape(1, -1), z32[:n].reshape(-1, 127)):
        got = run_op(GELU, zs.contiguous(), True).flatten().double()
        z = zs.flatten().double()
        phi = 0.5 * torch.erfc(-z * K_INV_SQRT2)
        a = -0.5 * z * z
        zpdf = z * (K_INV_SQRT2PI * torch.exp(a))
        ref = phi + zpdf
        bound = MAX_ULP * _ulp(torch.maximum(phi, zpdf.abs()), torch.float32) + PHI_TAIL_REL * phi
        for sign in (1.0, -1.0):  # exp's amplification of its float32-rounded argument
            bound = bound + (z * (K_INV_SQRT2PI * _exp(a, sign * EXP_ARG_ROUNDING)) - zpdf).abs()
        err = (got - ref).abs()
        assert (err <= bound).all(), f"error {(err / bound).max().item():.2f}x the bound"


@pytest.mark.parametrize("grad", [False, True], ids=["forward", "backward"])
@pytest.mark.parametrize("act", [GELU, GELU_TANH, SILU], ids=["gelu", "gelu_tanh", "silu"])
def test_normal_range_segments_match_the_general_path(act, grad):
    """The kernels take exp without range handling (vmath.h's kNormalRange variants) on row
    segments whose inputs all lie in [-8, 8], the full one elsewhere: an element's result must
    not depend on which, so rows 0-1 (all in range) and rows 2-3 (the same values but for one
    out-of-range element each: 100, NaN) agree bit for bit everywhere else. Rows of 256 are one
    segment each (the kernels' step)."""
    g = torch.Generator().manual_seed(1)
    base = (torch.rand(2, 256, generator=g) * 16.0 - 8.0).float()
    base[:, 1:5] = torch.tensor([8.0, -8.0, 0.0, -0.0])
    x = torch.cat([base, base]).contiguous()
    x[2, 0], x[3, 0] = 100.0, float("nan")
    got = run_op(act, x, grad)
    assert torch.equal(got[:2, 1:].view(torch.int32), got[2:, 1:].view(torch.int32))


def _edges():
    """Where the float32 GELU changes its piece: the AVX-512 forward's table intervals (vmath.h,
    cpu::gelu_avx512: edges at -6.2 + 0.4 k, its clamps at -6.5 and 6.1) and verf's clamp at
    |z / sqrt2| = 4, each with its float32 neighbours a few ulps either side."""
    edges = [-6.2 + 0.4 * k for k in range(31)] + [-6.5, 6.1, 4.0 * math.sqrt(2.0), -4.0 * math.sqrt(2.0)]
    x = torch.tensor(edges, dtype=torch.float32)
    neighbours = [x]
    lo, hi = x, x
    for _ in range(4):  # 1 to 4 ulps either side
        lo = torch.nextafter(lo, torch.tensor(-math.inf))
        hi = torch.nextafter(hi, torch.tensor(math.inf))
        neighbours += [lo, hi]
    return torch.cat(neighbours)


@pytest.mark.parametrize("grad", [False, True], ids=["forward", "backward"])
def test_gelu_at_the_pieces_edges(grad):
    """The error model holds where the float32 GELU switches pieces (an interval's polynomial
    evaluated at its edge, or the neighbour's, as the rounding of the index picks it), in rows
    of 16 (the AVX-512 width) and of 127 (masked tails)."""
    z32 = _edges()
    for width in (16, 127):
        n = -(-z32.numel() // width) * width
        xs = torch.cat([z32, torch.zeros(n - z32.numel())]).reshape(-1, width).contiguous()
        got = run_op(GELU, xs, grad).flatten()[: z32.numel()].double()
        ref, bound, in_range = allowed_error(GELU, z32.double(), grad, MAX_ULP, EXP_ARG_ROUNDING,
                                             ERF_ABS_ERR, torch.float32)
        assert in_range.all()
        err = (got - ref).abs()
        assert (err <= bound).all(), f"error {(err / bound).max().item():.2f}x the bound"


LEVELS = ["baseline", "avx2"]


@pytest.mark.parametrize("level", LEVELS)
def test_float32_at_lower_instruction_set_levels(level):
    """The same float32 checks with the kernels capped at `level` (a fresh process: the level
    is read once), the gelu-backward tail and pieces' edges ones too. On a CPU below `level` this repeats the
    native checks."""
    code = ("import sys; sys.path[:0] = {path!r}; import test_cpu_math as t; "
            "t.test_gelu_backward_tail_is_relative(); "
            "t.test_gelu_at_the_pieces_edges(False); t.test_gelu_at_the_pieces_edges(True); "
            "print(max(t.check_float32(a, g) for a, _ in t.ACTS for g in (False, True)))")
    out = subprocess.run([sys.executable, "-c", code.format(path=[os.path.dirname(__file__)] + sys.path)],
                         env={**os.environ, "FUSEDREG_CPU_ISA": level}, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    worst = float(out.stdout.strip().splitlines()[-1])
    assert worst <= 1.0, f"error {worst:.2f}x the bound at {level}"
