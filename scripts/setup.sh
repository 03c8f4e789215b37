#!/usr/bin/env bash
# Creates .venv (once) and installs kfac_lab with its test extras; in a git clone, also sets up
# nbstripout's git filter so notebooks are committed without outputs. Idempotent and quick when done.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
VPY=.venv/bin/python
stamp=.venv/.kfac_lab_installed
want=$(cat pyproject.toml constraints.txt | sha256sum | cut -c1-16)
if ! [ -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    "$VPY" -m pip install -q --upgrade pip
    # torch first, from the pinned CPU wheel, when it is absent (another spec downloads GBs).
    if ! "$VPY" -c "import torch" 2>/dev/null; then
        "$VPY" -m pip install -q torch==2.13.0
    fi
    "$VPY" -m pip install -q -c constraints.txt -e ".[test]"
    echo "$want" > "$stamp"
fi
# Outputs stay out of git: the filter strips them from the .ipynb files git stores (your working
# copy keeps them). Local to this clone (.git/config, .git/info/attributes); `.venv/bin/nbstripout
# --uninstall` removes it.
if git rev-parse --is-inside-work-tree >/dev/null 2>&1 && ! .venv/bin/nbstripout --is-installed 2>/dev/null; then
    .venv/bin/nbstripout --install
fi
