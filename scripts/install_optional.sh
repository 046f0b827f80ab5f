#!/usr/bin/env bash
# Install Debian packages that some tests need, e.g.
#   bash scripts/install_optional.sh chromium "the browser test" chromium
#   bash scripts/install_optional.sh espeak-ng "the espeak-ng test" espeak-ng sox
# (COMMAND to check for, WHAT skips without it, PACKAGES). Never fails the caller: where the packages cannot be
# installed it says so, and those tests then skip with a reason naming what is missing (pytest -ra shows it).
set -uo pipefail
cmd=$1 what=$2; shift 2
log=/tmp/install_$cmd.log
version() { "$cmd" --version 2>/dev/null | head -n 1 || echo "$cmd"; }
if command -v "$cmd" >/dev/null 2>&1; then
    echo "install: $(version) is already installed"
    exit 0
fi
SUDO=""
if [ "$(id -u)" != "0" ]; then
    if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
        SUDO="sudo -n"
    else
        echo "install: WARNING: not root and no password-less sudo: cannot apt-get install $*; $what will be SKIPPED" >&2
        exit 0
    fi
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "install: WARNING: no apt-get (not Debian/Ubuntu): install $* yourself; $what will be SKIPPED" >&2
    exit 0
fi
export DEBIAN_FRONTEND=noninteractive
if $SUDO apt-get update -q >"$log" 2>&1 && $SUDO apt-get install -y -q "$@" >>"$log" 2>&1 \
        && command -v "$cmd" >/dev/null 2>&1; then
    echo "install: installed $(version)"
else
    echo "install: WARNING: apt-get install $* failed (log: $log); $what will be SKIPPED" >&2
    tail -n 5 "$log" >&2 || true
fi
exit 0
