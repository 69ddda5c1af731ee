"""bias_dropout on a CUDA GPU: the triton and cuda backends against the reference on the CPU,
and their masks bit for bit against ``fusedreg.functional.dropout_mask``. Skipped where no GPU
is present; on a GPU a backend that cannot run (an extension built without CUDA, say) fails
with the reason. Run with ``FUSEDREG_TEST_NO_INTERPRET=1`` so that triton compiles for the GPU
instead of interpreting (benchmarks/gpu_check.sh does)."""
import pytest
import torch

import fusedreg
from fusedreg import backends
from fusedreg import functional as FF

from conftest import requires_cuda
from tolerances import ELEMENTWISE, REDUCTION

pytestmark = requires_cuda

BACKENDS = ["triton", "cuda"]
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
ACTIVATIONS = [None, "relu", "gelu", "gelu_tanh", "silu"]
SEEDS = [0, 1, 2**32 + 5, 2**63 + 11]

# Shapes, each with what it exercises:
SHAPES = [
    (1, 1, 1023),  # one row, odd N: Philox groups straddle rows; per-element bias columns
    (3, 7, 256),   # 3-D, N % 4 == 0: one Philox call and one bias load per four elements
    (37, 130),     # N % 4 == 2, rows not a multiple of any tile; cuda rows kernel unaligned
    (5,),          # 1-D: total < 8, only the tail path of the cuda flat kernels
    (1151, 96),    # many row blocks in the cuda grad_bias kernel (M / 64 of them), aligned
    (515, 1151),   # many row blocks, odd N, and a flat grid that loops
]


@pytest.fixture(params=BACKENDS)
def backend(request):
    name = request.param
    why = backends._why_unusable(name, "cuda")
    if why is None and name not in backends._IMPLEMENTED.get("bias_dropout", ()):
        why = "bias_dropout has no implementation registered for it"
    if why:
        pytest.fail(f"backend {name} cannot run on this GPU: {why}")
    return name


def _inputs(shape, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64) + 0.5  # non-zero mean
    b = torch.randn(shape[-1], generator=g, dtype=torch.float64) - 0.25
    r = torch.randn(shape, generator=g, dtype=torch.float64)
    return [t.to(dtype).to(device) for t in (x, b, r)]


def _run(backend, x, b, r, **kw):
    with fusedreg.use_backend(backend):
        return FF.bias_dropout(x, b, r, **kw)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("shape", [(1, 1023), (3, 7, 256), (2, 5, 3), (4097,), (33, 1151)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_mask_bit_identical(backend, seed, shape, with_bias):
    # x = 1, bias 0, no residual: the output is the scale where kept and 0 where dropped.
    x = torch.ones(shape, device="cuda")
    b = torch.zeros(shape[-1], device="cuda") if with_bias else None
    kept = _run(backend, x, b, None, p=0.3, seed=seed) != 0
    assert torch.equal(kept.cpu(), FF.dropout_mask(shape, 0.3, seed))


@pytest.mark.parametrize("shape", [(2048, 1000), (2048, 1001), (1, 3_000_001)])
def test_mask_bit_identical_large(backend, shape):
    # More elements than one sweep of the cuda flat kernels' resident grid (the bias column
    # is carried from sweep to sweep) and more than one Triton tile row.
    x = torch.ones(shape, device="cuda")
    b = torch.zeros(shape[-1], device="cuda")
    kept = _run(backend, x, b, None, p=0.5, seed=2**40 + 3) != 0
    assert torch.equal(kept.cpu(), FF.dropout_mask(shape, 0.5, 2**40 + 3))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("shape", SHAPES)
def test_forward_backward_match_reference(backend, dtype, activation, shape):
    x, b, r = _inputs(shape, dtype, "cuda")
    xs, bs, rs = (t.detach().clone().requires_grad_() for t in (x, b, r))
    out = _run(backend, xs, bs, rs, p=0.2, activation=activation, seed=7)
    xc, bc, rc = (t.detach().cpu().requires_grad_() for t in (x, b, r))
    expected = _run("reference", xc, bc, rc, p=0.2, activation=activation, seed=7)
    assert out.dtype == dtype and out.shape == x.shape and out.is_cuda
    torch.testing.assert_close(out.cpu(), expected.detach(), **ELEMENTWISE[dtype])

    g = torch.randn(shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64) - 0.1
    out.backward(g.to(dtype).cuda())
    expected.backward(g.to(dtype))
    torch.testing.assert_close(xs.grad.cpu(), xc.grad, **ELEMENTWISE[dtype])
    torch.testing.assert_close(rs.grad.cpu(), rc.grad, **ELEMENTWISE[dtype])
    torch.testing.assert_close(bs.grad.cpu(), bc.grad, **REDUCTION[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_plain_dropout(backend, dtype):
    # no bias, no residual: the cuda flat kernels without bias columns, Triton's virtual rows
    x, _, _ = _inputs((129, 77), dtype, "cuda")
    xs = x.detach().clone().requires_grad_()
    with fusedreg.use_backend(backend):
        out = FF.dropout(xs, p=0.4, seed=3)
    xc = x.detach().cpu().requires_grad_()
    expected = _run("reference", xc, None, None, p=0.4, seed=3)
    torch.testing.assert_close(out.cpu(), expected.detach(), **ELEMENTWISE[dtype])
    out.sum().backward()
    expected.sum().backward()
    torch.testing.assert_close(xs.grad.cpu(), xc.grad, **ELEMENTWISE[dtype])


def test_grad_bias_is_deterministic(backend):
    x, b, _ = _inputs((4096, 1000), torch.float32, "cuda")
    g = torch.randn_like(x)
    grads = []
    for _ in range(3):
        bs = b.detach().clone().requires_grad_()
        _run(backend, x, bs, None, p=0.1, activation="gelu", seed=11).backward(g)
        grads.append(bs.grad)
    assert torch.equal(grads[0], grads[1]) and torch.equal(grads[0], grads[2])


def test_identities(backend):
    x, b, r = _inputs((33, 64), torch.float32, "cuda")
    out = _run(backend, x, b, r, p=1.0, seed=5)
    torch.testing.assert_close(out, r)  # p = 1: everything dropped
    out = _run(backend, x, b, r, p=0.0)
    torch.testing.assert_close(out, x + b + r)
    out = _run(backend, x, b, r, p=0.5, training=False)
    torch.testing.assert_close(out, x + b + r)


def test_empty_and_non_contiguous_and_misaligned(backend):
    # zero rows: empty output, zero bias gradient
    x = torch.empty((0, 64), device="cuda", requires_grad=True)
    b = torch.randn(64, device="cuda", requires_grad=True)
    out = _run(backend, x, b, None, p=0.5, seed=1)
    assert out.shape == (0, 64)
    out.sum().backward()
    assert torch.equal(b.grad, torch.zeros_like(b))
    # a transposed view, and a contiguous view 4 bytes past an aligned address
    base, bias, _ = _inputs((70, 66), torch.float32, "cuda")
    for x in (base.t(), base.flatten()[1:4616].view(65, 71)):
        bias_x = torch.randn(x.shape[-1], device="cuda")
        out = _run(backend, x, bias_x, None, p=0.3, seed=9)
        expected = _run("reference", x.cpu(), bias_x.cpu(), None, p=0.3, seed=9)
        torch.testing.assert_close(out.cpu(), expected, **ELEMENTWISE[torch.float32])
