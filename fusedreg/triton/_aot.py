"""Compile every Triton kernel's ``COMPILE_SPECS`` for a GPU target, without a GPU.

Each module ``fusedreg/triton/<op>.py`` lists ``COMPILE_SPECS``: ``(kernel, signature,
constexprs)`` or ``(kernel, signature, constexprs, options)`` with ``signature`` the types of
the runtime arguments (``"*bf16"``, ``"i32"``, ``"fp32"``...), ``constexprs`` the values of the
``tl.constexpr`` ones and ``options`` compile options such as ``num_warps``. ``compile_specs``
compiles them all for the given architectures and returns, per spec and architecture, the
ptxas resource figures (registers, spills, stack, shared memory) or the error.

Why a subprocess: the tests set ``TRITON_INTERPRET=1`` before fusedreg is imported, and then
``@triton.jit`` makes interpreter objects, which ``triton.compile`` cannot lower; the helpers a
kernel calls (``activate``, ``dropout_uniform``...) are interpreter objects too, so re-wrapping
one kernel would not do. A fresh interpreter without ``TRITON_INTERPRET`` imports the modules
as real ``JITFunction``s. It also gets a fresh ``TRITON_CACHE_DIR`` and
``TRITON_DUMP_PTXAS_LOG=1``, so that ptxas really runs and prints its ``-v`` report (a cache
hit would skip it); where a Triton release prints no report, ptxas is run again on the PTX.

Command line (what the subprocess runs): ``python -m fusedreg.triton._aot OUT.json 80 90``.
"""
from __future__ import annotations

import contextlib
import glob
import importlib
import io
import json
import os
import re
import subprocess
import sys
import tempfile

_HERE = os.path.dirname(os.path.abspath(__file__))


def discover() -> list[str]:
    """Names of the modules in fusedreg/triton that define COMPILE_SPECS (read as text, so
    nothing is imported here)."""
    names = []
    for path in sorted(glob.glob(os.path.join(_HERE, "*.py"))):
        with open(path, encoding="utf-8") as f:
            if re.search(r"^COMPILE_SPECS\b", f.read(), re.MULTILINE):
                names.append(f"fusedreg.triton.{os.path.basename(path)[:-3]}")
    return names


_FUNC = re.compile(r"(?:Compiling entry function|Function properties for) '?([\w$.]+)'?")
_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED = re.compile(r"Used (\d+) registers")
_SMEM = re.compile(r"(\d+) bytes smem")


def parse_ptxas_log(log: str) -> dict[str, dict]:
    """``ptxas -v`` output -> {function: {registers, stack, spill_stores, spill_loads, smem}}
    (the last architecture wins where a log holds several)."""
    out: dict[str, dict] = {}
    current = None
    for line in log.splitlines():
        m = _FUNC.search(line)
        if m:
            current = out.setdefault(m.group(1), dict(registers=None, stack=0, spill_stores=0,
                                                      spill_loads=0, smem=0))
            continue
        if current is None:
            continue
        m = _FRAME.search(line)
        if m:
            current.update(stack=int(m.group(1)), spill_stores=int(m.group(2)),
                           spill_loads=int(m.group(3)))
        m = _USED.search(line)
        if m:
            current["registers"] = int(m.group(1))
            s = _SMEM.search(line)
            current["smem"] = int(s.group(1)) if s else 0
    return out


def _describe(constexprs: dict, signature: dict) -> str:
    """'bf16/fp32 i64:total HAS_BIAS=True ...' : pointer dtypes, 64-bit int arguments, constexprs."""
    ptrs = "/".join(dict.fromkeys(v[1:] for v in signature.values() if v.startswith("*")))
    wide = ",".join(k for k, v in signature.items() if v == "i64")
    parts = [ptrs] + ([f"i64:{wide}"] if wide else []) + [f"{k}={v}" for k, v in constexprs.items()]
    return " ".join(parts)


def _ptxas_again(ptx: str, arch: int) -> str:
    """ptxas -v on the PTX with Triton's own ptxas (for releases without the log knob)."""
    from triton.backends.nvidia import compiler as nv

    try:
        ptxas = nv.get_ptxas(arch).path
    except (AttributeError, TypeError):
        ptxas = nv._path_to_binary("ptxas")[0]
    gpu = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        r = subprocess.run([ptxas, "-v", f"--gpu-name={gpu}", src, "-o", os.path.join(d, "k.o")],
                           capture_output=True, text=True)
    return r.stdout + r.stderr


def _compile_one(kernel, signature: dict, constexprs: dict, options: dict, arch: int) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    if not isinstance(kernel, triton.runtime.jit.JITFunction):
        raise TypeError(f"{kernel!r} is not a JITFunction (TRITON_INTERPRET set?)")
    names = kernel.arg_names
    unknown = set(signature) | set(constexprs)
    unknown -= set(names)
    if unknown:
        raise ValueError(f"unknown arguments {sorted(unknown)} for {kernel.__name__}")
    missing = [n for n in names if n not in signature and n not in constexprs]
    if missing:
        raise ValueError(f"no type or value for {missing} of {kernel.__name__}")
    sig = {n: signature.get(n, "constexpr") for n in names}
    consts = {(names.index(k),): v for k, v in constexprs.items()}
    # Pointers are 16-byte aligned, as torch allocations are and as the runtime specializes.
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(names)
             if sig[n].startswith("*")}
    log = io.StringIO()
    with contextlib.redirect_stdout(log):
        try:
            src = ASTSource(kernel, sig, consts, attrs)
        except TypeError:  # releases without attrs
            src = ASTSource(kernel, sig, consts)
        compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=dict(options))
    funcs = parse_ptxas_log(log.getvalue())
    if not funcs:
        funcs = parse_ptxas_log(_ptxas_again(compiled.asm["ptx"], arch))
    if len(funcs) != 1:
        raise RuntimeError(f"expected one ptxas report, got {sorted(funcs)}")
    res = next(iter(funcs.values()))
    shared = getattr(compiled.metadata, "shared", None)
    if shared is not None:
        res["smem"] = int(shared)
    return res


def _worker(out_path: str, archs: list[int], modules: list[str] | None) -> None:
    results = []
    for name in modules or discover():
        try:
            specs = importlib.import_module(name).COMPILE_SPECS
        except Exception as e:  # noqa: BLE001 - reported, the test fails on it
            results.append(dict(module=name, kernel=None, spec="import", arch=None,
                                error=f"{type(e).__name__}: {e}"))
            continue
        # Every module-level kernel (a JITFunction named *_kernel, the convention of these
        # modules; helpers are inlined into kernels) must have a spec.
        module = sys.modules[name]
        covered = {id(spec[0]) for spec in specs}
        for attr, obj in sorted(vars(module).items()):
            if attr.endswith("_kernel") and hasattr(obj, "arg_names") and id(obj) not in covered:
                results.append(dict(module=name, kernel=attr, spec="", arch=None,
                                    error=f"{attr} has no entry in COMPILE_SPECS"))
        for spec in specs:
            kernel, signature, constexprs = spec[:3]
            options = spec[3] if len(spec) > 3 else {}
            row = dict(module=name, kernel=getattr(kernel, "__name__", repr(kernel)),
                       spec=_describe(constexprs, signature), options=options)
            for arch in archs:
                r = dict(row, arch=arch)
                try:
                    r.update(_compile_one(kernel, signature, constexprs, options, arch), error=None)
                except Exception as e:  # noqa: BLE001
                    r["error"] = f"{type(e).__name__}: {e}"[:2000]
                results.append(r)
    with open(out_path, "w") as f:
        json.dump(results, f, indent=1)


def compile_specs(archs=(80, 90), modules: list[str] | None = None, timeout: float = 900) -> list[dict]:
    """Compiles the COMPILE_SPECS of ``modules`` (default: all) for each of ``archs`` in a
    subprocess without TRITON_INTERPRET; one dict per (spec, arch) with ``error`` None or the
    message, and ``registers``, ``spill_stores``, ``spill_loads``, ``stack``, ``smem``."""
    root = os.path.dirname(os.path.dirname(_HERE))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    with tempfile.TemporaryDirectory() as d:
        env.update(TRITON_CACHE_DIR=os.path.join(d, "cache"), TRITON_DUMP_PTXAS_LOG="1",
                   PYTHONPATH=os.pathsep.join([root] + [p for p in [env.get("PYTHONPATH")] if p]))
        out = os.path.join(d, "results.json")
        cmd = [sys.executable, "-m", "fusedreg.triton._aot", out] + [str(a) for a in archs]
        if modules:
            cmd += ["--modules"] + list(modules)
        r = subprocess.run(cmd, env=env, cwd=root, capture_output=True, text=True, timeout=timeout)
        if r.returncode != 0 or not os.path.exists(out):
            raise RuntimeError(f"compile worker failed ({r.returncode}):\n{r.stdout[-4000:]}\n{r.stderr[-4000:]}")
        with open(out) as f:
            return json.load(f)


if __name__ == "__main__":
    args = sys.argv[1:]
    mods = None
    if "--modules" in args:
        i = args.index("--modules")
        args, mods = args[:i], args[i + 1:]
    _worker(args[0], [int(a) for a in args[1:]], mods)
