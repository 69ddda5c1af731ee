"""Kernel-level tests of the cpu layer_norm kernels (csrc/cpu/layer_norm.cpp): paths chosen
by a call's size and row length that the functional tests (test_layer_norm.py) do not reach."""
import pytest
import torch

import fusedreg
from fusedreg import functional as F

from _helpers import results_at_one_and_two_threads
from conftest import cpu_backends

BACKENDS = cpu_backends("layer_norm")


def _data(shape, dtype, seed, offset):
    g = torch.Generator().manual_seed(seed)
    # a non-zero mean, so that a kernel that forgets to subtract it cannot pass
    return (torch.randn(shape, generator=g, dtype=torch.float64) * 2 + offset).to(dtype)


@pytest.mark.skipif("cpu" not in BACKENDS, reason="the cpu backend is not built")
@pytest.mark.parametrize("dtype,N,rows", [(torch.float32, 771, 2800), (torch.float64, 1000, 1100)],
                         ids=["float32-771", "float64-1000"])
@pytest.mark.parametrize("grad_params", [True, False], ids=["dW-dB", "no-dW"])
def test_cpu_large_calls_of_odd_rows_equal_small_calls(dtype, N, rows, grad_params):
    """Calls of 8 MiB and more of float/double rows stream their outputs and prefetch two rows
    ahead (kRowsAhead), the backward's single rows too (no dW / dB to accumulate, or rows too
    short for pairs); rows of 771 floats / 1000 doubles start at a different page offset each.
    A large call's rows, on one thread and on two, equal bit for bit the same rows of small
    calls (rows are independent; dW / dB are compared with a float64 sum at a tolerance, as
    their row blocks differ between the calls)."""
    x = _data((rows, N), dtype, 1, 3.0)
    w, b = _data((N,), dtype, 2, 1.0), _data((N,), dtype, 3, 0.5)
    dy = _data((rows, N), dtype, 4, 0.0)

    def run(sl):
        xs = x[sl].clone().requires_grad_()
        ws, bs = w.clone().requires_grad_(grad_params), b.clone().requires_grad_(grad_params)
        with fusedreg.use_backend("cpu"):
            y = F.layer_norm(xs, (N,), ws, bs)
            z = F.rms_norm(xs, (N,), ws)
        torch.autograd.backward([y, z], [dy[sl], dy[sl]])
        return [y.detach(), z.detach(), xs.grad] + ([ws.grad, bs.grad] if grad_params else [])

    big1, big2 = results_at_one_and_two_threads(lambda: run(slice(None)))
    assert x.numel() * x.element_size() >= 8 << 20  # the streamed path
    for a1, a2 in zip(big1, big2):
        assert torch.equal(a1, a2)  # bitwise across thread counts, dW / dB included
    for sl in (slice(0, 37), slice(rows - 29, rows)):
        small = run(sl)
        for a1, c in zip(big1[:3], small[:3]):
            assert torch.equal(a1[sl], c)
    if grad_params:  # dW, dB of the whole call against float64
        x64, dy64 = x.double(), dy.double()
        mu = x64.mean(-1, keepdim=True)
        xhat = (x64 - mu) * torch.rsqrt(x64.var(-1, unbiased=False, keepdim=True) + 1e-5)
        xrms = x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + torch.finfo(dtype).eps)
        gw = (dy64 * xhat).sum(0) + (dy64 * xrms).sum(0)
        gb = dy64.sum(0)
        tol = 1e-3 if dtype == torch.float32 else 1e-10
        torch.testing.assert_close(big1[3].double(), gw, rtol=tol, atol=tol)
        torch.testing.assert_close(big1[4].double(), gb, rtol=tol, atol=tol)
