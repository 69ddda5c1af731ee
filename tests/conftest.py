"""Test setup. TRITON_INTERPRET must be set before any @triton.jit decorator runs, so it is
set here, before fusedreg is imported: the triton backend then runs on CPU tensors."""
import os

if not os.environ.get("FUSEDREG_TEST_NO_INTERPRET"):
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

import fusedreg  # noqa: E402
from fusedreg import backends  # noqa: E402


def cpu_backends(op: str):
    """Backends that can run ``op`` on CPU tensors here (reference always)."""
    return [b for b in ("reference", "cpu", "triton")
            if b in backends._IMPLEMENTED.get(op, ()) and backends._why_unusable(b, "cpu") is None]


def gpu_backends(op: str):
    if not torch.cuda.is_available():
        return []
    return [b for b in ("triton", "cuda")
            if b in backends._IMPLEMENTED.get(op, ()) and backends._why_unusable(b, "cuda") is None]


requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(autouse=True)
def _reset_backend():
    fusedreg.set_backend("auto")
    yield
    fusedreg.set_backend("auto")
