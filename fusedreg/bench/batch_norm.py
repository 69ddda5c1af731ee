"""batch_norm benchmark: BatchNorm in training (forward, backward, forward+backward), fused
with a residual add and ReLU (ResNet's ``relu(bn(x) + identity)``), BatchNorm in eval
(forward: one pass with the running stats folded into a scale and shift), and a timm
resnet18 training step and eval forward (no_grad, running stats moved off their initial
values) with its BatchNorms swapped to fusedreg's, in each dtype benchmarked (the model
converted to it; the runs interleaved round by round in a shuffled order, medians). fusedreg (every fused
backend usable on the device) against eager torch and ``torch.compile`` of the eager
expression.

Cases: ResNet shapes 32x64x56x56 and 32x256x14x14 (--quick: batch 8), NCHW and
channels_last. ``--sizes NxCxHxW,...`` overrides them.

Minimal bytes (GB/s and % of copy bandwidth use them; per-channel vectors are negligible):
  batch_norm       fwd: read x, write y                 2 n     bwd: read dy, x, write dx   3 n
  batch_norm_act   fwd: read x, residual, write y       3 n     bwd: read dy, x, write dx,
  (relu, +res)                                                  dresidual                  4 n
  batch_norm_eval  fwd: read x, write y                 2 n
(training forward reads x twice, statistics then output: its % of copy bandwidth is at most
~67% by this count; the eval pass is the one the streaming limit applies to.)
Backward alone is timed on one retained forward graph; where that is impossible
(torch.compile's donated buffers) it is reported as fwd+bwd minus fwd.
"""
from __future__ import annotations

import copy
import math
import random
import statistics
import time

import torch
import torch.nn.functional as F

import fusedreg

from .harness import Context, Row, Timing, fused_backends

OP = "batch_norm"

_SIZES = {False: [(32, 64, 56, 56), (32, 256, 14, 14)], True: [(8, 64, 56, 56), (8, 256, 14, 14)]}
LAYOUTS = ("nchw", "channels_last")


def _sizes(ctx: Context):
    if ctx.sizes:
        for s in ctx.sizes:
            if len(s) != 4:
                raise ValueError(f"batch_norm sizes are NxCxHxW, got {'x'.join(map(str, s))}")
        return [tuple(s) for s in ctx.sizes]
    return _SIZES[ctx.quick]


def _fused(variant):
    """fusedreg's call; the caller scopes the backend around the timing (fusedreg.use_backend)."""
    def fn(x, r, w, b, rm, rv):
        if variant == "batch_norm":
            return fusedreg.functional.batch_norm(x, rm, rv, w, b, True)
        if variant == "batch_norm_act":
            return fusedreg.functional.batch_norm_act(x, rm, rv, w, b, True,
                                                      activation="relu", residual=r)
        return fusedreg.functional.batch_norm(x, rm, rv, w, b, False)
    return fn


def _eager(variant):
    def fn(x, r, w, b, rm, rv):
        if variant == "batch_norm":
            return F.batch_norm(x, rm, rv, w, b, True)
        if variant == "batch_norm_act":
            return torch.relu(F.batch_norm(x, rm, rv, w, b, True) + r)
        return F.batch_norm(x, rm, rv, w, b, False)
    return fn


def _nan_rows(ctx, case, dtype, impl, nbytes, note):
    nan = Timing(math.nan, math.nan, math.nan, 0)
    return [ctx.row(OP, case, dtype, impl, pass_, nan, nbytes[pass_], note=note) for pass_ in nbytes]


def _measure(ctx, case, dtype, impl, fn, inputs, grad, nbytes, note=""):
    if "bwd" not in nbytes:  # eval: forward only
        with torch.no_grad():
            return [ctx.row(OP, case, dtype, impl, "fwd", ctx.time(lambda: fn(*inputs)), nbytes["fwd"],
                            note=note)]
    diff = [t for t in inputs if t is not None and t.requires_grad]
    grad_of = lambda out, **kw: torch.autograd.grad(out, diff, grad, **kw)  # noqa: E731
    fwd = ctx.time(lambda: fn(*inputs))
    both = ctx.time(lambda: grad_of(fn(*inputs)))
    try:
        out = fn(*inputs)
        bwd = ctx.time(lambda: grad_of(out, retain_graph=True))
    except RuntimeError:  # e.g. torch.compile's donated buffers
        d = both.median_ms - fwd.median_ms
        bwd = Timing(d, d, d, 0)
        note = "; ".join(filter(None, [note, "bwd = fwd+bwd - fwd"]))
    return [ctx.row(OP, case, dtype, impl, pass_, t, nbytes[pass_], note=note)
            for pass_, t in (("fwd", fwd), ("bwd", bwd), ("fwd+bwd", both))]


def _case(ctx, variant, shape, layout, dtype, fused) -> list[Row]:
    case = "x".join(map(str, shape)) + f" {layout}" + {"batch_norm": "", "batch_norm_act": " relu+res",
                                                        "batch_norm_eval": " eval"}[variant]
    gen = torch.Generator(device=ctx.device).manual_seed(0)
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format

    def make(*s, grad=True, param=False):
        t = torch.randn(*s, generator=gen, device=ctx.device) + 0.5
        t = t.to(torch.float32 if param else dtype)
        if len(s) == 4:
            t = t.contiguous(memory_format=fmt)
        return t.requires_grad_(grad and variant != "batch_norm_eval")

    C = shape[1]
    x = make(*shape)
    r = make(*shape) if variant == "batch_norm_act" else None
    w, b = make(C, param=True), make(C, param=True)
    rm, rv = torch.zeros(C, device=ctx.device), torch.ones(C, device=ctx.device)
    inputs = (x, r, w, b, rm, rv)
    grad = make(*shape, grad=False)
    n = math.prod(shape) * x.element_size()
    nbytes = {"batch_norm": {"fwd": 2 * n, "bwd": 3 * n, "fwd+bwd": 5 * n},
              "batch_norm_act": {"fwd": 3 * n, "bwd": 4 * n, "fwd+bwd": 7 * n},
              "batch_norm_eval": {"fwd": 2 * n}}[variant]

    def measure(impl, fn, note=""):
        try:
            return _measure(ctx, case, dtype, impl, fn, inputs, grad, nbytes, note)
        except Exception as e:  # one broken candidate must not hide the others
            return _nan_rows(ctx, case, dtype, impl, nbytes, f"failed: {type(e).__name__}: {_first_line(e)}")

    rows = []
    for backend in fused or ["reference"]:
        with fusedreg.use_backend(backend):  # around the timing, not inside each timed call
            rows += measure(f"fusedreg[{backend}]", _fused(variant),
                            "" if fused else "no fused backend built for this device")
    eager = _eager(variant)
    rows += measure("torch eager", eager)
    torch._dynamo.reset()
    compiled = torch.compile(eager, dynamic=False)
    try:
        t0 = time.perf_counter()
        if variant == "batch_norm_eval":
            with torch.no_grad():
                compiled(*inputs)
        else:
            torch.autograd.grad(compiled(*inputs), [t for t in inputs if t is not None and t.requires_grad], grad)
        note = f"compiled in {time.perf_counter() - t0:.0f} s"
    except Exception as e:  # compile needs a working toolchain: skip, say why
        return rows + _nan_rows(ctx, case, dtype, "torch.compile", nbytes,
                                f"torch.compile failed: {type(e).__name__}: {_first_line(e)}")
    return rows + measure("torch.compile", compiled, note)


def _train_step_rows(ctx, dtype, fused, train=True) -> list[Row]:
    """A timm resnet18 training step (SGD) — or, with ``train`` False, its eval forward under
    no_grad (inference) — unpatched and with its BatchNorms swapped to fusedreg's by class
    (fusedreg.nn.batchnorm_patch_targets), the model converted to ``dtype`` (parameters,
    buffers and input, as ``model.to(dtype)`` does)."""
    try:
        import timm
    except ImportError:
        return []
    batch = 8 if ctx.quick or ctx.device.type == "cpu" else 64
    size = 64 if ctx.device.type == "cpu" else 224
    case = f"timm resnet18 {'train step' if train else 'eval no_grad'} {batch}x3x{size}x{size}"
    torch.manual_seed(0)
    base = timm.create_model("resnet18", pretrained=False, num_classes=10).to(ctx.device, dtype)
    x = torch.randn(batch, 3, size, size, device=ctx.device, dtype=dtype)
    y = torch.randint(0, 10, (batch,), device=ctx.device)
    if not train:  # running stats away from their initial (0, 1), as a trained model's
        with torch.no_grad():
            base.train()
            for _ in range(3):
                base(x)
        base.eval()
    targets = fusedreg.nn.batchnorm_patch_targets()
    rows = []
    # fusedreg[auto]: what fusedreg.patch gives by default (small BatchNorms are torch's op)
    impls = [("torch eager", None)] + [(f"fusedreg[{b}]", b) for b in fused]
    impls += [("fusedreg[auto]", "auto")] if fused else []
    steps = {}
    for impl, backend in impls:
        model = copy.deepcopy(base)
        if backend is not None:
            for m in model.modules():
                if type(m) in targets:
                    m.__class__ = targets[type(m)]
        opt = torch.optim.SGD(model.parameters(), lr=1e-3)

        def step(model=model, opt=opt, backend=backend):
            with fusedreg.use_backend(backend or "auto"):
                opt.zero_grad(set_to_none=True)
                F.cross_entropy(model(x).float(), y).backward()
                opt.step()

        def infer(model=model, backend=backend):
            with fusedreg.use_backend(backend or "auto"), torch.no_grad():
                model(x)
        steps[impl] = step if train else infer
    timings = _interleaved(ctx, steps)
    return [ctx.row(OP, case, dtype, impl, "step" if train else "fwd", timings[impl], 0)
            for impl in steps]


def _interleaved(ctx: Context, steps: dict) -> dict:
    """{name: Timing} of the step functions timed in rounds, one call of each per round in an
    order shuffled every round (seeded): each is timed under the same machine state as the
    others, where timing one after the other lets the state (other tenants' load, the
    caches, the clock) drift between them, and a fixed order favours a position. As many
    rounds as the budget allows (5 to 60), after two warm-up calls of each."""
    sync = torch.cuda.synchronize if ctx.device.type == "cuda" else (lambda: None)

    def timed(fn):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        return time.perf_counter() - t0

    for fn in steps.values():
        fn()
    one_round = sum(timed(fn) for fn in steps.values())
    budget = ctx.budget_s * (0.3 if ctx.quick else 1.0) * len(steps)
    rounds = max(5, min(60, int(budget / max(one_round, 1e-9))))
    times = {name: [] for name in steps}
    order = list(steps)
    shuffle = random.Random(0).shuffle
    for _ in range(rounds):
        shuffle(order)
        for name in order:
            times[name].append(timed(steps[name]) * 1e3)
    out = {}
    for name, t in times.items():
        q = statistics.quantiles(t, n=10, method="inclusive")
        out[name] = Timing(statistics.median(t), max(q[0], min(t)), q[-1], len(t), min(t))
    return out


def benchmark(ctx: Context) -> list[Row]:
    rows = []
    fused = fused_backends(OP, ctx.device)
    for dtype in ctx.dtypes:
        for shape in _sizes(ctx):
            for layout in LAYOUTS:
                for variant in ("batch_norm", "batch_norm_act", "batch_norm_eval"):
                    rows += _case(ctx, variant, shape, layout, dtype, fused)
        if not ctx.sizes:
            rows += _train_step_rows(ctx, dtype, fused)
            rows += _train_step_rows(ctx, dtype, fused, train=False)
    return rows


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:120] if text else ""
