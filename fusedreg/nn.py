"""torch.nn modules backed by the fused ops."""
from __future__ import annotations

import torch
from torch import nn

from . import functional as F
from ._activations import activation_code
from ._checks import check_probability

__all__ = ["BiasDropout", "Dropout", "DropoutAddLayerNorm", "LayerNorm", "RMSNorm"]


class _Traceable:
    """torch.jit.script cannot compile these modules (their forward runs Python argument
    checks before a registered op): it raises this error, naming what works instead."""

    def __prepare_scriptable__(self):
        raise RuntimeError(
            f"torch.jit.script cannot compile fusedreg.nn.{type(self).__name__}: its forward "
            "checks arguments in Python before calling a registered custom op. Use "
            "torch.jit.trace, torch.export.export or torch.compile (all supported), or "
            "fusedreg.unpatch(model) before scripting.")


class Dropout(_Traceable, nn.Dropout):
    """Drop-in for ``torch.nn.Dropout`` (same arguments, repr and state) whose mask comes
    from a seed (docs/design.md, "The dropout mask") and is recomputed in backward instead of
    being stored."""

    def __init__(self, p: float = 0.5, inplace: bool = False) -> None:
        check_probability(p)
        super().__init__(p=p, inplace=inplace)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return F.dropout(input, self.p, self.training, inplace=self.inplace)


class BiasDropout(_Traceable, nn.Module):
    """``residual + dropout(act(x + bias))`` with a learned bias of shape (features,)."""

    def __init__(self, features: int, p: float = 0.5, activation=None, device=None, dtype=None) -> None:
        super().__init__()
        if isinstance(features, bool) or not isinstance(features, int) or features <= 0:
            raise ValueError(f"features must be a positive int, got {features!r}")
        self.p = check_probability(p)
        activation_code(activation)
        self.activation = activation
        self.bias = nn.Parameter(torch.zeros(features, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        bias = self.bias if self.bias.dtype == x.dtype else self.bias.to(x.dtype)
        return F.bias_dropout(x, bias, residual, p=self.p, training=self.training,
                              activation=self.activation)

    def extra_repr(self) -> str:
        return f"{self.bias.shape[0]}, p={self.p}, activation={self.activation!r}"


class LayerNorm(_Traceable, nn.LayerNorm):
    """Drop-in for ``torch.nn.LayerNorm``: same constructor, parameters and ``state_dict``
    (a state dict moves between the two either way), forward by ``fusedreg.functional.layer_norm``."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(input, self.normalized_shape, self.weight, self.bias, self.eps)


class RMSNorm(_Traceable, nn.RMSNorm):
    """Drop-in for ``torch.nn.RMSNorm`` (eps=None means the epsilon of the compute type,
    float32's for float16/bfloat16/float32 input, as torch's)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, self.normalized_shape, self.weight, self.eps)


class DropoutAddLayerNorm(_Traceable, nn.Module):
    """``norm(residual + dropout(x))`` with a learned weight (and bias, unless ``rms``);
    ``forward(x, residual=None)`` returns y, or (y, h) with ``prenorm=True`` where h is the
    sum before the norm (the next block's residual). See
    ``fusedreg.functional.dropout_add_layer_norm``."""

    def __init__(self, normalized_shape, p: float = 0.0, eps: float = 1e-5, prenorm: bool = False,
                 rms: bool = False, residual_in_fp32: bool = False, device=None, dtype=None) -> None:
        super().__init__()
        if isinstance(normalized_shape, int) and not isinstance(normalized_shape, bool):
            normalized_shape = (normalized_shape,)
        self.normalized_shape = tuple(normalized_shape)
        if not self.normalized_shape or any(
                isinstance(d, bool) or not isinstance(d, int) or d < 0 for d in self.normalized_shape):
            raise ValueError(f"normalized_shape must be a non-empty tuple of ints >= 0, got {normalized_shape!r}")
        self.p = check_probability(p)
        self.eps = eps
        self.prenorm, self.rms, self.residual_in_fp32 = prenorm, rms, residual_in_fp32
        self.weight = nn.Parameter(torch.ones(self.normalized_shape, device=device, dtype=dtype))
        if rms:
            self.register_parameter("bias", None)
        else:
            self.bias = nn.Parameter(torch.zeros(self.normalized_shape, device=device, dtype=dtype))

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        return F.dropout_add_layer_norm(x, residual, self.weight, self.bias, p=self.p, eps=self.eps,
                                        training=self.training, prenorm=self.prenorm, rms=self.rms,
                                        residual_in_fp32=self.residual_in_fp32)

    def extra_repr(self) -> str:
        return (f"{self.normalized_shape}, p={self.p}, eps={self.eps}, prenorm={self.prenorm}, "
                f"rms={self.rms}, residual_in_fp32={self.residual_in_fp32}")


# ---- BatchNorm ------------------------------------------------------------------------------

__all__ += ["BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "BatchNormAct2d", "SyncBatchNorm",
            "batchnorm_patch_targets"]


def _batch_norm_forward(m, input, activation=None, residual=None, p=0.0, process_group=None):
    """torch's ``_BatchNorm.forward`` (momentum=None: cumulative average over
    num_batches_tracked; track_running_stats=False: batch statistics, buffers untouched),
    over ``fusedreg.functional.batch_norm_act`` (torch's ops for a small call under auto, a
    plain eval call without grad straight to the cpu kernel and a local training call without
    dropout as the cpu backend's C++ autograd node, as the functional's)."""
    # parameters and buffers read from their dicts, where Module.__getattr__ finds them (the
    # same objects, torch.func.functional_call's included), at a fraction of its cost
    params, buffers = m._parameters, m._buffers
    training, momentum = m.training, m.momentum
    running_mean, running_var = buffers["running_mean"], buffers["running_var"]
    factor = 0.0 if momentum is None else momentum
    if training and m.track_running_stats:
        tracked = buffers["num_batches_tracked"]
        if tracked is not None:
            tracked.add_(1)
            if momentum is None:
                factor = 1.0 / float(tracked)
    bn_training = training or (running_mean is None and running_var is None)
    if training and not m.track_running_stats:  # batch statistics, buffers untouched
        running_mean = running_var = None
    weight, bias, eps = params["weight"], params["bias"], m.eps
    if process_group is None:
        y = F._torch_small_batch_norm(input, running_mean, running_var, weight, bias,
                                      bn_training, factor, eps, activation, residual, p)
        if y is None and (p == 0.0 or not bn_training):  # dropout is training's only
            y = F._cpu_eval_batch_norm(input, running_mean, running_var, weight, bias,
                                       bn_training, factor, eps, activation, residual)
        if y is None and p == 0.0:
            y = F._cpu_train_batch_norm(input, running_mean, running_var, weight, bias,
                                        bn_training, factor, eps, activation, residual)
        if y is not None:
            return y
    return F._batch_norm(input, running_mean, running_var, weight, bias, bn_training, factor, eps,
                         activation, residual, p, None,
                         process_group=process_group if bn_training else None)


class BatchNorm1d(nn.BatchNorm1d):
    """Drop-in for ``torch.nn.BatchNorm1d``: same constructor, parameters, buffers
    (``num_batches_tracked`` included) and ``state_dict``; forward by
    ``fusedreg.functional.batch_norm``."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(input)
        return _batch_norm_forward(self, input)


class BatchNorm2d(nn.BatchNorm2d):
    """Drop-in for ``torch.nn.BatchNorm2d`` (contiguous or channels_last input)."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(input)
        return _batch_norm_forward(self, input)


class BatchNorm3d(nn.BatchNorm3d):
    """Drop-in for ``torch.nn.BatchNorm3d`` (contiguous or channels_last_3d input)."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(input)
        return _batch_norm_forward(self, input)


def _fused_activation(act: nn.Module):
    """The activation name of ``fusedreg.functional.batch_norm_act`` that computes ``act``,
    or False when it has none (the module then runs after the fused norm)."""
    if type(act) in (nn.Identity,):
        return None
    if type(act) in (nn.ReLU,):
        return "relu"
    if type(act) in (nn.SiLU,):
        return "silu"
    if type(act) in (nn.GELU,):
        return "gelu_tanh" if act.approximate == "tanh" else "gelu"
    # timm's own GELU classes (timm.layers.activations) call F.gelu the same way
    if type(act).__module__.startswith("timm.") and type(act).__name__ in ("GELU", "GELUTanh"):
        return "gelu_tanh" if type(act).__name__ == "GELUTanh" else "gelu"
    return False


class BatchNormAct2d(nn.BatchNorm2d):
    """BatchNorm2d + dropout + activation in one fused pass: timm's ``BatchNormAct2d``
    (``timm.layers.BatchNormAct2d``: same constructor, submodules ``drop`` and ``act``,
    parameters, buffers and ``state_dict`` keys, so a timm model's modules can be swapped to
    it). timm's order is bn → drop → act; fused, it is act then dropout, which is the same
    function for the activations that commute with dropout (ReLU, none). So the whole module
    is one ``batch_norm_act`` call when ``drop`` is an ``nn.Identity``, or an ``nn.Dropout``
    with ReLU or no activation (the dropout mask is then fusedreg's seeded one); any other
    ``drop`` or ``act`` runs as its own module after the fused norm, in timm's order.
    ``forward(x, residual=None)``: a residual is added before the activation (ResNet's
    ``relu(bn(x) + identity)``)."""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float = 0.1,
                 affine: bool = True, track_running_stats: bool = True, apply_act: bool = True,
                 act_layer=nn.ReLU, act_kwargs=None, inplace: bool = True, drop_layer=None,
                 device=None, dtype=None) -> None:
        super().__init__(num_features, eps=eps, momentum=momentum, affine=affine,
                         track_running_stats=track_running_stats, device=device, dtype=dtype)
        self.drop = drop_layer() if drop_layer is not None else nn.Identity()
        act = None
        if apply_act and act_layer is not None:
            kwargs = dict(act_kwargs or {})
            if isinstance(act_layer, str):
                act_layer = {"relu": nn.ReLU, "silu": nn.SiLU, "swish": nn.SiLU,
                             "gelu": nn.GELU}.get(act_layer)
                if act_layer is None:
                    raise ValueError("act_layer given by name must be 'relu', 'silu', 'swish' or "
                                     "'gelu' (or pass a module class)")
            try:
                act = act_layer(inplace=inplace, **kwargs)
            except TypeError:  # activations without an inplace argument (GELU)
                act = act_layer(**kwargs)
        self.act = act if act is not None else nn.Identity()

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        if x.dim() != 4:
            raise ValueError(f"expected 4D input (got {x.dim()}D input)")
        modules = self._modules  # where Module.__getattr__ finds them, read directly
        act = _fused_activation(modules["act"])
        drop = modules["drop"]
        p = 0.0
        fused_drop = type(drop) is nn.Identity
        if not fused_drop and isinstance(drop, nn.Dropout) and act in (None, "relu") \
                and not isinstance(drop, (nn.Dropout1d, nn.Dropout2d, nn.Dropout3d)):
            fused_drop, p = True, drop.p
        if act is not False and fused_drop:
            return _batch_norm_forward(self, x, act, residual, p if self.training else 0.0)
        y = _batch_norm_forward(self, x, None, residual)
        return self.act(self.drop(y))


class SyncBatchNorm(nn.SyncBatchNorm):
    """Drop-in for ``torch.nn.SyncBatchNorm``: in training with an initialized process group
    of more than one rank, the statistics are those of the whole batch across the ranks of
    ``process_group`` (each rank's count, mean and variance all-gathered and combined in rank
    order) and backward all-reduces the per-channel sums before grad_input, as torch's does;
    otherwise it is ``BatchNorm``. ``convert_sync_batchnorm`` turns every BatchNorm (torch's or
    fusedreg's) of a model into this class, keeping the Parameter objects and buffers."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(input)
        self._check_non_zero_input_channels(input)
        group = None
        if self.training and torch.distributed.is_available() and torch.distributed.is_initialized():
            group = self.process_group or torch.distributed.group.WORLD
            if torch.distributed.get_world_size(group) <= 1:
                group = None
        return _batch_norm_forward(self, input, process_group=group)

    @classmethod
    def convert_sync_batchnorm(cls, module, process_group=None):
        out = module
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, cls):
            out = cls(module.num_features, module.eps, module.momentum, module.affine,
                      module.track_running_stats, process_group)
            if module.affine:
                with torch.no_grad():
                    out.weight = module.weight
                    out.bias = module.bias
            out.running_mean = module.running_mean
            out.running_var = module.running_var
            out.num_batches_tracked = module.num_batches_tracked
            out.training = module.training
            if hasattr(module, "qconfig"):
                out.qconfig = module.qconfig
        for name, child in module.named_children():
            out.add_module(name, cls.convert_sync_batchnorm(child, process_group))
        del module
        return out


def batchnorm_patch_targets() -> dict:
    """{module class: fusedreg class} for a drop-in swap of BatchNorm modules by class (the
    instance, its Parameter objects, buffers and state_dict keys stay): torch's exact
    ``BatchNorm1d/2d/3d`` and ``SyncBatchNorm``, and timm's ``BatchNormAct2d`` when timm is
    installed (imported here, not at fusedreg's import)."""
    targets = {nn.BatchNorm1d: BatchNorm1d, nn.BatchNorm2d: BatchNorm2d,
               nn.BatchNorm3d: BatchNorm3d, nn.SyncBatchNorm: SyncBatchNorm}
    try:
        from timm.layers import BatchNormAct2d as TimmBatchNormAct2d
    except ImportError:
        return targets
    targets[TimmBatchNormAct2d] = BatchNormAct2d
    return targets
