#!/usr/bin/env bash
# Smoke run of the whole stack against an already running broker (and MongoDB, if the
# persister is configured for it): start persister, controller and one agent, wait until
# every health check passes and the agent's answers are stored, then stop them cleanly.
# Configure with FLEET_* variables (CI: the eclipse-mosquitto and mongo service containers).
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-.venv/bin}
work=$(mktemp -d)
export FLEET_PERSISTER_HEARTBEAT_PATH=$work/persister.heartbeat.json
export FLEET_CONTROLLER_HEARTBEAT_PATH=$work/controller.heartbeat.json
export FLEET_AGENT_HEARTBEAT_PATH=$work/agent.heartbeat.json
export FLEET_AGENT_OUTBOX_PATH=$work/outbox.db
export FLEET_PERSISTER_SQLITE_PATH=${FLEET_PERSISTER_SQLITE_PATH:-$work/fleet.db}
export FLEET_MQTT_TOPIC_PREFIX=smoke$$
agent_id=smoke-agent-$$
pids=()

stop_all() {
    for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
}
fail() {
    echo "smoke: $*" >&2
    stop_all
    for log in "$work"/*.log; do echo "----- $log"; tail -n 40 "$log"; done
    exit 1
}
wait_until() {  # wait_until SECONDS DESCRIPTION COMMAND...
    local deadline=$((SECONDS + $1)) what=$2
    shift 2
    until "$@" >/dev/null 2>&1; do
        [ "$SECONDS" -lt "$deadline" ] || fail "timed out waiting for $what"
        sleep 1
    done
}
answers_stored() {
    "$BIN/fleetctl" status --json | python3 -c "
import json, sys
rows = [r for r in json.load(sys.stdin) if r['agent_id'] == '$agent_id']
sys.exit(0 if rows and rows[0]['online'] and rows[0]['answered'] >= 7 else 1)"
}

"$BIN/fleet-persister" >"$work/persister.log" 2>&1 & pids+=($!)
"$BIN/fleet-controller" >"$work/controller.log" 2>&1 & pids+=($!)
"$BIN/fleet-agent" --id "$agent_id" >"$work/agent.log" 2>&1 & pids+=($!)

wait_until 60 "fleet-persister --check" "$BIN/fleet-persister" --check
wait_until 60 "fleet-controller --check" "$BIN/fleet-controller" --check
wait_until 60 "fleet-agent --check" "$BIN/fleet-agent" --check
wait_until 90 "all seven answers of $agent_id to be stored" answers_stored
"$BIN/fleetctl" status
stop_all
"$BIN/fleet-persister" --check && fail "fleet-persister --check still passes after it stopped"
echo "smoke: ok"
