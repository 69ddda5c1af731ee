"""batch_norm: y = dropout(act(bn(x) + residual)) — BatchNorm alone and fused with activation,
residual add and dropout — the registered ops of every backend and ``BatchNormFunction`` /
``SyncBatchNormFunction``, the autograd Functions over them (the math is written out in
fusedreg/reference/batch_norm.py).

Four ops per backend, each made from the one Python declaration below
(``fusedreg::batch_norm_stats`` ... for the C++ cpu/cuda backends, schemas in csrc/ops.cpp;
``..._reference`` / ``..._triton`` for the Python ones):

    batch_norm_stats       x -> per-channel (mean, var)                       pass 1 (training)
    batch_norm_fwd         x, residual -> y                                   pass 2
    batch_norm_bwd_reduce  dy, x, residual -> per-channel (sum dz, sum dz*xhat)   backward pass 1
    batch_norm_bwd_elemt   dy, x, residual, the sums -> grad_x, grad_residual    backward pass 2

The statistics and the backward sums are separate ops so that SyncBatchNorm can reduce them
across ranks between the passes; the cpu backend's local training passes on (N, C, S) storage
without dropout run as two more, CPU-only ops (``batch_norm_fwd_ncs`` / ``batch_norm_bwd_ncs``,
below) that finish each channel while its rows are in cache, and its local training backward
on (N, S, C) storage as one (``batch_norm_bwd_cl``), with the same values. The ops
see x stored as (N, C, S) or, channels-last, as (N, S, C) (``batch_norm_act`` below makes the
views, outside the Functions); the per-channel vectors are in the compute type.
Backward saves x, mean, invstd, the weight and the 8-byte seed (the residual and bias only
with an activation, where z is recomputed): never a mask, never the output. Under
create_graph=True the backward is differentiable torch ops of the reference formulas (with the
statistics recomputed from x in training and the same seeded mask), so higher-order gradients
are exact; SyncBatchNorm's is first-order only.
"""
from __future__ import annotations

import math
from typing import Callable, NamedTuple, Optional

import torch
from torch import Tensor

from .. import backends
from .._dtypes import compute_dtype
from ..reference import batch_norm as ref
from ..reference.bias_dropout import activate_grad
from ..reference.philox import apply_dropout
from .._seed import unused_seed
from ._common import backend_ops, cpp_backends, extension_call, triton_module

__all__ = ["BatchNormConfig", "BatchNormFunction", "BatchNormKernels", "SyncBatchNormFunction",
           "batch_norm_act", "from_storage", "storage_layout", "to_storage"]

OP = "batch_norm"


def batch_norm_stats(x: Tensor, channels_last: bool) -> tuple[Tensor, Tensor]:
    """(mean, var) per channel (biased variance), (C,), compute type; x: (N, C, S), or
    (N, S, C) when ``channels_last``."""


def batch_norm_fwd(x: Tensor, residual: Optional[Tensor], weight: Optional[Tensor],
                   bias: Optional[Tensor], mean: Tensor, invstd: Tensor, activation: int,
                   p: float, seed: Tensor, channels_last: bool) -> Tensor:
    """y = dropout(act((x - mean) * invstd * weight + bias + residual)), x's layout and dtype;
    residual like x, the (C,) vectors in the compute type."""


def batch_norm_bwd_reduce(dy: Tensor, x: Tensor, residual: Optional[Tensor],
                          weight: Optional[Tensor], bias: Optional[Tensor], mean: Tensor,
                          invstd: Tensor, activation: int, p: float, seed: Tensor,
                          channels_last: bool) -> tuple[Tensor, Tensor]:
    """(sum dz, sum dz * xhat) per channel with dz = dy * keep * scale * act'(z): the grads of
    bias and weight, and what grad_x needs in training."""


def batch_norm_bwd_elemt(dy: Tensor, x: Tensor, residual: Optional[Tensor],
                         weight: Optional[Tensor], bias: Optional[Tensor], mean: Tensor,
                         invstd: Tensor, sum_dz: Tensor, sum_dz_xhat: Tensor, count: float,
                         activation: int, p: float, seed: Tensor, channels_last: bool,
                         training: bool, need_grad_input: bool,
                         need_grad_residual: bool) -> tuple[Tensor, Tensor]:
    """(grad_x, grad_residual), x's layout and dtype, each empty unless asked for; ``count``
    is the number of values per channel behind the sums (training only)."""


def _vec_fake(x, C):
    return x.new_empty((C,), dtype=compute_dtype(x.dtype))


def _channels(x, channels_last):
    torch._check(x.dim() == 3, lambda: "x must be stored as (N, C, S) or (N, S, C)")
    return x.shape[2] if channels_last else x.shape[1]


def _stats_fake(x, channels_last):
    C = _channels(x, channels_last)
    return _vec_fake(x, C), _vec_fake(x, C)


def _fwd_fake(x, residual, weight, bias, mean, invstd, activation, p, seed, channels_last):
    C = _channels(x, channels_last)
    torch._check(mean.shape == (C,) and invstd.shape == (C,), lambda: "mean/invstd must be (C,)")
    torch._check(residual is None or residual.shape == x.shape, lambda: "residual must match x")
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _bwd_reduce_fake(dy, x, residual, weight, bias, mean, invstd, activation, p, seed,
                     channels_last):
    C = _channels(x, channels_last)
    torch._check(dy.shape == x.shape, lambda: "dy must match x")
    return _vec_fake(x, C), _vec_fake(x, C)


def _bwd_elemt_fake(dy, x, residual, weight, bias, mean, invstd, sum_dz, sum_dz_xhat, count,
                    activation, p, seed, channels_last, training, need_grad_input,
                    need_grad_residual):
    torch._check(dy.shape == x.shape, lambda: "dy must match x")
    gx = torch.empty_like(x, memory_format=torch.contiguous_format) if need_grad_input else dy.new_empty(0)
    gr = torch.empty_like(x, memory_format=torch.contiguous_format) if need_grad_residual else dy.new_empty(0)
    return gx, gr


class BatchNormKernels(NamedTuple):
    """One backend's four batch_norm ops, and the cpu backend's one-op training passes
    (``batch_norm_fwd_ncs`` / ``batch_norm_bwd_ncs`` / ``batch_norm_bwd_cl``, below; None
    elsewhere)."""
    stats: Callable
    fwd: Callable
    bwd_reduce: Callable
    bwd_elemt: Callable
    fwd_ncs: Optional[Callable] = None
    bwd_ncs: Optional[Callable] = None
    bwd_cl: Optional[Callable] = None


# The cpu backend's local training passes of an (N, C, S) input without dropout, each in one op
# that walks the channels and finishes a channel while its rows are in the core's cache
# (CPU kernels only, in csrc/cpu/batch_norm.cpp; the kernels' fwd_ncs / bwd_ncs, None
# without the extension and in the other backends):
#   batch_norm_fwd_ncs  x, residual -> (y, mean, var, invstd)    = stats, rsqrt(var + eps), fwd
#   batch_norm_bwd_ncs  dy, x, residual -> (sum dz, sum dz*xhat, grad_x, grad_residual)
#                                                                  = bwd_reduce, bwd_elemt
# with the four ops' values bit for bit; and the backward of (N, S, C) (channels-last) storage:
#   batch_norm_bwd_cl   as batch_norm_bwd_ncs (its reduce pass writes a float grad_residual,
#                       from which the element-wise pass takes dz: two tensors read, not three)
# SyncBatchNorm, dropout and a channels-last forward take the four.


def _bwd_one_op_fake(channels_last, dy, x, need_grad_input, need_grad_residual):
    C = _channels(x, channels_last)
    torch._check(dy.shape == x.shape, lambda: "dy must match x")
    gx, gr = _bwd_elemt_fake(dy, x, None, None, None, None, None, None, None, 0.0, 0, 0.0, None,
                             channels_last, True, need_grad_input, need_grad_residual)
    return _vec_fake(x, C), _vec_fake(x, C), gx, gr


def _bwd_ncs_fake(dy, x, residual, weight, bias, mean, invstd, activation, seed, need_grad_input,
                  need_grad_residual):
    return _bwd_one_op_fake(False, dy, x, need_grad_input, need_grad_residual)


def _bwd_cl_fake(dy, x, residual, weight, bias, mean, invstd, activation, seed, need_grad_input,
                 need_grad_residual):
    return _bwd_one_op_fake(True, dy, x, need_grad_input, need_grad_residual)


def _fwd_ncs_fake(x, residual, weight, bias, eps, activation):
    C = _channels(x, False)
    torch._check(residual is None or residual.shape == x.shape, lambda: "residual must match x")
    return (torch.empty_like(x, memory_format=torch.contiguous_format), _vec_fake(x, C),
            _vec_fake(x, C), _vec_fake(x, C))


def _register() -> None:
    tri = triton_module(OP)
    per_op = [backend_ops(sig, getattr(ref, sig.__name__), tri and getattr(tri, sig.__name__),
                          fake=fake)
              for sig, fake in ((batch_norm_stats, _stats_fake), (batch_norm_fwd, _fwd_fake),
                                (batch_norm_bwd_reduce, _bwd_reduce_fake),
                                (batch_norm_bwd_elemt, _bwd_elemt_fake))]
    # CPU kernels only: cpp_backends' "cuda" entry (the same op) has no kernel behind it
    channel_ops = {"cpu": (cpp_backends("batch_norm_fwd_ncs", _fwd_ncs_fake).get("cpu"),
                           cpp_backends("batch_norm_bwd_ncs", _bwd_ncs_fake).get("cpu"),
                           cpp_backends("batch_norm_bwd_cl", _bwd_cl_fake).get("cpu"))}
    for backend in per_op[0]:
        if all(backend in ops for ops in per_op):
            backends.register(OP, backend, BatchNormKernels(*(ops[backend] for ops in per_op),
                                                            *channel_ops.get(backend, ())))


_register()


# ---- layouts ----------------------------------------------------------------------------------

_CL_FORMATS = {4: torch.channels_last, 5: torch.channels_last_3d}


def _is_channels_last(x: Tensor) -> bool:
    """x is stored channels-last (and not also plain contiguous): NHWC / NDHWC memory."""
    fmt = _CL_FORMATS.get(x.dim())
    return fmt is not None and not x.is_contiguous() and x.is_contiguous(memory_format=fmt)


def to_storage(t: Tensor, channels_last: bool) -> Tensor:
    """The contiguous 3-D tensor the ops take for t of shape (N, C, *spatial): (N, C, S), or
    (N, S, C) when ``channels_last`` (a view when t is stored that way already)."""
    N, C, S = t.shape[0], t.shape[1], math.prod(t.shape[2:])
    if not channels_last:
        return t.reshape(N, C, S).contiguous()
    if t.dim() > 2:
        t = t.permute(0, *range(2, t.dim()), 1)
    return t.reshape(N, S, C).contiguous()


def from_storage(s: Tensor, shape, channels_last: bool) -> Tensor:
    """The inverse of ``to_storage``: a view of shape ``shape`` (channels-last strides when
    ``channels_last``)."""
    if not channels_last or math.prod(shape[2:]) == 1:
        return s.view(shape)
    nd = len(shape)
    return s.view(shape[0], *shape[2:], shape[1]).permute(0, nd - 1, *range(1, nd - 1))


def storage_layout(x: Tensor) -> bool:
    """True when the ops should see x channels-last: NHWC / NDHWC memory, or one value per
    (n, c) (2-D input, or spatial size 1), where both layouts are the same memory and rows of
    C channels are what the kernels walk fastest."""
    return x.dim() == 2 or math.prod(x.shape[2:]) == 1 or _is_channels_last(x)


# ---- autograd -----------------------------------------------------------------------------

class BatchNormConfig(NamedTuple):
    """The non-tensor arguments of ``BatchNormFunction``."""
    training: bool         # batch statistics (else running_mean / running_var)
    eps: float
    activation: int        # code of fusedreg/_activations.py, applied after the residual add
    p: float               # dropout after the activation (0: none, seed unread)
    backend: str           # a name of fusedreg.backends.BACKENDS that implements batch_norm
    channels_last: bool = False  # x is stored (N, S, C), not (N, C, S)
    # x's logical shape (N, C, *spatial), or None: with it the Functions return y in that
    # shape (and take dy in it), not as the storage tensor (``_logical_output``)
    shape: Optional[tuple] = None


def _vec(t: Optional[Tensor], ct: torch.dtype) -> Optional[Tensor]:
    if t is None or (t.dtype is ct and t.is_contiguous()):
        return t  # the common case without the two no-op calls (a small call's host time)
    return t.to(ct).contiguous()


def _as_dtype(t: Tensor, dtype: torch.dtype) -> Tensor:
    return t if t.dtype is dtype else t.to(dtype)


def _forward(xs, rs, weight, bias, seed, config, stats, running_mean, running_var,
             copy_stats=True):
    """Shared by both Functions: (y, mean, var, invstd) for x stored as ``xs``. In eval mean
    and var are copies of the running stats (a Function's output must not be an input) unless
    ``copy_stats`` is False (no Function: then they may be the running stats themselves)."""
    ct = compute_dtype(xs.dtype)
    kernels = backends.implementation(OP, config.backend)
    if config.training:
        if (kernels.fwd_ncs is not None and stats is _local_stats and config.p == 0.0
                and not config.channels_last and xs.numel()):
            return kernels.fwd_ncs(xs, rs, _vec(weight, ct), _vec(bias, ct), config.eps,
                                   config.activation)
        mean, var = stats(kernels, xs, config.channels_last)
    elif copy_stats:
        # copies: an output must not be an input (running stats already in the compute type)
        mean, var = running_mean.to(ct, copy=True), running_var.to(ct, copy=True)
    else:  # two small ops fewer on an eval call's fixed cost
        mean, var = _vec(running_mean, ct), _vec(running_var, ct)
    invstd = torch.rsqrt(var + config.eps)
    y = kernels.fwd(xs, rs, _vec(weight, ct), _vec(bias, ct), mean, invstd, config.activation,
                    config.p, seed, config.channels_last)
    return y, mean, var, invstd


def _setup(ctx, xs, rs, weight, bias, seed, config, mean, invstd, sync_group=None):
    ctx.config = config
    ctx.has = (rs is not None, weight is not None, bias is not None)
    ctx.p_dtypes = (weight.dtype if weight is not None else None,
                    bias.dtype if bias is not None else None)
    ctx.sync_group = sync_group
    ctx.set_materialize_grads(False)
    if not any(ctx.needs_input_grad[:4]):
        return
    act = config.activation != 0  # z (so the residual and bias) is needed only for act'(z)
    # the parameters themselves, not compute-type copies: a differentiable backward
    # (create_graph=True) must reach them
    ctx.save_for_backward(xs, rs if act else None, weight, bias if act else None, mean, invstd,
                          seed)


def _logical_output(y: Tensor, config: BatchNormConfig) -> Tensor:
    """y (storage) as the Functions return it: with ``config.shape``, y in x's logical shape and
    layout as a tensor of its own (``detach``: not a view, which shares y's memory), so that an
    in-place op on the output (ResNet's ``relu_`` after each norm) is an ordinary in-place op
    on a Function output. A view of the output made outside the Function (from_storage) is
    modified in place through autograd's view machinery instead (CopySlices), whose backward
    copies the whole gradient about three times and zero-fills: in a timm resnet18 training
    step (8x3x64x64) with every norm fusedreg's, 121 copies per step against torch's 9."""
    if config.shape is None:
        return y
    return from_storage(y, config.shape, config.channels_last).detach()


def _backward(ctx, dy, all_reduce=None, count=None):
    cfg = ctx.config
    none = (None,) * 8
    if dy is None:
        return none
    if cfg.shape is not None:  # dy in x's logical shape (_logical_output)
        dy = to_storage(dy, cfg.channels_last)
    has_r, has_w, has_b = ctx.has
    need_x, need_r, need_w, need_b = ctx.needs_input_grad[:4]
    need_r, need_w, need_b = bool(need_r and has_r), bool(need_w and has_w), bool(need_b and has_b)
    if not (need_x or need_r or need_w or need_b):
        return none
    xs, rs, w, b, mean, invstd, seed = ctx.saved_tensors
    if torch.is_grad_enabled():  # create_graph: the gradient must be differentiable
        if all_reduce is not None:
            raise NotImplementedError(
                "SyncBatchNorm (fusedreg) does not support higher-order gradients "
                "(create_graph=True); use it for first-order training only")
        return _differentiable_backward(cfg, ctx.p_dtypes, dy, xs, rs, w, b, mean, invstd, seed,
                                        need_x, need_r, need_w, need_b)
    cl = cfg.channels_last
    kernels = backends.implementation(OP, cfg.backend)
    dys = dy.contiguous()
    w, b = _vec(w, mean.dtype), _vec(b, mean.dtype)
    args = (rs, w, b, mean, invstd)
    # grad_residual is dz, which is dy itself without an activation and dropout
    plain = cfg.activation == 0 and cfg.p == 0.0
    one_op = kernels.bwd_cl if cl else kernels.bwd_ncs
    if need_x and cfg.training and one_op is not None and all_reduce is None and cfg.p == 0.0:
        # the cpu backend's local training backward in one op (the same values)
        sum_dz, sum_dzx, gx, gr = one_op(dys, xs, *args, cfg.activation, seed, True,
                                         bool(need_r and not plain))
        grad_w = _as_dtype(sum_dzx, ctx.p_dtypes[0]) if need_w else None
        grad_b = _as_dtype(sum_dz, ctx.p_dtypes[1]) if need_b else None
        grad_r = (dy if plain else gr) if need_r else None
        return gx, grad_r, grad_w, grad_b, None, None, None, None
    sums = None
    if need_w or need_b or (need_x and cfg.training):
        sums = kernels.bwd_reduce(dys, xs, *args, cfg.activation, cfg.p, seed, cl)
    sum_dz, sum_dzx = sums if sums is not None else (mean.new_empty(0), mean.new_empty(0))
    grad_w = _as_dtype(sum_dzx, ctx.p_dtypes[0]) if need_w else None
    grad_b = _as_dtype(sum_dz, ctx.p_dtypes[1]) if need_b else None
    if need_x and cfg.training:
        if all_reduce is not None:  # SyncBatchNorm: the sums over every rank's batch
            sum_dz, sum_dzx = all_reduce(sum_dz, sum_dzx)
        if count is None:
            count = xs.numel() // mean.numel() if mean.numel() else 0
    gx = gr = None
    if need_x or (need_r and not plain):
        gx, gr = kernels.bwd_elemt(dys, xs, *args, sum_dz, sum_dzx, float(count or 0),
                                   cfg.activation, cfg.p, seed, cl, cfg.training, bool(need_x),
                                   bool(need_r and not plain))
    grad_x = gx if need_x else None
    grad_r = (dy if plain else gr) if need_r else None
    return grad_x, grad_r, grad_w, grad_b, None, None, None, None


def _differentiable_backward(cfg, p_dtypes, dy, xs, rs, w, b, mean, invstd, seed, need_x, need_r,
                             need_w, need_b):
    """The backward as differentiable torch ops of the saved x, residual, weight, bias and dy —
    the formulas of fusedreg/reference/batch_norm.py written out, with the statistics
    recomputed from x in training (in eval they are constants) and the same seeded mask — so
    that a second backward (create_graph=True) sees its true derivative. x, the residual, dy
    and the gradients are in storage layout (``cfg.channels_last``); ``p_dtypes``: the weight's
    and the bias's dtypes (their gradients')."""
    cl, ct = cfg.channels_last, mean.dtype
    xl = ref._logical(xs, cl).to(ct)
    if cfg.training:
        mean = xl.mean(dim=(0, 2))
        invstd = torch.rsqrt((xl - ref._bc(mean)).square().mean(dim=(0, 2)) + cfg.eps)
    xhat = (xl - ref._bc(mean)) * ref._bc(invstd)
    dz = ref._logical(dy, cl).to(ct)
    if cfg.activation != 0:
        z = xhat
        if w is not None:
            z = z * ref._bc(w.to(ct))
        if b is not None:
            z = z + ref._bc(b.to(ct))
        if rs is not None:
            z = z + ref._logical(rs, cl).to(ct)
        dz = dz * activate_grad(z, cfg.activation)
    dz = apply_dropout(dz, cfg.p, seed)
    grad_x = grad_r = grad_w = grad_b = None
    if need_x:
        k = invstd * w.to(ct) if w is not None else invstd
        if cfg.training:
            gx = dz - ref._bc(dz.mean(dim=(0, 2))) - xhat * ref._bc((dz * xhat).mean(dim=(0, 2)))
        else:
            gx = dz
        grad_x = ref._stored((ref._bc(k) * gx).to(xs.dtype), cl)
    if need_r:
        grad_r = ref._stored(dz.to(xs.dtype), cl)
    if need_w:
        grad_w = (dz * xhat).sum(dim=(0, 2)).to(p_dtypes[0])
    if need_b:
        grad_b = dz.sum(dim=(0, 2)).to(p_dtypes[1])
    return grad_x, grad_r, grad_w, grad_b, None, None, None, None


def _node_differentiable_backward(dy, xs, rs, w, b, mean, invstd, eps, activation,
                                  channels_last, need_x, need_r, need_w, need_b, training=True,
                                  half_weight=False, half_bias=False):
    """The differentiable backward of the C++ node (csrc/ops.cpp: BatchNormNode,
    ``fusedreg._C.batch_norm_train``, and ``batch_norm_eval`` with ``training`` False) under
    create_graph=True: ``_differentiable_backward`` for its saved tensors (storage layout),
    with dy and the input gradients in x's shape. The node runs without dropout; its weight
    and bias are in the compute type (mean's) or, with ``half_weight`` / ``half_bias``, in
    x's half dtype."""
    cfg = BatchNormConfig(training, eps, activation, 0.0, "cpu", channels_last)
    shape = tuple(dy.shape)
    p_dtypes = (xs.dtype if half_weight else mean.dtype, xs.dtype if half_bias else mean.dtype)
    gx, gr, gw, gb = _differentiable_backward(
        cfg, p_dtypes, to_storage(dy, channels_last), xs, rs, w, b, mean,
        invstd, unused_seed(), need_x, need_r, need_w, need_b)[:4]
    gx = from_storage(gx, shape, channels_last) if gx is not None else None
    gr = from_storage(gr, shape, channels_last) if gr is not None else None
    return gx, gr, gw, gb


def _local_stats(kernels, xs, cl):
    return kernels.stats(xs, cl)


class BatchNormFunction(torch.autograd.Function):
    """``BatchNormFunction.apply(xs, rs, weight, bias, running_mean, running_var, seed,
    config)`` -> ``(y, mean, var)``: y = dropout(act(bn(x) + residual)) for x and the
    residual stored as the ops take them (``to_storage``; ``config.channels_last`` says which
    layout), with the batch statistics in training (mean and biased var returned, not
    differentiable, for the running-stat update) or running_mean / running_var in eval.
    residual, weight, bias may be None; with ``config.shape`` y is returned in x's logical
    shape and layout (``_logical_output``) and dy is taken in it. ``batch_norm_act`` below
    makes the storage views of the inputs (a view of an input made inside a Function could
    not be modified in place, as ResNet's inplace ReLU does) and
    ``fusedreg.functional.batch_norm`` / ``batch_norm_act`` check the arguments."""

    # forward takes ctx (no setup_context): Function.apply binds the arguments to forward's
    # signature on every call of a Function with a setup_context, which cost more than a small
    # batch's kernels. torch.func transforms do not reach this Function (fusedreg.functional
    # routes them to the differentiable composite); torch.compile traces it either way.
    @staticmethod
    def forward(ctx, xs, rs, weight, bias, running_mean, running_var, seed,
                config: BatchNormConfig):
        y, mean, var, invstd = _forward(xs, rs, weight, bias, seed, config, _local_stats,
                                        running_mean, running_var)
        ctx.mark_non_differentiable(mean, var)
        _setup(ctx, xs, rs, weight, bias, seed, config, mean, invstd)
        return _logical_output(y, config), mean, var

    @staticmethod
    def backward(ctx, dy, _dmean, _dvar):
        return _backward(ctx, dy)


class SyncBatchNormFunction(torch.autograd.Function):
    """``BatchNormFunction`` in training with the statistics of the whole batch across the
    ranks of ``group`` (torch.distributed): each rank's (count, mean, var) are all-gathered
    and combined in rank order (Chan et al.'s parallel formula, the same on every rank), and
    in backward the per-channel sums of dz and dz * xhat are all-reduced before grad_x, as
    ``torch.nn.SyncBatchNorm`` does; grad_weight and grad_bias stay local (DDP averages them).
    ``apply(xs, rs, weight, bias, group, count_out, seed, config)``: ``count_out`` is a
    0-dim tensor that receives the total count per channel (for the running variance)."""

    @staticmethod
    def forward(ctx, xs, rs, weight, bias, group, count_out, seed, config: BatchNormConfig):
        import torch.distributed as dist

        def gathered_stats(kernels, xs, cl):
            mean, var = kernels.stats(xs, cl)
            n = xs.numel() // mean.numel() if mean.numel() else 0
            mine = torch.cat([mean.new_full((1,), float(n)), mean, var])
            parts = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
            dist.all_gather(parts, mine, group=group)
            stacked = torch.stack(parts)                     # (ranks, 1 + 2C), rank order
            C = mean.numel()
            counts, means, vars_ = stacked[:, :1], stacked[:, 1:1 + C], stacked[:, 1 + C:]
            total = counts.sum()
            g_mean = (counts * means).sum(0) / total
            m2 = (counts * vars_).sum(0) + (counts * (means - g_mean).square()).sum(0)
            count_out.fill_(total)
            return g_mean, m2 / total

        y, mean, var, invstd = _forward(xs, rs, weight, bias, seed, config, gathered_stats,
                                        None, None)
        ctx.mark_non_differentiable(mean, var)
        _setup(ctx, xs, rs, weight, bias, seed, config, mean, invstd, sync_group=group)
        ctx.count = float(count_out.item())
        return _logical_output(y, config), mean, var

    @staticmethod
    def backward(ctx, dy, _dmean, _dvar):
        import torch.distributed as dist

        def all_reduce(a, b):
            both = torch.cat([a, b])
            dist.all_reduce(both, group=ctx.sync_group)
            return both[:a.numel()], both[a.numel():]

        return _backward(ctx, dy, all_reduce=all_reduce, count=ctx.count)


def batch_norm_act(x, residual, weight, bias, running_mean, running_var, seed,
                   config: BatchNormConfig, group=None, autograd: bool = True):
    """(y, mean, var, count): the Function over x (N, C, *spatial) in any memory layout, the
    storage views made outside it; with ``group`` (training) the SyncBatchNorm Function;
    without ``autograd`` (nothing needs a gradient) the registered ops alone, as the Function's
    forward runs them. y has x's layout when x is channels-last, else it is contiguous. count:
    the number of values per channel behind mean and var (over every rank with ``group``)."""
    cl = storage_layout(x)
    # eager autograd: the Function returns y in x's shape (_logical_output); traced
    # (torch.compile, jit.trace), the shape stays out of the config (a constant to the tracer)
    shape = tuple(x.shape) if autograd and not (torch.compiler.is_compiling()
                                                or torch._C._is_tracing()) else None
    if cl != config.channels_last or shape != config.shape:
        config = config._replace(channels_last=cl, shape=shape)
    xs = to_storage(x, cl)
    rs = to_storage(residual, cl) if residual is not None else None
    C = x.shape[1]
    if group is not None:
        count_t = torch.zeros((), dtype=torch.float64)
        y, mean, var = SyncBatchNormFunction.apply(xs, rs, weight, bias, group, count_t, seed,
                                                   config)
        count = float(count_t)
    else:
        if autograd:
            y, mean, var = BatchNormFunction.apply(xs, rs, weight, bias, running_mean,
                                                   running_var, seed, config)
        else:
            y, mean, var, _ = _forward(xs, rs, weight, bias, seed, config, _local_stats,
                                       running_mean, running_var, copy_stats=False)
        count = x.numel() // C if C else 0
    return (y if shape is not None else from_storage(y, x.shape, cl)), mean, var, count


# fusedreg._C.batch_norm_train / batch_norm_eval: the cpu backend's local training call without
# dropout as a C++ autograd node, and its eval call without autograd (csrc/ops.cpp), or None
_CPU_TRAIN = extension_call("batch_norm_train")
_CPU_EVAL = extension_call("batch_norm_eval")
# the cpu backend's ops as this module registered them: the C++ calls run those, so a call takes
# them only while they are the registered ones (a test or a user may register others)
_CPU_KERNELS = backends.implementation(OP, "cpu") if _CPU_TRAIN is not None else None
_implementation = backends.implementation


def node_serves(backend: str) -> bool:
    """The C++ calls (``batch_norm_train``, ``batch_norm_eval``) may serve ``backend``: it is
    cpu, whose built-in kernels they run, and those are the registered ones."""
    return (_CPU_TRAIN is not None and backend == "cpu"
            and _implementation(OP, "cpu") is _CPU_KERNELS)
