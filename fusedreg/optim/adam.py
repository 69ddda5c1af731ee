"""fusedreg.optim.Adam and AdamW: torch's API (arguments, positions, defaults, state layout),
plus ``l1`` and the options of FusedOptimizer."""
from __future__ import annotations

import torch

from ..ops.optim import CAPTURABLE
from ._base import (FusedOptimizer, _local, _scalar, _step_device, check_betas, check_flags,
                    check_lr, check_nonneg)


class Adam(FusedOptimizer):
    """torch.optim.Adam with a fused step and an L1 proximal step (``l1``, per group).

    Positional arguments and defaults are torch's; ``foreach`` and ``fused`` are accepted and
    change nothing (every step is fused); ``capturable=True`` (CPU and CUDA parameters) keeps
    the step counts on the parameters' device and makes a step that reads nothing on the host
    (step counts, a tensor lr, grad_scale and found_inf are read by the kernels), so that it
    can be captured in a CUDA graph; ``differentiable=True`` raises NotImplementedError.
    ``weight_decay`` is L2 (added to the gradient) unless ``decoupled_weight_decay=True``
    (then it is AdamW's). State per parameter: ``step`` (0-dim float32 tensor, on the CPU, or
    on the parameter's device with capturable), ``exp_avg``, ``exp_avg_sq`` and, with
    amsgrad, ``max_exp_avg_sq``, in the parameter's layout; moments are float32 for
    fp16/bf16/fp32 parameters and float64 for float64 ones (``state_dtype="param"``: the
    parameter's dtype).
    """

    _ALGO = "adam"
    _CAPTURABLE_ALGO = CAPTURABLE
    _STATE_KEYS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")
    _defaults_for_old_groups = dict(amsgrad=False, capturable=False, decoupled_weight_decay=False)

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                 amsgrad=False, *, foreach=None, maximize=False, capturable=False,
                 differentiable=False, fused=None, decoupled_weight_decay=False, l1=0.0,
                 l1_lr_scaled=True, state_dtype="compute"):
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
                        maximize=maximize, foreach=foreach, capturable=capturable,
                        differentiable=differentiable, fused=fused,
                        decoupled_weight_decay=decoupled_weight_decay, l1=l1,
                        l1_lr_scaled=l1_lr_scaled, state_dtype=state_dtype)
        super().__init__(params, defaults)

    def _check_group(self, group):
        if isinstance(group["lr"], torch.Tensor) and group["foreach"] and not group["capturable"]:
            raise ValueError("lr as a Tensor is not supported for capturable=False and foreach=True")
        check_lr(group["lr"])
        check_nonneg(group["eps"], "eps", "epsilon")
        check_betas(group["betas"], group)
        check_nonneg(group["weight_decay"], "weight_decay")
        check_nonneg(group["l1"], "l1")
        check_flags(group, type(self).__name__)

    def _required_state(self, group):
        return ("step", "exp_avg", "exp_avg_sq")

    def _bucket_state(self, group, bucket, lps):
        """The state lists of a bucket, allocating missing state (torch's lazy init): step
        counts on the CPU, or on the parameter's device with capturable (a fill there)."""
        amsgrad = bool(group["amsgrad"])
        step_device = _step_device(lps[0], group)  # one device per bucket
        memo = bucket.memo
        if memo is not None and memo[0] == (amsgrad, step_device):
            return memo[1]  # a reused bucket: no state has changed since these lists were made
        exp_avgs, exp_avg_sqs, max_sqs, step_ts = [], [], [], []
        state = self.state
        on_cpu = step_device.type == "cpu"
        for p, st in zip(bucket.params, bucket.states):
            if not st:  # no state yet: torch's lazy initialization
                st = state[p]
                st["step"] = torch.zeros((), dtype=torch.float32, device=step_device)
                st["exp_avg"] = self._zeros_state(p, group)
                st["exp_avg_sq"] = self._zeros_state(p, group)
            step = st["step"]
            if (not step.is_cpu) if on_cpu else step.device != step_device:
                # capturable switched after the state was checked: move the count (once)
                step = st["step"] = step.detach().to(step_device, torch.float32).reshape(())
            if amsgrad and "max_exp_avg_sq" not in st:
                st["max_exp_avg_sq"] = self._zeros_state(p, group)
            step_ts.append(step)
            exp_avgs.append(st["exp_avg"])
            exp_avg_sqs.append(st["exp_avg_sq"])
            if amsgrad:
                max_sqs.append(st["max_exp_avg_sq"])
        if bucket.distributed:  # DTensor parameters: their state is stepped as local shards
            exp_avgs, exp_avg_sqs, max_sqs = ([_local(t) for t in ts]
                                              for ts in (exp_avgs, exp_avg_sqs, max_sqs))
        # kept for a reuse of this bucket, which happens only while the state is unchanged
        # (a state created or moved above changes it: the next step builds new buckets)
        bucket.memo = ((amsgrad, step_device), (exp_avgs, exp_avg_sqs, max_sqs, step_ts))
        return exp_avgs, exp_avg_sqs, max_sqs, step_ts

    def _step_bucket_capturable(self, op, group, bucket, lps, lgs, amp):
        """The capturable step: no host read of a device tensor. The step counts are
        incremented on the device before the op and, after an inf/nan step (found_inf != 0),
        decremented again by found_inf, as torch's fused Adam does; a tensor lr on the
        parameters' device is read there (a CPU one with CUDA parameters is read on the host,
        as torch does); grad_scale and found_inf are moved to the parameters' device (an
        asynchronous copy, no-op when already there)."""
        grad_scale, found_inf = amp
        device = lps[0].device
        exp_avgs, exp_avg_sqs, max_sqs, step_ts = self._bucket_state(group, bucket, lps)
        lr, lr_tensor = group["lr"], None
        if isinstance(lr, torch.Tensor):
            if lr.device.type == "cpu" and device.type != "cpu":
                lr = float(lr.item())  # a CPU tensor: a host value, nothing to synchronize
            else:  # (an integer lr tensor, which torch accepts, read as float32)
                dtype = lr.dtype if lr.is_floating_point() else torch.float32
                lr_tensor, lr = lr.detach().to(device, dtype, non_blocking=True), 0.0
        gs = None if grad_scale is None else grad_scale.to(device, non_blocking=True)
        fi = None if found_inf is None else found_inf.to(device, non_blocking=True)
        beta1, beta2 = group["betas"]
        hyper = self._op_hyper(dict(group, lr=lr))
        del hyper["lr"]
        torch._foreach_add_(step_ts, 1.0)
        try:
            op(lps, lgs, exp_avgs, exp_avg_sqs, max_sqs, step_ts, lr_tensor, gs, fi,
               lr=float(lr), beta1=_scalar(beta1), beta2=_scalar(beta2),
               eps=_scalar(group["eps"]), amsgrad=bool(group["amsgrad"]),
               decoupled=bool(group["decoupled_weight_decay"]), **hyper)
        except Exception:  # the op checks before it writes: leave the counts as they were
            torch._foreach_sub_(step_ts, 1.0)
            raise
        if fi is not None:  # a skipped step does not count
            torch._foreach_sub_(step_ts, [fi.reshape(()).to(torch.float32)] * len(step_ts))

    _HYPER_KEYS = ("lr", "betas", "eps", "weight_decay", "l1", "l1_lr_scaled", "maximize",
                   "amsgrad", "decoupled_weight_decay")

    def _make_hyper(self, group, inv_scale):
        beta1, beta2 = group["betas"]
        return dict(beta1=_scalar(beta1), beta2=_scalar(beta2), eps=_scalar(group["eps"]),
                    amsgrad=bool(group["amsgrad"]),
                    decoupled=bool(group["decoupled_weight_decay"]), inv_scale=inv_scale,
                    **self._op_hyper(group))

    def _step_bucket(self, op, group, bucket, lps, lgs, inv_scale):
        # the op checks everything, then adds one to each count (0-dim float32 CPU tensors,
        # as torch's) and steps with the new counts: no per-tensor increment here
        exp_avgs, exp_avg_sqs, max_sqs, step_ts = self._bucket_state(group, bucket, lps)
        op(lps, lgs, exp_avgs, exp_avg_sqs, max_sqs, step_ts,
           **self._bucket_hyper(group, bucket, inv_scale))


class AdamW(Adam):
    """torch.optim.AdamW (decoupled weight decay) with a fused step and ``l1``; torch's
    positional arguments and defaults (weight_decay=1e-2)."""

    _defaults_for_old_groups = dict(amsgrad=False, capturable=False, decoupled_weight_decay=True)

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2,
                 amsgrad=False, *, maximize=False, foreach=None, capturable=False,
                 differentiable=False, fused=None, l1=0.0, l1_lr_scaled=True,
                 state_dtype="compute"):
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                         amsgrad=amsgrad, foreach=foreach, maximize=maximize,
                         capturable=capturable, differentiable=differentiable, fused=fused,
                         decoupled_weight_decay=True, l1=l1, l1_lr_scaled=l1_lr_scaled,
                         state_dtype=state_dtype)
