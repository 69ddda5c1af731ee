"""Registers, shared memory, stack and spills of every GPU kernel, for one architecture.

Triton: every spec of every ``COMPILE_SPECS`` in fusedreg/triton (compiled without a GPU,
fusedreg/triton/_aot.py). CUDA: every ``csrc/cuda/*.cu`` compiled with ``nvcc -Xptxas -v``
and torch's include flags, as setup.py builds it. No GPU is needed for either.

    python benchmarks/resource_report.py [--arch 90] [--out benchmarks/results/sm90_resources.md]

Exit status 1 if any kernel spills or fails to compile (so a script can flag it).
"""
from __future__ import annotations

import argparse
import datetime
import glob
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from fusedreg.triton import _aot  # noqa: E402

_ACT = {"0": "none", "1": "relu", "2": "gelu", "3": "gelu_tanh", "4": "silu"}


def _nvcc() -> str | None:
    home = os.environ.get("CUDA_HOME") or ("/usr/local/cuda" if os.path.isdir("/usr/local/cuda") else None)
    cand = os.path.join(home, "bin", "nvcc") if home else shutil.which("nvcc")
    return cand if cand and os.path.exists(cand) else shutil.which("nvcc")


def _nvcc_flags(arch: int) -> list[str]:
    """The flags torch.utils.cpp_extension gives nvcc, plus setup.py's."""
    import site

    import torch
    from torch.utils import cpp_extension as ce

    try:
        incs = ce.include_paths(device_type="cuda")
    except TypeError:  # older torch: include_paths(cuda=True)
        incs = ce.include_paths(cuda=True)
    incs = [os.path.join(ROOT, "csrc", "include")] + list(incs)
    for sp in site.getsitepackages():
        for sub in ("cu13", "cu12"):
            d = os.path.join(sp, "nvidia", sub, "include")
            if os.path.isdir(d):
                incs.append(d)
    incs.append(sysconfig.get_paths()["include"])
    abi = int(getattr(torch._C, "_GLIBCXX_USE_CXX11_ABI", 1))
    return ([f"-I{d}" for d in incs] + list(ce.COMMON_NVCC_FLAGS) +
            ["-std=c++20", "-O3", "-lineinfo", "-DTORCH_EXTENSION_NAME=_C",
             f"-D_GLIBCXX_USE_CXX11_ABI={abi}", f"-gencode=arch=compute_{arch},code=sm_{arch}",
             "--compiler-options", "-fPIC", "-Xptxas", "-v"])


def _demangle(names: list[str]) -> dict[str, str]:
    filt = shutil.which("c++filt")
    if not filt or not names:
        return {n: n for n in names}
    out = subprocess.run([filt], input="\n".join(names), capture_output=True, text=True).stdout.splitlines()
    return dict(zip(names, out)) if len(out) == len(names) else {n: n for n in names}


def _short(name: str) -> str:
    """'void fusedreg::(anonymous namespace)::k<c10::BFloat16, (fusedreg::Activation)2, true>(...)'
    -> 'k<bf16, gelu, true>'."""
    name = re.sub(r"^void ", "", name)
    if name.endswith(")"):  # drop the parameter list: from its matching "(" on
        depth = 0
        for i in range(len(name) - 1, -1, -1):
            depth += {")": 1, "(": -1}.get(name[i], 0)
            if depth == 0:
                name = name[:i]
                break
    name = name.replace("fusedreg::(anonymous namespace)::", "").replace("fusedreg::", "")
    name = name.replace("c10::BFloat16", "bf16").replace("c10::Half", "fp16")
    name = name.replace("double", "fp64").replace("float", "fp32")
    return re.sub(r"\(Activation\)(\d)", lambda m: _ACT.get(m.group(1), m.group(1)), name)


def _rows_from_log(rel: str, log: str) -> list[dict]:
    funcs = {k: v for k, v in _aot.parse_ptxas_log(log).items() if v["registers"] is not None}
    names = _demangle(sorted(funcs))
    return [dict(file=rel, kernel=_short(names[m]), error=None, **funcs[m])
            for m in sorted(funcs, key=lambda m: _short(names[m]))]


def cuda_rows_from_build_log(path: str) -> list[dict]:
    """The ptxas reports in a build log (setup.py with FUSEDREG_NVCC_FLAGS="-Xptxas -v")."""
    chunks: dict[str, list[str]] = {}
    current = f"(build log {os.path.basename(path)})"
    with open(path, errors="replace") as f:
        for line in f:
            m = re.search(r"nvcc\b.*?(\S+\.cu)\b", line)  # ninja echoes each command first
            if m:
                current = os.path.relpath(m.group(1), ROOT) if os.path.isabs(m.group(1)) else m.group(1)
            chunks.setdefault(current, []).append(line)
    rows = []
    for rel, lines in chunks.items():
        rows += _rows_from_log(rel, "".join(lines))
    return rows


def cuda_rows(arch: int) -> list[dict]:
    nvcc = _nvcc()
    if nvcc is None:
        return [dict(file="csrc/cuda", kernel="(nvcc not found)", error="nvcc not found")]
    rows = []
    flags = _nvcc_flags(arch)
    for cu in sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu"))):
        rel = os.path.relpath(cu, ROOT)
        with tempfile.TemporaryDirectory() as d:
            r = subprocess.run([nvcc, "-c", cu, "-o", os.path.join(d, "k.o")] + flags,
                               capture_output=True, text=True)
        if r.returncode != 0:
            rows.append(dict(file=rel, kernel="(compile failed)", error=(r.stdout + r.stderr)[-3000:]))
            continue
        rows += _rows_from_log(rel, r.stdout + r.stderr)
    return rows


def triton_rows(arch: int) -> list[dict]:
    try:
        return _aot.compile_specs(archs=(arch,))
    except Exception as e:  # noqa: BLE001 - reported in the table
        return [dict(module="fusedreg.triton", kernel="(compile worker failed)", spec="",
                     error=str(e)[-3000:])]


def _spills(r: dict) -> bool:
    return bool(r.get("spill_stores") or r.get("spill_loads"))


def _cell(r: dict, key: str) -> str:
    v = r.get(key)
    return "" if v is None else str(v)


def markdown(arch: int, trows: list[dict], crows: list[dict]) -> str:
    import torch

    try:
        import triton

        tver = triton.__version__
    except ImportError:
        tver = "not installed"
    lines = [f"# Kernel resources for sm_{arch}", "",
             f"Generated by `benchmarks/resource_report.py` on {datetime.date.today()} "
             f"(torch {torch.__version__}, triton {tver}, nvcc from {_nvcc()}); no GPU needed.",
             "Registers per thread, bytes of stack frame and spill stores/loads per thread, bytes of",
             "shared memory per block (static for CUDA; Triton's as compiled). A spill or a failed",
             "compile is marked **bold**.", ""]
    lines += ["## Triton (`COMPILE_SPECS`, num_warps as given)", "",
              "| module | kernel | variant | warps | regs | stack | spill st/ld | smem |",
              "|---|---|---|---|---|---|---|---|"]
    for r in trows:
        bad = r.get("error") or _spills(r)
        spill = f"{_cell(r, 'spill_stores')}/{_cell(r, 'spill_loads')}"
        lines.append("| {} | {} | {} | {} | {} | {} | {} | {} |".format(
            r.get("module", "").replace("fusedreg.triton.", ""), r.get("kernel"), r.get("spec", ""),
            (r.get("options") or {}).get("num_warps", ""),
            f"**error: {r['error'][:200]}**" if r.get("error") else _cell(r, "registers"),
            _cell(r, "stack"), f"**{spill}**" if _spills(r) else spill, _cell(r, "smem")))
    lines += ["", f"## CUDA (`nvcc -Xptxas -v`, sm_{arch})", "",
              "| file | kernel | regs | stack | spill st/ld | smem |", "|---|---|---|---|---|---|"]
    for r in crows:
        spill = f"{_cell(r, 'spill_stores')}/{_cell(r, 'spill_loads')}"
        lines.append("| {} | `{}` | {} | {} | {} | {} |".format(
            r["file"], r["kernel"],
            f"**error: {r['error'][-300:]}**".replace("\n", " ") if r.get("error") else _cell(r, "registers"),
            _cell(r, "stack"), f"**{spill}**" if _spills(r) else spill, _cell(r, "smem")))
    n_bad = sum(1 for r in trows + crows if r.get("error") or _spills(r))
    lines += ["", f"{len(trows)} Triton variants, {len(crows)} CUDA kernels; "
              f"{n_bad} with a spill or an error.", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", type=int, default=90)
    ap.add_argument("--out", default=None, help="markdown file (default: print only)")
    ap.add_argument("--skip-cuda", action="store_true")
    ap.add_argument("--skip-triton", action="store_true")
    ap.add_argument("--cuda-log", default=None, metavar="PATH",
                    help="read the CUDA kernels' ptxas reports from this build log instead of compiling")
    args = ap.parse_args(argv)
    trows = [] if args.skip_triton else triton_rows(args.arch)
    if args.skip_cuda:
        crows = []
    else:  # from the build log when it has the reports (an up-to-date build compiles nothing)
        crows = cuda_rows_from_build_log(args.cuda_log) if args.cuda_log and os.path.exists(args.cuda_log) else []
        crows = crows or cuda_rows(args.arch)
    text = markdown(args.arch, trows, crows)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            f.write(text)
    print(text)
    return 1 if any(r.get("error") or _spills(r) for r in trows + crows) else 0


if __name__ == "__main__":
    sys.exit(main())
