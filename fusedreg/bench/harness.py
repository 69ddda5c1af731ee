"""Timing, bandwidth and result rows shared by every benchmark module.

A benchmark module ``fusedreg/bench/<op>.py`` defines::

    OP = "bias_dropout"                       # name used by --ops
    def benchmark(ctx: Context) -> list[Row]  # times fusedreg and its baselines

and times each candidate with ``ctx.time(fn)``; ``ctx.row(...)`` turns a timing, a byte
count and the pass's access pattern (fusedreg/bench/limits.py) into a Row with GB/s and the
fraction of that pattern's limit, measured in the same run for operands of the same size.
Speedups are filled in by the driver from rows of the same (op, case, dtype, pass, mode).
"""
from __future__ import annotations

import dataclasses
import math
import statistics
import time
from typing import Callable

import torch

from .. import backends
from .limits import STREAM_COPY, Limits


@dataclasses.dataclass
class Timing:
    median_ms: float
    p10_ms: float
    p90_ms: float
    reps: int
    min_ms: float = math.nan


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
    frac_limit: float  # best-repetition GB/s / limit_gbps
    limit: str = ""    # the access pattern whose limit was used, e.g. "stream 2R1W"
    limit_gbps: float = math.nan
    saved_bytes: int | None = None  # bytes saved for backward, where it applies
    note: str = ""
    mode: str = "loop"  # "loop": repeated in this process; "steady": a fresh process per timing
    speedup: dict = dataclasses.field(default_factory=dict)  # baseline impl -> ratio
    min_ms: float = math.nan  # the fastest repetition (what frac_limit uses)
    pattern: object = None  # what ctx.row was given (to redo the row with another timing)
    array_bytes: int = 0


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _L2Flush:
    """Overwrites a buffer larger than the GPU's L2 before each timed repetition (as
    ``triton.testing.do_bench`` does), so that no rep reads its operands from the cache the
    previous one filled."""

    def __init__(self, device: torch.device):
        props = torch.cuda.get_device_properties(device)
        l2 = getattr(props, "L2_cache_size", 0) or (64 << 20)
        self.buffer = torch.empty(max(2 * l2, 256 << 20) // 4, dtype=torch.int32, device=device)

    def __call__(self):
        self.buffer.zero_()


_FLUSH: dict = {}
GPU_WARMUP_MS = 25.0  # at least this long of warm-up calls on a GPU (clocks, caches, autotune)


def time_fn(fn: Callable[..., object], device: torch.device, *, min_reps: int = 5,
            max_reps: int = 200, budget_s: float = 1.0, warmup: int = 2,
            setup: Callable[[], object] | None = None) -> Timing:
    """Median and spread of ``fn()`` wall time (CUDA: events), within a time budget.

    With ``setup``, each repetition first runs ``arg = setup()`` untimed and then times
    ``fn(arg)`` (e.g. a fresh forward graph, then only its backward). On a GPU the warm-up
    lasts at least GPU_WARMUP_MS and L2 is flushed (untimed) before every repetition."""
    call = (lambda: fn(setup())) if setup is not None else fn
    for _ in range(warmup):
        call()
    _sync(device)
    flush = None
    if device.type == "cuda":
        t0 = time.perf_counter()
        while (time.perf_counter() - t0) * 1e3 < GPU_WARMUP_MS:
            call()
            _sync(device)
        if device not in _FLUSH:
            _FLUSH[device] = _L2Flush(device)
        flush = _FLUSH[device]
    times = []
    t_end = time.perf_counter() + budget_s
    while len(times) < max_reps and (len(times) < min_reps or time.perf_counter() < t_end):
        if setup is not None:
            arg = setup()
            _sync(device)
            run = lambda: fn(arg)
        else:
            run = fn
        if flush is not None:
            flush()
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
    return summarize(times)


def summarize(times: list) -> Timing:
    times = sorted(times)
    # "inclusive": percentiles within the observed range (the default extrapolates, and a
    # p10 below the fastest run, even negative, can come out of a handful of noisy samples)
    q = statistics.quantiles(times, n=10, method="inclusive") if len(times) >= 2 else [times[0]] * 9
    return Timing(statistics.median(times), q[0], q[-1], len(times), times[0])


@dataclasses.dataclass
class Context:
    device: torch.device
    dtypes: list            # torch dtypes to run
    quick: bool             # fewer, smaller cases
    copy_gbps: float        # measured by the driver before any benchmark (stream 1R1W, 256 MB)
    budget_s: float = 1.0   # timing budget per measurement
    sizes: list | None = None  # --sizes override (meaning is per op), None = op's defaults
    sweep: bool = False     # --sweep: the op's size sweep (eager/torch baselines, no compile)
    sweep_max: bool = False  # --sweep-max: the sweep up to its largest sizes
    # A steady-state worker times one (op, case, impl, pass) only: see skip_case / wants.
    select_op: str | None = None
    select_case: str | None = None
    select: tuple | None = None  # (impl, pass)
    limits: Limits | None = None

    def __post_init__(self):
        if self.limits is None:
            self.limits = Limits(self.device, self._limit_time)

    def _limit_time(self, fn) -> float:
        t = time_fn(fn, self.device, min_reps=10, budget_s=0.25 * (0.3 if self.quick else 1.0))
        return t.min_ms

    def skip_case(self, op: str, case: str) -> bool:
        """True when this run times only another op or case (a steady-state worker)."""
        return (self.select_op is not None and op != self.select_op) or (
            self.select_case is not None and case != self.select_case)

    def wants(self, impl: str, pass_: str) -> bool:
        """False when this run times only another (impl, pass) (a steady-state worker)."""
        return self.select is None or self.select == (impl, pass_)

    def time(self, fn: Callable[..., object], setup: Callable[[], object] | None = None) -> Timing:
        """Times ``fn()``, or ``fn(setup())`` with ``setup`` untimed (see ``time_fn``)."""
        return time_fn(fn, self.device, budget_s=self.budget_s * (0.3 if self.quick else 1.0),
                       setup=setup)

    def limit(self, pattern, array_bytes: int, remeasure: bool = False) -> tuple[str, float]:
        """(label, GB/s) of the limit of ``pattern`` -- a Pattern, or a tuple of them for
        passes run one after the other (fwd+bwd: the limit time is the sum of theirs) --
        for arrays of ``array_bytes`` each."""
        patterns = pattern if isinstance(pattern, tuple) else (pattern,)
        get = self.limits.remeasure if remeasure else self.limits.get
        lims = [get(p, array_bytes) for p in patterns]
        moved = [p.arrays_moved * array_bytes for p in patterns]
        seconds = sum(b / (lim.gbps * 1e9) for b, lim in zip(moved, lims))
        label = " + ".join(f"{lim.pattern.label} ({lim.probe})" for lim in lims)
        return label, sum(moved) / seconds / 1e9

    def row(self, op, case, dtype, impl, pass_, timing: Timing, nbytes: int, *,
            pattern=None, array_bytes: int = 0, **extra) -> Row:
        """A Row; its fraction of the limit of ``pattern`` (see ``limit``) for arrays of
        ``array_bytes``. A result above the limit makes the limit be measured again (the
        better kept): a probe slowed by a noisy moment must not make a row exceed 100%.
        Without a pattern the pass is taken for a copy (stream 1R1W of nbytes / 2)."""
        if pattern is None:
            pattern, array_bytes = STREAM_COPY, max(1, int(nbytes) // 2)
        gbps = nbytes / (timing.median_ms * 1e-3) / 1e9
        # The fraction compares best with best: the op's fastest repetition with the limit
        # (the probes' fastest), the two least disturbed by whatever else the machine runs.
        best_ms = timing.min_ms if math.isfinite(timing.min_ms) else timing.median_ms
        best_gbps = nbytes / (best_ms * 1e-3) / 1e9
        label, lim = self.limit(pattern, array_bytes)
        for _ in range(3):
            if not (math.isfinite(best_gbps) and best_gbps > lim):
                break
            label, lim = self.limit(pattern, array_bytes, remeasure=True)
        if math.isfinite(best_gbps) and best_gbps > lim:  # said, not hidden
            extra["note"] = "; ".join(filter(None, [extra.get("note", ""),
                                                    "above the measured limit: the probes ran slower (noise)"]))
        return Row(op, case, str(dtype).replace("torch.", ""), impl, pass_, timing.median_ms,
                   timing.p10_ms, timing.p90_ms, int(nbytes), gbps, best_gbps / lim,
                   limit=label, limit_gbps=lim, min_ms=best_ms, pattern=pattern,
                   array_bytes=array_bytes, **extra)

    def retimed(self, row: Row, timing: Timing, mode: str) -> Row:
        """``row`` with another timing of the same pass (e.g. the steady-state one)."""
        new = self.row(row.op, row.case, row.dtype, row.impl, row.pass_, timing, row.bytes,
                       pattern=row.pattern, array_bytes=row.array_bytes,
                       saved_bytes=row.saved_bytes, note=row.note)
        new.mode = mode
        return new


def fused_backends(op: str, device: torch.device) -> list[str]:
    """The fused backends that can serve ``op`` on ``device`` (never the Triton interpreter
    on CPU: it is a test vehicle, not a CPU implementation)."""
    wanted = ("cpu",) if device.type == "cpu" else ("cuda", "triton")
    return [b for b in backends.implemented_backends(op, device.type) if b in wanted]
