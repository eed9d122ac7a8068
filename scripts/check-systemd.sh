#!/usr/bin/env bash
# `systemd-analyze verify` on deploy/systemd/*.service (part of scripts/test;
# skipped, saying so, where systemd-analyze is missing). verify wants each
# ExecStart executable to exist, so every unit is checked from a temporary
# copy whose /usr/local/bin/<name> is the binary just built. verify exits 0
# on unknown keys and bad values (it only warns): any output is a failure.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v systemd-analyze >/dev/null; then
    echo "systemd-analyze not found: deploy/systemd units not checked"
    exit 0
fi
bin="${CARGO_TARGET_DIR:-$HOME/.cache/iot-target}/debug"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
for unit in deploy/systemd/*.service; do
    name=$(basename "$unit" .service)
    if [ ! -x "$bin/$name" ]; then
        echo "$bin/$name is not built (cargo build -p $name)"
        exit 1
    fi
    sed "s|/usr/local/bin/$name|$bin/$name|" "$unit" >"$tmp/$name.service"
done
if ! out=$(systemd-analyze verify "$tmp"/*.service 2>&1) || [ -n "$out" ]; then
    echo "systemd-analyze verify found problems in deploy/systemd:"
    echo "$out"
    exit 1
fi
echo "deploy/systemd units verified"
