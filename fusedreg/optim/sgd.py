"""fusedreg.optim.SGD: torch's API (arguments, positions, defaults, state layout), plus ``l1``
and the options of FusedOptimizer."""
from __future__ import annotations

from ._base import FusedOptimizer, _local, _scalar, check_flags, check_lr, check_nonneg


class SGD(FusedOptimizer):
    """torch.optim.SGD with a fused step and an L1 proximal step (``l1``, per group).

    Positional arguments and defaults are torch's; ``foreach`` and ``fused`` are accepted and
    change nothing; ``differentiable=True`` raises NotImplementedError. ``weight_decay`` is L2
    (added to the gradient) unless ``decoupled_weight_decay=True`` (then
    p ← p·(1 − lr·weight_decay)). State: ``momentum_buffer`` when momentum != 0, set to the
    gradient on its first step, as torch does.
    """

    _ALGO = "sgd"
    _STATE_KEYS = ("momentum_buffer",)
    _defaults_for_old_groups = dict(decoupled_weight_decay=False, nesterov=False, dampening=0.0)

    def __init__(self, params, lr=1e-3, momentum=0.0, dampening=0.0, weight_decay=0.0,
                 nesterov=False, *, maximize=False, foreach=None, differentiable=False,
                 fused=None, decoupled_weight_decay=False, l1=0.0, l1_lr_scaled=True,
                 state_dtype="compute"):
        defaults = dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                        nesterov=nesterov, maximize=maximize, foreach=foreach,
                        differentiable=differentiable, fused=fused,
                        decoupled_weight_decay=decoupled_weight_decay, l1=l1,
                        l1_lr_scaled=l1_lr_scaled, state_dtype=state_dtype)
        super().__init__(params, defaults)

    def _check_group(self, group):
        check_lr(group["lr"])
        check_nonneg(group["momentum"], "momentum")
        check_nonneg(group["dampening"], "dampening")
        check_nonneg(group["weight_decay"], "weight_decay")
        check_nonneg(group["l1"], "l1")
        if group["nesterov"] and (_scalar(group["momentum"]) <= 0 or _scalar(group["dampening"]) != 0):
            raise ValueError("Nesterov momentum requires a momentum and zero dampening")
        check_flags(group, type(self).__name__)

    _HYPER_KEYS = ("lr", "momentum", "dampening", "weight_decay", "l1", "l1_lr_scaled",
                   "maximize", "nesterov", "decoupled_weight_decay")

    def _make_hyper(self, group, inv_scale):
        return dict(momentum=_scalar(group["momentum"]), dampening=_scalar(group["dampening"]),
                    nesterov=bool(group["nesterov"]),
                    decoupled=bool(group["decoupled_weight_decay"]), inv_scale=inv_scale,
                    **self._op_hyper(group))

    def _step_bucket(self, op, group, bucket, lps, lgs, inv_scale):
        hyper = self._bucket_hyper(group, bucket, inv_scale)
        if hyper["momentum"] == 0.0:
            op(lps, lgs, [], first_step=False, **hyper)
            return
        if bucket.memo is not None:  # a reused bucket: its buffers, as the last step found them
            op(lps, lgs, bucket.memo, first_step=False, **hyper)
            return
        # Parameters whose buffer is new take buf = g (first_step); one call per kind.
        state = self.state
        bufs, new = [], []
        for i, (p, st) in enumerate(zip(bucket.params, bucket.states)):
            buf = st.get("momentum_buffer") if st else None
            if buf is None:
                buf = state[p]["momentum_buffer"] = self._zeros_state(p, group)
                new.append(i)
            bufs.append(buf)
        if bucket.distributed:
            bufs = [_local(b) for b in bufs]
        if not new:  # the usual step: every buffer exists, one call
            bucket.memo = bufs
            op(lps, lgs, bufs, first_step=False, **hyper)
            return
        is_new = set(new)
        old = [i for i in range(len(lps)) if i not in is_new]
        for first, idx in ((True, new), (False, old)):
            if idx:
                op([lps[i] for i in idx], [lgs[i] for i in idx], [bufs[i] for i in idx],
                   first_step=first, **hyper)
