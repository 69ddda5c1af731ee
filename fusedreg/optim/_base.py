"""The base of the fused optimizers: param-group checks, validation of a whole step before any
write, grouping by (device, dtype), local shards of DTensor parameters, AMP and state dicts.

A step runs in three phases so that bad input never leaves a half-updated model:
  1. check every parameter with a gradient of every group (sparse grad, dtype, shape,
     device, layout, loaded state) and resolve the backend of every (device, dtype) bucket;
  2. allocate missing state (torch's lazy initialization) — still no parameter is written;
  3. one multi-tensor op call per (group, device, dtype) bucket.
"""
from __future__ import annotations

import math
import numbers

import torch
from torch import Tensor

from .. import backends
from .._checks import FLOAT_DTYPES, check_number
from .._dtypes import compute_dtype

try:  # DTensor parameters (FSDP2) are stepped on their local shards
    from torch.distributed.tensor import DTensor
except ImportError:  # torch built without distributed
    DTensor = None


def _local(t):
    return t.to_local() if DTensor is not None and isinstance(t, DTensor) else t


def check_lr(lr) -> None:
    if isinstance(lr, Tensor):
        if lr.numel() != 1:
            raise ValueError("Tensor lr must be 1-element")
        lr = lr.item()
    check_number(lr, "lr", low=0.0)


def check_betas(betas, name: str = "betas") -> None:
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(f"{name} must be a pair (beta1, beta2), got {betas!r}")
    for i, b in enumerate(betas):
        if isinstance(b, Tensor):
            b = b.item()
        if isinstance(b, bool) or not isinstance(b, numbers.Real) or math.isnan(float(b)):
            raise ValueError(f"Invalid beta parameter at index {i}: {b!r}")
        if not 0.0 <= float(b) < 1.0:
            raise ValueError(f"Invalid beta parameter at index {i}: {b} (must be in [0, 1))")


def check_nonneg(value, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a real number, got {value!r}")
    check_number(value, name, low=0.0)


def _scalar(x) -> float:
    return float(x.item()) if isinstance(x, Tensor) else float(x)


class FusedOptimizer(torch.optim.Optimizer):
    """Subclasses define ``_ALGO`` (the op: "adam", "sgd" or "lion"), ``_check_group(group)``,
    ``_defaults_for_old_groups`` and ``_step_bucket(op, group, params, grads, states,
    inv_scale)`` (plain local tensors)."""

    _step_supports_amp_scaling = True  # GradScaler passes grad_scale / found_inf to step()
    _ALGO = ""
    _defaults_for_old_groups: dict = {}

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        try:
            self._check_group(self.param_groups[-1])
        except Exception:
            self.param_groups.pop()
            raise

    def _check_group(self, group: dict) -> None:
        raise NotImplementedError

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        for group in self.param_groups:  # groups from torch's optimizers lack our keys
            for k, v in self._defaults_for_old_groups.items():
                group.setdefault(k, v)

    _state_unchecked = False  # set by load_state_dict: the next step checks the state

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        self._state_unchecked = True
        # torch's load casts state to the parameter's dtype and may put "step" on the
        # parameter's device (fused/capturable torch optimizers): bring both to our layout —
        # "step" a 0-dim float32 CPU tensor, moments in the compute type.
        for p, st in self.state.items():
            ct = compute_dtype(p.dtype)
            for k, v in list(st.items()):
                if not isinstance(v, Tensor):
                    continue
                if k == "step":
                    st[k] = v.detach().to(device="cpu", dtype=torch.float32).reshape(())
                elif v.is_floating_point() and v.dtype != ct:
                    st[k] = v.to(ct)

    @torch.no_grad()
    def sparsity(self) -> list[float]:
        """Per param group, the fraction of exactly-zero parameter entries (of the local shard
        for DTensor parameters)."""
        out = []
        for group in self.param_groups:
            zeros = total = 0
            for p in group["params"]:
                t = _local(p)
                zeros += int((t == 0).sum().item())
                total += t.numel()
            out.append(zeros / total if total else 0.0)
        return out

    def _collect(self, group: dict):
        """Checks every parameter of ``group`` that has a gradient; returns
        {(device, dtype): (backend, [param], [local param], [local grad])}. Lean on purpose:
        it runs for every parameter at every step."""
        buckets: dict = {}
        check_state = self._state_unchecked
        for p in group["params"]:
            g = p.grad
            if g is None:
                continue
            if g.layout != torch.strided:
                raise RuntimeError(f"fusedreg.optim.{type(self).__name__} does not support sparse "
                                   "gradients; nothing was updated")
            if DTensor is not None and isinstance(p, DTensor):
                lp, lg = p.to_local(), g.to_local()
            else:
                lp, lg = p, g
            if lg.dtype != lp.dtype or lg.shape != lp.shape or lg.device != lp.device:
                raise ValueError(
                    f"fusedreg.optim: a gradient ({lg.dtype}, {tuple(lg.shape)}, {lg.device}) does "
                    f"not match its parameter ({lp.dtype}, {tuple(lp.shape)}, {lp.device}); "
                    "nothing was updated")
            if lp.dtype not in FLOAT_DTYPES:
                raise TypeError(f"fusedreg.optim: parameters must be float16, bfloat16, float32 or "
                                f"float64, got {lp.dtype}; nothing was updated")
            if not lp.is_contiguous():
                raise ValueError("fusedreg.optim: parameters must be contiguous (the fused step "
                                 "writes them in place); nothing was updated")
            if check_state:  # state that we did not create (loaded): check it once
                self._check_state(p, lp)
            key = (lp.device, lp.dtype)
            bucket = buckets.get(key)
            if bucket is None:
                bucket = buckets[key] = (backends.resolve(self._ALGO, lp.device), [], [], [])
            bucket[1].append(p)
            bucket[2].append(lp)
            bucket[3].append(lg if lg.is_contiguous() else lg.contiguous())
        return buckets

    def _check_state(self, p, lp) -> None:
        for k, v in self.state.get(p, {}).items():
            if k == "step" or not isinstance(v, Tensor):
                continue
            lv = _local(v)
            if lv.shape != lp.shape or lv.device != lp.device or not lv.is_contiguous():
                raise ValueError(
                    f"fusedreg.optim: state {k!r} ({tuple(lv.shape)}, {lv.device}) does not "
                    f"match its parameter ({tuple(lp.shape)}, {lp.device}); nothing was updated")

    def _zeros_state(self, p: Tensor) -> Tensor:
        """A state tensor for ``p`` in the compute type (a DTensor for a DTensor p)."""
        return torch.zeros_like(p, dtype=compute_dtype(p.dtype), memory_format=torch.contiguous_format)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        grad_scale = getattr(self, "grad_scale", None)
        found_inf = getattr(self, "found_inf", None)
        # Phase 1: validate everything.
        plan = [(group, self._collect(group)) for group in self.param_groups]
        self._state_unchecked = False
        # AMP: an inf/nan step changes no parameter and no state (a host read of found_inf:
        # one sync per step on a GPU, and only under GradScaler).
        if found_inf is not None and float(found_inf.sum().item()) != 0.0:
            return loss
        inv_scale = 1.0 / float(grad_scale.item()) if grad_scale is not None else 1.0
        # Phase 2 + 3 per bucket: allocate missing state, then one op call.
        for group, buckets in plan:
            for backend, ps, lps, lgs in buckets.values():
                self._step_bucket(backends.implementation(self._ALGO, backend), group, ps, lps, lgs,
                                  inv_scale)
        return loss
