#!/usr/bin/env bash
# Install Debian's espeak-ng (and sox) for the speech data (reverie data speech renders spoken digits with it; only
# tests/test_audio.py::test_espeak_renders_a_word needs it, and skips with the reason where it is missing). Never
# fails the caller: where it cannot be installed it says so.
set -uo pipefail
if command -v espeak-ng >/dev/null 2>&1; then
    echo "install_espeak: $(espeak-ng --version 2>/dev/null | head -n 1) is already installed"
    exit 0
fi
SUDO=""
if [ "$(id -u)" != "0" ]; then
    if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
        SUDO="sudo -n"
    else
        echo "install_espeak: WARNING: not root and no password-less sudo: cannot apt-get install espeak-ng;" \
             "the espeak-ng test will be SKIPPED" >&2
        exit 0
    fi
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "install_espeak: WARNING: no apt-get (not Debian/Ubuntu): install espeak-ng yourself;" \
         "the espeak-ng test will be SKIPPED" >&2
    exit 0
fi
export DEBIAN_FRONTEND=noninteractive
if $SUDO apt-get update -q >/tmp/install_espeak.log 2>&1 \
        && $SUDO apt-get install -y -q espeak-ng sox >>/tmp/install_espeak.log 2>&1 \
        && command -v espeak-ng >/dev/null 2>&1; then
    echo "install_espeak: installed $(espeak-ng --version 2>/dev/null | head -n 1)"
else
    echo "install_espeak: WARNING: apt-get install espeak-ng failed (log: /tmp/install_espeak.log);" \
         "the espeak-ng test will be SKIPPED" >&2
    tail -n 5 /tmp/install_espeak.log >&2 || true
fi
exit 0
