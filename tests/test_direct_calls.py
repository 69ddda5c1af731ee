"""fusedreg._C's direct CPU calls (csrc/ops.cpp): the row ops' CPU kernels without torch.ops,
the dropout seed draw, and torch's own norm for small plain norms under auto. Each returns what
the call it stands for returns, bit for bit, and declines (None, nothing run) wherever that
call would not go straight to the CPU kernel: the callers then make the call itself."""
import pytest
import torch

import fusedreg
from fusedreg import backends

from _helpers import PassThroughDispatchMode, PassThroughFunctionMode

pytestmark = pytest.mark.skipif(not backends.extension_available(),
                                reason="the direct calls are the C++ extension's")

_BIG = 1 << 62  # a torch_norm limit no test tensor reaches


def _C():
    import fusedreg._C as C
    return C


def _data(shape, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * 2 + 0.5).to(dtype)  # non-zero mean


def _same(a, b):
    if isinstance(a, torch.Tensor):
        return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))


class _Sub(torch.Tensor):
    pass



# (1, 768): a small model's row; (3, 1023): rows not a multiple of any vector width;
# (0, 8): no rows
@pytest.mark.parametrize("shape", [(1, 768), (3, 1023), (0, 8)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_row_ops_direct_equal_torch_ops(shape, dtype):
    C, ops = _C(), torch.ops.fusedreg
    x, r, dy = _data(shape, dtype, 1), _data(shape, dtype, 2), _data(shape, dtype, 3)
    w, b = _data(shape[-1:], dtype, 4), _data(shape[-1:], dtype, 5)
    seed = torch.tensor(-1234567890123, dtype=torch.int64)
    for args in [(x, r, w, b, 1e-5, 0.25, seed, False, dtype, True),
                 (x, None, w, None, 1e-3, 0.0, seed, True, dtype, False)]:
        fwd = ops.layer_norm_fwd.default(*args)
        assert _same(C.layer_norm_fwd(*args), fwd)
    y, h, mean, rstd = ops.layer_norm_fwd.default(x, r, w, b, 1e-5, 0.25, seed, False, dtype, True)
    args = (dy, None, h, w, b, mean, rstd, 0.25, seed, False, dtype, True, True, True)
    assert _same(C.layer_norm_bwd(*args), ops.layer_norm_bwd.default(*args))
    for act in (0, 2):  # none, gelu
        args = (x, b, r, 0.3, act, seed)
        assert _same(C.bias_dropout_fwd(*args), ops.bias_dropout_fwd.default(*args))
        args = (dy, x, b, 0.3, act, seed, True)
        assert _same(C.bias_dropout_bwd(*args), ops.bias_dropout_bwd.default(*args))


def test_direct_calls_decline_what_the_dispatcher_would_route_elsewhere():
    C = _C()
    x, w = torch.randn(2, 8), torch.randn(8)
    seed = torch.tensor(3, dtype=torch.int64)
    ln = (x, None, w, None, 1e-5, 0.0, seed, False, torch.float32, False)
    norm = (x, 8, w, None, 1e-5, False, _BIG, _BIG)
    assert C.layer_norm_fwd(*ln) is not None and C.torch_norm(*norm) is not None
    assert C.draw_seed() is not None
    declined = [
        (x.as_subclass(_Sub),) + ln[1:],                       # a tensor subclass
        (x.to("meta"),) + ln[1:],                              # another device
        ln[:-1],                                               # an argument short
        ln[:4] + (1,) + ln[5:],                                # an int eps: torch.ops converts it
        ln[:8] + (torch.float32,) + ln[9:] + (True,),          # an argument too many
    ]
    for args in declined:
        assert C.layer_norm_fwd(*args) is None
    assert C.bias_dropout_fwd(x, None, None, 0.1, 2**70, seed) is None  # out of int64
    for mode in (PassThroughDispatchMode(), PassThroughFunctionMode()):
        with mode:
            assert C.layer_norm_fwd(*ln) is None
            assert C.torch_norm(*norm) is None
            assert C.draw_seed() is None
    inside = []
    torch.func.vmap(lambda t: inside.append(C.bias_dropout_fwd(t, None, None, 0.5, 0, seed)) or t,
                    randomness="same")(torch.randn(3, 8))
    assert inside == [None]  # a functorch layer is active
    with pytest.raises(RuntimeError, match="p must be in"):  # the kernel's own checks run
        C.bias_dropout_fwd(x, None, None, 2.0, 0, seed)


def test_draw_seed_is_torch_randint():
    """The seed drawn for seed=None is torch.randint(2**63 - 1, ()) on the default CPU
    generator, so torch.manual_seed reproduces fusedreg's masks."""
    C = _C()
    torch.manual_seed(11)
    drawn = [C.draw_seed() for _ in range(3)]
    torch.manual_seed(11)
    assert _same(drawn, [torch.randint(2**63 - 1, ()) for _ in range(3)])
    x = torch.randn(4, 16)
    torch.manual_seed(11)
    y = fusedreg.functional.dropout(x, 0.5)
    assert torch.equal(y, fusedreg.functional.dropout(x, 0.5, seed=int(drawn[0])))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_torch_norm_is_torchs_op(dtype):
    """torch's layer_norm / rms_norm, result and autograd node, below the limit that applies
    (limit_grad when something requires grad in grad mode); False at or above it; None for other
    dtypes, a weight of another dtype for rms_norm, eps=None for layer_norm, and arguments
    torch's op refuses (without leaving an error behind)."""
    C = _C()
    x, w, b = _data((3, 8), dtype, 1), _data((8,), dtype, 2), _data((8,), dtype, 3)
    xg = x.clone().requires_grad_()
    y = C.torch_norm(xg, 8, w, b, 1e-5, False, _BIG, _BIG)
    ref = torch.layer_norm(xg, (8,), w, b, 1e-5, False)
    assert _same(y, ref) and type(y.grad_fn) is type(ref.grad_fn)
    eps = torch.finfo(dtype).eps
    assert _same(C.torch_norm(x, 8, w, None, None, True, _BIG, _BIG),
                 torch.rms_norm(x, (8,), w, eps))
    assert _same(C.torch_norm(x, 8, None, None, 1e-3, True, _BIG, _BIG),
                 torch.rms_norm(x, (8,), None, 1e-3))
    assert C.torch_norm(x, 8, w, b, 1e-5, False, 24, _BIG) is False     # 24 elements: not below 24
    assert isinstance(C.torch_norm(x, 8, w, b, 1e-5, False, 25, 0), torch.Tensor)  # no grad needed
    assert C.torch_norm(xg, 8, w, b, 1e-5, False, _BIG, 24) is False    # x needs it, in grad mode
    with torch.no_grad():
        assert isinstance(C.torch_norm(xg, 8, w, b, 1e-5, False, _BIG, 0), torch.Tensor)
    assert C.torch_norm(x.half(), 8, w.half(), None, 1e-5, True, _BIG, _BIG) is None  # rms_norm
    other = torch.float64 if dtype == torch.float32 else torch.float32
    assert C.torch_norm(x, 8, w.to(other), None, 1e-5, True, _BIG, _BIG) is None
    assert C.torch_norm(x, 8, w, b, None, False, _BIG, _BIG) is None
    assert C.torch_norm(x, 8, w[:7], b, 1e-5, False, _BIG, _BIG) is None  # torch refuses it
    assert C.torch_norm(x, 7, w, b, 1e-5, False, _BIG, _BIG) is None
    assert torch.equal(x + 0, x)  # no error left pending


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_torch_norm_half_layer_norm(dtype):
    """A float16/bfloat16 layer_norm (the "layer_norm_half" limits): torch's op, result and
    autograd node, with weight and bias of x's dtype or float32; from the limit up False, or
    given the seed the fused call with weight and bias of x's dtype (None with float32 ones:
    the Python path's); None for rms_norm, under CPU autocast and for what torch refuses (a
    weight of another dtype)."""
    C = _C()
    x = _data((3, 8), dtype, 1)
    xg = x.clone().requires_grad_()
    for vd in (dtype, torch.float32):
        w, b = _data((8,), vd, 2), _data((8,), vd, 3)
        y = C.torch_norm(xg, 8, w, b, 1e-5, False, _BIG, _BIG)
        ref = torch.layer_norm(xg, (8,), w, b, 1e-5, False)
        assert _same(y, ref) and type(y.grad_fn) is type(ref.grad_fn)
    seed = torch.zeros((), dtype=torch.int64)
    assert C.torch_norm(x, 8, w, b, 1e-5, False, 24, 24) is False
    assert C.torch_norm(x, 8, w, b, 1e-5, False, 24, 24, seed) is None  # float32 w and b
    wh, bh = w.to(dtype), b.to(dtype)
    y = C.torch_norm(x, 8, wh, bh, 1e-5, False, 24, 24, seed)
    with fusedreg.use_backend("cpu"), torch.no_grad():
        assert _same(y, torch.ops.fusedreg.layer_norm_fwd(x, None, wh, bh, 1e-5, 0.0, seed, False,
                                                          dtype, False)[0])
    assert C.torch_norm(x, 8, None, None, 1e-5, True, _BIG, _BIG) is None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert C.torch_norm(x, 8, None, None, 1e-5, False, _BIG, _BIG) is None
    assert C.torch_norm(x, 8, w.double(), None, 1e-5, False, _BIG, _BIG) is None
    assert torch.equal(x + 0, x)  # no error left pending


def test_functions_give_the_same_through_direct_calls_and_torch_ops(monkeypatch):
    """Forward and backward through the autograd Functions give the same values, bit for bit,
    whether the direct calls serve the cpu kernels or torch.ops does."""
    from fusedreg import functional as F
    from fusedreg.ops import _common

    x, r = _data((5, 24), torch.float32, 1), _data((5, 24), torch.float32, 2)
    w, b = _data((24,), torch.float32, 3), _data((24,), torch.float32, 4)

    def run():
        ins = [t.clone().requires_grad_() for t in (x, r, w, b)]
        y = F.dropout_add_layer_norm(*ins, p=0.3, seed=5) \
            + F.bias_dropout(ins[0], ins[3], p=0.2, seed=6)
        return [y] + list(torch.autograd.grad(y.square().sum(), ins))

    with fusedreg.use_backend("cpu"):
        fast = run()
        monkeypatch.setattr(_common, "_DIRECT", {})  # every call through torch.ops
        assert _same(run(), fast)


def _through(node_on, monkeypatch, fn):
    """fn() with bias_dropout's C++ autograd node serving the cpu backend (node_on) or the
    Python BiasDropoutFunction doing so."""
    from fusedreg.ops import bias_dropout as bd
    with monkeypatch.context() as m:
        if not node_on:
            m.setattr(bd, "_CPU_NODE", None)
        with fusedreg.use_backend("cpu"):
            return fn()


# every combination of operands given and needing a gradient: the node's needs_input_grad
# counts tensor inputs only, so a missing bias or residual shifts the others
@pytest.mark.parametrize("activation", [None, "gelu"])
@pytest.mark.parametrize("given", ["x", "x+bias", "x+res", "x+bias+res"])
@pytest.mark.parametrize("grads", ["all", "x only", "operands only"])
def test_bias_dropout_node_equals_the_python_function(monkeypatch, activation, given, grads):
    from fusedreg import functional as F
    shape = (3, 37)
    x, b, r, dy = (_data(shape, torch.float32, 1), _data(shape[-1:], torch.float32, 2),
                   _data(shape, torch.float32, 3), _data(shape, torch.float32, 4))

    def run():
        ins = {"x": x.clone(), "bias": b.clone() if "bias" in given else None,
               "residual": r.clone() if "res" in given else None}
        for name, t in ins.items():
            if t is not None and (grads == "all" or name == "x"
                                  or (grads == "operands only" and name != "x")):
                t.requires_grad_()
        if not any(t is not None and t.requires_grad for t in ins.values()):
            ins["x"].requires_grad_()
        y = F.bias_dropout(ins["x"], ins["bias"], ins["residual"], p=0.3, activation=activation,
                           seed=11)
        wanted = [t for t in ins.values() if t is not None and t.requires_grad]
        return [y, *torch.autograd.grad(y, wanted, dy)], type(y.grad_fn).__name__

    (fast, node), (slow, fn) = (_through(True, monkeypatch, run), _through(False, monkeypatch, run))
    assert "BiasDropoutFunction" in fn and "BiasDropoutFunction" not in node  # each path ran
    assert _same(fast, slow)


def test_bias_dropout_node_double_backward_and_graph_rules(monkeypatch):
    from fusedreg import functional as F
    x, b = _data((4, 16), torch.float32, 1), _data((16,), torch.float32, 2)

    def second_order():
        xs, bs = x.clone().requires_grad_(), b.clone().requires_grad_()
        y = F.bias_dropout(xs, bs, p=0.25, activation="gelu_tanh", seed=3)
        gx, gb = torch.autograd.grad(y.square().sum(), (xs, bs), create_graph=True)
        return [gx, gb, *torch.autograd.grad(gx.sum() + gb.square().sum(), (xs, bs))]

    assert _same(_through(True, monkeypatch, second_order), _through(False, monkeypatch, second_order))

    def rules(node_on):
        xs = x.clone().requires_grad_()
        y = F.dropout(xs, 0.5, seed=9)
        y.sum().backward()
        with pytest.raises(RuntimeError, match="backward through the graph a second time"):
            y.sum().backward()
        # saved-tensor hooks (what activation checkpointing uses) see the saved seed
        packed = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: packed.append(t) or t, lambda t: t):
            z = F.bias_dropout(x.clone().requires_grad_(), None, None, p=0.5, seed=9)
        assert packed and ("BiasDropoutFunction" in type(z.grad_fn).__name__) != node_on
        # under a dispatch mode the call declines to the Python Function (the mode sees the ops)
        with PassThroughDispatchMode():
            w = F.dropout(x.clone().requires_grad_(), 0.5, seed=9)
        assert "BiasDropoutFunction" in type(w.grad_fn).__name__
        return xs.grad

    assert torch.equal(_through(True, monkeypatch, lambda: rules(True)),
                       _through(False, monkeypatch, lambda: rules(False)))
