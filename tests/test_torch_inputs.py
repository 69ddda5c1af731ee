"""PyTorch's own test inputs for the ops fusedreg replaces: the ``OpInfo`` ``sample_inputs``
and ``error_inputs`` of ``nn.functional.layer_norm``, ``nn.functional.rms_norm`` and
``nn.functional.dropout`` (torch.testing._internal.common_methods_invocations), run against
fusedreg's functional of the same name on the reference and cpu backends and, for a tiny
subset, on the Triton interpreter; and the ``sample_inputs`` of ``nn.functional.batch_norm``
(``test_opinfo_batch_norm_samples``).

Every sample must be accepted and, for the norms, forward and backward within the error rule
of tests/tolerances.py (against a float64 run of torch's op); for dropout, every output element
is 0 or x / (1 - p) and equals x where no dropout happens, and the input gradient is the same
mask and scale. Every error input must raise, with torch's exception type where torch names one.
``python tests/test_torch_inputs.py`` prints the counts (tried / passed / rejected /
mismatched) per op and backend.
"""
from __future__ import annotations

import sys
from collections import Counter

import pytest
import torch

import fusedreg
from fusedreg import functional as F

from conftest import cpu_backends
from tolerances import FACTOR, NORM_ATOL, check_norm_error

common_methods_invocations = pytest.importorskip(
    "torch.testing._internal.common_methods_invocations",
    reason="torch's OpInfo database needs expecttest")

OPS = {"nn.functional.layer_norm": F.layer_norm, "nn.functional.rms_norm": F.rms_norm,
       "nn.functional.dropout": F.dropout}
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


def _opinfo(name):
    return next(op for op in common_methods_invocations.op_db
                if op.name == name and op.variant_test_name == "")


def _err(out, ref64, scale):
    return (out.double() - ref64).abs().max().item() / scale if ref64.numel() else 0.0


def _norm_sample(name, fn, s, dtype):
    """None if fusedreg's result (forward and grads) is within the rule, else the reason."""
    torch_fn = _opinfo(name).op
    args, kwargs = list(s.args), dict(s.kwargs)

    def run(f, cast):
        inputs = [s.input] + [a for a in args if isinstance(a, torch.Tensor)]
        leaves = [t.detach().to(cast or t.dtype).requires_grad_() for t in inputs]
        it = iter(leaves[1:])
        call_args = [next(it) if isinstance(a, torch.Tensor) else a for a in args]
        y = f(leaves[0], *call_args, **kwargs)
        g = torch.linspace(-1, 1, y.numel(), dtype=torch.float64).reshape(y.shape)
        (y.double() * g).sum().backward()
        return y.detach(), [t.grad for t in leaves]

    y, grads = run(fn, None)
    ty, tgrads = run(torch_fn, None)
    ry, rgrads = run(torch_fn, torch.float64)
    if y.dtype != ty.dtype or y.shape != ty.shape:
        return f"result {y.dtype}{tuple(y.shape)} != torch's {ty.dtype}{tuple(ty.shape)}"
    for what, o, t, r, pass_ in [("y", y, ty, ry, "fwd")] + [
            (f"grad {i}", g, tg, rg, "bwd") for i, (g, tg, rg) in enumerate(zip(grads, tgrads, rgrads))]:
        if r is None:
            continue
        if o is None:
            return f"no {what}"
        scale = max(r.abs().max().item() if r.numel() else 0.0, 1.0)
        err, terr = _err(o, r, scale), _err(t, r, scale)
        # torch's own error may be nan/inf where eps < 0 makes the statistics nan: then
        # fusedreg must give nan/inf at the same places.
        if not torch.equal(o.isnan(), r.isnan()) or not torch.equal(o.isinf(), r.isinf()):
            return f"{what}: nan/inf at other places than torch's"
        o, t, r = (v.masked_fill(~r.isfinite(), 0) for v in (o, t, r))
        err, terr = _err(o, r, scale), _err(t, r, scale)
        if err > FACTOR * terr + NORM_ATOL[pass_][dtype]:
            return f"{what}: error {err:.3g} > {FACTOR} x torch's {terr:.3g} + atol"
    return None


def _dropout_sample(fn, s, dtype):
    x = s.input.detach().requires_grad_()
    p = s.kwargs.get("p", s.args[0] if s.args else 0.5)
    training = s.kwargs.get("training", s.args[1] if len(s.args) > 1 else True)
    y = fn(x, *s.args, **s.kwargs)
    if y.shape != x.shape or y.dtype != x.dtype:
        return f"result {y.dtype}{tuple(y.shape)} != input's"
    y.sum().backward() if y.requires_grad else None
    if not training or p == 0:
        return None if torch.equal(y.detach(), x.detach()) else "not the identity"
    scale = 0.0 if p == 1 else 1.0 / (1.0 - p)
    kept = y.detach() != 0
    expected = torch.where(kept, x.detach() * scale, torch.zeros((), dtype=dtype))
    tol = dict(atol=1e-2, rtol=1e-2) if dtype in (torch.float16, torch.bfloat16) else {}
    try:
        torch.testing.assert_close(y.detach(), expected, **tol)
        torch.testing.assert_close(x.grad, torch.where(kept, scale, 0.0).to(dtype), **tol)
    except AssertionError as e:
        return str(e).splitlines()[0]
    return None


def run_samples(name, backend, dtypes=DTYPES, limit=None):
    """Counter of outcomes and the list of failures for the OpInfo samples of ``name``."""
    fn = OPS[name]
    counts, failures = Counter(), []
    for dtype in dtypes:
        samples = list(_opinfo(name).sample_inputs("cpu", dtype, requires_grad=False))
        for s in samples[:limit]:
            counts["tried"] += 1
            with fusedreg.use_backend(backend):
                try:
                    if name.endswith("dropout"):
                        torch.manual_seed(0)
                        why = _dropout_sample(fn, s, dtype)
                    else:
                        why = _norm_sample(name, fn, s, dtype)
                except Exception as e:  # a rejected sample: reported, counted
                    counts["rejected"] += 1
                    failures.append(f"{dtype} {s.summary() if hasattr(s, 'summary') else s}: "
                                    f"raised {type(e).__name__}: {e}")
                    continue
            if why is None:
                counts["passed"] += 1
            else:
                counts["mismatched"] += 1
                failures.append(f"{dtype} {tuple(s.input.shape)} {s.kwargs}: {why}")
    return counts, failures


def run_errors(name, backend):
    op = _opinfo(name)
    counts, failures = Counter(), []
    if op.error_inputs_func is None:
        return counts, failures
    for e in op.error_inputs(torch.device("cpu")):
        s = e.sample_input
        counts["tried"] += 1
        with fusedreg.use_backend(backend):
            try:
                OPS[name](s.input, *s.args, **s.kwargs)
            except Exception as exc:  # the type is what is checked
                if isinstance(exc, e.error_type):
                    counts["passed"] += 1
                else:
                    counts["mismatched"] += 1
                    failures.append(f"{tuple(s.input.shape)} {s.args}: raised {type(exc).__name__} "
                                    f"({exc}), torch raises {e.error_type.__name__}")
                continue
        counts["rejected"] += 1  # for an error input: accepted where torch raises
        failures.append(f"{tuple(s.input.shape)} {s.args}: accepted, torch raises {e.error_type.__name__}")
    return counts, failures


BACKENDS = [b for b in cpu_backends("layer_norm") if b != "triton"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(OPS))
def test_opinfo_samples(name, backend):
    counts, failures = run_samples(name, backend)
    assert counts["tried"] > 0
    assert not failures, "\n".join(failures)


@pytest.mark.skipif("triton" not in cpu_backends("layer_norm"), reason="Triton is not installed")
@pytest.mark.parametrize("name", list(OPS))
def test_opinfo_samples_triton_interpreter(name):
    # the interpreter is slow: two dtypes, the first three samples of each
    counts, failures = run_samples(name, "triton", dtypes=[torch.float32, torch.bfloat16], limit=3)
    assert counts["tried"] > 0
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(OPS))
def test_opinfo_error_inputs(name, backend):
    _counts, failures = run_errors(name, backend)
    assert not failures, "\n".join(failures)


def _bn_run(fn, s, cast):
    """fn(input, *args, **kwargs) for a BatchNorm sample, tensors copied (cast to ``cast``):
    (y, the running stats after the call, the gradients of the tensors that require one)."""
    def copy(t):
        if not isinstance(t, torch.Tensor):
            return t
        c = t.detach().to(cast or t.dtype).clone()
        return c.requires_grad_(t.requires_grad)
    x, args = copy(s.input), [copy(a) for a in s.args]
    y = fn(x, *args, **s.kwargs)
    leaves = [t for t in [x] + args if isinstance(t, torch.Tensor) and t.requires_grad]
    g = torch.linspace(-1, 1, y.numel(), dtype=torch.float64).reshape(y.shape)
    grads = torch.autograd.grad((y.double() * g).sum(), leaves) if leaves and y.numel() else []
    stats = [a for a in args[:2] if isinstance(a, torch.Tensor)]
    return y.detach(), stats, list(grads)


@pytest.mark.parametrize("backend", [b for b in cpu_backends("batch_norm") if b != "triton"])
def test_opinfo_batch_norm_samples(backend):
    """torch's OpInfo samples of nn.functional.batch_norm through fusedreg.functional.batch_norm
    (the cpu backend's C++ node and calls, or the reference): y, the running stats and the
    gradients within the norms' error rule of torch's float64 run. The one sample torch takes
    and fusedreg refuses, an empty 1-D input (torch returns it), raises the ValueError the
    README lists (fewer than 2 dims)."""
    op = _opinfo("nn.functional.batch_norm")
    tried = 0
    for dtype in DTYPES:
        for s in op.sample_inputs("cpu", dtype, requires_grad=True):
            if s.input.dim() < 2:
                with fusedreg.use_backend(backend), pytest.raises(ValueError, match="at least 2"):
                    F.batch_norm(s.input, *s.args, **s.kwargs)
                continue
            tried += 1
            with fusedreg.use_backend(backend):
                y, stats, grads = _bn_run(F.batch_norm, s, None)
            ty, tstats, tgrads = _bn_run(op.op, s, None)
            ry, rstats, rgrads = _bn_run(op.op, s, torch.float64)
            name = f"batch_norm {tuple(s.input.shape)} {s.kwargs} {dtype}"
            check_norm_error(name, y, ry, ty, dtype, "fwd")
            for o, t, r in zip(stats, tstats, rstats):
                check_norm_error(name + " running stat", o, r, t, dtype, "fwd")
            assert len(grads) == len(rgrads), name
            for o, t, r in zip(grads, tgrads, rgrads):
                check_norm_error(name + " grad", o, r, t, dtype, "bwd")
    assert tried > 0


if __name__ == "__main__":
    import os
    os.environ.setdefault("TRITON_INTERPRET", "1")
    for backend in BACKENDS + (["triton"] if "triton" in cpu_backends("layer_norm") else []):
        for name in OPS:
            kw = dict(dtypes=[torch.float32, torch.bfloat16], limit=3) if backend == "triton" else {}
            c, f = run_samples(name, backend, **kw)
            ce, fe = run_errors(name, backend)
            print(f"{backend:9s} {name:26s} samples tried {c['tried']:3d} passed {c['passed']:3d} "
                  f"rejected {c['rejected']:3d} mismatched {c['mismatched']:3d} | error inputs "
                  f"tried {ce['tried']} raised-same-type {ce['passed']} accepted {ce['rejected']} "
                  f"other-type {ce['mismatched']}")
            for line in (f + fe) if "-v" in sys.argv else ():
                print("   ", line)
