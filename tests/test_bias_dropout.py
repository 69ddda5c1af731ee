"""bias_dropout and dropout: every backend against the reference, masks bit for bit,
gradients, statistics, identities, registration (opcheck, torch.compile) and bad input."""
import math

import pytest
import torch
import torch.nn.functional as F

import fusedreg
from fusedreg import functional as FF
from fusedreg.reference.philox import dropout_keep, dropout_scale, dropout_uniform

from conftest import cpu_backends
from tolerances import ELEMENTWISE, REDUCTION

BACKENDS = cpu_backends("bias_dropout")
SEEDS = [0, 1, 2**32 + 5, 2**63 + 11]
ACTIVATIONS = [None, "relu", "gelu", "gelu_tanh", "silu"]

# Shapes, each chosen for what it exercises:
SHAPES = [
    (1, 1, 1023),  # one row, odd N: the Philox groups straddle rows; scalar lane path
    (3, 7, 256),   # 3-D input, N % 4 == 0: the four-lanes-per-call path
    (37, 130),     # N % 4 == 2 and a row count that fills no tile exactly
    (5,),          # 1-D input: bias over the only dimension
]


def _inputs(shape, dtype, bias=True, residual=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g, dtype=torch.float64) + 0.5).to(dtype)  # non-zero mean
    b = (torch.randn(shape[-1], generator=g, dtype=torch.float64) - 0.25).to(dtype) if bias else None
    r = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype) if residual else None
    return x, b, r


def _run(backend, x, b, r, **kw):
    with fusedreg.use_backend(backend):
        return FF.bias_dropout(x, b, r, **kw)


def _mask_of(backend, shape, p, seed, with_bias):
    """The keep mask a backend applies, read off its output for x = 1 (bias 0, no residual)."""
    x = torch.ones(shape)
    b = torch.zeros(shape[-1]) if with_bias else None
    return _run(backend, x, b, None, p=p, seed=seed) != 0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("shape", [(1, 1023), (3, 7, 256), (2, 5, 3)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_mask_bit_identical(backend, seed, shape, with_bias):
    expected = dropout_keep(shape, 0.3, seed)
    assert torch.equal(_mask_of(backend, shape, 0.3, seed, with_bias), expected)
    assert torch.equal(FF.dropout_mask(shape, 0.3, seed), expected)


def test_cpu_philox_at_large_indices():
    # 64-bit indexing: indices beyond 2^32 groups (2^34 elements) and an unaligned start.
    if "cpu" not in BACKENDS:
        pytest.skip("cpu backend not built")
    for seed in SEEDS:
        for start in (0, 3, 2**31 - 2, 2**34 + 1, 2**40 + 7):
            got = torch.ops.fusedreg.dropout_uniform(torch.tensor(seed - 2**64 if seed >= 2**63 else seed),
                                                     start, 37, torch.empty(0))
            want = dropout_uniform(seed, start + 37)[start:] if start < 100 else _ref_uniform_at(seed, start, 37)
            assert torch.equal(got, want), (seed, start)


def _ref_uniform_at(seed, start, count):
    from fusedreg.reference.philox import philox4x32_10, uint_to_uniform

    idx = torch.arange(start, start + count, dtype=torch.int64)
    words = torch.stack(philox4x32_10(seed, idx // 4), dim=1)
    return uint_to_uniform(words.gather(1, (idx % 4)[:, None])[:, 0])


def _triton_uniform_kernel():
    import triton
    import triton.language as tl

    from fusedreg.triton import philox

    @triton.jit
    def _kernel(out, seed, start, BLOCK: tl.constexpr):
        offs = start + tl.arange(0, BLOCK).to(tl.int64)
        tl.store(out + tl.arange(0, BLOCK), philox.dropout_uniform(seed, offs))

    _kernel.fn.__globals__["philox"] = philox  # resolve the helper from this closure
    _kernel.fn.__globals__["tl"] = tl
    return _kernel


def test_triton_philox_at_large_indices():
    if "triton" not in BACKENDS:
        pytest.skip("triton backend not available")
    _kernel = _triton_uniform_kernel()
    for seed in SEEDS:
        for start in (2**34 + 1, 2**40 + 7):
            out = torch.empty(32)
            _kernel[(1,)](out, seed - 2**64 if seed >= 2**63 else seed, start, BLOCK=32)
            assert torch.equal(out, _ref_uniform_at(seed, start, 32)), (seed, start)


def _fwd_bwd_cases():
    # Every backend x dtype x shape x activation, except that the (slow) Triton interpreter
    # runs the other activations on one shape only: the activation code is shape-independent.
    for backend in BACKENDS:
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            for shape in SHAPES:
                for act in ACTIVATIONS:
                    if backend == "triton" and act not in (None, "gelu") and shape != (3, 7, 256):
                        continue
                    yield pytest.param(backend, dtype, shape, act,
                                       id=f"{backend}-{str(dtype)[6:]}-{'x'.join(map(str, shape))}-{act}")


@pytest.mark.parametrize("backend,dtype,shape,activation", list(_fwd_bwd_cases()))
def test_forward_backward_against_reference(backend, dtype, shape, activation):
    x, b, r = _inputs(shape, dtype)
    grad = torch.randn(shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    outs = {}
    for be in ("reference", backend):
        xx, bb, rr = (t.clone().requires_grad_() for t in (x, b, r))
        out = _run(be, xx, bb, rr, p=0.25, activation=activation, seed=123)
        out.backward(grad)
        outs[be] = (out.detach(), xx.grad, bb.grad, rr.grad)
    ref, got = outs["reference"], outs[backend]
    torch.testing.assert_close(got[0], ref[0], **ELEMENTWISE[dtype])
    torch.testing.assert_close(got[1], ref[1], **ELEMENTWISE[dtype])
    torch.testing.assert_close(got[2], ref[2], **REDUCTION[dtype])
    torch.testing.assert_close(got[3], ref[3], rtol=0, atol=0)  # grad residual is grad_out


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_reference_matches_torch_autograd(activation):
    # The oracle itself: the reference's explicit backward equals autograd of the composite
    # torch expression with the same mask.
    x, b, r = _inputs((9, 33), torch.float64)
    p, seed = 0.4, 7
    keep = dropout_keep(x.shape, p, seed)
    act = {None: lambda z: z, "relu": torch.relu, "gelu": F.gelu,
           "gelu_tanh": lambda z: F.gelu(z, approximate="tanh"), "silu": F.silu}[activation]
    scale = dropout_scale(p)  # 1/(1-p) rounded through float32, as the spec says
    leaves = [t.clone().requires_grad_() for t in (x, b, r)]
    expected = leaves[2] + torch.where(keep, act(leaves[0] + leaves[1]) * scale, 0.0)
    g = torch.randn_like(expected)
    expected.backward(g)
    mine = [t.clone().requires_grad_() for t in (x, b, r)]
    out = _run("reference", *mine, p=p, activation=activation, seed=seed)
    out.backward(g)
    # float64 on both sides; the derivative formulas differ from autograd's by rounding only
    for a, e in zip([out.detach()] + [t.grad for t in mine], [expected.detach()] + [t.grad for t in leaves]):
        torch.testing.assert_close(a, e, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", [b for b in BACKENDS])
@pytest.mark.parametrize("activation", [None, "gelu", "silu"])
def test_gradcheck_float64(backend, activation):
    x, b, r = (t.requires_grad_() for t in _inputs((4, 6), torch.float64))
    fn = lambda x, b, r: _run(backend, x, b, r, p=0.3, activation=activation, seed=11)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, b, r), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_input(backend):
    x, b, r = _inputs((8, 40), torch.float32)
    xt = x.t()  # (40, 8) non-contiguous; bias over its last dimension
    bt = torch.randn(8)
    rt = torch.randn(80, 8)[::2]  # strided residual
    got = _run(backend, xt, bt, rt, p=0.5, seed=3, activation="relu")
    want = _run("reference", xt.contiguous(), bt, rt.contiguous(), p=0.5, seed=3, activation="relu")
    torch.testing.assert_close(got, want, **ELEMENTWISE[torch.float32])


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_tensors(backend):
    x = torch.empty(0, 16, requires_grad=True)
    b = torch.zeros(16, requires_grad=True)
    out = _run(backend, x, b, None, p=0.5, seed=1, activation="gelu")
    assert out.shape == (0, 16)
    out.sum().backward()
    assert x.grad.shape == (0, 16) and torch.equal(b.grad, torch.zeros(16))


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "triton"])
@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_keep_rate_within_six_sigma(backend, p):
    n = 1 << 20  # 1,048,576 elements
    keep = _mask_of(backend, (1024, 1024), p, seed=2024, with_bias=False)
    rate = keep.double().mean().item()
    sigma = math.sqrt(p * (1 - p) / n)
    assert abs(rate - (1 - p)) < 6 * sigma, (rate, 1 - p, sigma)


@pytest.mark.parametrize("backend", BACKENDS)
def test_identities_and_limits(backend):
    x, b, r = _inputs((6, 12), torch.float32)
    with fusedreg.use_backend(backend):
        # p = 0 and training=False are the identity (draw no seed: the RNG is untouched)
        state = torch.get_rng_state()
        assert FF.dropout(x, 0.0) is x
        assert FF.dropout(x, 0.7, training=False) is x
        torch.testing.assert_close(FF.bias_dropout(x, b, r, p=0.7, training=False), x + b + r)
        torch.testing.assert_close(FF.bias_dropout(x, b, r, p=0.0), x + b + r)
        assert torch.equal(torch.get_rng_state(), state)
        # p = 1 drops everything
        assert torch.equal(FF.dropout(x, 1.0), torch.zeros_like(x))
        torch.testing.assert_close(FF.bias_dropout(x, b, r, p=1.0, activation="gelu"), r)
        # the same seed gives the same output; another seed another mask
        assert torch.equal(FF.dropout(x, 0.5, seed=9), FF.dropout(x, 0.5, seed=9))
        assert not torch.equal(FF.dropout(x, 0.5, seed=9), FF.dropout(x, 0.5, seed=10))
        # seed=None draws from torch's default generator: manual_seed reproduces it
        torch.manual_seed(5)
        a = FF.dropout(x, 0.5)
        torch.manual_seed(5)
        assert torch.equal(a, FF.dropout(x, 0.5))
        # kept values are scaled by 1/(1-p)
        out = FF.dropout(torch.ones(4096), 0.2, seed=1)
        assert set(out.unique().tolist()) == {0.0, float(torch.tensor(1.0) / torch.tensor(0.8))}


def test_nothing_mask_sized_is_saved():
    x, b, r = (t.requires_grad_() for t in _inputs((64, 128), torch.float32))
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        FF.bias_dropout(x, b, r, p=0.5, activation="gelu", seed=1)
    # x and the bias (inputs) and the 8-byte seed; no mask, no output copy
    assert sum(t.numel() * t.element_size() for t in saved) <= x.nbytes + b.nbytes + 8
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        FF.bias_dropout(x, b, r, p=0.5, seed=1)
    assert sum(t.numel() * t.element_size() for t in saved) <= b.nbytes + 8  # x not needed


# ---- modules ---------------------------------------------------------------------------

def test_dropout_module_is_drop_in():
    m, t = fusedreg.nn.Dropout(0.3, inplace=False), torch.nn.Dropout(0.3, inplace=False)
    assert isinstance(m, torch.nn.Dropout)
    assert repr(m) == repr(t) and m.state_dict().keys() == t.state_dict().keys()
    x = torch.randn(50, 20) + 1
    m.eval()
    assert m(x) is x or torch.equal(m(x), x)
    m.train()
    y = m(x)
    kept = y != 0
    torch.testing.assert_close(y[kept], x[kept] / 0.7)
    xi = x.clone()
    out = fusedreg.nn.Dropout(0.3, inplace=True)(xi)
    assert out.data_ptr() == xi.data_ptr()


def test_bias_dropout_module():
    m = fusedreg.nn.BiasDropout(24, p=0.2, activation="silu")
    assert [n for n, _ in m.named_parameters()] == ["bias"]
    with torch.no_grad():
        m.bias.uniform_(-1, 1)
    x, r = torch.randn(3, 5, 24), torch.randn(3, 5, 24)
    m.eval()
    torch.testing.assert_close(m(x, r), F.silu(x + m.bias) + r)
    m.train()
    torch.manual_seed(0)
    y = m(x, r)
    y.sum().backward()
    assert m.bias.grad is not None and m.bias.grad.shape == (24,)
    with pytest.raises(ValueError):
        fusedreg.nn.BiasDropout(0)
    with pytest.raises(ValueError):
        fusedreg.nn.BiasDropout(8, activation="tanh")


# ---- registration ----------------------------------------------------------------------

def _registered_ops():
    from fusedreg.ops.bias_dropout import OPS

    return [(be, OPS[be]) for be in BACKENDS]


@pytest.mark.parametrize("backend,ops", _registered_ops(), ids=lambda v: v if isinstance(v, str) else "")
def test_opcheck(backend, ops):
    fwd, bwd = ops
    x, b, r = _inputs((4, 8), torch.float32)
    seed = torch.tensor(5, dtype=torch.int64)
    torch.library.opcheck(fwd, (x, b, r, 0.3, 2, seed))
    torch.library.opcheck(fwd, (x, None, None, 0.3, 0, seed))
    g = torch.randn(4, 8)
    torch.library.opcheck(bwd, (g, x, b, 0.3, 2, seed, True))
    torch.library.opcheck(bwd, (g, None, None, 0.3, 0, seed, False))


@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_compile_fullgraph_matches_eager(backend):
    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.bias = torch.nn.Parameter(torch.randn(32))

        def forward(self, x, r):
            return FF.bias_dropout(x, self.bias, r, p=0.3, activation="gelu", seed=77)

    torch._dynamo.reset()
    m = Block()
    x, r = torch.randn(4, 32, requires_grad=True), torch.randn(4, 32)
    with fusedreg.use_backend(backend):
        eager = m(x, r)
        eager.sum().backward()
        gx, gb = x.grad.clone(), m.bias.grad.clone()
        x.grad = None
        m.bias.grad = None
        compiled = torch.compile(m, fullgraph=True)(x, r)
        compiled.sum().backward()
    torch.testing.assert_close(compiled, eager)
    torch.testing.assert_close(x.grad, gx)
    torch.testing.assert_close(m.bias.grad, gb)


def test_torch_compile_module_with_drawn_seed():
    # fusedreg.nn.Dropout draws its seed inside the graph: no graph break.
    torch._dynamo.reset()
    m = torch.nn.Sequential(torch.nn.Linear(16, 16), fusedreg.nn.Dropout(0.5))
    out = torch.compile(m, fullgraph=True)(torch.randn(8, 16))
    frac = (out == 0).float().mean().item()
    assert 0.2 < frac < 0.8


# ---- bad input -------------------------------------------------------------------------

@pytest.mark.parametrize("p", [-0.1, 1.1, float("nan"), float("inf"), "0.5", None])
def test_bad_probability(p):
    with pytest.raises(ValueError, match="p"):
        FF.bias_dropout(torch.randn(4), p=p)
    with pytest.raises(ValueError):
        fusedreg.nn.Dropout(p) if p is not None else (_ for _ in ()).throw(ValueError())


def test_bad_inputs_raise_before_any_kernel():
    x = torch.randn(4, 8)
    with pytest.raises(ValueError, match="bias"):
        FF.bias_dropout(x, torch.randn(4))
    with pytest.raises(ValueError, match="residual"):
        FF.bias_dropout(x, None, torch.randn(4, 9))
    with pytest.raises(TypeError, match="dtype"):
        FF.bias_dropout(x, torch.randn(8, dtype=torch.float64))
    with pytest.raises(TypeError, match="dtype"):
        FF.bias_dropout(x, None, torch.randn(4, 8, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="device"):
        FF.bias_dropout(x, torch.randn(8, device="meta"))
    with pytest.raises(ValueError, match="activation"):
        FF.bias_dropout(x, activation="tanh")
    with pytest.raises(TypeError, match="float"):
        FF.bias_dropout(torch.ones(4, 8, dtype=torch.int32))
    with pytest.raises(TypeError, match="float"):
        FF.dropout(torch.ones(4, dtype=torch.int64))
    with pytest.raises(TypeError, match="Tensor"):
        FF.bias_dropout([1.0, 2.0])
    with pytest.raises(ValueError, match="seed"):
        FF.bias_dropout(x, seed=2**64)
    with pytest.raises(TypeError, match="seed"):
        FF.bias_dropout(x, seed=1.5)
    with pytest.raises(ValueError, match="dimension"):
        FF.bias_dropout(torch.tensor(1.0), torch.randn(1))


def test_unusable_backend_says_why():
    with pytest.raises(fusedreg.BackendUnavailableError, match="cuda"):
        fusedreg.set_backend("cuda")
    with pytest.raises(ValueError, match="unknown backend"):
        fusedreg.set_backend("tpu")
