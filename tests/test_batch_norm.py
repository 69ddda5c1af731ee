"""batch_norm and batch_norm_act on every backend that runs on CPU tensors (reference, cpu, and
triton under the interpreter, on small shapes), against a float64 torch oracle under the rule
of tests/tolerances.py (error <= FACTOR * torch's own error at the same dtype + atol); the
registered ops (opcheck), torch.compile, bad input, the modules against torch's; and the
triton and cuda backends on CUDA tensors against the reference (skipped without a GPU)."""
import math
import os

import pytest
import torch
import torch.nn.functional as TF
from torch.library import opcheck

import fusedreg
from fusedreg import backends
from fusedreg import functional as F
from fusedreg.reference.philox import dropout_scale

from _helpers import device_cases, serving
from conftest import cpu_backends
from tolerances import BATCH_NORM_GPU, check_norm_error as _check

OP = "batch_norm"
BACKENDS = cpu_backends(OP)
FAST = [b for b in BACKENDS if b != "triton"]  # the interpreter is too slow for the big cases
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
ACTS = {None: lambda t: t, "relu": torch.relu, "silu": TF.silu, "gelu": TF.gelu,
        "gelu_tanh": lambda t: TF.gelu(t, approximate="tanh")}


def _data(shape, dtype, seed=0, offset=3.0, std=2.0):
    g = torch.Generator().manual_seed(seed)
    # a non-zero mean, so that a kernel that forgets to subtract it cannot pass
    return (torch.randn(shape, generator=g, dtype=torch.float64) * std + offset).to(dtype)


def _layout(x, layout):
    if layout == "cl":
        return x.contiguous(memory_format=torch.channels_last if x.dim() == 4 else torch.channels_last_3d)
    return x


# (shape, layout): what each exercises
CASES = [
    ((6, 5), "c"),              # (N, C): one value per (n, c), the channels-last kernels
    ((4, 3, 7), "c"),           # NCL, odd length
    ((3, 4, 5, 6), "c"),        # NCHW
    ((3, 4, 5, 6), "cl"),       # channels_last: (N*H*W, C) rows
    ((2, 3, 2, 3, 4), "cl"),    # channels_last_3d
    ((5, 3, 1, 1), "c"),        # spatial size 1 (both layouts are the same memory)
    ((2, 7, 33, 40), "cl"),     # more rows than one reduction block (CPU/Triton partials)
    ((2, 3, 65, 70), "c"),      # rows longer than a summation block
    ((2, 2, 100, 100), "c"),    # a CPU channel over 64 KB: statistics row by row, merged
]
SMALL = [c for c in CASES if math.prod(c[0]) < 1000]


def _case_id(c):
    return f"{'x'.join(map(str, c[0]))}-{c[1]}"


def _backends_for(shape):
    return FAST if math.prod(shape) > 1000 else BACKENDS


def _run(fn, inputs, grad_out, buffers):
    """(y, grads of sum(y * grad_out) w.r.t. the float inputs, buffers after the call)."""
    inputs = [t.detach().clone().requires_grad_() if t is not None else None for t in inputs]
    buffers = [b.clone() if b is not None else None for b in buffers]
    y = fn(*inputs, *buffers)
    (y.double() * grad_out.double()).sum().backward()
    return y.detach(), [t.grad if t is not None else None for t in inputs], buffers


def _compare(fn, twin, inputs, grad_out, buffers, dtype, names, layout=None):
    out, grads, bufs = _run(fn, inputs, grad_out, buffers)
    tout, tgrads, tbufs = _run(twin, inputs, grad_out, buffers)
    rout, rgrads, rbufs = _run(twin, [t.double() if t is not None else None for t in inputs],
                               grad_out.double(),
                               [b.double() if b is not None else None for b in buffers])
    _check("y", out, rout, tout, dtype, "fwd")
    if layout == "cl":
        assert out.stride() == tout.stride(), "a channels-last input gives a channels-last output"
    for name, g, t, r in zip(names, grads, tgrads, rgrads):
        if r is not None:
            assert g is not None, f"no grad for {name}"
            _check(f"grad {name}", g, r, t, dtype, "bwd")
    for b, t, r in zip(bufs, tbufs, rbufs):
        if r is not None:
            _check("running stat", b, r, t, dtype if b.dtype == dtype else torch.float32, "fwd")


def _params(C, dtype, pdtype=torch.float32):
    w = _data((C,), pdtype, 3, offset=1.0, std=0.5)
    b = _data((C,), pdtype, 4, offset=0.5, std=0.5)
    rm = _data((C,), pdtype, 5, offset=2.0, std=1.0)
    rv = _data((C,), pdtype, 6, offset=3.0, std=0.5).abs() + 0.5
    return w, b, rm, rv


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_batch_norm_matches_float64(case, dtype):
    shape, layout = case
    C = shape[1]
    x = _layout(_data(shape, dtype), layout)
    dy = _layout(_data(shape, dtype, seed=7, offset=0.0), layout)
    w, b, rm, rv = _params(C, dtype)
    for backend in _backends_for(shape):
        for training in (True, False):
            with fusedreg.use_backend(backend):
                _compare(lambda x, w, b, rm, rv: F.batch_norm(x, rm, rv, w, b, training, 0.1, 1e-5),
                         lambda x, w, b, rm, rv: TF.batch_norm(x, rm, rv, w, b, training, 0.1, 1e-5),
                         [x, w, b], dy, [rm, rv], dtype, ["x", "weight", "bias"], layout)


@pytest.mark.parametrize("act", list(ACTS))
@pytest.mark.parametrize("case", [((3, 4, 5, 6), "c"), ((3, 4, 5, 6), "cl"), ((6, 5), "c")], ids=_case_id)
def test_batch_norm_act_matches_float64(case, act):
    """dropout(act(bn(x) + residual)) with p = 0, against torch's composite."""
    _check_act_residual(case, act, torch.float32, -1.0, BACKENDS, (True, False))


def _check_act_residual(case, act, dtype, residual_offset, backends, trainings):
    """batch_norm_act(x, residual) on each backend and training mode against torch's
    composite act(batch_norm(x) + residual)."""
    shape, layout = case
    x = _layout(_data(shape, dtype), layout)
    r = _layout(_data(shape, dtype, seed=2, offset=residual_offset), layout)
    dy = _layout(_data(shape, dtype, seed=7, offset=0.0), layout)
    w, b, rm, rv = _params(shape[1], dtype)
    for backend in backends:
        for training in trainings:
            with fusedreg.use_backend(backend):
                _compare(
                    lambda x, r, w, b, rm, rv: F.batch_norm_act(x, rm, rv, w, b, training, 0.1, 1e-5,
                                                                activation=act, residual=r),
                    lambda x, r, w, b, rm, rv: ACTS[act](TF.batch_norm(x, rm, rv, w, b, training, 0.1, 1e-5) + r),
                    [x, r, w, b], dy, [rm, rv], dtype, ["x", "residual", "weight", "bias"], layout)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("act", ["relu", "silu"])
@pytest.mark.parametrize("case", [((2, 3, 65, 70), "c"), ((2, 2, 100, 100), "c"), ((2, 70, 9, 13), "cl"),
                                  ((3, 5, 14, 14), "c")],
                         ids=_case_id)
def test_batch_norm_act_long_rows_match_float64(case, act, dtype):
    """With a residual and an activation on rows of many lane widths, a partial last lane
    group, and (NCS) lane folds inside a row and across rows: the CPU backward's one-loop
    reductions, against torch's composite. 14x14: short NCS rows whose remainders the CPU
    element-wise passes take in steps across row boundaries and the reductions as one masked
    lane step (reading past the row, except at the tensor's end)."""
    _check_act_residual(case, act, dtype, -0.5, FAST, (True,))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_half_activations_with_own_dtype_params(dtype):
    """Parameters and running stats in the activations' dtype (torch accepts both)."""
    x = _data((4, 3, 5, 5), dtype)
    dy = _data((4, 3, 5, 5), dtype, 7, 0.0)
    w, b, rm, rv = (t.to(dtype) for t in _params(3, dtype))
    for backend in BACKENDS:
        with fusedreg.use_backend(backend):
            _compare(lambda x, w, b, rm, rv: F.batch_norm(x, rm, rv, w, b, True, 0.1, 1e-5),
                     lambda x, w, b, rm, rv: TF.batch_norm(x, rm, rv, w, b, True, 0.1, 1e-5),
                     [x, w, b], dy, [rm, rv], dtype, ["x", "weight", "bias"])


@pytest.mark.parametrize("layout", ["c", "cl"])
def test_large_mean_small_std_is_stable(layout):
    """mean 1e3, std 1e-2 in float32: one-pass sum-of-squares statistics lose every digit."""
    shape = (4, 3, 16, 16)
    x = _layout(_data(shape, torch.float32, offset=1e3, std=1e-2), layout)
    dy = _layout(_data(shape, torch.float32, 7, 0.0), layout)
    w, b, rm, rv = _params(3, torch.float32)
    for backend in BACKENDS:
        with fusedreg.use_backend(backend):
            _compare(lambda x, w, b, rm, rv: F.batch_norm(x, rm, rv, w, b, True, 0.1, 1e-5),
                     lambda x, w, b, rm, rv: TF.batch_norm(x, rm, rv, w, b, True, 0.1, 1e-5),
                     [x, w, b], dy, [rm, rv], torch.float32, ["x", "weight", "bias"])


@pytest.mark.parametrize("backend", BACKENDS)
def test_dropout_mask_is_the_seeded_one_in_every_layout(backend):
    """The mask index is the logical NCHW index: NCHW and channels-last give the same y, and
    y equals dropout_mask applied to act(bn(x) + r), in forward and backward."""
    p, seed, shape = 0.3, 2**40 + 5, (2, 3, 4, 5)
    x, r = _data(shape, torch.float64), _data(shape, torch.float64, 2, -1.0)
    dy = _data(shape, torch.float64, 7, 0.0)
    w, b, rm, rv = (t.double() for t in _params(3, torch.float64))
    keep = F.dropout_mask(shape, p, seed)

    def twin(x, r, w, b, rm, rv):
        z = torch.relu(TF.batch_norm(x, rm, rv, w, b, True, 0.1, 1e-5) + r)
        return torch.where(keep, z * dropout_scale(p), torch.zeros((), dtype=z.dtype))

    results = []
    for layout in ("c", "cl"):
        with fusedreg.use_backend(backend):
            fn = lambda x, r, w, b, rm, rv: F.batch_norm_act(  # noqa: E731
                x, rm, rv, w, b, True, 0.1, 1e-5, activation="relu", residual=r, p=p, seed=seed)
            results.append(_run(fn, [_layout(x, layout), _layout(r, layout), w, b], dy, [rm, rv]))
    expected = _run(twin, [x, r, w, b], dy, [rm, rv])
    for got in results:
        torch.testing.assert_close(got[0], expected[0], rtol=1e-10, atol=1e-10)
        for g, e in zip(got[1], expected[1]):
            torch.testing.assert_close(g, e, rtol=1e-9, atol=1e-9)
    assert torch.equal(results[0][0] == 0, results[1][0] == 0)  # the same elements dropped


@pytest.mark.skipif("cpu" not in BACKENDS, reason="the cpu backend is not built")
@pytest.mark.parametrize("S", [17, 49, 196])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cpu_short_rows_are_each_rows_own_result(dtype, S):
    """The CPU forward and element-wise backward walk a chunk of NCS rows as one run whose
    steps cross row boundaries (each element with its own row's channel values): every row's
    output is bitwise what the same op gives for that row alone (a (1, 1, S) tensor, which
    ends in its own remainder), for y, grad_x (training and eval) and grad_residual."""
    N, C = 3, 5
    ops = torch.ops.fusedreg
    x, r, dy = (_data((N, C, S), dtype, seed=s, offset=o) for s, o in ((0, 3.0), (2, -0.5), (7, 0.0)))
    w, b, mean, _ = _params(C, dtype)
    invstd = _data((C,), torch.float32, 8, offset=1.0, std=0.2).abs() + 0.1
    s1, s2 = _data((C,), torch.float32, 9), _data((C,), torch.float32, 10)
    seed = torch.zeros(1, dtype=torch.long)

    def run(x, r, dy, w, b, mean, invstd, s1, s2):
        y = ops.batch_norm_fwd(x, r, w, b, mean, invstd, 1, 0.0, seed, False)
        out = [y]
        for training in (True, False):
            out += ops.batch_norm_bwd_elemt(dy, x, r, w, b, mean, invstd, s1, s2, float(N * S), 1, 0.0,
                                            seed, False, training, True, True)
        return out

    whole = run(x, r, dy, w, b, mean, invstd, s1, s2)
    for n in range(N):
        for c in range(C):
            row = (slice(n, n + 1), slice(c, c + 1))
            alone = run(x[row].contiguous(), r[row].contiguous(), dy[row].contiguous(),
                        *(v[c:c + 1].contiguous() for v in (w, b, mean, invstd, s1, s2)))
            for i, (a, o) in enumerate(zip(whole, alone)):
                assert torch.equal(a[n, c], o[0, 0]), f"output {i}, row ({n}, {c})"


@pytest.mark.skipif("cpu" not in BACKENDS, reason="the cpu backend is not built")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_cpu_forward_of_short_maps_is_each_rows_own_and_the_formula(dtype):
    """NCS rows of under 64 values (1x1 to 7x7 maps) run, without dropout, in blocks of
    channels, each image's values of a block one span over per-element copies of the channel
    values (spread_forward): every row's output is bitwise what the op gives for that row
    alone, for each activation, with and without a residual, at channel counts that leave a
    partial last block and image counts that make several tasks a block; and y is the formula
    evaluated in float64, within a rounding of the output dtype plus the activations'
    polynomial error (2e-7 of erf, scaled by |z|: the float32 row)."""
    ops = torch.ops.fusedreg
    seed = torch.zeros(1, dtype=torch.long)
    tol = {torch.float32: 2e-6, torch.bfloat16: 2 ** -8, torch.float16: 2 ** -10}[dtype]
    for (N, C, S) in [(2, 37, 9), (3, 5, 4), (2, 1152, 9), (2, 19, 15), (1, 7, 2), (40, 70, 49), (3, 33, 25),
                      (300, 3, 7), (2, 9, 63)]:
        x, r = _data((N, C, S), dtype), _data((N, C, S), dtype, seed=2, offset=-0.5)
        w, b, mean, _ = _params(C, dtype)
        invstd = _data((C,), torch.float32, 8, offset=1.0, std=0.2).abs() + 0.1
        for act in range(5):
            for res in (None, r):
                whole = ops.batch_norm_fwd(x, res, w, b, mean, invstd, act, 0.0, seed, False)
                z = ((x.double() - mean.double()[:, None]) * (invstd * w.float()).double()[:, None]
                     + b.double()[:, None] + (0.0 if res is None else res.double()))
                want = {0: lambda t: t, 1: torch.relu, 2: TF.gelu, 3: lambda t: TF.gelu(t, approximate="tanh"),
                        4: TF.silu}[act](z)
                torch.testing.assert_close(whole.double(), want, rtol=tol, atol=tol * 4, msg=f"{N, C, S} act {act}")
                for n, c in [(0, 0), (N - 1, C - 1), (N // 2, C // 2), (0, C - 1)]:
                    row = (slice(n, n + 1), slice(c, c + 1))
                    alone = ops.batch_norm_fwd(x[row].contiguous(), None if res is None else res[row].contiguous(),
                                               *(v[c:c + 1].contiguous() for v in (w, b, mean, invstd)), act, 0.0,
                                               seed, False)
                    assert torch.equal(whole[n, c], alone[0, 0]), f"{N, C, S} act {act} row ({n}, {c})"


@pytest.mark.skipif("cpu" not in BACKENDS, reason="the cpu backend is not built")
@pytest.mark.parametrize("act", [0, 1])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cpu_channels_last_forward_rows_are_each_rows_own_result(dtype, act):
    """The CPU channels-last forward without dropout over many rows (chunks of rows over the
    threads): every row's output is bitwise what the op gives for that row alone (a (1, 1, C)
    tensor), with and without a residual, at an odd channel count."""
    L, C = 23, 37
    ops = torch.ops.fusedreg
    x, r = _data((1, L, C), dtype), _data((1, L, C), dtype, seed=2, offset=-0.5)
    w, b, mean, _ = _params(C, dtype)
    invstd = _data((C,), torch.float32, 8, offset=1.0, std=0.2).abs() + 0.1
    seed = torch.zeros(1, dtype=torch.long)
    for res in (None, r):
        whole = ops.batch_norm_fwd(x, res, w, b, mean, invstd, act, 0.0, seed, True)
        for i in range(L):
            alone = ops.batch_norm_fwd(x[:, i:i + 1].contiguous(),
                                       None if res is None else res[:, i:i + 1].contiguous(),
                                       w, b, mean, invstd, act, 0.0, seed, True)
            assert torch.equal(whole[0, i], alone[0, 0]), f"row {i}"


@pytest.mark.skipif("cpu" not in BACKENDS, reason="the cpu backend is not built")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cpu_plain_forward_rows_are_each_rows_own_result(dtype):
    """The CPU plain forward (no residual, activation or dropout: eval's one pass) over many
    rows: every row's output is bitwise what the op gives for that row alone, NCS rows whose
    steps cross row boundaries (S = 17, 33, 49, 196: not a multiple of the 16 / 32 elements a
    step) and channels-last rows of 16 to 96 channels and an odd count."""
    ops = torch.ops.fusedreg
    seed = torch.zeros(1, dtype=torch.long)
    for shape, cl in [((3, 5, 17), False), ((3, 5, 33), False), ((2, 7, 49), False),
                      ((2, 3, 196), False), ((1, 23, 16), True), ((1, 23, 48), True),
                      ((1, 23, 64), True), ((1, 23, 96), True), ((1, 23, 37), True)]:
        x = _data(shape, dtype)
        C = shape[2] if cl else shape[1]
        w, b, mean, _ = _params(C, dtype)
        invstd = _data((C,), torch.float32, 8, offset=1.0, std=0.2).abs() + 0.1
        whole = ops.batch_norm_fwd(x, None, w, b, mean, invstd, 0, 0.0, seed, cl)
        for i in range(shape[0]):
            for j in range(shape[1]):
                row = x[i:i + 1, j:j + 1].contiguous()
                vec = (lambda v: v) if cl else (lambda v: v[j:j + 1].contiguous())
                alone = ops.batch_norm_fwd(row, None, vec(w), vec(b), vec(mean), vec(invstd), 0, 0.0,
                                           seed, cl)
                assert torch.equal(whole[i, j], alone[0, 0]), f"{shape} {'cl' if cl else 'ncs'} row ({i}, {j})"


def _c10_bf16_bits(y):
    """c10::BFloat16's rounding of float32 y (round to nearest even, any NaN to 0x7FC0), as
    int32 bit patterns."""
    u = y.view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    rounded = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
    return torch.where(torch.isnan(y), torch.full_like(rounded, 0x7FC0), rounded).to(torch.int32)


@pytest.mark.skipif("cpu" not in BACKENDS, reason="the cpu backend is not built")
@pytest.mark.parametrize("cl", [False, True], ids=["ncs", "cl"])
@pytest.mark.parametrize("size", ["small", "large"])
def test_cpu_bfloat16_output_is_c10s_rounding_of_the_float_result(size, cl):
    """The CPU forward's bfloat16 output is c10's rounding of the float32 result of the same
    input (the same z, then round to nearest even), bit for bit, where z is denormal (which
    vcvtne*ps2bf16 would flush to zero), +-inf or NaN (any NaN, a negative one with a payload
    too, becomes 0x7FC0; the instruction keeps sign and payload), and at a size whose
    output, with the input, outgrows the L3 (non-temporal stores)."""
    ops = torch.ops.fusedreg
    seed = torch.zeros(1, dtype=torch.long)
    N, C, S = (3, 64, 200) if size == "small" else (4, 64, 40000)
    x = _data((N, S, C) if cl else (N, C, S), torch.bfloat16)
    bits = x.view(torch.int16)
    bits.view(-1)[::97] = 0x7F80            # +inf
    bits.view(-1)[5::101] = -0x0080         # 0xFF80: -inf
    bits.view(-1)[7::103] = -0x003F         # 0xFFC1: a negative NaN with a payload
    bits.view(-1)[9::107] = 0x7FA0          # a signaling-NaN pattern
    w, b, mean, _ = _params(C, torch.bfloat16)
    invstd = _data((C,), torch.float32, 8, offset=1.0, std=0.2).abs() + 0.1
    # channels [0, 8): z tiny (denormal floats: |x - mean| * 1e-39), channel 8: z = 0 - 0
    w[:8] = 1e-39
    b[:9] = 0.0
    w[8] = 0.0
    y16 = ops.batch_norm_fwd(x, None, w, b, mean, invstd, 0, 0.0, seed, cl)
    y32 = ops.batch_norm_fwd(x.float(), None, w, b, mean, invstd, 0, 0.0, seed, cl)
    assert (y32.view(torch.int32).abs() < 0x00800000).logical_and(y32 != 0).sum() > 100  # denormals
    assert torch.isnan(y32).sum() > 100 and torch.isinf(y32).sum() > 100
    got = y16.view(torch.int16).to(torch.int32) & 0xFFFF
    assert torch.equal(got, _c10_bf16_bits(y32))


def _c10_half_bits(y):
    """c10::Half's rounding of float32 values, as int32 bits: round to nearest even (torch's
    conversion), any NaN sign | 0x7E00."""
    h = y.to(torch.float16).view(torch.int16).to(torch.int32) & 0xFFFF
    sign = (y.view(torch.int32) < 0).to(torch.int32) << 15
    return torch.where(torch.isnan(y), sign | 0x7E00, h)


# The sanitizer build (scripts/sanitize.sh: -O1, libasan preloaded) orders some float32 sums and
# products otherwise than the release build (-O3), where the float16 register loops and the
# float32 loops compute in the same order: the comparisons that are bitwise in the release
# build are made to a rounding's scale there.
_SANITIZER_BUILD = "libasan" in os.environ.get("LD_PRELOAD", "")


def _assert_same_forward(got, want, what):
    """The one-op forward's output and statistics are the two-op path's bit for bit; in the
    sanitizer build (-O1, where GCC contracts some float16 element loops' multiply-adds
    otherwise than the register paths' explicit FMAs), a float16/bfloat16 y to within one
    rounding of its dtype."""
    if _SANITIZER_BUILD and what[-1] == "y" and got.dtype in (torch.float16, torch.bfloat16):
        tol = 2.0 ** -10 if got.dtype == torch.float16 else 2.0 ** -7
        torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=1e-6, equal_nan=True)
        return
    assert torch.equal(got, want), what


def _assert_c10_half_rounding(got, want):
    """got (float16) is c10's rounding of want (float32) bit for bit, but a NaN's sign: the
    float32 op may reach it by another order of operands (gx_from_dz_cl_kernel's). In the
    sanitizer build, to within one float16 rounding."""
    if _SANITIZER_BUILD:
        torch.testing.assert_close(got.float(), want.half().float(), rtol=2.0 ** -10, atol=1e-6,
                                   equal_nan=True)
        return
    g = got.view(torch.int16).to(torch.int32) & 0xFFFF
    nan = torch.isnan(want)
    assert torch.equal(g[~nan], _c10_half_bits(want)[~nan])
    assert torch.all((g[nan] & 0x7FFF) == 0x7E00)


def _half_specials(t, k):
    """t (float16) with +-inf, NaN, 60000, a subnormal and -0 at a few places (k shifts them)."""
    f = t.view(-1)
    n = f.numel()
    for i, v in enumerate((float("inf"), float("nan"), 60000.0, 6e-8, -float("inf"), -0.0, -1e-6)):
        f[((n * (i + 1)) // 9 + k) % n] = v
    return t


def _bf16_specials(t, k):
    """t (bfloat16) with +-inf, NaN, 3e38, a subnormal, -0 and a negative NaN with a payload at
    a few places (k shifts them)."""
    bits = t.view(torch.int16).view(-1)
    n = bits.numel()
    for i, v in enumerate((0x7F80, -0x0080, 0x7FC0, 0x7F61, 0x0001, -0x8000, -0x003F)):
        bits[((n * (i + 1)) // 9 + k) % n] = v  # inf, -inf, NaN, 3e38, 9e-41, -0, 0xFFC1
    return t


def _half_case(N, A, B, cl, dtype, si):
    """The inputs of the 16-bit element-op tests for an (N, A, B) tensor ((N, C, S), or (N, S, C)
    channels-last): C, x and dy with dtype's special values (k = si, si + 1), a residual, the
    float32 weight, bias and mean, and invstd."""
    C = B if cl else A
    specials = _half_specials if dtype == torch.float16 else _bf16_specials
    x = specials(_data((N, A, B), dtype, seed=si), si)
    dy = specials(_data((N, A, B), dtype, seed=si + 50, offset=0.0), si + 1)
    res = _data((N, A, B), dtype, seed=si + 90, offset=-0.5)
    w, b, mean, _ = _params(C, dtype)
    invstd = _data((C,), torch.float32, 8, offset=1.0, std=0.2).abs() + 0.1
    return C, x, dy, res, w, b, mean, invstd


@pytest.mark.skipif("cpu" not in BACKENDS, reason="the cpu backend is not built")
@pytest.mark.parametrize("cl", [False, True], ids=["ncs", "cl"])
def test_cpu_float16_ops_are_the_float32_ops_on_its_values(cl):
    """The CPU ops on float16 storage convert it in registers (AVX-512) or stage blocks of it as
    float32 copies and run the float32 loops on them (csrc/cpu/batch_norm.cpp, "float16
    staging"), either way with the float32 loops' operations, so each op gives what the
    float32 op gives on x.float() (dy.float(), residual.float()): the same sums bit for bit,
    float16 outputs c10's rounding of the float32 ones (NaN: sign | 0x7E00). Awkward shapes
    (rows of 1, 3, 4, 49, 196 values; rows over a lane chunk; channels-last rows of 3, 17, 64
    and 300 channels, past a staging block), inf, NaN, 60000 and subnormals, with and without
    residual, each activation, dropout and weight; the statistics wherever the two dtypes take the
    same passes (channels-last always; NCS while a float32 channel is at most 64 KB or a
    float16 one over it)."""
    ops = torch.ops.fusedreg
    seed = torch.tensor(77, dtype=torch.int64)
    nt = torch.get_num_threads()
    # bit for bit in the release build; in the sanitizer build (_SANITIZER_BUILD, -O1) the
    # float32 loops order some sums otherwise: a reordered float32 sum of n terms moves by about
    # sqrt(n) * 6e-8 * their size (measured: 2.4e-7 on sums of order 1, 2.3e-5 on a sum of 8
    # over 15000 products of order 1 with an activation's derivative)
    sums_tol = {"rtol": 1e-5, "atol": 1e-4} if _SANITIZER_BUILD else {"rtol": 0, "atol": 0}
    shapes = ([(3, 3, 17), (2, 17, 64), (2, 5, 300), (4, 4 * nt + 1, 49), (1, 1, 1)] if cl else
              [(2, 3, 1), (3, 5, 3), (4, 17, 4), (2, 19, 49), (5, 7, 196), (3, 4, 5000), (9, 2, 4000),
               (4, 4 * nt + 1, 49)])
    for si, (N, A, B) in enumerate(shapes):
        C, x, dy, res, w, b, mean, invstd = _half_case(N, A, B, cl, torch.float16, si)
        x32, dy32, res32 = x.float(), dy.float(), res.float()
        stats16, stats32 = ops.batch_norm_stats(x, cl), ops.batch_norm_stats(x32, cl)
        if cl or N * B * 4 <= 65536 or N * B * 2 > 65536:
            for got, want in zip(stats16, stats32):
                torch.testing.assert_close(got, want, equal_nan=True, **sums_tol)
        for act, r, p, wb in ((0, None, 0.0, True), (0, None, 0.0, False), (1, res, 0.0, True),
                              (1, None, 0.0, False), (3, None, 0.0, True), (4, res, 0.0, False),
                              (2, res, 0.0, True), (0, res, 0.0, True), (0, None, 0.25, True),
                              (2, res, 0.25, True)):
            r32 = None if r is None else res32
            ww, bb = (w, b) if wb else (None, None)
            y16 = ops.batch_norm_fwd(x, r, ww, bb, mean, invstd, act, p, seed, cl)
            y32 = ops.batch_norm_fwd(x32, r32, ww, bb, mean, invstd, act, p, seed, cl)
            _assert_c10_half_rounding(y16, y32)
            s16 = ops.batch_norm_bwd_reduce(dy, x, r, ww, bb, mean, invstd, act, p, seed, cl)
            s32 = ops.batch_norm_bwd_reduce(dy32, x32, r32, ww, bb, mean, invstd, act, p, seed, cl)
            for got, want in zip(s16, s32):
                torch.testing.assert_close(got, want, equal_nan=True, **sums_tol)
            for training, need_gx, need_gr in ((True, True, r is not None), (False, True, False),
                                               (True, False, True)):
                g16 = ops.batch_norm_bwd_elemt(dy, x, r, ww, bb, mean, invstd, *s32, float(N * A * B // C),
                                               act, p, seed, cl, training, need_gx, need_gr)
                g32 = ops.batch_norm_bwd_elemt(dy32, x32, r32, ww, bb, mean, invstd, *s32, float(N * A * B // C),
                                               act, p, seed, cl, training, need_gx, need_gr)
                for got, want in zip(g16, g32):
                    assert got.numel() == want.numel()
                    if got.numel():
                        _assert_c10_half_rounding(got, want)
            if p == 0.0:
                one_op = ops.batch_norm_bwd_cl if cl else ops.batch_norm_bwd_ncs
                o16 = one_op(dy, x, r, ww, bb, mean, invstd, act, seed, True, r is not None)
                o32 = one_op(dy32, x32, r32, ww, bb, mean, invstd, act, seed, True, r is not None)
                for got, want in zip(o16[:2], o32[:2]):
                    torch.testing.assert_close(got, want, equal_nan=True, **sums_tol)
                for got, want in zip(o16[2:], o32[2:]):
                    if got.numel():
                        _assert_c10_half_rounding(got, want)


def _assert_c10_bf16_rounding(got, want):
    """got (bfloat16) is c10's rounding of want (float32) bit for bit (NaN: 0x7FC0). In the
    sanitizer build (-O1, other contractions in the compiled loops), to within one bfloat16
    rounding."""
    if _SANITIZER_BUILD:
        torch.testing.assert_close(got.float(), want.bfloat16().float(), rtol=2.0 ** -7, atol=1e-6,
                                   equal_nan=True)
        return
    assert torch.equal(got.view(torch.int16).to(torch.int32) & 0xFFFF, _c10_bf16_bits(want))


@pytest.mark.skipif("cpu" not in BACKENDS, reason="the cpu backend is not built")
@pytest.mark.parametrize("cl", [False, True], ids=["ncs", "cl"])
def test_cpu_bfloat16_element_ops_are_the_float32_ops_rounded(cl):
    """The CPU element-wise ops on bfloat16 storage (the forward with each activation,
    residual and weight; the backward's grad_x and grad_residual, training and eval) give c10's
    rounding of what the float32 ops give on the widened values, bit for bit: the compiled
    loops' integer rounding and the NCS register passes' vcvtne2ps2bf16 (csrc/cpu/
    batch_norm.cpp, "bfloat16 NCS element-wise passes in registers", which falls back to the
    integer rounding for a step holding a NaN or a denormal) alike. NCS rows of 17 values (the
    compiled flat run), 32, 33, 47, 196 (steps across row boundaries, the chunk's masked last
    step) and 5000; channels-last rows; inf, NaN, 3e38, subnormal inputs and z that rounds to a
    bfloat16 subnormal."""
    ops = torch.ops.fusedreg
    seed = torch.tensor(77, dtype=torch.int64)
    shapes = ([(3, 3, 17), (2, 17, 64), (5, 40, 33)] if cl else
              [(4, 5, 17), (3, 4, 32), (5, 3, 33), (2, 19, 47), (5, 7, 196), (3, 4, 5000)])
    for si, (N, A, B) in enumerate(shapes):
        C, x, dy, res, w, b, mean, invstd = _half_case(N, A, B, cl, torch.bfloat16, si)
        w[0], b[0] = 1e-39, 0.0  # channel 0: z and grad_x below the float32 normal range
        x32, dy32, res32 = x.float(), dy.float(), res.float()
        s1 = _data((C,), torch.float32, 11, offset=0.5)
        s2 = _data((C,), torch.float32, 12, offset=-0.5)
        for act, r, wb in ((0, None, True), (0, res, True), (1, res, True), (1, None, False), (2, res, True),
                           (3, None, True), (4, res, False)):
            r32 = None if r is None else res32
            ww, bb = (w, b) if wb else (None, None)
            y16 = ops.batch_norm_fwd(x, r, ww, bb, mean, invstd, act, 0.0, seed, cl)
            y32 = ops.batch_norm_fwd(x32, r32, ww, bb, mean, invstd, act, 0.0, seed, cl)
            _assert_c10_bf16_rounding(y16, y32)
            if act == 0 and wb and r is None:  # steps the BF16 instruction leaves to the integer rounding
                assert ((y32.view(torch.int32).abs() < 0x00800000) & (y32 != 0)).sum() >= (1 if cl else N * B // 2)
                assert torch.isnan(y32).any()
            for training, need_gx, need_gr in ((True, True, True), (True, True, False), (False, True, True),
                                               (False, True, False), (True, False, True)):
                g16 = ops.batch_norm_bwd_elemt(dy, x, r, ww, bb, mean, invstd, s1, s2, float(N * A * B // C),
                                               act, 0.0, seed, cl, training, need_gx, need_gr)
                g32 = ops.batch_norm_bwd_elemt(dy32, x32, r32, ww, bb, mean, invstd, s1, s2, float(N * A * B // C),
                                               act, 0.0, seed, cl, training, need_gx, need_gr)
                for got, want in zip(g16, g32):
                    assert got.numel() == want.numel()
                    if got.numel():
                        _assert_c10_bf16_rounding(got, want)


@pytest.mark.skipif("cpu" not in BACKENDS, reason="the cpu backend is not built")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64], ids=str)
def test_cpu_channel_ops_are_the_four_ops_bitwise(dtype):
    """The cpu backend's one-op training passes on (N, C, S) storage without dropout
    (batch_norm_fwd_ncs, batch_norm_bwd_ncs: a channel's passes back to back while it is in
    cache; with under four channels a thread, and for 16-bit inputs but the bfloat16 backward
    of rows of 32 values and more, the two passes) give
    bitwise what the four ops give: stats, rsqrt(var + eps) and fwd; bwd_reduce
    and bwd_elemt. Short rows (a 14x14 map; rows starting anywhere in a step, shorter than a
    step), odd rows, a channel over 64 KB (statistics row by row), with and without residual /
    weight / bias, for each activation; and opcheck."""
    ops = torch.ops.fusedreg
    seed = torch.zeros(1, dtype=torch.long)
    ct = torch.float64 if dtype == torch.float64 else torch.float32
    for (N, C, S), act, with_r, affine in [((3, 5, 196), 1, True, True), ((4, 3, 17), 2, False, True),
                                           ((2, 3, 9), 0, False, False), ((2, 2, 10000), 4, True, True),
                                           ((3, 4, 33), 0, True, True),
                                           # enough channels for the per-channel loops at any
                                           # thread count (fewer run the two passes)
                                           ((2, 4 * torch.get_num_threads() + 1, 20), 1, True, True),
                                           # ... with rows of whole 32-value steps and more (the
                                           # bfloat16 backward per channel, its rows in registers)
                                           ((2, 4 * torch.get_num_threads() + 1, 196), 1, True, True),
                                           ((3, 4 * torch.get_num_threads() + 1, 40), 0, True, False),
                                           ((2, 4 * torch.get_num_threads() + 1, 64), 4, False, True),
                                           # rows shorter than a step (first and last partial
                                           # steps in one, the tensor's end)
                                           ((3, 4 * torch.get_num_threads() + 1, 7), 1, True, True)]:
        x, r, dy = (_data((N, C, S), dtype, seed=k, offset=o) for k, o in ((0, 3.0), (2, -0.5), (7, 0.0)))
        r = r if with_r else None
        w, b = (_data((C,), ct, 3, 1.0, 0.5), _data((C,), ct, 4, 0.5, 0.5)) if affine else (None, None)
        eps = 1e-5
        y, mean, var, invstd = ops.batch_norm_fwd_ncs(x, r, w, b, eps, act)
        m2, v2 = ops.batch_norm_stats(x, False)
        inv2 = torch.rsqrt(v2 + eps)
        y2 = ops.batch_norm_fwd(x, r, w, b, m2, inv2, act, 0.0, seed, False)
        for got, want, name in ((y, y2, "y"), (mean, m2, "mean"), (var, v2, "var"), (invstd, inv2, "invstd")):
            _assert_same_forward(got, want, (name,))
        _assert_one_op_backward_is_two_ops(ops.batch_norm_bwd_ncs, False, dy, x, r, w, b, mean, invstd, act,
                                           seed, N * S)
    x, r, dy = _data((2, 3, 20), dtype), _data((2, 3, 20), dtype, 2), _data((2, 3, 20), dtype, 7, 0.0)
    w, b = _data((3,), ct, 3), _data((3,), ct, 4)
    opcheck(ops.batch_norm_fwd_ncs.default, (x, r, w, b, 1e-5, 1))
    mean, invstd = _data((3,), ct, 5), _data((3,), ct, 6, 1.0, 0.1)
    opcheck(ops.batch_norm_bwd_ncs.default, (dy, x, r, w, b, mean, invstd, 1, seed, True, True))


@pytest.mark.skipif("cpu" not in BACKENDS, reason="the cpu backend is not built")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64], ids=str)
def test_cpu_small_channels(dtype):
    """NCS channels whose rows fit in half the statistics' lanes (S <= 32 for float
    statistics, 16 for double) are taken several adjacent channels at a time: the one-op
    forward gives bitwise what stats, rsqrt(var + eps) and fwd give; each channel's statistics
    and output are bitwise those of that channel alone (a (N, 1, S) tensor: another grouping),
    so a group's lanes never mix channels; and the result is within the error rule of torch's
    float64 composite. Awkward spatial sizes (1, 3, 4, 5, 9, the largest grouped one and the
    next), a channel count that leaves a partial last group, channels that fold their lanes
    several times (over 4096 values), a channel whose values are all equal, and mean 1e3 with
    std 1e-2."""
    ops = torch.ops.fusedreg
    seed = torch.zeros(1, dtype=torch.long)
    ct = torch.float64 if dtype == torch.float64 else torch.float32
    lanes = 256 // (8 if dtype == torch.float64 else 4)
    T = torch.get_num_threads()
    cases = [((8, 4 * T * 16 + 3, 4), 0, False, True, 3.0, 2.0), ((3, 8 * T + 5, 1), 1, True, True, 3.0, 2.0),
             ((5, 4 * T + 1, 3), 2, True, False, 3.0, 2.0), ((2, 37, 5), 1, False, True, 1e3, 1e-2),
             ((4, 21, 9), 4, True, True, -2.0, 2.0), ((2, 4 * T + 3, lanes // 2), 0, True, True, 3.0, 2.0),
             ((3, 4 * T + 3, lanes // 2 + 1), 1, False, True, 3.0, 2.0),
             ((1100, 4 * T + 2, 5), 1, True, True, 3.0, 2.0), ((3, 3, 4), 0, False, True, 3.0, 2.0)]
    for (N, C, S), act, with_r, affine, offset, std in cases:
        x0 = _data((N, C, S), dtype, seed=0, offset=offset, std=std)
        x = x0.clone()
        x[:, C // 2] = x[0, C // 2, 0]  # a channel of equal values: var 0
        r = _data((N, C, S), dtype, seed=2, offset=-0.5) if with_r else None
        dy = _data((N, C, S), dtype, seed=7, offset=0.0)
        w, b = (_data((C,), ct, 3, 1.0, 0.5), _data((C,), ct, 4, 0.5, 0.5)) if affine else (None, None)
        y, mean, var, invstd = ops.batch_norm_fwd_ncs(x, r, w, b, 1e-5, act)
        m2, v2 = ops.batch_norm_stats(x, False)
        inv2 = torch.rsqrt(v2 + 1e-5)
        y2 = ops.batch_norm_fwd(x, r, w, b, m2, inv2, act, 0.0, seed, False)
        for got, want, name in ((y, y2, "y"), (mean, m2, "mean"), (var, v2, "var"), (invstd, inv2, "invstd")):
            _assert_same_forward(got, want, (N, C, S, name))
        assert var[C // 2] == 0
        # channel c alone, followed by zero channels up to a step of lanes: a row's sums take
        # the masked tail where a whole step is readable from the row's start, else the scalar
        # remainder (which may differ in the last bit, FMA), so the rows of the channels near
        # the tensor's end (c > C - lanes / S) are left out
        pad = -(-lanes // S)
        for c in {0, C // 2, C - 2, C - 1}:
            if (C - c) * S < lanes:
                continue
            one = lambda t: torch.cat([t[:, c:c + 1], t.new_zeros(N, pad, S)], 1) if t is not None else None  # noqa: E731
            part = lambda t, v: torch.cat([t[c:c + 1], t.new_full((pad,), v)]) if t is not None else None  # noqa: E731
            alone = ops.batch_norm_fwd_ncs(one(x), one(r), part(w, 1.0), part(b, 0.0), 1e-5, act)
            for got, want, name in zip((y[:, c], mean[c], var[c], invstd[c]), alone, ("y", "mean", "var", "invstd")):
                assert torch.equal(got, want[:, 0] if name == "y" else want[0]), (N, C, S, c, name)
        if dtype != torch.float64 and N * C * S < 200_000:
            # the error rule, through the backend (training, with the running statistics;
            # S == 1 runs as channels-last rows there)
            _, _, rm, rv = _params(C, dtype)
            args = [x0, r, w, b] if with_r else [x0, w, b]
            names = ["x", "residual", "weight", "bias"] if with_r else ["x", "weight", "bias"]
            acts = [None, "relu", "silu", "gelu", "gelu_tanh"]

            def fn(*a, act=acts[act], with_r=with_r):
                x, r, w, b, rm, rv = a if with_r else (a[0], None, *a[1:])
                return F.batch_norm_act(x, rm, rv, w, b, True, 0.1, 1e-5, activation=act, residual=r)

            def twin(*a, act=acts[act], with_r=with_r):
                x, r, w, b, rm, rv = a if with_r else (a[0], None, *a[1:])
                y = TF.batch_norm(x, rm, rv, w, b, True, 0.1, 1e-5)
                return ACTS[act](y + r if r is not None else y)

            with fusedreg.use_backend("cpu"):
                _compare(fn, twin, args, dy, [rm, rv], dtype, names)


def _assert_one_op_backward_is_two_ops(op, channels_last, dy, x, r, w, b, mean, invstd, act, seed, count):
    """A one-op training backward (batch_norm_bwd_ncs / _cl) returns bitwise what
    batch_norm_bwd_reduce followed by batch_norm_bwd_elemt return, for each pair of gradients
    asked for. The exception: batch_norm_bwd_cl's grad_x alone of a float input with silu, gelu
    or gelu_tanh, made from the dz its reduce pass stored (act' evaluated once). There the
    two-op element loop may contract dy * act'(z) - m1 into one FMA, which a stored dz cannot
    be, so grad_x = scale * (dz - m1 - xhat * m2) may differ by a rounding of dz: bounded
    here by 4 ulps of the largest term, scaled."""
    ops = torch.ops.fusedreg
    for need_gx, need_gr in ((True, True), (True, False), (False, True)):
        got = op(dy, x, r, w, b, mean, invstd, act, seed, need_gx, need_gr)
        s1, s2 = ops.batch_norm_bwd_reduce(dy, x, r, w, b, mean, invstd, act, 0.0, seed, channels_last)
        gx, gr = ops.batch_norm_bwd_elemt(dy, x, r, w, b, mean, invstd, s1, s2, float(count), act, 0.0,
                                          seed, channels_last, True, need_gx, need_gr)
        stored_dz = (op is ops.batch_norm_bwd_cl and act in (2, 3, 4) and need_gx and not need_gr
                     and x.dtype in (torch.float32, torch.float64))
        for g, want, name in zip(got, (s1, s2, gx, gr), ("sum_dz", "sum_dzx", "grad_x", "grad_r")):
            assert g.shape == want.shape, (tuple(x.shape), act, name, need_gx, need_gr)
            if stored_dz and name == "grad_x":
                _assert_within_a_dz_rounding(g, want, dy, x, r, w, b, mean, invstd, act, seed, s1, s2, count)
            else:
                assert torch.equal(g, want), (tuple(x.shape), act, name, need_gx, need_gr)


def _assert_within_a_dz_rounding(g, want, dy, x, r, w, b, mean, invstd, act, seed, s1, s2, count):
    """|g - want| <= 4 ulps of |scale| * (|dz| + |m1| + |xhat * m2|), channels last (N, S, C)."""
    ops = torch.ops.fusedreg
    _, dz = ops.batch_norm_bwd_elemt(dy, x, r, w, b, mean, invstd, s1, s2, float(count), act, 0.0, seed,
                                     True, True, False, True)
    scale = invstd * w if w is not None else invstd
    m1, m2 = s1 / count, s2 / count
    xhat = (x.to(mean.dtype) - mean) * invstd
    terms = scale.abs() * (dz.abs() + m1.abs() + (xhat * m2).abs())
    bound = 4 * torch.finfo(x.dtype).eps * terms + torch.finfo(x.dtype).tiny
    assert ((g - want).abs() <= bound).all(), ((g - want).abs().max(), act)
    assert not torch.equal(dz, torch.zeros_like(dz))


@pytest.mark.skipif("cpu" not in BACKENDS, reason="the cpu backend is not built")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_cpu_channels_last_backward_op_is_the_two_ops_bitwise(dtype):
    """batch_norm_bwd_cl (the cpu backend's training backward of (N, S, C) storage without
    dropout; with both gradients of a float input its reduce pass writes grad_residual = dz and
    grad_x is computed from it) gives bitwise what bwd_reduce and bwd_elemt give: row counts
    that are not a multiple of the reduce pass's four-row step, several row blocks, odd channel
    counts, with and without residual / weight / bias, each activation; and opcheck."""
    ops = torch.ops.fusedreg
    seed = torch.zeros(1, dtype=torch.long)
    ct = torch.float64 if dtype == torch.float64 else torch.float32
    for (N, S, C), act, with_r, affine in [((3, 196, 5), 1, True, True), ((4, 17, 3), 2, True, True),
                                           ((2, 9, 3), 0, False, False), ((2, 33, 64), 4, True, True),
                                           ((5, 7, 21), 1, True, True), ((2, 601, 8), 3, True, True),
                                           ((3, 5, 7), 0, True, True)]:
        x, r, dy = (_data((N, S, C), dtype, seed=k, offset=o) for k, o in ((0, 3.0), (2, -0.5), (7, 0.0)))
        r = r if with_r else None
        w, b = (_data((C,), ct, 3, 1.0, 0.5), _data((C,), ct, 4, 0.5, 0.5)) if affine else (None, None)
        mean, var = ops.batch_norm_stats(x, True)
        invstd = torch.rsqrt(var + 1e-5)
        _assert_one_op_backward_is_two_ops(ops.batch_norm_bwd_cl, True, dy, x, r, w, b, mean, invstd, act,
                                           seed, N * S)
    x, r, dy = _data((2, 20, 3), dtype), _data((2, 20, 3), dtype, 2), _data((2, 20, 3), dtype, 7, 0.0)
    w, b = _data((3,), ct, 3), _data((3,), ct, 4)
    mean, invstd = _data((3,), ct, 5), _data((3,), ct, 6, 1.0, 0.1)
    opcheck(ops.batch_norm_bwd_cl.default, (dy, x, r, w, b, mean, invstd, 1, seed, True, True))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["c", "cl"])
def test_backward_is_bitwise_deterministic(backend, layout):
    shape = (4, 6, 9, 11) if backend != "triton" else (2, 6, 5, 7)
    x, r = _layout(_data(shape, torch.float32), layout), _layout(_data(shape, torch.float32, 2), layout)
    dy = _layout(_data(shape, torch.float32, 5, 0.0), layout)
    w, b, rm, rv = _params(6, torch.float32)
    runs = []
    with fusedreg.use_backend(backend):
        for _ in range(2):
            runs.append(_run(lambda x, r, w, b, rm, rv: F.batch_norm_act(
                x, rm, rv, w, b, True, activation="silu", residual=r, p=0.1, seed=9),
                [x, r, w, b], dy, [rm, rv]))
    for a, c in zip([runs[0][0]] + runs[0][1] + runs[0][2], [runs[1][0]] + runs[1][1] + runs[1][2]):
        assert torch.equal(a, c)


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("case", [((3, 4, 5, 6), "c"), ((3, 4, 5, 6), "cl"), ((6, 5), "c"),
                                  ((2, 3, 2, 3, 4), "cl")], ids=_case_id)
def test_in_place_op_after_the_norm_is_an_ordinary_one(backend, case):
    """The autograd Function returns y in x's shape and layout as a tensor of its own, not a
    view of its storage-shaped output: an in-place op after the norm (ResNet's relu_) is then
    an ordinary in-place op on a Function output (no CopySlices, whose backward copies the
    whole gradient), and the gradients are those of torch's norm followed by relu_."""
    shape, layout = case
    C = shape[1]
    x64 = _layout(_data(shape, torch.float64), layout)
    dy = _layout(_data(shape, torch.float64, 5, 0.0), layout)
    w, b = _data((C,), torch.float64, 3), _data((C,), torch.float64, 4)
    got, want = [], []
    for fn, out in ((F.batch_norm, got), (TF.batch_norm, want)):
        xs, ws, bs = (t.clone().requires_grad_() for t in (x64, w, b))
        rm, rv = torch.zeros(C, dtype=torch.float64), torch.ones(C, dtype=torch.float64)
        with fusedreg.use_backend(backend):
            y = fn(xs, rm, rv, ws, bs, True)
            if fn is F.batch_norm:
                assert not y._is_view() and type(y.grad_fn).__name__ != "CopySlices"
                assert y.stride() == x64.stride()
            y.relu_()
            if fn is F.batch_norm:
                assert type(y.grad_fn).__name__ == "ReluBackward0"
            y.backward(dy)
        out += [y.detach(), xs.grad, ws.grad, bs.grad, rm, rv]
    for a, c in zip(got, want):
        torch.testing.assert_close(a, c, rtol=1e-9, atol=1e-9)


@pytest.mark.skipif("triton" not in BACKENDS,
                    reason="the triton backend does not run on CPU tensors here (needs TRITON_INTERPRET=1)")
@pytest.mark.parametrize("layout", ["c", "cl"])
def test_triton_multi_block_reductions_match_reference(layout, monkeypatch):
    """Statistics and backward sums combined from several per-channel blocks (what large
    batches take on a GPU): one sample per block for (N, C, S), 32-row blocks channels-last."""
    from fusedreg.triton import batch_norm as tri

    monkeypatch.setattr(tri, "_MIN_BLOCK_VALUES", 1)
    shape = (5, 3, 4, 5) if layout == "c" else (3, 3, 5, 7)  # 5 blocks; 105 rows: 4 blocks
    assert tri._blocks(5, 20, False)[1] == 5 and tri._blocks(3, 35, True)[1] == 4
    x = _layout(_data(shape, torch.float32, offset=50.0), layout)
    r = _layout(_data(shape, torch.float32, 2), layout)
    dy = _layout(_data(shape, torch.float32, 5, 0.0), layout)
    w, b, rm, rv = _params(3, torch.float32)
    fn = lambda x, r, w, b, rm, rv: F.batch_norm_act(  # noqa: E731
        x, rm, rv, w, b, True, activation="gelu", residual=r)
    results = {}
    for backend in ("reference", "triton"):
        with fusedreg.use_backend(backend):
            results[backend] = _run(fn, [x, r, w, b], dy, [rm, rv])
    flat = lambda o: [o[0]] + o[1] + o[2]  # noqa: E731
    for a, c in zip(flat(results["reference"]), flat(results["triton"])):
        torch.testing.assert_close(c, a, rtol=1e-5, atol=2e-5)


@pytest.mark.parametrize("backend", FAST)
def test_gradcheck_float64(backend):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, 2, 3, dtype=torch.float64, generator=g) + 2
    r = torch.randn(3, 4, 2, 3, dtype=torch.float64, generator=g)
    w = torch.randn(4, dtype=torch.float64, generator=g)
    b = torch.randn(4, dtype=torch.float64, generator=g)
    rm, rv = torch.zeros(4, dtype=torch.float64), torch.ones(4, dtype=torch.float64)
    x, r, w, b = (t.requires_grad_() for t in (x, r, w, b))
    xcl = x.detach().contiguous(memory_format=torch.channels_last).requires_grad_()
    with fusedreg.use_backend(backend):
        for training in (True, False):
            assert torch.autograd.gradcheck(
                lambda x, w, b: F.batch_norm(x, rm.clone(), rv.clone(), w, b, training), (x, w, b))
            assert torch.autograd.gradcheck(
                lambda x, r, w, b: F.batch_norm_act(x, rm.clone(), rv.clone(), w, b, training,
                                                    activation="gelu", residual=r, p=0.2, seed=3),
                (xcl, r, w, b))


@pytest.mark.parametrize("act", ["relu", "silu"])
@pytest.mark.parametrize("layout", ["c", "cl"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_dropped_inf_and_nan_are_zero(backend, layout, act):
    """Dropped means zero: an inf or NaN in the residual or in dy at a dropped position leaves
    no trace (y and grad_residual are 0 there, every other value is what finite ones give),
    not the NaN of inf * 0. (x itself cannot hold one: it reaches every element of its
    channel through the batch statistics.)"""
    p, seed, shape = 0.5, 11, (2, 3, 4, 5)
    keep = _layout(F.dropout_mask(shape, p, seed).reshape(shape), layout)
    specials = torch.tensor([math.inf, -math.inf, math.nan], dtype=torch.float32)
    plant = specials.repeat(math.prod(shape) // 3 + 1)[:math.prod(shape)].reshape(shape)
    x = _layout(_data(shape, torch.float32), layout)
    r = _layout(_data(shape, torch.float32, 2, -1.0), layout)
    dy = _layout(_data(shape, torch.float32, 5, 0.0), layout)
    w, b, rm, rv = _params(3, torch.float32)
    assert (~keep).any() and keep.any()
    bad_r, bad_dy = torch.where(keep, r, plant), torch.where(keep, dy, plant)
    fn = lambda x, r, w, b, rm, rv: F.batch_norm_act(  # noqa: E731
        x, rm, rv, w, b, True, activation=act, residual=r, p=p, seed=seed)
    with fusedreg.use_backend(backend):
        got = _run(fn, [x, bad_r, w, b], bad_dy, [rm, rv])
        clean = _run(fn, [x, r, w, b], dy, [rm, rv])
    y, (gx, gr, gw, gb) = got[0], got[1]
    assert torch.equal(y[~keep], torch.zeros_like(y[~keep])), "a dropped y is not 0"
    assert torch.equal(gr[~keep], torch.zeros_like(gr[~keep])), "a dropped grad_residual is not 0"
    for name, a, c in zip(["y", "grad x", "grad residual", "grad weight", "grad bias"],
                          [y, gx, gr, gw, gb], [clean[0]] + clean[1]):
        assert torch.isfinite(a).all(), f"{name}: a dropped inf/NaN leaked"
        torch.testing.assert_close(a, c, rtol=0, atol=0, msg=f"{name} differs from finite data")


def _gradgrad_inputs(layout):
    g = torch.Generator().manual_seed(1)
    shape = (3, 2, 2, 2)
    x = torch.randn(shape, dtype=torch.float64, generator=g) * 1.5 + 2
    r = torch.randn(shape, dtype=torch.float64, generator=g)
    w = torch.randn(2, dtype=torch.float64, generator=g)
    b = torch.randn(2, dtype=torch.float64, generator=g)
    x, r = _layout(x, layout), _layout(r, layout)
    return [t.requires_grad_() for t in (x, r, w, b)]


@pytest.mark.parametrize("layout", ["c", "cl"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("backend", FAST)
def test_gradgradcheck_float64(backend, training, layout):
    """Higher-order gradients (create_graph=True) of batch_norm and of batch_norm_act with an
    activation, a residual and dropout, against finite differences; and the differentiable
    first-order backward equals the kernels' one."""
    x, r, w, b = _gradgrad_inputs(layout)
    rm = torch.tensor([0.5, -1.0], dtype=torch.float64)
    rv = torch.tensor([2.0, 0.7], dtype=torch.float64)
    plain = lambda x, w, b: F.batch_norm(x, rm.clone(), rv.clone(), w, b, training)  # noqa: E731
    fused = lambda x, r, w, b: F.batch_norm_act(  # noqa: E731
        x, rm.clone(), rv.clone(), w, b, training, activation="silu", residual=r, p=0.3, seed=5)
    with fusedreg.use_backend(backend):
        assert torch.autograd.gradgradcheck(plain, (x, w, b))
        assert torch.autograd.gradgradcheck(fused, (x, r, w, b))
        y = fused(x, r, w, b)
        dy = torch.randn(y.shape, dtype=y.dtype, generator=torch.Generator().manual_seed(2))
        first = torch.autograd.grad(y, (x, r, w, b), dy, retain_graph=True)
        graph = torch.autograd.grad(y, (x, r, w, b), dy, create_graph=True)
    for a, c in zip(graph, first):
        assert a.requires_grad
        torch.testing.assert_close(a, c, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("backend", FAST)
def test_torch_func_grad_matches_autograd(backend):
    """torch.func.grad (eval; training without running stats) gives autograd's gradients."""
    x, r, w, b = (t.detach() for t in _gradgrad_inputs("c"))
    rm = torch.tensor([0.5, -1.0], dtype=torch.float64)
    rv = torch.tensor([2.0, 0.7], dtype=torch.float64)
    with fusedreg.use_backend(backend):
        for training, stats in ((False, (rm, rv)), (True, (None, None))):
            def loss(x, r, w, b):
                y = F.batch_norm_act(x, *stats, w, b, training, activation="gelu", residual=r,
                                     p=0.3, seed=4)
                return (y.sin() * torch.arange(y.numel(), dtype=y.dtype).view(y.shape)).sum()
            got = torch.func.grad(loss, argnums=(0, 1, 2, 3))(x, r, w, b)
            leaves = [t.clone().requires_grad_() for t in (x, r, w, b)]
            want = torch.autograd.grad(loss(*leaves), leaves)
            for a, c in zip(got, want):
                torch.testing.assert_close(a, c, rtol=1e-12, atol=1e-12)


def _op_samples():
    """Argument tuples (stats, fwd, bwd_reduce, bwd_elemt) for the registered ops."""
    seed = torch.tensor(42, dtype=torch.int64)
    out = []
    for shape, cl, act, p, dtype in [((3, 5, 7), False, 0, 0.0, torch.float32),
                                      ((3, 7, 5), True, 1, 0.25, torch.float32),
                                      ((2, 6, 4), False, 4, 0.1, torch.bfloat16)]:
        x = _data(shape, dtype)
        r = _data(shape, dtype, 2)
        C = shape[2] if cl else shape[1]
        w, b = _data((C,), torch.float32, 3), _data((C,), torch.float32, 4)
        mean = _data((C,), torch.float32, 5)
        invstd = _data((C,), torch.float32, 6, 1.0, 0.1)
        dy = _data(shape, dtype, 7, 0.0)
        s1, s2 = _data((C,), torch.float32, 8, 0.0), _data((C,), torch.float32, 9, 0.0)
        out.append(((x, cl), (x, r, w, b, mean, invstd, act, p, seed, cl),
                    (dy, x, r, w, b, mean, invstd, act, p, seed, cl),
                    (dy, x, r, w, b, mean, invstd, s1, s2, 21.0, act, p, seed, cl, True, True, True)))
    return out


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend):
    kernels = backends.implementation(OP, backend)
    for samples in _op_samples():
        for op, args in zip(kernels, samples):
            opcheck(op, args)


@pytest.mark.parametrize("backend", BACKENDS)
def test_compile_fullgraph_matches_eager(backend):
    torch._dynamo.reset()
    x = _layout(_data((4, 3, 5, 6), torch.float32), "cl")
    r = _data((4, 3, 5, 6), torch.float32, 2)
    for make in (lambda: fusedreg.nn.BatchNorm2d(3), lambda: fusedreg.nn.BatchNormAct2d(3, act_layer=torch.nn.SiLU)):
        outs = []
        for compiled in (False, True):
            mod = make()
            with torch.no_grad():
                mod.weight.copy_(_data((3,), torch.float32, 9, 1.0))
            with fusedreg.use_backend(backend):
                m = torch.compile(mod, fullgraph=True) if compiled else mod
                xi = x.clone().requires_grad_()
                args = (xi, r) if isinstance(mod, fusedreg.nn.BatchNormAct2d) else (xi,)
                y = m(*args)
                (y * torch.arange(y.numel()).reshape(y.shape)).sum().backward()
                mod.eval()
                ye = m(*args)
            outs.append([y.detach(), ye.detach(), xi.grad, mod.weight.grad, mod.bias.grad,
                         mod.running_mean, mod.running_var, mod.num_batches_tracked])
        for a, c in zip(*outs):
            torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-5)


def _bad_calls(f=F):
    """(exception, call); the first TORCH_TOO calls are torch.nn.functional.batch_norm's too."""
    x = _data((4, 3, 5), torch.float32)
    rm, rv, w = torch.zeros(3), torch.ones(3), torch.ones(3)
    meta = torch.zeros(3, device="meta")
    return [
        (ValueError, lambda: f.batch_norm(x, torch.zeros(4), torch.ones(4), training=True)),  # channels
        (ValueError, lambda: f.batch_norm(x, rm, rv, torch.ones(4))),
        (ValueError, lambda: f.batch_norm(x, rm, rv, None, torch.ones(2, 3))),
        (ValueError, lambda: f.batch_norm(torch.ones(1, 3), None, None, training=True)),  # 1 value
        (ValueError, lambda: f.batch_norm(torch.ones(1, 3, 1, 1), rm, rv, training=True)),
        (ValueError, lambda: f.batch_norm(torch.ones(3), rm, rv)),                       # 1-D
        (ValueError, lambda: f.batch_norm(x, None, None, training=False)),                # eval, no stats
        (ValueError, lambda: f.batch_norm(x, rm, None, training=True)),
        (TypeError, lambda: f.batch_norm(x, rm.double(), rv.double())),                   # buffer dtype
        (TypeError, lambda: f.batch_norm(x, rm.half(), rv.half())),
        (TypeError, lambda: f.batch_norm(x, rm.long(), rv)),
        (ValueError, lambda: f.batch_norm(x, meta, meta)),                                # buffer device
        (ValueError, lambda: f.batch_norm(x, rm, rv, meta)),
        (TypeError, lambda: f.batch_norm(x.long(), rm, rv)),
        (ValueError, lambda: f.batch_norm(x, rm, rv, training=True, eps=0.0)),
        (TypeError, lambda: f.batch_norm(x, rm, rv, training=True, momentum=None)),
        (TypeError, lambda: f.batch_norm(x, rm, rv, training=1)),
        (ValueError, lambda: F.batch_norm_act(x, rm, rv, w, activation="tanh")),
        (ValueError, lambda: F.batch_norm_act(x, rm, rv, w, training=True, p=1.5)),
        (ValueError, lambda: F.batch_norm_act(x, rm, rv, w, residual=torch.ones(4, 3, 6))),
        (TypeError, lambda: F.batch_norm_act(x, rm, rv, w, residual=x.double())),
        (TypeError, lambda: F.batch_norm_act(x, rm, rv, w, training=True, p=0.1, seed=1.5)),
    ]


@pytest.mark.parametrize("i", range(len(_bad_calls())))
def test_bad_input_raises_before_any_kernel(i):
    """Each bad call raises fusedreg's error before any kernel runs, under auto (where a small
    call may be torch's op, which then must not have written anything either) and with each
    backend named."""
    def no_kernel(*args, **kwargs):
        raise AssertionError("a kernel ran on bad input")

    kernels = type(backends.implementation(OP, "reference"))
    registered = {b: backends.implementation(OP, b) for b in backends.registered_backends(OP)}
    try:
        for backend in registered:
            backends.register(OP, backend, kernels(*([no_kernel] * len(kernels._fields))))
        for backend in ["auto"] + BACKENDS:
            with fusedreg.use_backend(backend):
                if backend != "auto":
                    with pytest.raises(AssertionError, match="a kernel ran"):  # replacement reached
                        F.batch_norm(_data((4, 3, 5), torch.float32), None, None, training=True)
                exc, call = _bad_calls()[i]
                with pytest.raises(exc):
                    call()
    finally:
        for backend, impl in registered.items():
            backends.register(OP, backend, impl)


def test_bad_input_under_auto_writes_nothing():
    """A call that torch's op would serve under auto and that raises leaves the running stats
    as they were (the residual is checked before torch.batch_norm updates them)."""
    x = _data((4, 3, 5), torch.float32)
    rm, rv = torch.zeros(3), torch.ones(3)
    for residual in (x.double(), torch.ones(4, 3, 6), torch.ones(3)):
        with pytest.raises((TypeError, ValueError)):
            F.batch_norm_act(x, rm, rv, training=True, activation="relu", residual=residual)
    with pytest.raises(ValueError):
        F.batch_norm(x, rm, rv, torch.ones(1, 3), training=True)  # torch takes a (1, C) weight
    assert torch.equal(rm, torch.zeros(3)) and torch.equal(rv, torch.ones(3))


TORCH_TOO = 17  # the calls of _bad_calls that use only torch's own arguments


def test_torch_refuses_the_same_inputs():
    """The errors are drop-in, not stricter: torch's batch_norm refuses each of those too."""
    for _, call in _bad_calls(TF)[:TORCH_TOO]:
        with pytest.raises((ValueError, TypeError, RuntimeError, NotImplementedError)):
            call()


def test_empty_batch_matches_torch():
    x = torch.zeros(0, 3, 4, 4)
    rm, rv = torch.zeros(3), torch.ones(3)
    for backend in BACKENDS:
        with fusedreg.use_backend(backend):
            y = F.batch_norm(x, rm, rv, training=True)
        assert y.shape == x.shape
        assert torch.equal(rm, torch.zeros(3)) and torch.equal(rv, torch.ones(3))


# ---- modules -----------------------------------------------------------------------------------

MODULE_ARGS = [dict(), dict(momentum=None), dict(track_running_stats=False), dict(affine=False),
               dict(eps=1e-3, momentum=0.3)]


@pytest.mark.parametrize("kwargs", MODULE_ARGS, ids=lambda k: ",".join(f"{a}={v}" for a, v in k.items()) or "defaults")
@pytest.mark.parametrize("dim", [1, 2, 3])
def test_modules_match_torch(dim, kwargs):
    theirs_cls = {1: torch.nn.BatchNorm1d, 2: torch.nn.BatchNorm2d, 3: torch.nn.BatchNorm3d}[dim]
    ours_cls = {1: fusedreg.nn.BatchNorm1d, 2: fusedreg.nn.BatchNorm2d, 3: fusedreg.nn.BatchNorm3d}[dim]
    theirs, ours = theirs_cls(4, **kwargs), ours_cls(4, **kwargs)
    assert isinstance(ours, theirs_cls)
    assert list(theirs.state_dict()) == list(ours.state_dict())
    if theirs.weight is not None:
        with torch.no_grad():
            theirs.weight.copy_(_data((4,), torch.float32, 3, 1.0, 0.3))
    ours.load_state_dict(theirs.state_dict())
    shape = {1: (5, 4, 3), 2: (3, 4, 3, 2), 3: (2, 4, 2, 3, 2)}[dim]
    for step in range(3):
        x = _data(shape, torch.float32, step)
        torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-5)
    for a, b in zip(theirs.state_dict().values(), ours.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    ours.eval(), theirs.eval()
    x = _data(shape, torch.float32, 9)
    torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError):
        ours(_data((4,) * (dim + 3), torch.float32))  # torch's input-dim check


def test_batch_norm_act2d_matches_timm_order():
    timm_layers = pytest.importorskip("timm.layers")
    for act_layer, drop in ((torch.nn.ReLU, None), (torch.nn.SiLU, None), (torch.nn.GELU, None),
                            (torch.nn.ReLU, lambda: torch.nn.Dropout(0.0)), (torch.nn.Tanh, None)):
        theirs = timm_layers.BatchNormAct2d(5, act_layer=act_layer, drop_layer=drop)
        ours = fusedreg.nn.BatchNormAct2d(5, act_layer=act_layer, drop_layer=drop)
        assert list(theirs.state_dict()) == list(ours.state_dict())
        ours.load_state_dict(theirs.state_dict())
        for train in (True, False):
            theirs.train(train), ours.train(train)
            x = _data((2, 5, 4, 3), torch.float32, 1)
            torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ours.running_var, theirs.running_var)


def test_batch_norm_act2d_residual_and_dropout():
    mod = fusedreg.nn.BatchNormAct2d(3, drop_layer=lambda: torch.nn.Dropout(0.5))
    x, r = _data((2, 3, 4, 4), torch.float32), _data((2, 3, 4, 4), torch.float32, 2)
    torch.manual_seed(0)
    y = mod(x, r)
    zeros = (y == 0).float().mean().item()
    assert 0.5 < zeros < 0.95  # relu zeros plus about half dropped
    mod.eval()
    torch.testing.assert_close(mod(x, r), torch.relu(TF.batch_norm(
        x, mod.running_mean, mod.running_var, mod.weight, mod.bias, False) + r))


def test_patch_targets_cover_torch_and_timm_classes():
    targets = fusedreg.nn.batchnorm_patch_targets()
    for cls in (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d, torch.nn.BatchNorm3d, torch.nn.SyncBatchNorm):
        assert issubclass(targets[cls], cls)
    timm_layers = pytest.importorskip("timm.layers")
    assert targets[timm_layers.BatchNormAct2d] is fusedreg.nn.BatchNormAct2d


def test_convert_sync_batchnorm_keeps_parameters():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.BatchNorm2d(4),
                                torch.nn.Sequential(fusedreg.nn.BatchNorm1d(2)))
    w = model[1].weight
    conv = fusedreg.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    assert isinstance(conv[1], fusedreg.nn.SyncBatchNorm) and conv[1].weight is w
    assert isinstance(conv[2][0], fusedreg.nn.SyncBatchNorm)
    # without a process group it is BatchNorm
    x = _data((2, 3, 4, 4), torch.float32)
    ref = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.BatchNorm2d(4))
    ref.load_state_dict({k: v for k, v in model.state_dict().items() if k.startswith(("0.", "1."))})
    torch.testing.assert_close(conv[:2](x), ref(x), rtol=1e-5, atol=1e-5)


# ---- CUDA tensors ---------------------------------------------------------------------------------

@pytest.mark.parametrize("backend,device,dtype,case", device_cases(
    OP, [], [(d, c) for d in DTYPES for c in [((32, 64, 28, 28), "c"), ((32, 64, 28, 28), "cl"),
                                              ((64, 96), "c"), ((5, 7, 3, 2, 9), "cl")]]))
def test_gpu_backends_match_reference(backend, device, dtype, case):
    """CUDA tensors (run where a GPU is present): against the reference backend on the same
    device, and a bitwise-deterministic backward."""
    serving(OP, backend, device)
    shape, layout = case
    dev = torch.device(device)
    x = _layout(_data(shape, dtype), layout).to(dev)
    r = _layout(_data(shape, dtype, 2), layout).to(dev)
    dy = _layout(_data(shape, dtype, 5, 0.0), layout).to(dev)
    w, b, rm, rv = (t.to(dev) for t in _params(shape[1], dtype))
    fn = lambda x, r, w, b, rm, rv: F.batch_norm_act(  # noqa: E731
        x, rm, rv, w, b, True, activation="relu", residual=r, p=0.1, seed=5)
    with fusedreg.use_backend(backend):
        out = _run(fn, [x, r, w, b], dy, [rm, rv])
        out2 = _run(fn, [x, r, w, b], dy, [rm, rv])
    with fusedreg.use_backend("reference"):
        ref = _run(fn, [x, r, w, b], dy, [rm, rv])
    flat = lambda o: [o[0]] + o[1] + o[2]  # noqa: E731
    for a, c in zip(flat(out), flat(ref)):
        torch.testing.assert_close(a.float(), c.float(), **BATCH_NORM_GPU[dtype])
    for a, c in zip(flat(out), flat(out2)):
        assert torch.equal(a, c)


# ---- auto: small calls with nothing to fuse are torch's ops ----------------------------------

def test_auto_small_calls_are_torch_and_large_ones_fused(monkeypatch):
    """Under auto a call below backends.AUTO_TORCH_BELOW (plain, or with a residual and/or an
    activation, no dropout) is torch's op and computes what torch computes (y, running stats,
    grads); one at or above the limit, one with dropout, and any call under a backend named
    explicitly reach fusedreg's kernels."""
    ran = []
    real = backends.implementation(OP, "cpu")

    def spy(name):
        def call(*args, **kwargs):
            ran.append(name)
            return getattr(real, name)(*args, **kwargs)
        return call
    monkeypatch.setitem(backends._REGISTRY, (OP, "cpu"), type(real)(*map(spy, real._fields)))
    backends._RESOLVED.clear()
    acts = ("act", "silu", "gelu", "gelu_tanh")
    limits = {t: (200, 100) for t in ("batch_norm", "batch_norm_eval")
              + tuple(f"batch_norm_{a}{e}" for a in acts for e in ("", "_eval"))}
    monkeypatch.setattr(backends, "AUTO_TORCH_BELOW",
                        {**backends.AUTO_TORCH_BELOW, **{k: {"cpu": v} for k, v in limits.items()}})
    w, b = _data((3,), torch.float32, 3, 1.0, 0.3), _data((3,), torch.float32, 4)

    def both(shape, training, grad, act=None, res=False, p=0.0, backend="auto"):
        x = _data(shape, torch.float32)
        r = _data(shape, torch.float32, 2) if res else None
        outs = []
        for fn in ("fusedreg", "torch"):
            rm, rv = torch.zeros(3), torch.ones(3)
            xi = x.clone().requires_grad_(grad)
            ran.clear()
            with fusedreg.use_backend(backend):
                if fn == "fusedreg":
                    y = F.batch_norm_act(xi, rm, rv, w, b, training, activation=act, residual=r,
                                         p=p, seed=3 if p else None)
                    fused = bool(ran)
                else:
                    y = TF.batch_norm(xi, rm, rv, w, b, training)
                    y = y + r if res else y
                    y = {None: lambda t: t, "relu": torch.relu, "silu": TF.silu, "gelu": TF.gelu,
                         "gelu_tanh": lambda t: TF.gelu(t, approximate="tanh")}[act](y)
            if grad:
                (y * torch.arange(y.numel()).view(y.shape)).sum().backward()
            outs.append((y.detach(), rm, rv, xi.grad))
        if p == 0.0:
            # silu / gelu: fusedreg's float32 exp and erf polynomials (within 2e-7 of erf) and
            # torch's differ by a few ulps of act', which the gradient's weights (up to 239)
            # scale
            tol = 1e-5 if act in (None, "relu") else 1e-4
            for a, c in zip(*outs):
                if c is not None:
                    torch.testing.assert_close(a, c, rtol=tol, atol=tol)
        return fused

    for training in (True, False):
        for act, res in ((None, False), ("relu", True), ("relu", False), (None, True),
                         ("silu", False), ("gelu", True), ("gelu_tanh", False)):
            assert not both((4, 3, 2, 2), training, False, act, res)     # 48 < 100 <= 200
            assert not both((4, 3, 3, 3), training, False, act, res)     # 108 < 200
            # 108 >= 100 with grad (silu / gelu / gelu_tanh: short NCS rows, torch's; below)
            assert both((4, 3, 3, 3), training, True, act, res) == (act in (None, "relu"))
            assert both((4, 3, 5, 4), training, False, act, res)         # 240 >= 200
            assert both((4, 3, 2, 2), training, False, act, res, backend="cpu")
    assert both((4, 3, 2, 2), True, False, "relu", True, p=0.2)          # dropout: fused
    # without the C++ call (an install without the extension) the Python form takes the same
    # route and computes the same
    with monkeypatch.context() as m:
        m.setattr(F, "_torch_batch_norm", None)
        for act in ("relu", "silu", "gelu", "gelu_tanh"):
            assert not both((4, 3, 2, 2), True, True, act, True)
            assert not both((4, 3, 2, 2), False, False, act, False)
    # silu / gelu / gelu_tanh with grad on short NCS rows (under 64 values): torch's at any
    # size; channels-last, without grad or with relu: the limits as above
    assert not both((4, 3, 5, 4), True, True, "silu", False)             # 240, S = 20
    assert not both((4, 3, 5, 4), False, True, "gelu", False)
    assert both((4, 3, 5, 4), True, False, "silu", False)                # no grad: 240 >= 200
    assert both((4, 3, 5, 4), True, True, "relu", False)
    assert both((4, 3, 9, 8), True, True, "silu", False)                 # S = 72
    # an activation's own limits: gelu's is not relu's
    monkeypatch.setitem(backends.AUTO_TORCH_BELOW, "batch_norm_gelu", {"cpu": (0, 0)})
    assert both((4, 3, 2, 2), True, False, "gelu", False)
    assert not both((4, 3, 2, 2), True, False, "relu", False)
    # a module takes the same route: BatchNormAct2d(relu) with a residual, then plain
    for mod, args in ((fusedreg.nn.BatchNormAct2d(3), 2), (fusedreg.nn.BatchNorm2d(3), 1)):
        x, r = _data((4, 3, 2, 2), torch.float32), _data((4, 3, 2, 2), torch.float32, 2)
        ran.clear()
        with torch.no_grad():
            mod(*(x, r)[:args])
        assert not ran
        ran.clear()
        with torch.no_grad():
            mod(*(_data((4, 3, 5, 4), torch.float32), _data((4, 3, 5, 4), torch.float32))[:args])
        assert ran


@pytest.mark.skipif("cpu" not in BACKENDS, reason="the cpu backend is not built")
def test_cpu_eval_without_grad_is_the_function_path_bitwise(monkeypatch):
    """A plain eval call that records no backward goes straight to the cpu kernel
    (functional._cpu_eval_batch_norm, for the functional and the modules; one that records a
    backward to the C++ node in eval): the same values as the autograd Function's forward, for NCHW, channels_last, 2-D and 3-D input, float32 and
    bfloat16 (fp32 stats), with and without weight / bias; calls it does not take (a bfloat16
    running stat, momentum None, eps 0) keep the full path's checks and results."""
    cases = [((3, 5, 4, 6), "c", torch.float32), ((3, 5, 4, 6), "cl", torch.float32), ((6, 7), "c", torch.float32),
             ((2, 4, 9), "c", torch.bfloat16), ((3, 5, 4, 6), "cl", torch.bfloat16)]
    for shape, layout, dtype in cases:
        C = shape[1]
        x = _layout(_data(shape, dtype), layout) if len(shape) == 4 else _data(shape, dtype)
        w, b, rm, rv = _params(C, dtype)
        for affine in (True, False):
            ww, bb = (w, b) if affine else (None, None)
            with fusedreg.use_backend("cpu"):
                with torch.no_grad():
                    got = F.batch_norm(x, rm, rv, ww, bb, False)
                    assert F._cpu_eval_batch_norm(x, rm, rv, ww, bb, False, 0.1, 1e-5) is not None
                # with a backward to record: the C++ node in eval, the Function's values
                via_node = F._cpu_eval_batch_norm(x.detach().requires_grad_(), rm, rv, ww, bb, False,
                                                  0.1, 1e-5)
                assert via_node is not None and via_node.grad_fn is not None
                with monkeypatch.context() as mp:
                    mp.setattr(F, "_BN_EVAL", None)
                    want = F.batch_norm(x.detach().requires_grad_(), rm, rv, ww, bb, False)
                assert type(want.grad_fn).__name__ == "BatchNormFunctionBackward"
                assert torch.equal(via_node.detach(), want.detach())
            assert got.dtype == want.dtype and got.stride() == want.stride(), (shape, layout, dtype)
            assert torch.equal(got, want.detach()), (shape, layout, dtype, affine)
            torch.testing.assert_close(got.double(), torch.nn.functional.batch_norm(
                x.double(), rm.double(), rv.double(), None if ww is None else ww.double(),
                None if bb is None else bb.double(), False).to(dtype).double(),
                **({"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 1.6e-2, "atol": 1e-2}))
    m = fusedreg.nn.BatchNorm2d(5).eval()
    m.running_mean.copy_(_data((5,), torch.float32, 5))
    x = _data((2, 5, 3, 3), torch.float32)
    with fusedreg.use_backend("cpu"), torch.no_grad():
        ref = torch.nn.BatchNorm2d(5).eval()
        ref.load_state_dict(m.state_dict())
        torch.testing.assert_close(m(x), ref(x), rtol=1e-5, atol=1e-5)
        with pytest.raises(TypeError, match="momentum"):
            F.batch_norm(x, m.running_mean, m.running_var, None, None, False, momentum=None)
        with pytest.raises(ValueError):
            F.batch_norm(x, m.running_mean[:4], m.running_var, None, None, False)


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("shape,layout", [((3, 21, 1), "c"), ((3, 21, 1, 1), "c"),
                                          ((4, 6, 5, 3), "cl"), ((64, 8, 40, 40), "cl"),
                                          ((4, 6, 5, 3), "c"), ((8, 5, 14, 14), "c")])
def test_constant_channel_normalizes_to_the_bias(backend, shape, layout):
    """Training with a channel whose values are all equal (a value that is not a power of
    two): its mean is that value exactly, so x - mean is 0 and y is exactly the bias (plus
    the residual) for every layout, including channels-last inputs of many row blocks, where
    the blocks' means are combined (a mean an ulp off would give (x - mean) / sqrt(eps),
    about 1e-4 here: torch's float32 result is within 1.3e-5 of exact)."""
    x = _data(shape, torch.float32)
    x[:, 1] = 1.1
    if layout == "cl":
        x = x.contiguous(memory_format=torch.channels_last)
    C = shape[1]
    w, b = _data((C,), torch.float32, 3, 1.0, 0.5), _data((C,), torch.float32, 4)
    r = _data(shape, torch.float32, 5, 0.0)
    with fusedreg.use_backend(backend):
        y = F.batch_norm(x, None, None, w, b, True)
        z = F.batch_norm_act(x, None, None, w, b, True, activation="relu", residual=r)
    assert torch.equal(y[:, 1], torch.full_like(y[:, 1], float(b[1])))
    assert torch.equal(z[:, 1], torch.relu(r[:, 1] + b[1]))
