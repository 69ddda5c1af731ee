"""bias_dropout and dropout: every backend against the reference, masks bit for bit,
gradients, statistics, identities, registration (opcheck, torch.compile) and bad input.

Each backend x device case is a param of ``tests/_helpers.device_cases``: the CPU backends
(reference, cpu, and triton under the interpreter) on CPU tensors, and the triton and cuda
backends on CUDA tensors, compared against the reference on the CPU and their masks bit for
bit against ``fusedreg.functional.dropout_mask``. The GPU cases are skipped where there is no
GPU ("needs a CUDA GPU"); on a GPU a backend that cannot serve bias_dropout (an extension
built without CUDA, say) fails with the reason. Run them with ``FUSEDREG_TEST_NO_INTERPRET=1``
so that triton compiles for the GPU instead of interpreting (benchmarks/gpu_check.sh does).
"""
import math
import re

import pytest
import torch
import torch.nn.functional as F

import fusedreg
from fusedreg import backends
from fusedreg import functional as FF
from fusedreg.reference.philox import dropout_keep, dropout_scale, dropout_uniform

from _helpers import (device_cases, p_at_a_uniform, results_at_each_cpu_level,
                      results_at_one_and_two_threads, serving)
from conftest import cpu_backends
from tolerances import ELEMENTWISE, REDUCTION

OP = "bias_dropout"
BACKENDS = cpu_backends(OP)
SEEDS = [0, 1, 2**32 + 5, 2**63 + 11]
ACTIVATIONS = [None, "relu", "gelu", "gelu_tanh", "silu"]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
GPU_DTYPES = DTYPES + [torch.float64]

# Shapes, each chosen for what it exercises:
SHAPES = [
    (1, 1, 1023),  # one row, odd N: the Philox groups straddle rows; scalar lane path
    (3, 7, 256),   # 3-D input, N % 4 == 0: the four-lanes-per-call path
    (37, 130),     # N % 4 == 2 and a row count that fills no tile exactly; cuda rows kernel unaligned
    (5,),          # 1-D input: bias over the only dimension; total < 8, only the tail path
                   # of the cuda flat kernels
]
# and on a GPU also:
GPU_SHAPES = SHAPES + [
    (1151, 96),    # many row blocks in the cuda grad_bias kernel (M / 64 of them), aligned
    (515, 1151),   # many row blocks, odd N, and a flat grid that loops
]


def _on_cpu_interpreter(backend, device):
    return backend == "triton" and device == "cpu"


def _inputs(shape, dtype, bias=True, residual=True, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g, dtype=torch.float64) + 0.5).to(dtype)  # non-zero mean
    b = (torch.randn(shape[-1], generator=g, dtype=torch.float64) - 0.25).to(dtype) if bias else None
    r = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype) if residual else None
    return [t.to(device) if t is not None else None for t in (x, b, r)]


def _run(backend, x, b, r, **kw):
    with fusedreg.use_backend(backend):
        return FF.bias_dropout(x, b, r, **kw)


def _cpu_leaves(*tensors):
    """CPU copies (leaves that require grad) of the given tensors, for the reference."""
    return [t.detach().cpu().requires_grad_() if t is not None else None for t in tensors]


def _mask_of(backend, shape, p, seed, with_bias, device="cpu"):
    """The keep mask a backend applies, read off its output for x = 1 (bias 0, no residual)."""
    x = torch.ones(shape, device=device)
    b = torch.zeros(shape[-1], device=device) if with_bias else None
    out = _run(backend, x, b, None, p=p, seed=seed)
    assert out.device.type == device
    return (out != 0).cpu()


@pytest.mark.parametrize("backend,device,seed,shape,with_bias", device_cases(
    OP, [(s, sh, wb) for s in SEEDS for sh in [(1, 1023), (3, 7, 256), (2, 5, 3)] for wb in (False, True)],
    [(s, sh, wb) for s in SEEDS for sh in [(1, 1023), (3, 7, 256), (2, 5, 3), (4097,), (33, 1151)]
     for wb in (False, True)]))
def test_mask_bit_identical(backend, device, seed, shape, with_bias):
    serving(OP, backend, device)
    expected = dropout_keep(shape, 0.3, seed)
    assert torch.equal(_mask_of(backend, shape, 0.3, seed, with_bias, device), expected)
    assert torch.equal(FF.dropout_mask(shape, 0.3, seed), expected)


@pytest.mark.parametrize("backend,device,shape", device_cases(
    OP, [], [((2048, 1000),), ((2048, 1001),), ((1, 3_000_001),)]))
def test_mask_bit_identical_large(backend, device, shape):
    # GPU only: more elements than one sweep of the cuda flat kernels' resident grid (the
    # bias column is carried from sweep to sweep) and more than one Triton tile row.
    serving(OP, backend, device)
    kept = _mask_of(backend, shape, 0.5, 2**40 + 3, with_bias=True, device=device)
    assert torch.equal(kept, FF.dropout_mask(shape, 0.5, 2**40 + 3))


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
        pytest.skip("triton backend not available on CPU tensors (needs TRITON_INTERPRET=1)")
    _kernel = _triton_uniform_kernel()
    for seed in SEEDS:
        for start in (2**34 + 1, 2**40 + 7):
            out = torch.empty(32)
            _kernel[(1,)](out, seed - 2**64 if seed >= 2**63 else seed, start, BLOCK=32)
            assert torch.equal(out, _ref_uniform_at(seed, start, 32)), (seed, start)


def _interpreter_subset(backend, device, dtype, shape, act):
    # The (slow) Triton interpreter runs the other activations on one shape only: the
    # activation code is shape-independent.
    return not _on_cpu_interpreter(backend, device) or act in (None, "gelu") or shape == (3, 7, 256)


# The data of each device's cases: (p, seed, grad_out in float64) — the GPU cases keep theirs.
FWD_BWD_DATA = {
    "cpu": (0.25, 123, lambda shape: torch.randn(shape, generator=torch.Generator().manual_seed(1))),
    "cuda": (0.2, 7, lambda shape: torch.randn(shape, generator=torch.Generator().manual_seed(1),
                                               dtype=torch.float64) - 0.1),
}


@pytest.mark.parametrize("backend,device,dtype,shape,activation", device_cases(
    OP, [(d, s, a) for d in DTYPES for s in SHAPES for a in ACTIVATIONS],
    [(d, s, a) for d in GPU_DTYPES for s in GPU_SHAPES for a in ACTIVATIONS],
    keep=_interpreter_subset))
def test_forward_backward_against_reference(backend, device, dtype, shape, activation):
    serving(OP, backend, device)
    p, seed, grad_of = FWD_BWD_DATA[device]
    x, b, r = _inputs(shape, dtype, device=device)
    grad = grad_of(shape).to(dtype)
    # the reference, on CPU copies
    xc, bc, rc = _cpu_leaves(x, b, r)
    expected = _run("reference", xc, bc, rc, p=p, activation=activation, seed=seed)
    expected.backward(grad)
    # the backend, on the device
    xs, bs, rs = (t.detach().clone().requires_grad_() for t in (x, b, r))
    out = _run(backend, xs, bs, rs, p=p, activation=activation, seed=seed)
    assert out.dtype == dtype and out.shape == x.shape and out.device.type == device
    out.backward(grad.to(device))
    torch.testing.assert_close(out.detach().cpu(), expected.detach(), **ELEMENTWISE[dtype])
    torch.testing.assert_close(xs.grad.cpu(), xc.grad, **ELEMENTWISE[dtype])
    torch.testing.assert_close(bs.grad.cpu(), bc.grad, **REDUCTION[dtype])
    torch.testing.assert_close(rs.grad.cpu(), rc.grad, rtol=0, atol=0)  # grad residual is grad_out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("activation", ["gelu", "gelu_tanh", "silu"])
def test_cpu_activation_range_paths_match_reference(activation, dtype):
    """The CPU kernels compute an activation's exp without range handling on row segments
    whose |x + bias| is at most 8, the full-range exp on the others: segments of each kind,
    side by side in one row and across rows (large, tiny, inf, nan values among small ones),
    all against the reference, forward and backward."""
    serving(OP, "cpu", "cpu")
    g = torch.Generator().manual_seed(3)
    x = torch.randn(6, 700, generator=g) * 0.5
    x[1, 300] = 9.0            # one element past the bound: that segment takes the full range
    x[2, :] *= 40.0            # a whole row of large values (exp underflows, erf saturates)
    x[3, 10] = -200.0
    x[4, 600] = float("inf")
    x[5, 5] = float("nan")
    b = torch.randn(700, generator=g) * 0.1
    x, b = x.to(dtype), b.to(dtype)
    grad = torch.randn(6, 700, generator=g).to(dtype)
    outs = {}
    for backend in ("reference", "cpu"):
        xs, bs = x.clone().requires_grad_(), b.clone().requires_grad_()
        out = _run(backend, xs, bs, None, p=0.2, activation=activation, seed=9)
        out.backward(grad)
        outs[backend] = (out.detach(), xs.grad, bs.grad)
    for got, want in zip(outs["cpu"][:2], outs["reference"][:2]):
        torch.testing.assert_close(got, want, equal_nan=True, **ELEMENTWISE[dtype])
    torch.testing.assert_close(outs["cpu"][2], outs["reference"][2], equal_nan=True,
                               **REDUCTION[dtype])


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


@pytest.mark.parametrize("backend,device,activation", device_cases(
    OP, [(a,) for a in (None, "gelu", "silu")]))
def test_gradcheck_float64(backend, device, activation):
    serving(OP, backend, device)
    x, b, r = (t.requires_grad_() for t in _inputs((4, 6), torch.float64, device=device))
    fn = lambda x, b, r: _run(backend, x, b, r, p=0.3, activation=activation, seed=11)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, b, r), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend,device", device_cases(OP, [()]))
def test_non_contiguous_input(backend, device):
    serving(OP, backend, device)
    x, b, r = _inputs((8, 40), torch.float32, device=device)
    xt = x.t()  # (40, 8) non-contiguous; bias over its last dimension
    bt = torch.randn(8).to(device)
    rt = torch.randn(80, 8).to(device)[::2]  # strided residual
    got = _run(backend, xt, bt, rt, p=0.5, seed=3, activation="relu")
    want = _run("reference", xt.contiguous().cpu(), bt.cpu(), rt.contiguous().cpu(), p=0.5, seed=3,
                activation="relu")
    torch.testing.assert_close(got.cpu(), want, **ELEMENTWISE[torch.float32])


@pytest.mark.parametrize("backend,device", device_cases(OP, [()]))
def test_empty_tensors(backend, device):
    serving(OP, backend, device)
    x = torch.empty(0, 16, device=device, requires_grad=True)
    b = torch.zeros(16, device=device, requires_grad=True)
    out = _run(backend, x, b, None, p=0.5, seed=1, activation="gelu")
    assert out.shape == (0, 16) and out.device.type == device
    out.sum().backward()
    assert x.grad.shape == (0, 16) and torch.equal(b.grad.cpu(), torch.zeros(16))


@pytest.mark.parametrize("backend,device", device_cases(OP, [()]))
def test_empty_and_non_contiguous_and_misaligned(backend, device):
    serving(OP, backend, device)
    # zero rows: empty output, zero bias gradient
    x = torch.empty((0, 64), device=device, requires_grad=True)
    b = torch.randn(64, device=device, requires_grad=True)
    out = _run(backend, x, b, None, p=0.5, seed=1)
    assert out.shape == (0, 64)
    out.sum().backward()
    assert torch.equal(b.grad, torch.zeros_like(b))
    # a transposed view, and a contiguous view 4 bytes past an aligned address
    base, _, _ = _inputs((70, 66), torch.float32, device=device)
    for x in (base.t(), base.flatten()[1:4616].view(65, 71)):
        bias_x = torch.randn(x.shape[-1]).to(device)
        out = _run(backend, x, bias_x, None, p=0.3, seed=9)
        expected = _run("reference", x.cpu(), bias_x.cpu(), None, p=0.3, seed=9)
        torch.testing.assert_close(out.cpu(), expected, **ELEMENTWISE[torch.float32])


@pytest.mark.parametrize("backend,device,dtype", device_cases(OP, [(torch.float32,), (torch.bfloat16,)]))
def test_plain_dropout(backend, device, dtype):
    # no bias, no residual: the cuda flat kernels without bias columns, Triton's virtual rows
    serving(OP, backend, device)
    x, _, _ = _inputs((129, 77), dtype, device=device)
    xs = x.detach().clone().requires_grad_()
    with fusedreg.use_backend(backend):
        out = FF.dropout(xs, p=0.4, seed=3)
    xc = x.detach().cpu().requires_grad_()
    expected = _run("reference", xc, None, None, p=0.4, seed=3)
    torch.testing.assert_close(out.detach().cpu(), expected.detach(), **ELEMENTWISE[dtype])
    out.sum().backward()
    expected.sum().backward()
    torch.testing.assert_close(xs.grad.cpu(), xc.grad, **ELEMENTWISE[dtype])


# The fused kernels' column sums (the reference's is torch's own sum; the interpreter is slow)
@pytest.mark.parametrize("backend,device", device_cases(
    OP, [()], keep=lambda b, d: b != "reference" and not _on_cpu_interpreter(b, d)))
def test_grad_bias_is_deterministic(backend, device):
    serving(OP, backend, device)
    x, b, _ = _inputs((4096, 1000), torch.float32, residual=False, device=device)
    g = torch.randn_like(x)
    grads = []
    for _ in range(3):
        bs = b.detach().clone().requires_grad_()
        _run(backend, x, bs, None, p=0.1, activation="gelu", seed=11).backward(g)
        grads.append(bs.grad)
    assert torch.equal(grads[0], grads[1]) and torch.equal(grads[0], grads[2])


@pytest.mark.parametrize("backend,device,p", device_cases(
    OP, [(p,) for p in (0.1, 0.5, 0.9)], keep=lambda b, d, p: not _on_cpu_interpreter(b, d)))
def test_keep_rate_within_six_sigma(backend, device, p):
    serving(OP, backend, device)
    n = 1 << 20  # 1,048,576 elements
    keep = _mask_of(backend, (1024, 1024), p, seed=2024, with_bias=False, device=device)
    rate = keep.double().mean().item()
    sigma = math.sqrt(p * (1 - p) / n)
    assert abs(rate - (1 - p)) < 6 * sigma, (rate, 1 - p, sigma)


@pytest.mark.parametrize("backend,device", device_cases(OP, [()]))
def test_identities_and_limits(backend, device):
    serving(OP, backend, device)
    x, b, r = _inputs((6, 12), torch.float32, device=device)
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
        torch.testing.assert_close(FF.bias_dropout(x, b, r, p=1.0, seed=5), r)
        # the same seed gives the same output; another seed another mask
        assert torch.equal(FF.dropout(x, 0.5, seed=9), FF.dropout(x, 0.5, seed=9))
        assert not torch.equal(FF.dropout(x, 0.5, seed=9), FF.dropout(x, 0.5, seed=10))
        # seed=None draws from torch's default generator: manual_seed reproduces it
        torch.manual_seed(5)
        a = FF.dropout(x, 0.5)
        torch.manual_seed(5)
        assert torch.equal(a, FF.dropout(x, 0.5))
        # kept values are scaled by 1/(1-p)
        out = FF.dropout(torch.ones(4096, device=device), 0.2, seed=1)
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

@pytest.mark.parametrize("backend,device", device_cases(OP, [()]))
def test_opcheck(backend, device):
    serving(OP, backend, device)
    kernels = backends.implementation(OP, backend)
    fwd, bwd = kernels.fwd, kernels.bwd
    x, b, r = _inputs((4, 8), torch.float32, device=device)
    seed = torch.tensor(5, dtype=torch.int64)  # a CPU tensor on every device: read on the host
    torch.library.opcheck(fwd, (x, b, r, 0.3, 2, seed))
    torch.library.opcheck(fwd, (x, None, None, 0.3, 0, seed))
    g = torch.randn(4, 8).to(device)
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

# check_probability's documented errors: ValueError naming p, for a bad value or a non-number
# (None included: p has no default meaning "no dropout").
BAD_P = r"^(dropout probability )?p must be"


@pytest.mark.parametrize("p", [-0.1, 1.1, float("nan"), float("inf"), "0.5", None])
def test_bad_probability(p):
    with pytest.raises(ValueError, match=BAD_P):
        FF.bias_dropout(torch.randn(4), p=p)
    with pytest.raises(ValueError, match=BAD_P):
        FF.dropout(torch.randn(4), p=p)
    with pytest.raises(ValueError, match=BAD_P):
        fusedreg.nn.Dropout(p)
    with pytest.raises(ValueError, match=BAD_P):
        fusedreg.nn.BiasDropout(4, p=p)


def test_bad_inputs_raise_before_any_kernel():
    x = torch.randn(4, 8)
    with pytest.raises(ValueError, match="bias"):
        FF.bias_dropout(x, torch.randn(4))
    with pytest.raises(ValueError, match="residual"):
        FF.bias_dropout(x, None, torch.randn(4, 9))
    with pytest.raises(TypeError, match="float"):
        FF.bias_dropout(x, torch.ones(8, dtype=torch.int32))
    with pytest.raises(TypeError, match="bool"):  # training: a bool, as torch's dropout
        FF.bias_dropout(x, training="no")
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


def test_function_config_fast_path_keeps_every_check():
    """BiasDropoutFunction's config check has a fast path for the configs the functional API
    builds (float p, int code, str backend): a bool where a number belongs, or a p that is no
    float in [0, 1], still takes the full checks and raises."""
    from fusedreg.ops.bias_dropout import BiasDropoutConfig, BiasDropoutFunction
    x, seed = torch.randn(4, 8), torch.zeros((), dtype=torch.int64)
    for cfg, err in [(BiasDropoutConfig(True, 0, "cpu"), ValueError),
                     (BiasDropoutConfig(0.1, True, "cpu"), ValueError),
                     (BiasDropoutConfig(float("inf"), 0, "cpu"), ValueError),
                     (BiasDropoutConfig(0.1, 0, None), TypeError),
                     ((0.1, 0, "cpu"), TypeError)]:
        with pytest.raises(err, match="config|BiasDropoutConfig"):
            BiasDropoutFunction.apply(x, None, None, seed, cfg)
    # an int p is a number in [0, 1] (the full checks accept it): the same result as 1.0
    out = BiasDropoutFunction.apply(x, None, None, seed, BiasDropoutConfig(1, 0, "reference"))
    torch.testing.assert_close(out, torch.zeros_like(x))


def test_mixed_dtypes_and_aliased_operands_after_the_fast_path():
    """The dtype promotion runs only when an operand's dtype differs from x's, and a residual
    that is x itself is given as a view: both still compute torch's composite."""
    x = (torch.randn(3, 16, dtype=torch.float64) + 0.5).requires_grad_()
    b32 = torch.randn(16, dtype=torch.float32, requires_grad=True)
    xb = x.detach().to(torch.bfloat16).requires_grad_()
    for xx, b, r in [(x, b32, None), (xb, b32, None), (xb, None, x), (x, None, x)]:
        y = FF.bias_dropout(xx, b, r, p=0.3, seed=11)
        # torch's type promotion gives the dtype; fusedreg computes in it
        dt = torch.promote_types(torch.promote_types(xx.dtype, (b if b is not None else xx).dtype),
                                 (r if r is not None else xx).dtype)
        keep = dropout_keep(tuple(xx.shape), 0.3, 11)
        z = xx.to(dt) if b is None else xx.to(dt) + b.to(dt)
        ref = torch.where(keep, z * dropout_scale(0.3), torch.zeros((), dtype=dt))
        if r is not None:
            ref = ref + r.to(dt)
        assert y.dtype == dt
        torch.testing.assert_close(y, ref, **ELEMENTWISE[dt])
        (g,) = torch.autograd.grad(y.sum(), xx)
        (g_ref,) = torch.autograd.grad(ref.sum(), xx)
        assert g.dtype == xx.dtype
        torch.testing.assert_close(g, g_ref, **ELEMENTWISE[xx.dtype])


@pytest.mark.parametrize("backend", fusedreg.BACKENDS)
def test_set_backend_agrees_with_backend_status(backend):
    # Whatever this machine has: a backend that backend_status() calls available is
    # accepted, any other is refused with that same reason.
    why = fusedreg.backend_status()[backend]
    if why == "available":
        fusedreg.set_backend(backend)
        assert fusedreg.get_backend() == backend
    else:
        with pytest.raises(fusedreg.BackendUnavailableError, match=re.escape(why)):
            fusedreg.set_backend(backend)
        assert fusedreg.get_backend() == "auto"
    with pytest.raises(ValueError, match="unknown backend"):
        fusedreg.set_backend("tpu")



@pytest.mark.parametrize("level", ["baseline", "avx2", "avx512"])
def test_cpu_half_rounding_matches_torch(level):
    """The CPU op rounds its fp32 result to bf16/fp16 exactly as torch's .to(dtype) does:
    x + residual (no bias, activation or dropout) is exact in fp32 for these inputs, so the
    output must equal (x.float() + r.float()).to(dtype) bit for bit — ties (to even), fp16
    subnormals and the fp16 overflow threshold, inf and signed zeros included; NaN stays NaN
    (its payload is not compared: torch's vectorized and scalar conversions differ). Every
    instruction-set level runs in a fresh process (the level is read once)."""
    import os
    import subprocess
    import sys
    code = r'''
import torch, fusedreg  # noqa: F401
def run(dt, lo):
    # x: every fp16/bf16 bit pattern; residual: small offsets that land between, on and
    # across the rounding points of the sum
    x = torch.arange(-2**15, 2**15, dtype=torch.int32).to(torch.int16).view(dt)
    r = lo.to(dt)
    got = torch.ops.fusedreg.bias_dropout_fwd(x, None, r.expand_as(x).contiguous(), 0.0, 0,
                                              torch.tensor(1))
    want = (x.float() + r.float()).to(dt)
    nan = want.isnan()
    assert torch.equal(got.isnan(), nan), dt
    assert torch.equal(got[~nan].view(torch.int16), want[~nan].view(torch.int16)), dt
for dt in (torch.bfloat16, torch.float16):
    for lo in (0.0, -0.0, 1.0, 2.0 ** -20, -(2.0 ** -24), 3.0 ** -9, 65504.0):
        run(dt, torch.tensor(lo))
print("ok")
'''
    env = {**os.environ, "FUSEDREG_CPU_ISA": level}
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr[-2000:]


def test_cpu_backward_without_activation_bitwise_at_every_level(tmp_path):
    """The CPU backward without an activation (AVX-512: keep decisions from the Philox words
    against an integer threshold, never the uniforms; AVX2 and baseline: the uniforms) gives
    grad_x = keep ? grad_out * scale : +0 exactly (float32 math, rounded as torch rounds) at
    every level, keep bit for bit the reference's u >= p, and the same grad_bias bits at every
    level; the forward (the same keep masks) gives (keep ? (x + bias) * scale : +0) + residual,
    each step rounded in float32, the same bits at every level. p includes a value that some element's uniform equals exactly (kept: u >= p) and
    1.0; shapes with N % 4 != 0 (the tiles' uniforms path), tiles of four rows and of one,
    two column blocks (N > 16384), tails of every length, a flat range over several threads'
    chunks. Each level in a fresh process (read once)."""
    if "cpu" not in BACKENDS:
        pytest.skip("cpu backend not built")
    seed = 2**33 + 17
    p_exact, u = p_at_a_uniform(seed, 200)
    code = r'''
import sys, torch, fusedreg  # noqa: F401
seed, p_exact, path = int(sys.argv[1]), float(sys.argv[2]), sys.argv[3]
out = {}
g = torch.Generator().manual_seed(5)
for dt in (torch.float32, torch.bfloat16, torch.float16):
    for shape in ((64, 1024), (33, 1151), (9, 300), (2, 4100), (3, 16400), (3, 4), (1, 45)):
        grad = (torch.randn(shape, generator=g, dtype=torch.float64) + 0.5).to(dt)
        grad[0, :3] = torch.tensor([-0.0, float("inf"), float("nan")])
        bias = torch.randn(shape[1], generator=g).to(dt)
        for p in (0.1, 0.5, 1.0, p_exact):
            for need_bias in (False, True):
                gx, gb = torch.ops.fusedreg.bias_dropout_bwd(grad, None, bias, p, 0, torch.tensor(seed),
                                                             need_bias)
                out[(str(dt), shape, p, need_bias)] = (grad, gx, gb)
            # the forward too (also keep masks at the AVX-512 level, without an activation)
            x = grad.flip(0).contiguous()
            r = torch.randn(shape, generator=g).to(dt)
            for has_res in (False, True):
                y = torch.ops.fusedreg.bias_dropout_fwd(x, bias, r if has_res else None, p, 0,
                                                        torch.tensor(seed))
                out[("fwd", str(dt), shape, p, has_res)] = (x, bias, r if has_res else None, y)
torch.save(out, path)
'''
    results = results_at_each_cpu_level(code, (seed, repr(p_exact)), tmp_path)
    bits = lambda t: t.view(torch.int32 if t.dtype == torch.float32 else torch.int16)
    for key, val in results["avx512"].items():
        if key[0] != "fwd":
            continue
        _, _, shape, p, _ = key
        x, bias, r, y = val
        keep = dropout_keep(shape, p, seed)
        v = torch.where(keep, (x.float() + bias.float()) * dropout_scale(p), torch.zeros(()))
        want = (v + r.float() if r is not None else v).to(x.dtype)
        # NaN payloads aside (torch's own conversions differ in them; the levels agree below)
        nan = want.isnan()
        assert torch.equal(y.isnan(), nan), key
        assert torch.equal(bits(y)[~nan], bits(want)[~nan]), key
        for level in ("baseline", "avx2"):
            assert torch.equal(bits(results[level][key][3]), bits(y)), (level, key)
    for key, val in results["avx512"].items():
        if key[0] == "fwd":
            continue
        grad, gx, gb = val
        _, shape, p, need_bias = key
        keep = dropout_keep(shape, p, seed)
        if p == p_exact:
            assert keep.flatten()[(u == p_exact).nonzero()[0, 0]]  # u == p is kept
        want = torch.where(keep, grad.float() * dropout_scale(p), torch.zeros(())).to(grad.dtype)
        assert torch.equal(bits(gx), bits(want)), key
        if need_bias:
            torch.testing.assert_close(gb, want.double().sum(0).to(gb.dtype), equal_nan=True,
                                       **REDUCTION[grad.dtype])
        for level in ("baseline", "avx2"):
            _, gx_l, gb_l = results[level][key]
            assert torch.equal(bits(gx_l), bits(gx)), (level, key)
            assert torch.equal(bits(gb_l), bits(gb)), (level, key)


@pytest.mark.skipif("cpu" not in BACKENDS, reason="the cpu backend is not built")
def test_cpu_streamed_outputs_are_the_formula():
    """float32 outputs of 8 MiB and more of the kernels without an activation are written with
    non-temporal stores (csrc/cpu/bias_dropout.cpp: stream_backward_output, and
    stream_forward_output where x, residual and out, 94 MiB here, outgrow the L3), in steps of
    kMaskChunk elements: at one thread and at two, the forward with bias and residual, the
    backward with the bias gradient (row tiles) and the backward of plain dropout (flat steps)
    equal the float32 formula bit for bit, the bias gradient the float64 column sums to the
    reduction tolerance, the same bits at both thread counts; with relu (the uniforms' path,
    in half-chunk steps at this size: uniform_step) the same by value. Rows of 1000 features: rows
    start at every 16-float alignment, so whole aligned vectors (streamed) and the rest
    (ordinary stores) both run, and the forward's steps cross rows."""
    M, N, p, seed = 8192, 1000, 0.1, 2**35 + 7
    g = torch.Generator().manual_seed(3)
    x = torch.randn(M, N, generator=g) + 0.5
    r = torch.randn(M, N, generator=g) - 1.0
    bias = torch.randn(N, generator=g)
    dy = torch.randn(M, N, generator=g) + 0.25
    assert x.numel() * 4 >= 8 << 20
    ops = torch.ops.fusedreg
    s = torch.tensor(seed)

    def run():
        y = ops.bias_dropout_fwd(x, bias, r, p, 0, s)
        gx, gb = ops.bias_dropout_bwd(dy, None, bias, p, 0, s, True)
        gd, _ = ops.bias_dropout_bwd(dy, None, None, p, 0, s, False)
        return y, gx, gb, gd

    one, two = results_at_one_and_two_threads(run)
    keep = dropout_keep((M, N), p, seed)
    scale = torch.tensor(dropout_scale(p), dtype=torch.float32)
    zero = torch.zeros(())
    want_y = torch.where(keep, (x + bias) * scale, zero) + r
    want_gx = torch.where(keep, dy * scale, zero)
    for y, gx, gb, gd in (one, two):
        assert torch.equal(y.view(torch.int32), want_y.view(torch.int32))
        assert torch.equal(gx.view(torch.int32), want_gx.view(torch.int32))
        assert torch.equal(gd.view(torch.int32), want_gx.view(torch.int32))
        torch.testing.assert_close(gb, want_gx.double().sum(0).float(), **REDUCTION[torch.float32])
    assert torch.equal(one[2], two[2])

    # With an activation the kernels take the uniforms, here in steps of half a chunk (the
    # streams outgrow the L3: uniform_step); relu keeps the formula exact (compared by value:
    # a dropped or cut-off element may be -0 on one side and +0 on the other).
    relu = 1

    def run_relu():
        y = ops.bias_dropout_fwd(x, bias, r, p, relu, s)
        gx, gb = ops.bias_dropout_bwd(dy, x, bias, p, relu, s, True)
        gd, _ = ops.bias_dropout_bwd(dy, x, bias, p, relu, s, False)
        return y, gx, gb, gd

    one, two = results_at_one_and_two_threads(run_relu)
    z = x + bias
    want_y = torch.where(keep, torch.relu(z) * scale, zero) + r
    want_gx = torch.where(keep & (z > 0), dy * scale, zero)
    for y, gx, gb, gd in (one, two):
        assert torch.equal(y, want_y)
        assert torch.equal(gx, want_gx) and torch.equal(gd, want_gx)
        torch.testing.assert_close(gb, want_gx.double().sum(0).float(), **REDUCTION[torch.float32])
    assert torch.equal(one[2], two[2])
