"""fusedreg.optim as a drop-in for torch.optim: torch's constructor arguments (positions,
keywords, implementation flags), any dense parameter layout, low-precision parameters
(bit-identical resume, state in the parameter's dtype), transactional state, the raw ops'
argument checks, ``sparsity()`` and the lr-independent ``l1`` option — on the backends that
run on CPU tensors here (the Triton interpreter on a small subset: it is slow)."""
import copy
import inspect
import io

import pytest
import torch

import fusedreg
import fusedreg.optim as fo
from fusedreg import backends

from _helpers import device_cases, serving
from conftest import cpu_backends
from tolerances import OPTIM_LOWP, OPTIM_PARITY

CPU_BACKENDS = [b for b in cpu_backends("adam") if b != "triton"]  # reference, cpu
ALL_BACKENDS = cpu_backends("adam")                                # and triton if installed
PAIRS = {fo.Adam: torch.optim.Adam, fo.AdamW: torch.optim.AdamW, fo.SGD: torch.optim.SGD}


def _tol(backend, dtype=torch.float32):
    # the reference is torch's single-tensor algorithm op for op: bit-identical
    return dict(atol=0.0, rtol=0.0) if backend == "reference" else OPTIM_PARITY[dtype]


# ---- 1. torch's constructor arguments ----------------------------------------------------------
@pytest.mark.parametrize("cls", list(PAIRS), ids=lambda c: c.__name__)
def test_signature_is_torchs_with_l1_keyword_only(cls):
    ours = inspect.signature(cls.__init__).parameters
    for name, tp in inspect.signature(PAIRS[cls].__init__).parameters.items():
        assert name in ours, name
        assert ours[name].kind == tp.kind, name  # same positions, same keyword-only ones
        assert ours[name].default == tp.default, name
    positional = [n for n, p in ours.items() if p.kind == p.POSITIONAL_OR_KEYWORD]
    torch_positional = [n for n, p in inspect.signature(PAIRS[cls].__init__).parameters.items()
                        if p.kind == p.POSITIONAL_OR_KEYWORD]
    assert positional == torch_positional
    for extra in ("l1", "l1_lr_scaled", "state_dtype"):
        assert ours[extra].kind == inspect.Parameter.KEYWORD_ONLY


def test_lion_l1_is_keyword_only():
    ps = [torch.nn.Parameter(torch.randn(3))]
    with pytest.raises(TypeError):
        fo.Lion(ps, 1e-4, (0.9, 0.99), 0.0, 0.5)  # a fifth positional argument
    assert fo.Lion(ps, 1e-4, (0.9, 0.99), 0.0, l1=0.5).param_groups[0]["l1"] == 0.5


@pytest.mark.parametrize("cls,args", [
    (fo.Adam, (2e-2, (0.8, 0.9), 1e-6, 0.1, True)),
    (fo.AdamW, (2e-2, (0.8, 0.9), 1e-6, 0.1, True)),
    (fo.SGD, (2e-2, 0.9, 0.0, 0.1, True)),
], ids=["Adam", "AdamW", "SGD"])
def test_positional_arguments_mean_what_they_mean_in_torch(cls, args):
    """Adam(params, lr, betas, eps, weight_decay, amsgrad) and SGD(params, lr, momentum,
    dampening, weight_decay, nesterov): the same groups, and the same steps, as torch's."""
    a = [torch.nn.Parameter(torch.randn(6, 5) + 0.5)]
    b = [torch.nn.Parameter(a[0].detach().clone())]
    ta, fb = PAIRS[cls](a, *args, foreach=False), cls(b, *args)
    for k, v in ta.param_groups[0].items():
        if k not in ("params", "foreach"):  # torch's was given foreach=False
            assert fb.param_groups[0][k] == v, k
    for s in range(3):
        g = torch.randn(6, 5, generator=torch.Generator().manual_seed(s))
        a[0].grad, b[0].grad = g.clone(), g.clone()
        ta.step()
        with fusedreg.use_backend("reference"):
            fb.step()
    assert torch.equal(a[0], b[0])


def _steps(opt, params, n=3, backend="reference"):
    with fusedreg.use_backend(backend):
        for s in range(n):
            for i, p in enumerate(params):
                p.grad = torch.randn(p.shape, generator=torch.Generator().manual_seed(10 * s + i),
                                     dtype=p.dtype).to(memory_format=torch.preserve_format)
            opt.step()


def _params(seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(*s, generator=g, dtype=dtype) + 0.25)
            for s in ((7, 5), (5,), (1,))]


@pytest.mark.parametrize("flags", [dict(foreach=True), dict(foreach=False), dict(fused=True),
                                   dict(fused=False), dict(capturable=True),
                                   dict(capturable=True, lr=torch.tensor(1e-2))],
                         ids=["foreach", "forloop", "fused", "unfused", "capturable", "capturable_tensor_lr"])
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_implementation_flags_change_nothing(backend, flags):
    """foreach/fused are accepted and change nothing; capturable=True on CPU parameters keeps
    the step counts on the parameters' device (CPU: nothing to synchronize) — same results."""
    kw = dict(lr=1e-2, weight_decay=0.1, amsgrad=True)
    base, flagged = _params(), _params()
    oa = fo.AdamW(base, **kw)
    ob = fo.AdamW(flagged, **{**kw, **flags})
    _steps(oa, base, backend=backend)
    _steps(ob, flagged, backend=backend)
    for p, q in zip(base, flagged):
        assert torch.equal(p, q)
        assert ob.state[q]["step"].device == q.device and float(ob.state[q]["step"]) == 3.0


def test_flags_keep_torchs_rules():
    ps = [torch.nn.Parameter(torch.randn(3))]
    with pytest.raises(RuntimeError, match="`fused` and `foreach` cannot be `True` together"):
        fo.Adam(ps, foreach=True, fused=True)
    with pytest.raises(ValueError, match="lr as a Tensor is not supported"):
        fo.AdamW(ps, lr=torch.tensor(1e-3), foreach=True)
    with pytest.raises(ValueError, match="both floats or both Tensors"):
        fo.Adam(ps, betas=(0.9, torch.tensor(0.99)))
    for cls in (fo.Adam, fo.AdamW, fo.SGD):
        with pytest.raises(NotImplementedError, match=rf"torch\.optim\.{cls.__name__}\(differentiable=True\)"):
            cls(ps, differentiable=True)


def test_capturable_refuses_a_device_other_than_cpu_and_cuda():
    """capturable=True runs on CPU and CUDA parameters (tests/test_optim_capturable.py);
    another device (a meta parameter here) is refused at construction and by
    add_param_group, naming torch's capturable optimizer."""
    p = torch.nn.Parameter(torch.empty(3, device="meta"))
    with pytest.raises(RuntimeError, match=r"torch\.optim\.AdamW\(capturable=True"):
        fo.AdamW([p], capturable=True)
    opt = fo.AdamW([torch.nn.Parameter(torch.randn(2))], capturable=True)
    with pytest.raises(RuntimeError, match="CPU and CUDA parameters"):
        opt.add_param_group({"params": [p]})
    assert len(opt.param_groups) == 1


# ---- 2. any dense layout ------------------------------------------------------------------------
def _cnn(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(8, 6, 3),
        torch.nn.Flatten(), torch.nn.Linear(6 * 5 * 5, 4)).to(memory_format=torch.channels_last)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("name,kw", [("AdamW", dict(lr=1e-2, weight_decay=0.1, amsgrad=True)),
                                     ("SGD", dict(lr=1e-2, momentum=0.9, nesterov=True, weight_decay=0.01))])
def test_channels_last_cnn_trains_like_torch(backend, name, kw):
    """A channels_last CNN, 20 steps (5 on the Triton interpreter): parameters, state and
    layouts equal torch's optimizer's; each parameter is stepped in place."""
    steps = 5 if backend == "triton" else 20
    a, b = _cnn(), _cnn()
    ta = getattr(torch.optim, name)(a.parameters(), foreach=False, **kw)
    fb = getattr(fo, name)(b.parameters(), **kw)
    ptrs = [p.data_ptr() for p in b.parameters()]
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(4, 3, 7, 7, generator=g) + 0.5).to(memory_format=torch.channels_last)
    y = torch.randn(4, 4, generator=g)
    for _ in range(steps):
        for model, opt in ((a, ta), (b, fb)):
            opt.zero_grad()
            torch.nn.functional.mse_loss(model(x), y).backward()
            with fusedreg.use_backend(backend):
                opt.step()
    tol = _tol(backend)
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(q, p, msg=lambda m: f"{n}: {m}", **tol)
        assert q.stride() == p.stride()
        for k, v in ta.state[p].items():
            if k != "step":
                torch.testing.assert_close(fb.state[q][k], v, **tol)
                assert fb.state[q][k].stride() == q.stride(), (n, k)
    assert b[0].weight.is_contiguous(memory_format=torch.channels_last)
    assert [p.data_ptr() for p in b.parameters()] == ptrs


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_any_layout_and_mismatched_grad_strides(backend):
    """Transposed and channels_last_3d parameters with contiguous gradients (other strides:
    copied into the parameter's layout once), and a parameter that is not dense (a strided
    view: stepped through a contiguous copy) — all equal torch's step."""
    def make():
        g = torch.Generator().manual_seed(3)
        t = torch.nn.Parameter((torch.randn(9, 6, generator=g) + 0.3).t())
        c3 = torch.nn.Parameter((torch.randn(2, 3, 4, 5, 3, generator=g) - 0.2)
                                .to(memory_format=torch.channels_last_3d))
        base = torch.randn(6, 10, generator=g)
        strided = torch.nn.Parameter(base[:, ::2])  # not dense
        return [t, c3, strided]
    a, b = make(), make()
    assert not b[2].is_contiguous() and b[2].stride() == (10, 2)
    ta = torch.optim.Adam(a, lr=1e-2, weight_decay=0.05, foreach=False)
    fb = fo.Adam(b, lr=1e-2, weight_decay=0.05)
    strides = [p.stride() for p in b]
    for s in range(3):
        for i, (p, q) in enumerate(zip(a, b)):
            grad = torch.randn(p.shape, generator=torch.Generator().manual_seed(s * 7 + i))  # contiguous
            p.grad, q.grad = grad.clone(), grad.clone()
        ta.step()
        with fusedreg.use_backend(backend):
            fb.step()
    for p, q in zip(a, b):
        torch.testing.assert_close(q, p, **_tol(backend))
    assert [p.stride() for p in b] == strides


# ---- 3. low-precision parameters ----------------------------------------------------------------
def _roundtrip(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf)


RESUME_CASES = [(b, d, c, kw, sd) for b in CPU_BACKENDS
                for d in (torch.float16, torch.bfloat16, torch.float32)
                for c, kw in ((fo.AdamW, dict(amsgrad=True)), (fo.SGD, dict(momentum=0.9)), (fo.Lion, dict(lr=1e-3)))
                for sd in ("compute", "param")]
if "triton" in ALL_BACKENDS:  # a subset on the (slow) interpreter
    RESUME_CASES += [("triton", torch.bfloat16, fo.AdamW, dict(amsgrad=True), sd) for sd in ("compute", "param")]


@pytest.mark.parametrize("backend,dtype,cls,kw,state_dtype", RESUME_CASES,
                         ids=lambda v: getattr(v, "__name__", None) or (str(v) if not isinstance(v, dict) else None))
def test_resume_is_bit_identical_for_every_dtype(backend, dtype, cls, kw, state_dtype):
    kw = {"lr": 1e-2, **kw, "state_dtype": state_dtype, "l1": 0.01}
    full = _params(dtype=dtype)
    of = cls(full, **kw)
    _steps(of, full, n=6, backend=backend)
    half = _params(dtype=dtype)
    oh = cls(half, **kw)
    _steps(oh, half, n=3, backend=backend)
    saved = _roundtrip({"p": [p.detach() for p in half], "opt": oh.state_dict()})
    resumed = [torch.nn.Parameter(t.clone()) for t in saved["p"]]
    orr = cls(resumed, **kw)
    orr.load_state_dict(saved["opt"])
    want = dtype if state_dtype == "param" else torch.float32
    assert all(v.dtype == want for st in orr.state.values() for k, v in st.items() if k != "step")
    with fusedreg.use_backend(backend):  # steps 3..5, with the same gradients as the full run
        for s in range(3, 6):
            for i, p in enumerate(resumed):
                p.grad = torch.randn(p.shape, generator=torch.Generator().manual_seed(10 * s + i), dtype=dtype)
            orr.step()
    for p, q in zip(full, resumed):
        assert torch.equal(p, q)


@pytest.mark.parametrize("backend", [b for b in ALL_BACKENDS if b != "reference"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("cls,kw", [(fo.AdamW, dict(amsgrad=True)), (fo.SGD, dict(momentum=0.9)),
                                    (fo.Lion, {})], ids=["AdamW", "SGD", "Lion"])
def test_state_in_the_param_dtype_matches_the_reference(backend, dtype, cls, kw):
    """state_dtype="param": the moments in the parameter's dtype (half the state memory), the
    math in float32 — every backend agrees with the reference to the dtype's rounding."""
    runs = {}
    for b in ("reference", backend):
        ps = _params(dtype=dtype)
        opt = cls(ps, lr=1e-2, state_dtype="param", **kw)
        _steps(opt, ps, n=3, backend=b)
        runs[b] = (ps, opt)
    (pr, orf), (pf, off) = runs["reference"], runs[backend]
    for p, q in zip(pr, pf):
        torch.testing.assert_close(q, p, **OPTIM_LOWP[dtype])
        for k, v in orf.state[p].items():
            if k != "step":
                assert off.state[q][k].dtype == dtype
                torch.testing.assert_close(off.state[q][k], v, **OPTIM_LOWP[dtype])


def test_state_dtype_is_checked():
    with pytest.raises(ValueError, match="state_dtype"):
        fo.AdamW([torch.nn.Parameter(torch.randn(2))], state_dtype="bfloat16")


# ---- 4. transactional state ---------------------------------------------------------------------
def _trained(cls=fo.AdamW, **kw):
    ps = _params()
    opt = cls([{"params": ps[:1]}, {"params": ps[1:], "lr": 3e-3}], lr=1e-2, **kw)
    _steps(opt, ps, n=2)
    return ps, opt


def _snapshot(ps, opt):
    return [p.detach().clone() for p in ps], copy.deepcopy(opt.state_dict())


def _unchanged(ps, opt, snap):
    for p, q in zip(ps, snap[0]):
        assert torch.equal(p, q)
    now = opt.state_dict()
    assert now["param_groups"] == snap[1]["param_groups"]
    assert now["state"].keys() == snap[1]["state"].keys()
    for i, st in snap[1]["state"].items():
        assert now["state"][i].keys() == st.keys()
        for k, v in st.items():
            assert torch.equal(torch.as_tensor(now["state"][i][k]), torch.as_tensor(v)), (i, k)


@pytest.mark.parametrize("key", ["exp_avg", "exp_avg_sq", "step"])
def test_loaded_state_missing_a_key_fails_before_any_write(key):
    ps, opt = _trained()
    sd = copy.deepcopy(opt.state_dict())  # state_dict() shares the live per-param dicts
    del sd["state"][2][key]  # the last parameter (second group): earlier buckets would step first
    opt.load_state_dict(sd)  # torch's load accepts it too
    for p in ps:
        p.grad = torch.randn_like(p)
    snap = _snapshot(ps, opt)
    with pytest.raises(KeyError, match=key):
        opt.step()
    _unchanged(ps, opt, snap)


def test_python_float_step_from_an_old_checkpoint_is_accepted():
    ps, opt = _trained()
    ps2, opt2 = _trained()
    sd = copy.deepcopy(opt2.state_dict())
    for st in sd["state"].values():
        st["step"] = float(st["step"])  # what old torch checkpoints hold
    opt2.load_state_dict(sd)
    assert all(isinstance(st["step"], torch.Tensor) for st in opt2.state.values())
    _steps(opt, ps, n=2)
    _steps(opt2, ps2, n=2)
    for p, q in zip(ps, ps2):
        assert torch.equal(p, q)


def test_float_step_set_by_hand_is_accepted_at_step():
    ps, opt = _trained()
    ps2, opt2 = _trained()
    for st in opt2.state.values():
        st["step"] = float(st["step"])
    _steps(opt, ps, n=1)
    _steps(opt2, ps2, n=1)
    for p, q in zip(ps, ps2):
        assert torch.equal(p, q)


def test_state_changed_by_hand_after_steps_is_checked_before_any_write():
    """The full state check runs once per state object (not every step); a state replaced
    by hand later is checked again before the step writes anything."""
    ps, opt = _trained()
    _steps(opt, ps, n=1)
    opt.state[ps[2]]["exp_avg_sq"] = torch.zeros(4)  # the last parameter: wrong shape
    for p in ps:
        p.grad = torch.randn_like(p)
    snap = _snapshot(ps, opt)
    with pytest.raises(ValueError, match="exp_avg_sq"):
        opt.step()
    _unchanged(ps, opt, snap)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("cls", [fo.AdamW, fo.SGD])
def test_grads_zeroed_in_place_step_like_new_grads(backend, cls):
    """A loop that keeps its gradient objects (zero_grad(set_to_none=False): the step's
    checks are remembered for them) steps bit for bit like one that makes new ones, and the
    step counts are those of torch (one per step, a 0-dim float32 CPU tensor)."""
    a, b = _params(), _params()
    kw = dict(momentum=0.9) if cls is fo.SGD else {}
    oa, ob = cls(a, lr=1e-2, **kw), cls(b, lr=1e-2, **kw)
    for p in b:
        p.grad = torch.zeros_like(p)
    with fusedreg.use_backend(backend):
        for s in range(3):
            for i, (p, q) in enumerate(zip(a, b)):
                g = torch.randn(p.shape, generator=torch.Generator().manual_seed(10 * s + i))
                p.grad = g.clone()
                q.grad.copy_(g)  # the same object every step
            oa.step()
            ob.step()
    for p, q in zip(a, b):
        assert torch.equal(p, q)
    if cls is fo.AdamW:
        for q in b:
            step = ob.state[q]["step"]
            assert step.dim() == 0 and step.dtype == torch.float32 and step.device.type == "cpu"
            assert float(step) == 3.0


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("swap", ["param data", "grad data"])
def test_data_swapped_under_a_remembered_grad_is_checked_before_any_write(backend, swap):
    """The checks remembered for a (parameter, gradient) pair do not survive new data under
    either (``.data = ...``): the mismatch is refused before any parameter of any group is
    written, and no step is counted."""
    ps, opt = _trained()
    for p in ps:
        p.grad = torch.randn_like(p)
    with fusedreg.use_backend(backend):
        opt.step()  # remembered with these gradient objects
    if swap == "param data":
        ps[2].data = torch.randn(3)  # the last group's parameter: (1,) -> (3,), its grad (1,)
    else:
        ps[2].grad.data = torch.randn(3)
    snap = _snapshot(ps, opt)
    with fusedreg.use_backend(backend), pytest.raises(ValueError, match="does not match"):
        opt.step()
    _unchanged(ps, opt, snap)


def test_step_runs_without_autograd_and_restores_grad_mode():
    """step() runs its update outside autograd (a leaf stays a leaf), its closure with
    autograd, and leaves the grad mode as it found it — also when it raises."""
    ps, opt = _trained()
    seen = []

    def closure():
        seen.append(torch.is_grad_enabled())
        return torch.tensor(2.0)

    for p in ps:
        p.grad = torch.randn_like(p)
    with torch.no_grad():
        assert opt.step(closure).item() == 2.0
        assert not torch.is_grad_enabled()
    assert seen == [True] and torch.is_grad_enabled()
    assert all(p.is_leaf and p.grad_fn is None for p in ps)
    ps[0].grad.data = torch.randn(3)  # a gradient of the wrong shape
    with pytest.raises(ValueError):
        opt.step()
    assert torch.is_grad_enabled()


@pytest.mark.parametrize("corrupt,match", [
    (lambda sd: sd["state"][1].__setitem__("step", torch.tensor([1.0, 2.0])), r"parameter 1.*'step'"),
    (lambda sd: sd["state"][2].__setitem__("exp_avg", torch.zeros(4)), r"parameter 2.*'exp_avg'"),
    (lambda sd: sd["state"][0].__setitem__("step", "three"), r"parameter 0.*'step'"),
    (lambda sd: sd["param_groups"][1].__setitem__("lr", -1.0), r"param group 1.*learning rate"),
])
def test_bad_state_dict_loads_nothing_and_names_param_and_key(corrupt, match):
    ps, opt = _trained()
    sd = copy.deepcopy(opt.state_dict())
    for st in sd["state"].values():
        st["step"] = st["step"] + 10  # a valid change that must not land either
    corrupt(sd)
    snap = _snapshot(ps, opt)
    with pytest.raises((ValueError, TypeError), match=match):
        opt.load_state_dict(sd)
    _unchanged(ps, opt, snap)
    _steps(opt, ps, n=1)  # still usable


def test_extra_state_for_an_unknown_id_is_accepted_like_torch():
    ps, opt = _trained()
    sd = copy.deepcopy(opt.state_dict())
    sd["state"][99] = {"note": 1, "t": torch.ones(2)}
    tp = _params()
    torch.optim.AdamW([{"params": tp[:1]}, {"params": tp[1:]}]).load_state_dict(copy.deepcopy(sd))  # torch accepts it
    opt.load_state_dict(sd)
    _steps(opt, ps, n=1)
    assert opt.state_dict()["state"][99]["note"] == 1


# ---- 5. the raw ops check their arguments -------------------------------------------------------
def _raw_args(algo, device2="cpu", n=5):
    ps = [torch.randn(n), torch.randn(n + 2, device=device2)]
    gs = [torch.randn(n), torch.randn(n + 2, device=device2)]
    st = lambda: [torch.zeros(n), torch.zeros(n + 2, device=device2)]  # noqa: E731
    common = dict(lr=1e-2, weight_decay=0.0, l1=0.0, l1_lr_scaled=True, maximize=False, inv_scale=1.0)
    if algo == "adam":
        return [ps, gs, st(), st(), [], [torch.tensor(0.0), torch.tensor(0.0)]], dict(common, beta1=0.9, beta2=0.99, eps=1e-8,
                                                           amsgrad=False, decoupled=True)
    if algo == "sgd":
        return [ps, gs, st()], dict(common, momentum=0.9, dampening=0.0, nesterov=False,
                                    decoupled=False, first_step=False)
    return [ps, gs, st()], dict(common, beta1=0.9, beta2=0.99)


def _bad_cases(algo):
    cases = {"cpu+meta": _raw_args(algo, device2="meta")}
    args, kw = _raw_args(algo)
    args[1] = args[1][:1]
    cases["one grad short"] = (args, kw)
    args, kw = _raw_args(algo)
    args[2] = args[2][:1]
    cases["one state short"] = (args, kw)
    args, kw = _raw_args(algo)
    args[1] = [g.double() for g in args[1]]
    cases["grad dtype"] = (args, kw)
    args, kw = _raw_args(algo)
    args[2] = [s.half() for s in args[2]]
    cases["state dtype"] = (args, kw)
    args, kw = _raw_args(algo)
    args[0] = [torch.arange(5), torch.arange(7)]
    cases["int params"] = (args, kw)
    args, kw = _raw_args(algo)
    args[0][0] = torch.randn(10)[::2]
    cases["param not dense"] = (args, kw)
    args, kw = _raw_args(algo)
    args[0][0], args[1][0] = torch.randn(2, 3), torch.randn(3, 2).t()
    args[2][0] = torch.zeros(2, 3)
    if algo == "adam":
        args[3][0] = torch.zeros(2, 3)
    cases["grad strides"] = (args, kw)
    if algo == "adam":  # the step counts: checked before the op counts or writes anything
        for name, bad in (("step nan", torch.tensor(float("nan"))), ("step < 0", torch.tensor(-1.0)),
                          ("step float64", torch.tensor(1.0, dtype=torch.float64)),
                          ("step 2 elements", torch.zeros(2)), ("step int", torch.tensor(1))):
            args, kw = _raw_args(algo)
            args[5][1] = bad
            cases[name] = (args, kw)
        args, kw = _raw_args(algo)
        args[5] = args[5][:1]
        cases["one step short"] = (args, kw)
    args, kw = _raw_args(algo)
    kw["lr"] = float("nan")
    cases["nan lr"] = (args, kw)
    return cases


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("algo", ["adam", "sgd", "lion"])
def test_raw_ops_refuse_bad_lists_before_any_write(backend, algo):
    op = backends.implementation(algo, backend)
    for name, (args, kw) in _bad_cases(algo).items():
        before = [t.clone() for t in args[0] if t.device.type == "cpu"]
        counts = [t.clone() for t in args[5]] if algo == "adam" else []
        with pytest.raises(RuntimeError):
            op(*args, **kw)
        after = [t for t in args[0] if t.device.type == "cpu"]
        assert all(torch.equal(a, b) for a, b in zip(before, after)), name
        # nothing counted either (nan == nan here: equal_nan)
        if counts:
            assert all(torch.allclose(a, b, equal_nan=True) for a, b in zip(counts, args[5])), name


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_raw_adam_op_counts_its_steps(backend):
    """adam_step adds one to each count tensor (in place, float32, as torch's step += 1) and
    steps with the new counts: counts 0 and 9 step as steps 1 and 10 of the reference."""
    args, kw = _raw_args("adam")
    args[5] = [torch.tensor(0.0), torch.tensor([9.0])]  # a 1-element tensor of shape (1,) too
    ref = [[t.clone() for t in lst] for lst in args[:5]] + [[torch.tensor(0.0), torch.tensor(9.0)]]
    backends.implementation("adam", backend)(*args, **kw)
    backends.implementation("adam", "reference")(*ref, **kw)
    assert [float(t) for t in args[5]] == [1.0, 10.0] and args[5][1].shape == (1,)
    for a, b in zip(args[0], ref[0]):
        torch.testing.assert_close(a, b, **_tol(backend))


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_raw_op_steps_a_channels_last_list_in_place(backend):
    p = (torch.randn(2, 3, 4, 5) + 0.5).to(memory_format=torch.channels_last)
    g = torch.randn(2, 3, 4, 5).to(memory_format=torch.channels_last)
    z = lambda: torch.zeros_like(p)  # noqa: E731 - channels_last too
    ref = p.clone(memory_format=torch.contiguous_format)
    args = ([p], [g], [z()], [z()], [], [torch.tensor(0.0)])
    ref_args = ([ref], [g.contiguous()], [torch.zeros_like(ref)], [torch.zeros_like(ref)], [],
                [torch.tensor(0.0)])
    kw = dict(lr=1e-2, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.1, l1=0.0, l1_lr_scaled=True,
              amsgrad=False, maximize=False, decoupled=True, inv_scale=1.0)
    backends.implementation("adam", backend)(*args, **kw)
    backends.implementation("adam", "reference")(*ref_args, **kw)
    torch.testing.assert_close(p, ref, **_tol(backend))
    assert p.is_contiguous(memory_format=torch.channels_last)


# ---- 6. sparsity() and l1 ------------------------------------------------------------------------
def test_sparsity_counts_only_groups_with_l1():
    w, b = torch.nn.Parameter(torch.randn(8, 8)), torch.nn.Parameter(torch.zeros(8))
    opt = fo.AdamW([{"params": [w], "l1": 1e-3}, {"params": [b]}])
    with torch.no_grad():
        w[:2] = 0
    assert opt.sparsity() == [pytest.approx(16 / 64), None]  # the zero biases are not L1's


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("cls", [fo.AdamW, fo.SGD, fo.Lion])
def test_l1_not_scaled_by_lr(backend, cls):
    """l1_lr_scaled=False: the threshold is l1 itself, whatever the learning rate — the step
    equals the update without L1 followed by a soft threshold at l1."""
    lr, l1 = 1e-3, 0.05
    a, b = _params(), _params()
    oa, ob = cls(a, lr=lr), cls(b, lr=lr, l1=l1, l1_lr_scaled=False)
    n = 2 if backend == "triton" else 4
    for s in range(n):
        _steps(oa, a, n=1, backend="reference")
        with torch.no_grad():
            for p in a:
                p.copy_(torch.sign(p) * torch.clamp(p.abs() - l1, min=0))
        _steps(ob, b, n=1, backend=backend)
    for p, q in zip(a, b):
        torch.testing.assert_close(q, p, **OPTIM_PARITY[torch.float32])
    assert ob.sparsity()[0] > 0.1  # l1 = 0.05 a step at lr = 1e-3 still makes zeros


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_opcheck_channels_last_with_state_in_the_param_dtype(backend):
    """The registered op (schema, fake function, mutation) on channels_last bf16 parameters
    with bf16 state — the layout and state dtype the optimizer hands it."""
    g = torch.Generator().manual_seed(0)
    cl = lambda *s: (torch.randn(*s, generator=g) + 0.1).to(torch.bfloat16).to(memory_format=torch.channels_last)  # noqa: E731
    ps, gs = [cl(2, 3, 4, 5), cl(1, 2, 3, 3)], [cl(2, 3, 4, 5), cl(1, 2, 3, 3)]
    st = lambda: [torch.rand_like(p) for p in ps]  # noqa: E731 - channels_last, bf16
    kw = dict(lr=1e-2, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.1, l1=0.01, l1_lr_scaled=False,
              amsgrad=True, maximize=False, decoupled=True, inv_scale=0.5)
    torch.library.opcheck(backends.implementation("adam", backend), (ps, gs, st(), st(), st(), [torch.tensor(1.0), torch.tensor(2.0)]), kw)


# ---- GPU backends (run when a GPU is present) ---------------------------------------------------
@pytest.mark.parametrize("backend,device,dtype,state_dtype", device_cases(
    "adam", [], [(d, sd) for d in (torch.float32, torch.bfloat16) for sd in ("compute", "param")]))
def test_gpu_layouts_and_state_dtype_match_the_reference(backend, device, dtype, state_dtype):
    """On the GPU kernels: channels_last, transposed and contiguous parameters (with a
    gradient of other strides), state in either dtype, against the reference on the same
    device."""
    serving("adam", backend, device)
    g = torch.Generator().manual_seed(0)
    base = [(torch.randn(8, 16, 3, 3, generator=g) + 0.1).to(memory_format=torch.channels_last),
            torch.randn(70, 33, generator=g).t(), torch.randn(100_003, generator=g)]
    grads = [[torch.randn(t.shape, generator=g) for t in base] for _ in range(3)]  # contiguous
    out = {}
    for b in ("reference", backend):
        ps = [torch.nn.Parameter(t.to(device=device, dtype=dtype)) for t in base]
        opt = fo.AdamW(ps, lr=1e-2, amsgrad=True, l1=0.05, state_dtype=state_dtype)
        with fusedreg.use_backend(b):
            for gs in grads:
                for p, gr in zip(ps, gs):
                    p.grad = gr.to(device=device, dtype=dtype)
                opt.step()
        out[b] = ps
    tol = OPTIM_PARITY[dtype] if dtype == torch.float32 else OPTIM_LOWP[dtype]
    for p, q in zip(out["reference"], out[backend]):
        torch.testing.assert_close(q, p, **tol)
        assert q.stride() == p.stride()


@pytest.mark.parametrize("cls", [fo.AdamW, fo.SGD])
def test_reused_buckets_see_every_change(cls):
    """Once a step finds the same parameters, gradient objects, data and state as the last one,
    it reuses that step's checked buckets. Every change still takes effect: an optimizer
    whose gradients are the same objects every step (zeroed and refilled in place: the
    buckets are reused) steps bit for bit like one given new gradient objects every step (its
    buckets are rebuilt) through a gradient set to None, a new gradient object, a state
    tensor replaced by hand, a learning rate changed in the group and new data under a
    parameter; and a backend chosen later (use_backend) is the one called."""
    from torch.utils._python_dispatch import TorchDispatchMode
    a, b = _params(), _params()
    kw = dict(momentum=0.9, nesterov=True) if cls is fo.SGD else dict(amsgrad=True)
    oa, ob = cls(a, lr=1e-2, **kw), cls(b, lr=1e-2, **kw)
    for p in a:
        p.grad = torch.zeros_like(p)
    key = "momentum_buffer" if cls is fo.SGD else "exp_avg"

    def step(s):
        for i, (p, q) in enumerate(zip(a, b)):
            g = torch.randn(p.shape, generator=torch.Generator().manual_seed(10 * s + i))
            if p.grad is not None:
                p.grad.copy_(g)
                q.grad = g.clone()
        oa.step()
        ob.step()

    for s in range(4):
        step(s)
    assert oa._memo, "the fast path is not taken: this test would check nothing"
    a[1].grad, b[1].grad = None, None
    step(4)
    a[1].grad, b[1].grad = torch.zeros_like(a[1]), torch.zeros_like(b[1])
    step(5)
    a[0].grad, b[0].grad = torch.zeros_like(a[0]), torch.zeros_like(b[0])
    step(6)
    oa.state[a[0]][key] = torch.full_like(a[0], 0.5)
    ob.state[b[0]][key] = torch.full_like(b[0], 0.5)
    step(7)
    for o in (oa, ob):
        o.param_groups[0]["lr"] = 3e-2
    step(8)
    with torch.no_grad():
        fresh = torch.randn(a[2].shape)
        a[2].data, b[2].data = fresh.clone(), fresh.clone()
    step(9)
    step(10)
    for p, q in zip(a, b):
        assert torch.equal(p, q)
    for p, q in zip(a, b):
        for k, v in oa.state[p].items():
            assert torch.equal(v, ob.state[q][k]), k

    class Seen(TorchDispatchMode):
        ops: list = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Seen.ops.append(str(func))
            return func(*args, **(kwargs or {}))

    algo = "sgd" if cls is fo.SGD else "adam"
    with Seen():
        oa.step()  # the default choice: reused
    with fusedreg.use_backend("reference"), Seen():
        oa.step()
    assert any(f"{algo}_step_reference" in op for op in Seen.ops), Seen.ops


@pytest.mark.parametrize("cls", [fo.AdamW, fo.SGD])
def test_reused_buckets_keep_no_gradient_alive(cls):
    """The buckets kept for reuse hold the gradients weakly: zero_grad(set_to_none=True) frees
    them before the next backward (no second set of gradients in memory)."""
    import gc
    import weakref
    ps = _params()
    opt = cls(ps, lr=1e-2)
    for p in ps:
        p.grad = torch.ones_like(p)
    for _ in range(4):
        opt.step()
    assert opt._memo, "the fast path is not taken: this test would check nothing"
    refs = [weakref.ref(p.grad) for p in ps]
    opt.zero_grad(set_to_none=True)
    gc.collect()
    assert all(r() is None for r in refs)
