#!/usr/bin/env bash
# Installs Debian's chromium for the dashboard browser tests (Playwright drives it through
# executable_path; `playwright install` cannot download a browser offline). Idempotent and
# quiet: does nothing when a chromium is already on the PATH or at /usr/bin/chromium.
set -euo pipefail
for exe in "${KFAC_LAB_CHROMIUM:-}" /usr/bin/chromium /usr/bin/chromium-browser; do
    if [ -n "$exe" ] && [ -x "$exe" ]; then
        exit 0
    fi
done
if command -v chromium >/dev/null 2>&1; then
    exit 0
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1; then
        SUDO="sudo"
    else
        echo "install_browser.sh: chromium is missing and this user cannot run apt-get (not root, no sudo);" \
             "install it with: apt-get install -y chromium" >&2
        exit 1
    fi
fi
log=$(mktemp)
trap 'rm -f "$log"' EXIT
if ! { $SUDO apt-get update -qq \
       && $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; } >"$log" 2>&1; then
    cat "$log" >&2
    echo "install_browser.sh: could not install chromium with apt-get (output above)" >&2
    exit 1
fi
if ! [ -x /usr/bin/chromium ]; then
    echo "install_browser.sh: apt-get finished but /usr/bin/chromium is missing" >&2
    exit 1
fi
