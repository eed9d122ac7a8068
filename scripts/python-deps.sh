#!/usr/bin/env bash
# Installs from PyPI what the Modbus tests need (tests/modbus_server.py):
# pymodbus 3.x with its serial extra (pyserial), and socat (Debian) for the
# pseudo-terminal pairs of the RTU tests; and Schemathesis, pinned, for the
# API contract run (scripts/schemathesis.sh). Idempotent: installs only what
# is missing.
set -euo pipefail

log() { printf '[python-deps] %s\n' "$*" >&2; }

PYTHON="${PYTHON:-python3}"

if ! command -v "$PYTHON" >/dev/null; then
    log "installing python3 and pip"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq && apt-get install -y -qq python3 python3-pip >/dev/null
fi

if ! "$PYTHON" -c 'import sys, pymodbus, serial; sys.exit(0 if pymodbus.__version__.startswith("3.") else 1)' 2>/dev/null; then
    log "installing pymodbus[serial] 3.x"
    # Debian's system Python refuses pip installs without this (PEP 668).
    "$PYTHON" -m pip install --quiet --disable-pip-version-check --break-system-packages 'pymodbus[serial]==3.*' 2>/dev/null \
        || "$PYTHON" -m pip install --quiet --disable-pip-version-check 'pymodbus[serial]==3.*'
fi
"$PYTHON" -c 'import pymodbus; print("[python-deps] pymodbus", pymodbus.__version__)' >&2

# Pinned: a new Schemathesis release may add checks or change how it reads
# the document, and the run must not go red without a change here.
SCHEMATHESIS_VERSION=4.32.5
if ! "$PYTHON" -c "import sys, schemathesis; sys.exit(0 if schemathesis.__version__ == '$SCHEMATHESIS_VERSION' else 1)" 2>/dev/null; then
    log "installing schemathesis $SCHEMATHESIS_VERSION"
    "$PYTHON" -m pip install --quiet --disable-pip-version-check --break-system-packages "schemathesis==$SCHEMATHESIS_VERSION" 2>/dev/null \
        || "$PYTHON" -m pip install --quiet --disable-pip-version-check "schemathesis==$SCHEMATHESIS_VERSION"
fi
"$PYTHON" -c 'import schemathesis; print("[python-deps] schemathesis", schemathesis.__version__)' >&2

if ! command -v socat >/dev/null; then
    log "installing socat"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq && apt-get install -y -qq socat >/dev/null
fi
