"""Test setup. TRITON_INTERPRET must be set before any @triton.jit decorator runs, so it is
set here, before fusedreg is imported: the triton backend then runs on CPU tensors (unless
FUSEDREG_TEST_NO_INTERPRET is set, as the GPU check script does, so that Triton compiles
for the GPU)."""
import os

if not os.environ.get("FUSEDREG_TEST_NO_INTERPRET"):
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

import fusedreg  # noqa: E402
from fusedreg import backends  # noqa: E402

HAS_GPU = torch.cuda.is_available()
requires_cuda = pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA GPU")


def cpu_backends(op: str) -> list[str]:
    """The backends that can run ``op`` on CPU tensors here (reference always)."""
    return [b for b in backends.implemented_backends(op, "cpu") if b != "cuda"]


def gpu_backends(op: str) -> list[str]:
    """The GPU backends that can run ``op`` on CUDA tensors here (none without a GPU)."""
    if not HAS_GPU:
        return []
    return [b for b in backends.implemented_backends(op, "cuda") if b in ("triton", "cuda")]


def backend_params(op: str) -> list:
    """pytest params ``(backend, device)`` for ``op``: every CPU backend that runs here on
    "cpu", and both GPU backends on "cuda" — skipped, with the reason, where there is no GPU;
    on a GPU machine a GPU backend that cannot serve ``op`` fails with the reason."""
    params = [pytest.param((b, "cpu"), id=b) for b in cpu_backends(op)]
    for b in ("triton", "cuda"):
        marks = [requires_cuda]
        params.append(pytest.param((b, "cuda"), id=f"{b}-gpu", marks=marks))
    return params


def gpu_backend_or_fail(op: str, backend: str) -> str:
    """On a GPU machine, ``backend`` must serve ``op``: fail with the reason if it cannot."""
    why = backends.why_unusable(backend, "cuda")
    if why is None and backend not in backends.implemented_backends(op, "cuda"):
        why = f"{op} has no {backend} implementation registered"
    if why:
        pytest.fail(f"backend {backend} cannot run {op} on this GPU: {why}")
    return backend


@pytest.fixture(autouse=True)
def _reset_backend():
    fusedreg.set_backend("auto")
    yield
    fusedreg.set_backend("auto")
