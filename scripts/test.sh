#!/usr/bin/env bash
# Runs the whole test suite; fails when pytest collected no test (exit 5) and always prints
# pytest's summary line.
set -uo pipefail
cd "$(dirname "$0")/.."
.venv/bin/python -m pytest "$@"
rc=$?
if [ "$rc" -eq 5 ]; then
    echo "test.sh: pytest collected no tests -- failing (a suite that runs nothing proves nothing)" >&2
    exit 1
fi
exit "$rc"
