#!/usr/bin/env bash
# Install Debian's chromium for the browser test (tests/test_browser.py drives it through Playwright, so no
# `playwright install` download is needed). Never fails the caller: where the browser cannot be installed it
# says so, and the browser test then skips with a reason naming what is missing (pytest -ra shows it).
set -uo pipefail
if command -v chromium >/dev/null 2>&1; then
    echo "install_chromium: $(chromium --version 2>/dev/null || echo chromium) is already installed"
    exit 0
fi
SUDO=""
if [ "$(id -u)" != "0" ]; then
    if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
        SUDO="sudo -n"
    else
        echo "install_chromium: WARNING: not root and no password-less sudo: cannot apt-get install chromium;" \
             "the browser test will be SKIPPED" >&2
        exit 0
    fi
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "install_chromium: WARNING: no apt-get (not Debian/Ubuntu): install chromium yourself;" \
         "the browser test will be SKIPPED" >&2
    exit 0
fi
export DEBIAN_FRONTEND=noninteractive
if $SUDO apt-get update -q >/tmp/install_chromium.log 2>&1 \
        && $SUDO apt-get install -y -q chromium >>/tmp/install_chromium.log 2>&1 \
        && command -v chromium >/dev/null 2>&1; then
    echo "install_chromium: installed $(chromium --version 2>/dev/null || echo chromium)"
else
    echo "install_chromium: WARNING: apt-get install chromium failed (log: /tmp/install_chromium.log);" \
         "the browser test will be SKIPPED" >&2
    tail -n 5 /tmp/install_chromium.log >&2 || true
fi
exit 0
