"""fusedreg._C.layer_norm_train (csrc/ops.cpp: LayerNormNode): LayerNormFunction as a C++
autograd node for the cpu backend. It must give what the Python Function gives, bit for bit —
outputs, gradients for every subset of operands that need one, second-order gradients — and
decline (None: the Function runs) wherever the Function's path would not go straight to the
CPU kernels: dispatch and torch-function modes, tensor subclasses, a config the Function's
check refuses, kernels registered in place of the built-in ones."""
import itertools

import pytest
import torch

import fusedreg
from fusedreg import backends
from fusedreg import functional as F

from _helpers import PassThroughDispatchMode, PassThroughFunctionMode

pytestmark = pytest.mark.skipif(not backends.extension_available(),
                                reason="the node is the C++ extension's")

_NODE, _FUNCTION = "CppFunction", "LayerNormFunctionBackward"


def _data(shape, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=torch.float64) * 2 + 0.5).to(dtype)


def _same(a, b):
    if a is None or b is None:
        return a is None and b is None
    if isinstance(a, torch.Tensor):
        return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))


def _through(node_on, monkeypatch, fn):
    """fn() under the cpu backend with the C++ node serving the calls that record a backward
    (node_on) or the Python LayerNormFunction doing so."""
    from fusedreg.ops import layer_norm as ln
    with monkeypatch.context() as m:
        if not node_on:
            m.setattr(ln, "_CPU_NODE", None)
        with fusedreg.use_backend("cpu"):
            return fn()


def _both(monkeypatch, fn):
    """fn()'s results through the node and through the Function: (node's, Function's); fn
    returns (results, grad_fn type name), and each path must have run."""
    (fast, node), (slow, func) = (_through(True, monkeypatch, fn), _through(False, monkeypatch, fn))
    assert node == _NODE and func == _FUNCTION, (node, func)
    return fast, slow



class _Sub(torch.Tensor):
    pass


# (x shape, number of normalized dims): rows of a vector-width multiple and not, one row, no
# rows, and a 4-d x normalized over its last two dims (views in the node)
_SHAPES = [((4, 64), 1), ((3, 37), 1), ((1, 768), 1), ((0, 8), 1), ((2, 3, 4, 5), 2),
           ((2, 5, 6), 1)]
_DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
# which operands need a gradient: every subset the node's edge numbering can shift
_GRADS = ["all", "x", "weight", "bias", "residual", "weight+bias"]


def _norm_case(kind, shape, ndim, dtype, affine, grads, p, prenorm, loss):
    """A function running one fused norm call with autograd and returning its outputs, the
    gradients of the operands that need one, and y's grad_fn type."""
    row = shape[-ndim:]
    x, r = _data(shape, dtype, 1), _data(shape, dtype, 2)
    w, b = _data(row, dtype, 3), _data(row, dtype, 4)
    dy, dh = _data(shape, dtype, 5), _data(shape, dtype, 6)

    def run():
        ins = {"x": x.clone(), "residual": r.clone() if kind == "dropout_add" else None,
               "weight": w.clone() if affine in ("w", "wb") else None,
               "bias": b.clone() if affine == "wb" else None}
        for name, t in ins.items():
            if t is not None and (grads == "all" or name in grads.split("+")):
                t.requires_grad_()
        if not any(t is not None and t.requires_grad for t in ins.values()):
            ins["x"].requires_grad_()
        if kind == "layer_norm":
            y, h = F.layer_norm(ins["x"], row, ins["weight"], ins["bias"], 1e-5), None
        elif kind == "rms_norm":
            y, h = F.rms_norm(ins["x"], row, ins["weight"], 1e-6), None
        else:
            out = F.dropout_add_layer_norm(ins["x"], ins["residual"], ins["weight"], ins["bias"],
                                           p=p, eps=1e-5, prenorm=prenorm, rms=ndim == 1 and p == 0,
                                           seed=17)
            y, h = out if prenorm else (out, None)
        outs, grad_outs = [], []
        if loss in ("y", "y+h") or h is None:
            outs.append(y), grad_outs.append(dy)
        if h is not None and loss in ("h", "y+h"):
            outs.append(h), grad_outs.append(dh.to(h.dtype))
        wanted = [t for t in ins.values() if t is not None and t.requires_grad]
        g = torch.autograd.grad(outs, wanted, grad_outs, allow_unused=True)
        return [y, h, *g], type(y.grad_fn).__name__
    return run


@pytest.mark.parametrize("shape,ndim", _SHAPES)
@pytest.mark.parametrize("dtype", _DTYPES)
@pytest.mark.parametrize("kind", ["layer_norm", "rms_norm"])
@pytest.mark.parametrize("affine", ["none", "w", "wb"])
def test_norms_through_the_node_equal_the_function(monkeypatch, shape, ndim, dtype, kind, affine):
    if kind == "rms_norm" and affine == "wb":
        affine = "w"
    for grads in ["all", "x", "weight", "bias"]:
        run = _norm_case(kind, shape, ndim, dtype, affine, grads, 0.0, False, "y")
        fast, slow = _both(monkeypatch, run)
        assert _same(fast, slow), (grads, fast, slow)


@pytest.mark.parametrize("shape,ndim", [s for s in _SHAPES if s[0] != (1, 768)])
@pytest.mark.parametrize("dtype", _DTYPES)
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_dropout_add_layer_norm_through_the_node_equals_the_function(monkeypatch, shape, ndim,
                                                                     dtype, p):
    for affine, grads, prenorm, loss in itertools.product(["none", "wb"], _GRADS, [False, True],
                                                          ["y", "h", "y+h"]):
        if loss != "y" and not prenorm:
            continue
        run = _norm_case("dropout_add", shape, ndim, dtype, affine, grads, p, prenorm, loss)
        fast, slow = _both(monkeypatch, run)
        assert _same(fast, slow), (affine, grads, prenorm, loss)


@pytest.mark.parametrize("x_dtype,residual_dtype,residual_in_fp32", [
    (torch.bfloat16, torch.float32, False),   # the residual stream in float32
    (torch.float16, torch.float16, True),     # h cast to float32
    (torch.bfloat16, torch.bfloat16, True),
])
def test_mixed_residual_dtypes_through_the_node(monkeypatch, x_dtype, residual_dtype,
                                               residual_in_fp32):
    x, r = _data((5, 48), x_dtype, 1), _data((5, 48), residual_dtype, 2)
    w, b = _data((48,), x_dtype, 3), _data((48,), x_dtype, 4)

    def run():
        ins = [t.clone().requires_grad_() for t in (x, r, w, b)]
        y, h = F.dropout_add_layer_norm(*ins, p=0.2, prenorm=True,
                                        residual_in_fp32=residual_in_fp32, seed=3)
        loss = y.float().square().sum() + h.float().sin().sum()
        return [y, h, *torch.autograd.grad(loss, ins)], type(y.grad_fn).__name__

    fast, slow = _both(monkeypatch, run)
    assert _same(fast, slow)
    assert fast[1].dtype == (torch.float32 if residual_in_fp32 else residual_dtype)
    assert fast[3].dtype == residual_dtype  # grad of the residual in its own dtype


def test_parameters_and_backward_into_dot_grad(monkeypatch):
    """nn modules: Parameters as weight and bias, .backward() accumulating into .grad."""
    x = _data((6, 40), torch.float32, 1)

    def run():
        torch.manual_seed(0)
        ln, rms = torch.nn.LayerNorm(40), fusedreg.nn.RMSNorm(40)
        with torch.no_grad():
            ln.weight.mul_(1.5), ln.bias.add_(0.25), rms.weight.mul_(0.5)
        xs = x.clone().requires_grad_()
        y = F.layer_norm(xs, (40,), ln.weight, ln.bias)
        z = rms(y)
        (y.sum() + z.square().sum()).backward()
        return [y, z, xs.grad, ln.weight.grad, ln.bias.grad, rms.weight.grad], \
            type(y.grad_fn).__name__

    fast, slow = _both(monkeypatch, run)
    assert _same(fast, slow)


@pytest.mark.parametrize("kind", ["layer_norm", "dropout_add_prenorm"])
def test_double_backward_through_the_node(monkeypatch, kind):
    """create_graph=True: the node's backward calls the Function's differentiable backward, so
    the first and second gradients are the Function's, bit for bit."""
    shape = (3, 4, 6)
    x, r = _data(shape, torch.float64, 1), _data(shape, torch.float64, 2)
    w, b = _data((4, 6), torch.float64, 3), _data((4, 6), torch.float64, 4)

    def second_order():
        if kind == "layer_norm":
            ins = [t.clone().requires_grad_() for t in (x, w, b)]
            y = F.layer_norm(ins[0], (4, 6), ins[1], ins[2])
            loss = y.square().sum()
        else:
            ins = [t.clone().requires_grad_() for t in (x, r, w, b)]
            y, h = F.dropout_add_layer_norm(*ins, p=0.25, prenorm=True, seed=5)
            loss = y.square().sum() + h.sin().sum()
        g = torch.autograd.grad(loss, ins, create_graph=True)
        gg = torch.autograd.grad(sum(t.square().sum() for t in g), ins, allow_unused=True)
        return [y, *g, *gg], type(y.grad_fn).__name__

    fast, slow = _both(monkeypatch, second_order)
    assert _same(fast, slow)


def test_gradgradcheck_through_the_node():
    x = _data((3, 7), torch.float64, 1).requires_grad_()
    r = _data((3, 7), torch.float64, 2).requires_grad_()
    w = _data((7,), torch.float64, 3).requires_grad_()
    b = _data((7,), torch.float64, 4).requires_grad_()
    with fusedreg.use_backend("cpu"):
        assert type(F.layer_norm(x, (7,), w, b).grad_fn).__name__ == _NODE
        assert torch.autograd.gradcheck(lambda *t: F.layer_norm(t[0], (7,), *t[1:]), (x, w, b))
        assert torch.autograd.gradgradcheck(lambda *t: F.rms_norm(t[0], (7,), t[1]), (x, w))

        def prenorm(x, r, w, b):
            return F.dropout_add_layer_norm(x, r, w, b, p=0.3, prenorm=True, seed=8)
        assert torch.autograd.gradcheck(prenorm, (x, r, w, b))
        assert torch.autograd.gradgradcheck(prenorm, (x, r, w, b))


def test_saved_tensors_and_graph_rules(monkeypatch):
    """The node saves what the Function saves (saved-tensor hooks, as activation
    checkpointing uses, see the same tensors), frees them after a backward, and a second
    backward through it raises."""
    x, w = _data((4, 16), torch.float32, 1), _data((16,), torch.float32, 2)

    def run():
        xs, ws = x.clone().requires_grad_(), w.clone().requires_grad_()
        packed = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: packed.append(t) or t,
                                                      lambda t: t):
            y = F.layer_norm(xs, (16,), ws)
            y2, h = F.dropout_add_layer_norm(xs, xs, ws, None, p=0.5, prenorm=True, seed=4)
        y.sum().backward()
        with pytest.raises(RuntimeError, match="backward through the graph a second time"):
            y.sum().backward()
        (y2.sum() + h.sum()).backward()
        shapes = [(tuple(t.shape), t.dtype) for t in packed]
        return [xs.grad, ws.grad, shapes], type(y.grad_fn).__name__

    fast, slow = _both(monkeypatch, run)
    assert _same(fast[:2], slow[:2]) and fast[2] == slow[2]


def test_declines_under_modes_subclasses_and_other_kernels():
    """Where the Function's path would not go straight to the CPU kernels the node declines
    and the Function runs, with the same results."""
    from fusedreg.ops import layer_norm as ln
    x, w = _data((3, 24), torch.float32, 1), _data((24,), torch.float32, 2)

    def run(ctx=None, sub=False):
        xs = x.clone()
        if sub:
            xs = xs.as_subclass(_Sub)
        xs.requires_grad_()
        ws = w.clone().requires_grad_()
        with fusedreg.use_backend("cpu"):
            if ctx is None:
                y = F.layer_norm(xs, (24,), ws)
                g = torch.autograd.grad(y, (xs, ws), torch.ones_like(y))
            else:
                with ctx:
                    y = F.layer_norm(xs, (24,), ws)
                    g = torch.autograd.grad(y, (xs, ws), torch.ones_like(y))
        fn = y.grad_fn
        if sub:  # the subclass's __torch_function__ returns an alias of the call's result
            assert type(fn).__name__ == "AliasBackward0"
            fn = fn.next_functions[0][0]
        return [y.as_subclass(torch.Tensor), *(t.as_subclass(torch.Tensor) for t in g)], \
            type(fn).__name__

    base, name = run()
    assert name == _NODE
    for ctx, sub in [(PassThroughDispatchMode(), False), (None, True)]:
        out, name = run(ctx, sub)
        assert name == _FUNCTION and _same(out, base), (ctx, sub)
    # a torch-function mode sees fusedreg's functional itself, which then runs without it
    # (the node may serve it); the node declines a call made under one
    out, name = run(PassThroughFunctionMode())
    assert _same(out, base)
    # kernels registered in place of the built-in ones: the Function calls them
    impl, calls = backends.implementation("layer_norm", "cpu"), []

    def fwd(*args):
        calls.append(1)
        return impl.fwd(*args)
    backends.register("layer_norm", "cpu", type(impl)(fwd, impl.bwd))
    try:
        out, name = run()
    finally:
        backends.register("layer_norm", "cpu", impl)
    assert name == _FUNCTION and calls == [1] and _same(out, base)
    assert ln.apply is not None and run()[1] == _NODE  # the built-in ones again: the node


def test_node_declines_bad_configs_and_the_function_raises():
    import fusedreg._C as C
    from fusedreg.ops.layer_norm import LayerNormConfig, apply
    from fusedreg._seed import unused_seed
    x = _data((2, 8), torch.float32, 1).requires_grad_()
    seed = unused_seed()
    good = (x, None, None, None, seed, 1, 1e-5, 0.0, False, torch.float32, False)
    assert C.layer_norm_train(*good) is not None
    for i, bad in [(5, 0), (5, 3), (5, True), (6, float("inf")), (6, float("nan")), (7, 1.5),
                   (7, -0.1), (7, 0), (9, torch.int64), (9, torch.float8_e4m3fn), (0, x.detach().numpy())]:
        args = list(good)
        args[i] = bad
        assert C.layer_norm_train(*args) is None, (i, bad)
    assert C.layer_norm_train(*good[:10]) is None
    for mode in (PassThroughDispatchMode(), PassThroughFunctionMode()):
        with mode:
            assert C.layer_norm_train(*good) is None
    for cfg, match in [(LayerNormConfig(3, 1e-5, 0.0, False, torch.float32, False, "cpu"), "ndim"),
                       (LayerNormConfig(1, float("nan"), 0.0, False, torch.float32, False, "cpu"),
                        "eps"),
                       (LayerNormConfig(1, 1e-5, 2.0, False, torch.float32, False, "cpu"), "p"),
                       (LayerNormConfig(1, 1e-5, 0.0, False, torch.int32, False, "cpu"),
                        "h_dtype")]:
        with pytest.raises((ValueError, TypeError), match=match):
            apply(x, None, None, None, seed, cfg)


def test_torch_func_does_not_reach_the_node():
    """torch.func transforms take the differentiable composite (fusedreg.functional), whose
    gradients agree with the node's within rounding."""
    x, w, b = _data((4, 32), torch.float64, 1), _data((32,), torch.float64, 2), \
        _data((32,), torch.float64, 3)
    with fusedreg.use_backend("cpu"):
        g_func = torch.func.grad(lambda x, w: F.layer_norm(x, (32,), w, b).sin().sum(),
                                 argnums=(0, 1))(x, w)
        xs, ws = x.clone().requires_grad_(), w.clone().requires_grad_()
        y = F.layer_norm(xs, (32,), ws, b)
        assert type(y.grad_fn).__name__ == _NODE
        g_node = torch.autograd.grad(y.sin().sum(), (xs, ws))
    for a, c in zip(g_func, g_node):
        torch.testing.assert_close(a, c, rtol=1e-12, atol=1e-12)


# ---- the plain norm's fused call from C++ (fusedreg._C.torch_norm given the seed) -------------

@pytest.mark.parametrize("shape", [(4, 64), (3, 37), (1, 768), (0, 8), (2, 5, 6), (7,)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("grad", [False, True])
def test_plain_norms_from_cpp_equal_the_python_path(monkeypatch, shape, dtype, grad):
    """F.layer_norm / F.rms_norm of float32/float64 x over its last dim reach the fused call
    from C++ (the kernel without autograd, or the node): what the Python checks and routing
    give, bit for bit, non-contiguous x included."""
    n = shape[-1]
    x, w, b = _data(shape, dtype, 1), _data((n,), dtype, 2), _data((n,), dtype, 3)
    xt = _data(shape[::-1], dtype, 4).transpose(0, -1) if len(shape) > 1 else x
    dy = _data(shape, dtype, 5)
    calls = [lambda x, w, b: F.layer_norm(x, (n,), w, b), lambda x, w, b: F.layer_norm(x, [n]),
             lambda x, w, b: F.layer_norm(x, (n,), w, None, 1e-3),
             lambda x, w, b: F.rms_norm(x, (n,), w), lambda x, w, b: F.rms_norm(x, (n,), None, 0.0)]

    def run():
        out, names = [], []
        for call in calls:
            for xin in (x, xt):
                ins = [t.clone().requires_grad_(grad) for t in (xin, w, b)]
                y = call(*ins)
                out.append(y)
                if grad:
                    out += [g for g in torch.autograd.grad(y, ins, dy, allow_unused=True)]
                names.append(type(y.grad_fn).__name__)
        return out, names

    (fast, fast_names), (slow, slow_names) = (_through(True, monkeypatch, run),
                                              _through(False, monkeypatch, run))
    assert all(_same(a, c) for a, c in zip(fast, slow)) and len(fast) == len(slow)
    if grad:
        assert set(fast_names) == {_NODE} and set(slow_names) == {_FUNCTION}


def test_plain_norms_from_cpp_under_auto_from_the_limit_up(monkeypatch):
    """Under auto the C++ call serves torch's op below AUTO_TORCH_BELOW's limit and the fused
    call from it; the limit is read at call time."""
    from fusedreg.ops import layer_norm as ln
    x, w = _data((4, 16), torch.float32, 1), _data((16,), torch.float32, 2)
    with fusedreg.use_backend("auto"):
        for norm, call in [("layer_norm", lambda x: F.layer_norm(x, (16,), w)),
                           ("rms_norm", lambda x: F.rms_norm(x, (16,), w))]:
            monkeypatch.setitem(backends.AUTO_TORCH_BELOW, norm, {"cpu": (65, 65)})
            y = call(x.clone().requires_grad_())
            assert type(y.grad_fn).__name__ not in (_NODE, _FUNCTION)      # torch's op
            monkeypatch.setitem(backends.AUTO_TORCH_BELOW, norm, {"cpu": (64, 64)})
            y = call(x.clone().requires_grad_())
            assert type(y.grad_fn).__name__ == _NODE                       # the fused call
            with fusedreg.use_backend("cpu"):
                ref = call(x.clone().requires_grad_())
            assert _same(y, ref)
            with monkeypatch.context() as m:  # without the node: the Python path's Function
                m.setattr(ln, "_CPU_NODE", None)
                assert type(call(x.clone().requires_grad_()).grad_fn).__name__ == _FUNCTION


@pytest.mark.parametrize("shape", [(4, 64), (3, 37), (1, 768), (2, 5, 6)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("grad", [False, True])
def test_half_layer_norm_from_cpp_equals_the_python_path(monkeypatch, shape, dtype, grad):
    """A float16/bfloat16 F.layer_norm with weight and bias None or of x's dtype reaches the
    fused call from C++ as float32 does (the cpu backend named, and under auto from the
    "layer_norm_half" limit up): the Python path's bits, gradients included, and _norm never
    runs; with float32 weight and bias (the mixed rule) the Python path serves it."""
    n = shape[-1]
    x = _data(shape, dtype, 1)
    xt = _data(shape[::-1], dtype, 4).transpose(0, -1) if len(shape) > 1 else x
    dy = _data(shape, dtype, 5)
    python_calls = []
    norm = F._norm

    def counted(*args, **kwargs):
        python_calls.append(args[0].shape)
        return norm(*args, **kwargs)

    monkeypatch.setattr(F, "_norm", counted)

    def run(wdt):
        w, b = _data((n,), wdt, 2), _data((n,), wdt, 3)
        out = []
        for xin in (x, xt):
            for call in (lambda x, w, b: F.layer_norm(x, (n,), w, b),
                         lambda x, w, b: F.layer_norm(x, [n], None, None, 1e-3)):
                ins = [t.clone().requires_grad_(grad) for t in (xin, w, b)]
                y = call(*ins)
                out.append(y)
                if grad:
                    out += list(torch.autograd.grad(y, ins, dy, allow_unused=True))
                    assert type(y.grad_fn).__name__ == _NODE
        return out

    with fusedreg.use_backend("cpu"):
        fast = run(dtype)
        assert python_calls == []  # the C++ call served every one
        with monkeypatch.context() as m:
            m.setattr(F, "_torch_norm", None)
            slow = run(dtype)
        assert len(python_calls) == 4
        assert all(_same(a, c) for a, c in zip(fast, slow)) and len(fast) == len(slow)
        python_calls.clear()
        run(torch.float32)
        assert len(python_calls) == 2  # the calls with float32 weight and bias
    python_calls.clear()
    monkeypatch.setitem(backends.AUTO_TORCH_BELOW, "layer_norm_half", {"cpu": (1, 1)})
    with fusedreg.use_backend("auto"):
        assert _same(run(dtype), fast) and python_calls == []


def test_plain_norms_from_cpp_leave_bad_input_to_the_checks(monkeypatch):
    """What the fused call from C++ does not take it declines, and the Python checks raise
    fusedreg's errors as without it."""
    x = _data((3, 8), torch.float32, 1)
    bad = [
        (lambda: F.layer_norm(x, (8,), torch.ones(7)), ValueError),
        (lambda: F.layer_norm(x, (7,)), ValueError),
        (lambda: F.layer_norm(x, (8,), torch.ones(8, dtype=torch.float64)), TypeError),
        (lambda: F.layer_norm(x, (8,), torch.ones(8), torch.ones(8, dtype=torch.float64)),
         TypeError),
        (lambda: F.layer_norm(x, (8,), torch.ones(2, 4)), ValueError),
        (lambda: F.rms_norm(x, (8,), torch.ones(9)), ValueError),
        (lambda: F.layer_norm(x, (8,), eps=float("nan")), ValueError),
        (lambda: F.layer_norm(x.to(torch.int32), (8,)), TypeError),
        (lambda: F.layer_norm(x, (0,)), ValueError),
    ]
    for node_on in (True, False):
        for call, err in bad:
            with pytest.raises(err):
                _through(node_on, monkeypatch, call)
