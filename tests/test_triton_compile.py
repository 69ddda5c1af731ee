"""Every Triton kernel compiles for sm_80 and sm_90 without a GPU, and spills no registers.

The modules are found generically: each ``fusedreg/triton/<op>.py`` that defines
``COMPILE_SPECS`` is compiled spec by spec (fusedreg/triton/_aot.py), so a new op's kernels
are tested as soon as its module lands. The compile runs in a subprocess without
``TRITON_INTERPRET`` (conftest sets it before fusedreg is imported, which turns every
``@triton.jit`` function of this process into an interpreter object that cannot be
compiled): that subprocess imports the modules afresh, as real ``JITFunction``s. This catches
what the interpreter cannot: codegen type errors, operations a target lacks, and spills
(ptxas's report for the cubin).
"""
import pytest

pytest.importorskip("triton")

from fusedreg.triton import _aot  # noqa: E402

ARCHS = (80, 90)
MODULES = _aot.discover()


@pytest.fixture(scope="module")
def compiled():
    """One subprocess compiles every spec of every module for both architectures."""
    return _aot.compile_specs(archs=ARCHS)


def test_discovery_finds_the_op_modules():
    assert "fusedreg.triton.bias_dropout" in MODULES
    # helpers without kernels are not listed
    assert "fusedreg.triton.philox" not in MODULES


@pytest.mark.slow  # one subprocess compiles every spec for both targets: ~30-80 s on 2 cores
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("module", MODULES)
def test_compiles_without_spills(compiled, module, arch):
    rows = [r for r in compiled if r["module"] == module]
    assert rows, f"{module}: nothing compiled"
    errors = [f"{r['kernel']} [{r['spec']}]: {r['error']}" for r in rows
              if r["error"] and r["arch"] in (arch, None)]
    assert not errors, "\n".join(errors)
    done = [r for r in rows if r["arch"] == arch]
    assert done, f"{module}: no spec compiled for sm_{arch}"
    for r in done:
        assert r["registers"], f"{r['kernel']} [{r['spec']}]: no ptxas report"
    spills = [f"{r['kernel']} [{r['spec']}]: {r['registers']} registers, "
              f"{r['spill_stores']} B spill stores, {r['spill_loads']} B spill loads"
              for r in done if r["spill_stores"] or r["spill_loads"]]
    assert not spills, "register spills on sm_%d:\n%s" % (arch, "\n".join(spills))


def test_ptxas_log_parser():
    log = """ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function '_k' for 'sm_90a'
ptxas info    : Function properties for _k
    8 bytes stack frame, 12 bytes spill stores, 16 bytes spill loads
ptxas info    : Used 40 registers, used 1 barriers, 4096 bytes smem, 400 bytes cmem[0]
"""
    assert _aot.parse_ptxas_log(log) == {"_k": dict(registers=40, stack=8, spill_stores=12,
                                                     spill_loads=16, smem=4096)}
