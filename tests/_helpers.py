"""Helpers shared by the per-op test modules: backend x device parametrization with cases
that depend on the device, the check that a GPU backend can serve the op it is asked for, and
a script's results at each CPU instruction-set level.
"""
import os
import subprocess
import sys

import pytest
import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

import fusedreg.nn as fnn
from conftest import backend_params, gpu_backend_or_fail

# torch class -> the fusedreg.nn class that fusedreg.patch swaps in for it
FUSED_CLASSES = {nn.LayerNorm: fnn.LayerNorm, nn.RMSNorm: fnn.RMSNorm, nn.Dropout: fnn.Dropout}


def _case_id(case) -> str:
    parts = []
    for v in case:
        if isinstance(v, tuple):
            parts.append("x".join(map(str, v)))
        elif hasattr(v, "is_floating_point"):  # a torch.dtype
            parts.append(str(v).replace("torch.", ""))
        elif isinstance(v, type):
            parts.append(v.__name__)
        elif isinstance(v, dict):
            parts.append(",".join(f"{k}={x}" for k, x in v.items()) or "defaults")
        else:
            parts.append(str(v))
    return "-".join(parts)


def device_cases(op: str, cpu_cases, gpu_cases=None, keep=None) -> list:
    """pytest params ``(backend, device, *case)``: each CPU backend of ``op`` with every case of
    ``cpu_cases``, and each GPU backend (triton, cuda; skipped with the reason where there is
    no GPU) with every case of ``gpu_cases`` (``cpu_cases`` if None). A case is a tuple of
    the test's remaining arguments. ``keep(backend, device, *case)``, if given, drops the
    cases for which it returns False (the Triton interpreter is too slow for some)."""
    params = []
    for bp in backend_params(op):
        backend, device = bp.values[0]
        cases = cpu_cases if device == "cpu" else (cpu_cases if gpu_cases is None else gpu_cases)
        for case in cases:
            if keep is not None and not keep(backend, device, *case):
                continue
            params.append(pytest.param(backend, device, *case, marks=bp.marks,
                                       id=f"{bp.id}-{_case_id(case)}" if case else bp.id))
    return params


def serving(op: str, backend: str, device: str) -> str:
    """``backend``, after checking that it can serve ``op`` on ``device``: on a GPU machine a
    GPU backend that cannot fails the test with the reason (nothing is silently skipped)."""
    if device == "cuda":
        gpu_backend_or_fail(op, backend)
    return backend


CPU_LEVELS = ("baseline", "avx2", "avx512")


def p_at_a_uniform(seed: int, n: int):
    """(p, u): u the first ``n`` uniforms of ``seed``'s dropout stream, p a drop probability
    equal to one of them (the first between 0.05 and 0.95): the element drawing it sits on the
    keep test's boundary (u >= p keeps it), where a kernel comparing otherwise than the
    reference would differ."""
    from fusedreg.reference.philox import dropout_uniform
    u = dropout_uniform(seed, n)
    return float(u[(u > 0.05) & (u < 0.95)][0]), u


def results_at_each_cpu_level(code: str, args, tmp_path) -> dict:
    """{level: what ``code`` saved}: the script runs once per CPU instruction-set level, each in
    a fresh process (fusedreg reads FUSEDREG_CPU_ISA once), with ``args`` and then the path to
    ``torch.save`` its results to as its arguments."""
    results = {}
    for level in CPU_LEVELS:
        path = str(tmp_path / f"{level}.pt")
        env = {**os.environ, "FUSEDREG_CPU_ISA": level}
        res = subprocess.run([sys.executable, "-c", code, *map(str, args), path], env=env,
                             capture_output=True, text=True, timeout=600)
        assert res.returncode == 0, f"{level}: {res.stderr[-2000:]}"
        results[level] = torch.load(path)
    return results


class PassThroughDispatchMode(TorchDispatchMode):
    """A dispatch mode that runs every op as it is: its presence alone is what a test checks
    (fusedreg's direct C++ calls decline under any mode, the results must not change)."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


class PassThroughFunctionMode(TorchFunctionMode):
    """The torch-function counterpart of PassThroughDispatchMode."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


def results_at_one_and_two_threads(run):
    """(run() at one thread, run() at two threads), the thread count restored after."""
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = run()
        torch.set_num_threads(2)
        two = run()
    finally:
        torch.set_num_threads(threads)
    return one, two


def _gloo_rank(rank, fn, world, init_file, args):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    fn(rank, world, *args)  # an exception reaches mp.spawn's traceback file from here
    dist.barrier()  # leave together: tearing gloo down under a busy peer can abort
    dist.destroy_process_group()
    # Leave without the interpreter's teardown: modules and DTensors the worker built still
    # hold gloo objects whose destructors, run while Python finalizes, now and then abort
    # the process ("terminate called without an active exception") after every result is
    # written. fn has saved and closed its files; the streams are flushed here.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def spawn_gloo_ranks(fn, args, tmp_dir, world: int = 2):
    """Runs ``fn(rank, world, *args)`` in ``world`` spawned processes joined in one gloo
    group (one thread each, initialised through a file in ``tmp_dir``); raises what a rank
    raised."""
    import torch.multiprocessing as mp

    init_file = os.path.join(tmp_dir, "gloo-init")
    mp.spawn(_gloo_rank, args=(fn, world, init_file, tuple(args)), nprocs=world, join=True)
