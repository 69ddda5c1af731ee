"""Backend dispatch: the registry, status, explicit choices (per thread), the environment
variable and auto."""
import os
import subprocess
import sys
import threading

import pytest
import torch

import fusedreg
from fusedreg import backends

OPS = ("bias_dropout", "layer_norm", "batch_norm", "adam", "sgd", "lion")


def test_status_agrees_with_what_the_machine_has():
    status = fusedreg.backend_status()
    assert list(status) == list(fusedreg.BACKENDS)
    assert status["reference"] == "available"
    for name, why in status.items():
        assert why == "available" or len(why) > 10, (name, why)
        assert (name in fusedreg.available_backends()) == (why == "available")
    # each reason follows from the build and the machine, not from where the test runs
    assert (status["cpu"] == "available") == backends.extension_available()
    cuda_ok = backends.extension_available(with_cuda=True) and torch.cuda.is_available()
    assert (status["cuda"] == "available") == cuda_ok
    assert (status["triton"] == "available") == (
        backends.triton_available() and (torch.cuda.is_available() or backends.triton_interpreter()))


@pytest.mark.parametrize("op", OPS)
def test_every_op_is_registered_for_every_backend_this_build_has(op):
    """reference always; cpu with the extension; cuda with its CUDA kernels; triton when it
    is installed. Each implementation is what the op's module registered, and nothing else
    answers for it."""
    expected = {"reference"}
    if backends.extension_available():
        expected.add("cpu")
    if backends.extension_available(with_cuda=True):
        expected.add("cuda")
    if backends.triton_available():
        expected.add("triton")
    got = set(backends.registered_backends(op))
    assert got == expected
    for b in expected:
        impl = backends.implementation(op, b)
        parts = impl if isinstance(impl, tuple) else (impl,)
        names = getattr(impl, "_fields", range(len(parts)))
        optional = getattr(type(impl), "_field_defaults", {})  # a backend-specific extra op
        assert all(callable(f) or (f is None and n in optional) for n, f in zip(names, parts))
    usable_cpu = backends.implemented_backends(op, "cpu")
    assert usable_cpu[0] == "reference" and "cuda" not in usable_cpu


def test_unknown_op_and_missing_backend_raise_with_the_reason():
    with pytest.raises(ValueError, match="unknown op 'nope'"):
        backends.implementation("nope", "reference")
    if not backends.extension_available(with_cuda=True):
        with pytest.raises(fusedreg.BackendUnavailableError, match="no cuda implementation"):
            backends.implementation("bias_dropout", "cuda")


def test_use_backend_restores_previous_choice():
    fusedreg.set_backend("reference")
    with fusedreg.use_backend("auto"):
        assert fusedreg.get_backend() == "auto"
        with pytest.raises(ValueError):
            with fusedreg.use_backend("nope"):
                pass
        assert fusedreg.get_backend() == "auto"
    assert fusedreg.get_backend() == "reference"


def test_use_backend_blocks_in_two_threads_do_not_see_each_other():
    """Two threads enter and leave blocks in an interleaved order (A enters, B enters, A
    leaves, B leaves): each sees only its own choice, and the default is back after both."""
    fusedreg.set_backend("auto")
    steps = [threading.Event() for _ in range(4)]
    seen = {}

    def worker(name, backend, enter_after, enter_done, leave_after, leave_done):
        if enter_after is not None:
            steps[enter_after].wait(5)
        with fusedreg.use_backend(backend):
            seen[name, "inside"] = fusedreg.get_backend()
            steps[enter_done].set()
            steps[leave_after].wait(5)
            seen[name, "before leaving"] = fusedreg.get_backend()
        seen[name, "after"] = fusedreg.get_backend()
        steps[leave_done].set()

    a = threading.Thread(target=worker, args=("A", "reference", None, 0, 1, 2))
    b = threading.Thread(target=worker, args=("B", "cpu" if "cpu" in fusedreg.available_backends()
                                              else "reference", 0, 1, 2, 3))
    a.start(), b.start()
    a.join(10), b.join(10)
    b_choice = "cpu" if "cpu" in fusedreg.available_backends() else "reference"
    assert seen["A", "inside"] == seen["A", "before leaving"] == "reference"
    assert seen["B", "inside"] == seen["B", "before leaving"] == b_choice
    assert seen["A", "after"] == seen["B", "after"] == "auto"
    assert fusedreg.get_backend() == "auto"


def test_a_block_in_another_thread_does_not_change_this_threads_calls():
    if "cpu" not in fusedreg.available_backends():
        pytest.skip("needs the cpu backend as the auto choice")
    inside, release = threading.Event(), threading.Event()

    def other():
        with fusedreg.use_backend("reference"):
            inside.set()
            release.wait(5)

    t = threading.Thread(target=other)
    t.start()
    inside.wait(5)
    try:
        assert backends.resolve("bias_dropout", torch.device("cpu")) == "cpu"
    finally:
        release.set()
        t.join(10)


def test_auto_never_picks_reference_when_cpu_kernels_are_built():
    expected = "cpu" if "cpu" in fusedreg.available_backends() else "reference"
    for op in OPS:
        assert backends.resolve(op, torch.device("cpu")) == expected


def test_explicit_backend_on_wrong_device_is_refused():
    if "cpu" not in fusedreg.available_backends():
        pytest.skip("cpu backend not built")
    fusedreg.set_backend("cpu")
    with pytest.raises(fusedreg.BackendUnavailableError, match="CPU tensors"):
        backends.resolve("bias_dropout", torch.device("meta"))


def test_the_resolution_cache_follows_the_choice():
    """resolve() caches per (op, device type, choice): a new choice is a new answer."""
    cpu = torch.device("cpu")
    with fusedreg.use_backend("reference"):
        assert backends.resolve("layer_norm", cpu) == "reference"
    auto = backends.resolve("layer_norm", cpu)
    assert auto == ("cpu" if "cpu" in fusedreg.available_backends() else "reference")
    with fusedreg.use_backend("reference"):
        assert backends.resolve("layer_norm", cpu) == "reference"


def _run_python(code, **env):
    full_env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "FUSEDREG_BACKEND")}
    full_env.update(env)
    return subprocess.run([sys.executable, "-c", code], env=full_env, capture_output=True, text=True,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_env_variable_selects_backend():
    res = _run_python("import fusedreg; print(fusedreg.get_backend())", FUSEDREG_BACKEND="reference")
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "reference"
    res = _run_python("import fusedreg", FUSEDREG_BACKEND="bogus")
    assert res.returncode != 0 and "unknown backend" in res.stderr


def test_triton_needs_interpreter_or_gpu():
    code = ("import fusedreg, torch; from fusedreg import backends; "
            "print(torch.cuda.is_available(), backends.triton_available(), "
            "fusedreg.backend_status()['triton'])")
    res = _run_python(code)
    assert res.returncode == 0, res.stderr
    gpu, installed, status = res.stdout.strip().split(" ", 2)
    if installed == "False":
        assert "not installed" in status
    elif gpu == "False":
        assert "TRITON_INTERPRET" in status
    else:
        assert status == "available"
    res = _run_python(code, TRITON_INTERPRET="1")
    assert res.returncode == 0, res.stderr
    gpu, installed, status = res.stdout.strip().split(" ", 2)
    assert status == "available" if installed == "True" else "not installed" in status


def test_torch_compile_follows_the_choice():
    """A compiled call runs the backend chosen where it is called: the process default, and
    (torch >= 2.14, whose Dynamo traces ContextVar.get) a use_backend block around it."""
    from fusedreg import functional as F

    seen = []

    def record(gm, example_inputs):
        seen.append({str(n.target) for n in gm.graph.nodes if n.op == "call_function"})
        return gm.forward

    torch._dynamo.reset()
    f = torch.compile(lambda x: F.layer_norm(x, (8,)), fullgraph=True, backend=record)
    x = torch.randn(2, 8)
    auto = backends.resolve("layer_norm", x.device)
    if auto == "reference":
        pytest.skip("needs a fused CPU backend as the auto choice")
    f(x)
    fusedreg.set_backend("reference")
    f(x)
    fusedreg.set_backend("auto")
    with fusedreg.use_backend("reference"):
        f(x)
    ops = [{t for t in s if "fusedreg" in t} for s in seen]
    suffix = {"reference": "_reference", "cpu": "", "triton": "_triton"}
    assert ops[0] == {f"fusedreg.layer_norm_fwd{suffix[auto]}.default"}
    assert ops[1] == {"fusedreg.layer_norm_fwd_reference.default"}
    if backends._COMPILE_SEES_SCOPED:
        assert len(ops) == 3 and ops[2] == ops[1]
    else:  # the process default (auto) serves it: the first graph is reused
        assert len(ops) == 2 or ops[2] == ops[0]


# ---- auto: small plain norms are torch's own op (AUTO_TORCH_BELOW) -----------------------------

@pytest.fixture
def fused_calls():
    """The calls that reach layer_norm's forward kernel in the backend auto picks on CPU (the
    registered implementation is wrapped with a counter for the test)."""
    auto = backends.resolve("layer_norm", torch.device("cpu"))
    impl = backends.implementation("layer_norm", auto)
    calls = []

    def fwd(*args, **kwargs):
        calls.append(auto)
        return impl.fwd(*args, **kwargs)

    backends.register("layer_norm", auto, type(impl)(fwd, impl.bwd))
    try:
        yield calls
    finally:
        backends.register("layer_norm", auto, impl)


def _small_norm_cases(dtype=torch.float32):
    x = torch.randn(3, 8, dtype=dtype) * 3 + 1
    w, b = torch.randn(8, dtype=dtype), torch.randn(8, dtype=dtype)
    return [  # (name, fusedreg call, torch call, (x, w, b))
        ("layer_norm", lambda F, x, w, b: F.layer_norm(x, (8,), w, b, 1e-5), (x, w, b)),
        ("layer_norm no affine", lambda F, x, w, b: F.layer_norm(x, (8,)), (x, w, b)),
        # normalized_shape as models' own norms pass it: weight.shape (a torch.Size), a list
        ("layer_norm Size", lambda F, x, w, b: F.layer_norm(x, w.shape, w, b, 1e-5), (x, w, b)),
        ("layer_norm list", lambda F, x, w, b: F.layer_norm(x, [8], w, b, 1e-5), (x, w, b)),
        ("rms_norm", lambda F, x, w, b: F.rms_norm(x, (8,), w), (x, w, b)),
    ]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_auto_serves_small_plain_norms_with_torchs_op(fused_calls, dtype):
    """Under auto: what torch's op returns, bit for bit, with torch's autograd (its gradients,
    double backward included); rms_norm stays fused (its limits are 0). Under the
    same backend named explicitly, the fused kernel runs."""
    from fusedreg import functional as F
    import torch.nn.functional as TF

    auto = backends.resolve("layer_norm", torch.device("cpu"))
    for name, call, (x, w, b) in _small_norm_cases(dtype):
        # with grad
        ours_in = [t.clone().requires_grad_() for t in (x, w, b)]
        theirs_in = [t.clone().requires_grad_() for t in (x, w, b)]
        y, ref = call(F, *ours_in), call(TF, *theirs_in)
        if name == "rms_norm":  # the fused kernel (the counter's Function: see fused_calls)
            assert type(y.grad_fn).__name__ == "LayerNormFunctionBackward", name
            torch.testing.assert_close(y, ref)
        else:
            assert torch.equal(y, ref), name
            assert "LayerNormFunction" not in type(y.grad_fn).__name__, name
            dy = torch.randn_like(y)
            g = torch.autograd.grad(y, ours_in, dy, allow_unused=True)
            gref = torch.autograd.grad(ref, theirs_in, dy, allow_unused=True)
            for a, c in zip(g, gref):
                assert (a is None) == (c is None) and (a is None or torch.equal(a, c)), name
        # without grad: layer_norm is torch's op, rms_norm the fused kernel
        with torch.no_grad():
            before = len(fused_calls)
            y = call(F, x, w, b)
            torch.testing.assert_close(y, call(TF, x, w, b))
            assert len(fused_calls) - before == (1 if name == "rms_norm" else 0), name
    assert fused_calls == [auto, auto]  # the rms_norm calls (with and without grad), nothing else
    with fusedreg.use_backend(auto):
        for name, call, (x, w, b) in _small_norm_cases(dtype):
            before = len(fused_calls)
            y = call(F, *[t.clone().requires_grad_() for t in (x, w, b)])
            assert type(y.grad_fn).__name__ == "LayerNormFunctionBackward", name
            assert len(fused_calls) == before + 1, name


def test_auto_runs_the_fused_kernel_from_the_limit_up(fused_calls, monkeypatch):
    """The limit is a number of elements, per norm and per grad mode; the table is read at
    call time."""
    from fusedreg import functional as F

    monkeypatch.setitem(backends.AUTO_TORCH_BELOW, "layer_norm", {"cpu": (32, 16)})
    w = torch.randn(8)
    F.layer_norm(torch.randn(3, 8), (8,), w)                         # 24 < 32: torch
    assert fused_calls == []
    F.layer_norm(torch.randn(4, 8), (8,), w)                         # 32: fused
    assert len(fused_calls) == 1
    F.layer_norm(torch.randn(3, 8, requires_grad=True), (8,), w)     # with grad, 24 >= 16
    assert len(fused_calls) == 2
    monkeypatch.setitem(backends.AUTO_TORCH_BELOW, "layer_norm", {"cpu": (0, 0)})
    F.layer_norm(torch.randn(1, 8), (8,), w)
    assert len(fused_calls) == 3


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_auto_limits_follow_the_thread_count(fused_calls, monkeypatch, dtype):
    """An entry's "cpu:1" limits hold when torch runs one thread and its "cpu" limits with more
    (backends.table_limits, read at call time): a call between the two is the fused kernel's at
    one count and torch's op at the other, with and without grad, for float32 and for the
    half-precision entry."""
    from fusedreg import functional as F

    name = "layer_norm" if dtype == torch.float32 else "layer_norm_half"
    monkeypatch.setitem(backends.AUTO_TORCH_BELOW, name, {"cpu": (100, 100), "cpu:1": (10, 10)})
    w = torch.randn(8, dtype=dtype)
    threads = torch.get_num_threads()
    try:
        for n_threads, fused in ((1, True), (2, False), (1, True)):
            torch.set_num_threads(n_threads)
            assert backends.table_limits(name, "cpu") == ((10, 10) if n_threads == 1 else (100, 100))
            for grad in (False, True):
                before = len(fused_calls)
                x = torch.randn(4, 8, dtype=dtype, requires_grad=grad)      # 32 elements
                y = F.layer_norm(x, (8,), w)
                assert len(fused_calls) == before + fused, (n_threads, grad)
                if not fused and grad:
                    assert type(y.grad_fn).__name__ == "NativeLayerNormBackward0"
    finally:
        torch.set_num_threads(threads)
    monkeypatch.setitem(backends.AUTO_TORCH_BELOW, name, {"cpu": (100, 100)})
    torch.set_num_threads(1)
    try:
        assert backends.table_limits(name, "cpu") == (100, 100)  # no "cpu:1": the "cpu" limits
    finally:
        torch.set_num_threads(threads)


def test_auto_small_norm_route_is_eager_only(fused_calls):
    """Calls the quick predicate does not take (a list for normalized_shape, a Parameter as x,
    bfloat16) still reach torch's op after the full checks; a dropout_add_layer_norm (even
    without dropout and residual), a jit trace and a torch.func transform never do."""
    from fusedreg import functional as F
    import torch.nn.functional as TF

    x, w, b = torch.randn(3, 8), torch.randn(8), torch.randn(8)
    for args in [(x, [8], w, b), (torch.nn.Parameter(x), (8,), w, b),
                 (x.bfloat16(), (8,), w.bfloat16(), b.bfloat16())]:
        assert torch.equal(F.layer_norm(*args), TF.layer_norm(*args))
    assert torch.equal(F.layer_norm(x, 8, w, b), TF.layer_norm(x, (8,), w, b))  # an int: fusedreg's
    assert fused_calls == []
    F.dropout_add_layer_norm(x, None, w, b, p=0.0)
    assert len(fused_calls) == 1
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit is deprecated in torch 2.14
        traced = torch.jit.trace(lambda x: F.layer_norm(x, (8,), w, b), x)
    assert "LayerNormFunction" in str(traced.graph) and "aten::layer_norm" not in str(traced.graph)
    before = len(fused_calls)
    g = torch.func.grad(lambda x: F.layer_norm(x, (8,), w, b).square().sum())(x)
    torch.testing.assert_close(g, torch.func.grad(lambda x: TF.layer_norm(x, (8,), w, b).square().sum())(x))
    assert len(fused_calls) == before  # the differentiable composite, not torch's op either


@pytest.mark.parametrize("shape_of", [tuple, list, torch.Size], ids=["tuple", "list", "Size"])
def test_small_norm_takes_the_short_path_for_each_shape_form(monkeypatch, shape_of):
    """A small plain norm under auto skips fusedreg's full checks (torch's op checks the
    rest) whatever form normalized_shape has: models' own norms pass ``self.weight.shape``.
    The full path is made to fail here, so a call that reaches it fails the test."""
    from fusedreg import functional as F

    def full_path(*args, **kwargs):
        raise AssertionError("the small call went through the full checks")

    monkeypatch.setattr(F, "_norm", full_path)
    x, w, b = torch.randn(3, 8, requires_grad=True), torch.randn(8), torch.randn(8)
    y = F.layer_norm(x, shape_of((8,)), w, b)
    torch.testing.assert_close(y, torch.nn.functional.layer_norm(x, (8,), w, b), rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_auto_serves_half_layer_norm_with_torchs_op(fused_calls, monkeypatch, dtype):
    """float16/bfloat16 layer_norm under auto on CPU is torch's op below its limit
    (AUTO_TORCH_BELOW["layer_norm_half"]): torch's result bit for bit, torch's gradients; with
    a float32 weight and bias too (torch's mixed rule); under CPU autocast, with the backend
    named, and from the limit up, the fused path runs."""
    from fusedreg import functional as F
    import torch.nn.functional as TF

    x = (torch.randn(64, 96) * 3 + 1).to(dtype)
    for wdt in (dtype, torch.float32):
        w, b = torch.randn(96, dtype=wdt), torch.randn(96, dtype=wdt)
        ours = [t.clone().requires_grad_() for t in (x, w, b)]
        theirs = [t.clone().requires_grad_() for t in (x, w, b)]
        y, ref = F.layer_norm(ours[0], (96,), ours[1], ours[2]), TF.layer_norm(theirs[0], (96,), theirs[1], theirs[2])
        assert y.dtype == ref.dtype == dtype and torch.equal(y, ref)
        dy = torch.randn_like(y)
        for a, c in zip(torch.autograd.grad(y, ours, dy), torch.autograd.grad(ref, theirs, dy)):
            assert torch.equal(a, c)
    assert fused_calls == []
    with torch.autocast("cpu", dtype=torch.bfloat16):
        F.layer_norm(x, (96,), w, b)
    with fusedreg.use_backend(backends.resolve("layer_norm", torch.device("cpu"))):
        F.layer_norm(x, (96,), w, b)
    assert len(fused_calls) == 2
    limit = backends.table_limits("layer_norm_half", "cpu")
    assert x.numel() < min(limit)  # the calls above were below it
    monkeypatch.setitem(backends.AUTO_TORCH_BELOW, "layer_norm_half", {"cpu": (x.numel(), x.numel())})
    F.layer_norm(x, (96,), w, b)
    assert len(fused_calls) == 3
