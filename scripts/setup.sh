#!/usr/bin/env bash
# Sets up ./.venv from scratch (or refreshes it) and builds fusedreg in place.
# Needs only python3 (>= 3.10) and a C++ compiler; builds the CUDA kernels too when nvcc is
# found (CUDA_HOME or /usr/local/cuda) and torch is a CUDA build.
#   FUSEDREG_TORCH    torch requirement (default: torch==2.14.1, the CUDA 13.0 build, which
#                     also lets the CUDA kernels compile and link on a machine without a GPU)
#   FUSEDREG_EXTRAS   extra pip requirements (default: the test and benchmark extras)
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip setuptools wheel
python -m pip install -q "${FUSEDREG_TORCH:-torch==2.14.1}" triton pytest ninja
python -m pip install -q ${FUSEDREG_EXTRAS:-matplotlib tqdm transformers timm hypothesis expecttest}

if [ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ]; then
  export CUDA_HOME=/usr/local/cuda
fi
# In CI a CUDA compile error must fail the run, so the CUDA part is required when nvcc exists.
if [ "${CI:-}" = "true" ] && [ -n "${CUDA_HOME:-}" ] && [ -z "${FUSEDREG_BUILD_CUDA:-}" ]; then
  export FUSEDREG_BUILD_CUDA=1
fi
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
if ! python -m pip install -v --no-build-isolation --no-deps -e . > .venv/build.log 2>&1; then
  tail -n 60 .venv/build.log
  echo "fusedreg build failed (full log: .venv/build.log)" >&2
  exit 1
fi
grep -E "\[fusedreg setup\]" .venv/build.log || true
python - <<'PY'
import fusedreg
for name, why in fusedreg.backend_status().items():
    print(f"  backend {name:9s}: {why}")
PY
