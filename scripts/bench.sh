#!/usr/bin/env bash
# Benchmarks gatehouse against a direct upstream and a tuned nginx reverse
# proxy, side by side, in one run, on loopback.
#
#   scripts/bench.sh [ROUNDS] [SECONDS]      (defaults: 5 rounds of 10 s)
#   BASELINE=path/to/gatehouse scripts/bench.sh …
#
# With BASELINE, that binary (an earlier build) serves the public route too,
# with the same settings, interleaved with the others: an A/B of a change in
# one run. ONLY=<regex> keeps the scenarios whose names match it and skips
# the sustained run, e.g. ONLY='^(nginx|gatehouse public|baseline public)$'.
# The system under test (nginx proxy or gatehouse, one worker each) is pinned
# to CPU 0; wrk, the two upstream nginx instances and Redis to the other CPUs.
# Each round runs every scenario once (A B C … A B C …); the table reports
# medians. CPU per request is the proxy's utime+stime from /proc/<pid>/stat
# over the run, divided by the requests wrk completed.
set -euo pipefail
cd "$(dirname "$0")/.."

ROUNDS=${1:-5}
DURATION=${2:-10}
WARMUP=2

need() { command -v "$1" >/dev/null 2>&1; }
if ! need wrk || ! need nginx || ! need redis-server || ! need python3 || ! need pgrep || ! need taskset; then
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  $SUDO DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk nginx redis-server python3 procps util-linux
fi

CPUS=$(nproc)
PROXY_CPU=0
LOAD_CPUS=$([ "$CPUS" -gt 1 ] && echo "1-$((CPUS - 1))" || echo 0)

cargo build --release --quiet --bin gatehouse

WORK=$(mktemp -d)
PIDS=()
cleanup() {
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  for conf in "$WORK"/nginx-*.conf; do
    [ -f "$conf" ] && nginx -c "$conf" -p "$WORK" -s stop 2>/dev/null || true
  done
  wait 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT INT TERM

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()'; }
wait_port() { for _ in $(seq 100); do (echo >"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0; sleep 0.05; done; echo "port $1 never opened" >&2; exit 1; }

UP1=$(free_port); UP2=$(free_port); NGINX_PROXY=$(free_port); REDIS=$(free_port)
GATEHOUSE=$(free_port); GATEHOUSE_NO_METRICS=$(free_port); GATEHOUSE_INFO_LOG=$(free_port); BASELINE_PORT=$(free_port)
head -c 16384 /dev/zero | tr '\0' 'x' >"$WORK/16k.txt"
chmod 755 "$WORK"; chmod 644 "$WORK/16k.txt"   # nginx workers run unprivileged
mkdir -p "$WORK/logs"

# Two fast upstreams: nginx answering a small JSON body (and a 16 KiB one).
for port in $UP1 $UP2; do
  cat >"$WORK/nginx-up-$port.conf" <<EOF
worker_processes 1;
pid $WORK/nginx-up-$port.pid;
error_log $WORK/logs/up-$port.err warn;
events { worker_connections 4096; }
http {
  access_log off;
  keepalive_requests 1000000;
  server {
    listen 127.0.0.1:$port backlog=4096;
    location = /health { default_type application/json; return 200 '{"status":"ok"}'; }
    location /big { default_type text/plain; alias $WORK/16k.txt; }
    location / { default_type application/json; return 200 '{"id":42,"name":"widget","price":9.99}'; }
  }
}
EOF
  taskset -c "$LOAD_CPUS" nginx -c "$WORK/nginx-up-$port.conf" -p "$WORK"
done

# nginx as a tuned reverse proxy: one worker, keep-alive to the upstreams.
cat >"$WORK/nginx-proxy.conf" <<EOF
worker_processes 1;
worker_cpu_affinity 1;
pid $WORK/nginx-proxy.pid;
error_log $WORK/logs/proxy.err warn;
events { worker_connections 4096; }
http {
  access_log off;
  keepalive_requests 1000000;
  upstream backend { server 127.0.0.1:$UP1; server 127.0.0.1:$UP2; keepalive 256; }
  server {
    listen 127.0.0.1:$NGINX_PROXY backlog=4096;
    location / {
      proxy_pass http://backend;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header Host \$proxy_host;
      proxy_set_header X-Forwarded-For \$proxy_add_x_forwarded_for;
    }
  }
}
EOF
taskset -c "$PROXY_CPU" nginx -c "$WORK/nginx-proxy.conf" -p "$WORK"

taskset -c "$LOAD_CPUS" redis-server --port "$REDIS" --bind 127.0.0.1 --save "" --appendonly no >/dev/null &
PIDS+=($!); REDIS_PID=$!

SECRET="bench-secret-0123456789abcdef0123456789"
mkdir -p "$WORK/settings"
cat >"$WORK/settings/default.toml" <<EOF
[server]
listen = "127.0.0.1:$GATEHOUSE"
workers = 1
[auth]
jwt_secret = "$SECRET"
[rate_limit]
backend = "redis"
redis_url = "redis://127.0.0.1:$REDIS"
global = ""
[rate_limit.policies.bench]
window_s = 1
max = 1000000000
key = "user"
[services.api]
instances = ["http://127.0.0.1:$UP1", "http://127.0.0.1:$UP2"]
[routes.public]
prefix = "/public"
service = "api"
strip_prefix = true
[routes.jwt]
prefix = "/jwt"
service = "api"
auth = true
strip_prefix = true
[routes.limited]
prefix = "/limited"
service = "api"
auth = true
strip_prefix = true
rate_limit = "bench"
EOF
# The gatehouse under test (access log off, as nginx's), plus two variants
# for the cost of metrics and of the per-request log line at the default
# level (info, written to a file).
start_gatehouse() { # port log-level metrics [binary]
  GATEHOUSE_SETTINGS_DIR="$WORK/settings" GATEHOUSE_ENV=bench GATEHOUSE_LOG=$2 GATEHOUSE_METRICS=$3 \
    GATEHOUSE__SERVER__LISTEN="127.0.0.1:$1" taskset -c "$PROXY_CPU" "${4:-./target/release/gatehouse}" \
    2>>"$WORK/logs/gatehouse-$1.log" &
  PIDS+=($!)
}
start_gatehouse "$GATEHOUSE" warn on; GATEHOUSE_PID=$!
start_gatehouse "$GATEHOUSE_NO_METRICS" warn off; NO_METRICS_PID=$!
start_gatehouse "$GATEHOUSE_INFO_LOG" info on; INFO_LOG_PID=$!
PORTS="$UP1 $UP2 $NGINX_PROXY $REDIS $GATEHOUSE $GATEHOUSE_NO_METRICS $GATEHOUSE_INFO_LOG"
if [ -n "${BASELINE:-}" ]; then
  start_gatehouse "$BASELINE_PORT" warn on "$BASELINE"; BASELINE_PID=$!
  PORTS="$PORTS $BASELINE_PORT"
fi
for port in $PORTS; do wait_port "$port"; done
NGINX_PID=$(pgrep -f "nginx: worker process" -P "$(cat "$WORK/nginx-proxy.pid")" | head -1)
TOKEN=$(GATEHOUSE_SETTINGS_DIR="$WORK/settings" GATEHOUSE_ENV=bench ./target/release/gatehouse token --sub bench --ttl 86400)

# name | url | pid to measure (empty: none) | extra wrk header
SCENARIOS=(
  "direct|http://127.0.0.1:$UP1/item||"
  "nginx|http://127.0.0.1:$NGINX_PROXY/item|$NGINX_PID|"
  "gatehouse public|http://127.0.0.1:$GATEHOUSE/public/item|$GATEHOUSE_PID|"
  ${BASELINE:+"baseline public|http://127.0.0.1:$BASELINE_PORT/public/item|$BASELINE_PID|"}
  "gatehouse public, no metrics|http://127.0.0.1:$GATEHOUSE_NO_METRICS/public/item|$NO_METRICS_PID|"
  "gatehouse public, info log|http://127.0.0.1:$GATEHOUSE_INFO_LOG/public/item|$INFO_LOG_PID|"
  "gatehouse JWT|http://127.0.0.1:$GATEHOUSE/jwt/item|$GATEHOUSE_PID|Authorization: Bearer $TOKEN"
  "gatehouse JWT+Redis limit|http://127.0.0.1:$GATEHOUSE/limited/item|$GATEHOUSE_PID|Authorization: Bearer $TOKEN"
  "direct 16KiB|http://127.0.0.1:$UP1/big||"
  "nginx 16KiB|http://127.0.0.1:$NGINX_PROXY/big|$NGINX_PID|"
  "gatehouse 16KiB|http://127.0.0.1:$GATEHOUSE/public/big|$GATEHOUSE_PID|"
)

cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
rss_kib() { awk '/^VmRSS/ {print $2}' "/proc/$1/status"; }
hwm_kib() { awk '/^VmHWM/ {print $2}' "/proc/$1/status"; }

RESULTS="$WORK/results.tsv"
: >"$RESULTS"
GATEHOUSE_RSS_START=$(rss_kib "$GATEHOUSE_PID")

run_one() { # round name url pid header connections
  local round=$1 name=$2 url=$3 pid=$4 header=$5 conns=$6 out before after
  local args=(-t1 -c"$conns" -d"${DURATION}s" --latency)
  [ -n "$header" ] && args+=(-H "$header")
  taskset -c "$LOAD_CPUS" wrk -t1 -c"$conns" -d"${WARMUP}s" ${header:+-H "$header"} "$url" >/dev/null
  before=$([ -n "$pid" ] && cpu_ticks "$pid" || echo 0)
  redis_before=$(cpu_ticks "$REDIS_PID")
  out=$(taskset -c "$LOAD_CPUS" wrk "${args[@]}" "$url")
  after=$([ -n "$pid" ] && cpu_ticks "$pid" || echo 0)
  redis_after=$(cpu_ticks "$REDIS_PID")
  python3 - "$round" "$name" "$conns" "$((after - before))" "$(getconf CLK_TCK)" "$RESULTS" "$((redis_after - redis_before))" <<PY
import re, sys
round_, name, conns, ticks, hz, path, redis_ticks = sys.argv[1:8]
out = """$out"""
def dur(pattern):
    found = re.search(pattern + r"\s+([\d.]+)(us|ms|s|m)\b", out)
    if not found:
        return float("nan")
    value, unit = found.groups()
    return float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60000.0}[unit]
found = re.search(r"(\d+) requests in", out)
if not found:
    sys.stderr.write(f"unreadable wrk output for {name}:\n{out}\n")
    sys.exit(0)
requests = int(found.group(1))
rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
p50 = dur(r"50%")
p99 = dur(r"99%")
errors = sum(int(n) for n in re.findall(r"(?:connect|read|write|timeout) (\d+)", out))
non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
errors += int(non2xx.group(1)) if non2xx else 0
cpu_us = int(ticks) / int(hz) * 1e6 / requests if requests and int(ticks) else 0.0
with open(path, "a") as f:
    redis_us = int(redis_ticks) / int(hz) * 1e6 / requests if requests else 0.0
    f.write(f"{round_}\t{name}\t{conns}\t{rps:.0f}\t{p50:.3f}\t{p99:.3f}\t{errors}\t{cpu_us:.2f}\t{redis_us:.2f}\n")
PY
}

echo "bench: $ROUNDS rounds x ${DURATION}s, proxy on CPU $PROXY_CPU, load on CPUs $LOAD_CPUS" >&2
for round in $(seq "$ROUNDS"); do
  for conns in 64 256; do
    for scenario in "${SCENARIOS[@]}"; do
      IFS='|' read -r name url pid header <<<"$scenario"
      # The metrics and log variants also take the 256-connection runs: a
      # process that has served them keeps more pooled upstream connections,
      # and the comparison with the main process should not hinge on that.
      case "$name" in *16KiB*) [ "$conns" = 64 ] || continue ;; esac
      [ -z "${ONLY:-}" ] || [[ "$name" =~ $ONLY ]] || continue
      echo "round $round/$ROUNDS: $name, $conns connections" >&2
      run_one "$round" "$name" "$url" "$pid" "$header" "$conns"
    done
  done
done
# Sustained load: is the gateway's memory flat? 60 s at 256 connections on
# the public route, RSS sampled after a 5 s warm-up and at the end.
SUSTAINED_RSS_START=0; SUSTAINED_RSS_END=0; SUSTAINED_REQUESTS=0
if [ -z "${ONLY:-}" ]; then
  echo "sustained: 65 s on the public route, 256 connections" >&2
  taskset -c "$LOAD_CPUS" wrk -t1 -c256 -d65s "http://127.0.0.1:$GATEHOUSE/public/item" >"$WORK/sustained.txt" &
  WRK_PID=$!
  sleep 5
  SUSTAINED_RSS_START=$(rss_kib "$GATEHOUSE_PID")
  wait "$WRK_PID"
  SUSTAINED_RSS_END=$(rss_kib "$GATEHOUSE_PID")
  SUSTAINED_REQUESTS=$(awk '/requests in/ {print $1}' "$WORK/sustained.txt")
fi
GATEHOUSE_RSS_END=$(rss_kib "$GATEHOUSE_PID")
GATEHOUSE_HWM=$(hwm_kib "$GATEHOUSE_PID")

python3 - "$RESULTS" "$GATEHOUSE_RSS_START" "$GATEHOUSE_RSS_END" "$GATEHOUSE_HWM" "$ROUNDS" "$DURATION" \
  "$SUSTAINED_RSS_START" "$SUSTAINED_RSS_END" "$SUSTAINED_REQUESTS" <<'PY'
import statistics, sys
from collections import defaultdict
path, rss_start, rss_end, hwm, rounds, duration, sus_start, sus_end, sus_requests = sys.argv[1:10]
rows = defaultdict(list)
order = []
for line in open(path):
    rnd, name, conns, rps, p50, p99, errors, cpu, redis_cpu = line.rstrip("\n").split("\t")
    key = (name, int(conns))
    if key not in rows:
        order.append(key)
    rows[key].append((float(rps), float(p50), float(p99), int(errors), float(cpu), float(redis_cpu)))
def med(key, i):
    return statistics.median(r[i] for r in rows[key])
print(f"Medians of {rounds} interleaved rounds of {duration} s (wrk -t1; proxy pinned to one CPU, one worker).\n")
print("| scenario | conns | req/s | p50 ms | p99 ms | errors | CPU µs/req | req/s vs direct | req/s vs nginx | CPU vs nginx |")
print("|---|---|---|---|---|---|---|---|---|---|")
for name, conns in order:
    key = (name, conns)
    rps, p50, p99, cpu = med(key, 0), med(key, 1), med(key, 2), med(key, 4)
    errors = sum(r[3] for r in rows[key])
    big = "16KiB" in name
    direct = ("direct 16KiB" if big else "direct", conns)
    nginx = ("nginx 16KiB" if big else "nginx", conns)
    vs_direct = f"{rps / med(direct, 0):.2f}" if direct in rows else ""
    vs_nginx = f"{rps / med(nginx, 0):.2f}" if nginx in rows and not name.startswith("direct") else ""
    cpu_nginx = f"{cpu / med(nginx, 4):.2f}" if nginx in rows and cpu and med(nginx, 4) else ""
    cpu_text = f"{cpu:.1f}" if cpu else "–"
    print(f"| {name} | {conns} | {rps:.0f} | {p50:.2f} | {p99:.2f} | {errors} | {cpu_text} | {vs_direct} | {vs_nginx} | {cpu_nginx} |")
print()
def ratio(a, b, i):
    return med(a, i) / med(b, i) if a in rows and b in rows and med(b, i) else float("nan")
for conns in (64, 256):
    public, jwt, limited = ("gatehouse public", conns), ("gatehouse JWT", conns), ("gatehouse JWT+Redis limit", conns)
    redis_us = med(limited, 5) if limited in rows else float("nan")
    print(f"- c{conns}: JWT CPU/req vs public {ratio(jwt, public, 4):.2f}x; JWT+Redis req/s vs public {ratio(limited, public, 0):.2f}x"
          f" (Redis CPU {redis_us:.1f} µs per decision, on the load CPU)")
public, no_metrics, info_log = ("gatehouse public", 64), ("gatehouse public, no metrics", 64), ("gatehouse public, info log", 64)
for conns in (64, 256):
    baseline = ("baseline public", conns)
    if baseline in rows:
        print(f"- c{conns}: this build against BASELINE on the public route: CPU/req {100 * (ratio(('gatehouse public', conns), baseline, 4) - 1):+.1f} %,"
              f" req/s {100 * (ratio(('gatehouse public', conns), baseline, 0) - 1):+.1f} %, p99 {med(('gatehouse public', conns), 2):.2f} vs {med(baseline, 2):.2f} ms")
print(f"- metrics cost: CPU/req {100 * (ratio(public, no_metrics, 4) - 1):+.1f} % against no metrics")
print(f"- per-request info log line: CPU/req {100 * (ratio(info_log, public, 4) - 1):+.1f} % against warn level")
print(f"- gatehouse RSS: {int(rss_start)/1024:.1f} MiB idle at start, {int(rss_end)/1024:.1f} MiB at the end, peak {int(hwm)/1024:.1f} MiB")
print(f"- sustained 60 s at 256 connections ({int(sus_requests)} requests): RSS {int(sus_start)/1024:.1f} MiB after 5 s, {int(sus_end)/1024:.1f} MiB at 65 s")
PY
