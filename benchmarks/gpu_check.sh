#!/usr/bin/env bash
# The one GPU check: on a machine with an NVIDIA GPU (written for the H200 machine: torch,
# Triton, nvcc and ninja installed, no network), from the repository root:
#
#     bash benchmarks/gpu_check.sh OUTDIR
#
# 1. env        versions (python, torch, triton, nvcc, gcc) and nvidia-smi -> OUTDIR/summary.txt
# 2. build      fusedreg._C with the CUDA kernels, in place (setup.py build_ext --inplace,
#               FUSEDREG_BUILD_CUDA=1, MAX_JOBS=16, TORCH_CUDA_ARCH_LIST=9.0, ptxas -v in the
#               log) -> OUTDIR/build.log; nothing is installed, nothing downloaded
# 3. import     fusedreg.backend_status() and the CUDA dispatch key of the C++ ops
# 4. resources  (in the background, during 5) registers/smem/spills of every Triton spec
#               (sm_90) and every CUDA kernel (from the build log) -> OUTDIR/sm90_resources.md
# 5. pytest     the whole suite on the GPU, FUSEDREG_TEST_NO_INTERPRET=1 (triton compiles for
#               the GPU; 8 xdist workers if installed) -> OUTDIR/junit.xml, OUTDIR/pytest.log
# 6. bench      python -m fusedreg.bench --device cuda --quick (all ops) -> OUTDIR/bench.csv,
#               OUTDIR/bench.log, plots packed in OUTDIR/plots.tar.gz
# 7. target     the headline case: bias_dropout, bf16, 16384x8192 (same CSV and log)
# 8. train      examples/train_gpt.py, 60 bf16 steps: torch, fusedreg, torch.compile (tokens/s,
#               peak memory, loss) -> OUTDIR/bench.log, CSV/PNG inside plots.tar.gz
#
# Every step runs under `timeout`, inside one overall deadline (CHECK_BUDGET_S, default 460 s)
# so that the whole script ends in under 8 minutes. A failed build or import stops the script
# at once (nothing after it could run); any other failed step does not stop the others. The
# last thing printed is a table of step, status and seconds, and the test counts; the exit
# status is 1 if any step failed or timed out. OUTDIR ends with at most 8 files (what the
# device tool brings back).
set -u
set -o pipefail

if [ $# -ne 1 ]; then
    echo "usage: $0 OUTDIR" >&2
    exit 2
fi
OUT=$1
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT" || exit 2

PY=${PYTHON:-python3}
START=$(date +%s)
DEADLINE=$((START + ${CHECK_BUDGET_S:-460}))
SUMMARY=$OUT/summary.txt
STEPS=()
export PYTHONUNBUFFERED=1

# run_step NAME LIMIT_S LOG CMD...: runs CMD under timeout (capped by the deadline), appends its
# output to LOG, prints the log's tail, records "NAME|status|seconds".
run_step() {
    local name=$1 limit=$2 log=$3
    shift 3
    local left=$((DEADLINE - $(date +%s)))
    if [ "$left" -lt 20 ]; then
        STEPS+=("$name|skipped (deadline)|0")
        echo "=== $name: skipped, ${left}s left ==="
        return 0
    fi
    if [ "$limit" -gt "$left" ]; then limit=$left; fi
    echo "=== $name (limit ${limit}s) ==="
    local t0 rc status
    t0=$(date +%s)
    timeout --kill-after=10 "$limit" "$@" >>"$log" 2>&1
    rc=$?
    case $rc in
        0) status=ok ;;
        124 | 137) status="TIMEOUT (${limit}s)" ;;
        *) status="FAIL rc=$rc" ;;
    esac
    STEPS+=("$name|$status|$(($(date +%s) - t0))")
    tail -n 15 "$log"
    return "$rc"
}

# ---- summary (printed last) --------------------------------------------------------------
summary() {
    {
        echo
        echo "==================== fusedreg GPU check summary ===================="
        printf '%-10s %-28s %8s\n' step status seconds
        for s in "${STEPS[@]}"; do
            IFS='|' read -r name status secs <<<"$s"
            printf '%-10s %-28s %8s\n' "$name" "$status" "$secs"
        done
        printf '%-10s %-28s %8s\n' total "" "$(($(date +%s) - START))"
        if [ -f "$OUT/junit.xml" ]; then
            "$PY" - "$OUT/junit.xml" <<'EOF'
import sys
import xml.etree.ElementTree as ET
root = ET.parse(sys.argv[1]).getroot()
suites = [root] if root.tag == "testsuite" else list(root)
n = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
print("pytest: {tests} tests, {failures} failed, {errors} errors, {skipped} skipped".format(**n))
bad = [f"{c.get('classname')}::{c.get('name')}" for s in suites for c in s.iter("testcase")
       if c.find("failure") is not None or c.find("error") is not None]
for name in bad[:15]:
    print("  FAILED", name)
if len(bad) > 15:
    print(f"  ... and {len(bad) - 15} more (pytest.log)")
EOF
        fi
        if [ -f "$OUT/sm90_resources.md" ]; then
            grep -E "variants, .* kernels;" "$OUT/sm90_resources.md"
        fi
        echo "files in $OUT:" "$OUT"/*
    } | tee -a "$SUMMARY"
}

# finish: prints the summary; exits 1 if any step failed, timed out or was skipped.
finish() {
    summary
    for s in "${STEPS[@]}"; do
        IFS='|' read -r name status secs <<<"$s"
        if [ "$status" != ok ]; then
            echo "GPU check FAILED: step $name: $status" | tee -a "$SUMMARY"
            exit 1
        fi
    done
    echo "GPU check passed" | tee -a "$SUMMARY"
    exit 0
}

# ---- 1. env ------------------------------------------------------------------------------
t0=$(date +%s)
{
    echo "fusedreg GPU check, $(date -u +%FT%TZ), $(uname -srm)"
    echo "repo: $ROOT, commit: $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)"
    echo "python: $(command -v "$PY") $("$PY" --version 2>&1)"
    "$PY" - <<'EOF' 2>&1
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "| gpu:",
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none",
      "| SMs:", torch.cuda.get_device_properties(0).multi_processor_count if torch.cuda.is_available() else "-")
try:
    import triton
    print("triton", triton.__version__)
except ImportError as e:
    print("triton: not importable:", e)
for m in ("pytest", "pytest_timeout", "matplotlib", "ninja"):
    try:
        mod = __import__(m)
        print(m, getattr(mod, "__version__", "present"))
    except ImportError:
        print(m, "missing")
EOF
    echo "nvcc: $(command -v nvcc) $(nvcc --version 2>&1 | tail -n 2 | tr '\n' ' ')"
    echo "gcc: $(gcc --version 2>&1 | head -n 1)"
    nvidia-smi 2>&1
} >"$SUMMARY"
cat "$SUMMARY"
STEPS+=("env|ok|$(($(date +%s) - t0))")

# ---- 2. build ----------------------------------------------------------------------------
# CUDA_HOME: as given, else /usr/local/cuda, else where nvcc really lives (a /usr/local/bin/nvcc
# link would make it /usr/local, where the linker finds no libcudart).
if [ -z "${CUDA_HOME:-}" ]; then
    if [ -x /usr/local/cuda/bin/nvcc ]; then
        CUDA_HOME=/usr/local/cuda
    else
        CUDA_HOME=$(dirname "$(dirname "$(readlink -f "$(command -v nvcc)")")")
    fi
fi
export CUDA_HOME
echo "CUDA_HOME=$CUDA_HOME" >>"$SUMMARY"
if ! run_step build 240 "$OUT/build.log" \
    env FUSEDREG_BUILD_CUDA=1 MAX_JOBS=16 TORCH_CUDA_ARCH_LIST=9.0 \
    FUSEDREG_NVCC_FLAGS="-Xptxas -v" "$PY" setup.py build_ext --inplace; then
    echo "STOP: the CUDA build failed (versions above; log: build.log); nothing else can run" >&2
    finish
fi

# ---- 3. import ---------------------------------------------------------------------------
# Every registered op must have a CUDA kernel (C++) or a Triton implementation that can run.
run_step import 60 "$OUT/import.tmp" "$PY" -c '
import torch, fusedreg
from fusedreg import backends
print("backend_status:", fusedreg.backend_status())
bad = []
for op in sorted(backends.AUTO):
    have = backends.implemented_backends(op, "cuda")
    print(f"{op:14s} runs on cuda with: {have}")
    bad += [f"{op}/{b}" for b in ("triton", "cuda") if b not in have]
cpp = [n for n in torch._C._dispatch_get_all_op_names() if n.startswith("fusedreg::")
       and not n.endswith(("_reference", "_triton"))]
bad += [n for n in cpp if not torch._C._dispatch_has_kernel_for_dispatch_key(n, "CUDA")]
print("missing on the GPU:", bad or "nothing")
raise SystemExit(1 if bad else 0)'
import_ok=$?
cat "$OUT/import.tmp" >>"$OUT/build.log" 2>/dev/null
rm -f "$OUT/import.tmp"
if [ "$import_ok" -ne 0 ]; then
    echo "STOP: fusedreg does not import with every GPU backend (see above); nothing else can run" >&2
    finish
fi

# ---- 4. resources (background) and 5. pytest -----------------------------------------------
t_res=$(date +%s)
timeout --kill-after=10 150 "$PY" benchmarks/resource_report.py --arch 90 \
    --out "$OUT/sm90_resources.md" --cuda-log "$OUT/build.log" >"$OUT/resources.tmp" 2>&1 &
RES_PID=$!

# Triton compiles each kernel variant on first use (CPU-bound): 8 xdist workers when present.
# The default selection (not slow): every op's GPU cases for both GPU backends; the slow ones
# (sm_80/sm_90 compiles, torchrun, training runs) are CPU checks or step 8 here.
PYTEST_ARGS=(-q -rfE -p no:cacheprovider -m "not slow" --junitxml="$OUT/junit.xml")
if "$PY" -c "import pytest_timeout" 2>/dev/null; then PYTEST_ARGS+=(--timeout=150); fi
if "$PY" -c "import xdist" 2>/dev/null; then PYTEST_ARGS+=(-n 8); fi
run_step pytest 240 "$OUT/pytest.log" \
    env FUSEDREG_TEST_NO_INTERPRET=1 "$PY" -m pytest "${PYTEST_ARGS[@]}" tests

wait "$RES_PID"
rc=$?
case $rc in 0) st=ok ;; 1) st="spills or errors (see md)" ;; 124 | 137) st=TIMEOUT ;; *) st="FAIL rc=$rc" ;; esac
STEPS+=("resources|$st|$(($(date +%s) - t_res))")
cat "$OUT/resources.tmp" >>"$OUT/build.log"
rm -f "$OUT/resources.tmp"

# ---- 6. bench, 7. target case ------------------------------------------------------------
BENCH_HELP=$("$PY" -m fusedreg.bench --help 2>&1)
bench_args=(--device cuda)
if grep -q -- "--no-progress" <<<"$BENCH_HELP"; then bench_args+=(--no-progress); fi
if grep -q -- "--csv" <<<"$BENCH_HELP"; then bench_args+=(--csv "$OUT/bench.csv"); fi
quick_args=("${bench_args[@]}")
if grep -q -- "--quick" <<<"$BENCH_HELP"; then quick_args+=(--quick); fi
if grep -q -- "--plots" <<<"$BENCH_HELP"; then quick_args+=(--plots "$OUT/plots"); fi
run_step bench 120 "$OUT/bench.log" "$PY" -m fusedreg.bench "${quick_args[@]}"

target_args=("${bench_args[@]}" --ops bias_dropout --dtypes bfloat16 --sizes 16384x8192)
if grep -q -- "--no-plots" <<<"$BENCH_HELP"; then target_args+=(--no-plots); fi
run_step target 100 "$OUT/bench.log" "$PY" -m fusedreg.bench "${target_args[@]}"

# ---- 8. the training example (torch vs fusedreg vs torch.compile), if time is left
run_step train 80 "$OUT/bench.log" "$PY" examples/train_gpt.py --device cuda --steps 60 --bf16 \
    --runs torch fusedreg torch.compile --out "$OUT/plots/train_gpt"

if [ -d "$OUT/plots" ]; then
    tar -czf "$OUT/plots.tar.gz" -C "$OUT" plots && rm -rf "$OUT/plots"
fi


finish
