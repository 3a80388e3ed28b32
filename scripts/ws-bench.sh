#!/usr/bin/env bash
# WebSocket relay benchmark: TUNNELS concurrent tunnels (default 1000) each
# echoing a small text message back and forth for SECONDS (default 10),
# through gatehouse and straight to the echo server, on loopback.
#
#   scripts/ws-bench.sh [TUNNELS] [SECONDS]
#
# gatehouse (one worker) is pinned to CPU 0; the echo server and the client
# (Python's `websockets`, installed with pip when missing) to the other CPUs.
# Reported: echoes per second both ways, gatehouse's CPU per echo (one
# message relayed each way), and its memory per open idle tunnel (RSS with
# all tunnels open and idle, less RSS before, over TUNNELS).
set -euo pipefail
cd "$(dirname "$0")/.."

TUNNELS=${1:-1000}
SECONDS_RUN=${2:-10}

python3 -c 'import websockets.asyncio.client' 2>/dev/null || python3 -m pip install --quiet 'websockets>=14'
command -v taskset >/dev/null || { echo "taskset (util-linux) is needed" >&2; exit 1; }
CPUS=$(nproc)
LOAD_CPUS=$([ "$CPUS" -gt 1 ] && echo "1-$((CPUS - 1))" || echo 0)

cargo build --release --quiet --bin gatehouse

WORK=$(mktemp -d)
PIDS=()
cleanup() {
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  rm -rf "$WORK"
}
trap cleanup EXIT INT TERM

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()'; }
wait_port() { for _ in $(seq 100); do (echo >"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0; sleep 0.05; done; echo "port $1 never opened" >&2; exit 1; }
ECHO=$(free_port); GATEHOUSE=$(free_port)
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"

cat >"$WORK/echo.py" <<'EOF'
import asyncio, sys
from websockets.asyncio.server import serve
async def echo(ws):
    async for message in ws:
        await ws.send(message)
async def health(connection, request):
    if request.path == "/health":
        return connection.respond(200, "ok\n")
async def main():
    async with serve(echo, "127.0.0.1", int(sys.argv[1]), process_request=health,
                                compression=None, max_queue=None, ping_interval=None, backlog=4096):
        await asyncio.Future()
asyncio.run(main())
EOF
taskset -c "$LOAD_CPUS" python3 "$WORK/echo.py" "$ECHO" &
PIDS+=($!)
wait_port "$ECHO"   # before gatehouse's first health probe

mkdir -p "$WORK/settings"
cat >"$WORK/settings/default.toml" <<EOF
[server]
listen = "127.0.0.1:$GATEHOUSE"
workers = 1
[rate_limit]
global = ""
[upstream]
connect_timeout_ms = 5000
[services.echo]
instances = ["http://127.0.0.1:$ECHO"]
[routes.echo]
prefix = "/"
service = "echo"
websocket = true
EOF
GATEHOUSE_SETTINGS_DIR="$WORK/settings" GATEHOUSE_ENV=bench GATEHOUSE_LOG=warn \
  taskset -c 0 ./target/release/gatehouse 2>"$WORK/gatehouse.log" &
PIDS+=($!); GATEHOUSE_PID=$!
wait_port "$GATEHOUSE"
sleep 0.5

cat >"$WORK/client.py" <<'EOF'
import asyncio, os, sys, time
from websockets.asyncio.client import connect
url, tunnels, seconds, pid = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
def rss_kib():
    if pid == "-":
        return 0
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS"):
            return int(line.split()[1])
def cpu_ticks():
    if pid == "-":
        return 0
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])
async def main():
    before = rss_kib()
    opened = []
    for start in range(0, tunnels, 100):
        opened += await asyncio.gather(*(connect(url, compression=None, max_queue=None,
                                         ping_interval=None, open_timeout=30)
                                         for _ in range(start, min(start + 100, tunnels))))
    await asyncio.sleep(1)
    idle = rss_kib()
    stop = time.monotonic() + seconds
    counts = [0] * tunnels
    async def pump(i, ws):
        message = "x" * 32
        while time.monotonic() < stop:
            await ws.send(message)
            await ws.recv()
            counts[i] += 1
    ticks = cpu_ticks()
    started = time.monotonic()
    await asyncio.gather(*(pump(i, ws) for i, ws in enumerate(opened)))
    elapsed = time.monotonic() - started
    ticks = cpu_ticks() - ticks
    echoes = sum(counts)
    await asyncio.gather(*(ws.close() for ws in opened))
    hz = os.sysconf("SC_CLK_TCK")
    cpu_us = ticks / hz * 1e6 / echoes if echoes and pid != "-" else float("nan")
    print(f"{echoes / elapsed:.0f}\t{cpu_us:.1f}\t{(idle - before) / tunnels:.1f}")
asyncio.run(main())
EOF
run() { taskset -c "$LOAD_CPUS" python3 "$WORK/client.py" "$@"; }
IFS=$'\t' read -r GH_RATE GH_CPU GH_KIB < <(run "ws://127.0.0.1:$GATEHOUSE/echo" "$TUNNELS" "$SECONDS_RUN" "$GATEHOUSE_PID")
IFS=$'\t' read -r DIRECT_RATE _ _ < <(run "ws://127.0.0.1:$ECHO/echo" "$TUNNELS" "$SECONDS_RUN" -)
GH_RSS_END=$(awk '/^VmRSS/ {print $2}' "/proc/$GATEHOUSE_PID/status")
echo "$TUNNELS tunnels, ${SECONDS_RUN} s of 32-byte echoes each way (client and echo server: Python websockets, on CPUs $LOAD_CPUS; gatehouse on CPU 0)"
echo "| path | echoes/s | gatehouse CPU µs per echo | gatehouse RSS per idle tunnel |"
echo "|---|---|---|---|"
echo "| direct | $DIRECT_RATE | – | – |"
echo "| gatehouse | $GH_RATE | $GH_CPU | $GH_KIB KiB |"
echo "- gatehouse RSS after the run, tunnels closed: $((GH_RSS_END / 1024)) MiB"
