"""Triton kernels of batch_norm: y = dropout(act((x - mean) * invstd * w + b + residual)).

x is stored (N, C, S) (NCHW) or, channels-last, (N, S, C) = (L, C) rows (fusedreg/ops/batch_norm.py).
The mask index of an element is its flat index in the logical (N, C, S) tensor
(docs/design.md, "The dropout mask"): the memory offset for (N, C, S), and
(r // S) * C * S + c * S + r % S for row r, channel c of (L, C).

Per-channel reductions are two-level and deterministic: the elements of a channel are cut
into blocks fixed by the shape alone; each program reduces one (block, channel-tile) to a
partial in fp32 registers (a tree of fixed shape), writes it to a (n_blocks, C) array, and
the host combines the partials in block order — no atomics.

stats     each block: count n_b, mean_b and m2_b from sums of (x - K), (x - K)^2 with K the
          block's first value of the channel (shifted sums: no cancellation when the mean is
          large next to the spread), then mean = sum n_b mean_b / n,
          m2 = sum m2_b + sum n_b (mean_b - mean)^2 (Chan et al.), var = m2 / n.
backward  dz = dy * keep * scale * act'(z); partials of sum dz and sum dz * xhat; then
          grad_x = w * invstd * (dz - sum_dz / count - xhat * sum_dz_xhat / count) (training),
          w * invstd * dz (eval); grad_residual = dz.
"""
import math

import torch
import triton
import triton.language as tl

from .._dtypes import compute_dtype
from ..reference.philox import dropout_scale
from .activation import activate, activate_grad
from .philox import dropout_uniform

_BLOCK = 1024          # elements per program of the element-wise kernels
_BLOCK_S = 256         # spatial chunk of the (N, C, S) reductions
_BLOCK_R, _BLOCK_C = 32, 64   # (rows, channels) tile of the channels-last reductions
_MAX_PARTIALS = 1024   # blocks per channel at most (fixed by the shape)
_MIN_BLOCK_VALUES = 2048  # values of its channel an (N, C, S) block holds at least


@triton.jit
def _z_of(x, mean, invstd, w, b, r, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
          HAS_R: tl.constexpr):
    xhat = (x - mean) * invstd
    z = xhat
    if HAS_W:
        z = z * w
    if HAS_B:
        z = z + b
    if HAS_R:
        z = z + r
    return xhat, z


@triton.jit
def _load_vec(P, c, mask, HAS: tl.constexpr, CT: tl.constexpr):
    if HAS:
        return tl.load(P + c, mask=mask, other=0.0).to(CT)
    else:
        return tl.zeros((1,), dtype=CT)


@triton.jit
def _dz_at(DY, X, R, W, B, MEAN, INVSTD, offs, c, logical, mask, p, scale, seed,
           ACT: tl.constexpr, HAS_R: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
           HAS_DROPOUT: tl.constexpr, CT: tl.constexpr):
    """(xhat, dz) at memory offsets ``offs`` of channels ``c`` (0 where ~mask)."""
    x = tl.load(X + offs, mask=mask, other=0.0).to(CT)
    mean = tl.load(MEAN + c, mask=mask, other=0.0).to(CT)
    invstd = tl.load(INVSTD + c, mask=mask, other=0.0).to(CT)
    dz = tl.load(DY + offs, mask=mask, other=0.0).to(CT)
    xhat = (x - mean) * invstd
    if ACT != 0:
        w = _load_vec(W, c, mask, HAS_W, CT)
        b = _load_vec(B, c, mask, HAS_B, CT)
        r = _load_vec(R, offs, mask, HAS_R, CT)
        xhat, z = _z_of(x, mean, invstd, w, b, r, HAS_W, HAS_B, HAS_R)
        dz = dz * activate_grad(z, ACT)
    if HAS_DROPOUT:
        u = dropout_uniform(seed, logical)
        dz = tl.where(u >= p, dz * scale, 0.0)
    dz = tl.where(mask, dz, 0.0)
    xhat = tl.where(mask, xhat, 0.0)
    return xhat, dz


@triton.jit
def _channel_and_logical(offs, C, S, CL: tl.constexpr):
    if CL:
        c = offs % C
        row = offs // C
        logical = (row // S) * C * S + c * S + row % S
    else:
        c = (offs // S) % C
        logical = offs
    return c, logical


@triton.jit
def _batch_norm_fwd_kernel(
    X,       # (N, C, S) or (N, S, C) input
    R,       # like X, if HAS_R
    W, B,    # (C,) compute type, if HAS_W / HAS_B
    MEAN, INVSTD,  # (C,) compute type
    Y,       # like X
    total, C, S, p, scale, seed,
    ACT: tl.constexpr, HAS_R: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
    HAS_DROPOUT: tl.constexpr, CL: tl.constexpr, IS_FP64: tl.constexpr, BLOCK: tl.constexpr,
):
    CT: tl.constexpr = tl.float64 if IS_FP64 else tl.float32
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < total
    c, logical = _channel_and_logical(offs, C, S, CL)
    x = tl.load(X + offs, mask=mask, other=0.0).to(CT)
    mean = tl.load(MEAN + c, mask=mask, other=0.0).to(CT)
    invstd = tl.load(INVSTD + c, mask=mask, other=0.0).to(CT)
    w = _load_vec(W, c, mask, HAS_W, CT)
    b = _load_vec(B, c, mask, HAS_B, CT)
    r = _load_vec(R, offs, mask, HAS_R, CT)
    _, z = _z_of(x, mean, invstd, w, b, r, HAS_W, HAS_B, HAS_R)
    y = activate(z, ACT)
    if HAS_DROPOUT:
        u = dropout_uniform(seed, logical)
        y = tl.where(u >= p, y * scale, 0.0)
    tl.store(Y + offs, y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _batch_norm_bwd_elemt_kernel(
    DY, X, R, W, B, MEAN, INVSTD,   # as in forward; DY like X
    SUM_DZ, SUM_DZX,                # (C,) compute type (training)
    DX, DR,                         # like X, if NEED_DX / NEED_DR
    total, C, S, inv_count, p, scale, seed,
    ACT: tl.constexpr, HAS_R: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
    HAS_DROPOUT: tl.constexpr, CL: tl.constexpr, TRAINING: tl.constexpr,
    NEED_DX: tl.constexpr, NEED_DR: tl.constexpr, IS_FP64: tl.constexpr, BLOCK: tl.constexpr,
):
    CT: tl.constexpr = tl.float64 if IS_FP64 else tl.float32
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < total
    c, logical = _channel_and_logical(offs, C, S, CL)
    xhat, dz = _dz_at(DY, X, R, W, B, MEAN, INVSTD, offs, c, logical, mask, p, scale, seed,
                      ACT, HAS_R, HAS_W, HAS_B, HAS_DROPOUT, CT)
    if NEED_DR:
        tl.store(DR + offs, dz.to(DR.dtype.element_ty), mask=mask)
    if NEED_DX:
        k = tl.load(INVSTD + c, mask=mask, other=0.0).to(CT)
        if HAS_W:
            k = k * tl.load(W + c, mask=mask, other=0.0).to(CT)
        if TRAINING:
            m1 = tl.load(SUM_DZ + c, mask=mask, other=0.0).to(CT) * inv_count
            m2 = tl.load(SUM_DZX + c, mask=mask, other=0.0).to(CT) * inv_count
            dx = k * (dz - m1 - xhat * m2)
        else:
            dx = k * dz
        tl.store(DX + offs, dx.to(DX.dtype.element_ty), mask=mask)


@triton.jit
def _batch_norm_reduce_kernel(
    DY, X, R, W, B, MEAN, INVSTD,   # as in forward (DY, R, W, B, MEAN, INVSTD unread in STATS)
    P1, P2,                         # (n_blocks, C) compute type: the block partials
    units, C, S, per_block, p, scale, seed,
    STATS: tl.constexpr, ACT: tl.constexpr, HAS_R: tl.constexpr, HAS_W: tl.constexpr,
    HAS_B: tl.constexpr, HAS_DROPOUT: tl.constexpr, CL: tl.constexpr, IS_FP64: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """STATS: P1 = mean_b, P2 = m2_b of x (shifted sums); else P1 = sum dz, P2 = sum dz*xhat.
    Block ``blk`` = program_id(1) covers units [blk * per_block, ...) of ``units``: rows of
    (L, C) when CL (units = L, the channel tile is program_id(0)), else samples n of (N, C, S)
    (units = N) for channel program_id(0)."""
    CT: tl.constexpr = tl.float64 if IS_FP64 else tl.float32
    blk = tl.program_id(1)
    if CL:
        cols = (tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)).to(tl.int64)
        cmask = cols < C
        r0 = blk.to(tl.int64) * per_block
        r1 = tl.minimum(r0 + per_block, units)
        k = tl.load(X + r0 * C + cols, mask=cmask, other=0.0).to(CT)
        a1 = tl.zeros((BLOCK_R, BLOCK_C), dtype=CT)
        a2 = tl.zeros((BLOCK_R, BLOCK_C), dtype=CT)
        for rs in range(r0, r1, BLOCK_R):
            rows = rs + tl.arange(0, BLOCK_R)
            mask = (rows < r1)[:, None] & cmask[None, :]
            offs = rows[:, None] * C + cols[None, :]
            if STATS:
                d = tl.load(X + offs, mask=mask, other=0.0).to(CT) - k[None, :]
                d = tl.where(mask, d, 0.0)
                a1 += d
                a2 += d * d
            else:
                c2 = cols[None, :] + rows[:, None] * 0
                logical = (rows[:, None] // S) * C * S + cols[None, :] * S + rows[:, None] % S
                xhat, dz = _dz_at(DY, X, R, W, B, MEAN, INVSTD, offs, c2, logical, mask, p,
                                  scale, seed, ACT, HAS_R, HAS_W, HAS_B, HAS_DROPOUT, CT)
                a1 += dz
                a2 += dz * xhat
        s1 = tl.sum(a1, axis=0)
        s2 = tl.sum(a2, axis=0)
        if STATS:
            n = (r1 - r0).to(CT)
            s2 = s2 - s1 * s1 / n
            s1 = k + s1 / n
        tl.store(P1 + blk * C + cols, s1, mask=cmask)
        tl.store(P2 + blk * C + cols, s2, mask=cmask)
    else:
        c = tl.program_id(0).to(tl.int64)
        n0 = blk.to(tl.int64) * per_block
        n1 = tl.minimum(n0 + per_block, units)
        k = tl.load(X + (n0 * C + c) * S).to(CT)
        a1 = tl.zeros((BLOCK_C,), dtype=CT)
        a2 = tl.zeros((BLOCK_C,), dtype=CT)
        for n in range(n0, n1):
            base = (n * C + c) * S
            for s0 in range(0, S, BLOCK_C):
                sp = s0 + tl.arange(0, BLOCK_C)
                mask = sp < S
                offs = base + sp
                if STATS:
                    d = tl.load(X + offs, mask=mask, other=0.0).to(CT) - k
                    d = tl.where(mask, d, 0.0)
                    a1 += d
                    a2 += d * d
                else:
                    xhat, dz = _dz_at(DY, X, R, W, B, MEAN, INVSTD, offs, c + sp * 0, offs, mask,
                                      p, scale, seed, ACT, HAS_R, HAS_W, HAS_B, HAS_DROPOUT, CT)
                    a1 += dz
                    a2 += dz * xhat
        s1 = tl.sum(a1, axis=0)
        s2 = tl.sum(a2, axis=0)
        if STATS:
            n = ((n1 - n0) * S).to(CT)
            s2 = s2 - s1 * s1 / n
            s1 = k + s1 / n
        tl.store(P1 + blk * C + c, s1)
        tl.store(P2 + blk * C + c, s2)


def _dims(x, channels_last):
    N = x.shape[0]
    C, S = (x.shape[2], x.shape[1]) if channels_last else (x.shape[1], x.shape[2])
    return N, C, S


def _blocks(N, S, channels_last):
    """(per_block, n_blocks): rows of (L, C) per block (CL) or samples per block; fixed by
    the shape, so the partials and their sum are the same on every run. At most
    _MAX_PARTIALS blocks; an (N, C, S) block holds at least _MIN_BLOCK_VALUES of its channel."""
    if channels_last:
        units = N * S
        per_block = max(_BLOCK_R, triton.cdiv(units, _MAX_PARTIALS))
    else:
        units = N
        per_block = max(triton.cdiv(_MIN_BLOCK_VALUES, max(S, 1)), triton.cdiv(units, _MAX_PARTIALS))
    return per_block, triton.cdiv(units, per_block)


def _reduce(stats, dy, x, residual, weight, bias, mean, invstd, activation, p, seed,
            channels_last):
    N, C, S = _dims(x, channels_last)
    ct = compute_dtype(x.dtype)
    per_block, n_blocks = _blocks(N, S, channels_last)
    p1 = torch.empty((n_blocks, C), dtype=ct, device=x.device)
    p2 = torch.empty((n_blocks, C), dtype=ct, device=x.device)
    grid = (triton.cdiv(C, _BLOCK_C) if channels_last else C, n_blocks)
    dummy = x
    _batch_norm_reduce_kernel[grid](
        dy if dy is not None else dummy, x, residual if residual is not None else dummy,
        weight if weight is not None else dummy, bias if bias is not None else dummy,
        mean if mean is not None else dummy, invstd if invstd is not None else dummy, p1, p2,
        N * S if channels_last else N, C, S, per_block, p, dropout_scale(p), seed,
        STATS=stats, ACT=activation, HAS_R=residual is not None, HAS_W=weight is not None,
        HAS_B=bias is not None, HAS_DROPOUT=p > 0.0, CL=channels_last,
        IS_FP64=ct == torch.float64, BLOCK_R=_BLOCK_R, BLOCK_C=_BLOCK_C if channels_last else _BLOCK_S,
    )
    if not stats:
        return p1.sum(0), p2.sum(0)
    units = N * S if channels_last else N
    per_unit = 1 if channels_last else S
    counts = torch.full((n_blocks,), float(per_block * per_unit), dtype=ct, device=x.device)
    counts[-1] = float((units - (n_blocks - 1) * per_block) * per_unit)
    n = float(units * per_unit)
    mean_ = (counts[:, None] * p1).sum(0) / n
    m2 = p2.sum(0) + (counts[:, None] * (p1 - mean_).square()).sum(0)
    return mean_, m2 / n


def batch_norm_stats(x, channels_last: bool):
    N, C, S = _dims(x, channels_last)
    ct = compute_dtype(x.dtype)
    if N * S == 0 or C == 0:
        nan = torch.full((C,), math.nan, dtype=ct, device=x.device)
        return nan, nan.clone()
    return _reduce(True, None, x.contiguous(), None, None, None, None, None, 0, 0.0, 0,
                   channels_last)


def batch_norm_fwd(x, residual, weight, bias, mean, invstd, activation: int, p: float, seed: int,
                   channels_last: bool):
    N, C, S = _dims(x, channels_last)
    x = x.contiguous()
    y = torch.empty_like(x)
    total = x.numel()
    if total == 0:
        return y
    _batch_norm_fwd_kernel[(triton.cdiv(total, _BLOCK),)](
        x, residual.contiguous() if residual is not None else x,
        weight if weight is not None else mean, bias if bias is not None else mean, mean, invstd,
        y, total, C, S, p, dropout_scale(p), seed,
        ACT=activation, HAS_R=residual is not None, HAS_W=weight is not None,
        HAS_B=bias is not None, HAS_DROPOUT=p > 0.0, CL=channels_last,
        IS_FP64=x.dtype == torch.float64, BLOCK=_BLOCK,
    )
    return y


def batch_norm_bwd_reduce(dy, x, residual, weight, bias, mean, invstd, activation: int, p: float,
                          seed: int, channels_last: bool):
    N, C, S = _dims(x, channels_last)
    if N * S == 0 or C == 0:
        z = torch.zeros((C,), dtype=mean.dtype, device=x.device)
        return z, z.clone()
    return _reduce(False, dy.contiguous(), x.contiguous(),
                   residual.contiguous() if residual is not None else None, weight, bias, mean,
                   invstd, activation, p, seed, channels_last)


def batch_norm_bwd_elemt(dy, x, residual, weight, bias, mean, invstd, sum_dz, sum_dz_xhat,
                         count: float, activation: int, p: float, seed: int, channels_last: bool,
                         training: bool, need_grad_input: bool, need_grad_residual: bool):
    N, C, S = _dims(x, channels_last)
    x, dy = x.contiguous(), dy.contiguous()
    dx = torch.empty_like(x) if need_grad_input else dy.new_empty(0)
    dr = torch.empty_like(x) if need_grad_residual else dy.new_empty(0)
    total = x.numel()
    if total == 0 or not (need_grad_input or need_grad_residual):
        return dx, dr
    sums_ok = training and need_grad_input
    _batch_norm_bwd_elemt_kernel[(triton.cdiv(total, _BLOCK),)](
        dy, x, residual.contiguous() if residual is not None else x,
        weight if weight is not None else mean, bias if bias is not None else mean, mean, invstd,
        sum_dz if sums_ok else mean, sum_dz_xhat if sums_ok else mean,
        dx if need_grad_input else x, dr if need_grad_residual else x,
        total, C, S, 1.0 / count if sums_ok and count > 0 else 0.0, p, dropout_scale(p), seed,
        ACT=activation, HAS_R=residual is not None, HAS_W=weight is not None,
        HAS_B=bias is not None, HAS_DROPOUT=p > 0.0, CL=channels_last, TRAINING=training,
        NEED_DX=need_grad_input, NEED_DR=need_grad_residual, IS_FP64=x.dtype == torch.float64,
        BLOCK=_BLOCK,
    )
    return dx, dr


def _sig(xt, names):
    st = "fp64" if xt == "fp64" else "fp32"
    return {n: (f"*{xt}" if n in ("X", "R", "Y", "DY", "DX", "DR") else f"*{st}") for n in names}


def _fwd_spec(xt, act, res, drop, cl, warps=4):
    sig = _sig(xt, ("X", "R", "W", "B", "MEAN", "INVSTD", "Y"))
    sig.update(total="i64", C="i32", S="i32", p="fp32", scale="fp32", seed="i64")
    const = dict(ACT=act, HAS_R=res, HAS_W=True, HAS_B=True, HAS_DROPOUT=drop, CL=cl,
                 IS_FP64=xt == "fp64", BLOCK=_BLOCK)
    return _batch_norm_fwd_kernel, sig, const, {"num_warps": warps}


def _elemt_spec(xt, act, res, drop, cl, training=True, warps=4):
    sig = _sig(xt, ("DY", "X", "R", "W", "B", "MEAN", "INVSTD", "SUM_DZ", "SUM_DZX", "DX", "DR"))
    sig.update(total="i64", C="i32", S="i32", inv_count="fp32", p="fp32", scale="fp32", seed="i64")
    const = dict(ACT=act, HAS_R=res, HAS_W=True, HAS_B=True, HAS_DROPOUT=drop, CL=cl,
                 TRAINING=training, NEED_DX=True, NEED_DR=res, IS_FP64=xt == "fp64", BLOCK=_BLOCK)
    return _batch_norm_bwd_elemt_kernel, sig, const, {"num_warps": warps}


def _reduce_spec(xt, stats, act, res, drop, cl, warps=4):
    sig = _sig(xt, ("DY", "X", "R", "W", "B", "MEAN", "INVSTD", "P1", "P2"))
    sig.update(units="i64", C="i32", S="i32", per_block="i32", p="fp32", scale="fp32", seed="i64")
    const = dict(STATS=stats, ACT=act, HAS_R=res, HAS_W=True, HAS_B=True, HAS_DROPOUT=drop,
                 CL=cl, IS_FP64=xt == "fp64", BLOCK_R=_BLOCK_R,
                 BLOCK_C=_BLOCK_C if cl else _BLOCK_S)
    return _batch_norm_reduce_kernel, sig, const, {"num_warps": warps}


# (kernel, runtime signature, constexprs, options) for the AOT compile test: both layouts,
# the dtypes in use, with and without residual, activation and dropout.
COMPILE_SPECS = [
    _fwd_spec("fp32", 0, False, False, False),
    _fwd_spec("bf16", 1, True, True, True),
    _fwd_spec("fp16", 4, False, False, False),
    _elemt_spec("fp32", 0, False, False, False),
    _elemt_spec("bf16", 1, True, True, True),
    _elemt_spec("fp16", 2, True, False, False, training=False),
    _reduce_spec("fp32", True, 0, False, False, False),
    _reduce_spec("bf16", True, 0, False, False, True),
    _reduce_spec("fp32", False, 0, False, False, False),
    _reduce_spec("bf16", False, 1, True, True, True),
    _reduce_spec("fp16", False, 3, False, True, False),
    _reduce_spec("fp64", True, 0, False, False, True, warps=2),
]
