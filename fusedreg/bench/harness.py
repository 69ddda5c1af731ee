"""Timing, bandwidth and result rows shared by every benchmark module.

A benchmark module ``fusedreg/bench/<op>.py`` defines::

    OP = "bias_dropout"                       # name used by --ops
    def benchmark(ctx: Context) -> list[Row]  # times fusedreg and its baselines

and times each candidate with ``ctx.time(fn)``; ``ctx.row(...)`` turns a timing and a byte
count into a Row with GB/s and the fraction of the copy bandwidth measured in the same run.
Speedups are filled in by the driver from rows of the same (op, case, dtype, pass).
"""
from __future__ import annotations

import dataclasses
import statistics
import time
from typing import Callable

import torch

from .. import backends


@dataclasses.dataclass
class Timing:
    median_ms: float
    p10_ms: float
    p90_ms: float
    reps: int


@dataclasses.dataclass
class Row:
    op: str          # "bias_dropout", "layer_norm", "adamw", ...
    case: str        # shape or problem description, e.g. "8192x1024 p=0.1"
    dtype: str       # "float32", "bfloat16", ...
    impl: str        # "fusedreg[cpu]", "torch eager", "torch.compile", "liger", ...
    pass_: str       # "fwd", "bwd", "fwd+bwd", "step"
    median_ms: float
    p10_ms: float
    p90_ms: float
    bytes: int       # minimal bytes moved (read + written) for this pass
    gbps: float
    frac_copy_bw: float
    saved_bytes: int | None = None  # bytes saved for backward, where it applies
    note: str = ""
    speedup: dict = dataclasses.field(default_factory=dict)  # baseline impl -> ratio


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_fn(fn: Callable[..., object], device: torch.device, *, min_reps: int = 5,
            max_reps: int = 200, budget_s: float = 1.0, warmup: int = 2,
            setup: Callable[[], object] | None = None) -> Timing:
    """Median and spread of ``fn()`` wall time (CUDA: events), within a time budget.

    With ``setup``, each repetition first runs ``arg = setup()`` untimed and then times
    ``fn(arg)`` (e.g. a fresh forward graph, then only its backward)."""
    call = (lambda: fn(setup())) if setup is not None else fn
    for _ in range(warmup):
        call()
    _sync(device)
    times = []
    t_end = time.perf_counter() + budget_s
    while len(times) < max_reps and (len(times) < min_reps or time.perf_counter() < t_end):
        if setup is not None:
            arg = setup()
            _sync(device)
            run = lambda: fn(arg)
        else:
            run = fn
        if device.type == "cuda":
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            run()
            stop.record()
            stop.synchronize()
            times.append(start.elapsed_time(stop))
        else:
            t0 = time.perf_counter()
            run()
            times.append((time.perf_counter() - t0) * 1e3)
        del run
    times.sort()
    # "inclusive": percentiles within the observed range (the default extrapolates, and a
    # p10 below the fastest run, even negative, can come out of a handful of noisy samples)
    q = statistics.quantiles(times, n=10, method="inclusive") if len(times) >= 2 else [times[0]] * 9
    return Timing(statistics.median(times), q[0], q[-1], len(times))


def measure_copy_bandwidth(device: torch.device, nbytes: int | None = None) -> float:
    """Device copy bandwidth in GB/s, counting bytes read + written (``dst.copy_(src)``)."""
    if nbytes is None:
        nbytes = (1 << 30) if device.type == "cuda" else (256 << 20)
    n = nbytes // 4
    src = torch.ones(n, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    t = time_fn(lambda: dst.copy_(src), device, min_reps=5, budget_s=1.0)
    return 2 * n * 4 / (t.median_ms * 1e-3) / 1e9


@dataclasses.dataclass
class Context:
    device: torch.device
    dtypes: list            # torch dtypes to run
    quick: bool             # fewer, smaller cases
    copy_gbps: float        # measured by the driver before any benchmark
    budget_s: float = 1.0   # timing budget per measurement
    sizes: list | None = None  # --sizes override (meaning is per op), None = op's defaults

    def time(self, fn: Callable[..., object], setup: Callable[[], object] | None = None) -> Timing:
        """Times ``fn()``, or ``fn(setup())`` with ``setup`` untimed (see ``time_fn``)."""
        return time_fn(fn, self.device, budget_s=self.budget_s * (0.3 if self.quick else 1.0),
                       setup=setup)

    def row(self, op, case, dtype, impl, pass_, timing: Timing, nbytes: int, **extra) -> Row:
        gbps = nbytes / (timing.median_ms * 1e-3) / 1e9
        return Row(op, case, str(dtype).replace("torch.", ""), impl, pass_, timing.median_ms,
                   timing.p10_ms, timing.p90_ms, int(nbytes), gbps, gbps / self.copy_gbps, **extra)


def fused_backends(op: str, device: torch.device) -> list[str]:
    """The fused backends that can serve ``op`` on ``device`` (never the Triton interpreter
    on CPU: it is a test vehicle, not a CPU implementation)."""
    wanted = ("cpu",) if device.type == "cpu" else ("cuda", "triton")
    return [b for b in backends.implemented_backends(op, device.type) if b in wanted]
