#!/usr/bin/env bash
# Chaos: kill -9 the orchestrator at random moments while VMs are being created, restart it,
# and check the invariants after every round:
#   1. no acknowledged request is lost (every VM the API answered 201 for exists);
#   2. the live state hash equals a fresh replay straight from JetStream;
#   3. every VM ends up running on exactly one host, and host allocations add up.
# Bounded: ROUNDS rounds (default 5) of up to VMS creates each (default 40). Loopback only.
# usage: chaos/orchestrator-crashes.sh [ROUNDS] [VMS]      (or: make chaos)
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${1:-5}
VMS=${2:-40}
BIN=${NOVACRON_BIN:-target/debug/novacron}
NATS=${NOVACRON_NATS_SERVER:-$(deploy/find-nats-server.sh 2.10 .tools/nats/bin/nats-server)}
[ -x "$BIN" ] || { echo "build first: cargo build -p novacron-cli" >&2; exit 2; }
[ -n "$NATS" ] || { echo "no nats-server >= 2.10: run make tools" >&2; exit 2; }

WORK=$(mktemp -d -t novacron-chaos-XXXX)
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do { kill -9 "$p" && wait "$p"; } 2>/dev/null || true; done; rm -rf "$WORK"; }
trap cleanup EXIT

mkdir -p "$WORK/ports"
"$NATS" -a 127.0.0.1 -p -1 -js --store_dir "$WORK/store" --ports_file_dir "$WORK/ports" -l "$WORK/nats.log" &
PIDS+=($!)
for _ in $(seq 100); do ls "$WORK"/ports/*.ports >/dev/null 2>&1 && break; sleep 0.05; done
URL=$(grep -o 'nats://[0-9.:]*' "$WORK"/ports/*.ports | head -n1)
echo "nats at $URL; work dir $WORK"

"$BIN" agent --nats "$URL" --host chaos --count 4 --vcpus 64 --memory-mib 262144 --data-dir "$WORK/agents" 2>"$WORK/agents.log" &
PIDS+=($!)

start_orchestrator() {
  rm -f "$WORK/orch/orchestrator.addr"
  "$BIN" orchestrator --nats "$URL" --http 127.0.0.1:0 --data-dir "$WORK/orch" >/dev/null 2>>"$WORK/orch.log" &
  ORCH=$!
  PIDS+=($ORCH)
  for _ in $(seq 300); do [ -s "$WORK/orch/orchestrator.addr" ] && break; sleep 0.05; done
  API="http://$(cat "$WORK/orch/orchestrator.addr")"
  for _ in $(seq 300); do curl -sf "$API/readyz" >/dev/null && break; sleep 0.05; done
}

json() { python3 -c "import json,sys; d=json.load(sys.stdin); print($1)"; }
: > "$WORK/acked"
start_orchestrator
for round in $(seq "$ROUNDS"); do
  # Create VMs in the background; record every acknowledged id.
  (
    for i in $(seq "$VMS"); do
      out=$(curl -s -w '\n%{http_code}' -X POST "$API/api/v1/vms" \
        -d "{\"name\":\"r$round-v$i\",\"vcpus\":1,\"memory_mib\":256}") || break
      code=$(tail -n1 <<<"$out")
      [ "$code" = 201 ] || break
      head -n1 <<<"$out" | json 'd["id"]' >> "$WORK/acked"
    done
  ) &
  creator=$!
  sleep "0.$((RANDOM % 9 + 1))"
  { kill -9 "$ORCH" && wait "$ORCH"; } 2>/dev/null || true
  wait "$creator" || true
  start_orchestrator

  # 1. nothing acknowledged is lost
  lost=0
  while read -r id; do
    code=$(curl -s -o /dev/null -w '%{http_code}' "$API/api/v1/vms/$id")
    [ "$code" = 200 ] || { echo "LOST acknowledged VM $id (HTTP $code)"; lost=1; }
  done < "$WORK/acked"
  [ $lost = 0 ] || exit 1

  # 3. everything converges to running, each VM on one host, allocations consistent
  ok=0
  for _ in $(seq 200); do
    not_running=$("$BIN" --server "$API" vm list -o json | json 'sum(1 for v in d if v["status"] != "running")')
    [ "$not_running" = 0 ] && { ok=1; break; }
    sleep 0.1
  done
  [ $ok = 1 ] || { echo "VMs did not converge to running"; exit 1; }
  "$BIN" --server "$API" vm list -o json > "$WORK/vms.json"
  "$BIN" --server "$API" host list -o json > "$WORK/hosts.json"
  python3 - "$WORK/vms.json" "$WORK/hosts.json" <<'PY'
import json, sys
vms = json.load(open(sys.argv[1])); hosts = json.load(open(sys.argv[2]))
assert all(v["host"] for v in vms), "a running VM without a host"
for h in hosts:
    mine = [v for v in vms if v["host"] == h["id"]]
    assert h["vms"] == len(mine), f'{h["id"]}: {h["vms"]} != {len(mine)}'
    assert h["allocated_vcpus"] == sum(v["vcpus"] for v in mine), h["id"]
    assert h["allocated_vcpus"] <= h["vcpus"], f'{h["id"]} overcommitted'
PY

  # 2. the live hash equals a fresh replay from JetStream
  live=$(curl -s "$API/api/v1/state")
  replayed=$("$BIN" --nats "$URL" state -o json | json 'json.dumps(d, sort_keys=True)')
  live=$(json 'json.dumps(d, sort_keys=True)' <<<"$live")
  [ "$live" = "$replayed" ] || { echo "state mismatch: live $live vs replay $replayed"; exit 1; }
  echo "round $round: $(wc -l < "$WORK/acked") acknowledged VMs all present and running; state $(json 'd["hash"][:16]' <<<"$live")"
done
echo "chaos: all invariants held over $ROUNDS rounds"
