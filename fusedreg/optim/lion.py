"""fusedreg.optim.Lion (Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms")."""
from __future__ import annotations

from ._base import FusedOptimizer, _local, _scalar, check_betas, check_flags, check_lr, check_nonneg


class Lion(FusedOptimizer):
    """Lion with decoupled weight decay (the paper's Algorithm 2) and ``l1``:

        u = sign(beta1·m + (1 − beta1)·g);  p ← p·(1 − lr·wd) − lr·u;  m ← beta2·m + (1 − beta2)·g

    No torch class to follow: its own signature, with ``l1`` and FusedOptimizer's options
    keyword-only. State: ``exp_avg`` (m), in the state dtype and the parameter's layout.
    """

    _ALGO = "lion"
    _STATE_KEYS = ("exp_avg",)
    _defaults_for_old_groups: dict = {}

    def __init__(self, params, lr=1e-4, betas=(0.9, 0.99), weight_decay=0.0, *, maximize=False,
                 l1=0.0, l1_lr_scaled=True, state_dtype="compute"):
        super().__init__(params, dict(lr=lr, betas=betas, weight_decay=weight_decay,
                                      maximize=maximize, l1=l1, l1_lr_scaled=l1_lr_scaled,
                                      state_dtype=state_dtype))

    def _check_group(self, group):
        check_lr(group["lr"])
        check_betas(group["betas"], group)
        check_nonneg(group["weight_decay"], "weight_decay")
        check_nonneg(group["l1"], "l1")
        check_flags(group, type(self).__name__)

    def _step_bucket(self, op, group, bucket, lps, lgs, inv_scale):
        exp_avgs = []
        state = self.state
        for p, st in zip(bucket.params, bucket.states):
            m = st.get("exp_avg") if st else None
            if m is None:
                m = state[p]["exp_avg"] = self._zeros_state(p, group)
            exp_avgs.append(m)
        if bucket.distributed:
            exp_avgs = [_local(m) for m in exp_avgs]
        op(lps, lgs, exp_avgs, **self._bucket_hyper(group, bucket, inv_scale))

    _HYPER_KEYS = ("lr", "betas", "weight_decay", "l1", "l1_lr_scaled", "maximize")

    def _make_hyper(self, group, inv_scale):
        beta1, beta2 = group["betas"]
        return dict(beta1=_scalar(beta1), beta2=_scalar(beta2), inv_scale=inv_scale,
                    **self._op_hyper(group))
