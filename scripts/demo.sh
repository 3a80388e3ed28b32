#!/usr/bin/env bash
# Starts example upstream services on loopback and the gateway in front of
# them on the shipped defaults, then prints curl commands to try.
# Ctrl-C stops everything this script started.
set -euo pipefail
cd "$(dirname "$0")/.."

cargo build --release --quiet --bin gatehouse --example upstream

pids=()
cleanup() {
  trap - INT TERM EXIT
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  echo "demo stopped"
}
trap cleanup INT TERM EXIT

./target/release/examples/upstream 127.0.0.1:3001 user >/dev/null & pids+=($!)
./target/release/examples/upstream 127.0.0.1:3002 product >/dev/null & pids+=($!)
./target/release/examples/upstream 127.0.0.1:3003 order >/dev/null & pids+=($!)
./target/release/examples/upstream 127.0.0.1:3004 admin >/dev/null & pids+=($!)

GATEHOUSE_ENV=development ./target/release/gatehouse & pids+=($!)

for _ in $(seq 50); do
  curl -fs http://127.0.0.1:8080/health >/dev/null 2>&1 && break
  sleep 0.1
done

TOKEN=$(./target/release/gatehouse token --sub demo-user 2>/dev/null || true)
ADMIN_TOKEN=$(./target/release/gatehouse token --sub demo-admin --role admin 2>/dev/null || true)

cat <<MSG

gatehouse is running on http://127.0.0.1:8080 in front of four example services.
Try:

  curl -s http://127.0.0.1:8080/health
  curl -si http://127.0.0.1:8080/api/products/42
  curl -si http://127.0.0.1:8080/api/users/7                      # 401: token required
  curl -si http://127.0.0.1:8080/api/users/7 -H "Authorization: Bearer $TOKEN"
  curl -si http://127.0.0.1:8080/api/admin/stats -H "Authorization: Bearer $TOKEN"        # 403
  curl -si http://127.0.0.1:8080/api/admin/stats -H "Authorization: Bearer $ADMIN_TOKEN"
  curl -si http://127.0.0.1:8080/nowhere                          # 404

Press Ctrl-C to stop.
MSG

wait
