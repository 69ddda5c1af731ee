#!/usr/bin/env bash
# Builds the C++ extension (CPU kernels only) with AddressSanitizer and UndefinedBehavior-
# Sanitizer into build/sanitize/ (the in-place fusedreg/_C*.so is left alone), then runs the
# CPU tests against that build. Exits non-zero on any sanitizer report or test failure.
#
#   bash scripts/sanitize.sh                 # the default CPU subset (below)
#   bash scripts/sanitize.sh tests/test_strides.py -k cpu   # any pytest arguments instead
#
# Environment: PYTHON (default .venv/bin/python), MAX_JOBS (default 1).
# How: the .so is compiled with -fsanitize=address,undefined -fno-sanitize-recover=all (so
# that a UB report aborts like an ASan one), copied next to a copy of the Python package in
# build/sanitize/pkg, and pytest runs from there (its working directory comes first on
# sys.path, so `import fusedreg` finds the copy). The Python interpreter is not built with
# ASan, so the ASan runtime is LD_PRELOADed; leak detection is off (CPython and torch keep
# allocations alive at exit by design).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-$ROOT/.venv/bin/python}"
OUT="$ROOT/build/sanitize"
SAN="-fsanitize=address,undefined -fno-sanitize-recover=all -fno-omit-frame-pointer"
cd "$ROOT"

echo "[sanitize] building into $OUT (log: $OUT/build.log; unchanged sources are not recompiled)"
mkdir -p "$OUT"
start=$(date +%s)
# -O1 (the usual optimization level for sanitizer builds: a fraction of -O3's compile time
# for the three instruction-set copies of every loop) goes in FUSEDREG_CPU_ARCH, the one
# variable setup.py appends after its own -O3.
if ! CFLAGS="$SAN" LDFLAGS="$SAN" FUSEDREG_CPU_ARCH="-O1 ${FUSEDREG_CPU_ARCH:-}" \
    FUSEDREG_BUILD_CUDA=0 MAX_JOBS="${MAX_JOBS:-1}" \
    "$PYTHON" setup.py build_ext --build-temp "$OUT/temp" --build-lib "$OUT/lib" \
    > "$OUT/build.log" 2>&1; then
  tail -30 "$OUT/build.log"
  echo "[sanitize] build failed"
  exit 2
fi
so=$(ls "$OUT"/lib/fusedreg/_C*.so)
echo "[sanitize] built $so in $(( $(date +%s) - start )) s"

rm -rf "$OUT/pkg"
mkdir -p "$OUT/pkg"
cp -r fusedreg "$OUT/pkg/fusedreg"
find "$OUT/pkg" \( -name '_C*.so' -o -name '__pycache__' \) -prune -exec rm -rf {} +
cp "$so" "$OUT/pkg/fusedreg/"

# libstdc++ is preloaded with the ASan runtime: the python binary does not link it, and ASan's
# __cxa_throw interceptor must find it at start (else the first C++ throw, in Triton's
# import, trips an ASan CHECK)
libasan=$(gcc -print-file-name=libasan.so)
libstdcxx=$(gcc -print-file-name=libstdc++.so)
[ -e "$libasan" ] || { echo "[sanitize] libasan.so not found"; exit 2; }

if [ $# -eq 0 ]; then
  # the C++ kernels' tests, the Triton interpreter's cases left out (no C++ in them)
  set -- tests/test_bias_dropout.py tests/test_layer_norm.py tests/test_optim.py \
         tests/test_special_values.py tests/test_strides.py tests/test_op_validation.py \
         tests/test_properties.py tests/test_batch_norm.py -k "not triton" -m "not slow"
fi
args=()
for a in "$@"; do  # test paths are relative to the repository root
  if [ -e "$ROOT/$a" ]; then args+=("$ROOT/$a"); else args+=("$a"); fi
done

echo "[sanitize] running pytest ${args[*]}"
start=$(date +%s)
cd "$OUT/pkg"
set +e
LD_PRELOAD="$libasan $libstdcxx" \
  ASAN_OPTIONS="detect_leaks=0:halt_on_error=1:abort_on_error=1:detect_odr_violation=0" \
  UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1" \
  OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}" \
  "$PYTHON" -m pytest -q -p no:cacheprovider "${args[@]}" 2>&1 | tee "$OUT/test.log"
rc=${PIPESTATUS[0]}
set -e
echo "[sanitize] tests took $(( $(date +%s) - start )) s, exit code $rc"
if grep -qE "ERROR: AddressSanitizer|runtime error:|ERROR: LeakSanitizer" "$OUT/test.log"; then
  echo "[sanitize] sanitizer reports found (see $OUT/test.log)"
  exit 1
fi
exit "$rc"
