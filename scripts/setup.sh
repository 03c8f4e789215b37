#!/usr/bin/env bash
# Creates .venv (once) and installs kfac_lab with its test extras. Idempotent and quick when done.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
VPY=.venv/bin/python
stamp=.venv/.kfac_lab_installed
want=$(cat pyproject.toml constraints.txt | sha256sum | cut -c1-16)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
    exit 0
fi
"$VPY" -m pip install -q --upgrade pip
# torch first, from the pinned CPU wheel, when it is absent (another spec downloads GBs).
if ! "$VPY" -c "import torch" 2>/dev/null; then
    "$VPY" -m pip install -q torch==2.13.0
fi
"$VPY" -m pip install -q -c constraints.txt -e ".[test]"
echo "$want" > "$stamp"
