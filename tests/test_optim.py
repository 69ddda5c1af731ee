"""fusedreg.optim: parity with torch's optimizers, the L1 proximal step, state dicts, AMP,
bad input, and the registered ops (one per algorithm: "adam", "sgd", "lion"), on every backend
that runs on CPU tensors here; and the triton and cuda backends on CUDA tensors (skipped without
a GPU, "needs a CUDA GPU"; on a GPU a backend that cannot serve an algorithm fails with the
reason)."""
import copy
import io
import math

import pytest
import torch

import fusedreg
import fusedreg.optim as fo
from fusedreg import backends

from _helpers import device_cases, serving
from conftest import cpu_backends
from tolerances import OPTIM_LOWP, OPTIM_PARITY

ALGORITHMS = ("adam", "sgd", "lion")  # the registry's op names, one per algorithm
# Every backend that runs one of the algorithms on CPU tensors here: the tests step all three
# with it, so a backend that serves only some of them fails there instead of being left out.
BACKENDS = [b for b in fusedreg.BACKENDS if any(b in cpu_backends(a) for a in ALGORITHMS)]
FUSED = [b for b in BACKENDS if b != "reference"]


def _algo(cls) -> str:
    """The op a fusedreg.optim class steps with."""
    return {fo.Adam: "adam", fo.AdamW: "adam", fo.SGD: "sgd", fo.Lion: "lion"}[cls]


def _tol(backend, dtype):
    if backend == "reference":  # torch's own ops in torch's order: bit-identical
        return dict(atol=0.0, rtol=0.0)
    return OPTIM_PARITY[dtype]


def _model(dtype=torch.float32, seed=0):
    # 17 -> 33 -> 5: odd sizes, so no tensor is a multiple of a vector width or block.
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(17, 33), torch.nn.GELU(),
                               torch.nn.Linear(33, 5)).to(dtype)


def _groups(model, **second):
    """Two param groups: the weights with the defaults, the biases with ``second``."""
    ws = [p for n, p in model.named_parameters() if n.endswith("weight")]
    bs = [p for n, p in model.named_parameters() if n.endswith("bias")]
    return [{"params": ws}, {"params": bs, **second}]


def _data(dtype=torch.float32, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(64, 17, generator=g, dtype=dtype) + 0.5  # non-zero mean
    y = torch.randn(64, 5, generator=g, dtype=dtype)
    return x, y


def _train(model, opt, steps, sched=None, x_y=None):
    x, y = x_y or _data(next(model.parameters()).dtype)
    sign = -1.0 if opt.defaults.get("maximize") else 1.0  # maximize(-loss): stays bounded
    for _ in range(steps):
        opt.zero_grad()
        (sign * torch.nn.functional.mse_loss(model(x), y)).backward()
        opt.step()
        if sched is not None:
            sched.step()


def _assert_params(a, b, **tol):
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(q, p, msg=lambda m: f"{n}: {m}", **tol)


# (torch class, fusedreg class, defaults, second-group overrides): every hyperparameter and
# flag is exercised somewhere, and the second group differs in lr and weight decay.
CASES = {
    "adamw": (torch.optim.AdamW, fo.AdamW, dict(lr=1e-2, weight_decay=0.1), dict(lr=3e-3, weight_decay=0.0)),
    "adamw_amsgrad_max": (torch.optim.AdamW, fo.AdamW, dict(lr=1e-2, betas=(0.8, 0.99), amsgrad=True, maximize=True),
                          dict(weight_decay=0.3)),
    "adam_l2": (torch.optim.Adam, fo.Adam, dict(lr=1e-2, weight_decay=0.05), dict(lr=2e-3, eps=1e-6)),
    "adam_decoupled": (torch.optim.Adam, fo.Adam, dict(lr=1e-2, weight_decay=0.05, decoupled_weight_decay=True),
                       dict(betas=(0.3, 0.9))),  # beta1 < 0.5: lerp's other form
    "sgd": (torch.optim.SGD, fo.SGD, dict(lr=1e-2), dict(lr=5e-2, weight_decay=0.1)),
    "sgd_momentum": (torch.optim.SGD, fo.SGD, dict(lr=1e-2, momentum=0.9, dampening=0.1, weight_decay=0.01),
                     dict(momentum=0.5)),
    "sgd_nesterov_max": (torch.optim.SGD, fo.SGD, dict(lr=1e-2, momentum=0.9, nesterov=True, maximize=True),
                         dict(weight_decay=0.2)),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(CASES))
def test_parity_with_torch_100_steps(backend, case):
    tcls, fcls, kw, second = CASES[case]
    steps = 100 if backend != "triton" else 30  # the interpreter is slow; 30 steps suffice there
    a, b = _model(), _model()
    ta = tcls(_groups(a, **second), foreach=False, **kw)
    fb = fcls(_groups(b, **second), **kw)
    sa = torch.optim.lr_scheduler.StepLR(ta, step_size=7, gamma=0.7)
    sb = torch.optim.lr_scheduler.StepLR(fb, step_size=7, gamma=0.7)
    _train(a, ta, steps, sa)
    with fusedreg.use_backend(backend):
        _train(b, fb, steps, sb)
    _assert_params(a, b, **_tol(backend, torch.float32))
    for pa, pb in zip(a.parameters(), b.parameters()):
        for k, v in ta.state[pa].items():
            torch.testing.assert_close(fb.state[pb][k], v, **(_tol(backend, torch.float32) if k != "step" else {}))


@pytest.mark.parametrize("backend", BACKENDS)
def test_parity_float64_and_tensor_lr(backend):
    a, b = _model(torch.float64), _model(torch.float64)
    # A float64 lr tensor: torch does part of its scalar math in the lr tensor's dtype, fusedreg
    # all of it in double, as for a float lr.
    lr = torch.tensor(1e-2, dtype=torch.float64)
    ta = torch.optim.AdamW(a.parameters(), lr=lr, weight_decay=0.1, foreach=False)
    fb = fo.AdamW(b.parameters(), lr=lr.clone(), weight_decay=0.1)
    _train(a, ta, 20)
    with fusedreg.use_backend(backend):
        _train(b, fb, 20)
    _assert_params(a, b, **_tol(backend, torch.float64))


def _lion_oracle(params, grads, m, lr, beta1, beta2, wd):
    """Lion as the paper writes it (Algorithm 2), independent of fusedreg."""
    for p, g, e in zip(params, grads, m):
        p.mul_(1 - lr * wd)
        p.add_(torch.sign(beta1 * e + (1 - beta1) * g), alpha=-lr)
        e.mul_(beta2).add_(g, alpha=1 - beta2)


@pytest.mark.parametrize("backend", BACKENDS)
def test_lion_matches_the_paper(backend):
    a, b = _model(), _model()
    fb = fo.Lion(b.parameters(), lr=1e-3, weight_decay=0.5)
    m = [torch.zeros_like(p) for p in a.parameters()]
    x, y = _data()
    for _ in range(40 if backend != "triton" else 15):
        a.zero_grad()
        torch.nn.functional.mse_loss(a(x), y).backward()
        with torch.no_grad():
            _lion_oracle(list(a.parameters()), [p.grad for p in a.parameters()], m, 1e-3, 0.9, 0.99, 0.5)
    with fusedreg.use_backend(backend):
        _train(b, fb, 40 if backend != "triton" else 15, x_y=(x, y))
    # sign() makes the update discontinuous: tiny fp32 differences can flip an element whose
    # momentum is ~0; compare with an lr-sized allowance on at most a few elements.
    for p, q in zip(a.parameters(), b.parameters()):
        bad = ~torch.isclose(q, p, atol=1e-6, rtol=1e-5)
        assert bad.float().mean() < 0.01 and (q - p).abs().max() < 2.5e-3


# ---- the L1 proximal step ---------------------------------------------------------------
def _soft_threshold_(params, thr):
    with torch.no_grad():
        for p in params:
            p.copy_(torch.sign(p) * torch.clamp(p.abs() - thr, min=0))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("algo", ["adamw", "adam_l2", "sgd_momentum"])
def test_l1_equals_step_then_soft_threshold(backend, algo):
    tcls, fcls, kw, _ = CASES[algo]
    lr, l1 = kw["lr"], 0.05
    a, b = _model(), _model()
    ta = tcls(a.parameters(), foreach=False, **kw)
    fb = fcls(b.parameters(), l1=l1, **kw)
    x, y = _data()
    steps = 25 if backend != "triton" else 8
    for _ in range(steps):
        ta.zero_grad()
        torch.nn.functional.mse_loss(a(x), y).backward()
        ta.step()
        _soft_threshold_(a.parameters(), lr * l1)
    with fusedreg.use_backend(backend):
        _train(b, fb, steps, x_y=(x, y))
    _assert_params(a, b, **_tol(backend, torch.float32))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cls", [fo.AdamW, fo.SGD, fo.Lion])
def test_l1_makes_exact_zeros_and_sparsity_counts_them(backend, cls):
    model = _model()
    opt = cls([{"params": model[0].parameters(), "l1": 2.0}, {"params": model[2].parameters()}], lr=1e-2)
    with fusedreg.use_backend(backend):
        _train(model, opt, 10 if backend != "triton" else 4)
    s = opt.sparsity()
    w = torch.cat([p.detach().flatten() for p in model[0].parameters()])
    assert s[0] == pytest.approx((w == 0).float().mean().item()) and s[0] > 0.1  # thr = 0.02 a step; weights are U(±0.24)
    assert s[1] is None  # no l1 in the second group: not counted
    zeros = w == 0
    assert torch.equal(w[zeros], torch.zeros_like(w[zeros]))


# ---- low-precision and multi-tensor lists against the reference ---------------------------
SIZES = [1, 3, 1023, 1151, 4096 + 5, 0]  # odd sizes, a 1-element and an empty tensor


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("cls,kw", [(fo.AdamW, dict(amsgrad=True)), (fo.Adam, dict(weight_decay=0.1)),
                                    (fo.SGD, dict(momentum=0.9, nesterov=True)), (fo.Lion, {})])
def test_fused_matches_reference_on_many_tensors(backend, dtype, cls, kw):
    torch.manual_seed(0)
    base = [torch.randn(n, dtype=dtype) + 0.25 for n in SIZES]
    grads = [[torch.randn(n, dtype=dtype) for n in SIZES] for _ in range(3)]
    runs = {}
    for b in ("reference", backend):
        ps = [t.clone().requires_grad_() for t in base]
        opt = cls(ps, lr=1e-2, l1=0.1, **kw)
        with fusedreg.use_backend(b):
            for gs in grads:
                for p, g in zip(ps, gs):
                    p.grad = g.clone()
                opt.step()
        runs[b] = (ps, opt)
    (pr, orf), (pf, off) = runs["reference"], runs[backend]
    tol = OPTIM_PARITY[dtype] if dtype in (torch.float32, torch.float64) else OPTIM_LOWP[dtype]
    for p, q in zip(pr, pf):
        torch.testing.assert_close(q, p, **tol)
    for p, q in zip(pr, pf):
        for k, v in orf.state[p].items():
            assert off.state[q][k].dtype == (torch.float64 if dtype == torch.float64 else torch.float32) or k == "step"
            # fp32 state, but fed by earlier steps' parameters rounded to the (low) dtype
            torch.testing.assert_close(off.state[q][k], v, **tol)


# ---- state dicts --------------------------------------------------------------------------
def _roundtrip(sd):
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    return torch.load(buf)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("amsgrad", [False, True])
def test_state_dict_exchange_with_torch(backend, amsgrad):
    kw = dict(lr=1e-2, weight_decay=0.1, amsgrad=amsgrad)
    n1, n2 = (30, 30) if backend != "triton" else (10, 10)
    # torch -> fusedreg: both continue from torch's state as torch would
    a = _model()
    ta = torch.optim.AdamW(_groups(a, lr=3e-3), foreach=False, **kw)
    _train(a, ta, n1)
    b = copy.deepcopy(a)
    fb = fo.AdamW(_groups(b, lr=3e-3), **kw)
    fb.load_state_dict(_roundtrip(ta.state_dict()))
    assert fb.param_groups[0]["l1"] == 0.0
    _train(a, ta, n2)
    with fusedreg.use_backend(backend):
        _train(b, fb, n2)
    _assert_params(a, b, **_tol(backend, torch.float32))
    # fusedreg -> torch
    c = _model()
    fc = fo.AdamW(_groups(c, lr=3e-3), **kw)
    with fusedreg.use_backend(backend):
        _train(c, fc, n1)
    sd = _roundtrip(fc.state_dict())
    assert set(sd["state"][0]) == set(ta.state_dict()["state"][0])
    assert sd["state"][0]["step"].dtype == torch.float32 and sd["state"][0]["step"].dim() == 0
    d = copy.deepcopy(c)
    td = torch.optim.AdamW(_groups(d, lr=3e-3), foreach=False, **kw)
    td.load_state_dict(sd)
    _train(d, td, n2)
    with fusedreg.use_backend(backend):
        _train(c, fc, n2)
    _assert_params(d, c, **_tol(backend, torch.float32))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cls,kw", [(fo.AdamW, dict(l1=0.01)), (fo.SGD, dict(momentum=0.9, l1=0.01)),
                                    (fo.Lion, dict(l1=0.01))])
def test_resume_is_bit_identical(backend, cls, kw):
    n = 10 if backend != "triton" else 4
    with fusedreg.use_backend(backend):
        a = _model()
        oa = cls(_groups(a, lr=5e-3), lr=1e-2, **kw)
        _train(a, oa, 2 * n)
        b = _model()
        ob = cls(_groups(b, lr=5e-3), lr=1e-2, **kw)
        _train(b, ob, n)
        saved = _roundtrip({"model": b.state_dict(), "opt": ob.state_dict()})
        c = _model(seed=123)
        c.load_state_dict(saved["model"])
        oc = cls(_groups(c, lr=5e-3), lr=1e-2, **kw)
        oc.load_state_dict(saved["opt"])
        _train(c, oc, n)
    _assert_params(a, c, atol=0.0, rtol=0.0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_sgd_momentum_state_dict_exchange_with_torch(backend):
    kw = dict(lr=1e-2, momentum=0.9, nesterov=True, weight_decay=0.01)
    n = 20 if backend != "triton" else 6
    # torch -> fusedreg
    a = _model()
    ta = torch.optim.SGD(a.parameters(), foreach=False, **kw)
    _train(a, ta, n)
    b = copy.deepcopy(a)
    fb = fo.SGD(b.parameters(), **kw)
    fb.load_state_dict(_roundtrip(ta.state_dict()))
    _train(a, ta, n)
    with fusedreg.use_backend(backend):
        _train(b, fb, n)
    _assert_params(a, b, **_tol(backend, torch.float32))
    # fusedreg -> torch
    sd = _roundtrip(fb.state_dict())
    assert set(sd["state"][0]) == {"momentum_buffer"}
    c = copy.deepcopy(b)
    tc = torch.optim.SGD(c.parameters(), foreach=False, **kw)
    tc.load_state_dict(sd)
    _train(c, tc, n)
    with fusedreg.use_backend(backend):
        _train(b, fb, n)
    _assert_params(c, b, **_tol(backend, torch.float32))


def test_sgd_state_matches_torch_layout():
    a, b = _model(), _model()
    ta = torch.optim.SGD(a.parameters(), lr=1e-2, foreach=False)
    fb = fo.SGD(b.parameters(), lr=1e-2)
    _train(a, ta, 2)
    _train(b, fb, 2)
    assert ta.state_dict()["state"] == fb.state_dict()["state"] == {}  # no buffer without momentum


# ---- AMP ----------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_grad_scaler_unscales_and_skips_inf_steps(backend):
    a, b = _model(), _model()
    ta = torch.optim.AdamW(a.parameters(), lr=1e-2, foreach=False)
    fb = fo.AdamW(b.parameters(), lr=1e-2, l1=0.0)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10, growth_interval=1000)
    x, y = _data()
    with fusedreg.use_backend(backend):
        for step in range(4):
            ta.zero_grad()
            torch.nn.functional.mse_loss(a(x), y).backward()
            fb.zero_grad()
            scaler.scale(torch.nn.functional.mse_loss(b(x), y)).backward()
            if step == 2:  # an overflow: the step must change nothing
                next(b.parameters()).grad[0, 0] = float("inf")
                before = ([p.detach().clone() for p in b.parameters()],
                          copy.deepcopy(fb.state_dict()["state"]))
                scaler.step(fb)
                scaler.update()
                for p, q in zip(before[0], b.parameters()):
                    assert torch.equal(p, q)
                after = fb.state_dict()["state"]
                for i, st in before[1].items():
                    for k, v in st.items():
                        assert torch.equal(after[i][k], v), k
                continue
            ta.step()
            scaler.step(fb)
            scaler.update()
    _assert_params(a, b, **_tol(backend, torch.float32))  # power-of-two scale: exact unscale


# ---- bad input ------------------------------------------------------------------------------
@pytest.mark.parametrize("ctor", [
    lambda ps: fo.AdamW(ps, lr=-1e-3),
    lambda ps: fo.AdamW(ps, lr=float("nan")),
    lambda ps: fo.AdamW(ps, eps=-1.0),
    lambda ps: fo.AdamW(ps, weight_decay=-0.1),
    lambda ps: fo.AdamW(ps, betas=(1.0, 0.999)),
    lambda ps: fo.AdamW(ps, betas=(0.9, -0.1)),
    lambda ps: fo.AdamW(ps, betas=(float("nan"), 0.9)),
    lambda ps: fo.AdamW(ps, l1=-1e-3),
    lambda ps: fo.AdamW(ps, l1=float("nan")),
    lambda ps: fo.Adam(ps, weight_decay=float("nan")),
    lambda ps: fo.SGD(ps, lr=-1.0),
    lambda ps: fo.SGD(ps, momentum=-0.5),
    lambda ps: fo.SGD(ps, l1=-1.0),
    lambda ps: fo.SGD(ps, nesterov=True),  # nesterov needs momentum
    lambda ps: fo.Lion(ps, betas=(0.9, 1.5)),
    lambda ps: fo.Lion(ps, lr=float("inf")),
    lambda ps: fo.AdamW([{"params": ps, "l1": -2.0}]),  # per-group check
])
def test_bad_hyperparameters_raise_at_construction(ctor):
    with pytest.raises(ValueError):
        ctor([torch.nn.Parameter(torch.randn(3))])


def test_bad_added_group_is_refused():
    opt = fo.AdamW([torch.nn.Parameter(torch.randn(3))])
    with pytest.raises(ValueError):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.randn(2))], "lr": -1.0})
    assert len(opt.param_groups) == 1


def _two_params():
    good = torch.nn.Parameter(torch.randn(5))
    good.grad = torch.randn(5)
    return good, good.detach().clone()


@pytest.mark.parametrize("cls", [fo.AdamW, fo.SGD, fo.Lion])
def test_sparse_grad_raises_before_any_write(cls):
    good, before = _two_params()
    emb = torch.nn.Embedding(10, 3, sparse=True)
    emb(torch.tensor([1, 2])).sum().backward()
    opt = cls([{"params": [good]}, {"params": emb.parameters()}], lr=0.1)
    with pytest.raises(RuntimeError, match="sparse"):
        opt.step()
    assert torch.equal(good, before) and len(opt.state) == 0


def test_mismatched_grad_raises_before_any_write():
    good, before = _two_params()
    bad = torch.nn.Parameter(torch.randn(4))
    bad.grad_dtype = None  # torch refuses a grad of another dtype unless told
    bad.grad = torch.randn(4, dtype=torch.float64)
    opt = fo.AdamW([good, bad], lr=0.1)
    with pytest.raises(ValueError, match="does not match"):
        opt.step()
    assert torch.equal(good, before) and len(opt.state) == 0


def test_device_without_backend_raises_before_any_write():
    """One group on two devices: the CPU bucket could step, the meta one cannot under the
    cpu backend — the error comes before the CPU parameter is touched."""
    if "cpu" not in BACKENDS:
        pytest.skip("the cpu backend is not built")
    good, before = _two_params()
    meta = torch.nn.Parameter(torch.empty(4, device="meta"))
    meta.grad = torch.empty(4, device="meta")
    opt = fo.AdamW([good, meta], lr=0.1)
    with fusedreg.use_backend("cpu"), pytest.raises(fusedreg.BackendUnavailableError):
        opt.step()
    assert torch.equal(good, before) and len(opt.state) == 0


# ---- the registered ops ---------------------------------------------------------------------
def _op_args(algo, n=37, amsgrad=True):
    """(tensor lists, hyperparameters): the ops take the lists positionally and every
    hyperparameter by keyword."""
    torch.manual_seed(0)
    ps = [torch.randn(n), torch.randn(2 * n + 1)]
    gs = [torch.randn_like(p) for p in ps]
    z = lambda: [torch.rand_like(p) for p in ps]  # noqa: E731
    if algo == "adam":
        steps = [torch.tensor(2.0), torch.tensor(3.0)]  # the op counts them: steps 3 and 4
        return (ps, gs, z(), z(), z() if amsgrad else [], steps), dict(
            lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1, l1=0.01,
            l1_lr_scaled=True, amsgrad=amsgrad, maximize=False, decoupled=True, inv_scale=0.5)
    if algo == "sgd":
        return (ps, gs, z()), dict(
            lr=1e-2, momentum=0.9, dampening=0.0, weight_decay=0.1, l1=0.01, l1_lr_scaled=False,
            nesterov=True, maximize=False, decoupled=False, first_step=False, inv_scale=1.0)
    return (ps, gs, z()), dict(lr=1e-2, beta1=0.9, beta2=0.99, weight_decay=0.1, l1=0.01,
                               l1_lr_scaled=True, maximize=True, inv_scale=1.0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("algo", ALGORITHMS)
def test_opcheck(backend, algo):
    args, kwargs = _op_args(algo)
    torch.library.opcheck(backends.implementation(algo, backend), args, kwargs)


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("algo", ALGORITHMS)
def test_ops_match_reference(backend, algo):
    (ref_args, ref_kw), (args, kw) = _op_args(algo), _op_args(algo)
    backends.implementation(algo, "reference")(*ref_args, **ref_kw)
    backends.implementation(algo, backend)(*args, **kw)
    compared = 0
    for a, b in zip(ref_args, args):
        if isinstance(a, list) and a and isinstance(a[0], torch.Tensor):
            for x, y in zip(a, b):
                torch.testing.assert_close(y, x, **OPTIM_PARITY[torch.float32])
                compared += 1
    assert compared >= 3 * 2  # params, grads and at least one state list, two tensors each
    before, _ = _op_args(algo)
    assert not torch.equal(ref_args[0][0], before[0][0])  # the step did write the params


@pytest.mark.parametrize("algo", ALGORITHMS)
def test_every_algorithm_is_registered_for_the_same_backends(algo):
    # an optimizer's backend list is the same for the three algorithms on every device
    for device in ("cpu", "cuda"):
        assert backends.implemented_backends(algo, device) == backends.implemented_backends("adam", device)
    assert "reference" in backends.implemented_backends(algo, "cpu")


def test_cpp_op_checks_its_arguments():
    if "cpu" not in BACKENDS:
        pytest.skip("the cpu backend is not built")
    args, kw = _op_args("lion")
    args = list(args)
    args[1] = [args[1][0]]  # one grad for two params
    with pytest.raises(RuntimeError, match="one grad per parameter"):
        backends.implementation("lion", "cpu")(*args, **kw)
    assert math.isfinite(args[0][0].sum().item())


# ---- GPU backends (run when a GPU is present) -------------------------------------------------
@pytest.mark.parametrize("backend,device,case", device_cases(
    "adam", [], [(c,) for c in ["adamw", "adamw_amsgrad_max", "adam_l2", "sgd_momentum", "sgd_nesterov_max"]]))
def test_gpu_parity_with_torch(backend, device, case):
    tcls, fcls, kw, second = CASES[case]
    serving(_algo(fcls), backend, device)
    a, b = _model().to(device), _model().to(device)
    ta = tcls(_groups(a, **second), foreach=False, **kw)
    fb = fcls(_groups(b, **second), **kw)
    x, y = (t.to(device) for t in _data())
    _train(a, ta, 100, x_y=(x, y))
    with fusedreg.use_backend(backend):
        _train(b, fb, 100, x_y=(x, y))
    _assert_params(a, b, **OPTIM_PARITY[torch.float32])


@pytest.mark.parametrize("backend,device,dtype,cls,kw", device_cases(
    "adam", [], [(d, c, k) for d in [torch.float32, torch.bfloat16, torch.float16, torch.float64]
                 for c, k in [(fo.AdamW, dict(amsgrad=True, l1=0.1)), (fo.SGD, dict(momentum=0.9, l1=0.1)),
                              (fo.Lion, dict(l1=0.1))]]))
def test_gpu_matches_reference_on_many_tensors(backend, device, dtype, cls, kw):
    # 200 tensors up to 300K elements: several launches of the multi-tensor kernels
    serving(_algo(cls), backend, device)
    torch.manual_seed(0)
    sizes = [1, 1023, 1151, 65536 + 3, 300_001] + [int(s) for s in torch.randint(1, 5000, (195,))]
    base = [torch.randn(n, dtype=dtype, device=device) for n in sizes]
    grads = [torch.randn(n, dtype=dtype, device=device) for n in sizes]
    out = {}
    for b in ("reference", backend):
        ps = [t.clone().requires_grad_() for t in base]
        opt = cls(ps, lr=1e-2, **kw)
        with fusedreg.use_backend(b):
            for _ in range(3):
                for p, g in zip(ps, grads):
                    p.grad = g.clone()
                opt.step()
        out[b] = ps
    tol = OPTIM_PARITY[dtype] if dtype in (torch.float32, torch.float64) else OPTIM_LOWP[dtype]
    for p, q in zip(out["reference"], out[backend]):
        torch.testing.assert_close(q, p, **tol)


@pytest.mark.skipif("cpu" not in BACKENDS, reason="the cpu backend is not built")
@pytest.mark.parametrize("inv_scale", [1.0 / 3.0, 3.0])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("algo", ["sgd", "adam"])
def test_cpu_kernels_round_half_like_torch(algo, dtype, inv_scale):
    """The CPU kernels convert bfloat16 through integer bit operations and float16 through the
    F16C instructions (so that the loops vectorize): every one of the 65536 gradients —
    subnormals, infinities, NaNs, and with inv_scale = 3 float16 results that overflow to inf
    or round to subnormals — gives the parameter torch's own float32 -> bfloat16/float16
    rounding of the same float32 value, and a NaN parameter is c10's quiet NaN (bfloat16
    0x7FC0; float16 sign | 0x7E00, not the payload F16C would keep). SGD: p = 0 - lr·(g·inv_scale)
    with lr = 1; Adam at step 1 with beta1 = beta2 = 0: m = g', v = g'^2,
    p = 0 - lr·g'/(|g'| + eps) (g' = g·inv_scale), recomputed in float32."""
    g = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(dtype)
    p = torch.zeros_like(g)
    gs = g.float() * torch.tensor(inv_scale, dtype=torch.float32)
    if algo == "sgd":
        backends.implementation("sgd", "cpu")(
            [p], [g], [], lr=1.0, momentum=0.0, dampening=0.0, weight_decay=0.0, l1=0.0,
            l1_lr_scaled=True, nesterov=False, maximize=False, decoupled=False, first_step=False,
            inv_scale=inv_scale)
        want = torch.zeros_like(gs) - gs
    else:
        m, v = torch.zeros_like(gs), torch.zeros_like(gs)
        backends.implementation("adam", "cpu")(
            [p], [g], [m], [v], [], [torch.tensor(0.0)], lr=1.0, beta1=0.0, beta2=0.0, eps=1e-8,
            weight_decay=0.0, l1=0.0, l1_lr_scaled=True, amsgrad=False, maximize=False,
            decoupled=False, inv_scale=inv_scale)
        denom = (gs * gs).sqrt() / 1.0 + torch.tensor(1e-8, dtype=torch.float32)
        want = torch.zeros_like(gs) + (-1.0) * (gs / denom)
    want = want.to(dtype)
    nan = want.isnan()
    assert nan.any() and torch.equal(p.isnan(), nan)
    assert torch.equal(p[~nan].view(torch.int16), want[~nan].view(torch.int16))
    if dtype == torch.float16:
        if algo == "sgd":  # finite gradients whose step overflows to inf, with inv_scale 3
            assert (want.isinf() & g.isfinite()).any() == (inv_scale > 1)
        quiet = torch.tensor(0x7E00, dtype=torch.int16)
        assert torch.equal(p[nan].view(torch.int16) & 0x7FFF, quiet.expand(int(nan.sum())))
    else:
        assert torch.equal(p[nan].view(torch.int16) & 0x7FFF, torch.full((int(nan.sum()),), 0x7FC0, dtype=torch.int16))


@pytest.mark.skipif("cpu" not in BACKENDS, reason="the cpu backend is not built")
@pytest.mark.parametrize("state_dtype", ["compute", "param"])
def test_cpu_float16_chunks_match_reference(state_dtype):
    """float16 spans are stepped in float32 chunks (converted, stepped, converted back): every
    element of tensors whose lengths fall around the chunk (256) and vector (8) widths gets
    the reference's step — AdamW with amsgrad and l1, SGD with nesterov, Lion — and a
    float16 state is written back (not left at its old values)."""
    torch.manual_seed(0)
    sizes = [1, 7, 8, 9, 255, 256, 257, 1000, 4099]
    sd = torch.float16 if state_dtype == "param" else torch.float32
    cases = {
        "adam": (3, dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1, l1=0.01,
                         l1_lr_scaled=True, amsgrad=True, maximize=False, decoupled=True,
                         inv_scale=0.5)),
        "sgd": (1, dict(lr=1e-1, momentum=0.9, dampening=0.0, weight_decay=0.1, l1=0.01,
                        l1_lr_scaled=False, nesterov=True, maximize=False, decoupled=False,
                        first_step=False, inv_scale=2.0)),
        "lion": (1, dict(lr=1e-2, beta1=0.9, beta2=0.99, weight_decay=0.1, l1=0.01,
                         l1_lr_scaled=True, maximize=True, inv_scale=1.0)),
    }
    for algo, (n_state, kw) in cases.items():
        ps = [(torch.randn(n) + 0.5).half() for n in sizes]
        lists = [ps, [(torch.randn(n) * 3).half() for n in sizes]]
        lists += [[torch.rand(n).to(sd) for n in sizes] for _ in range(n_state)]
        out = {}
        for b in ("reference", "cpu"):
            args = [[t.clone() for t in lst] for lst in lists]
            if algo == "adam":
                args.append([torch.tensor(2.0) for _ in sizes])
            backends.implementation(algo, b)(*args, **kw)
            out[b] = args[:2 + n_state]
        for k, (want, got) in enumerate(zip(out["reference"], out["cpu"])):
            for w, g0, x in zip(want, got, lists[k]):
                torch.testing.assert_close(g0, w, **OPTIM_LOWP[torch.float16])
                if k != 1:
                    assert not torch.equal(g0, x), (algo, k)  # written back


# float16 variants of every kernel for the bitwise checks below: (algo, state lists, kwargs)
_HALF_VARIANTS = [
    ("adam", 3, dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1, l1=l1,
                     l1_lr_scaled=True, amsgrad=ams, maximize=mx, decoupled=dec, inv_scale=isc))
    for ams, l1, mx, dec, isc in [(False, 0.0, False, True, 1.0), (True, 0.01, True, False, 0.5)]
] + [
    ("sgd", 1 if mom else 0, dict(lr=1e-1, momentum=mom, dampening=0.0 if nes else 0.1,
                                  weight_decay=0.1, l1=l1, l1_lr_scaled=False, nesterov=nes,
                                  maximize=mx, decoupled=dec, first_step=fs, inv_scale=isc))
    for mom, nes, l1, mx, dec, fs, isc in [(0.9, False, 0.0, False, False, False, 1.0),
                                           (0.9, True, 0.01, True, True, False, 3.0),
                                           (0.9, False, 0.0, False, True, True, 1.0),
                                           (0.0, False, 0.01, False, False, False, 1.0)]
] + [
    ("lion", 1, dict(lr=1e-2, beta1=0.9, beta2=0.99, weight_decay=0.1, l1=l1, l1_lr_scaled=True,
                     maximize=mx, inv_scale=isc))
    for l1, mx, isc in [(0.0, False, 1.0), (0.01, True, 2.0)]
]


def _half_values(n, scale, seed, dtype=torch.float16):
    """n float16 (or bfloat16) values: a quarter every kind of value of the type (NaN, inf,
    subnormals, the largest finite values) drawn from all bit patterns, the rest normal data
    times scale."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=gen) * scale
    bits = torch.randint(-(2**15), 2**15, (n // 4,), generator=gen, dtype=torch.int32)
    x[: n // 4] = bits.to(torch.int16).view(dtype).float()
    return x.to(dtype)


def _half_step(algo, n_state, kw, sizes, state_dtype, seed=0, dtype=torch.float16):
    """One cpu step of float16 (or bfloat16) tensors of the given sizes (gradients scaled so
    that some float16 steps overflow): the parameter and state lists after it."""
    ps = [_half_values(n, 1.0, seed + i, dtype) for i, n in enumerate(sizes)]
    gs = [_half_values(n, 300.0, seed + 1000 + i, dtype) for i, n in enumerate(sizes)]
    sts = [[_half_values(n, 1.0, seed + 2000 * (k + 2) + i, dtype).float().abs().to(state_dtype)
            for i, n in enumerate(sizes)] for k in range(n_state)]
    args = [ps, gs] + (sts if n_state else [[]])
    if algo == "adam":
        args.append([torch.tensor(2.0) for _ in sizes])
    backends.implementation(algo, "cpu")(*args, **kw)
    return [ps] + sts


def half_kernel_outputs():
    """Every float16 and bfloat16 variant's outputs on special values at lengths around the
    block (16) and chunk (256) widths, with 16-bit and float32 state: run in a subprocess at
    another instruction-set level."""
    sizes = [1, 15, 16, 17, 255, 256, 257, 4099]
    return [_half_step(algo, n_state, kw, sizes, dtype if sd == "param" else torch.float32, dtype=dtype)
            for algo, n_state, kw in _HALF_VARIANTS for sd in ("param", "float32")
            for dtype in (torch.float16, torch.bfloat16)]


def _bitwise_mismatches(a, b, nan_payloads=True):
    """Where two lists of lists of tensors differ in any bit (with nan_payloads=False, any two
    NaNs count as equal)."""
    bad = []
    for i, (la, lb) in enumerate(zip(a, b)):
        for j, (x, y) in enumerate(zip(la, lb)):
            it = torch.int16 if x.element_size() == 2 else torch.int32
            differ = x.view(it) != y.view(it)
            if not nan_payloads:
                differ &= ~(x.isnan() & y.isnan())
            if differ.any():
                bad.append((i, j, int(differ.sum())))
    return bad


def _capped_to_baseline() -> bool:
    """Whether this process's CPU kernels are capped at the baseline level (no FMA, no F16C)."""
    import os
    return os.environ.get("FUSEDREG_CPU_ISA") == "baseline"


@pytest.mark.skipif("cpu" not in BACKENDS, reason="the cpu backend is not built")
def test_cpu_16bit_levels_agree_bit_for_bit(tmp_path):
    """float16 and bfloat16 run through one pass of 16-value register blocks at the AVX-512
    level, and at the AVX2 level through converted chunks of 256 (float16) or loops that
    convert bfloat16 in place: on every kind of 16-bit value (NaN, inf, subnormals, float16
    steps that overflow) and at lengths around those widths, the two give the same bits for
    parameters and 16-bit / float32 state (on a CPU without AVX-512 both runs take the AVX2
    code)."""
    import os
    import subprocess
    import sys

    if _capped_to_baseline():
        pytest.skip("this process is capped at the baseline level, which rounds without FMA")
    out = tmp_path / "avx2.pt"
    code = ("import sys, torch; sys.path[:0] = {path!r}; import test_optim as t; "
            "torch.save(t.half_kernel_outputs(), {out!r})")
    res = subprocess.run([sys.executable, "-c", code.format(path=[os.path.dirname(__file__)] + sys.path, out=str(out))],
                         env={**os.environ, "FUSEDREG_CPU_ISA": "avx2"}, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    avx2 = torch.load(out)
    here = half_kernel_outputs()
    bad = [(v, _bitwise_mismatches(x, y)) for v, (x, y) in enumerate(zip(here, avx2)) if _bitwise_mismatches(x, y)]
    assert not bad, bad[:8]


@pytest.mark.skipif("cpu" not in BACKENDS, reason="the cpu backend is not built")
@pytest.mark.parametrize("state", ["param", "float32"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_cpu_16bit_step_independent_of_position(dtype, state):
    """An element's step does not depend on where it sits: the values of one 4099-element
    tensor (whole blocks and a tail) stepped as 4099 one-element tensors (each a tail of its
    own) give the same bits — the tail is not a separately compiled loop that contracts a
    different product into an FMA. (Capped at the baseline level, the SSE loop and its scalar
    tail may give a float32 NaN another payload: NaNs there count as equal.)"""
    state_dtype = dtype if state == "param" else torch.float32
    payloads = not _capped_to_baseline()
    for algo, n_state, kw in _HALF_VARIANTS:
        whole = _half_step(algo, n_state, kw, [4099], state_dtype, dtype=dtype)
        ps = [_half_values(4099, 1.0, 0, dtype)]
        gs = [_half_values(4099, 300.0, 1000, dtype)]
        sts = [[_half_values(4099, 1.0, 2000 * (k + 2), dtype).float().abs().to(state_dtype)] for k in range(n_state)]
        split = [list(lst[0].split(1)) for lst in [ps, gs] + sts]
        args = split + ([] if n_state else [[]])
        if algo == "adam":
            args.append([torch.tensor(2.0) for _ in range(4099)])
        backends.implementation(algo, "cpu")(*args, **kw)
        pieces = [[torch.cat(lst)] for lst in [split[0]] + split[2:2 + n_state]]
        bad = _bitwise_mismatches(whole, pieces, nan_payloads=payloads)
        assert not bad, (algo, kw, bad)


# ---- the cpu backend's direct calls (fusedreg._C.<op>, no dispatcher) ------------------------
def _direct_cases():
    if "cpu" not in BACKENDS:
        return []
    from fusedreg.ops.optim import DIRECT
    return [pytest.param(algo, id=algo) for algo in ALGORITHMS if algo in DIRECT]


@pytest.mark.parametrize("algo", _direct_cases())
def test_direct_call_equals_the_op_bit_for_bit(algo):
    from fusedreg.ops.optim import DIRECT
    (op_args, op_kw), (args, kw) = _op_args(algo), _op_args(algo)
    backends.implementation(algo, "cpu")(*op_args, **op_kw)
    DIRECT[algo](*args, **kw)
    for a, b in zip(op_args, args):
        if isinstance(a, list):
            for x, y in zip(a, b):
                assert torch.equal(x, y)
    before, _ = _op_args(algo)
    assert not torch.equal(args[0][0], before[0][0])  # it did step


@pytest.mark.parametrize("algo", _direct_cases())
def test_direct_call_declines_what_the_dispatcher_must_route(algo):
    # The raw C function returns False, writing nothing, for anything the dispatcher would not
    # send straight to the CPU kernel; the optimizers' wrapper then makes the torch.ops call.
    from fusedreg import _C
    from torch.utils._python_dispatch import TorchDispatchMode
    name = {"adam": "adam_step", "sgd": "sgd_step", "lion": "lion_step"}[algo]
    fast = getattr(_C, name)
    args, kw = _op_args(algo)
    positional = list(args) + list(kw.values())  # the schema's order (_op_args keeps it)
    before = [t.clone() for t in args[0]]

    class Sub(torch.Tensor):
        pass

    class Seen(TorchDispatchMode):
        ops: list = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Seen.ops.append(str(func))
            return func(*args, **(kwargs or {}))

    sub = list(positional)
    sub[0] = [args[0][0].as_subclass(Sub)] + list(args[0][1:])
    assert fast(*sub) is False
    with Seen():
        assert fast(*positional) is False
    meta = list(positional)
    meta[1] = [g.to("meta") for g in args[1]]
    assert fast(*meta) is False
    as_int = list(positional)
    as_int[len(args)] = torch.tensor(1.0)  # lr as a tensor: not a float
    assert fast(*as_int) is False
    assert fast(*positional[:-1]) is False
    for x, y in zip(args[0], before):
        assert torch.equal(x, y)
    # through the wrapper under the mode the op is dispatched (the mode sees it) and steps
    from fusedreg.ops.optim import DIRECT
    with Seen():
        DIRECT[algo](*args, **kw)
    assert any(f"fusedreg.{name}" in op for op in Seen.ops)
    assert not torch.equal(args[0][0], before[0])
    assert fast(*positional) is True


def test_direct_call_raises_the_ops_errors_before_any_write():
    if not _direct_cases():
        pytest.skip("the cpu backend is not built")
    from fusedreg.ops.optim import DIRECT
    args, kw = _op_args("sgd")
    before = [t.clone() for t in args[0]]
    bad = dict(kw, lr=float("nan"))
    with pytest.raises(RuntimeError, match="fusedreg::sgd_step"):
        DIRECT["sgd"](*args, **bad)
    args2 = list(args)
    args2[1] = [args[1][0]]
    with pytest.raises(RuntimeError, match="one grad per parameter"):
        DIRECT["sgd"](*args2, **kw)
    for x, y in zip(args[0], before):
        assert torch.equal(x, y)


@pytest.mark.skipif("cpu" not in BACKENDS, reason="the cpu backend is not built")
def test_cpu_adam_reciprocal_division_is_exact():
    """The float32 Adam kernels divide sqrt(v) by the bias correction c = sqrt(1 - beta2^step)
    through 1/c and two FMAs (div_by_recip in fusedreg/optim_math.h) instead of the divider:
    over every float significand (in the binade of the smallest square root of a float and in
    [1, 2)), and on zeros, inf and NaNs, the same bits as x / c — for the constants of
    common betas at many steps and for constants at the ends of the range it is used in."""
    from fusedreg import _C

    consts = [math.sqrt(1.0 - b2 ** s) for b2, s in ((0.999, 1), (0.999, 2), (0.999, 1000), (0.99, 3), (0.95, 10))]
    consts += [1.0, 0.5, torch.nextafter(torch.tensor(1.0), torch.tensor(0.0)).item(), 1.5 * 2.0 ** -20]
    sig = torch.arange(1 << 23, dtype=torch.int32)
    # what a square root gives besides positive numbers: zeros, +inf, quiet NaNs
    special = torch.tensor([0x0, 0x80000000, 0x7F800000, 0x7FC00000, 0xFFC00000, 0x7FC12345],
                           dtype=torch.int64).to(torch.int32).view(torch.float32)
    for c in consts:
        cf = torch.tensor(c, dtype=torch.float32)
        for e in (-75, 0):  # (the smallest square root of a float is 2^-74.5)
            x = (sig | ((127 + e) << 23)).view(torch.float32)
            got, want = _C._adam_div_by_recip(x, float(cf)), x / cf
            assert torch.equal(got.view(torch.int32), want.view(torch.int32)), (c, e)
        got, want = _C._adam_div_by_recip(special, float(cf)), special / cf
        assert torch.equal(got.view(torch.int32), want.view(torch.int32)), c
    with pytest.raises(RuntimeError, match="outside the range"):
        _C._adam_div_by_recip(sig.float(), 2.0 ** -21)


@pytest.mark.skipif("cpu" not in BACKENDS, reason="the cpu backend is not built")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_cpu_step_independent_of_the_thread_split(dtype):
    """The threads split a list's elements into equal shares, cut inside tensors (at a
    multiple of 64 elements of the tensor): one to four threads give the same bits for
    parameters and state, for lists whose shares end mid-tensor and in tiny tensors."""
    sizes = [70001, 5, 33000, 1, 40000, 999, 65536 + 17]
    outs = []
    before = torch.get_num_threads()
    try:
        for threads in (1, 2, 3, 4):
            torch.set_num_threads(threads)
            res = []
            for algo, n_state, kw in _HALF_VARIANTS:
                gen = torch.Generator().manual_seed(1)
                ps = [(torch.randn(n, generator=gen) + 0.3).to(dtype) for n in sizes]
                gs = [torch.randn(n, generator=gen).to(dtype) for n in sizes]
                sts = [[torch.rand(n, generator=gen) for n in sizes] for _ in range(n_state)]
                args = [ps, gs] + (sts if n_state else [[]])
                if algo == "adam":
                    args.append([torch.tensor(3.0) for _ in sizes])
                backends.implementation(algo, "cpu")(*args, **kw)
                res.append([ps] + sts)
            outs.append(res)
    finally:
        torch.set_num_threads(before)
    for threads, res in zip((2, 3, 4), outs[1:]):
        bad = [(v, _bitwise_mismatches(x, y)) for v, (x, y) in enumerate(zip(outs[0], res))
               if _bitwise_mismatches(x, y)]
        assert not bad, (threads, bad[:4])
    assert not torch.equal(outs[0][0][0][0], (torch.randn(70001, generator=torch.Generator().manual_seed(1)) + 0.3).to(dtype))


@pytest.mark.parametrize("name", ["SGD", "AdamW"])
def test_step_hooks_and_profiler_range_as_torch(name):
    """step() runs torch's step hooks as torch does — global then per-optimizer pre-hooks (one
    replacing the arguments: here a closure), the step, then per-optimizer and global
    post-hooks, with the arguments the pre-hook made — inside a profiler range named as
    torch names it; a pre-hook returning anything else raises torch's error."""
    import torch.optim.optimizer as toptim

    seen = {}
    for cls in (getattr(fo, name), getattr(torch.optim, name)):
        log = []
        p = torch.nn.Parameter(torch.ones(3))
        p.grad = torch.full((3,), 0.5)
        opt = cls([p], lr=0.1)

        def closure():
            log.append("closure")
            return 2.0

        handles = [
            toptim.register_optimizer_step_pre_hook(lambda o, a, k: log.append("global pre")),
            opt.register_step_pre_hook(lambda o, a, k: (log.append("pre"), ((o,), {"closure": closure}))[1]),
            opt.register_step_post_hook(lambda o, a, k: log.append(("post", sorted(k)))),
            toptim.register_optimizer_step_post_hook(lambda o, a, k: log.append("global post")),
        ]
        try:
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
                loss = opt.step()
        finally:
            for h in handles:
                h.remove()
        ranges = [e.name for e in prof.events() if e.name.startswith("Optimizer.step#")]
        bad = opt.register_step_pre_hook(lambda o, a, k: 5)
        with pytest.raises(RuntimeError, match="must return None or a tuple"):
            opt.step()
        bad.remove()
        seen[cls] = (log, loss, ranges, p.detach().clone())
    ours, torchs = seen.values()
    assert ours[0] == torchs[0] == ["global pre", "pre", "closure", ("post", ["closure"]), "global post"]
    assert ours[1] == torchs[1] == 2.0
    assert ours[2] == torchs[2] == [f"Optimizer.step#{name}.step"]
    torch.testing.assert_close(ours[3], torchs[3])
