#!/usr/bin/env bash
# The API contract checked by a tool we did not write: Schemathesis reads the
# /openapi.json a live gateway serves (so new routes are covered without
# editing this file), generates requests for every operation in it and fails
# on any 5xx or any response its document does not describe (status code,
# content type, headers, body schema). Called by scripts/test; runs alone too:
#
#     scripts/schemathesis.sh            # SCHEMATHESIS_EXAMPLES=N for more cases
#
# What runs, all on free loopback ports, in a temporary directory removed on
# exit: a gateway with credentials (API keys required, embedded broker with a
# users file, signed receiver messages, device keys), a fresh SQLite file, a
# receiver and two simulated devices (dev-0000, dev-0001, registered first),
# so commands really complete. Three runs:
#   1. with an all-scope API key: every check (`--checks all`, none excluded);
#   2. without a key: the 401 answers (and the open routes) against the spec;
#   3. with a read-only key: the 403 answers of the writes against the spec.
# Then a command to dev-0001 (the document's example device) must have
# succeeded, so the run went past the refusals to a device and back.
# tests/schemathesis/ holds the two rules the document states only in prose
# (contract_hooks.py: Content-Type on bodyless writes, long-polls shortened
# to 1.5 s) and the one operation whose schema-valid requests may be a 400
# (schemathesis.toml), each with its reason. SCHEMATHESIS_SEED=N repeats a run.
# Needs the gateway, receiver and firmware-sim binaries (built here if absent
# or stale, under $CARGO_TARGET_DIR) and schemathesis (scripts/python-deps.sh).
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf '[schemathesis] %s\n' "$*" >&2; }

PYTHON="${PYTHON:-python3}"
EXAMPLES="${SCHEMATHESIS_EXAMPLES:-25}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/iot-target}"
BIN="$CARGO_TARGET_DIR/debug"
# Schemathesis' settings and hooks: what the document cannot say (read them).
CONFIG="$PWD/tests/schemathesis"

"$PYTHON" -c 'import schemathesis' 2>/dev/null || bash scripts/python-deps.sh
if ! command -v curl >/dev/null; then
    log "installing curl"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq && apt-get install -y -qq curl >/dev/null
fi
cargo build -q -p gateway -p receiver -p firmware-sim --bins --locked

DIR="$(mktemp -d)"
PIDS=()
cleanup() {
    local status=$?
    # SIGTERM (a graceful stop), then SIGKILL for whatever still runs after 15 s.
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    local deadline=$((SECONDS + 15))
    for pid in "${PIDS[@]}"; do
        while kill -0 "$pid" 2>/dev/null && [ "$SECONDS" -lt "$deadline" ]; do sleep 0.1; done
        kill -9 "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    done
    if [ "$status" -ne 0 ]; then
        for f in "$DIR"/*.log; do
            [ -e "$f" ] && { log "last lines of $(basename "$f"):"; tail -n 20 "$f" >&2; }
        done
    fi
    rm -rf "$DIR"
}
trap cleanup EXIT

# Free loopback ports below the kernel's ephemeral range (an outgoing
# connection cannot take them between this check and the bind), each one
# checked by binding it.
read -r HTTP MQTT TCP < <("$PYTHON" - <<'EOF'
import random, socket
low = int(open("/proc/sys/net/ipv4/ip_local_port_range").read().split()[0])
ports = []
while len(ports) < 3:
    port = random.randrange(10000, low if low > 11000 else 32768)
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            continue
    if port not in ports:
        ports.append(port)
print(*ports)
EOF
)
API="http://127.0.0.1:$HTTP"

# Credentials, made up for this run: the message secret, the fleet secret,
# and the receiver's broker login in the Mosquitto password file format
# ($7$: PBKDF2-HMAC-SHA512, docs/security/broker.md).
RX=rx-schemathesis
rand() { "$PYTHON" -c 'import base64, os; print(base64.b64encode(os.urandom(48)).decode())'; }
export GATEWAY_MESSAGE_SECRET; GATEWAY_MESSAGE_SECRET="$(rand)"
FLEET_SECRET="$(rand)"
RX_PASSWORD="$("$PYTHON" -c 'import secrets; print(secrets.token_hex(16))')"
RX_PASSWORD="$RX_PASSWORD" "$PYTHON" - "$RX" >"$DIR/mqtt-users" <<'EOF'
import base64, hashlib, os, sys
salt = os.urandom(12)
digest = hashlib.pbkdf2_hmac("sha512", os.environ["RX_PASSWORD"].encode(), salt, 101)
b64 = lambda b: base64.b64encode(b).decode()
print(f"{sys.argv[1]}:$7$101${b64(salt)}${b64(digest)}")
EOF

DB="sqlite:$DIR/gateway.db"
GATEWAY=("$BIN/gateway")
"${GATEWAY[@]}" token create --database-url "$DB" --name schemathesis \
    --scope commands:write,commands:read,devices:admin >"$DIR/key" 2>>"$DIR/gateway.log"
"${GATEWAY[@]}" token create --database-url "$DB" --name schemathesis-read \
    --scope commands:read >"$DIR/read-key" 2>>"$DIR/gateway.log"
KEY="$(cat "$DIR/key")"
READ_KEY="$(cat "$DIR/read-key")"

# Sync submissions give up after 1 s unless the request says otherwise, so a
# command to an unknown or offline device costs a second, not ten.
"${GATEWAY[@]}" serve --database-url "$DB" --http-listen "127.0.0.1:$HTTP" \
    --mqtt-listen "127.0.0.1:$MQTT" --mqtt-users-file "$DIR/mqtt-users" \
    --device-key-secret "$FLEET_SECRET" --default-wait-ms 1000 \
    >>"$DIR/gateway.log" 2>&1 &
PIDS+=($!)

within() { # SECONDS WHAT COMMAND…: polls COMMAND every 0.2 s until it succeeds.
    local deadline=$((SECONDS + $1)) what=$2
    shift 2
    until "$@" >/dev/null 2>&1; do
        [ "$SECONDS" -lt "$deadline" ] || { log "gave up waiting: $what"; return 1; }
        sleep 0.2
    done
}
within 60 "the gateway's /healthz" curl -fsS "$API/healthz"

for dev in dev-0000 dev-0001; do
    curl -fsS -X PUT "$API/v1/devices/$dev" -H "Authorization: Bearer $KEY" \
        -H 'Content-Type: application/json' -d '{"labels": {"site": "schemathesis"}}' >/dev/null
done
RX_KEY="$("${GATEWAY[@]}" receiver-key "$RX")"
"$BIN/receiver" --receiver-id "$RX" --broker "mqtt://127.0.0.1:$MQTT" \
    --broker-username "$RX" --broker-password "$RX_PASSWORD" --receiver-key "$RX_KEY" \
    --device-key-secret "$FLEET_SECRET" --tcp-listen "127.0.0.1:$TCP" \
    >>"$DIR/receiver.log" 2>&1 &
PIDS+=($!)
"$BIN/firmware-sim" --connect "127.0.0.1:$TCP" --devices 2 --device-key-secret "$FLEET_SECRET" \
    >>"$DIR/firmware-sim.log" 2>&1 &
PIDS+=($!)
online() {
    curl -fsS "$API/v1/devices" -H "Authorization: Bearer $KEY" \
        | "$PYTHON" -c 'import json, sys; sys.exit(0 if sum(d["online"] for d in json.load(sys.stdin)["items"]) == 2 else 1)'
}
within 60 "dev-0000 and dev-0001 online" online
log "gateway on $API, two simulated devices online; $EXAMPLES examples per operation"

run() { # NAME ARGS…: one schemathesis run against the served document.
    local name=$1
    shift
    log "run: $name"
    # From the temporary directory: Hypothesis leaves a .hypothesis/ where it runs.
    (cd "$DIR" && PYTHONPATH="$CONFIG" PYTHONDONTWRITEBYTECODE=1 SCHEMATHESIS_HOOKS=contract_hooks \
        "$PYTHON" -m schemathesis.cli --config-file "$CONFIG/schemathesis.toml" \
        run "$API/openapi.json" --url "$API" \
        --max-examples "$EXAMPLES" --seed "${SCHEMATHESIS_SEED:-$RANDOM}" \
        --workers 2 --request-timeout 15 --generation-database none --no-color "$@")
}

run "all-scope key, every check" --checks all -H "Authorization: Bearer $KEY"
# These two runs are refused on purpose: Schemathesis' warnings that
# authentication failed, or that nothing got past a 404, are what they expect.
run "no key: 401s and open routes" --checks all --phases examples,coverage --warnings off
run "read-only key: 403s on writes" --checks all --phases examples,coverage --warnings off \
    -H "Authorization: Bearer $READ_KEY"
# The document's examples (device dev-0001, command echo) reached a device:
# the run went through the whole path, not only the refusals.
succeeded() {
    curl -fsS "$API/v1/commands?status=succeeded&device_id=dev-0001&limit=1" -H "Authorization: Bearer $KEY" \
        | "$PYTHON" -c 'import json, sys; sys.exit(0 if json.load(sys.stdin)["items"] else 1)'
}
succeeded || { log "no command to dev-0001 succeeded: the examples never reached a device"; exit 1; }
log "passed: no 5xx, every response as the document says"
