"""The base of the fused optimizers: torch's constructor checks, param-group checks, validation
of a whole step before any write, grouping by (device, dtype), local shards of DTensor
parameters, AMP, parameter layouts and transactional state dicts.

A step runs in three phases so that bad input never leaves a half-updated model:
  1. check every parameter with a gradient of every group (sparse grad, dtype, shape, device,
     layout, loaded state: missing keys, shapes, a Python-float ``step``) and resolve the
     backend of every (device, dtype) bucket; the value-preserving fixes this finds (a
     gradient or state copied into the parameter's layout, a float ``step`` made a tensor)
     are applied only once everything has passed;
  2. allocate missing state (torch's lazy initialization) — still no parameter is written;
  3. one multi-tensor op call per (group, device, dtype) bucket.

Layouts: the kernels step the flat storage of each parameter, so a parameter of any dense
non-overlapping layout (contiguous, channels_last, transposed...) is stepped in place, with
its gradient and state in the same layout (state is allocated with the parameter's strides; a
gradient or loaded state of other strides is copied into them first). A parameter that is
not dense (a strided view) is stepped through a contiguous copy that is written back.
"""
from __future__ import annotations

import functools
import itertools
import math
import numbers
import operator
import weakref

import torch
import torch.optim.optimizer as _optimizer_hooks  # (torch's global step hooks)
from torch import Tensor

from .. import backends
from .._checks import FLOAT_DTYPES
from .._dtypes import compute_dtype
from ..ops.optim import DIRECT as _DIRECT
from ..ops.optim import is_dense as _is_dense

try:  # DTensor parameters (FSDP2) are stepped on their local shards
    from torch.distributed.tensor import DTensor
except ImportError:  # torch built without distributed
    DTensor = None

STATE_DTYPES = ("compute", "param")  # the state_dtype option (see FusedOptimizer)
CAPTURABLE_DEVICES = ("cpu", "cuda")  # capturable=True: where the step runs without host reads


def _local(t):
    return t.to_local() if DTensor is not None and isinstance(t, DTensor) else t


def _scalar(x) -> float:
    return float(x.item()) if isinstance(x, Tensor) else float(x)


def _real(value, name: str, *, message: str) -> float:
    """A finite real number (or 1-element tensor); ``message`` is torch's error text."""
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise ValueError(f"Tensor {name} must be 1-element")
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{message}: {name} must be a real number, got {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{message}: {name} must be finite, got {value}")
    return value


def check_lr(lr) -> None:
    if _real(lr, "lr", message=f"Invalid learning rate: {lr}") < 0.0:
        raise ValueError(f"Invalid learning rate: {lr}")


def check_nonneg(value, name: str, label: str | None = None) -> None:
    """torch's "Invalid <label> value: v" for a negative value; also refuses nan/inf."""
    msg = f"Invalid {label or name} value: {value}"
    if _real(value, name, message=msg) < 0.0:
        raise ValueError(msg)


def check_betas(betas, group: dict) -> None:
    """torch's checks of ``betas``: a pair in [0, 1), both floats or both 1-element tensors;
    a tensor beta with foreach=True needs capturable=True (torch refuses it otherwise)."""
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(f"betas must be a pair (beta1, beta2), got {betas!r}")
    for i, b in enumerate(betas):
        v = _real(b, f"betas[{i}]", message=f"Invalid beta parameter at index {i}: {b!r}")
        if not 0.0 <= v < 1.0:
            raise ValueError(f"Invalid beta parameter at index {i}: {b}")
    if isinstance(betas[0], Tensor) != isinstance(betas[1], Tensor):
        raise ValueError("betas must be either both floats or both Tensors")
    for i, b in enumerate(betas):
        if isinstance(b, Tensor) and group.get("foreach") and not group.get("capturable"):
            raise ValueError(f"betas[{i}] as a Tensor is not supported for capturable=False and "
                             "foreach=True")


def check_flags(group: dict, cls: str) -> None:
    """torch's implementation flags: ``foreach`` and ``fused`` change nothing here (every step is
    fused) but keep torch's rules; ``differentiable`` is not supported; ``capturable`` runs
    on CPU and CUDA parameters (see FusedOptimizer)."""
    if group.get("fused") and group.get("foreach"):
        raise RuntimeError("`fused` and `foreach` cannot be `True` together.")
    if group.get("differentiable"):
        raise NotImplementedError(
            f"fusedreg.optim.{cls} does not support differentiable=True (its fused step is not "
            f"differentiable through the update); use torch.optim.{cls}(differentiable=True) for "
            "a step that autograd can differentiate")
    if group.get("state_dtype", "compute") not in STATE_DTYPES:
        raise ValueError(f"state_dtype must be one of {STATE_DTYPES}, got {group['state_dtype']!r}")
    if not isinstance(group.get("l1_lr_scaled", True), bool):
        raise ValueError(f"l1_lr_scaled must be a bool, got {group['l1_lr_scaled']!r}")
    if group.get("capturable"):
        for p in group.get("params", ()):
            if _local(p).device.type not in CAPTURABLE_DEVICES:
                raise RuntimeError(
                    f"fusedreg.optim.{cls}(capturable=True) runs on CPU and CUDA parameters, got "
                    f"one on {_local(p).device}; use torch.optim.{cls}(capturable=True) there")


def _step_device(lp: Tensor, group: dict) -> torch.device:
    """Where a parameter's ``step`` count lives: on the parameter's device with
    capturable=True (read there by the kernels), else on the CPU (read on the host), as in
    torch."""
    return lp.device if group.get("capturable") else _CPU


_CPU = torch.device("cpu")


def _in_layout(src: Tensor, like: Tensor, dtype=None) -> Tensor:
    """``src`` with ``like``'s strides (and ``dtype``, default src's): src itself if it already
    has them, else a copy (torch.empty_like keeps a dense tensor's strides)."""
    dtype = dtype or src.dtype
    if src.dtype == dtype and src.stride() == like.stride() and src.device == like.device:
        return src
    return torch.empty_like(like, dtype=dtype).copy_(src)


class FusedOptimizer(torch.optim.Optimizer):
    """Subclasses define ``_ALGO`` (the op: "adam", "sgd" or "lion"), ``_STATE_KEYS`` (the state
    tensors of a stepped parameter, in the state dtype), ``_check_group(group)``,
    ``_defaults_for_old_groups``, ``_required_state(group)`` (the keys a non-empty loaded state
    must have) and ``_step_bucket(op, group, bucket, lps, lgs, inv_scale)`` (``bucket``: a
    _Bucket, its parameters and their state dicts; ``lps``, ``lgs``: the plain local tensors
    to step).

    Options every fusedreg optimizer adds (keyword-only, per group):

    - ``l1``: the L1 proximal strength; after the update p ← sign(p)·max(|p| − lr·l1, 0)
      (``l1_lr_scaled=True``, the default: the threshold follows the learning rate and its
      schedule) or p ← sign(p)·max(|p| − l1, 0) (``l1_lr_scaled=False``: lr-independent).
    - ``state_dtype``: "compute" (default: the moments of fp16/bf16/fp32 parameters are
      float32, of float64 ones float64) or "param" (the parameter's dtype, as torch keeps them:
      half the state memory for bf16/fp16 parameters; the math stays in float32).
    """

    _step_supports_amp_scaling = True  # GradScaler passes grad_scale / found_inf to step()
    _ALGO = ""
    _STATE_KEYS: tuple = ()
    _defaults_for_old_groups: dict = {}
    _FUSEDREG_DEFAULTS = dict(l1=0.0, l1_lr_scaled=True, state_dtype="compute", foreach=None,
                              fused=None, differentiable=False, maximize=False)

    def __init__(self, params, defaults: dict) -> None:
        # torch checks the hyperparameters before it looks at params
        self._check_group(defaults)
        self._verified: dict = {}  # see _state_verified
        self._grad_checked: dict = {}  # see _collect
        self._memo: dict = {}  # see _memo_plan
        self._memo_snapshot = None  # the state after the step that filled _memo
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        try:
            self._check_group(self.param_groups[-1])
        except Exception:
            self.param_groups.pop()
            raise

    def _check_group(self, group: dict) -> None:
        raise NotImplementedError

    def _required_state(self, group: dict) -> tuple:
        return ()

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        self._verified = {}
        self._grad_checked = {}
        self._memo = {}
        self._memo_snapshot = None
        for group in self.param_groups:  # groups from torch's optimizers lack our keys
            for k, v in {**self._FUSEDREG_DEFAULTS, **self._defaults_for_old_groups}.items():
                group.setdefault(k, v)
            for p in group["params"]:  # old checkpoints hold "step" as a Python number
                st = self.state.get(p)
                if st and isinstance(st.get("step"), numbers.Real) and not isinstance(st["step"], bool):
                    st["step"] = torch.tensor(float(st["step"]), dtype=torch.float32)

    # ---- state dicts ---------------------------------------------------------------------------
    def _state_dtype(self, p: Tensor, group: dict) -> torch.dtype:
        return p.dtype if group.get("state_dtype") == "param" else compute_dtype(p.dtype)

    def load_state_dict(self, state_dict: dict) -> None:
        """torch's load, made transactional: either the whole state dict loads or nothing
        changes (an error names the parameter and the key, or the param group whose
        hyperparameters fail the constructor's checks). The state tensors are taken from
        ``state_dict`` as they were saved, converted once to this optimizer's state dtype and
        the parameter's layout — not through torch's cast to the parameter dtype, which would
        round float32 moments of bf16/fp16 parameters (resume then equals an uninterrupted
        run bit for bit). Extra state for an id that is no parameter is kept as is, as torch
        does."""
        saved = {k: self.__dict__[k] for k in ("state", "param_groups")}
        self._verified = {}
        self._grad_checked = {}
        self._memo = {}
        self._memo_snapshot = None
        try:
            ids = [i for g in state_dict["param_groups"] for i in g["params"]]
            params = [p for g in self.param_groups for p in g["params"]]
            originals = {p: state_dict["state"][i] for i, p in zip(ids, params)
                         if i in state_dict.get("state", {})}
            position = {p: i for i, p in zip(ids, params)}
            super().load_state_dict(state_dict)
            for i, group in enumerate(self.param_groups):  # the loaded hyperparameters
                try:
                    self._check_group(group)
                except (ValueError, TypeError) as e:
                    raise type(e)(f"param group {i}: {e}") from e
            group_of = {p: g for g in self.param_groups for p in g["params"]}
            for p, original in originals.items():
                self.state[p] = self._loaded_state(p, position[p], group_of[p], original)
        except Exception as e:
            self.__dict__.update(saved)
            if isinstance(e, (ValueError, KeyError, TypeError)):
                raise type(e)(f"{type(self).__name__}.load_state_dict: {e}; nothing was "
                              "loaded") from e
            raise

    def _loaded_state(self, p: Tensor, pid, group: dict, original: dict) -> dict:
        if not isinstance(original, dict):
            raise TypeError(f"the state of parameter {pid} must be a dict, got "
                            f"{type(original).__name__}")
        lp = _local(p)
        st = {}
        for k, v in original.items():
            if k == "step":
                if isinstance(v, Tensor):
                    if v.numel() != 1:
                        raise ValueError(f"parameter {pid}: state 'step' must hold one number, "
                                         f"got a tensor of shape {tuple(v.shape)}")
                    v = float(v.item())
                elif isinstance(v, bool) or not isinstance(v, numbers.Real):
                    raise TypeError(f"parameter {pid}: state 'step' must be a number, got "
                                    f"{type(v).__name__}")
                if not math.isfinite(float(v)) or float(v) < 0:
                    raise ValueError(f"parameter {pid}: state 'step' must be finite and >= 0, "
                                     f"got {v}")
                st[k] = torch.tensor(float(v), dtype=torch.float32, device=_step_device(lp, group))
            elif isinstance(v, Tensor) and v.is_floating_point() and k in self._STATE_KEYS:
                lv = _local(v)
                if tuple(lv.shape) != tuple(lp.shape):
                    raise ValueError(f"parameter {pid}: state {k!r} has shape {tuple(lv.shape)}, "
                                     f"the parameter {tuple(lp.shape)}")
                sdt = self._state_dtype(lp, group)
                if DTensor is not None and isinstance(p, DTensor):
                    st[k] = v.to(dtype=sdt)  # torch's load placed it like the parameter
                elif _is_dense(lp):
                    st[k] = _in_layout(v.to(lp.device), lp, sdt)
                else:
                    st[k] = v.to(device=lp.device, dtype=sdt).contiguous()
            elif isinstance(v, Tensor):
                st[k] = v.to(lp.device)
            else:
                st[k] = v
        return st

    @torch.no_grad()
    def sparsity(self) -> list:
        """Per param group, the fraction of exactly-zero entries among the parameters the L1
        step applies to (of the local shard for DTensor parameters): a float for a group with
        ``l1 > 0``, None for a group without L1 (its zeros are not the proximal step's)."""
        out = []
        for group in self.param_groups:
            if not _scalar(group.get("l1", 0.0)) > 0.0:
                out.append(None)
                continue
            zeros = total = 0
            for p in group["params"]:
                t = _local(p)
                zeros += int((t == 0).sum().item())
                total += t.numel()
            out.append(zeros / total if total else 0.0)
        return out

    # ---- the step ------------------------------------------------------------------------------
    def _state_verified(self, p, st: dict) -> bool:
        """Whether p's state holds the very objects that passed the last check (kept
        referenced, so no id is reused): the full check runs once per state object — after
        the state is created, loaded or changed by hand — not at every step."""
        seen = self._verified.get(id(p))
        return (seen is not None and seen[1] is st and len(seen[2]) == len(st)
                and all(map(operator.is_, seen[2], st.values())))

    def _collect(self, group: dict, fixes: list, checked: list):
        """Checks every parameter of ``group`` that has a gradient; returns
        {(device, dtype): _Bucket}. Value-preserving fixes (layout copies, a float step) go
        to ``fixes`` as (dict, key, value), applied after every group has passed; the
        parameters whose state was checked to ``checked``. Lean on purpose: it runs for every
        parameter at every step. A gradient that passed the checks is remembered (weakly: a
        freed gradient is not kept alive) with its bucket key and the data pointers of both
        tensors, so that the same gradient of the same parameter — a training loop that
        zeroes gradients in place — is not checked again; a new gradient object
        (``zero_grad(set_to_none=True)``) or new data under either (``.data = ...``, as
        ``module.half()`` does) is checked in full. Both caches are keyed by ``id(p)`` (a
        tensor's own hash is a Python call) and hold ``p``, so that no id is reused."""
        buckets: dict = {}
        grad_seen, verified = self._grad_checked, self._verified
        state_get = self.state.get
        is_ = operator.is_
        for p in group["params"]:
            g = p.grad
            if g is None:
                continue
            pid = id(p)
            hit = grad_seen.get(pid)
            if (hit is not None and hit[1]() is g and hit[3] == p.data_ptr()
                    and hit[4] == g.data_ptr()):
                key, lp, lg, dense = hit[2], p, g, True
            else:
                key, lp, lg, dense = self._check_grad(p, g)
            st = state_get(p)
            if st:
                seen = verified.get(pid)
                if (seen is None or seen[1] is not st or len(seen[2]) != len(st)
                        or not all(map(is_, seen[2], st.values()))):
                    self._check_state(p, lp, group, st, fixes)
                    checked.append(p)
            bucket = buckets.get(key)
            if bucket is None:
                bucket = buckets[key] = _Bucket(backends.resolve(self._ALGO, lp.device))
            if not dense:
                bucket.strided.append(len(bucket.params))
            if lp is not p:
                bucket.distributed = True
            bucket.params.append(p)
            bucket.lparams.append(lp)
            bucket.lgrads.append(lg)
            bucket.states.append(st)
        return buckets

    def _check_grad(self, p, g):
        """A parameter's gradient checked in full: (bucket key, local param, local grad in the
        parameter's layout, whether the parameter is dense). Remembered for the next step when
        the parameter is a dense plain tensor and the gradient was not copied."""
        if g.layout != torch.strided:
            raise RuntimeError(f"fusedreg.optim.{type(self).__name__} does not support sparse "
                               "gradients; nothing was updated")
        distributed = DTensor is not None and isinstance(p, DTensor)
        lp, lg = (p.to_local(), g.to_local()) if distributed else (p, g)
        if lg.dtype != lp.dtype or lg.shape != lp.shape or lg.device != lp.device:
            raise ValueError(
                f"fusedreg.optim: a gradient ({lg.dtype}, {tuple(lg.shape)}, {lg.device}) does "
                f"not match its parameter ({lp.dtype}, {tuple(lp.shape)}, {lp.device}); "
                "nothing was updated")
        if lp.dtype not in FLOAT_DTYPES:
            raise TypeError(f"fusedreg.optim: parameters must be float16, bfloat16, float32 or "
                            f"float64, got {lp.dtype}; nothing was updated")
        key = (lp.device, lp.dtype)
        dense = _is_dense(lp)
        # the kernels read the gradient over the parameter's storage order
        if lg.stride() != lp.stride() and dense:
            lg = _in_layout(lg, lp)
        elif dense and not distributed:
            self._grad_checked[id(p)] = (p, weakref.ref(g), key, p.data_ptr(), g.data_ptr())
        return key, lp, lg, dense

    def _check_state(self, p, lp, group, st: dict, fixes: list) -> None:
        """A parameter's existing state (created here, loaded, or set by hand): every key the
        step reads is present, with the parameter's shape and device; a float step or a state
        tensor of another dtype or layout is converted (after all checks pass)."""
        for k in self._required_state(group):
            if k not in st:
                raise KeyError(f"fusedreg.optim.{type(self).__name__}: the state of a parameter "
                               f"of shape {tuple(lp.shape)} has no {k!r} (a partial state, e.g. a "
                               "truncated checkpoint); nothing was updated")
        step = st.get("step")
        if step is not None and not isinstance(step, Tensor):
            if isinstance(step, bool) or not isinstance(step, numbers.Real):
                raise TypeError(f"fusedreg.optim: state 'step' must be a number or a tensor, got "
                                f"{type(step).__name__}; nothing was updated")
            fixes.append((st, "step", torch.tensor(float(step), dtype=torch.float32,
                                                   device=_step_device(lp, group))))
        elif step is not None and (step.numel() != 1 or step.device != _step_device(lp, group)
                                   or step.dtype != torch.float32 or step.dim() != 0):
            if step.numel() != 1:
                raise ValueError(f"fusedreg.optim: state 'step' of a parameter of shape "
                                 f"{tuple(lp.shape)} has {step.numel()} elements; nothing was "
                                 "updated")
            fixes.append((st, "step", step.detach().to(_step_device(lp, group),
                                                       torch.float32).reshape(())))
        sdt = self._state_dtype(lp, group)
        for k in self._STATE_KEYS:
            v = st.get(k)
            if v is None:
                continue
            lv = _local(v)
            if not isinstance(lv, Tensor) or lv.shape != lp.shape or lv.device != lp.device:
                raise ValueError(
                    f"fusedreg.optim: state {k!r} ({tuple(getattr(lv, 'shape', ()))}, "
                    f"{getattr(lv, 'device', type(lv).__name__)}) does not match its parameter "
                    f"({tuple(lp.shape)}, {lp.device}); nothing was updated")
            if lv.dtype != sdt or (_is_dense(lp) and lv.stride() != lp.stride()) \
                    or (not _is_dense(lp) and not lv.is_contiguous()):
                if lv is not v:
                    raise ValueError(f"fusedreg.optim: DTensor state {k!r} must have the "
                                     f"parameter's local layout and dtype {sdt}")
                like = lp if _is_dense(lp) else lp.contiguous()
                fixes.append((st, k, _in_layout(lv, like, sdt)))

    def _zeros_state(self, p: Tensor, group: dict) -> Tensor:
        """A state tensor for ``p`` in the state dtype, with p's layout (a DTensor for a
        DTensor p)."""
        return torch.zeros_like(p, dtype=self._state_dtype(_local(p), group),
                                memory_format=torch.preserve_format)

    def _op_hyper(self, group: dict) -> dict:
        """The hyperparameters every op takes."""
        return dict(lr=_scalar(group["lr"]), weight_decay=_scalar(group["weight_decay"]),
                    l1=_scalar(group["l1"]), l1_lr_scaled=bool(group.get("l1_lr_scaled", True)),
                    maximize=bool(group["maximize"]))

    # the group keys an algorithm's op keywords are made from (_make_hyper), for _bucket_hyper
    _HYPER_KEYS: tuple = ()

    def _make_hyper(self, group: dict, inv_scale: float) -> dict:
        """The op's keyword hyperparameters of ``group`` (read from _HYPER_KEYS only)."""
        raise NotImplementedError

    def _bucket_hyper(self, group: dict, bucket: "_Bucket", inv_scale: float) -> dict:
        """_make_hyper(group, inv_scale), kept on the bucket for its reuse by the next step
        (_memo_plan) while the group holds the very same value objects under _HYPER_KEYS
        (compared by identity, in C) and inv_scale is the same: a few list passes instead of
        a dict built from a dozen conversions. Kept only when every value is an immutable
        Python scalar or a tuple of them, so that the same object means the same value (a
        tensor lr, read at each step, or a list of betas is converted every step)."""
        values = list(map(group.get, self._HYPER_KEYS))
        kept = bucket.hyper
        if kept is not None and kept[0] == inv_scale and all(map(operator.is_, values, kept[1])):
            return kept[2]
        hyper = self._make_hyper(group, inv_scale)
        bucket.hyper = (inv_scale, values, hyper) if all(map(_immutable, values)) else None
        return hyper

    def _patch_step_function(self) -> None:
        """torch's (Optimizer.__init__ and __setstate__ call it): wraps the class's ``step`` once
        for the profiler and the step hooks — with _profile_hook_step, torch's wrapper but for
        its profiler range (below)."""
        self._zero_grad_profile_name = f"Optimizer.zero_grad#{self.__class__.__name__}.zero_grad"
        cls = self.__class__
        if not getattr(cls.step, "hooked", None):
            cls.step = _profile_hook_step(cls.step)
            cls.step.hooked = True

    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        # no autograd in the step (torch.no_grad() as a decorator, without its per-call cost)
        grad_enabled = torch.is_grad_enabled()
        torch._C._set_grad_enabled(False)
        try:
            self._step()
        finally:
            torch._C._set_grad_enabled(grad_enabled)
        return loss

    def _state_snapshot(self):
        """The state as it is, for _memo_plan: the state dict, its keys, its values (each
        parameter's state dict) and their values, as lists of the objects themselves; None
        when a parameter's state is not a dict. No tensor is hashed (a tensor's hash is a
        Python call): the lists are built and compared in C."""
        state = self.state
        values = list(state.values())
        try:
            inner = list(itertools.chain.from_iterable(map(dict.values, values)))
        except TypeError:
            return None
        return state, list(state), values, inner

    @staticmethod
    def _same_snapshot(a, b) -> bool:
        is_ = operator.is_
        return (a is not None and b is not None and a[0] is b[0]
                and len(a[1]) == len(b[1]) and all(map(is_, a[1], b[1]))
                and len(a[2]) == len(b[2]) and all(map(is_, a[2], b[2]))
                and len(a[3]) == len(b[3]) and all(map(is_, a[3], b[3])))

    def _memo_plan(self, group: dict, choice):
        """The buckets of the last step of ``group`` when nothing they were built from has
        changed — the caller has checked that the optimizer's state holds the same objects as
        after that step (no state created, replaced or loaded since: _state_snapshot) — and
        here: the same parameters in the same list, each with the same gradient object (or
        None), the same data under the stepped ones and their gradients (data pointers), the
        same backend choice (``choice``, fusedreg.use_backend). The buckets passed every check
        of _collect then, so they pass them now; anything else (a new gradient object, a
        DTensor or strided parameter, a gradient copied to the parameter's layout) goes
        through _collect. For many small parameters this is most of the step's host time: a
        few list passes in C instead of a Python loop of checks per parameter."""
        memo = self._memo.get(id(group))
        if memo is None:
            return None
        mgroup, params, plist, grad_refs, live, pptrs, gptrs, buckets, mchoice = memo
        now = group["params"]
        is_ = operator.is_
        if (mgroup is not group or now is not params or mchoice != choice
                or len(now) != len(plist) or not all(map(is_, now, plist))
                or not all(map(is_, [p.grad for p in now],
                               [r if r is None else _FREED if (g := r()) is None else g
                                for r in grad_refs]))
                or list(map(_data_ptr, live)) != pptrs):
            return None
        for b in buckets.values():  # the memo holds no gradient (weak references only)
            b.lgrads = [p.grad for p in b.params]
        if [g.data_ptr() for b in buckets.values() for g in b.lgrads] != gptrs:
            return None
        return buckets

    def _remember_plan(self, plan, before) -> None:
        """Keeps each group's buckets for _memo_plan when the step created, fixed or checked
        no state (``before``, the snapshot taken before it, still holds; None when something
        was fixed or checked) and every bucket holds plain dense tensors stepped as they are."""
        after = self._state_snapshot()
        self._memo.clear()
        self._memo_snapshot = None
        if not self._same_snapshot(before, after):
            return
        self._memo_snapshot = after
        choice = backends.get_backend()
        is_ = operator.is_
        for group, buckets in plan:
            live, live_grads = [], []
            for b in buckets.values():
                if b.strided or b.distributed or not all(map(is_, b.params, b.lparams)) \
                        or not all(map(is_, [p.grad for p in b.params], b.lgrads)):
                    break  # (a gradient copied to the parameter's layout)
                live += b.params
                live_grads += b.lgrads
            else:
                # the gradients weakly (a gradient freed by zero_grad(set_to_none=True) must
                # not be kept alive through the next backward): refilled at each reuse
                params = group["params"]
                refs = [None if p.grad is None else weakref.ref(p.grad) for p in params]
                gptrs = list(map(_data_ptr, live_grads))
                for b in buckets.values():
                    b.lgrads = None
                self._memo[id(group)] = (group, params, list(params), refs, live,
                                         list(map(_data_ptr, live)), gptrs, buckets, choice)

    def _step(self) -> None:
        grad_scale = getattr(self, "grad_scale", None)
        found_inf = getattr(self, "found_inf", None)
        # Phase 1: validate everything (or reuse the last step's validated buckets).
        fixes: list = []
        checked: list = []
        snapshot = self._state_snapshot()
        memo = self._memo if self._same_snapshot(self._memo_snapshot, snapshot) else None
        choice = backends.get_backend() if memo else None
        plan, memo_hits = [], 0
        for group in self.param_groups:
            buckets = self._memo_plan(group, choice) if memo else None
            if buckets is None:
                buckets = self._collect(group, fixes, checked)
            else:
                memo_hits += 1
            plan.append((group, buckets))
        for st, k, v in fixes:
            st[k] = v
        for p in checked:
            st = self.state[p]
            self._verified[id(p)] = (p, st, tuple(st.values()))
        self._graph_capture_check(plan)
        # AMP on the host path: an inf/nan step changes no parameter and no state (a host read
        # of found_inf: one sync per step on a GPU, and only under GradScaler). Capturable
        # buckets read found_inf and grad_scale on the device instead.
        host_amp = None
        # Phase 2 + 3 per bucket: allocate missing state, then one op call.
        for group, buckets in plan:
            for b in buckets.values():
                op, capturable = self._bucket_op(group, b.backend)
                if capturable:
                    amp = (grad_scale, found_inf)
                else:
                    if host_amp is None:
                        host_amp = _host_amp(grad_scale, found_inf)
                    if host_amp[0]:
                        continue
                    amp = host_amp[1]
                step_bucket = self._step_bucket_capturable if capturable else self._step_bucket
                if not b.strided:
                    step_bucket(op, group, b, b.lparams, b.lgrads, amp)
                    continue
                # a parameter that is not dense is stepped through a contiguous copy
                lps, lgs = list(b.lparams), list(b.lgrads)
                for i in b.strided:
                    lps[i] = lps[i].contiguous()
                    lgs[i] = lgs[i].contiguous()
                step_bucket(op, group, b, lps, lgs, amp)
                for i in b.strided:
                    b.lparams[i].copy_(lps[i])
        if memo_hits != len(plan):
            self._remember_plan(plan, snapshot if not fixes and not checked else None)
        for _, buckets in plan:  # reused buckets keep no gradient alive until the next step
            for b in buckets.values():
                b.lgrads = None

    # ---- capturable=True ------------------------------------------------------------------------
    _CAPTURABLE_ALGO: str | None = None  # the registry's op of the capturable step, if any

    def _bucket_op(self, group: dict, backend: str):
        """(op, capturable): the capturable op of ``backend`` for a capturable group when the
        backend has one (reference, triton, cuda), else the plain op — the cpu backend's,
        which serves CPU parameters only: its host reads of CPU tensors synchronize nothing."""
        cap = self._CAPTURABLE_ALGO
        if group.get("capturable") and cap and backend in backends.registered_backends(cap):
            return backends.implementation(cap, backend), True
        if backend == "cpu" and self._ALGO in _DIRECT:
            # the op without the dispatcher where that is the same call (fusedreg/ops/optim.py)
            return _DIRECT[self._ALGO], False
        return backends.implementation(self._ALGO, backend), False

    def _step_bucket_capturable(self, op, group, bucket, lps, lgs, amp):
        raise NotImplementedError

    def _graph_capture_check(self, plan) -> None:
        """torch's rule (Optimizer._cuda_graph_capture_health_check): capturing step() in a
        CUDA graph needs capturable=True in every group stepping CUDA parameters. (torch's
        warning for a capturable step outside a capture is switched off by its constructor,
        which this class runs too.)"""
        if not torch.cuda.is_initialized():  # (no CUDA tensor exists before CUDA is initialized)
            return
        cuda_groups = [g for g, buckets in plan if any(k[0].type == "cuda" for k in buckets)]
        if not cuda_groups or torch.compiler.is_compiling():
            return
        capturing = torch.cuda.is_current_stream_capturing()
        if capturing and not all(g.get("capturable") for g in cuda_groups):
            raise RuntimeError(
                f"Attempting CUDA graph capture of step() for an instance of "
                f"fusedreg.optim.{type(self).__name__} but param_groups' capturable is False; "
                "construct it with capturable=True (Adam, AdamW)")


class _Bucket:
    """The parameters of one (group, device, dtype) that a step updates in one op call:
    ``params`` (as the optimizer holds them), ``lparams``/``lgrads`` (local tensors, the
    gradients in the parameters' layout), ``states`` (each parameter's state dict, None
    before its first step), ``strided`` (positions of parameters that are not dense,
    stepped through a contiguous copy) and ``distributed`` (whether any parameter is a
    DTensor, stepped as its local shard)."""

    __slots__ = ("backend", "params", "lparams", "lgrads", "states", "strided", "distributed",
                 "memo", "hyper")

    def __init__(self, backend: str) -> None:
        self.backend = backend
        self.params, self.lparams, self.lgrads, self.states, self.strided = [], [], [], [], []
        self.distributed = False
        # an optimizer's per-bucket lists of state tensors, kept while the bucket is reused
        # (FusedOptimizer._memo_plan: no state has changed since)
        self.memo = None
        self.hyper = None  # FusedOptimizer._bucket_hyper's (inv_scale, values, op keywords)


_data_ptr = Tensor.data_ptr
_RecordFunctionFast = getattr(torch._C._profiler, "_RecordFunctionFast", None)


def _profile_hook_step(func):
    """torch.optim.Optimizer.profile_hook_step's wrapper — the profiler range
    "Optimizer.step#<class>.step" around the global and per-optimizer pre-hooks (which may
    replace the arguments), the step, _optimizer_step_code() and the post-hooks, in torch's
    order — with the range opened by torch._C._profiler._RecordFunctionFast (the same named
    range in a profile, about 1 us) instead of torch.autograd.profiler.record_function (two
    torch.ops calls, about 10 us: half the host time of a small model's step). torch's own
    wrapper runs instead while compiling, while a cupti_monitor observer is active (which
    record_function also notifies) and on a torch without _RecordFunctionFast."""
    torch_wrapped = torch.optim.Optimizer.profile_hook_step(func)

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        if (_RecordFunctionFast is None or torch.compiler.is_compiling()
                or getattr(torch.autograd.profiler, "_active_cupti_profiler_observer", None) is not None):
            return torch_wrapped(*args, **kwargs)
        self = args[0]
        with _RecordFunctionFast(f"Optimizer.step#{self.__class__.__name__}.step"):
            for pre_hook in itertools.chain(_optimizer_hooks._global_optimizer_pre_hooks.values(),
                                            self._optimizer_step_pre_hooks.values()):
                result = pre_hook(self, args, kwargs)
                if result is not None:
                    if isinstance(result, tuple) and len(result) == 2:
                        args, kwargs = result
                    else:
                        raise RuntimeError(f"{func} must return None or a tuple of (new_args, "
                                           f"new_kwargs), but got {result}.")
            out = func(*args, **kwargs)
            self._optimizer_step_code()
            for post_hook in itertools.chain(self._optimizer_step_post_hooks.values(),
                                             _optimizer_hooks._global_optimizer_post_hooks.values()):
                post_hook(self, args, kwargs)
            return out

    return wrapper
_SCALAR_TYPES = (float, int, bool, str, type(None))


def _immutable(value) -> bool:
    """Whether a hyperparameter is an immutable Python scalar (or a tuple of them): the same
    object then always has the same value."""
    t = type(value)
    return t in _SCALAR_TYPES or (t is tuple and all(type(v) in _SCALAR_TYPES for v in value))
_FREED = object()  # what a reference to a freed gradient stands for: no gradient is it


def _host_amp(grad_scale, found_inf):
    """(skip, inv_scale) read on the host."""
    if found_inf is not None and float(found_inf.sum().item()) != 0.0:
        return True, 1.0
    return False, 1.0 / float(grad_scale.item()) if grad_scale is not None else 1.0
