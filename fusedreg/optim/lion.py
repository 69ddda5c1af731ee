"""fusedreg.optim.Lion (Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms")."""
from __future__ import annotations

from ._base import FusedOptimizer, _local, _scalar, check_betas, check_lr, check_nonneg


class Lion(FusedOptimizer):
    """Lion with decoupled weight decay (the paper's Algorithm 2) and ``l1``:

        u = sign(beta1·m + (1 − beta1)·g);  p ← p·(1 − lr·wd) − lr·u;  m ← beta2·m + (1 − beta2)·g

    State: ``exp_avg`` (m), in the compute type.
    """

    _ALGO = "lion"
    _defaults_for_old_groups = dict(l1=0.0, maximize=False)

    def __init__(self, params, lr=1e-4, betas=(0.9, 0.99), weight_decay=0.0, l1=0.0, *,
                 maximize=False):
        super().__init__(params, dict(lr=lr, betas=betas, weight_decay=weight_decay, l1=l1,
                                      maximize=maximize))

    def _check_group(self, group):
        check_lr(group["lr"])
        check_betas(group["betas"])
        check_nonneg(group["weight_decay"], "weight_decay")
        check_nonneg(group["l1"], "l1")

    def _step_bucket(self, op, group, params, lps, lgs, inv_scale):
        exp_avgs = []
        for p in params:
            st = self.state[p]
            if "exp_avg" not in st:
                st["exp_avg"] = self._zeros_state(p)
            exp_avgs.append(_local(st["exp_avg"]))
        beta1, beta2 = group["betas"]
        op(lps, lgs, exp_avgs, lr=_scalar(group["lr"]), beta1=_scalar(beta1), beta2=_scalar(beta2),
           weight_decay=float(group["weight_decay"]), l1=float(group["l1"]),
           maximize=bool(group["maximize"]), inv_scale=inv_scale)
