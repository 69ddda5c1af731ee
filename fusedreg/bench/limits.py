"""The speed limit of each memory-access pattern, measured in the run that uses it.

An op's GB/s (its minimal bytes over its time) is only meaningful next to what the fastest
kernel with the same access pattern reaches on the same machine, with operands of the same
size (on a CPU whose last-level cache holds them, that is cache bandwidth, not DRAM
bandwidth). A ``Pattern`` says how many same-sized arrays a pass reads and writes:

- ``stream``: reads n arrays, writes m other arrays (forward and backward passes);
- ``inplace``: reads n arrays, m of which it rewrites in place (optimizer steps);
- ``reduce``: reads n arrays, writes nothing that matters (a reduction).

On a CPU the limit is the best of several probes from ``fusedreg._C`` (``fusedreg_bench``,
csrc/cpu/bandwidth.cpp), threaded like the kernels: one with ordinary stores (which pay a
read-for-ownership of each destination line, as every kernel here does) and one with
non-temporal stores (which skip it, and win once the operands are larger than the last-level
cache), each also with the lines software-prefetched into L2 at each distance of
``PREFETCH_BYTES`` (with non-temporal stores, the arrays read only; a reduction has only the
loads, with and without). Why the prefetching probes: the optimizer kernels prefetch 32 KiB
ahead, and with their arrays in the last-level cache or DRAM the hardware prefetchers alone
keep too few lines in flight, so the in-place probe without it was no longer the fastest
pass of its pattern — the optimizers beat it by up to 1.5x; the limit must be the fastest
kernel of the pattern, for every pattern, so every pattern gets them (which distance is
fastest depends on the size and on the machine's load, hence several). Each probe's time is
its fastest repetition: the limit is the best the machine did.
On a GPU (stores there have no read-for-ownership) the probes are torch's own kernels,
timed like the ops (L2 flushed between repetitions): ``dst.copy_(src)`` for streaming,
``a.add_(b)`` for in place and ``a.sum()`` for a reduction.
"""
from __future__ import annotations

import dataclasses
import math

import torch


@dataclasses.dataclass(frozen=True)
class Pattern:
    kind: str    # "stream", "inplace" or "reduce"
    reads: int   # arrays read (for "inplace": all arrays read, the rewritten ones included)
    writes: int  # arrays written ("inplace": rewritten in place, a subset of the reads)

    def __post_init__(self):
        if self.kind not in ("stream", "inplace", "reduce"):
            raise ValueError(f"unknown access pattern {self.kind!r}")
        if self.reads < 0 or self.writes < 0 or self.reads + self.writes == 0:
            raise ValueError("a pattern reads or writes at least one array")
        if self.kind == "inplace" and not 0 < self.writes <= self.reads:
            raise ValueError("an in-place pattern rewrites some of the arrays it reads")
        if self.kind == "reduce" and self.writes:
            raise ValueError("a reduction writes nothing")

    @property
    def arrays_moved(self) -> int:
        """Array-sized transfers a pass of this pattern makes (bytes = this x array bytes)."""
        return self.reads + self.writes

    @property
    def label(self) -> str:
        if self.kind == "stream":
            return f"stream {self.reads}R{self.writes}W"
        if self.kind == "inplace":
            return f"in-place {self.reads}R{self.writes}W"
        return f"read-only {self.reads}R"


# How far ahead the probes with software prefetch fetch (bytes): around the optimizer kernels'
# distance (csrc/cpu/optim.cpp: 8192 elements, 32 KiB of float32).
PREFETCH_BYTES = (8 << 10, 32 << 10, 128 << 10)

STREAM_COPY = Pattern("stream", 1, 1)
INPLACE = Pattern("inplace", 2, 1)
REDUCE = Pattern("reduce", 1, 0)
REFERENCE_PATTERNS = (STREAM_COPY, INPLACE, REDUCE)


@dataclasses.dataclass
class Limit:
    pattern: Pattern
    array_bytes: int
    gbps: float      # bytes moved (pattern.arrays_moved x array_bytes) per second / 1e9
    probe: str       # which probe set it: "stores", "nt-stores + prefetch 32K", "loads", "torch"


def _probe_ops():
    try:
        import fusedreg._C  # noqa: F401  (registers the fusedreg_bench library)
        return torch.ops.fusedreg_bench
    except (ImportError, OSError, AttributeError):
        return None


class Limits:
    """Measures limits on demand and keeps them for the run, per (pattern, array size)."""

    def __init__(self, device: torch.device, time_fn):
        self.device = device
        self._time = time_fn   # time_fn(fn) -> fastest repetition in ms (the harness's timer)
        self._cache: dict = {}

    def get(self, pattern: Pattern, array_bytes: int) -> Limit:
        key = (pattern, self._round(array_bytes))
        if key not in self._cache:
            self._cache[key] = self._measure(pattern, key[1])
        return self._cache[key]

    def remeasure(self, pattern: Pattern, array_bytes: int) -> Limit:
        """Measures again and keeps the better (a noisy first probe underestimates)."""
        key = (pattern, self._round(array_bytes))
        new = self._measure(pattern, key[1])
        old = self._cache.get(key)
        self._cache[key] = new if old is None or new.gbps >= old.gbps else old
        return self._cache[key]

    @staticmethod
    def _round(nbytes: int) -> int:
        return max(64, (int(nbytes) + 63) // 64 * 64)

    def _measure(self, pattern: Pattern, nbytes: int) -> Limit:
        n = nbytes // 4
        make = lambda: torch.ones(n, dtype=torch.float32, device=self.device)  # noqa: E731
        best = None
        for name, fn, moved in self._probes(pattern, make, nbytes):
            ms = self._time(fn)  # the fastest repetition, in ms
            gbps = moved / (ms * 1e-3) / 1e9 if ms > 0 and math.isfinite(ms) else 0.0
            if best is None or gbps > best.gbps:
                best = Limit(pattern, nbytes, gbps, name)
        return best

    def _probes(self, pattern: Pattern, make, nbytes: int):
        """[(name, fn, bytes one call of fn moves)] for the pattern."""
        moved = pattern.arrays_moved * nbytes
        ops = _probe_ops() if self.device.type == "cpu" else None
        if ops is not None and hasattr(ops, "stream"):
            pf_name = lambda base, pf: base + (f" + prefetch {pf >> 10}K" if pf else "")  # noqa: E731
            if pattern.kind == "stream":
                reads = [make() for _ in range(pattern.reads)]
                writes = [make() for _ in range(pattern.writes)]
                return [(pf_name(name, pf), (lambda nt=nt, pf=pf: ops.stream(reads, writes, nt, pf)),
                         moved)
                        for name, nt in (("stores", False), ("nt-stores", True))
                        for pf in (0,) + PREFETCH_BYTES]
            if pattern.kind == "inplace":
                rw = [make() for _ in range(pattern.writes)]
                ro = [make() for _ in range(pattern.reads - pattern.writes)]
                # non-temporal stores in place: no prefetch (each line written is read first)
                variants = [("stores", False, 0), ("nt-stores", True, 0)]
                variants += [("stores", False, pf) for pf in PREFETCH_BYTES]
                return [(pf_name(name, pf), (lambda nt=nt, pf=pf: ops.update(rw, ro, nt, pf)), moved)
                        for name, nt, pf in variants]
            reads = [make() for _ in range(pattern.reads)]
            return [(pf_name("loads", pf), (lambda pf=pf: ops.reduce(reads, pf)), moved)
                    for pf in (0,) + PREFETCH_BYTES]
        # torch's kernels (GPU, or a CPU build without the probes): a 1- to 3-array kernel
        # of the same kind; its bandwidth stands for the pattern's.
        a, b = make(), make()
        if pattern.kind == "stream":
            return [("torch", lambda: b.copy_(a), 2 * nbytes)]
        if pattern.kind == "inplace":
            return [("torch", lambda: a.add_(b), 3 * nbytes)]
        return [("torch", lambda: a.sum(), nbytes)]
