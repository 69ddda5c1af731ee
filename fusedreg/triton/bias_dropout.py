"""Triton kernels of bias_dropout: out = residual + dropout(act(x + bias)).

Tiling: the (M, N) input is cut into BLOCK_M x BLOCK_N tiles, one program per tile on a 1-D
grid. Without a bias the row length is irrelevant to the result (the mask indexes the flat
tensor), so the launcher views the tensor as rows of a fixed "virtual" width, which keeps
tiles full for any shape. When N % 4 == 0 each Philox call serves four adjacent columns
(ALIGNED4); otherwise each element draws its own lane.

Backward (z = x + bias, k = keep(i) * scale):
    grad_x    = grad_out * k * act'(z)
    grad_bias = sum over rows of grad_x, from per-program partials (n_row_programs, N) in the
                compute type (fp32; fp64 for fp64)
                summed in a fixed order on the host: bitwise deterministic.
"""
import torch
import triton
import triton.language as tl

from .._dtypes import compute_dtype
from ..reference.philox import dropout_scale
from .activation import activate, activate_grad
from .philox import dropout_uniform, dropout_uniform_x4

_VIRTUAL_WIDTH = 1024


@triton.jit
def _tile_offsets(base, row_start, col_start, M, N, total, BLOCK_M: tl.constexpr,
                  BLOCK_N: tl.constexpr):
    """Offsets of a (BLOCK_M, BLOCK_N) tile relative to ``base`` (int64 flat index of its
    first element, at (row_start, col_start)), and its mask. The offsets are int32: BLOCK_M > 1 only
    when N < _TILE, so they stay below max(N, _TILE * _TILE); only ``base`` needs 64 bits."""
    r = tl.arange(0, BLOCK_M)
    c = tl.arange(0, BLOCK_N)
    local = r[:, None] * N + c[None, :]
    rows_left = tl.minimum(M - row_start, BLOCK_M).to(tl.int32)
    elems_left = tl.minimum(total - base, 1 << 30).to(tl.int32)
    mask = (r[:, None] < rows_left) & (c[None, :] < N - col_start) & (local < elems_left)
    return local, mask


@triton.jit
def _dropout(v, seed, base, local, N, p, scale, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
             ALIGNED4: tl.constexpr):
    """v * scale where the element is kept, exactly 0 where dropped (also for an inf or NaN
    v: a select, not a multiply by 0), for a (BLOCK_M, BLOCK_N) tile."""
    if ALIGNED4:
        # N % 4 == 0, so base % 4 == 0 and columns 4j..4j+3 of a row share one Philox group:
        # base / 4 + (r * N + 4j) / 4.
        r = tl.arange(0, BLOCK_M)
        local4 = r[:, None] * N + 4 * tl.arange(0, BLOCK_N // 4)[None, :]
        u = dropout_uniform_x4(seed, (base >> 2) + (local4 >> 2))
    else:
        u = dropout_uniform(seed, base + local)
    return tl.where(u >= p, v * scale, 0.0)


@triton.jit
def _bias_dropout_fwd_kernel(
    X,  # (M, N) input
    B,  # (N,) bias, if HAS_BIAS
    R,  # (M, N) residual, if HAS_RESIDUAL
    Y,  # (M, N) output
    M, N, total, n_col_blocks,
    p, scale, seed,
    HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    ACT: tl.constexpr, ALIGNED4: tl.constexpr, IS_FP64: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid = tl.program_id(0)
    row_start = (pid // n_col_blocks).to(tl.int64) * BLOCK_M
    col_start = (pid % n_col_blocks) * BLOCK_N
    base = row_start * N + col_start
    local, mask = _tile_offsets(base, row_start, col_start, M, N, total, BLOCK_M, BLOCK_N)
    ct = tl.float64 if IS_FP64 else tl.float32
    z = tl.load(X + base + local, mask=mask, other=0.0).to(ct)
    if HAS_BIAS:
        cols = col_start + tl.arange(0, BLOCK_N)
        z += tl.load(B + cols, mask=cols < N, other=0.0).to(ct)[None, :]
    v = activate(z, ACT)
    if HAS_DROPOUT:
        v = _dropout(v, seed, base, local, N, p, scale, BLOCK_M, BLOCK_N, ALIGNED4)
    if HAS_RESIDUAL:
        v += tl.load(R + base + local, mask=mask, other=0.0).to(ct)
    tl.store(Y + base + local, v.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _bias_dropout_bwd_kernel(
    G,   # (M, N) grad_out
    X,   # (M, N) input, if ACT != 0
    B,   # (N,) bias, if HAS_BIAS and ACT != 0
    GX,  # (M, N) grad_x
    GB_PARTIAL,  # (n_row_programs, N) fp32 (fp64 for fp64) partial sums, if NEED_GRAD_BIAS
    M, N, total, n_col_blocks, rows_per_program,
    p, scale, seed,
    HAS_BIAS: tl.constexpr, HAS_DROPOUT: tl.constexpr, NEED_GRAD_BIAS: tl.constexpr,
    ACT: tl.constexpr, ALIGNED4: tl.constexpr, IS_FP64: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # Program (pid_m, pid_n) covers rows [pid_m * rows_per_program, ...) in BLOCK_M steps.
    pid = tl.program_id(0)
    pid_m = pid // n_col_blocks
    ct = tl.float64 if IS_FP64 else tl.float32
    col_start = (pid % n_col_blocks) * BLOCK_N
    cols = col_start + tl.arange(0, BLOCK_N)
    if HAS_BIAS and ACT != 0:
        b = tl.load(B + cols, mask=cols < N, other=0.0).to(ct)
    acc = tl.zeros((BLOCK_N,), dtype=ct)
    row0 = pid_m.to(tl.int64) * rows_per_program
    for r in range(0, rows_per_program, BLOCK_M):
        row_start = row0 + r
        base = row_start * N + col_start  # the only 64-bit index arithmetic: one per step
        local, mask = _tile_offsets(base, row_start, col_start, M, N, total, BLOCK_M, BLOCK_N)
        d = tl.load(G + base + local, mask=mask, other=0.0).to(ct)
        if HAS_DROPOUT:
            d = _dropout(d, seed, base, local, N, p, scale, BLOCK_M, BLOCK_N, ALIGNED4)
        if ACT != 0:
            z = tl.load(X + base + local, mask=mask, other=0.0).to(ct)
            if HAS_BIAS:
                z += b[None, :]
            d = d * activate_grad(z, ACT)
        tl.store(GX + base + local, d.to(GX.dtype.element_ty), mask=mask)
        if NEED_GRAD_BIAS:
            acc += tl.sum(tl.where(mask, d, 0.0), axis=0)
    if NEED_GRAD_BIAS:
        tl.store(GB_PARTIAL + pid_m * N + cols, acc, mask=cols < N)


def _geometry(x, has_bias):
    """(M, N) of the tiling: real rows with a bias, virtual rows without."""
    total = x.numel()
    if has_bias:
        n = x.shape[-1]
        return total // n, n
    n = min(_VIRTUAL_WIDTH, max(4, triton.next_power_of_2(total)))
    return triton.cdiv(total, n), n


# Elements per program: 8 per thread with 4 warps (16-byte loads of bf16). Larger tiles
# (4096 were tried) need 110-250 registers per thread and spill in the fp32 per-element-mask
# and fp64 variants (sm_90 compile, benchmarks/results/sm90_resources.md).
_TILE = 1024


def _blocks(M, N):
    block_n = min(_TILE, max(4, triton.next_power_of_2(N)))
    block_m = max(1, min(_TILE // block_n, triton.next_power_of_2(M)))
    return block_m, block_n


def _dense(t):
    """t contiguous (None stays None): the kernels index every operand as a dense array, so
    an expanded, stepped or transposed view is copied here rather than read out of bounds."""
    return None if t is None else t.contiguous()


def bias_dropout_fwd(x, bias, residual, p: float, activation: int, seed: int) -> torch.Tensor:
    x, bias, residual = _dense(x), _dense(bias), _dense(residual)
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    total = x.numel()
    if total == 0:
        return out
    M, N = _geometry(x, bias is not None)
    block_m, block_n = _blocks(M, N)
    n_col_blocks = triton.cdiv(N, block_n)
    grid = (triton.cdiv(M, block_m) * n_col_blocks,)
    _bias_dropout_fwd_kernel[grid](
        x, bias if bias is not None else x, residual if residual is not None else x, out,
        M, N, total, n_col_blocks,
        p, dropout_scale(p), seed,
        HAS_BIAS=bias is not None, HAS_RESIDUAL=residual is not None, HAS_DROPOUT=p > 0.0,
        ACT=activation, ALIGNED4=(N % 4 == 0 and block_n >= 4), IS_FP64=x.dtype == torch.float64,
        BLOCK_M=block_m, BLOCK_N=block_n, num_warps=4,
    )
    return out


def bias_dropout_bwd(grad_out, x, bias, p: float, activation: int, seed: int, need_grad_bias: bool):
    g, bias = grad_out.contiguous(), _dense(bias)
    gx = torch.empty_like(g, memory_format=torch.contiguous_format)
    total = g.numel()
    has_bias = bias is not None
    if total == 0:
        gb = torch.zeros_like(bias) if need_grad_bias else g.new_empty(0)
        return gx, gb
    M, N = _geometry(g, has_bias)
    block_m, block_n = _blocks(M, N)
    n_col_blocks = triton.cdiv(N, block_n)
    # At most ~256 row programs, each walking its rows in BLOCK_M steps; the split depends on
    # M and N only, so the partial sums (and grad_bias) are the same on every run.
    rows_per_program = max(block_m, triton.cdiv(triton.cdiv(M, 256), block_m) * block_m)
    n_row_programs = triton.cdiv(M, rows_per_program)
    partial = (torch.empty((n_row_programs, N), dtype=compute_dtype(g.dtype), device=g.device)
               if need_grad_bias else gx)
    xc = x.contiguous() if activation != 0 else g
    _bias_dropout_bwd_kernel[(n_row_programs * n_col_blocks,)](
        g, xc, bias if has_bias else g, gx, partial,
        M, N, total, n_col_blocks, rows_per_program,
        p, dropout_scale(p), seed,
        HAS_BIAS=has_bias, HAS_DROPOUT=p > 0.0, NEED_GRAD_BIAS=need_grad_bias,
        ACT=activation, ALIGNED4=(N % 4 == 0 and block_n >= 4), IS_FP64=g.dtype == torch.float64,
        BLOCK_M=block_m, BLOCK_N=block_n, num_warps=4,
    )
    gb = partial.sum(0).to(bias.dtype) if need_grad_bias else g.new_empty(0)
    return gx, gb


# ---- compile specs (tests/test_triton_compile.py, benchmarks/resource_report.py) -------------
# One spec per meaningful constexpr variant, as the launchers above produce them: the main
# case (bf16, bias + residual, aligned groups of 4, (1, 1024) tiles), each activation, the
# per-element mask (N % 4 != 0), (4, 256) and small-N (256, 4) tiles, no dropout, fp64, int64 sizes
# (tensors of more than 2^31 elements: Triton types such int arguments as i64).
def _fwd_spec(dt, act, block_m=1, block_n=1024, bias=True, residual=True, dropout=True,
              aligned4=True, **ints):
    sig = dict(X=f"*{dt}", B=f"*{dt}", R=f"*{dt}", Y=f"*{dt}", M="i32", N="i32", total="i32",
               n_col_blocks="i32", p="fp32", scale="fp32", seed="i64")
    sig.update(ints)
    consts = dict(HAS_BIAS=bias, HAS_RESIDUAL=residual, HAS_DROPOUT=dropout, ACT=act,
                  ALIGNED4=aligned4, IS_FP64=dt == "fp64", BLOCK_M=block_m, BLOCK_N=block_n)
    return _bias_dropout_fwd_kernel, sig, consts, {"num_warps": 4}


def _bwd_spec(dt, act, block_m=1, block_n=1024, bias=True, grad_bias=True, dropout=True,
              aligned4=True, **ints):
    sig = dict(G=f"*{dt}", X=f"*{dt}", B=f"*{dt}", GX=f"*{dt}",
               GB_PARTIAL=("*fp64" if dt == "fp64" else "*fp32") if grad_bias else f"*{dt}", M="i32", N="i32", total="i32",
               n_col_blocks="i32", rows_per_program="i32", p="fp32", scale="fp32", seed="i64")
    sig.update(ints)
    consts = dict(HAS_BIAS=bias, HAS_DROPOUT=dropout, NEED_GRAD_BIAS=grad_bias, ACT=act,
                  ALIGNED4=aligned4, IS_FP64=dt == "fp64", BLOCK_M=block_m, BLOCK_N=block_n)
    return _bias_dropout_bwd_kernel, sig, consts, {"num_warps": 4}


COMPILE_SPECS = [
    _fwd_spec("bf16", 0),
    _fwd_spec("fp16", 1, residual=False),
    _fwd_spec("fp32", 2, aligned4=False),
    _fwd_spec("bf16", 3, bias=False, dropout=False, block_m=4, block_n=256),
    _fwd_spec("bf16", 4, block_m=256, block_n=4),
    _fwd_spec("fp64", 2),
    _fwd_spec("bf16", 0, total="i64", bias=False),
    _fwd_spec("fp32", 0, M="i64", N="i64", total="i64", aligned4=False),
    _bwd_spec("bf16", 0),
    _bwd_spec("fp16", 1, grad_bias=False),
    _bwd_spec("fp32", 2, aligned4=False),
    _bwd_spec("bf16", 3, dropout=False, block_m=4, block_n=256),
    _bwd_spec("bf16", 4, block_m=256, block_n=4),
    _bwd_spec("fp64", 2),
    _bwd_spec("bf16", 0, total="i64", bias=False, grad_bias=False),
    _bwd_spec("fp32", 0, M="i64", N="i64", total="i64", rows_per_program="i64"),
]
