"""fusedreg.optim against PyTorch's own optimizer test inputs: the ``OptimizerInfo``
configurations (``optim_inputs_func``) and error inputs (``optim_error_inputs_func``) of Adam,
AdamW and SGD from ``torch.testing._internal.common_optimizers``, on the CPU backends (and a
few on the Triton interpreter). Every configuration must be accepted, step like torch's
optimizer (bit for bit on the reference backend, to rounding on the fused ones), and exchange
state dicts with torch both ways; every error input must raise the exception type torch raises.

A failure names its kind: "rejected" (fusedreg raised where torch did not) or "mismatched"
(results differ), so that a run's counts can be read off the failure messages."""
import copy

import pytest
import torch

import fusedreg
import fusedreg.optim as fo
from conftest import cpu_backends
from tolerances import OPTIM_PARITY

co = pytest.importorskip("torch.testing._internal.common_optimizers",
                         reason="torch's optimizer test inputs need expecttest")

# name: (torch class, fusedreg class, configurations, error inputs)
OPTIMS = {
    "Adam": (torch.optim.Adam, fo.Adam, co.optim_inputs_func_adam, co.optim_error_inputs_func_adam),
    "AdamW": (torch.optim.AdamW, fo.AdamW, co.optim_inputs_func_adamw, co.optim_error_inputs_func_adamw),
    "SGD": (torch.optim.SGD, fo.SGD, co.optim_inputs_func_sgd, co.optim_error_inputs_func_sgd),
}
BACKENDS = [b for b in cpu_backends("adam") if b != "triton"]
DTYPES = [torch.float32, torch.float64]
STEPS = 4


# torch's own tests run every configuration with each implementation flag added
IMPLS = {"default": {}, "forloop": dict(foreach=False), "foreach": dict(foreach=True),
         "fused": dict(fused=True)}


def _configs():
    """(name, kwargs) for every configuration of each optimizer, the CUDA-only ones (capturable,
    tensor betas) included, with each implementation flag; the combinations torch's own
    constructor refuses (a tensor lr with foreach=True) are error inputs, not configurations."""
    out = []
    for name, (tcls, _, inputs, _) in OPTIMS.items():
        seen = set()
        for oi in inputs("cpu", torch.float32) + inputs("cuda", torch.float32):
            if oi.desc in seen:
                continue
            seen.add(oi.desc)
            for impl, flags in IMPLS.items():
                kwargs = {**oi.kwargs, **flags}
                try:
                    tcls([torch.nn.Parameter(torch.randn(2))], **_kwargs(kwargs))
                except (ValueError, RuntimeError):
                    continue
                out.append(pytest.param(name, kwargs, id=f"{name}-{oi.desc.replace(' ', '_')}-{impl}"))
    return out


def _torch_truth(kwargs):
    """torch's single-tensor ("for-loop") implementation, the one torch's own tests hold the
    foreach and fused ones to; capturable=False, since torch's capturable path refuses CPU
    tensors (fusedreg's runs on them: same math)."""
    return {k: v for k, v in kwargs.items() if k not in ("foreach", "fused", "capturable")}


def _kwargs(kwargs):
    """A fresh copy for each optimizer (the configs hold tensors: lr, betas)."""
    return {k: copy.deepcopy(v) for k, v in kwargs.items()}


def _params(dtype, seed=0):
    # a weight, a bias and a 1-element tensor: odd sizes, non-zero mean
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(*s, generator=g, dtype=dtype) + 0.25)
            for s in ((7, 5), (5,), (1,))]


def _grads(params, step):
    g = torch.Generator().manual_seed(100 + step)
    return [torch.randn(p.shape, generator=g, dtype=p.dtype) for p in params]


def _run(opt, params, steps, first=0):
    for s in range(first, first + steps):
        for p, g in zip(params, _grads(params, s)):
            p.grad = g
        opt.step()


def _has_tensor(kwargs) -> bool:
    return any(isinstance(v, torch.Tensor) or (isinstance(v, tuple) and isinstance(v[0], torch.Tensor))
               for v in kwargs.values())


def _tol(backend, dtype, kwargs):
    # The reference is torch's single-tensor algorithm op for op: bit-identical. With tensor
    # hyperparameters (float32 lr/betas) torch does its scalar math in float32 tensors,
    # fusedreg in double: they differ by float32 rounding, for float64 parameters too.
    if _has_tensor(kwargs):
        return OPTIM_PARITY[torch.float32]
    return dict(atol=0.0, rtol=0.0) if backend == "reference" else OPTIM_PARITY[dtype]


def _compare(tp, topt, fp, fopt, tol):
    for i, (a, b) in enumerate(zip(tp, fp)):
        try:
            torch.testing.assert_close(b.detach(), a.detach(), **tol)
            for k, v in topt.state[a].items():
                w = fopt.state[b][k]
                if k == "step":
                    assert float(w) == float(v), (float(w), float(v))
                else:
                    torch.testing.assert_close(w, v, **tol)
        except AssertionError as e:
            pytest.fail(f"mismatched: param {i}: {e}")


def _fused(fcls, params, kwargs):
    try:
        return fcls(params, **kwargs)
    except Exception as e:  # noqa: BLE001 - the kind of failure is the point
        pytest.fail(f"rejected at construction: {type(e).__name__}: {e}")


def _step(opt, params, steps, first=0):
    try:
        _run(opt, params, steps, first)
    except Exception as e:  # noqa: BLE001
        pytest.fail(f"rejected at step: {type(e).__name__}: {e}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "float64"])
@pytest.mark.parametrize("name,kwargs", _configs())
def test_config_steps_like_torch(backend, dtype, name, kwargs):
    tcls, fcls, _, _ = OPTIMS[name]
    tp, fp = _params(dtype), _params(dtype)
    topt = tcls(tp, foreach=False, **_kwargs(_torch_truth(kwargs)))
    fopt = _fused(fcls, fp, _kwargs(kwargs))
    _run(topt, tp, STEPS)
    with fusedreg.use_backend(backend):
        _step(fopt, fp, STEPS)
    _compare(tp, topt, fp, fopt, _tol(backend, dtype, kwargs))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name,kwargs", [c for c in _configs() if c.id.endswith("-default")])
def test_config_state_dicts_both_ways(backend, name, kwargs):
    """torch -> fusedreg and fusedreg -> torch after two steps; both continue two more."""
    tcls, fcls, _, _ = OPTIMS[name]
    tol = _tol(backend, torch.float32, kwargs)
    # torch -> fusedreg
    tp, fp = _params(torch.float32), _params(torch.float32)
    topt = tcls(tp, foreach=False, **_kwargs(_torch_truth(kwargs)))
    _run(topt, tp, 2)
    with torch.no_grad():
        for a, b in zip(tp, fp):
            b.copy_(a)
    fopt = _fused(fcls, fp, _kwargs(kwargs))
    try:
        fopt.load_state_dict(copy.deepcopy(topt.state_dict()))
    except Exception as e:  # noqa: BLE001
        pytest.fail(f"rejected at load_state_dict: {type(e).__name__}: {e}")
    _run(topt, tp, 2, first=2)
    with fusedreg.use_backend(backend):
        _step(fopt, fp, 2, first=2)
    _compare(tp, topt, fp, fopt, tol)
    # fusedreg -> torch
    fp2, tp2 = _params(torch.float32, seed=1), _params(torch.float32, seed=1)
    fopt2 = _fused(fcls, fp2, _kwargs(kwargs))
    with fusedreg.use_backend(backend):
        _step(fopt2, fp2, 2)
    with torch.no_grad():
        for a, b in zip(fp2, tp2):
            b.copy_(a)
    topt2 = tcls(tp2, foreach=False, **_kwargs(_torch_truth(kwargs)))
    sd = copy.deepcopy(fopt2.state_dict())
    for g in sd["param_groups"]:  # the torch truth's flags (see _torch_truth)
        g["foreach"], g["fused"] = False, None
        g.pop("capturable", None)
    topt2.load_state_dict(sd)
    _run(topt2, tp2, 2, first=2)
    with fusedreg.use_backend(backend):
        _step(fopt2, fp2, 2, first=2)
    _compare(tp2, topt2, fp2, fopt2, tol)


@pytest.mark.parametrize("name", ["Adam", "AdamW", "SGD"])
def test_default_config_on_triton(name):
    """A tiny subset on the Triton interpreter (slow): the default configuration, 2 steps."""
    if "triton" not in cpu_backends("adam"):
        pytest.skip("Triton is not installed")
    tcls, fcls, _, _ = OPTIMS[name]
    tp, fp = _params(torch.float32), _params(torch.float32)
    topt, fopt = tcls(tp, lr=1e-2), _fused(fcls, fp, dict(lr=1e-2))
    _run(topt, tp, 2)
    with fusedreg.use_backend("triton"):
        _step(fopt, fp, 2)
    _compare(tp, topt, fp, fopt, OPTIM_PARITY[torch.float32])


def _error_inputs():
    out = []
    for name, (_, _, _, errors) in OPTIMS.items():
        for ei in errors("cpu", torch.float32):
            out.append(pytest.param(name, ei, id=f"{name}-{ei.optimizer_error_input.desc.replace(' ', '_')}"))
    return out


@pytest.mark.parametrize("name,error_input", _error_inputs())
def test_error_input_raises_like_torch(name, error_input):
    _, fcls, _, _ = OPTIMS[name]
    oi = error_input.optimizer_error_input
    params = oi.params
    if params is None:
        params = [torch.nn.Parameter(torch.randn(2, 3))]
    kwargs = _kwargs(oi.kwargs)
    if issubclass(error_input.error_type, Warning):
        with pytest.warns(error_input.error_type, match=error_input.error_regex):
            opt = fcls(params, **kwargs)
        return
    with pytest.raises(error_input.error_type):
        opt = fcls(params, **kwargs)
        if error_input.error_on == co.OptimizerErrorEnum.STEP_ERROR:
            opt.step()
