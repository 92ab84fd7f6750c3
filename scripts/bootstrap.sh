#!/usr/bin/env bash
# Install latentmoe (editable) and its dependencies into the current Python.
# An existing torch (e.g. a CUDA build on a GPU machine) is kept; otherwise the CPU build is installed.
# `dev` also installs what the test suite needs outside Python: Debian's chromium and chromium-driver
# for the chat-page browser test (through apt-get, as root or with sudo).
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

if [ "$extras" = "dev" ] && ! { command -v chromium >/dev/null && command -v chromedriver >/dev/null; }; then
    echo "[bootstrap] installing chromium and chromium-driver (the chat-page test drives a headless browser)"
    if [ "$(id -u)" = 0 ]; then as_root=(env); elif command -v sudo >/dev/null; then as_root=(sudo env); else
        echo "[bootstrap] error: chromium and chromium-driver are missing and this user cannot install them;" \
             "run: sudo apt-get install chromium chromium-driver" >&2
        exit 1
    fi
    "${as_root[@]}" DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null
    "${as_root[@]}" DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null
fi
