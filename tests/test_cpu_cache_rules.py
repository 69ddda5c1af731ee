"""The CPU kernels choose how they write (non-temporal stores or ordinary ones) and how many
elements a step takes by the size of the L3 they count on (``cpu::l3_bytes`` in
csrc/include/fusedreg/cpu/isa.h: capped at 64 MiB outside AMD CPUs, whose one-instance size
comes from cpuid). Those choices must never change a value: the same script runs in two fresh
processes (the size is read once), one with ``FUSEDREG_CPU_L3_MIB=1``, where every call below
outgrows the L3 (streamed outputs of 8 MiB and more, bias_dropout's 128-element steps,
BatchNorm's streamed plain forward, the norms' streamed forwards and backwards), one with
4096, where none does, and the outputs and gradients must be the same bits."""
import os
import subprocess
import sys

import pytest
import torch

import fusedreg

pytestmark = pytest.mark.skipif(not fusedreg.backends.extension_available(),
                                reason="needs the C++ extension (fusedreg._C)")

_SCRIPT = r"""
import sys
import torch
import fusedreg
import fusedreg.functional as F

fusedreg.set_backend("cpu")
torch.manual_seed(0)
out = {"l3": torch.ops.fusedreg_bench.l3_bytes()}

def bd(name, M, N, dtype, act):
    x = (torch.randn(M, N) * 2 + 0.5).to(dtype).requires_grad_()
    b = torch.randn(N).to(dtype).requires_grad_()
    r = torch.randn(M, N).to(dtype)
    y = F.bias_dropout(x, b, r, 0.1, activation=act, seed=1234)
    gx, gb = torch.autograd.grad(y, [x, b], torch.randn_like(y))
    out[name] = (y.detach(), gx, gb)

bd("bd f32", 2048, 1024, torch.float32, None)          # 8 MiB output: streamed past the L3
bd("bd f32 gelu", 2048, 1024, torch.float32, "gelu")   # 128-element steps past the L3
bd("bd bf16", 2048, 1024, torch.bfloat16, None)

def bn(name, shape, dtype, cl):
    C = shape[1]
    x = (torch.randn(shape) * 3 + 2).to(dtype)
    if cl:
        x = x.contiguous(memory_format=torch.channels_last)
    rm, rv, w, b = torch.randn(C), torch.rand(C) + 0.5, torch.randn(C), torch.randn(C)
    out[name] = F.batch_norm(x, rm, rv, w, b, training=False)

bn("bn eval f32", (8, 16, 40, 40), torch.float32, False)
bn("bn eval bf16", (8, 16, 64, 64), torch.bfloat16, False)
bn("bn eval f32 cl", (8, 32, 32, 32), torch.float32, True)

def norm(name, rms, M, N, dtype):
    x = (torch.randn(M, N) + 1.5).to(dtype).requires_grad_()
    w = torch.randn(N).to(dtype).requires_grad_()
    b = torch.randn(N).to(dtype).requires_grad_()
    y = F.rms_norm(x, (N,), w) if rms else F.layer_norm(x, (N,), w, b)
    ins = [x, w] if rms else [x, w, b]
    out[name] = (y.detach(), *torch.autograd.grad(y, ins, torch.randn_like(y)))

# 8 MiB outputs (grad_x too), streamed past the L3: the forward's when all it reads and
# writes outgrows it, the backward's when that is half of it
norm("ln bf16", False, 4096, 1024, torch.bfloat16)
norm("rms bf16", True, 4096, 1024, torch.bfloat16)
norm("ln f32", False, 2048, 1024, torch.float32)
torch.save(out, sys.argv[1])
"""


def _run(tmp_path, mib: int) -> dict:
    path = str(tmp_path / f"l3_{mib}.pt")
    env = {**os.environ, "FUSEDREG_CPU_L3_MIB": str(mib)}
    res = subprocess.run([sys.executable, "-c", _SCRIPT, path], env=env, capture_output=True,
                         text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    return torch.load(path)


def _same_bits(a, b) -> bool:
    if a.dtype.is_floating_point:
        bits = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}
        return torch.equal(a.contiguous().view(bits[a.dtype]), b.contiguous().view(bits[b.dtype]))
    return torch.equal(a, b)


def test_l3_size_changes_no_value(tmp_path):
    small, large = _run(tmp_path, 1), _run(tmp_path, 4096)
    # the override reached the kernels
    assert small.pop("l3") == 1 << 20 and large.pop("l3") == 4096 << 20
    assert small.keys() == large.keys()
    for name in small:
        a, b = small[name], large[name]
        a, b = (a, b) if isinstance(a, tuple) else ((a,), (b,))
        for i, (u, v) in enumerate(zip(a, b)):
            assert u.shape == v.shape and u.dtype == v.dtype, name
            assert _same_bits(u, v), f"{name}[{i}] differs between an L3 of 1 MiB and of 4096 MiB"


def _vendor() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("vendor_id"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def test_l3_size_default():
    if "FUSEDREG_CPU_L3_MIB" in os.environ:
        pytest.skip("FUSEDREG_CPU_L3_MIB is set in this environment")
    l3 = torch.ops.fusedreg_bench.l3_bytes()
    assert l3 >= 1 << 20
    if _vendor() != "AuthenticAMD":
        # sysconf's size, at most the cap (the Intel VM reports its host's 480 MiB)
        assert l3 <= 64 << 20


def test_l3_override_rejects_bad_values():
    # an unusable value leaves the detected size (as without the variable)
    code = "import torch, fusedreg, fusedreg._C; print(torch.ops.fusedreg_bench.l3_bytes())"
    env = {k: v for k, v in os.environ.items() if k != "FUSEDREG_CPU_L3_MIB"}
    seen = []
    for value in (None, "0", "12abc"):
        e = env if value is None else {**env, "FUSEDREG_CPU_L3_MIB": value}
        res = subprocess.run([sys.executable, "-c", code], env=e, capture_output=True, text=True,
                             timeout=300)
        assert res.returncode == 0, res.stderr[-2000:]
        seen.append(int(res.stdout.split()[-1]))
    assert seen[1] == seen[0] and seen[2] == seen[0]
