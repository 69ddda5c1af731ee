"""Kernel-level tests of the cpu layer_norm kernels (csrc/cpu/layer_norm.cpp): paths chosen
by a call's size and row length that the functional tests (test_layer_norm.py) do not reach."""
import numpy as np
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
    """Calls of float/double rows whose outputs are 8 MiB or more and whose x and y outgrow
    the L3 the kernels count on (cpu::l3_bytes: the rows are made that many) stream their
    outputs and prefetch two rows ahead (kRowsAhead), the backward's single rows too (no dW /
    dB to accumulate, or rows too short for pairs); rows of 771 floats / 1000 doubles start at
    a different page offset each. A large call's rows, on one thread and on two, equal bit for
    bit the same rows of small calls (rows are independent; dW / dB are compared with a
    float64 sum at a tolerance, as their row blocks differ between the calls)."""
    esize = torch.empty((), dtype=dtype).element_size()
    rows = max(rows, -(-torch.ops.fusedreg_bench.l3_bytes() // (2 * N * esize)))
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
    assert x.numel() * esize >= 8 << 20  # the streamed path (with the footprint above)
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


def _round_to_bf16_bits(t):
    """The bits of float32 t (no NaN) rounded to bf16 to nearest even, as c10 rounds (subnormals
    included; torch's own vectorized conversion is not relied on)."""
    u = t.view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    return ((u + ((u >> 16) & 1) + 0x7FFF) >> 16).to(torch.int32).to(torch.int16)


def _round_to_fp16_bits(t):
    """The bits of float32 t rounded to fp16 as c10 rounds: to nearest even (subnormals and
    overflow to inf included, by numpy's conversion rather than torch's), a NaN as its sign |
    0x7E00."""
    with np.errstate(over="ignore"):
        h = torch.from_numpy(t.numpy().astype(np.float16).view(np.int16))
    sign = (t.view(torch.int32) < 0).to(torch.int16) * -0x8000
    return torch.where(t.isnan(), sign | 0x7E00, h)



@pytest.mark.skipif("cpu" not in BACKENDS, reason="the cpu backend is not built")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bf16"])
@pytest.mark.parametrize("M,N", [(512, 128), (700, 96), (100, 768), (2047, 128), (2048, 128), (300, 250)],
                         ids=["512x128", "700x96", "100x768", "2047x128", "2048x128", "300x250"])
def test_cpu_short_rows_backward_blocks(M, N, dtype):
    """Backward calls of 2^16 to 2^18 elements with rows of up to 768 elements are cut into
    16K-element row blocks (kShortRowsMaxN: four or more, for two threads), and rows shorter
    than 1 KiB of float are not placed (kBwdPlaceMinRowBytes); 2048x128 (2^18) keeps the 64K
    blocks. Whatever the blocks: the same bits at one and two threads (dW and dB included),
    the first rows of grad_x / grad_residual equal to a small call's (rows are independent),
    and dW / dB the float64 sums of the rows' terms (a block left out or counted
    twice would be off by a whole block's share)."""
    p = 0.2
    x, r = _data((M, N), dtype, 21, 3.0), _data((M, N), dtype, 22, -1.0)
    w, b = _data((N,), dtype, 23, 1.0), _data((N,), dtype, 24, 0.5)
    dy = _data((M, N), dtype, 25, 0.0)

    def run(sl):
        xs, rs = x[sl].clone().requires_grad_(), r[sl].clone().requires_grad_()
        ws, bs = w.clone().requires_grad_(), b.clone().requires_grad_()
        with fusedreg.use_backend("cpu"):
            y = F.dropout_add_layer_norm(xs, rs, ws, bs, p=p, seed=5)
            z = F.rms_norm(xs, (N,), ws)
        torch.autograd.backward([y, z], [dy[sl], dy[sl]])
        return [xs.grad, rs.grad, ws.grad, bs.grad]

    one, two = results_at_one_and_two_threads(lambda: run(slice(None)))
    for a1, a2 in zip(one, two):
        assert torch.equal(a1, a2)
    # the first rows: a small call's mask indices start where the large call's do
    small = run(slice(0, 9))
    assert torch.equal(one[0][:9], small[0])
    assert torch.equal(one[1][:9], small[1])
    # dW and dB against float64: h = residual + the masked, scaled x, each rounded to dtype
    keep = F.dropout_mask((M, N), p, 5)
    scale = torch.tensor(1.0 / (1.0 - p), dtype=torch.float32)
    h = (torch.where(keep, (x.float() * scale).to(dtype).float(), 0.0) + r.float()).to(dtype).double()
    x64, dy64 = x.double(), dy.double()
    xhat = (h - h.mean(-1, keepdim=True)) * torch.rsqrt(h.var(-1, unbiased=False, keepdim=True) + 1e-5)
    eps = torch.finfo(dtype).eps
    xrms = x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + eps)
    gw, gb = (dy64 * xhat).sum(0) + (dy64 * xrms).sum(0), dy64.sum(0)
    # float32: sums of M terms of size ~1-10 in fp32 partials; bf16: dW / dB rounded to bf16
    tol = 2e-3 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(one[2].double(), gw, rtol=tol, atol=tol * M ** 0.5)
    torch.testing.assert_close(one[3].double(), gb, rtol=tol, atol=tol * M ** 0.5)

@pytest.mark.skipif("cpu" not in BACKENDS, reason="the cpu backend is not built")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("rms", [True, False], ids=["rms", "layer"])
@pytest.mark.parametrize("M,N,params", [
    *((M, N, params) for M, N in [(3, 1), (5, 7), (9, 16), (7, 48), (17, 1000), (4, 1031), (2000, 1008)]
      for params in ["w", "w32", "wb", "b", "none"]),
    (4000, 1000, "w"), (8200, 1040, "w"), (8200, 1040, "wb")])
def test_cpu_half_plain_norm_is_the_float32_kernel_rounded(M, N, params, rms, dtype):
    """A plain bf16 or fp16 norm (no dropout, no residual) reads its rows in place at the
    AVX-512 level when N is a multiple of 16 (else it converts them to float32 first); either
    way its statistics and its y before rounding are those of the same call on the float32
    copy of x (the same sums in the same order, the same expressions), so y is that call's y
    rounded to nearest even, bit for bit, and mean / rstd are equal, at one and two threads.
    N a multiple of 16 and not (4000 x 1000: rows whose sums' scalar tails once gave other
    bits), shorter than one vector, and a call whose x and y (34 MB) exceed a 32 MiB L3
    (streamed stores there); values of a non-zero mean, a weight that makes some outputs
    subnormals of the dtype (rounded as c10 rounds them), in fp16 some outputs past its range
    (inf), a row holding a NaN (y NaN, stored as sign | 0x7E00 in fp16, 0x7FC0 in bf16) and a
    row holding a -0 (RMSNorm's in-place rows skip the subtraction of their zero mean, which
    must keep every value: -0 - 0 is -0), and both weight dtypes."""
    x = _data((M, N), dtype, 5, 3.0)
    wdt = torch.float32 if params == "w32" else dtype
    w = _data((N,), wdt, 6, 1.0) if "w" in params else None
    b = _data((N,), wdt, 7, 0.5) if "b" in params else None
    if w is not None:
        # y under the dtype's smallest normal in every third column
        w[::3] *= 1e-38 if dtype == torch.bfloat16 else 1e-6
        if dtype == torch.float16 and N > 2:
            w[1::5] *= 3e4  # |y| past fp16's largest finite value in some rows
    if M > 2:
        x[1, N // 2] = float("nan")
        x[2, N // 3] = -0.0
    seed = torch.tensor([1], dtype=torch.int64)
    fwd = torch.ops.fusedreg.layer_norm_fwd

    def run(xs, ws, bs, h_dtype):
        return fwd(xs, None, ws, bs, 1e-5, 0.0, seed, rms, h_dtype, False)

    rounded = _round_to_bf16_bits if dtype == torch.bfloat16 else _round_to_fp16_bits
    for y, _, mean, rstd in results_at_one_and_two_threads(lambda: run(x, w, b, dtype)):
        f = lambda t: None if t is None else t.float()  # noqa: E731
        y32, _, mean32, rstd32 = run(x.float(), f(w), f(b), torch.float32)
        assert y.dtype == dtype
        yb, yb32 = y.view(torch.int16), rounded(y32)
        nan = y32.isnan()
        assert torch.equal(yb[~nan], yb32[~nan])
        assert torch.equal(yb[nan] & 0x7FFF, yb32[nan] & 0x7FFF)  # NaN as sign | 0x7E00
        # bitwise, NaN for NaN (a NaN's sign and payload are left to the instructions)
        for s, s32 in ((rstd, rstd32), (mean, mean32)):
            assert torch.equal(s.isnan(), s32.isnan())
            assert torch.equal(s.nan_to_num(0).view(torch.int32), s32.nan_to_num(0).view(torch.int32))
        # and the reference's math in float64, within the dtype's rounding of y (a half ulp)
        x64 = x.double()
        mu = torch.zeros(M, 1, dtype=torch.float64) if rms else x64.mean(-1, keepdim=True)
        ref = (x64 - mu) * torch.rsqrt((x64 - mu).pow(2).mean(-1, keepdim=True) + 1e-5)
        ref = ref * (w.double() if w is not None else 1) + (b.double() if b is not None else 0)
        tol = 2 ** -8 if dtype == torch.bfloat16 else 2 ** -10
        ref = torch.where(y.isinf(), ref.to(dtype).double(), ref)  # past fp16's range: inf both
        # columns of a large weight relative to it: the float32 mean's rounding, times w
        scale = w.double().abs().clamp(min=1) if w is not None else 1
        torch.testing.assert_close(y.double() / scale, ref / scale, rtol=tol, atol=1e-5, equal_nan=True)
        torch.testing.assert_close(rstd.double(), 1 / (x64 - mu).pow(2).mean(-1).add(1e-5).sqrt(),
                                   rtol=1e-5, atol=0, equal_nan=True)


@pytest.mark.skipif("cpu" not in BACKENDS, reason="the cpu backend is not built")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("rms", [True, False], ids=["rms", "layer"])
@pytest.mark.parametrize("M,N,kind", [
    *((M, N, kind) for M, N in [(5, 16), (7, 48), (9, 1008), (6, 1024), (3, 4096), (4, 1000), (5, 20)]
      for kind in ["plain", "no-dW", "fused"]),
    (4100, 1024, "plain"), (2100, 2048, "fused")])
def test_cpu_half_norm_backward_is_the_float32_kernel_rounded(M, N, kind, rms, dtype):
    """The bf16 / fp16 backward reads dy and h in place and rounds grad_x in registers at the
    AVX-512 level when N is a multiple of 16 (else, and at other levels, it converts the rows to
    float32 first). Either way it is the float32 kernel's backward on the widened rows: grad_x
    and grad_residual that call's outputs rounded to nearest even, dW and dB its sums rounded,
    bit for bit (NaN for NaN), at one and two threads. Single rows and pairs (rows of 1024 and
    more with dW / dB), calls whose outputs stream (8 MiB and more), the dropout_add_layer_norm
    backward (dropout, the prenorm output's gradient dh_out and grad_residual: "fused"), dy with
    a NaN, infinities and values whose gradients are subnormals of the dtype."""
    x = _data((M, N), dtype, 8, 3.0)
    w = _data((N,), dtype, 9, 1.0)
    b = None if rms else _data((N,), dtype, 10, 0.5)
    dy = _data((M, N), dtype, 11, 0.0)
    if M > 3:
        dy[1, N // 2] = float("nan")
        dy[2, N // 3] = float("inf")
        dy[3, N // 5] = -float("inf")
    if M > 4:  # a row of dy so small that its grad_x are subnormals of the dtype
        dy[4] *= 1e-38 if dtype == torch.bfloat16 else 1e-5
    fused = kind == "fused"
    p = 0.25 if fused else 0.0
    res = _data((M, N), dtype, 12, -1.0) if fused else None
    dh_out = _data((M, N), dtype, 13, 0.0) if fused else None
    seed = torch.tensor([7], dtype=torch.int64)
    grads = kind != "no-dW"

    rounded = _round_to_bf16_bits if dtype == torch.bfloat16 else _round_to_fp16_bits

    def same(t, t32):
        assert t.dtype == dtype and t.shape == t32.shape
        bits, bits32 = t.view(torch.int16), rounded(t32)
        nan = t32.isnan()
        assert torch.equal(t.isnan(), nan)
        assert torch.equal(bits[~nan], bits32[~nan])

    # The float32 call on the widened rows. Its h is the bf16 / fp16 call's h widened: rounding
    # h is the one step where the two calls differ, so the float32 backward gets that h.
    _, h, mean, rstd = torch.ops.fusedreg.layer_norm_fwd(x, res, w, b, 1e-5, p, seed, rms, dtype, True)
    out32 = torch.ops.fusedreg.layer_norm_bwd(dy.float(), None if dh_out is None else dh_out.float(), h.float(),
                                              w.float(), None if b is None else b.float(), mean, rstd, p, seed,
                                              rms, torch.float32, fused, grads, grads and not rms)
    ran = results_at_one_and_two_threads(lambda: torch.ops.fusedreg.layer_norm_bwd(
        dy, dh_out, h, w, b, mean, rstd, p, seed, rms, dtype, fused, grads, grads and not rms))
    for out in ran:
        for t, t32 in zip(out, out32):
            if t32.numel():
                same(t, t32)
            else:
                assert t.numel() == 0
    # grad_x against float64 math, so that the two calls agreeing is not enough
    if not fused:
        h64, dy64, w64 = h.double(), dy.double(), w.double()
        mu = torch.zeros(M, 1, dtype=torch.float64) if rms else h64.mean(-1, keepdim=True)
        rs = torch.rsqrt((h64 - mu).pow(2).mean(-1, keepdim=True) + 1e-5)
        xhat, g = (h64 - mu) * rs, dy64 * w64
        c1 = torch.zeros_like(mu) if rms else g.mean(-1, keepdim=True)
        gx = rs * (g - c1 - xhat * (g * xhat).mean(-1, keepdim=True))
        ok = torch.isfinite(dy.float()).all(-1) & (dy.float().abs().amax(-1) > 1e-3)
        tol = 2 ** -7 if dtype == torch.bfloat16 else 2 ** -9
        scale = gx[ok].abs().amax(-1, keepdim=True).clamp(min=1e-30)
        torch.testing.assert_close(ran[0][0][ok].double() / scale, gx[ok] / scale, rtol=tol, atol=tol)
