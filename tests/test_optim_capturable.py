"""fusedreg.optim.Adam/AdamW(capturable=True): the step counts live on the parameters' device
and a step reads nothing on the host — step counts, a tensor lr, GradScaler's grad_scale and
found_inf are read by the kernels (the "adam_capturable" op of the reference, triton and cuda
backends). Here on CPU tensors: the reference op and the Triton kernels under the interpreter
(tests/conftest.py sets TRITON_INTERPRET), against torch's AdamW (plain, or fused for AMP:
torch refuses capturable on CPU parameters) and against fusedreg's own non-capturable step
where torch has no equivalent (l1). On a GPU (skipped here, "needs a CUDA GPU"): the step
captured in a CUDA graph and replayed equals eager steps, for the triton and cuda backends.
"""
import copy
import io
import os
import sys

import pytest
import torch

import fusedreg
import fusedreg.optim as fo
from fusedreg import backends
from fusedreg.ops.optim import CAPTURABLE

from conftest import gpu_backend_or_fail, requires_cuda
from tolerances import OPTIM_LOWP, OPTIM_PARITY

# The backends that run the capturable op on CPU tensors here (reference; triton under the
# interpreter when Triton is installed).
CPU_CAPTURABLE = [b for b in backends.implemented_backends(CAPTURABLE, "cpu") if b != "cuda"]


def _params(dtype=torch.float32, seed=0, device="cpu"):
    # odd sizes (no multiple of a vector width or block), non-zero mean, a 1-element tensor
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter((torch.randn(*s, generator=g) + 0.25).to(device, dtype))
            for s in ((7, 5), (13,), (1,))]


def _grads(step, params, scale=1.0):
    g = torch.Generator().manual_seed(1000 + step)
    return [(scale * torch.randn(p.shape, generator=g)).to(p.device, p.dtype) for p in params]


def _run(opt, params, steps, backend, scale=1.0, found=None):
    """``steps`` steps of ``opt`` on fixed gradients (times ``scale``); ``found`` (a list of
    0/1 per step) sets GradScaler's grad_scale = scale and found_inf as GradScaler does."""
    with fusedreg.use_backend(backend):
        for s in range(steps):
            for p, g in zip(params, _grads(s, params, scale)):
                p.grad = g
            if found is not None:
                opt.grad_scale = torch.tensor(scale, device=params[0].device)
                opt.found_inf = torch.tensor(float(found[s]), device=params[0].device)
            opt.step()


def _same(a, b, **tol):
    for p, q in zip(a, b):
        torch.testing.assert_close(p.detach(), q.detach(), **tol)


def _tol(backend, dtype=torch.float32, oracle="single"):
    """The reference's capturable step is its host step (torch's single-tensor Adam) bit for
    bit: the same operations, with tensors. A kernel evaluates the formulas element by
    element (OPTIM_PARITY's reasons); bf16 parameters: OPTIM_LOWP's. Against torch's fused
    Adam or torch with a tensor lr (oracle="fused": another evaluation order) the reference
    gets OPTIM_PARITY too."""
    if backend == "reference" and oracle == "single":
        return dict(atol=0.0, rtol=0.0)
    if dtype in OPTIM_LOWP:
        return OPTIM_LOWP[dtype]
    return OPTIM_PARITY[dtype]


# fusedreg class, the torch class to compare with (None: fusedreg's own non-capturable step on
# the reference backend — torch has no l1) and the constructor's keywords
CONFIGS = {
    "adamw_amsgrad_wd_tensor_lr": dict(cls=fo.AdamW, torch_cls=torch.optim.AdamW,
                                       kw=dict(lr=torch.tensor(1e-2), weight_decay=0.1,
                                               amsgrad=True)),
    "adam_l2_maximize": dict(cls=fo.Adam, torch_cls=torch.optim.Adam,
                             kw=dict(lr=3e-3, betas=(0.8, 0.99), weight_decay=0.05,
                                     maximize=True)),
    "adamw_l1_tensor_lr": dict(cls=fo.AdamW, torch_cls=None,
                               kw=dict(lr=torch.tensor(2e-2), weight_decay=0.01, l1=0.5)),
    "adamw_l1_unscaled_amsgrad": dict(cls=fo.AdamW, torch_cls=None,
                                      kw=dict(lr=1e-2, amsgrad=True, l1=1e-3,
                                              l1_lr_scaled=False)),
}


def _oracle(cfg, params):
    """The optimizer to compare with, stepped on the reference backend (torch's ignore it)."""
    kw = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in cfg["kw"].items()}
    return (cfg["torch_cls"] or cfg["cls"])(params, **kw), "reference"


@pytest.mark.parametrize("backend", CPU_CAPTURABLE)
@pytest.mark.parametrize("name", list(CONFIGS))
def test_matches_torch_and_the_host_step(backend, name):
    """6 capturable steps equal torch's (or fusedreg's non-capturable reference step, for
    l1); the step counts are 0-dim float32 tensors on the parameters' device."""
    cfg = CONFIGS[name]
    ps, qs = _params(), _params()
    kw = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in cfg["kw"].items()}
    opt = cfg["cls"](ps, capturable=True, **kw)
    ref, ref_backend = _oracle(cfg, qs)
    _run(opt, ps, 6, backend)
    _run(ref, qs, 6, ref_backend)
    # torch with a tensor lr computes lr / bias_correction in float32 (fusedreg: in double)
    oracle = "fused" if cfg["torch_cls"] and isinstance(kw["lr"], torch.Tensor) else "single"
    tol = _tol(backend, oracle=oracle)
    _same(ps, qs, **tol)
    for p in ps:
        st = opt.state[p]
        assert st["step"].dtype == torch.float32 and st["step"].dim() == 0
        assert st["step"].device == p.device and float(st["step"]) == 6.0
    if cfg["torch_cls"] is not None:
        for p, q in zip(ps, qs):
            _same([opt.state[p]["exp_avg"]], [ref.state[q]["exp_avg"]], **tol)


@pytest.mark.parametrize("backend", CPU_CAPTURABLE)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_low_and_high_precision_parameters(backend, dtype):
    """bf16 (fp32 state) and float64 parameters: the capturable step equals the host step of
    the same backend (the same kernel: for Triton under the interpreter, whose fp32 -> bf16
    cast truncates, the same truncations)."""
    ps, qs = _params(dtype), _params(dtype)
    kw = dict(lr=torch.tensor(1e-2, dtype=torch.float64), weight_decay=0.1, amsgrad=True, l1=0.1)
    opt = fo.AdamW(ps, capturable=True, **kw)
    ref = fo.AdamW(qs, **{**kw, "lr": 1e-2})
    _run(opt, ps, 5, backend)
    _run(ref, qs, 5, backend)
    _same(ps, qs, **_tol(backend, dtype))
    for p, q in zip(ps, qs):
        _same([opt.state[p]["exp_avg_sq"]], [ref.state[q]["exp_avg_sq"]], **_tol(backend, dtype))


@pytest.mark.parametrize("backend", CPU_CAPTURABLE)
def test_grad_scaler_found_inf_is_applied_on_the_device(backend):
    """GradScaler's grad_scale and found_inf, as torch's fused AdamW takes them: the gradients
    are unscaled in the kernel, a step with found_inf = 1 changes no parameter and no state
    and does not count (the step count is incremented, then decremented by found_inf, as
    torch's fused Adam does)."""
    found = [0, 0, 1, 0, 1, 0]
    ps, qs = _params(), _params()
    kw = dict(lr=1e-2, weight_decay=0.1, amsgrad=True)
    opt = fo.AdamW(ps, capturable=True, **kw)
    ref = torch.optim.AdamW(qs, fused=True, **kw)
    with fusedreg.use_backend(backend):
        for s, f in enumerate(found):
            before = [p.detach().clone() for p in ps] + [
                t.clone() for p in ps for t in opt.state[p].values()]
            for o, params in ((opt, ps), (ref, qs)):
                for p, g in zip(params, _grads(s, params, 64.0)):
                    p.grad = g
                o.grad_scale, o.found_inf = torch.tensor(64.0), torch.tensor(float(f))
                o.step()
            if f:
                after = [p.detach() for p in ps] + [t for p in ps for t in opt.state[p].values()]
                assert all(torch.equal(a, b) for a, b in zip(before, after))
    _same(ps, qs, **_tol(backend, oracle="fused"))
    for p, q in zip(ps, qs):
        assert torch.equal(opt.state[p]["step"], ref.state[q]["step"].to(torch.float32))
        assert float(opt.state[p]["step"]) == found.count(0)
        _same([opt.state[p]["max_exp_avg_sq"]], [ref.state[q]["max_exp_avg_sq"]],
              **_tol(backend, oracle="fused"))


class _HostReadError(AssertionError):
    pass


_HOST_READS = ("item", "tolist", "__float__", "__bool__", "__int__", "__index__", "cpu",
               "numpy", "__format__")
_FUSEDREG_DIR = os.path.dirname(fusedreg.__file__)


class _DeviceOnly(torch.Tensor):
    """A tensor that stands for a device value: fusedreg's code must not read it on the host
    (the host reads of _HOST_READS, patched by ``no_host_reads``, raise when the innermost
    fusedreg or Triton frame on the stack is fusedreg's — the Triton interpreter, which runs
    the kernels on the CPU, stands in for the device). Torch ops on it return _DeviceOnly
    tensors, so values computed from it are covered too — except inside a registered custom
    op, where torch switches subclass dispatch off: ``test_the_kernels_read_nothing_on_the_host``
    calls the ops' Python bodies directly for that."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        return super().__torch_function__(func, types, args, kwargs or {})


def _device_only(t):
    return t.as_subclass(_DeviceOnly)


def _guard(name, original):
    def read(self, *args, **kwargs):
        if isinstance(self, _DeviceOnly):
            frame = sys._getframe(1)
            while frame is not None:
                path = frame.f_code.co_filename
                if path.startswith(_FUSEDREG_DIR):
                    raise _HostReadError(f"host read {name} of a device value at "
                                         f"{path}:{frame.f_lineno}")
                if os.sep + "triton" + os.sep in path:
                    break
                frame = frame.f_back
        return original(self, *args, **kwargs)
    return read


@pytest.fixture
def no_host_reads(monkeypatch):
    for name in _HOST_READS:
        monkeypatch.setattr(torch.Tensor, name, _guard(name, getattr(torch.Tensor, name)))


@pytest.mark.parametrize("backend", CPU_CAPTURABLE)
def test_the_step_reads_nothing_on_the_host(backend, no_host_reads):
    """With capturable=True the step, its checks included, never reads the step counts, a
    tensor lr, grad_scale or found_inf on the host (what would synchronize with a GPU and
    break a CUDA graph capture): each is a tensor whose host reads raise. The same tensors
    make the non-capturable step raise (the check can fail)."""
    ps = _params()
    opt = fo.AdamW(ps, lr=torch.tensor(1e-2), capturable=True, amsgrad=True, l1=0.1)
    _run(opt, ps, 1, backend)  # creates the state
    # (the constructor checks lr on the host, as torch's does: after it, lr is device-only)
    opt.param_groups[0]["lr"] = _device_only(torch.tensor(1e-2))
    for p in ps:
        opt.state[p]["step"] = _device_only(opt.state[p]["step"])
    qs = _params()
    ref = fo.AdamW(qs, lr=torch.tensor(1e-2), amsgrad=True, l1=0.1)
    _run(ref, qs, 1, "reference")
    with fusedreg.use_backend(backend):
        for s in range(1, 4):
            for p, g in zip(ps, _grads(s, ps, 4.0)):
                p.grad = g
            opt.grad_scale = _device_only(torch.tensor(4.0))
            opt.found_inf = _device_only(torch.tensor(float(s == 2)))
            opt.step()
            if s != 2:
                for q, g in zip(qs, _grads(s, qs)):
                    q.grad = g
                ref.step()
    _same(ps, qs, **_tol(backend))
    assert [float(opt.state[p]["step"]) for p in ps] == [3.0] * 3
    host = fo.AdamW(_params(), lr=1e-2)
    host.grad_scale = _device_only(torch.tensor(4.0))
    host.found_inf = _device_only(torch.tensor(0.0))
    with pytest.raises(_HostReadError):
        _run(host, host.param_groups[0]["params"], 1, backend)


def _python_kernels():
    from fusedreg.ops import optim as ops_optim
    from fusedreg.reference import optim as ref_optim
    out = {"reference": ref_optim.multi_adam_step_capturable}
    if "triton" in CPU_CAPTURABLE:
        from fusedreg.triton import optim as tri_optim
        out["triton"] = tri_optim.adam_step_capturable
    return ops_optim._adam_capturable_fake, out


@pytest.mark.parametrize("backend", CPU_CAPTURABLE)
def test_the_kernels_read_nothing_on_the_host(backend, no_host_reads):
    """The Python bodies of the capturable op (its checks, the reference's tensor ops, the
    Triton host code) called directly, so that every tensor computed from the device values
    is device-only too: no host read, and the result is the optimizer's."""
    check, kernels = _python_kernels()
    ps, qs = _params(), _params()
    opt = fo.AdamW(qs, lr=torch.tensor(1e-2), weight_decay=0.1, amsgrad=True, l1=0.1)
    gs = _grads(0, ps, 2.0)
    state = [[torch.zeros_like(p) for p in ps] for _ in range(3)]
    steps = [_device_only(torch.ones(())) for _ in ps]
    hyper = dict(lr=0.0, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1, l1=0.1,
                 l1_lr_scaled=True, amsgrad=True, maximize=False, decoupled=True)
    args = (ps, gs, *state, steps, _device_only(torch.tensor(1e-2)),
            _device_only(torch.tensor(2.0)), _device_only(torch.tensor(0.0)))
    with torch.no_grad():
        check(*args, **hyper)
        kernels[backend](*args, **hyper)
    for q, g in zip(qs, _grads(0, qs)):
        q.grad = g
    with fusedreg.use_backend("reference"):
        opt.step()
    _same(ps, qs, **_tol(backend))


@pytest.mark.parametrize("backend", CPU_CAPTURABLE)
def test_state_dict_round_trip(backend):
    """Save after 3 capturable steps, load into a fresh capturable optimizer (and from a
    non-capturable one's and torch's state dicts): the step count is a float32 tensor on the
    parameter's device, and continuing equals the uninterrupted run bit for bit."""
    kw = dict(lr=torch.tensor(1e-2), weight_decay=0.1, amsgrad=True)
    ps = _params()
    opt = fo.AdamW(ps, capturable=True, **copy.deepcopy(kw))
    _run(opt, ps, 3, backend)
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    saved = [p.detach().clone() for p in ps]
    _run(opt, ps, 3, backend)  # the uninterrupted run
    qs = [torch.nn.Parameter(t.clone()) for t in saved]
    resumed = fo.AdamW(qs, capturable=True, **copy.deepcopy(kw))
    buf.seek(0)
    resumed.load_state_dict(torch.load(buf))
    for q in qs:
        st = resumed.state[q]["step"]
        assert st.device == q.device and st.dtype == torch.float32 and float(st) == 3.0
    _run(resumed, qs, 3, backend)
    assert all(torch.equal(p, q) for p, q in zip(ps, qs))
    # a non-capturable (CPU step) state dict loads into a capturable optimizer and back
    plain = fo.AdamW(_params(), lr=1e-2)
    _run(plain, plain.param_groups[0]["params"], 2, "reference")
    cap = fo.AdamW(_params(), lr=1e-2, capturable=True)
    cap.load_state_dict(plain.state_dict())
    assert all(float(s["step"]) == 2.0 for s in cap.state.values())
    t = torch.optim.AdamW(_params(), lr=1e-2)
    t.load_state_dict(cap.state_dict())
    assert all(float(s["step"]) == 2.0 for s in t.state.values())


def test_bad_op_input_raises_before_any_write():
    """The capturable op checks the step tensors and the device scalars (metadata only) before
    any write, in every backend that runs here."""
    for backend in CPU_CAPTURABLE:
        op = backends.implementation(CAPTURABLE, backend)
        ps = _params()
        before = [p.detach().clone() for p in ps]
        gs = _grads(0, ps)
        m = [torch.zeros_like(p) for p in ps]
        v = [torch.zeros_like(p) for p in ps]
        steps = [torch.ones(()) for _ in ps]
        hyper = dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, l1=0.0,
                     l1_lr_scaled=True, amsgrad=False, maximize=False, decoupled=True)
        bad = [
            ([torch.ones((), dtype=torch.float64) for _ in ps], None, None, "step 0 must be"),
            (steps[:2], None, None, "one step per parameter"),
            (steps, torch.ones(2), None, "lr_tensor must be"),
            (steps, None, torch.tensor(1, dtype=torch.int64), "grad_scale must be"),
        ]
        for st, lr_t, gsc, match in bad:
            with pytest.raises(RuntimeError, match=match):
                op(ps, gs, m, v, [], st, lr_t, gsc, None, **hyper)
        with pytest.raises(RuntimeError, match="found_inf must be"):
            op(ps, gs, m, v, [], steps, None, None, torch.zeros(1, device="meta"), **hyper)
        with pytest.raises(RuntimeError, match="beta1 must be in"):
            op(ps, gs, m, v, [], steps, None, None, None, **{**hyper, "beta1": 1.0})
        assert all(torch.equal(a, b) for a, b in zip(before, ps))
        assert all(not t.any() for t in m + v)


def test_capturable_refuses_other_devices_and_keeps_sgd_signature():
    """capturable=True runs on CPU and CUDA parameters; another device (a meta one here) is
    refused at construction with the alternative. SGD has no capturable keyword, as torch's."""
    p = torch.nn.Parameter(torch.empty(3, device="meta"))
    with pytest.raises(RuntimeError, match=r"CPU and CUDA parameters.*torch\.optim\.AdamW\(capturable=True\)"):
        fo.AdamW([p], capturable=True)
    with pytest.raises(TypeError):
        fo.SGD(_params(), lr=1e-2, capturable=True)
    with pytest.raises(TypeError):
        torch.optim.SGD(_params(), lr=1e-2, capturable=True)


# ---- on a GPU: CUDA graphs -------------------------------------------------------------------
def _graph_case(backend, lr_tensor):
    torch.manual_seed(0)
    ps = _params(device="cuda")
    qs = [torch.nn.Parameter(p.detach().clone()) for p in ps]
    lr = torch.tensor(1e-2, device="cuda") if lr_tensor else 1e-2
    kw = dict(weight_decay=0.1, amsgrad=True, l1=0.05)
    graphed = fo.AdamW(ps, lr=lr, capturable=True, **kw)
    eager = fo.AdamW(qs, lr=lr.clone() if lr_tensor else lr, capturable=True, **kw)
    return ps, qs, graphed, eager


@requires_cuda
@pytest.mark.parametrize("lr_tensor", [False, True], ids=["float_lr", "tensor_lr"])
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_cuda_graph_replays_equal_eager_steps(backend, lr_tensor):
    """The step captured in a torch.cuda.CUDAGraph (after 3 eager warm-up steps on a side
    stream, torch's recipe) and replayed 5 times, with new gradients copied in and, with a
    tensor lr, the lr changed in place between replays, equals 5 eager steps; found_inf = 1 on
    one replay skips it on the device."""
    gpu_backend_or_fail(CAPTURABLE, backend)
    ps, qs, graphed, eager = _graph_case(backend, lr_tensor)
    grad_bufs = [torch.zeros_like(p) for p in ps]
    found = torch.zeros((), device="cuda")
    with fusedreg.use_backend(backend):
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for s in range(3):
                for p, q, b, g in zip(ps, qs, grad_bufs, _grads(s, ps)):
                    b.copy_(g)
                    p.grad, q.grad = b, g.clone()
                graphed.found_inf = found
                graphed.step()
                eager.step()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            graphed.step()
        for s in range(3, 8):
            skip = s == 5
            for p, q, b, g in zip(ps, qs, grad_bufs, _grads(s, ps)):
                b.copy_(g)
                q.grad = g.clone()
            found.fill_(1.0 if skip else 0.0)
            if lr_tensor:
                new_lr = 1e-2 / (s - 1)
                graphed.param_groups[0]["lr"].fill_(new_lr)
                eager.param_groups[0]["lr"].fill_(new_lr)
            graph.replay()
            if not skip:
                eager.step()
        torch.cuda.synchronize()
    for p, q in zip(ps, qs):
        torch.testing.assert_close(p, q, atol=0.0, rtol=0.0)
        assert torch.equal(graphed.state[p]["exp_avg"], eager.state[q]["exp_avg"])
        assert float(graphed.state[p]["step"]) == float(eager.state[q]["step"]) == 7.0


@requires_cuda
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_cuda_step_makes_no_host_sync(backend):
    """torch.cuda.set_sync_debug_mode("error") raises on any synchronizing call: the
    capturable step (tensor lr, GradScaler-style grad_scale and found_inf) makes none; a
    non-capturable optimizer captured in a graph is refused as torch refuses it."""
    gpu_backend_or_fail(CAPTURABLE, backend)
    ps, _, opt, _ = _graph_case(backend, lr_tensor=True)
    with fusedreg.use_backend(backend):
        for s in range(2):  # the first step creates the state
            for p, g in zip(ps, _grads(s, ps, 8.0)):
                p.grad = g
            opt.grad_scale = torch.full((), 8.0, device="cuda")
            opt.found_inf = torch.zeros((), device="cuda")
            if s == 1:
                torch.cuda.set_sync_debug_mode("error")
            try:
                opt.step()
            finally:
                torch.cuda.set_sync_debug_mode("default")
        plain = fo.AdamW(_params(device="cuda"), lr=1e-2)
        for p in plain.param_groups[0]["params"]:
            p.grad = torch.ones_like(p)
        graph = torch.cuda.CUDAGraph()
        with pytest.raises(RuntimeError, match="capturable is False"):
            with torch.cuda.graph(graph):
                plain.step()


@pytest.mark.parametrize("backend", CPU_CAPTURABLE)
def test_opcheck(backend):
    """The capturable op passes torch.library.opcheck (schema, mutation, fake function) with
    every optional device value given."""
    ps = _params()
    args = (ps, _grads(0, ps, 2.0), *[[torch.rand_like(p) for p in ps] for _ in range(3)],
            [torch.full((), 3.0) for _ in ps], torch.tensor(1e-2), torch.tensor(2.0),
            torch.tensor(0.0))
    kwargs = dict(lr=0.0, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1, l1=0.1,
                  l1_lr_scaled=True, amsgrad=True, maximize=False, decoupled=True)
    torch.library.opcheck(backends.implementation(CAPTURABLE, backend), args, kwargs)


@pytest.mark.parametrize("backend", CPU_CAPTURABLE)
def test_integer_lr_tensor_and_switching_capturable(backend):
    """An integer lr tensor (torch accepts one) is read as float32; capturable switched on
    after some non-capturable steps keeps the counts and continues as the host step does."""
    ps, qs = _params(), _params()
    opt = fo.AdamW(ps, lr=1e-2)
    ref = fo.AdamW(qs, lr=1e-2)
    _run(opt, ps, 2, backend)
    _run(ref, qs, 2, backend)
    opt.param_groups[0]["capturable"] = True
    _run(opt, ps, 2, backend)
    _run(ref, qs, 2, backend)
    _same(ps, qs, **_tol(backend))
    assert all(float(opt.state[p]["step"]) == 4.0 for p in ps)
    zs = _params()
    zero = fo.AdamW(zs, lr=torch.tensor(0), weight_decay=0.5, capturable=True)
    before = [z.detach().clone() for z in zs]
    _run(zero, zs, 2, backend)
    _same(zs, before, atol=0.0, rtol=0.0)  # lr = 0: nothing moves
