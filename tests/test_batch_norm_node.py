"""fusedreg._C.batch_norm_train / batch_norm_eval (csrc/ops.cpp: BatchNormNode): the cpu
backend's local training BatchNorm without dropout as a C++ autograd node (with the
running-stat update), and its eval call without autograd. They must give what the Python path
(BatchNormFunction, fusedreg.functional._update_running, the eval ops) gives, bit for bit —
outputs and their layout, running stats, gradients for every subset of operands that need
one, second-order gradients — and decline (None: the Python path runs, and raises its errors)
wherever that path would not go straight to the CPU kernels or its checks own the call."""
import itertools
import math

import pytest
import torch
import torch.nn.functional as TF

import fusedreg
from fusedreg import backends
from fusedreg import functional as F
from fusedreg.nn import BatchNorm2d

from _helpers import PassThroughDispatchMode, PassThroughFunctionMode

pytestmark = pytest.mark.skipif(not backends.extension_available(),
                                reason="the node is the C++ extension's")

_NODE, _FUNCTION = "CppFunction", "BatchNormFunctionBackward"


def _data(shape, dtype, seed, offset=0.5):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=torch.float64) * 2 + offset).to(dtype)


def _strides(t):
    """t's strides over its dims of more than one element (the others' strides are free)."""
    return tuple(s for s, n in zip(t.stride(), t.shape) if n > 1)


def _same(a, b):
    if a is None or b is None:
        return a is None and b is None
    if isinstance(a, torch.Tensor):
        return (a.dtype == b.dtype and a.shape == b.shape and _strides(a) == _strides(b)
                and torch.equal(a, b))
    return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))


def _through(node_on, monkeypatch, fn):
    """fn() under the cpu backend with the C++ calls serving BatchNorm (node_on) or the
    Python path doing so."""
    with monkeypatch.context() as m:
        if not node_on:
            m.setattr(F, "_BN_TRAIN", None)
            m.setattr(F, "_BN_EVAL", None)
        with fusedreg.use_backend("cpu"):
            return fn()


def _both(monkeypatch, fn):
    """fn()'s results through the C++ calls and through the Python path: fn returns (results,
    y's grad_fn type name), and with a backward each path must have run."""
    (fast, node), (slow, func) = (_through(True, monkeypatch, fn), _through(False, monkeypatch, fn))
    if node is not None or func is not None:
        assert node == _NODE and func == _FUNCTION, (node, func)
    return fast, slow


_CL = {4: torch.channels_last, 5: torch.channels_last_3d}
# (shape, layout): NCHW and channels-last maps, 3-d and 2-d inputs, one value per (n, c)
# (stored channels-last), a 5-d input, a map of 14x14 (rows not a vector multiple) and a
# non-contiguous (transposed) x, which the node copies into storage
_LAYOUTS = [((4, 6, 5, 3), "c"), ((4, 6, 5, 3), "cl"), ((3, 5, 14, 14), "c"), ((5, 7, 9), "c"),
            ((6, 5), "c"), ((3, 4, 1, 1), "c"), ((2, 3, 2, 3, 2), "cl"), ((4, 6, 5, 3), "t")]
_DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
# which operands need a gradient: every subset the node's edge numbering can shift
_GRADS = ["all", "x", "weight", "bias", "residual", "weight+bias"]


def _input(shape, layout, dtype, seed, offset=0.5):
    t = _data(shape, dtype, seed, offset)
    if layout == "cl":
        return t.contiguous(memory_format=_CL[len(shape)])
    if layout == "t":
        return t.transpose(2, 3)
    return t


def _bn_case(shape, layout, dtype, act, residual, affine, grads, stats, module=False):
    """A function running one training BatchNorm call with autograd (or none: grads None)
    and returning its output, the running stats, the gradients of the operands that need one,
    and y's grad_fn type."""
    x = _input(shape, layout, dtype, 1, 3.0)
    C = x.shape[1]
    ct = torch.float64 if dtype is torch.float64 else torch.float32
    r = _input(shape, layout, dtype, 2, -1.0)
    w, b = _data((C,), ct, 3, 1.0), _data((C,), ct, 4)
    rm0, rv0 = _data((C,), ct, 5), _data((C,), ct, 6, 2.0).abs()
    dy = _input(x.shape, "c", dtype, 7)

    def run():
        ins = {"x": x.clone(memory_format=torch.preserve_format),
               "residual": r.clone(memory_format=torch.preserve_format) if residual else None,
               "weight": w.clone() if affine else None, "bias": b.clone() if affine else None}
        if layout == "t":
            ins["x"] = x.transpose(2, 3).clone().transpose(2, 3)
        names = [] if grads is None else [k for k in ins if ins[k] is not None and (
            grads == "all" or k in grads.split("+"))]
        for k in names:
            ins[k].requires_grad_()
        rm, rv = (rm0.clone(), rv0.clone()) if stats else (None, None)
        if module:
            m = BatchNorm2d(C, momentum=None, affine=affine, track_running_stats=stats).to(ct)
            if affine:
                m.weight.data.copy_(w)
                m.bias.data.copy_(b)
            y = m(ins["x"])
            bufs = [m.running_mean, m.running_var, m.num_batches_tracked] if stats else []
            params = [m.weight, m.bias] if affine else []
            g = torch.autograd.grad(y, [ins["x"], *params], dy)
            return [y, *bufs, *g], type(y.grad_fn).__name__
        y = F.batch_norm_act(ins["x"], rm, rv, ins["weight"], ins["bias"], True, 0.1, 1e-5,
                             activation=act, residual=ins["residual"])
        out = [y, rm, rv]
        if names:
            g = torch.autograd.grad(y, [ins[k] for k in names], dy)
            # without an activation grad_residual is dy itself: the node passes it on as it
            # came (as torch's composite's add does), the Python path in the storage layout
            # (a copy): the same values, strides that may differ
            out += [t.contiguous() if k == "residual" and act is None else t
                    for k, t in zip(names, g)]
            return out, type(y.grad_fn).__name__
        return out, None
    return run


@pytest.mark.parametrize("shape,layout", _LAYOUTS)
@pytest.mark.parametrize("dtype", _DTYPES)
@pytest.mark.parametrize("act,residual", [(None, False), ("relu", True), ("silu", False)])
def test_training_through_the_node_equals_the_python_path(monkeypatch, shape, layout, dtype, act,
                                                          residual):
    for grads, affine, stats in [("all", True, True), ("x", True, False), (None, True, True),
                                 ("all", False, True)]:
        fast, slow = _both(monkeypatch, _bn_case(shape, layout, dtype, act, residual, affine,
                                                 grads, stats))
        assert _same(fast, slow), (grads, affine, stats)


@pytest.mark.parametrize("grads", _GRADS)
@pytest.mark.parametrize("act,residual", [(None, True), ("gelu", True), ("relu", False)])
def test_every_subset_of_gradients(monkeypatch, grads, act, residual):
    for shape, layout in [((4, 6, 5, 3), "c"), ((4, 6, 5, 3), "cl")]:
        fast, slow = _both(monkeypatch, _bn_case(shape, layout, torch.float32, act, residual,
                                                 True, grads, True))
        assert _same(fast, slow), (shape, layout)


@pytest.mark.parametrize("affine,stats", [(True, True), (False, True), (True, False)])
def test_module_through_the_node(monkeypatch, affine, stats):
    """fusedreg.nn.BatchNorm2d in training (momentum=None: the cumulative average;
    track_running_stats=False: batch statistics, no buffers written): output, buffers,
    num_batches_tracked and gradients equal the Python path's over three steps."""
    for layout in ("c", "cl"):
        fast, slow = _both(monkeypatch, _bn_case((4, 6, 5, 3), layout, torch.float32, None,
                                                 False, affine, "all", stats, module=True))
        assert _same(fast, slow), layout


def test_output_modified_in_place_and_saved_inputs():
    """ResNet's inplace ReLU and residual add on the node's output are ordinary in-place ops
    (y is not a view of the kernel's storage tensor): the gradients are torch's to
    rounding. An input modified in place after the forward makes the backward raise, as
    torch's does."""
    x0, w0, b0 = _data((4, 6, 5, 3), torch.float64, 1, 3.0), _data((6,), torch.float64, 2), \
        _data((6,), torch.float64, 3)
    idn = _data((4, 6, 5, 3), torch.float64, 4)
    res = []
    for fn in (F.batch_norm, torch.nn.functional.batch_norm):
        x, w, b = (t.clone().requires_grad_() for t in (x0, w0, b0))
        with fusedreg.use_backend("cpu"):
            y = fn(x, None, None, w, b, True)
        if fn is F.batch_norm:
            assert type(y.grad_fn).__name__ == _NODE
        y += idn
        torch.relu_(y)
        res.append(torch.autograd.grad(y.sum(), (x, w, b)))
    for a, c in zip(*res):
        torch.testing.assert_close(a, c, rtol=1e-10, atol=1e-10)
    x, w = x0.clone().requires_grad_(), w0.clone().requires_grad_()
    with fusedreg.use_backend("cpu"):
        y = F.batch_norm(x, None, None, w, None, True)
    with torch.no_grad():
        x.add_(1.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()


@pytest.mark.parametrize("layout", ["c", "cl"])
def test_double_backward_through_the_node(monkeypatch, layout):
    """create_graph=True: the node's backward is the differentiable composite (reaching x,
    the residual and the weight): the same first-order values as without it, and the
    second-order gradients the Python path's."""
    def run():
        x = _input((4, 3, 2, 3), layout, torch.float64, 1, 2.0).requires_grad_()
        r = _input((4, 3, 2, 3), layout, torch.float64, 2).requires_grad_()
        w, b = (_data((3,), torch.float64, s).requires_grad_() for s in (3, 4))
        y = F.batch_norm_act(x, None, None, w, b, True, activation="silu", residual=r)
        dy = _data(y.shape, torch.float64, 5)
        g1 = torch.autograd.grad(y, (x, r, w, b), dy, create_graph=True)
        plain = torch.autograd.grad(y, (x, r, w, b), dy, retain_graph=True)
        g2 = torch.autograd.grad(sum((g * g).sum() for g in g1), (x, r, w, b))
        for a, c in zip(g1, plain):
            torch.testing.assert_close(a, c, rtol=1e-10, atol=1e-12)
        return [*plain, *g2], type(y.grad_fn).__name__
    fast, slow = _both(monkeypatch, run)
    assert _same(fast[:4], slow[:4])
    for a, c in zip(fast[4:], slow[4:]):  # the same composite, so equal to rounding
        torch.testing.assert_close(a, c, rtol=1e-12, atol=1e-12)


def test_gradgradcheck_through_the_node():
    x = _data((4, 2, 3), torch.float64, 1, 1.0).requires_grad_()
    w, b = (_data((2,), torch.float64, s).requires_grad_() for s in (2, 3))
    with fusedreg.use_backend("cpu"):
        assert type(F.batch_norm(x, None, None, w, b, True).grad_fn).__name__ == _NODE
        assert torch.autograd.gradgradcheck(
            lambda x, w, b: F.batch_norm_act(x, None, None, w, b, True, activation="silu"),
            (x, w, b))


@pytest.mark.parametrize("shape,layout", [((4, 6, 5, 3), "c"), ((4, 6, 5, 3), "cl"),
                                          ((6, 5), "c"), ((4, 6, 5, 3), "t")])
@pytest.mark.parametrize("dtype", _DTYPES)
def test_eval_from_cpp_equals_the_python_path(monkeypatch, shape, layout, dtype):
    x = _input(shape, layout, dtype, 1, 3.0)
    C = x.shape[1]
    ct = torch.float64 if dtype is torch.float64 else torch.float32
    rm, rv, w, b = _data((C,), ct, 2), _data((C,), ct, 3, 2.0).abs(), _data((C,), ct, 4), \
        _data((C,), ct, 5)

    def run():
        with torch.no_grad():
            return [F.batch_norm(x, rm, rv, w, b, False, 0.1, 1e-5),
                    F.batch_norm(x, rm, rv, None, None, False, 0.1, 1e-3)], None
    fast, slow = _both(monkeypatch, run)
    assert _same(fast, slow)


@pytest.mark.parametrize("x_dtype,stats", [(torch.float32, "f32"), (torch.bfloat16, "x"),
                                           (torch.float16, "x"), (torch.bfloat16, "f32"),
                                           (torch.float32, "strided")])
@pytest.mark.parametrize("grad", [False, True])
def test_eval_vectors_over_many_magnitudes_equal_the_python_path(monkeypatch, x_dtype, stats, grad):
    """The C++ eval call makes its float32 vectors (running stats and parameters widened,
    invstd = 1 / sqrt(var + float(eps))) in one loop instead of torch's to(), add and rsqrt:
    over 4096 channels whose variances span 0, subnormals, 1e-12 to 1e6, the largest float,
    inf, NaN and a negative value (and means with inf and NaN), and eps from 1e-12 to 0.5,
    y (and the gradients) are bit for bit the Python path's, NaN where it has NaN. Strided
    running stats take the op path instead."""
    C = 4096
    g = torch.Generator().manual_seed(11)
    sd = x_dtype if stats == "x" else torch.float32
    rv = torch.pow(10.0, torch.empty(C, dtype=torch.float64).uniform_(-12, 6, generator=g))
    # 0, subnormals, the largest float, inf, a negative variance and NaN (invstd inf, 0, NaN)
    rv[:7] = torch.tensor([0.0, 1e-45, 1e-39, 3.4e38, math.inf, -1.0, math.nan])
    rv = rv.to(sd)
    rm = _data((C,), sd, 7, 5.0)
    rm[7:9] = torch.tensor([math.inf, math.nan])
    if stats == "strided":
        rv, rm = torch.stack([rv, rv], 1)[:, 0], torch.stack([rm, rm], 1)[:, 0]
        assert not rv.is_contiguous()
    w, b = _data((C,), x_dtype, 8, 1.0), _data((C,), x_dtype, 9)
    x = _data((3, C), x_dtype, 10, 2.0).requires_grad_(grad)
    dy = _data((3, C), x_dtype, 12)

    def run():
        out = []
        for eps in (1e-12, 1e-5, 1e-3, 0.1, 0.5):
            if grad:
                xg, wg, bg = (t.detach().requires_grad_() for t in (x, w, b))
                y = F.batch_norm(xg, rm, rv, wg, bg, False, 0.1, eps)
                out += [y.detach(), *torch.autograd.grad(y, (xg, wg, bg), dy)]
            else:
                with torch.no_grad():
                    out.append(F.batch_norm(x, rm, rv, w, b, False, 0.1, eps))
        return out, (type(y.grad_fn).__name__ if grad else None)
    fast, slow = _both(monkeypatch, run)
    assert len(fast) == len(slow)
    for a, c in zip(fast, slow):  # NaN where the other has NaN, else the same bits
        assert a.dtype == c.dtype and a.shape == c.shape
        assert torch.equal(a.isnan(), c.isnan())
        assert torch.equal(a.nan_to_num(0.0, 0.0, 0.0), c.nan_to_num(0.0, 0.0, 0.0))
        assert torch.equal(a.isinf(), c.isinf())
    assert fast[0].isnan().any() and fast[0].isinf().any()  # the special values reached y


def test_declines_under_modes_subclasses_and_other_kernels():
    """Where the Python path would not go straight to the CPU kernels the C++ calls decline and
    it runs, with the same results."""
    class Sub(torch.Tensor):
        pass

    x0, w0 = _data((4, 6, 5), torch.float32, 1, 2.0), _data((6,), torch.float32, 2)

    def run(ctx=None, sub=False):
        x = x0.clone()
        if sub:
            x = x.as_subclass(Sub)
        x.requires_grad_()
        w = w0.clone().requires_grad_()
        rm, rv = torch.zeros(6), torch.ones(6)
        with fusedreg.use_backend("cpu"), (ctx if ctx is not None else torch.enable_grad()):
            y = F.batch_norm(x, rm, rv, w, None, True)
            g = torch.autograd.grad(y, (x, w), torch.ones_like(y))
        fn = y.grad_fn
        if sub:  # the subclass's __torch_function__ returns an alias of the call's result
            fn = fn.next_functions[0][0]
        return [t.as_subclass(torch.Tensor) for t in (y, rm, rv, *g)], type(fn).__name__

    base, name = run()
    assert name == _NODE
    for ctx, sub in [(PassThroughDispatchMode(), False), (None, True)]:
        out, name = run(ctx, sub)
        assert name == _FUNCTION and _same(out, base), (ctx, sub)
    out, _ = run(PassThroughFunctionMode())
    assert _same(out, base)
    impl, calls = backends.implementation("batch_norm", "cpu"), []

    def fwd_ncs(*args):
        calls.append(1)
        return impl.fwd_ncs(*args)
    backends.register("batch_norm", "cpu", impl._replace(fwd_ncs=fwd_ncs))
    try:
        out, name = run()
    finally:
        backends.register("batch_norm", "cpu", impl)
    assert name == _FUNCTION and calls == [1] and _same(out, base)
    assert run()[1] == _NODE


def test_torch_func_does_not_reach_the_node():
    """torch.func transforms take the differentiable composite (the node declines under
    functorch's layers): grad equals autograd's through the node to rounding."""
    x = _data((4, 3, 5), torch.float64, 1, 2.0)
    w = _data((3,), torch.float64, 2)
    loss = lambda x, w: (F.batch_norm(x, None, None, w, None, True) ** 2).sum()  # noqa: E731
    with fusedreg.use_backend("cpu"):
        gx, gw = torch.func.grad(loss, argnums=(0, 1))(x, w)
        xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
        y = F.batch_norm(xr, None, None, wr, None, True)
        assert type(y.grad_fn).__name__ == _NODE
        ax, aw = torch.autograd.grad((y ** 2).sum(), (xr, wr))
    torch.testing.assert_close(gx, ax, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(gw, aw, rtol=1e-10, atol=1e-12)


_BAD = [  # (description, kwargs changes, error class, message)
    ("weight of the wrong length", {"w": torch.ones(5)}, ValueError, "should contain 6"),
    ("one value per channel", {"x": torch.randn(1, 6)}, ValueError, "more than 1 value"),
    ("running_var missing", {"rv": None}, ValueError, "both be None"),
    ("float16 weight", {"w": torch.ones(6, dtype=torch.float16)}, TypeError, "dtype"),
    ("residual of another shape", {"r": torch.randn(4, 6, 4)}, ValueError, "shape"),
    ("momentum None", {"momentum": None}, TypeError, "momentum"),
    ("eps 0 in training", {"eps": 0.0}, ValueError, "eps must be positive"),
]


@pytest.mark.parametrize("what,change,err,match", _BAD, ids=[c[0] for c in _BAD])
def test_bad_input_reaches_the_checks(what, change, err, match):
    """The C++ call declines what the Python checks own: fusedreg's error, before anything
    is written (the running stats are unchanged)."""
    args = {"x": torch.randn(4, 6, 5, requires_grad=True), "rm": torch.zeros(6),
            "rv": torch.ones(6), "w": torch.ones(6), "r": None, "momentum": 0.1, "eps": 1e-5}
    args.update(change)
    rm = args["rm"].clone() if args["rm"] is not None else None
    with fusedreg.use_backend("cpu"), pytest.raises(err, match=match):
        F.batch_norm_act(args["x"], args["rm"], args["rv"], args["w"], None, True,
                         args["momentum"], args["eps"], residual=args["r"])
    if rm is not None:
        assert torch.equal(args["rm"], rm)


def test_no_grad_training_call_updates_the_stats_like_torch():
    """A training call without autograd (statistics calibration) runs the forward alone and
    updates the running stats as torch does (to rounding: the unbiased variance and lerp)."""
    x = _data((8, 4, 6, 6), torch.float32, 1, 3.0)
    ours = [torch.zeros(4), torch.ones(4)]
    theirs = [torch.zeros(4), torch.ones(4)]
    with torch.no_grad(), fusedreg.use_backend("cpu"):
        y = F.batch_norm(x, *ours, None, None, True, 0.3)
    ref = torch.nn.functional.batch_norm(x, *theirs, None, None, True, 0.3)
    assert y.grad_fn is None
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    for a, c in zip(ours, theirs):
        torch.testing.assert_close(a, c, rtol=1e-6, atol=1e-6)


def test_node_parameters_combinations_cover_the_edges():
    """Every combination of present optional operands (residual, weight, bias) with every one
    of them needing a gradient in turn: the edge numbering of the node's inputs."""
    x0 = _data((3, 4, 5), torch.float32, 1, 1.0)
    for has in itertools.product((False, True), repeat=3):
        ops = {"x": x0, "residual": _data((3, 4, 5), torch.float32, 2) if has[0] else None,
               "weight": _data((4,), torch.float32, 3) if has[1] else None,
               "bias": _data((4,), torch.float32, 4) if has[2] else None}
        for need in [k for k, v in ops.items() if v is not None]:
            ins = {k: (v.clone().requires_grad_() if k == need else v) for k, v in ops.items()}
            with fusedreg.use_backend("cpu"):
                y = F.batch_norm_act(ins["x"], None, None, ins["weight"], ins["bias"], True,
                                     activation="relu", residual=ins["residual"])
            assert type(y.grad_fn).__name__ == _NODE
            (g,) = torch.autograd.grad(y, ins[need], torch.ones_like(y))
            ref = {k: (v.clone().requires_grad_() if k == need else v) for k, v in ops.items()}
            z = torch.nn.functional.batch_norm(ref["x"], None, None, ref["weight"], ref["bias"],
                                               True)
            if ref["residual"] is not None:
                z = z + ref["residual"]
            (h,) = torch.autograd.grad(torch.relu(z), ref[need], torch.ones_like(z))
            torch.testing.assert_close(g, h, rtol=1e-4, atol=1e-4, msg=f"{has} {need}")


def test_small_calls_under_auto_from_cpp():
    """fusedreg._C.torch_batch_norm (under auto, small calls): torch's batch_norm (+ residual,
    then each activation by its fusedreg::Activation code) through the dispatcher, the same values, running stats and gradients as torch's
    Python call; None (nothing written) from the limit up, for one value per channel in
    training, and for what the Python checks own."""
    from fusedreg._C import torch_batch_norm
    x0 = _data((4, 3, 5), torch.float32, 1, 2.0)
    r0 = _data((4, 3, 5), torch.float32, 2)
    w, b = _data((3,), torch.float32, 3), _data((3,), torch.float32, 4)
    acts = {0: lambda t: t, 1: torch.relu, 2: TF.gelu, 3: lambda t: TF.gelu(t, approximate="tanh"),
            4: TF.silu}
    for training, res, act in itertools.product((True, False), (False, True), acts):
        outs = []
        for ours in (True, False):
            x = x0.clone().requires_grad_()
            r = r0.clone().requires_grad_() if res else None
            rm, rv = torch.zeros(3), torch.ones(3)
            if ours:
                y = torch_batch_norm(x, rm, rv, w, b, training, 0.1, 1e-5, r, act, 61, 61)
            else:
                y = torch.batch_norm(x, w, b, rm, rv, training, 0.1, 1e-5, False)
                y = acts[act](y + r if res else y)
            g = torch.autograd.grad(y, [t for t in (x, r) if t is not None], torch.ones_like(y))
            outs.append([y, rm, rv, *g])
        for a, c in zip(*outs):
            torch.testing.assert_close(a, c, rtol=1e-6, atol=1e-6)
    rm = torch.zeros(3)
    declined = [
        (x0, rm, torch.ones(3), w, b, True, 0.1, 1e-5, None, False, 60, 60),   # at the limit
        (x0.requires_grad_(), rm, torch.ones(3), w, b, True, 0.1, 1e-5, None, False, 61, 60),
        (torch.randn(1, 3), rm, torch.ones(3), w, b, True, 0.1, 1e-5, None, False, 99, 99),
        (x0, rm, torch.ones(3), torch.ones(4), b, True, 0.1, 1e-5, None, False, 99, 99),
        (x0, rm, None, w, b, True, 0.1, 1e-5, None, False, 99, 99),
        (x0, rm, torch.ones(3), w, b, True, 0.1, 0.0, None, False, 99, 99),
        (x0, rm, torch.ones(3), w, b, True, 1, 1e-5, None, False, 99, 99),  # an int momentum
        (x0, rm, torch.ones(3), w, b, True, 0.1, 1e-5, torch.randn(4, 3, 4), False, 99, 99),
        (x0.double(), rm, torch.ones(3), w, b, True, 0.1, 1e-5, None, False, 99, 99),
        (x0, rm, torch.ones(3), w, b, True, 0.1, 1e-5, None, 5, 99, 99),  # no such activation
        (x0, rm, torch.ones(3), w, b, True, 0.1, 1e-5, None, -1, 99, 99),
    ]
    for args in declined:
        assert torch_batch_norm(*args) is None
        assert torch.equal(rm, torch.zeros(3))
    with PassThroughDispatchMode():
        assert torch_batch_norm(x0, rm, torch.ones(3), w, b, True, 0.1, 1e-5, None, False, 99,
                                99) is None


def _serving(monkeypatch, name):
    """Wraps fusedreg.functional's C++ call ``name`` ("_BN_TRAIN", "_BN_EVAL"): the list it
    returns records, per call, whether the C++ call served it (returned a tensor)."""
    real, served = getattr(F, name), []

    def call(*args):
        y = real(*args)
        served.append(y is not None)
        return y
    monkeypatch.setattr(F, name, call)
    return served


# (dtype of weight/bias, of the running stats): a float16/bfloat16 x takes either of its own
# dtype or float32, each pair independently (fusedreg's checks; torch's CPU op only all-or-none)
_HALF_VECTORS = [("x", "x"), ("x", "f32"), ("f32", "x")]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("layout", ["c", "cl"])
@pytest.mark.parametrize("vectors", _HALF_VECTORS, ids=["-".join(v) for v in _HALF_VECTORS])
@pytest.mark.parametrize("training", [True, False])
def test_half_vectors_without_grad_from_cpp_equal_the_python_path(monkeypatch, dtype, layout,
                                                                  vectors, training):
    """A no-grad call on a float16/bfloat16 x whose weight, bias or running stats are of x's
    dtype (a model converted with .to(dtype)) is served from C++ (the vectors converted to
    float32 as the Python path converts them; half running stats updated with its expression,
    r * (1 - m) + stat * m in float32 rounded to the buffer's dtype): y and the running stats
    bit for bit the Python path's, for several momenta (a cumulative average's 1 / n too) and
    running stats far from the batch's."""
    x = _input((4, 19, 5, 3), layout, dtype, 1, 3.0)
    C = x.shape[1]
    pd, sd = (dtype if v == "x" else torch.float32 for v in vectors)
    w, b = _data((C,), pd, 3, 1.0), _data((C,), pd, 4)
    rm0, rv0 = _data((C,), sd, 5, 40.0), _data((C,), sd, 6, 2.0).abs() * 300

    def run():
        rm, rv = rm0.clone(), rv0.clone()
        out = []
        with torch.no_grad():
            for momentum in (0.1, 1.0 / 3.0, 0.9):
                out.append(F.batch_norm(x, rm, rv, w, b, training, momentum, 1e-5))
                out += [rm.clone(), rv.clone()]
            out.append(F.batch_norm(x, rm, rv, None, None, training, 0.1, 1e-3))
        return out + [rm, rv], None
    served = _serving(monkeypatch, "_BN_TRAIN" if training else "_BN_EVAL")
    fast, slow = _both(monkeypatch, run)
    assert served and all(served), served
    assert _same(fast, slow)
    if training:  # the stats moved: the update ran
        assert not torch.equal(fast[-2], rm0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("layout", ["c", "cl"])
# the eval C++ call serves plain calls only
@pytest.mark.parametrize("training,act,residual", [(True, None, False), (True, "relu", True),
                                                   (False, None, False)])
@pytest.mark.parametrize("grads", ["all", "x", "weight", "bias", "weight+bias"])
def test_half_weight_with_grad_through_the_node(monkeypatch, dtype, layout, training, act,
                                                residual, grads):
    """A weight and bias of x's half dtype that need gradients (a model converted with
    .to(dtype), trained): the node takes float32 copies for the kernels and rounds the
    weight's and bias's gradients to their dtype, as the Python Function does — y, running
    stats and every gradient bit for bit the Python path's, in training and eval."""
    x0 = _input((4, 19, 5, 3), layout, dtype, 1, 3.0)
    r0 = _input((4, 19, 5, 3), layout, dtype, 2, -1.0)
    w0, b0 = _data((19,), dtype, 3, 1.0), _data((19,), dtype, 4)
    rm0, rv0 = _data((19,), dtype, 5), _data((19,), dtype, 6, 2.0).abs()
    dy = _input(x0.shape, "c", dtype, 7)

    def run():
        ins = {"x": x0.clone(memory_format=torch.preserve_format), "weight": w0.clone(),
               "bias": b0.clone()}
        names = [k for k in ins if grads == "all" or k in grads.split("+")]
        for k in names:
            ins[k].requires_grad_()
        rm, rv = rm0.clone(), rv0.clone()
        if act is None and not residual:
            y = F.batch_norm(ins["x"], rm, rv, ins["weight"], ins["bias"], training, 0.1, 1e-5)
        else:
            y = F.batch_norm_act(ins["x"], rm, rv, ins["weight"], ins["bias"], training, 0.1,
                                 1e-5, activation=act, residual=r0)
        g = torch.autograd.grad(y, [ins[k] for k in names], dy)
        assert all(t.dtype == ins[k].dtype for k, t in zip(names, g))
        return [y, rm, rv, *g], type(y.grad_fn).__name__
    served = _serving(monkeypatch, "_BN_TRAIN" if training else "_BN_EVAL")
    fast, slow = _both(monkeypatch, run)
    assert served and all(served), served
    assert _same(fast, slow)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_weight_double_backward_through_the_node(monkeypatch, dtype):
    """create_graph=True with weight and bias of x's half dtype: the differentiable composite,
    its first- and second-order gradients in the parameters' dtype, the Python path's values."""
    def run():
        x = _input((4, 3, 2, 3), "c", dtype, 1, 2.0).requires_grad_()
        w, b = (_data((3,), dtype, s).requires_grad_() for s in (3, 4))
        y = F.batch_norm(x, None, None, w, b, True)
        dy = _data(y.shape, dtype, 5)
        g1 = torch.autograd.grad(y, (x, w, b), dy, create_graph=True)
        g2 = torch.autograd.grad(sum((g.float() * g.float()).sum() for g in g1), (x, w))
        assert [g.dtype for g in g1 + g2] == [dtype] * 5
        return [*g1, *g2], type(y.grad_fn).__name__
    fast, slow = _both(monkeypatch, run)
    assert _same(fast, slow)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_small_half_calls_under_auto_from_cpp(dtype):
    """fusedreg._C.torch_batch_norm on a float16/bfloat16 x (the "_half" limits): torch's op,
    the same values, running stats and gradients as torch's own call with vectors all of x's
    dtype or all float32; a mix torch refuses is declined with nothing written."""
    from fusedreg._C import torch_batch_norm
    x0 = _data((4, 3, 5), dtype, 1, 2.0)
    for vd in (dtype, torch.float32):
        w, b = _data((3,), vd, 3), _data((3,), vd, 4)
        for training in (True, False):
            outs = []
            for ours in (True, False):
                x = x0.clone().requires_grad_()
                rm, rv = torch.zeros(3, dtype=vd), torch.ones(3, dtype=vd)
                if ours:
                    y = torch_batch_norm(x, rm, rv, w, b, training, 0.1, 1e-5, None, 1, 61, 61)
                else:
                    y = torch.relu(torch.batch_norm(x, w, b, rm, rv, training, 0.1, 1e-5, False))
                outs.append([y, rm, rv, *torch.autograd.grad(y, x, torch.ones_like(y))])
            assert _same(outs[0], outs[1])
    rm = torch.zeros(3, dtype=dtype)
    mixed = (x0, rm, torch.ones(3, dtype=dtype), torch.ones(3), None, True, 0.1, 1e-5, None,
             False, 99, 99)
    assert torch_batch_norm(*mixed) is None
    assert torch.equal(rm, torch.zeros(3, dtype=dtype))
    # and through the functional under auto: torch's op below the limit, the fused one above
    m = BatchNorm2d(8).to(dtype)
    x = _data((2, 8, 2, 2), dtype, 5)
    with torch.no_grad():
        y = m(x)
    ref = torch.nn.functional.batch_norm(x, torch.zeros(8, dtype=dtype), torch.ones(8, dtype=dtype),
                                         m.weight, m.bias, True, 0.1, 1e-5)
    assert torch.equal(y, ref)


def _eval_case(shape, layout, dtype, mean_offset):
    """x, weight, bias (compute type), running mean and var (x's dtype for a half x), dy."""
    x0 = _input(shape, layout, dtype, 1, 3.0)
    C = x0.shape[1]
    ct = torch.float64 if dtype is torch.float64 else torch.float32
    sd = dtype if dtype in (torch.float16, torch.bfloat16) else ct
    w0, b0 = _data((C,), ct, 2, 1.0), _data((C,), ct, 3)
    rm, rv = _data((C,), sd, 4, mean_offset), _data((C,), sd, 5, 2.0).abs()
    return x0, w0, b0, rm, rv, _input(x0.shape, "c", dtype, 6)


@pytest.mark.parametrize("shape,layout", [((4, 6, 5, 3), "c"), ((4, 6, 5, 3), "cl"),
                                          ((6, 5), "c"), ((3, 5, 14, 14), "c"),
                                          ((4, 6, 5, 3), "t")])
@pytest.mark.parametrize("dtype", _DTYPES)
@pytest.mark.parametrize("grads", ["all", "x", "weight", "bias", "weight+bias"])
def test_eval_with_grad_through_the_node_equals_the_python_path(monkeypatch, shape, layout,
                                                                dtype, grads):
    """An eval call with a gradient to record (x or the affine parameters, frozen running
    stats: fine-tuning with BatchNorm in eval) runs the C++ node in eval: y, the untouched
    running stats and the gradients of every subset of operands bit for bit the Python
    Function's, half running stats included."""
    x0, w0, b0, rm, rv, dy = _eval_case(shape, layout, dtype, 5.0)

    def run():
        ins = {"x": x0.clone(memory_format=torch.preserve_format), "weight": w0.clone(),
               "bias": b0.clone()}
        if layout == "t":
            ins["x"] = x0.transpose(2, 3).clone().transpose(2, 3)
        names = [k for k in ins if grads == "all" or k in grads.split("+")]
        for k in names:
            ins[k].requires_grad_()
        rm1, rv1 = rm.clone(), rv.clone()
        y = F.batch_norm(ins["x"], rm1, rv1, ins["weight"], ins["bias"], False, 0.1, 1e-5)
        g = torch.autograd.grad(y, [ins[k] for k in names], dy)
        return [y, rm1, rv1, *g], type(y.grad_fn).__name__
    served = _serving(monkeypatch, "_BN_EVAL")
    fast, slow = _both(monkeypatch, run)
    assert served and served[0]
    assert _same(fast, slow)
    assert torch.equal(fast[1], rm) and torch.equal(fast[2], rv)


def test_eval_double_backward_through_the_node(monkeypatch):
    """create_graph=True in eval: the differentiable composite with the running stats as
    constants, the Python path's values; gradgradcheck passes."""
    rm, rv = _data((3,), torch.float64, 6), _data((3,), torch.float64, 7, 2.0).abs()

    def run():
        x = _input((4, 3, 2, 3), "cl", torch.float64, 1, 2.0).requires_grad_()
        w, b = (_data((3,), torch.float64, s).requires_grad_() for s in (3, 4))
        y = F.batch_norm(x, rm, rv, w, b, False)
        dy = _data(y.shape, torch.float64, 5)
        g1 = torch.autograd.grad(y, (x, w, b), dy, create_graph=True)
        g2 = torch.autograd.grad(sum((g * g).sum() for g in g1), (x, w))
        return [*g1, *g2], type(y.grad_fn).__name__
    fast, slow = _both(monkeypatch, run)
    for a, c in zip(fast, slow):
        torch.testing.assert_close(a, c, rtol=1e-12, atol=1e-12)
    x = _data((4, 2, 3), torch.float64, 1, 1.0).requires_grad_()
    w, b = (_data((2,), torch.float64, s).requires_grad_() for s in (2, 3))
    rm2, rv2 = _data((2,), torch.float64, 6), _data((2,), torch.float64, 7, 2.0).abs()
    with fusedreg.use_backend("cpu"):
        assert type(F.batch_norm(x, rm2, rv2, w, b, False).grad_fn).__name__ == _NODE
        assert torch.autograd.gradgradcheck(
            lambda x, w, b: F.batch_norm(x, rm2, rv2, w, b, False), (x, w, b))


_EVAL_ACTS = [("relu", True), (None, True), ("silu", False), ("gelu", True), ("gelu_tanh", False)]


@pytest.mark.parametrize("shape,layout", [((4, 6, 5, 3), "c"), ((4, 6, 5, 3), "cl"),
                                          ((6, 5), "c"), ((3, 5, 14, 14), "c")])
@pytest.mark.parametrize("dtype", _DTYPES)
@pytest.mark.parametrize("act,residual,grads", [
    (a, r, g) for a, r in _EVAL_ACTS for g in (None, "all", "x", "residual", "weight+bias")
    if r or g != "residual"])
def test_eval_act_residual_from_cpp_equals_the_python_path(monkeypatch, shape, layout, dtype, act,
                                                           residual, grads):
    """batch_norm_act in eval (timm's BatchNormAct2d, ResNet's relu(bn(x) + identity) at
    inference or with frozen statistics) is served from C++: without grad the kernel alone,
    with one the node in eval. y, the untouched running stats and the gradients of each
    subset of operands are bit for bit the Python path's; an NCHW residual of a channels-last
    x too, and eval's ignored dropout p."""
    x0, w0, b0, rm, rv, dy = _eval_case(shape, layout, dtype, 1.0)
    r0 = _data(shape, dtype, 7, -0.5) if residual else None  # contiguous: NCHW for a cl x

    def run():
        ins = {"x": x0.clone(memory_format=torch.preserve_format), "weight": w0.clone(),
               "bias": b0.clone(), "residual": None if r0 is None else r0.clone()}
        names = [] if grads is None else \
            [k for k in ins if ins[k] is not None and (grads == "all" or k in grads.split("+"))]
        for k in names:
            ins[k].requires_grad_()
        rm1, rv1 = rm.clone(), rv.clone()
        out = []
        for p in (0.0, 0.5):
            with torch.set_grad_enabled(grads is not None):
                y = F.batch_norm_act(ins["x"], rm1, rv1, ins["weight"], ins["bias"], False, 0.1,
                                     1e-5, act, ins["residual"], p)
            out.append(y)
            if names:  # grad_residual without an activation: dy as it came, strides may differ
                g = torch.autograd.grad(y, [ins[k] for k in names], dy)
                out += [t.contiguous() if k == "residual" and act is None else t
                        for k, t in zip(names, g)]
        return out + [rm1, rv1], (type(y.grad_fn).__name__ if names else None)
    served = _serving(monkeypatch, "_BN_EVAL")
    fast, slow = _both(monkeypatch, run)
    assert served and all(served), served
    assert _same(fast, slow)
    assert torch.equal(fast[-2], rm) and torch.equal(fast[-1], rv)


def test_eval_act_double_backward_and_module(monkeypatch):
    """create_graph=True through the eval node with relu and a residual: the Python path's
    values, and gradgradcheck passes with silu; BatchNormAct2d in eval reaches the C++ call."""
    rm, rv = _data((3,), torch.float64, 6), _data((3,), torch.float64, 7, 2.0).abs()

    def run():
        x = _input((4, 3, 2, 3), "cl", torch.float64, 1, 2.0).requires_grad_()
        r = _data((4, 3, 2, 3), torch.float64, 8).requires_grad_()
        w, b = (_data((3,), torch.float64, s).requires_grad_() for s in (3, 4))
        y = F.batch_norm_act(x, rm, rv, w, b, False, activation="silu", residual=r)
        dy = _data(y.shape, torch.float64, 5)
        g1 = torch.autograd.grad(y, (x, r, w, b), dy, create_graph=True)
        g2 = torch.autograd.grad(sum((g * g).sum() for g in g1), (x, r, w))
        return [*g1, *g2], type(y.grad_fn).__name__
    fast, slow = _both(monkeypatch, run)
    for a, c in zip(fast, slow):
        torch.testing.assert_close(a, c, rtol=1e-12, atol=1e-12)
    x = _data((4, 2, 3), torch.float64, 1, 1.0).requires_grad_()
    r = _data((4, 2, 3), torch.float64, 9).requires_grad_()
    w, b = (_data((2,), torch.float64, s).requires_grad_() for s in (2, 3))
    with fusedreg.use_backend("cpu"):
        assert torch.autograd.gradgradcheck(
            lambda x, r, w, b: F.batch_norm_act(x, rm[:2], rv[:2], w, b, False,
                                                activation="silu", residual=r), (x, r, w, b))
        m = fusedreg.nn.BatchNormAct2d(8, act_layer=torch.nn.ReLU, drop_layer=torch.nn.Dropout).eval()
        served = _serving(monkeypatch, "_BN_EVAL")
        xm = _input((2, 8, 4, 4), "cl", torch.float32, 3, 1.0)
        with torch.no_grad():
            y = m(xm)
        assert served == [True]
        ref = torch.relu(torch.nn.functional.batch_norm(xm, m.running_mean, m.running_var,
                                                        m.weight, m.bias, False, 0.1, m.eps))
        torch.testing.assert_close(y, ref, rtol=1e-6, atol=1e-6)
