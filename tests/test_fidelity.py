"""Drop-in fidelity of the norms and dropout ops: what torch accepts, fusedreg accepts and
computes the same — higher-order gradients, torch.func transforms, forward-mode AD, vmap's
randomness modes, torch's eps and dtype rules, the exception types torch raises, torch.compile
with dynamic shapes, fx tracing, torch.jit, autocast with mixed dtypes, and the checks of the
low-level autograd Functions. Tiny shapes: the point is the contract, not the kernels (their
numerics are tests/test_layer_norm.py and tests/test_bias_dropout.py)."""
import warnings

import pytest
import torch
import torch.nn.functional as TF
from torch.autograd import forward_ad as fwAD
from torch.func import grad, hessian, jacfwd, jacrev, jvp, vmap

import fusedreg
from fusedreg import functional as F
from fusedreg.autograd import (BiasDropoutConfig, BiasDropoutFunction, LayerNormConfig,
                               LayerNormFunction)
from fusedreg.reference.philox import dropout_scale

from conftest import cpu_backends, gpu_backends, requires_cuda
from tolerances import FACTOR, NORM_ATOL

BACKENDS = cpu_backends("layer_norm")
ACTIVATIONS = [None, "relu", "gelu", "gelu_tanh", "silu"]
# float64 functional comparisons with torch's own op: the same formulas evaluated in another
# order (a few float64 ulps, amplified by the third derivative's cancellations in a Hessian).
F64 = dict(rtol=1e-9, atol=1e-9)


def _t(*shape, seed=0, offset=0.5, dtype=torch.float64, grad=True):
    g = torch.Generator().manual_seed(seed)
    t = (torch.randn(shape, generator=g, dtype=torch.float64) + offset).to(dtype)
    return t.requires_grad_(grad)


def _masked(x, p, seed):
    """x with fusedreg's mask of ``seed``: torch's composite twin of a seeded dropout."""
    keep = F.dropout_mask(x.shape, p, seed)
    return torch.where(keep, x * dropout_scale(p), torch.zeros((), dtype=x.dtype))


# ---- 1. higher-order gradients -----------------------------------------------------------------

def _gradgrad_cases(backend):
    # (name, fn, args); the Triton interpreter gets the smallest shapes
    n = 3 if backend == "triton" else 5
    x, r = _t(2, n, seed=1), _t(2, n, seed=2)
    w, b = _t(n, seed=3, offset=1.0), _t(n, seed=4)
    cases = [
        ("layer_norm", lambda x, w, b: F.layer_norm(x, (n,), w, b), (x, w, b)),
        ("layer_norm-2d", lambda x: F.layer_norm(x, (2, n)), (x,)),
        ("rms_norm", lambda x, w: F.rms_norm(x, (n,), w), (x, w)),
        ("dropout", lambda x: F.dropout(x, 0.4, seed=11), (x,)),
        ("dropout_add_layer_norm", lambda x, r, w, b: F.dropout_add_layer_norm(
            x, r, w, b, p=0.3, seed=3, prenorm=True), (x, r, w, b)),
        ("dropout_add_rms_norm", lambda x, r, w: F.dropout_add_layer_norm(
            x, r, w, None, p=0.3, seed=3, rms=True), (x, r, w)),
        # h stored but not returned: the second backward reaches x through it
        ("dropout_layer_norm-no-residual", lambda x, b: F.dropout_add_layer_norm(
            x, None, None, b, p=0.3, seed=4), (x, b)),
        ("add_layer_norm-residual-in-fp32", lambda x, r, w: F.dropout_add_layer_norm(
            x, r, w, None, residual_in_fp32=True), (x, r, w)),
    ]
    if backend == "triton":  # the interpreter is slow: one case per kernel, few inputs
        rc = r[:1].detach()
        cases = [("dropout_add_layer_norm", lambda x, w: F.dropout_add_layer_norm(
            x, rc, w, None, p=0.3, seed=3, prenorm=True), (x[:1].detach().requires_grad_(), w))]
    acts = ["gelu"] if backend == "triton" else ACTIVATIONS
    cases += [(f"bias_dropout-{a}", lambda x, b, r, a=a: F.bias_dropout(
        x, b, r, p=0.3, activation=a, seed=5), (x, b, r)) for a in acts]
    if backend != "triton":
        # x of the second call depends on the shared bias: the backward's result must be the
        # partial derivatives of each call, not a total derivative through the other one
        cases.append(("bias_dropout-chained", lambda x, b: F.bias_dropout(F.bias_dropout(
            x, b, p=0.3, activation="silu", seed=1), b, p=0.2, activation="gelu", seed=2), (x, b)))
    return cases


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradgradcheck_every_op(backend):
    for name, fn, args in _gradgrad_cases(backend):
        with fusedreg.use_backend(backend):
            assert torch.autograd.gradgradcheck(fn, args), name
            # the differentiable backward (create_graph) gives the fused backward's gradients
            def grads(create_graph):
                out = fn(*args)
                out = out if isinstance(out, tuple) else (out,)
                loss = sum((o * torch.linspace(-1, 2, o.numel(), dtype=o.dtype).reshape(o.shape)).sum()
                           for o in out)
                return torch.autograd.grad(loss, args, create_graph=create_graph)
            # (the Triton bias_dropout backward sums grad_bias in float32 even for float64
            # data: 5e-8 relative there)
            tol = dict(rtol=1e-6, atol=1e-6) if backend == "triton" else dict(rtol=1e-10, atol=1e-10)
            for a, c in zip(grads(False), grads(True)):
                torch.testing.assert_close(a, c, **tol, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "triton"])
def test_double_backward_equals_torch(backend):
    # a gradient penalty: grad of (d loss / dx)^2, through x and the weight
    x, w, b = _t(3, 7, seed=1), _t(7, seed=2, offset=1.0), _t(7, seed=3)

    def penalty(norm):
        gx, = torch.autograd.grad(norm(x).pow(3).sum(), x, create_graph=True)
        return torch.autograd.grad(gx.square().sum(), (x, w))

    with fusedreg.use_backend(backend):
        for ours, theirs in [(lambda t: F.layer_norm(t, (7,), w, b), lambda t: TF.layer_norm(t, (7,), w, b)),
                             (lambda t: F.rms_norm(t, (7,), w), lambda t: TF.rms_norm(t, (7,), w))]:
            for a, c in zip(penalty(ours), penalty(theirs)):
                torch.testing.assert_close(a, c, **F64)


def test_first_order_backward_still_uses_the_fused_op():
    # without create_graph, backward calls the registered backward op (not the composite)
    calls = []
    impl = fusedreg.backends.implementation("layer_norm", "reference")
    kernels = type(impl)

    def bwd(*args):
        calls.append(1)
        return impl.bwd(*args)

    fusedreg.backends.register("layer_norm", "reference", kernels(impl.fwd, bwd))
    try:
        with fusedreg.use_backend("reference"):
            x = _t(2, 5)
            F.layer_norm(x, (5,)).sum().backward()
    finally:
        fusedreg.backends.register("layer_norm", "reference", impl)
    assert calls == [1]


# ---- 2. torch.func and forward-mode AD ----------------------------------------------------------

NORMS = {
    "layer_norm": (lambda w, b: (lambda t: F.layer_norm(t, (5,), w, b)),
                   lambda w, b: (lambda t: TF.layer_norm(t, (5,), w, b))),
    "rms_norm": (lambda w, b: (lambda t: F.rms_norm(t, (5,), w)),
                 lambda w, b: (lambda t: TF.rms_norm(t, (5,), w))),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("norm", list(NORMS))
def test_torch_func_transforms_match_torch(norm, backend):
    x, w, b = _t(3, 5, grad=False), _t(5, seed=2, offset=1.0, grad=False), _t(5, seed=3, grad=False)
    ours, theirs = (make(w, b) for make in NORMS[norm])
    cube = lambda f: (lambda t: f(t).pow(3).sum())  # noqa: E731
    transforms = {
        "jacrev": lambda f: jacrev(f)(x),
        "jacfwd": lambda f: jacfwd(f)(x),
        "hessian": lambda f: hessian(cube(f))(x),
        "per-sample grad": lambda f: vmap(grad(cube(f)))(x),
        "vmap": lambda f: vmap(f)(x),
        "jvp": lambda f: jvp(f, (x,), (torch.ones_like(x),))[1],
        "grad wrt weight": lambda f: grad(lambda t: cube(f)(x).sum() * t)(torch.tensor(1.0, dtype=x.dtype)),
    }
    with fusedreg.use_backend(backend):
        for name, run in transforms.items():
            torch.testing.assert_close(run(ours), run(theirs), **F64, msg=lambda m: f"{name}: {m}")
        with fwAD.dual_level():
            tangent = torch.linspace(-1, 1, x.numel(), dtype=x.dtype).reshape(x.shape)
            a = fwAD.unpack_dual(ours(fwAD.make_dual(x, tangent))).tangent
            c = fwAD.unpack_dual(theirs(fwAD.make_dual(x, tangent))).tangent
        torch.testing.assert_close(a, c, **F64)


def test_torch_func_fused_ops_match_composite():
    # dropout_add_layer_norm and bias_dropout have no torch twin: torch's composite with
    # fusedreg's mask of the same seed
    x, r = _t(3, 5, grad=False), _t(3, 5, seed=1, grad=False)
    w, b = _t(5, seed=2, offset=1.0, grad=False), _t(5, seed=3, grad=False)
    pairs = [
        (lambda t: F.dropout_add_layer_norm(t, r, w, b, p=0.4, seed=9),
         lambda t: TF.layer_norm(_masked(t, 0.4, 9) + r, (5,), w, b)),
        (lambda t: F.bias_dropout(t, b, r, p=0.4, activation="gelu", seed=9),
         lambda t: r + _masked(TF.gelu(t + b), 0.4, 9)),
        (lambda t: F.dropout(t, 0.4, seed=9), lambda t: _masked(t, 0.4, 9)),
    ]
    for ours, theirs in pairs:
        torch.testing.assert_close(jacrev(ours)(x), jacrev(theirs)(x), **F64)
        torch.testing.assert_close(jacfwd(ours)(x), jacfwd(theirs)(x), **F64)


def test_vmap_dropout_randomness_like_torch():
    x = _t(4, 256, grad=False, offset=3.0)
    # "error": torch's dropout raises under vmap, and so does fusedreg's, with torch's message
    with pytest.raises(RuntimeError, match="randomness"):
        vmap(lambda t: TF.dropout(t, 0.5))(x)
    with pytest.raises(RuntimeError, match="randomness"):
        vmap(lambda t: F.dropout(t, 0.5))(x)
    torch.manual_seed(0)
    different = vmap(lambda t: F.dropout(t, 0.5), randomness="different")(x) != 0
    same = vmap(lambda t: F.dropout(t, 0.5), randomness="same")(x) != 0
    assert all(not torch.equal(different[0], different[i]) for i in range(1, 4))
    assert all(torch.equal(same[0], same[i]) for i in range(1, 4))
    for kept in (different, same):  # each row is a mask of p = 0.5: 128 +- 6 sigma (8)
        assert ((kept.sum(1) - 128).abs() <= 48).all()
    # each row of "different" is the mask of some seed, scaled like the eager op
    out = vmap(lambda t: F.bias_dropout(t, p=0.5), randomness="different")(x)
    torch.testing.assert_close(out[out != 0], (x * 2)[out != 0])
    # an explicit seed is the same mask for every entry, equal to the eager call's
    seeded = vmap(lambda t: F.dropout(t, 0.5, seed=7))(x)
    torch.testing.assert_close(seeded, torch.stack([F.dropout(row, 0.5, seed=7) for row in x]))


# ---- 3. arguments torch accepts -----------------------------------------------------------------

def _within_rule(ours, twin, ref64, dtype):
    scale = max(ref64.abs().max().item(), 1.0)
    err = (ours.double() - ref64).abs().max().item() / scale
    terr = (twin.double() - ref64).abs().max().item() / scale
    assert ours.dtype == twin.dtype
    assert err <= FACTOR * terr + NORM_ATOL["fwd"][dtype], (err, terr)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_rms_norm_default_eps_is_torchs(backend, dtype):
    # small inputs, where eps = finfo(bf16).eps (7.8e-3) instead of finfo(fp32).eps changes y
    x = (0.05 * _t(4, 64, grad=False, offset=0.0)).to(dtype)
    with fusedreg.use_backend(backend):
        _within_rule(F.rms_norm(x, (64,)), TF.rms_norm(x, (64,)), TF.rms_norm(x.double(), (64,)),
                     dtype)
        _within_rule(fusedreg.nn.RMSNorm(64)(x).detach(), TF.rms_norm(x, (64,)),
                     TF.rms_norm(x.double(), (64,)), dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_eps_zero_and_negative_as_torch(backend):
    x = _t(3, 8, grad=False, offset=2.0, dtype=torch.float32)
    with fusedreg.use_backend(backend):
        for eps in (0.0, -1e-3, 0):
            _within_rule(F.layer_norm(x, (8,), eps=eps), TF.layer_norm(x, (8,), eps=eps),
                         TF.layer_norm(x.double(), (8,), eps=eps), torch.float32)
            _within_rule(F.rms_norm(x, (8,), eps=eps), TF.rms_norm(x, (8,), eps=eps),
                         TF.rms_norm(x.double(), (8,), eps=eps), torch.float32)
            _within_rule(fusedreg.nn.LayerNorm(8, eps=eps)(x).detach(), TF.layer_norm(x, (8,), eps=eps),
                         TF.layer_norm(x.double(), (8,), eps=eps), torch.float32)
        # eps so negative that var + eps < 0: nan where torch gives nan
        assert torch.equal(F.layer_norm(x, (8,), eps=-1e6).isnan(), TF.layer_norm(x, (8,), eps=-1e6).isnan())
        for bad in (float("nan"), float("inf"), 10**400):
            with pytest.raises(ValueError, match="eps"):
                F.layer_norm(x, (8,), eps=bad)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("xdtype,wdtype", [(torch.float32, torch.bfloat16), (torch.float32, torch.float64),
                                           (torch.bfloat16, torch.float64), (torch.float16, torch.bfloat16),
                                           (torch.float64, torch.float32)])
def test_rms_norm_weight_of_another_dtype(backend, xdtype, wdtype):
    x = _t(3, 16, dtype=xdtype, grad=False)
    w = _t(16, seed=2, offset=1.0, dtype=wdtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch: "Mismatch dtype between input and weight"
        twin = TF.rms_norm(x, (16,), w)
        ref = TF.rms_norm(x.double(), (16,), w.double())
    with fusedreg.use_backend(backend):
        y = F.rms_norm(x, (16,), w)
        _within_rule(y.detach(), twin.detach(), ref.detach(), xdtype)
        y.sum().backward()
    assert w.grad.dtype == wdtype and w.grad.shape == w.shape


def test_exception_types_match_torch():
    x = torch.randn(4, 8)
    cases = [
        lambda m: m.layer_norm(x, (7,)),
        lambda m: m.layer_norm(x, (4, 7)),
        lambda m: m.layer_norm(x, (8,), torch.ones(7)),
        lambda m: m.layer_norm(x, (8,), torch.ones(8), torch.ones(3)),
        lambda m: m.layer_norm(x, (8,), torch.ones(8, dtype=torch.bfloat16)),
        lambda m: m.rms_norm(x, (7,)),
        lambda m: m.rms_norm(x, ()),
        lambda m: m.dropout(x, 1.5),
        lambda m: m.dropout(x, 0.5, training="no"),
    ]
    for call in cases:
        with pytest.raises(Exception) as theirs:
            call(TF)
        with pytest.raises(Exception) as ours:
            call(F)
        assert isinstance(ours.value, theirs.type), (ours.value, theirs.type)


# ---- 4. torch.compile with dynamic shapes, fx, jit ----------------------------------------------

def _compile_cases():
    w, b = torch.randn(8), torch.randn(8)
    return [
        ("layer_norm", lambda x: F.layer_norm(x, (8,), w, b, 1e-5)),
        ("rms_norm", lambda x: F.rms_norm(x, (8,), w)),
        ("dropout", lambda x: F.dropout(x, 0.25, seed=3)),
        ("bias_dropout", lambda x: F.bias_dropout(x, b, x, p=0.25, activation="gelu", seed=3)),
        ("dropout_add_layer_norm", lambda x: F.dropout_add_layer_norm(x, x, w, b, p=0.25, seed=3,
                                                                      prenorm=True)),
        ("nn.LayerNorm", fusedreg.nn.LayerNorm(8)),
        ("nn.RMSNorm", fusedreg.nn.RMSNorm(8)),
        ("nn.Dropout", fusedreg.nn.Dropout(0.25)),  # draws its seed inside the graph
        # (BiasDropout and DropoutAddLayerNorm forward to the functionals above)
    ]


@pytest.mark.parametrize("dynamic", [True, None], ids=["dynamic", "recompile-dynamic"])
def test_compile_dynamic_fullgraph(dynamic):
    # aot_eager traces the forward and the autograd Function's backward as inductor would;
    # fullgraph fails on any graph break. dynamic=None: the second shape recompiles dynamic.
    torch._dynamo.reset()
    cases = _compile_cases()
    if dynamic is None:  # the functionals (the modules call them)
        cases = cases[:5]
    for name, fn in cases:
        compiled = torch.compile(fn, fullgraph=True, dynamic=dynamic, backend="aot_eager")
        for shape in [(3, 8), (5, 8)]:
            x = torch.randn(shape, requires_grad=True)
            torch.manual_seed(0)  # the same drawn seed on both sides (nn.Dropout)
            out = compiled(x)
            torch.manual_seed(0)
            ref = fn(x)
            out, ref = (out if isinstance(out, tuple) else (out,)), (ref if isinstance(ref, tuple) else (ref,))
            for o, r in zip(out, ref):
                torch.testing.assert_close(o, r, msg=lambda m: f"{name} {shape}: {m}")
            sum(o.sum() for o in out).backward()


def test_fx_symbolic_trace_calls_fusedreg():
    model = torch.nn.Sequential(torch.nn.Linear(6, 6), fusedreg.nn.LayerNorm(6), fusedreg.nn.Dropout(0.2),
                                fusedreg.nn.RMSNorm(6)).eval()
    gm = torch.fx.symbolic_trace(model)
    targets = {n.target for n in gm.graph.nodes if n.op == "call_function"}
    assert {F.layer_norm, F.rms_norm, F.dropout} <= targets
    x = torch.randn(3, 6)
    torch.testing.assert_close(gm(x), model(x))


def test_jit_script_names_the_supported_ways_and_trace_works():
    model = torch.nn.Sequential(torch.nn.Linear(6, 6), fusedreg.nn.LayerNorm(6))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit is deprecated in torch 2.14
        with pytest.raises(RuntimeError, match=r"torch\.jit\.trace.*torch\.export"):
            torch.jit.script(model)
        traced = torch.jit.trace(model, torch.randn(2, 6))
    x = torch.randn(4, 6)
    torch.testing.assert_close(traced(x), model(x))


# ---- 5. autocast and mixed dtypes ---------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
def test_autocast_cpu_norms_return_what_torch_returns(backend):
    lin = torch.nn.Linear(16, 16)
    x = _t(3, 16, dtype=torch.float32, grad=False)
    w, b = _t(16, seed=2, offset=1.0, dtype=torch.float32, grad=False), _t(16, seed=3, dtype=torch.float32, grad=False)
    with fusedreg.use_backend(backend), torch.autocast("cpu", dtype=torch.bfloat16):
        h = lin(x)  # bf16 under autocast
        for ours, theirs in [(F.layer_norm(h, (16,), w, b), TF.layer_norm(h, (16,), w, b)),
                             (F.rms_norm(h, (16,), w), TF.rms_norm(h, (16,), w)),
                             (F.layer_norm(x, (16,)), TF.layer_norm(x, (16,)))]:
            assert ours.dtype == theirs.dtype
            torch.testing.assert_close(ours.float(), theirs.float(), atol=2e-2, rtol=1.6e-2)


@requires_cuda
def test_autocast_cuda_norms_return_what_torch_returns():
    # torch's CUDA autocast policy (layer_norm in float32); whatever it is, the dtypes and
    # values must be torch's
    x = _t(3, 16, dtype=torch.float32, grad=False).cuda()
    w = _t(16, seed=2, offset=1.0, dtype=torch.float32, grad=False).cuda()
    lin = torch.nn.Linear(16, 16).cuda()
    for backend in gpu_backends("layer_norm"):
        with fusedreg.use_backend(backend), torch.autocast("cuda", dtype=torch.bfloat16):
            h = lin(x)
            for ours, theirs in [(F.layer_norm(h, (16,), w, w), TF.layer_norm(h, (16,), w, w)),
                                 (F.rms_norm(h, (16,), w), TF.rms_norm(h, (16,), w))]:
                assert ours.dtype == theirs.dtype, backend
                torch.testing.assert_close(ours.float(), theirs.float(), atol=2e-2, rtol=1.6e-2)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_mixed_dtypes_compute_in_fp32_with_torchs_result_dtype(backend, dtype):
    x = _t(4, 16, dtype=dtype)
    bias, residual = _t(16, seed=1, dtype=torch.float32), _t(4, 16, seed=2, dtype=torch.float32)
    w = _t(16, seed=3, offset=1.0, dtype=torch.float32)
    with fusedreg.use_backend(backend):
        for args, composite in [
                ((x, bias, None), lambda x, b, r: _masked(TF.gelu(x.float() + b), 0.3, 5)),
                ((x, None, residual), lambda x, b, r: r + _masked(TF.gelu(x.float()), 0.3, 5)),
                ((x, bias, residual), lambda x, b, r: r + _masked(TF.gelu(x.float() + b), 0.3, 5))]:
            out = F.bias_dropout(*args, p=0.3, activation="gelu", seed=5)
            twin = composite(*args)
            assert out.dtype == torch.float32 == torch.result_type(args[0], args[1] if args[1] is not None else args[2])
            torch.testing.assert_close(out, twin, atol=1e-5, rtol=1e-5)
            out.sum().backward()  # grads in each operand's own dtype
            assert x.grad.dtype == dtype
            x.grad = None
        y, h = F.dropout_add_layer_norm(x, residual, w, None, p=0.3, seed=5, prenorm=True)
        assert h.dtype == torch.float32 and y.dtype == dtype  # documented: y in x's dtype
        torch.testing.assert_close(h, residual + _masked(x.float(), 0.3, 5))


# ---- 6. checks of the low-level entry points and error quality ---------------------------------

def test_autograd_functions_check_their_config():
    x, seed = torch.randn(4, 8), torch.zeros((), dtype=torch.int64)
    for cfg in [BiasDropoutConfig(0.1, 7, "reference"), BiasDropoutConfig(2.0, 0, "cpu"),
                BiasDropoutConfig(-0.1, 0, "cpu"), BiasDropoutConfig(float("nan"), 0, "cpu")]:
        with pytest.raises(ValueError, match="BiasDropoutConfig"):
            BiasDropoutFunction.apply(x, None, None, seed, cfg)
    for cfg in [LayerNormConfig(0, 1e-5, 0.0, False, x.dtype, False, "cpu"),
                LayerNormConfig(3, 1e-5, 0.0, False, x.dtype, False, "cpu"),
                LayerNormConfig(1, float("inf"), 0.0, False, x.dtype, False, "cpu"),
                LayerNormConfig(1, float("nan"), 0.0, False, x.dtype, False, "reference"),
                LayerNormConfig(1, 1e-5, 1.5, False, x.dtype, False, "cpu")]:
        with pytest.raises(ValueError, match="LayerNormConfig"):
            LayerNormFunction.apply(x, None, None, None, seed, cfg)


def test_error_quality():
    x = torch.randn(4, 8)
    for call in [lambda: F.dropout(x, 10**400), lambda: F.bias_dropout(x, p=10**400),
                 lambda: F.dropout_add_layer_norm(x, None, None, None, p=10**400),
                 lambda: fusedreg.nn.Dropout(10**400)]:
        with pytest.raises(ValueError, match="probability"):
            call()
    with pytest.raises(ValueError, match="sizes >= 0"):
        F.dropout_mask((-1, 4), 0.5, seed=1)
    # one rule for `training` (torch's dropout: a bool, else TypeError)
    for training in ("no", 1, None):
        for call in [lambda: F.dropout(x, 0.5, training=training),
                     lambda: F.bias_dropout(x, p=0.5, training=training),
                     lambda: F.dropout_add_layer_norm(x, None, None, None, p=0.5, training=training)]:
            with pytest.raises(TypeError, match="training must be a bool"):
                call()
