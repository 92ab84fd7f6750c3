#!/usr/bin/env bash
# Install latentmoe (editable) and its dependencies into the current Python.
# An existing torch (e.g. a CUDA build on a GPU machine) is kept; otherwise the CPU build is installed.
set -euo pipefail
PY=${PYTHON:-python3}
cd "$(dirname "$0")/.."
if ! "$PY" -c "import torch" >/dev/null 2>&1; then
    echo "[bootstrap] installing torch"
    "$PY" -m pip install --quiet "torch==2.13.0"
fi
extras=${1:-}
spec="."
if [ -n "$extras" ]; then spec=".[$extras]"; fi
if [ "$extras" = "dev" ] || [ -z "$extras" ]; then spec=".[${extras:-serve,train}]"; fi
echo "[bootstrap] pip install -e $spec"
"$PY" -m pip install --quiet --disable-pip-version-check -e "$spec"
