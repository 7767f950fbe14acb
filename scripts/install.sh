#!/usr/bin/env bash
# Install kadapt into .venv (created in the repository root if missing), compiling the CUDA
# extension kadapt._C when the toolkit is there (no GPU needed). Idempotent: re-running it
# re-installs kadapt (re-using build/ objects) and leaves torch alone.
#
#   bash scripts/install.sh && .venv/bin/python examples/quickstart.py
#   bash scripts/install.sh && .venv/bin/pytest -q tests
#
# Environment: PYTHON (interpreter for the venv, default python3, >= 3.10), CUDA_HOME,
# TORCH_CUDA_ARCH_LIST (default "8.0;9.0"), MAX_JOBS, KADAPT_NO_CUDA=1 (pure-Python install).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PYTHON="${PYTHON:-python3}"

if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 10))' \
        || { echo "install.sh: kadapt needs Python >= 3.10 ($PYTHON is $("$PYTHON" -V 2>&1))" >&2; exit 1; }
    echo "install.sh: creating .venv with $("$PYTHON" -V 2>&1)"
    "$PYTHON" -m venv .venv
fi
PIP=(.venv/bin/python -m pip -q --disable-pip-version-check)

"${PIP[@]}" install --upgrade pip
# Build requirements must already be in the venv: the build runs without isolation so that it
# compiles against this torch (Python >= 3.12 venvs come without setuptools).
echo "install.sh: installing torch (first time: a few minutes)"
"${PIP[@]}" install torch==2.14.1 numpy "setuptools>=64" wheel ninja

if [ -z "${CUDA_HOME:-}" ] && [ -d /usr/local/cuda ]; then
    export CUDA_HOME=/usr/local/cuda   # nvcc on PATH may be a wrapper script: don't guess from it
fi
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-8.0;9.0}"

# Keep build/temp* (ninja re-uses the compiled objects) but drop build/lib*: setuptools would
# otherwise ship Python files since deleted from kadapt/ in the new wheel.
rm -rf build/lib.* build/bdist.*
echo "install.sh: building and installing kadapt (CUDA_HOME=${CUDA_HOME:-unset}, TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST)"
"${PIP[@]}" install --no-build-isolation ".[test,examples,train]"

# Report from outside the repository: run from its root, `python -m` would import the source tree.
(cd / && "$ROOT/.venv/bin/python" -m kadapt info)
