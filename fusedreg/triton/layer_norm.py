"""Triton kernels of layer_norm: y = norm(h) * w + b with h = residual + dropout(x).

One program per row in forward. A row that fits one block (N <= _MAX_BLOCK_N) is loaded once
and kept in registers (ONE_BLOCK); a longer row is walked in BLOCK_N chunks twice: the first
walk forms h (stored to H) and combines per-chunk (mean, M2) pairs (Chan et al.), the second
re-reads h and writes y. The mask index of element (row, col) is row * N + col
(docs/design.md, "The dropout mask"); when N % 4 == 0 one Philox call serves four adjacent
columns (ALIGNED4).

Backward (xhat = (h - mean) * rstd, RMS: h * rstd; g = dy * w):
    c1 = mean(g) (0 for RMS), c2 = mean(g * xhat)
    dh = rstd * (g - c1 - xhat * c2) + dh_out          -> grad_residual
    grad_x = dh * keep * scale
    grad_w = sum_rows dy * xhat, grad_b = sum_rows dy   from fp32 per-program partials
           (n_programs, N), each program owning a fixed row range; summed in order on the
           host: bitwise deterministic.
"""
import torch
import triton
import triton.language as tl

from .._dtypes import compute_dtype

from ..reference.philox import dropout_scale
from .philox import dropout_uniform, dropout_uniform_x4

_MAX_BLOCK_N = 8192  # longest row held in registers; longer rows are chunked
# The backward keeps about twice as many row-sized values live (dy, x-hat, w, the mask, dh_out,
# the dW/dB partials): at 8192 it spills even at 16 warps (128 registers per thread), so it
# holds rows up to 4096 and chunks longer ones (tests/test_triton_compile.py checks spills).
_MAX_BWD_BLOCK_N = 4096


@triton.jit
def _dropout(v, seed, row, cols, col0, N, p, scale, BLOCK_N: tl.constexpr, ALIGNED4: tl.constexpr):
    """v * scale where element (row, cols) is kept, exactly 0 where dropped (a select: a
    dropped inf or NaN gives 0, not NaN); cols = col0 + arange."""
    if ALIGNED4:
        group = (row * N + col0 + 4 * tl.arange(0, BLOCK_N // 4)) >> 2
        u = dropout_uniform_x4(seed, group)
    else:
        u = dropout_uniform(seed, row * N + cols)
    return tl.where(u >= p, v * scale, 0.0)


@triton.jit
def _load_h(X, R, H, row, cols, col0, mask, N, p, scale, seed,
            HAS_RESIDUAL: tl.constexpr, HAS_DROPOUT: tl.constexpr, STORE_H: tl.constexpr,
            ALIGNED4: tl.constexpr, BLOCK_N: tl.constexpr, CT: tl.constexpr):
    """h = residual + dropout(x) for one chunk of a row, rounded through H's dtype."""
    h = tl.load(X + row * N + cols, mask=mask, other=0.0).to(CT)
    if HAS_DROPOUT:
        h = _dropout(h, seed, row, cols, col0, N, p, scale, BLOCK_N, ALIGNED4)
    if HAS_RESIDUAL:
        h += tl.load(R + row * N + cols, mask=mask, other=0.0).to(CT)
    if STORE_H:
        hs = h.to(H.dtype.element_ty)
        tl.store(H + row * N + cols, hs, mask=mask)
        h = hs.to(CT)
    return h


@triton.jit
def _layer_norm_fwd_kernel(
    X,     # (M, N) input
    R,     # (M, N) residual, if HAS_RESIDUAL (h's dtype)
    W,     # (N,) weight, if HAS_WEIGHT
    B,     # (N,) bias, if HAS_BIAS
    Y,     # (M, N) output (x's dtype)
    H,     # (M, N) h, if STORE_H
    MEAN,  # (M,) mean, if not RMS
    RSTD,  # (M,) 1 / sqrt(var + eps)
    N, eps, p, scale, seed,
    RMS: tl.constexpr, HAS_RESIDUAL: tl.constexpr, HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_DROPOUT: tl.constexpr, STORE_H: tl.constexpr,
    ALIGNED4: tl.constexpr, IS_FP64: tl.constexpr, ONE_BLOCK: tl.constexpr, BLOCK_N: tl.constexpr,
):
    CT: tl.constexpr = tl.float64 if IS_FP64 else tl.float32
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_N)
    if ONE_BLOCK:
        mask = offs < N
        h = _load_h(X, R, H, row, offs, 0, mask, N, p, scale, seed, HAS_RESIDUAL, HAS_DROPOUT,
                    STORE_H, ALIGNED4, BLOCK_N, CT)
        if RMS:
            mean = 0.0
            d = h
        else:
            mean = tl.sum(h, axis=0) / N
            d = tl.where(mask, h - mean, 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(d * d, axis=0) / N + eps)
        y = d * rstd
        if HAS_WEIGHT:
            y = y * tl.load(W + offs, mask=mask, other=0.0).to(CT)
        if HAS_BIAS:
            y = y + tl.load(B + offs, mask=mask, other=0.0).to(CT)
        tl.store(Y + row * N + offs, y.to(Y.dtype.element_ty), mask=mask)
    else:
        # walk 1: h chunk by chunk; (mean, m2) combined across chunks (Chan et al.)
        mean = tl.zeros((), dtype=CT)
        m2 = tl.zeros((), dtype=CT)
        count = tl.zeros((), dtype=CT)
        for col0 in range(0, N, BLOCK_N):
            cols = col0 + offs
            mask = cols < N
            h = _load_h(X, R, H, row, cols, col0, mask, N, p, scale, seed, HAS_RESIDUAL,
                        HAS_DROPOUT, STORE_H, ALIGNED4, BLOCK_N, CT)
            n_c = tl.sum(mask.to(CT), axis=0)
            if RMS:
                m2 += tl.sum(h * h, axis=0)
            else:
                mean_c = tl.sum(h, axis=0) / n_c
                d = tl.where(mask, h - mean_c, 0.0)
                m2_c = tl.sum(d * d, axis=0)
                total = count + n_c
                delta = mean_c - mean
                mean += delta * (n_c / total)
                m2 += m2_c + delta * delta * (count * n_c / total)
            count += n_c
        if RMS:
            mean = tl.zeros((), dtype=CT)
        rstd = 1.0 / tl.sqrt(m2 / N + eps)
        # walk 2: y from h (re-read from H, else recomputed from x)
        for col0 in range(0, N, BLOCK_N):
            cols = col0 + offs
            mask = cols < N
            if STORE_H:
                h = tl.load(H + row * N + cols, mask=mask, other=0.0).to(CT)
            else:
                h = tl.load(X + row * N + cols, mask=mask, other=0.0).to(CT)
            y = (h - mean) * rstd
            if HAS_WEIGHT:
                y = y * tl.load(W + cols, mask=mask, other=0.0).to(CT)
            if HAS_BIAS:
                y = y + tl.load(B + cols, mask=mask, other=0.0).to(CT)
            tl.store(Y + row * N + cols, y.to(Y.dtype.element_ty), mask=mask)
    if not RMS:
        tl.store(MEAN + row, mean)
    tl.store(RSTD + row, rstd)


@triton.jit
def _layer_norm_bwd_kernel(
    DY,     # (M, N) grad of y (x's dtype)
    DHO,    # (M, N) grad of the returned h, if HAS_DH_OUT (h's dtype)
    H,      # (M, N) the normalized input h
    W,      # (N,) weight, if HAS_WEIGHT
    MEAN,   # (M,) if not RMS
    RSTD,   # (M,)
    DX,     # (M, N) grad_x (x's dtype)
    DR,     # (M, N) grad_residual, if STORE_DRESIDUAL (h's dtype)
    DW_PARTIAL,  # (n_programs, N) fp32 (fp64) partial sums, if NEED_DW; zero-initialized
    DB_PARTIAL,  # (n_programs, N), if NEED_DB; zero-initialized
    M, N, rows_per_program, p, scale, seed,
    RMS: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_DH_OUT: tl.constexpr,
    STORE_DRESIDUAL: tl.constexpr, HAS_DROPOUT: tl.constexpr, NEED_DW: tl.constexpr,
    NEED_DB: tl.constexpr, ALIGNED4: tl.constexpr, IS_FP64: tl.constexpr,
    ONE_BLOCK: tl.constexpr, BLOCK_N: tl.constexpr,
):
    CT: tl.constexpr = tl.float64 if IS_FP64 else tl.float32
    pid = tl.program_id(0)
    offs = tl.arange(0, BLOCK_N)
    row_start = pid.to(tl.int64) * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, M)
    if ONE_BLOCK:
        mask = offs < N
        if HAS_WEIGHT:
            w = tl.load(W + offs, mask=mask, other=0.0).to(CT)
        acc_w = tl.zeros((BLOCK_N,), dtype=CT)
        acc_b = tl.zeros((BLOCK_N,), dtype=CT)
        for row in range(row_start, row_end):
            rstd = tl.load(RSTD + row)
            h = tl.load(H + row * N + offs, mask=mask, other=0.0).to(CT)
            if RMS:
                xhat = h * rstd
            else:
                xhat = tl.where(mask, (h - tl.load(MEAN + row)) * rstd, 0.0)
            dy = tl.load(DY + row * N + offs, mask=mask, other=0.0).to(CT)
            g = dy
            if HAS_WEIGHT:
                g = g * w
            c2 = tl.sum(g * xhat, axis=0) / N
            if RMS:
                dh = rstd * (g - xhat * c2)
            else:
                dh = rstd * (g - tl.sum(g, axis=0) / N - xhat * c2)
            if HAS_DH_OUT:
                dh += tl.load(DHO + row * N + offs, mask=mask, other=0.0).to(CT)
            if STORE_DRESIDUAL:
                tl.store(DR + row * N + offs, dh.to(DR.dtype.element_ty), mask=mask)
            if HAS_DROPOUT:
                dh = _dropout(dh, seed, row, offs, 0, N, p, scale, BLOCK_N, ALIGNED4)
            tl.store(DX + row * N + offs, dh.to(DX.dtype.element_ty), mask=mask)
            if NEED_DW:
                acc_w += dy * xhat
            if NEED_DB:
                acc_b += dy
        if NEED_DW:
            tl.store(DW_PARTIAL + pid * N + offs, acc_w, mask=mask)
        if NEED_DB:
            tl.store(DB_PARTIAL + pid * N + offs, acc_b, mask=mask)
    else:
        for row in range(row_start, row_end):
            rstd = tl.load(RSTD + row)
            if RMS:
                mean = 0.0
            else:
                mean = tl.load(MEAN + row)
            # walk 1: c1 = mean(g), c2 = mean(g * xhat)
            s1 = tl.zeros((), dtype=CT)
            s2 = tl.zeros((), dtype=CT)
            for col0 in range(0, N, BLOCK_N):
                cols = col0 + offs
                mask = cols < N
                h = tl.load(H + row * N + cols, mask=mask, other=0.0).to(CT)
                xhat = tl.where(mask, (h - mean) * rstd, 0.0)
                g = tl.load(DY + row * N + cols, mask=mask, other=0.0).to(CT)
                if HAS_WEIGHT:
                    g = g * tl.load(W + cols, mask=mask, other=0.0).to(CT)
                s1 += tl.sum(g, axis=0)
                s2 += tl.sum(g * xhat, axis=0)
            c2 = s2 / N
            if RMS:
                c1 = 0.0
            else:
                c1 = s1 / N
            # walk 2: the grads; partial rows are owned by this program (no atomics)
            for col0 in range(0, N, BLOCK_N):
                cols = col0 + offs
                mask = cols < N
                h = tl.load(H + row * N + cols, mask=mask, other=0.0).to(CT)
                xhat = tl.where(mask, (h - mean) * rstd, 0.0)
                dy = tl.load(DY + row * N + cols, mask=mask, other=0.0).to(CT)
                g = dy
                if HAS_WEIGHT:
                    g = g * tl.load(W + cols, mask=mask, other=0.0).to(CT)
                dh = rstd * (g - c1 - xhat * c2)
                if HAS_DH_OUT:
                    dh += tl.load(DHO + row * N + cols, mask=mask, other=0.0).to(CT)
                if STORE_DRESIDUAL:
                    tl.store(DR + row * N + cols, dh.to(DR.dtype.element_ty), mask=mask)
                if HAS_DROPOUT:
                    dh = _dropout(dh, seed, row, cols, col0, N, p, scale, BLOCK_N, ALIGNED4)
                tl.store(DX + row * N + cols, dh.to(DX.dtype.element_ty), mask=mask)
                if NEED_DW:
                    pw = DW_PARTIAL + pid * N + cols
                    tl.store(pw, tl.load(pw, mask=mask, other=0.0) + dy * xhat, mask=mask)
                if NEED_DB:
                    pb = DB_PARTIAL + pid * N + cols
                    tl.store(pb, tl.load(pb, mask=mask, other=0.0) + dy, mask=mask)


def _block(N, max_one_block=_MAX_BLOCK_N):
    one_block = N <= max_one_block
    block_n = max(4, triton.next_power_of_2(N)) if one_block else min(max_one_block, 4096)
    num_warps = min(16, max(1, block_n // 256))
    return one_block, block_n, num_warps


def layer_norm_fwd(x, residual, weight, bias, eps: float, p: float, seed: int, rms: bool,
                   h_dtype: torch.dtype, store_h: bool):
    M, N = x.shape
    # the kernels index every operand as a dense array: views (expanded, stepped, transposed)
    # are copied here rather than read out of bounds
    x, residual, weight, bias = (t.contiguous() if t is not None else None
                                 for t in (x, residual, weight, bias))
    ct = compute_dtype(x.dtype)
    y = torch.empty((M, N), dtype=x.dtype, device=x.device)
    # h is always materialized when it is not x itself, so that y normalizes the rounded h.
    need_h = store_h or residual is not None or p > 0.0 or h_dtype != x.dtype
    h = torch.empty((M, N) if need_h else (0,), dtype=h_dtype, device=x.device)
    mean = torch.empty((0,) if rms else (M,), dtype=ct, device=x.device)
    rstd = torch.empty((M,), dtype=ct, device=x.device)
    if M == 0 or N == 0:
        return y, (h if store_h else torch.empty(0, dtype=h_dtype, device=x.device)), mean, rstd
    one_block, block_n, num_warps = _block(N)
    _layer_norm_fwd_kernel[(M,)](
        x, residual if residual is not None else x, weight if weight is not None else x,
        bias if bias is not None else x, y, h if need_h else y, mean if not rms else rstd, rstd,
        N, eps, p, dropout_scale(p), seed,
        RMS=rms, HAS_RESIDUAL=residual is not None, HAS_WEIGHT=weight is not None,
        HAS_BIAS=bias is not None, HAS_DROPOUT=p > 0.0, STORE_H=need_h,
        ALIGNED4=N % 4 == 0, IS_FP64=ct == torch.float64, ONE_BLOCK=one_block, BLOCK_N=block_n,
        num_warps=num_warps,
    )
    if not store_h:
        h = torch.empty(0, dtype=h_dtype, device=x.device)
    return y, h, mean, rstd


def _n_programs(M, N):
    # Fixed by (M, N) only, so the partial sums, and their sum, are the same on every run;
    # at most ~16M partial elements.
    return max(1, min(M, 512, (1 << 24) // max(N, 1)))


def layer_norm_bwd(dy, dh_out, h, weight, bias, mean, rstd, p: float, seed: int, rms: bool,
                   x_dtype: torch.dtype, need_grad_residual: bool, need_grad_weight: bool,
                   need_grad_bias: bool):
    M, N = h.shape
    dy, dh_out, h, weight, mean, rstd = (t.contiguous() if t is not None else None
                                         for t in (dy, dh_out, h, weight, mean, rstd))
    ct = rstd.dtype
    dx = torch.empty((M, N), dtype=x_dtype, device=h.device)
    dr = torch.empty((M, N) if need_grad_residual else (0,), dtype=h.dtype if need_grad_residual else dy.dtype,
                     device=h.device)
    if M == 0 or N == 0:
        gw = torch.zeros_like(weight) if need_grad_weight else dy.new_empty(0)
        gb = torch.zeros_like(bias) if need_grad_bias else dy.new_empty(0)
        return dx, dr, gw, gb
    one_block, block_n, num_warps = _block(N, _MAX_BWD_BLOCK_N)
    n_prog = _n_programs(M, N)
    rows_per_program = triton.cdiv(M, n_prog)
    n_prog = triton.cdiv(M, rows_per_program)
    pw = torch.zeros((n_prog, N), dtype=ct, device=h.device) if need_grad_weight else rstd
    pb = torch.zeros((n_prog, N), dtype=ct, device=h.device) if need_grad_bias else rstd
    _layer_norm_bwd_kernel[(n_prog,)](
        dy, dh_out if dh_out is not None else dy, h,
        weight if weight is not None else dy, mean if not rms else rstd, rstd, dx,
        dr if need_grad_residual else dx, pw, pb,
        M, N, rows_per_program, p, dropout_scale(p), seed,
        RMS=rms, HAS_WEIGHT=weight is not None, HAS_DH_OUT=dh_out is not None,
        STORE_DRESIDUAL=need_grad_residual, HAS_DROPOUT=p > 0.0, NEED_DW=need_grad_weight,
        NEED_DB=need_grad_bias, ALIGNED4=N % 4 == 0, IS_FP64=ct == torch.float64,
        ONE_BLOCK=one_block, BLOCK_N=block_n, num_warps=num_warps,
    )
    gw = pw.sum(0).to(weight.dtype) if need_grad_weight else dy.new_empty(0)
    gb = pb.sum(0).to(bias.dtype) if need_grad_bias else dy.new_empty(0)
    return dx, dr, gw, gb


def _fwd_spec(xt, ht, one_block, block_n, rms=False, res=False, drop=False, aligned=True, warps=4):
    st = "fp64" if xt == "fp64" else "fp32"
    wt = xt if xt == "fp64" else "fp32"
    sig = {"X": f"*{xt}", "R": f"*{ht}", "W": f"*{wt}", "B": f"*{wt}", "Y": f"*{xt}", "H": f"*{ht}",
           "MEAN": f"*{st}", "RSTD": f"*{st}", "N": "i32", "eps": "fp32", "p": "fp32",
           "scale": "fp32", "seed": "i64"}
    const = dict(RMS=rms, HAS_RESIDUAL=res, HAS_WEIGHT=True, HAS_BIAS=not rms, HAS_DROPOUT=drop,
                 STORE_H=res or drop, ALIGNED4=aligned, IS_FP64=xt == "fp64", ONE_BLOCK=one_block,
                 BLOCK_N=block_n)
    return _layer_norm_fwd_kernel, sig, const, {"num_warps": warps}


def _bwd_spec(xt, ht, one_block, block_n, rms=False, res=False, drop=False, aligned=True, warps=4):
    st = "fp64" if xt == "fp64" else "fp32"
    wt = xt if xt == "fp64" else "fp32"
    sig = {"DY": f"*{xt}", "DHO": f"*{ht}", "H": f"*{ht}", "W": f"*{wt}", "MEAN": f"*{st}",
           "RSTD": f"*{st}", "DX": f"*{xt}", "DR": f"*{ht}", "DW_PARTIAL": f"*{st}",
           "DB_PARTIAL": f"*{st}", "M": "i32", "N": "i32", "rows_per_program": "i32",
           "p": "fp32", "scale": "fp32", "seed": "i64"}
    const = dict(RMS=rms, HAS_WEIGHT=True, HAS_DH_OUT=res, STORE_DRESIDUAL=res, HAS_DROPOUT=drop,
                 NEED_DW=True, NEED_DB=not rms, ALIGNED4=aligned, IS_FP64=xt == "fp64",
                 ONE_BLOCK=one_block, BLOCK_N=block_n)
    return _layer_norm_bwd_kernel, sig, const, {"num_warps": warps}


# (kernel, runtime signature, constexprs, options) for the AOT compile test: every switch
# that changes the code, one-block and chunked rows, the dtypes in use.
COMPILE_SPECS = [_fwd_spec("bf16", "bf16", True, 8192, res=True, drop=True, warps=16)] + [
    spec(*args, **kw)
    for spec in (_fwd_spec, _bwd_spec)
    for args, kw in (
        (("fp32", "fp32", True, 1024), {}),
        (("bf16", "bf16", True, 4096), dict(res=True, drop=True, warps=16)),
        (("bf16", "fp32", False, 4096), dict(res=True, drop=True, aligned=False, warps=16)),
        (("fp16", "fp16", True, 2048), dict(rms=True, warps=8)),
        (("fp32", "fp32", False, 4096), dict(rms=True, warps=16)),
        (("fp64", "fp64", True, 256), dict(drop=True, aligned=False, warps=1)),
    )
]
