#!/usr/bin/env bash
# Installs what the console's browser test (tests/tests/console.rs) drives:
# Debian's chromium and chromium-driver (/usr/bin/chromium,
# /usr/bin/chromedriver). Installed only: the test starts chromedriver on a
# free loopback port itself, and chromedriver starts chromium headless.
# Idempotent: installs only what is missing.
set -euo pipefail

log() { printf '[browser] %s\n' "$*" >&2; }

missing=()
[ -x /usr/bin/chromium ] || missing+=(chromium)
[ -x /usr/bin/chromedriver ] || missing+=(chromium-driver)
if [ "${#missing[@]}" -gt 0 ]; then
    log "installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq "${missing[@]}" >/dev/null
fi
log "chromium $(/usr/bin/chromium --version 2>/dev/null | awk '{print $2}') and chromedriver are installed"
