"""fusedreg.optim.Adam and AdamW: torch's API and state layout, plus ``l1``."""
from __future__ import annotations

import torch

from ._base import FusedOptimizer, _local, _scalar, check_betas, check_lr, check_nonneg


class Adam(FusedOptimizer):
    """torch.optim.Adam with a fused step and an L1 proximal step (``l1``, per group).

    ``weight_decay`` is L2 (added to the gradient) unless ``decoupled_weight_decay=True``
    (then it is AdamW's). State per parameter: ``step`` (0-dim float32 CPU tensor),
    ``exp_avg``, ``exp_avg_sq`` and, with amsgrad, ``max_exp_avg_sq``; moments are float32 for
    fp16/bf16/fp32 parameters and float64 for float64 ones.
    """

    _ALGO = "adam"
    _defaults_for_old_groups = dict(l1=0.0, amsgrad=False, maximize=False,
                                    decoupled_weight_decay=False)

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, l1=0.0,
                 amsgrad=False, *, maximize=False, decoupled_weight_decay=False):
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, l1=l1,
                        amsgrad=amsgrad, maximize=maximize,
                        decoupled_weight_decay=decoupled_weight_decay)
        super().__init__(params, defaults)

    def _check_group(self, group):
        check_lr(group["lr"])
        check_betas(group["betas"])
        check_nonneg(group["eps"], "eps")
        check_nonneg(group["weight_decay"], "weight_decay")
        check_nonneg(group["l1"], "l1")

    def _step_bucket(self, op, group, params, lps, lgs, inv_scale):
        amsgrad = bool(group["amsgrad"])
        exp_avgs, exp_avg_sqs, max_sqs, step_ts = [], [], [], []
        for p in params:
            st = self.state[p]
            if len(st) == 0:
                st["step"] = torch.tensor(0.0, dtype=torch.float32)
                st["exp_avg"] = self._zeros_state(p)
                st["exp_avg_sq"] = self._zeros_state(p)
            if amsgrad and "max_exp_avg_sq" not in st:
                st["max_exp_avg_sq"] = self._zeros_state(p)
            step_ts.append(st["step"])
            exp_avgs.append(_local(st["exp_avg"]))
            exp_avg_sqs.append(_local(st["exp_avg_sq"]))
            if amsgrad:
                max_sqs.append(_local(st["max_exp_avg_sq"]))
        # the step counters are 0-dim float32 CPU tensors, as torch's: two calls for all of
        # them rather than an increment and an .item() per parameter
        torch._foreach_add_(step_ts, 1.0)
        steps = torch.stack(step_ts).tolist()
        beta1, beta2 = group["betas"]
        op(lps, lgs, exp_avgs, exp_avg_sqs, max_sqs, steps, lr=_scalar(group["lr"]),
           beta1=_scalar(beta1), beta2=_scalar(beta2), eps=float(group["eps"]),
           weight_decay=float(group["weight_decay"]), l1=float(group["l1"]), amsgrad=amsgrad,
           maximize=bool(group["maximize"]), decoupled=bool(group["decoupled_weight_decay"]),
           inv_scale=inv_scale)


class AdamW(Adam):
    """torch.optim.AdamW (decoupled weight decay) with a fused step and ``l1``."""

    _defaults_for_old_groups = dict(l1=0.0, amsgrad=False, maximize=False,
                                    decoupled_weight_decay=True)

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, l1=0.0,
                 amsgrad=False, *, maximize=False):
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, l1=l1,
                         amsgrad=amsgrad, maximize=maximize, decoupled_weight_decay=True)
