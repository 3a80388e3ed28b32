#!/usr/bin/env bash
# Times live reloads of a large configuration: 1000 services of one instance
# each, 1000 routes, on the release build.
#
#   scripts/reload-time.sh [RELOADS]      (default: 10)
#
# The gateway starts with configuration A; each SIGHUP then swaps in the other
# of A and B, which differ in 500 instance URLs and 500 route prefixes, so
# every reload reconciles half the instances and rebuilds every worker's
# snapshot. The time is the gateway's own `configuration reloaded` figure:
# from reading the files to the moment every worker serves the result.
# Instances point at closed loopback ports (probes fail fast, nothing else
# is needed).
set -euo pipefail
cd "$(dirname "$0")/.."

RELOADS=${1:-10}
COUNT=1000
PORT=$((20000 + RANDOM % 20000))

cargo build --release --quiet --bin gatehouse

WORK=$(mktemp -d)
PID=""
cleanup() {
  [ -n "$PID" ] && kill "$PID" 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT

# config VARIANT: A or B; B moves the odd-numbered instances and routes.
config() {
  python3 - "$1" "$COUNT" "$PORT" <<'PY'
import sys
variant, count, port = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
out = [
    "[server]", f'listen = "127.0.0.1:{port}"', "workers = 2",
    "[health]", "interval_ms = 600000", "timeout_ms = 200",
    "[rate_limit]", 'global = ""',
]
for i in range(count):
    moved = variant == "B" and i % 2 == 1
    instance_port = 1024 + i + (count if moved else 0)
    prefix = f"/v2/svc-{i:04}" if moved else f"/svc-{i:04}"
    out += [
        f"[services.svc{i}]", f'instances = ["http://127.0.0.1:{instance_port}"]',
        f"[routes.r{i}]", f'prefix = "{prefix}"', f'service = "svc{i}"',
    ]
print("\n".join(out))
PY
}

mkdir -p "$WORK/settings"
config A >"$WORK/settings/default.toml"
GATEHOUSE_SETTINGS_DIR="$WORK/settings" GATEHOUSE_ENV=bench GATEHOUSE_LOG=info GATEHOUSE_LOG_FORMAT=json \
  target/release/gatehouse 2>"$WORK/log" &
PID=$!
for _ in $(seq 100); do
  grep -q "gatehouse listening" "$WORK/log" 2>/dev/null && break
  sleep 0.1
done

for n in $(seq "$RELOADS"); do
  if [ $((n % 2)) -eq 1 ]; then config B; else config A; fi >"$WORK/settings/default.toml"
  before=$(grep -c "configuration reloaded" "$WORK/log" || true)
  kill -HUP "$PID"
  for _ in $(seq 100); do
    [ "$(grep -c "configuration reloaded" "$WORK/log" || true)" -gt "$before" ] && break
    grep -q "configuration reload failed" "$WORK/log" && { cat "$WORK/log" >&2; exit 1; }
    sleep 0.05
  done
done

grep "configuration reloaded" "$WORK/log" | python3 -c '
import json, statistics, sys
times = [json.loads(line)["fields"]["elapsed_ms"] for line in sys.stdin]
print(f"{len(times)} reloads of 1000 routes and 1000 instances (2 workers): "
      f"median {statistics.median(times):.1f} ms, min {min(times):.1f} ms, max {max(times):.1f} ms")
'
