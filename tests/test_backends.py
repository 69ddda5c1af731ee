"""Backend dispatch: status, explicit choices, the environment variable and auto."""
import os
import subprocess
import sys

import pytest
import torch

import fusedreg
from fusedreg import backends


def test_status_lists_every_backend_with_a_reason():
    status = fusedreg.backend_status()
    assert list(status) == list(fusedreg.BACKENDS)
    assert status["reference"] == "available"
    for name, why in status.items():
        assert why == "available" or len(why) > 10
        assert (name in fusedreg.available_backends()) == (why == "available")


def test_use_backend_restores_previous_choice():
    fusedreg.set_backend("reference")
    with fusedreg.use_backend("auto"):
        assert fusedreg.get_backend() == "auto"
        with pytest.raises(ValueError):
            with fusedreg.use_backend("nope"):
                pass
        assert fusedreg.get_backend() == "auto"
    assert fusedreg.get_backend() == "reference"


def test_auto_never_picks_reference_when_cpu_kernels_are_built():
    expected = "cpu" if "cpu" in fusedreg.available_backends() else "reference"
    assert backends.resolve("bias_dropout", torch.device("cpu")) == expected


def test_explicit_backend_on_wrong_device_is_refused():
    if "cpu" not in fusedreg.available_backends():
        pytest.skip("cpu backend not built")
    fusedreg.set_backend("cpu")
    with pytest.raises(fusedreg.BackendUnavailableError, match="CPU tensors"):
        backends.resolve("bias_dropout", torch.device("meta"))


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
    res = _run_python("import fusedreg; print(fusedreg.backend_status()['triton'])")
    assert res.returncode == 0, res.stderr
    if not torch.cuda.is_available():
        assert "TRITON_INTERPRET" in res.stdout or "not installed" in res.stdout
    res = _run_python("import fusedreg; print(fusedreg.backend_status()['triton'])", TRITON_INTERPRET="1")
    assert res.stdout.strip() == "available" or "not installed" in res.stdout
