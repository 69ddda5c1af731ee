"""The CPU kernels run on threads with small stacks: with OMP_STACKSIZE=16k (torch's own ops
run there) bias_dropout and the norms, forward and backward, work and give the reference's
results. The kernels keep at most a few KB on a worker thread's stack (scratch rows and
partial sums live on the heap). Runs in a subprocess, since the OpenMP pool reads
OMP_STACKSIZE once, when it starts."""
import os
import subprocess
import sys

import pytest

import fusedreg

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCRIPT = r'''
import torch, fusedreg
from fusedreg import functional as F
torch.manual_seed(0)
assert torch.get_num_threads() == 2
# 8 x 4096: past the kernels' one-thread threshold, so the work is split over both threads
for dtype in (torch.float32, torch.float64):
    x = (torch.randn(8, 4096) + 0.5).to(dtype).requires_grad_()
    b = torch.randn(4096, dtype=dtype, requires_grad=True)
    r = torch.randn(8, 4096, dtype=dtype)
    w = (torch.rand(4096) + 0.5).to(dtype).requires_grad_()
    g = torch.randn(8, 4096, dtype=dtype)
    for activation in (None, "gelu"):
        out = {}
        for backend in ("cpu", "reference"):
            with fusedreg.use_backend(backend):
                y = F.bias_dropout(x, b, r, p=0.1, activation=activation, seed=1234)
                out[backend] = (y, *torch.autograd.grad(y, (x, b), g))
        for a, e in zip(out["cpu"], out["reference"]):
            torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-4)
    if dtype == torch.float64:
        continue
    out = {}
    for backend in ("cpu", "reference"):
        with fusedreg.use_backend(backend):
            y = F.layer_norm(x, (4096,), w, b)
            out[backend] = (y, *torch.autograd.grad(y, (x, w, b), g))
    for a, e in zip(out["cpu"], out["reference"]):
        torch.testing.assert_close(a, e, rtol=1e-3, atol=1e-3)
print("ok")
'''


@pytest.mark.skipif("cpu" not in fusedreg.available_backends(), reason="the C++ extension is not built")
def test_kernels_run_with_16k_thread_stacks():
    env = {**os.environ, "OMP_STACKSIZE": "16k", "OMP_NUM_THREADS": "2", "PYTHONPATH": ROOT}
    done = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True,
                          env=env, timeout=300)
    assert done.returncode == 0, f"exit {done.returncode}: {done.stderr[-2000:]}"
    assert done.stdout.strip().endswith("ok")
