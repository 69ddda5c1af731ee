"""layer_norm, rms_norm and dropout_add_layer_norm on every backend that runs on CPU tensors
(reference, cpu, and triton under the interpreter), against a float64 torch oracle under the
rule of tests/tolerances.py: error <= FACTOR * torch's own error at the same dtype + atol; and
the triton and cuda backends on CUDA tensors against the reference (skipped without a GPU,
"needs a CUDA GPU"; on a GPU a backend that cannot serve layer_norm fails with the reason)."""
import math

import pytest
import torch
import torch.nn.functional as TF
from torch.library import opcheck

import fusedreg
from fusedreg import backends
from fusedreg import functional as F
from fusedreg.reference.philox import dropout_scale

from _helpers import (device_cases, p_at_a_uniform, results_at_each_cpu_level,
                      results_at_one_and_two_threads, serving)
from conftest import cpu_backends
from tolerances import NORM_GPU, check_norm_error as _check

OP = "layer_norm"
BACKENDS = cpu_backends(OP)
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# Backends for the large or float64-gradcheck tests: the Triton interpreter is too slow there.
FAST = [b for b in BACKENDS if b != "triton"]


def _data(shape, dtype, seed=0, offset=3.0):
    g = torch.Generator().manual_seed(seed)
    # a non-zero mean, so that a kernel that forgets to subtract it cannot pass
    return (torch.randn(shape, generator=g, dtype=torch.float64) * 2 + offset).to(dtype)


def _run(fn, inputs, grads_out):
    """Outputs of fn(*inputs) and the grads of sum(out * g) w.r.t. the inputs that need them."""
    inputs = [t.detach().clone().requires_grad_(t.is_floating_point()) if t is not None else None
              for t in inputs]
    outs = fn(*inputs)
    outs = outs if isinstance(outs, tuple) else (outs,)
    loss = sum((o.double() * g.double()).sum() for o, g in zip(outs, grads_out))
    loss.backward()
    return [o.detach() for o in outs], [t.grad if t is not None else None for t in inputs]


def _compare(fn, twin, inputs, grads_out, dtype, names):
    """fn (fusedreg), twin (torch at dtype) and twin on float64 copies; forward and backward."""
    out, grads = _run(fn, inputs, grads_out)
    tout, tgrads = _run(twin, inputs, grads_out)
    inputs64 = [t.double() if t is not None else None for t in inputs]
    rout, rgrads = _run(twin, inputs64, [g.double() for g in grads_out])
    for i, (o, t, r) in enumerate(zip(out, tout, rout)):
        _check(f"output {i}", o, r, t, dtype, "fwd")
    for name, g, t, r in zip(names, grads, tgrads, rgrads):
        if r is not None:
            assert g is not None, f"no grad for {name}"
            _check(f"grad {name}", g, r, t, dtype, "bwd")


# (shape, number of normalized dims, parameters): what each exercises
LN_CASES = [
    ((4, 1), 1, "wb"),            # N = 1: xhat = 0, y = bias
    ((3, 7, 256), 1, "wb"),       # several leading dims, a power-of-two row
    ((33, 1023), 1, "w"),         # odd N just below 1024, weight without bias
    ((5, 1151), 1, "wb"),         # odd N above 1024 (two chunks in chunked kernels)
    ((2, 3, 8, 16), 2, "none"),   # multi-dimensional normalized_shape, no affine
    ((0, 64), 1, "wb"),           # zero rows
    ((6, 100), 1, "fp32w"),       # fp32 weight and bias with half activations
    ((2, 262144), 1, "wb"),       # long rows (GPU kernels loop over chunks)
]


def _params(shape, ndim, kind, dtype, seed=1):
    nshape = shape[len(shape) - ndim:]
    pdtype = torch.float32 if kind == "fp32w" else dtype
    w = _data(nshape, pdtype, seed, offset=1.0) if kind != "none" else None
    b = _data(nshape, pdtype, seed + 1, offset=0.5) if kind in ("wb", "fp32w") else None
    return nshape, w, b


def _case_id(c):
    return f"{'x'.join(map(str, c[0]))}-n{c[1]}-{c[2]}"


def _backends_for(shape):
    return FAST if math.prod(shape) > 100_000 else BACKENDS


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", LN_CASES, ids=_case_id)
def test_layer_norm_matches_float64(case, dtype):
    shape, ndim, kind = case
    nshape, w, b = _params(shape, ndim, kind, dtype)
    x = _data(shape, dtype)
    dy = _data(shape, dtype, seed=7, offset=0.0)
    for backend in _backends_for(shape):
        with fusedreg.use_backend(backend):
            _compare(lambda x, w, b: F.layer_norm(x, nshape, w, b, eps=1e-5),
                     lambda x, w, b: TF.layer_norm(x, nshape, w, b, eps=1e-5),
                     [x, w, b], [dy], dtype, ["x", "weight", "bias"])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", LN_CASES, ids=_case_id)
def test_rms_norm_matches_float64(case, dtype):
    shape, ndim, kind = case
    nshape, w, _ = _params(shape, ndim, kind, dtype)
    x = _data(shape, dtype)
    dy = _data(shape, dtype, seed=7, offset=0.0)
    for backend in _backends_for(shape):
        with fusedreg.use_backend(backend):
            # eps=None: torch.finfo(x.dtype).eps on both sides
            _compare(lambda x, w: F.rms_norm(x, nshape, w),
                     lambda x, w: TF.rms_norm(x, nshape, w),
                     [x, w], [dy], dtype, ["x", "weight"])


def _composite(p, seed, rms, residual_in_fp32, prenorm, eps=1e-5):
    """The eager composite h = residual + dropout(x), y = norm(h): the torch twin/oracle."""
    def fn(x, residual, w, b):
        h = x
        if p > 0:
            keep = F.dropout_mask(x.shape, p, seed)
            h = torch.where(keep, x * dropout_scale(p), torch.zeros((), dtype=x.dtype))
        if residual is not None:
            h = h + residual
        if residual_in_fp32 and h.dtype in (torch.float16, torch.bfloat16):
            h = h.float()
        nshape = w.shape
        if h.dtype == torch.float32:  # torch's CPU norm wants fp32 parameters for fp32 input
            w, b = w.float(), (b.float() if b is not None else None)
        if rms:
            y = TF.rms_norm(h, nshape, w, eps)
            y = y + b if b is not None else y
        else:
            y = TF.layer_norm(h, nshape, w, b, eps)
        y = y.to(x.dtype)
        return (y, h) if prenorm else y
    return fn


# name: (residual, p, rms, residual_in_fp32, prenorm)
DAL_CASES = {
    "residual-p0.3": (True, 0.3, False, False, False),
    "prenorm-p0.2": (True, 0.2, False, False, True),
    "no-residual-rms-p0.5": (False, 0.5, True, False, False),
    "residual-in-fp32-prenorm": (True, 0.1, False, True, True),
    "residual-p0": (True, 0.0, False, False, True),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", list(DAL_CASES))
@pytest.mark.parametrize("backend", BACKENDS)
def test_dropout_add_layer_norm_matches_float64(backend, name, dtype):
    has_res, p, rms, res32, prenorm = DAL_CASES[name]
    shape, seed = (9, 1151), 1234
    x = _data(shape, dtype)
    residual = _data(shape, dtype, seed=2, offset=-1.0) if has_res else None
    w = _data((1151,), dtype, 3, offset=1.0)
    b = None if rms else _data((1151,), dtype, 4, offset=0.5)
    grads_out = [_data(shape, dtype, 7, 0.0)] + ([_data(shape, dtype, 8, 0.0)] if prenorm else [])
    fused = lambda x, r, w, b: F.dropout_add_layer_norm(  # noqa: E731
        x, r, w, b, p=p, rms=rms, residual_in_fp32=res32, prenorm=prenorm, seed=seed)
    with fusedreg.use_backend(backend):
        _compare(fused, _composite(p, seed, rms, res32, prenorm), [x, residual, w, b], grads_out,
                 dtype, ["x", "residual", "weight", "bias"])
        if prenorm:  # h has the documented dtype
            h = fused(x, residual, w, b)[1]
            assert h.dtype == (torch.float32 if res32 else dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_input(backend):
    base = _data((40, 2 * 97), torch.float32)
    cases = [base[:, ::2],                         # strided rows
             base.reshape(40, 2, 97).transpose(0, 1)]  # permuted leading dims
    w, b = _data((97,), torch.float32, 3), _data((97,), torch.float32, 4)
    for x in cases:
        r = _data(x.shape, torch.float32, 5)
        assert not x.is_contiguous()
        with fusedreg.use_backend(backend):
            y = F.layer_norm(x, (97,), w, b)
            z = F.rms_norm(x, (97,), w)
            d = F.dropout_add_layer_norm(x, r, w, b, p=0.2, seed=3)
        with fusedreg.use_backend("reference"):
            d_ref = F.dropout_add_layer_norm(x.contiguous(), r, w, b, p=0.2, seed=3)
        torch.testing.assert_close(y, TF.layer_norm(x, (97,), w, b), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(z, TF.rms_norm(x, (97,), w), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(d, d_ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(7, 1151), (16, 64)], ids=str)  # N % 4 != 0 and == 0
def test_dropout_mask_equals_dropout_mask(backend, shape):
    p, seed = 0.5, 2**40 + 17
    x = _data(shape, torch.float32).abs() + 1  # never zero, so zeros mark dropped elements
    x.requires_grad_()
    keep = F.dropout_mask(shape, p, seed)
    with fusedreg.use_backend(backend):
        y, h = F.dropout_add_layer_norm(x, None, None, None, p=p, prenorm=True, seed=seed)
        assert torch.equal(h, torch.where(keep, x.detach() * dropout_scale(p), torch.zeros(())))
        (y * _data(shape, torch.float32, 5, 0.0)).sum().backward()
    assert torch.all(x.grad[~keep] == 0) and torch.all(x.grad[keep] != 0)


@pytest.mark.skipif("cpu" not in BACKENDS, reason="the cpu backend is not built")
def test_cpu_dropout_keep_decisions_at_every_level(tmp_path):
    """The cpu kernels' dropout keep decisions (AVX-512: 0/1 floats from the Philox words'
    keep bits, csrc/include/fusedreg/cpu/keep_bits.h; AVX2 and baseline: the uniforms) are
    the reference's u >= p at every level, in the forward and in the backward: float32 with a
    residual, h = where(keep, x * scale, 0) + residual and grad_x = where(keep, grad_residual *
    scale, 0) bit for bit (grad_residual is dh itself); bfloat16, grad_x is zero exactly where
    dropped. p includes a value that some element's uniform equals exactly (kept) and 1.0;
    rows with N % 4 != 0 (keep bits read at a shifted offset), rows of every tail length,
    paired backward rows (N >= 1024) and rows past the prefetch limit. Each level in a fresh
    process (the level is read once)."""
    from fusedreg.reference.philox import dropout_keep

    seed = 2**33 + 5
    p_exact, u = p_at_a_uniform(seed, 300)
    code = r'''
import sys, torch, fusedreg
from fusedreg import functional as F
seed, p_exact, path = int(sys.argv[1]), float(sys.argv[2]), sys.argv[3]
out = {}
g = torch.Generator().manual_seed(3)
with fusedreg.use_backend("cpu"):
    for dt in (torch.float32, torch.bfloat16):
        for shape in ((33, 1151), (9, 300), (6, 1024), (3, 4100), (1, 45), (4, 3)):
            x = (torch.randn(shape, generator=g, dtype=torch.float64) + 0.5).to(dt).requires_grad_()
            r = torch.randn(shape, generator=g, dtype=torch.float64).to(dt).requires_grad_()
            w = (torch.rand(shape[1], generator=g) + 0.5).to(dt).requires_grad_()
            b = torch.randn(shape[1], generator=g).to(dt).requires_grad_()
            dy = torch.randn(shape, generator=g).to(dt)
            for p in (0.1, 0.5, 1.0, p_exact):
                y, h = F.dropout_add_layer_norm(x, r, w, b, p=p, prenorm=True, seed=seed)
                gx, gr = torch.autograd.grad(y, [x, r], dy)
                out[(str(dt), shape, p)] = (x.detach(), r.detach(), h.detach(), gx, gr)
torch.save(out, path)
'''
    for level, results in results_at_each_cpu_level(code, (seed, repr(p_exact)), tmp_path).items():
        for key, (x, r, h, gx, gr) in results.items():
            dt, shape, p = key
            keep = dropout_keep(shape, p, seed)
            if p == p_exact:
                assert keep.flatten()[(u == p_exact).nonzero()[0, 0]]  # u == p is kept
            if p == 1.0:
                assert not keep.any()
            zero = torch.zeros((), dtype=gx.dtype)
            if x.dtype == torch.float32:
                assert torch.equal(h, torch.where(keep, x * dropout_scale(p), zero) + r), (level, key)
                assert torch.equal(gx, torch.where(keep, gr * dropout_scale(p), zero)), (level, key)
            else:
                assert torch.all(gx[~keep] == 0), (level, key)
                assert torch.equal(gx != 0, keep & (gr != 0)), (level, key)


@pytest.mark.parametrize("backend", BACKENDS)
def test_backward_is_bitwise_deterministic(backend):
    shape = (48, 257)  # several row blocks/programs contribute partial sums of dW and dB
    x, r = _data(shape, torch.float32), _data(shape, torch.float32, 2)
    w, b = _data((257,), torch.float32, 3), _data((257,), torch.float32, 4)
    dy = _data(shape, torch.float32, 5, 0.0)
    runs = []
    with fusedreg.use_backend(backend):
        for _ in range(2):
            runs.append(_run(lambda x, r, w, b: F.dropout_add_layer_norm(x, r, w, b, p=0.1, seed=9),
                             [x, r, w, b], [dy])[1])
    for g1, g2 in zip(*runs):
        assert torch.equal(g1, g2)


@pytest.mark.skipif("cpu" not in BACKENDS, reason="the cpu backend is not built")
@pytest.mark.parametrize("dtype,rows,res32,p", [(torch.float32, 2048, False, 0.0),
                                               (torch.float32, 2048, False, 0.25),
                                               (torch.bfloat16, 4096, True, 0.0)],
                         ids=["float32", "float32-dropout", "bfloat16-residual-fp32"])
def test_cpu_streamed_outputs_equal_cached_ones(dtype, rows, res32, p):
    """The cpu kernels write outputs of 8 MiB and more with non-temporal stores, staged chunk
    by chunk (h streamed from the row the statistics read), smaller ones with ordinary stores
    (csrc/cpu/layer_norm.cpp): a large call's rows, on one thread and on two, equal bit for
    bit the same rows computed by small calls (rows are independent). With p = 0 no mask index
    moves, so the first and the last rows are compared; with dropout the first rows, whose
    mask indices are the same in both calls; there h is residual + the masked x (the mask of
    F.dropout_mask) in every row. 1024 features: every row starts at the same page offset, the
    case the kernels place their scratch rows for once per call."""
    N = 1024
    x, r = _data((rows, N), dtype), _data((rows, N), torch.float32 if res32 else dtype, 2, -1.0)
    w, b = _data((N,), dtype, 3, 1.0), _data((N,), dtype, 4, 0.5)
    dy, dh = _data((rows, N), dtype, 5, 0.0), _data((rows, N), r.dtype, 6, 0.0)

    def run(sl, backend="cpu"):
        ins = [t[sl].clone().requires_grad_() for t in (x, r)]
        with fusedreg.use_backend(backend):
            y, h = F.dropout_add_layer_norm(ins[0], ins[1], w, b, p=p, prenorm=True,
                                            residual_in_fp32=res32, seed=11)
            z = F.rms_norm(ins[0], (N,), w)
        torch.autograd.backward([y, h, z], [dy[sl], dh[sl], dy[sl]])
        return [y, h, z, ins[0].grad, ins[1].grad]

    big1, big2 = results_at_one_and_two_threads(lambda: run(slice(None)))
    # 40 and 24 rows: 40 KiB / 24 KiB outputs
    for sl in (slice(0, 40),) + ((slice(rows - 24, rows),) if p == 0.0 else ()):
        for a1, a2, c in zip(big1, big2, run(sl)):
            assert torch.equal(a1[sl], c)
            assert torch.equal(a2[sl], c)
    if p > 0.0:  # float32: h = where(keep, x * scale, 0) + residual, rounded once each
        keep = F.dropout_mask((rows, N), p, 11)
        h_expected = torch.where(keep, x * dropout_scale(p), torch.zeros(())) + r
        for big in (big1, big2):
            assert torch.equal(big[1], h_expected)


@pytest.mark.skipif("cpu" not in BACKENDS, reason="the cpu backend is not built")
@pytest.mark.parametrize("dtype,res32", [(torch.float32, False), (torch.bfloat16, True)],
                         ids=["float32", "bfloat16-residual-fp32"])
def test_cpu_paired_backward_rows_equal_single_rows(dtype, res32):
    """The cpu backward takes long rows (4 KiB of float and more) through its sums pass two at
    a time at the AVX-512 level, adding both rows' terms to the weight's and bias's partial
    rows in row order (csrc/cpu/layer_norm.cpp): each row's gradients equal bit for bit the
    same row's from a one-row call (which goes alone); an odd row count leaves a last row
    alone in the big call too. (grad_weight / grad_bias of paired rows: the float64 tests'
    5 x 1151 and 2 x 262144 cases.)"""
    rows, N = 7, 2056  # N % 16 != 0: the pass's scalar tail runs for both rows
    x, r = _data((rows, N), dtype), _data((rows, N), torch.float32 if res32 else dtype, 2, -1.0)
    w, b = _data((N,), dtype, 3, 1.0), _data((N,), dtype, 4, 0.5)
    dy, dh = _data((rows, N), dtype, 5, 0.0), _data((rows, N), r.dtype, 6, 0.0)

    def run(sl):
        # weight and bias need grads in every call: the sums pass is the same loop then
        ins = [t.clone().requires_grad_() for t in (x[sl], r[sl], w, b)]
        with fusedreg.use_backend("cpu"):
            y, h = F.dropout_add_layer_norm(*ins, p=0.0, prenorm=True, residual_in_fp32=res32)
            z = F.rms_norm(ins[0], (N,), ins[2])
        torch.autograd.backward([y, h, z], [dy[sl], dh[sl], dy[sl]])
        return [ins[0].grad, ins[1].grad]

    big = run(slice(None))
    for i in range(rows):
        for a, c in zip(big, run(slice(i, i + 1))):
            assert torch.equal(a[i:i + 1], c)


@pytest.mark.skipif("triton" not in BACKENDS,
                    reason="the triton backend does not run on CPU tensors here (needs TRITON_INTERPRET=1)")
@pytest.mark.parametrize("shape", [(3, 1151), (2, 1000)], ids=str)  # N % 4 != 0 and == 0
def test_triton_chunked_rows_match_reference(shape, monkeypatch):
    """Rows longer than the largest block are walked in chunks (what N = 262,144 takes on a
    GPU); a 256-element block makes these small rows take that path under the interpreter."""
    from fusedreg.triton import layer_norm as tri

    monkeypatch.setattr(tri, "_MAX_BLOCK_N", 256)
    x, r = _data(shape, torch.float32), _data(shape, torch.float32, 2)
    w, b = _data(shape[-1:], torch.float32, 3), _data(shape[-1:], torch.float32, 4)
    grads_out = [_data(shape, torch.float32, 5, 0.0), _data(shape, torch.float32, 6, 0.0)]
    calls = [
        (lambda x, r, w, b: F.layer_norm(x, shape[-1:], w, b), 1),
        (lambda x, r, w, b: F.rms_norm(x, shape[-1:], w), 1),
        (lambda x, r, w, b: F.dropout_add_layer_norm(x, r, w, b, p=0.3, prenorm=True, seed=11), 2),
    ]
    for fn, n_out in calls:
        results = {}
        for backend in ("reference", "triton"):
            with fusedreg.use_backend(backend):
                results[backend] = _run(fn, [x, r, w, b], grads_out[:n_out])
        for a, c in zip(results["reference"][0] + results["reference"][1],
                        results["triton"][0] + results["triton"][1]):
            if a is None:
                assert c is None
            else:
                torch.testing.assert_close(c, a, rtol=1e-5, atol=2e-5)


def test_function_config_fast_path_keeps_every_check():
    """LayerNormFunction's config check has a fast path for the configs the functional API
    builds; a bool where an int or float belongs, or a dtype that is not a float, still takes
    the full checks and raises."""
    from fusedreg.ops.layer_norm import LayerNormConfig, LayerNormFunction
    x, seed = torch.randn(4, 8), torch.zeros((), dtype=torch.int64)
    for cfg, err in [(LayerNormConfig(True, 1e-5, 0.0, False, x.dtype, False, "cpu"), ValueError),
                     (LayerNormConfig(1, 1e-5, True, False, x.dtype, False, "cpu"), ValueError),
                     (LayerNormConfig(1, True, 0.0, False, x.dtype, False, "cpu"), ValueError),
                     (LayerNormConfig(1, 1e-5, 0.0, False, torch.int32, False, "cpu"), TypeError)]:
        with pytest.raises(err, match="LayerNormConfig"):
            LayerNormFunction.apply(x, None, None, None, seed, cfg)
    # an int eps is a finite number (the full checks accept it): torch's result with eps=1
    cfg = LayerNormConfig(1, 1, 0.0, False, x.dtype, False, "reference")
    y = LayerNormFunction.apply(x, None, None, None, seed, cfg)[0]
    torch.testing.assert_close(y, TF.layer_norm(x, (8,), eps=1.0))


@pytest.mark.parametrize("backend", FAST)
def test_gradcheck_float64(backend):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, 5, dtype=torch.float64, generator=g) + 2
    r = torch.randn(3, 4, 5, dtype=torch.float64, generator=g)
    w = torch.randn(4, 5, dtype=torch.float64, generator=g)
    b = torch.randn(4, 5, dtype=torch.float64, generator=g)
    x, r, w, b = (t.requires_grad_() for t in (x, r, w, b))
    with fusedreg.use_backend(backend):
        assert torch.autograd.gradcheck(lambda x, w, b: F.layer_norm(x, (4, 5), w, b), (x, w, b))
        assert torch.autograd.gradcheck(lambda x, w: F.rms_norm(x, (5,), w[0]), (x, w))
        assert torch.autograd.gradcheck(
            lambda x, r, w, b: F.dropout_add_layer_norm(x, r, w, b, p=0.3, prenorm=True, seed=3),
            (x, r, w, b))
        assert torch.autograd.gradcheck(
            lambda x, w: F.dropout_add_layer_norm(x, None, w, None, p=0.2, rms=True, seed=4), (x, w))


def _op_samples():
    """Argument tuples for the registered forward and backward ops."""
    x, r = _data((5, 37), torch.float32), _data((5, 37), torch.float32, 2)
    w, b = _data((37,), torch.float32, 3), _data((37,), torch.float32, 4)
    seed = torch.tensor(42, dtype=torch.int64)
    fwd = [
        (x, None, w, b, 1e-5, 0.0, seed, False, torch.float32, False),
        (x, r, w, b, 1e-5, 0.25, seed, False, torch.float32, True),
        (x, None, w, None, 1e-6, 0.0, seed, True, torch.float32, False),
        (x.bfloat16(), r, w, b, 1e-5, 0.1, seed, False, torch.float32, True),
    ]
    return fwd


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend):
    fwd_op, bwd_op = backends.implementation(OP, backend)
    for args in _op_samples():
        opcheck(fwd_op, args)
        x, r, w, b, eps, p, seed, rms, h_dtype, store_h = args
        y, h, mean, rstd = fwd_op(*args)
        hh = h if store_h else x
        dy = torch.randn_like(y)
        dh = torch.randn_like(hh) if store_h else None
        opcheck(bwd_op, (dy, dh, hh, w, b, mean, rstd, p, seed, rms, x.dtype,
                         r is not None, True, b is not None))


@pytest.mark.parametrize("backend", BACKENDS)
def test_compile_fullgraph_matches_eager(backend):
    torch._dynamo.reset()
    mods = [fusedreg.nn.LayerNorm(48), fusedreg.nn.RMSNorm((3, 16)),
            fusedreg.nn.DropoutAddLayerNorm(48, p=0.0, prenorm=True)]
    x, r = _data((4, 3, 16), torch.float32), _data((4, 48), torch.float32, 2)
    for mod in mods:
        with torch.no_grad():
            for prm in mod.parameters():
                prm.copy_(_data(prm.shape, torch.float32, 9, 1.0))
        inp = (x.reshape(4, 48), r) if isinstance(mod, fusedreg.nn.DropoutAddLayerNorm) else (
            (x,) if isinstance(mod, fusedreg.nn.RMSNorm) else (x.reshape(4, 48),))
        with fusedreg.use_backend(backend):
            compiled = torch.compile(mod, fullgraph=True, backend="inductor")
            outs = []
            for m in (mod, compiled):
                mod.zero_grad()
                ins = [t.clone().requires_grad_() for t in inp]
                out = m(*ins)
                out = out if isinstance(out, tuple) else (out,)
                sum((o * (k + 1)).sum() for k, o in enumerate(out)).backward()
                outs.append([o.detach() for o in out] + [t.grad for t in ins]
                            + [prm.grad.clone() for prm in mod.parameters()])
        for a, c in zip(*outs):
            torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-5)


def test_compile_fullgraph_with_dropout():
    torch._dynamo.reset()
    mod = fusedreg.nn.DropoutAddLayerNorm(64, p=0.25)
    compiled = torch.compile(mod, fullgraph=True)
    x, r = _data((8, 64), torch.float32), _data((8, 64), torch.float32, 2)
    y = compiled(x, r)
    mod.eval()
    torch.testing.assert_close(compiled(x, r), mod(x, r))  # no dropout in eval
    assert y.shape == x.shape and torch.isfinite(y).all()


def test_modules_exchange_state_dicts_with_torch():
    x = _data((5, 4, 6), torch.float32)
    pairs = [(torch.nn.LayerNorm((4, 6)), fusedreg.nn.LayerNorm((4, 6))),
             (torch.nn.LayerNorm(6, bias=False), fusedreg.nn.LayerNorm(6, bias=False)),
             (torch.nn.LayerNorm(6, elementwise_affine=False), fusedreg.nn.LayerNorm(6, elementwise_affine=False)),
             (torch.nn.RMSNorm(6), fusedreg.nn.RMSNorm(6)),
             (torch.nn.RMSNorm((4, 6), eps=1e-3), fusedreg.nn.RMSNorm((4, 6), eps=1e-3))]
    for theirs, ours in pairs:
        assert isinstance(ours, type(theirs))
        assert list(theirs.state_dict()) == list(ours.state_dict())
        with torch.no_grad():
            for prm in theirs.parameters():
                prm.copy_(_data(prm.shape, torch.float32, 3))
        ours.load_state_dict(theirs.state_dict())
        torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-5)
        with torch.no_grad():
            for prm in ours.parameters():
                prm.mul_(0.5)
        theirs.load_state_dict(ours.state_dict())
        torch.testing.assert_close(theirs(x), ours(x), rtol=1e-5, atol=1e-5)


def test_dropout_add_layer_norm_module():
    mod = fusedreg.nn.DropoutAddLayerNorm(32, p=0.1, prenorm=True, residual_in_fp32=True)
    assert set(mod.state_dict()) == {"weight", "bias"}
    assert set(fusedreg.nn.DropoutAddLayerNorm(32, rms=True).state_dict()) == {"weight"}
    x = _data((3, 32), torch.bfloat16)
    mod.eval()
    y, h = mod(x)
    assert y.dtype == torch.bfloat16 and h.dtype == torch.float32
    torch.testing.assert_close(h, x.float())


def _bad_calls():
    x = _data((3, 4), torch.float32)
    meta = torch.ones(4, device="meta")
    return [
        (ValueError, lambda: F.layer_norm(x, (5,))),                           # not trailing dims
        (ValueError, lambda: F.layer_norm(x, (3, 5))),
        (ValueError, lambda: F.layer_norm(x, ())),
        (TypeError, lambda: F.layer_norm(x, "4")),
        (ValueError, lambda: F.layer_norm(x, (4,), torch.ones(5))),            # weight shape
        (ValueError, lambda: F.layer_norm(x, (4,), torch.ones(4), torch.ones(3))),  # bias shape
        (ValueError, lambda: F.layer_norm(x, (4,), eps=float("inf"))),       # 0, < 0: accepted
        (ValueError, lambda: F.layer_norm(x, (4,), eps=10**400)),
        (ValueError, lambda: F.layer_norm(x, (4,), eps=float("nan"))),
        (TypeError, lambda: F.layer_norm(x, (4,), eps="1e-5")),
        (ValueError, lambda: F.layer_norm(x, (4,), meta)),                    # mixed devices
        (TypeError, lambda: F.layer_norm(x.long(), (4,))),                    # integer dtype
        (TypeError, lambda: F.layer_norm(x, (4,), torch.ones(4, dtype=torch.int32))),
        (TypeError, lambda: F.layer_norm(x, (4,), torch.ones(4, dtype=torch.bfloat16))),
        (TypeError, lambda: F.layer_norm(x, (4,), None, torch.ones(4, dtype=torch.float64))),
        (TypeError, lambda: F.layer_norm(x.to_sparse(), (4,))),                # layout
        (TypeError, lambda: F.layer_norm(x, (4,), torch.ones(4).to_sparse())),
        (ValueError, lambda: F.rms_norm(x, (5,))),
        (ValueError, lambda: F.rms_norm(x, (4,), torch.ones(2, 2))),
        (ValueError, lambda: F.rms_norm(x, (4,), eps=float("-inf"))),
        (ValueError, lambda: F.rms_norm(x, (4,), meta)),
        (TypeError, lambda: F.rms_norm(x.int(), (4,))),
        (ValueError, lambda: F.dropout_add_layer_norm(x, torch.ones(3, 5), torch.ones(4), None)),
        (ValueError, lambda: F.dropout_add_layer_norm(x, torch.ones(3, 4, device="meta"), None, None)),
        (ValueError, lambda: F.dropout_add_layer_norm(x, None, torch.ones(5), None)),
        (ValueError, lambda: F.dropout_add_layer_norm(x, None, None, None, p=1.5)),
        (ValueError, lambda: F.dropout_add_layer_norm(x, None, None, None, eps=float("nan"))),
        (TypeError, lambda: F.dropout_add_layer_norm(x.long(), None, None, None)),
        (TypeError, lambda: F.dropout_add_layer_norm(x, None, torch.ones(4), torch.ones(4, dtype=torch.float64))),
    ]


@pytest.mark.parametrize("choice", ["reference", "auto"])
@pytest.mark.parametrize("i", range(len(_bad_calls())))
def test_bad_input_raises_before_any_kernel(i, choice):
    """Under an explicit backend and under auto (where a small plain norm would be torch's
    own op: backends.AUTO_TORCH_BELOW), the checks reject bad input with fusedreg's error."""
    def no_kernel(*args, **kwargs):
        raise AssertionError("a kernel ran on bad input")

    # Every registered implementation is replaced (resolve() caches backend names, not
    # implementations, so the replacement is what a call reaches).
    kernels = type(backends.implementation(OP, "reference"))
    registered = {b: backends.implementation(OP, b) for b in backends.registered_backends(OP)}
    assert "reference" in registered
    try:
        for backend in registered:
            backends.register(OP, backend, kernels(no_kernel, no_kernel))
        with fusedreg.use_backend("reference"):
            with pytest.raises(AssertionError, match="a kernel ran"):  # the replacement is reached
                F.layer_norm(_data((3, 4), torch.float32), (4,))
        exc, call = _bad_calls()[i]
        with fusedreg.use_backend(choice), pytest.raises(exc):
            call()
    finally:
        for backend, impl in registered.items():
            backends.register(OP, backend, impl)


@pytest.mark.parametrize("backend,device,dtype,shape", device_cases(
    OP, [], [(d, s) for d in DTYPES for s in [(33, 1023), (4, 4096), (2, 262144), (64, 8)]]))
def test_gpu_backends_match_reference(backend, device, dtype, shape):
    """CUDA tensors (run where a GPU is present): every switch against the reference backend
    on the same device, and a bitwise-deterministic backward."""
    serving(OP, backend, device)
    dev = torch.device(device)
    x = _data(shape, dtype).to(dev)
    r = _data(shape, dtype, 2).to(dev)
    w = _data(shape[-1:], torch.float32, 3).to(dev)
    b = _data(shape[-1:], torch.float32, 4).to(dev)
    grads_out = [_data(shape, dtype, 5, 0.0).to(dev), _data(shape, torch.float32, 6, 0.0).to(dev)]
    calls = [
        (lambda x, r, w, b: F.layer_norm(x, shape[-1:], w, b), 1),
        (lambda x, r, w, b: F.rms_norm(x, shape[-1:], w), 1),
        (lambda x, r, w, b: F.dropout_add_layer_norm(x, r, w, b, p=0.2, prenorm=True,
                                                     residual_in_fp32=True, seed=5), 2),
    ]
    for fn, n_out in calls:
        with fusedreg.use_backend(backend):
            out, grads = _run(fn, [x, r, w, b], grads_out[:n_out])
            out2, grads2 = _run(fn, [x, r, w, b], grads_out[:n_out])
        with fusedreg.use_backend("reference"):
            rout, rgrads = _run(fn, [x, r, w, b], grads_out[:n_out])
        assert all(o.device == x.device for o in out)
        for a, c in zip(out + grads, rout + rgrads):
            if c is not None:
                torch.testing.assert_close(a.float(), c.float(), **NORM_GPU[dtype])
        for o1, o2 in zip(out, out2):
            assert torch.equal(o1, o2)
        for g1, g2 in zip(grads, grads2):
            assert g1 is None or torch.equal(g1, g2)
