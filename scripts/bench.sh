#!/usr/bin/env bash
# Benchmarks gatehouse against a direct upstream, a tuned nginx reverse
# proxy, and nginx doing the same per-request work as gatehouse's public route
# (scripts/nginx-equal-work.conf, whose comments say what it does:
# security headers, request id, forwarding headers), side by side, in one
# run, on loopback.
#
#   scripts/bench.sh [ROUNDS] [SECONDS]      (defaults: 5 rounds of 10 s)
#   BASELINE=path/to/gatehouse scripts/bench.sh …
#
# With BASELINE, that binary (an earlier build) serves the public and the
# JWT + Redis-limited routes too, with the same settings, interleaved with
# the others: an A/B of a change in one run. ONLY=<regex> keeps the scenarios whose names match it and skips
# the sustained run, e.g. ONLY='^(nginx|gatehouse public|baseline public)$'
# or ONLY='TLS|h2|handshake' for the HTTPS scenarios alone.
# The system under test (nginx proxy or gatehouse, one worker each) is pinned
# to CPU 0; wrk, the two upstream nginx instances and Redis to the other CPUs.
# Each round runs every scenario once (A B C … A B C …); the table reports
# medians. CPU per request is the proxy's utime+stime from /proc/<pid>/stat
# over the run, divided by the requests wrk completed. "load CPU busy" is how
# busy the load CPUs were over the run (/proc/stat): near 100 %, wrk, the
# upstreams and Redis rather than the proxy limited the requests per second.
#
# HTTPS: both proxies also listen with TLS, with one self-signed ECDSA P-256
# certificate made at start, TLS 1.2 and 1.3, the cipher suites and key
# exchange groups in rustls' order (nginx follows the client's order, as
# rustls does), ALPN h2 and http/1.1. The scenarios "nginx TLS" and
# "gatehouse TLS" are wrk over keep-alive HTTPS/1.1; "nginx h2" and
# "gatehouse h2" are h2load over HTTP/2 (H2_STREAMS, default 4, streams per
# connection; 64 connections); "nginx handshakes" and "gatehouse handshakes"
# are wrk with `Connection: close` on 16 connections, so every request is a
# new TCP connection and a full TLS handshake: nginx keeps no session cache
# and sends no tickets, and wrk is kept from offering the previous session
# (a small LD_PRELOAD shim drops it on SSL_clear), so neither side resumes.
#
# Redis (the "limit:" rows, 64 connections): JWT + a Redis-limited route with
# 64 users in turn (a wrk script rotates their tokens, so the keys spread
# over the slots), on one Redis node and on a Redis Cluster of three masters
# (a second gatehouse with `rate_limit.redis_cluster`), with `sliding_log`
# and `sliding_window` policies. Redis CPU per decision is summed over every
# Redis process (the node and the cluster's masters, idle ones included).
set -euo pipefail
cd "$(dirname "$0")/.."

ROUNDS=${1:-5}
DURATION=${2:-10}
WARMUP=2
H2_STREAMS=${H2_STREAMS:-4}
HANDSHAKE_CONNS=16

need() { command -v "$1" >/dev/null 2>&1; }
if ! need wrk || ! need nginx || ! need redis-server || ! need python3 || ! need pgrep || ! need taskset \
  || ! need openssl || ! need h2load || ! need cc || ! need redis-cli; then
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk nginx redis-server python3 procps util-linux \
    openssl nghttp2-client gcc libc6-dev redis-tools
fi

CPUS=$(nproc)
PROXY_CPU=0
LOAD_CPUS=$([ "$CPUS" -gt 1 ] && echo "1-$((CPUS - 1))" || echo 0)

cargo build --release --quiet --bin gatehouse

WORK=$(mktemp -d)
PIDS=()
TW_REUSE_WAS=""
cleanup() {
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  [ -z "$TW_REUSE_WAS" ] || sysctl -qw "net.ipv4.tcp_tw_reuse=$TW_REUSE_WAS" 2>/dev/null || true
  for conf in "$WORK"/nginx-*.conf; do
    [ -f "$conf" ] && nginx -c "$conf" -p "$WORK" -s stop 2>/dev/null || true
  done
  wait 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT INT TERM

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()'; }
wait_port() { for _ in $(seq 100); do (echo >"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0; sleep 0.05; done; echo "port $1 never opened" >&2; exit 1; }

UP1=$(free_port); UP2=$(free_port); NGINX_PROXY=$(free_port); NGINX_EQUAL=$(free_port); REDIS=$(free_port)
GATEHOUSE=$(free_port); GATEHOUSE_NO_METRICS=$(free_port); GATEHOUSE_INFO_LOG=$(free_port); BASELINE_PORT=$(free_port)
NGINX_TLS=$(free_port); GATEHOUSE_TLS=$(free_port); GATEHOUSE_CLUSTER=$(free_port)
CLUSTER_PORTS=(); while [ ${#CLUSTER_PORTS[@]} -lt 3 ]; do
  port=$(free_port)
  # A cluster node also listens on its port + 10000 (the cluster bus).
  [ "$port" -lt 55000 ] && ! (echo >"/dev/tcp/127.0.0.1/$((port + 10000))") 2>/dev/null && CLUSTER_PORTS+=("$port")
done
head -c 16384 /dev/zero | tr '\0' 'x' >"$WORK/16k.txt"
chmod 755 "$WORK"; chmod 644 "$WORK/16k.txt"   # nginx workers run unprivileged
mkdir -p "$WORK/logs"

# One certificate for both proxies: self-signed ECDSA P-256 for localhost
# and 127.0.0.1 (the key in PKCS#8, which both read).
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 \
  -subj /CN=localhost -addext "subjectAltName=DNS:localhost,IP:127.0.0.1" \
  -keyout "$WORK/key.pem" -out "$WORK/cert.pem" 2>/dev/null
CERT_KIND="self-signed ECDSA P-256"
# wrk keeps a connection's SSL object across reconnects and offers the last
# session again; this drops it, so each of its handshakes is a full one.
cat >"$WORK/noresume.c" <<'EOF'
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stddef.h>
int SSL_clear(void *ssl) {
  static int (*real_clear)(void *);
  static int (*set_session)(void *, void *);
  if (!real_clear) {
    real_clear = (int (*)(void *))dlsym(RTLD_NEXT, "SSL_clear");
    set_session = (int (*)(void *, void *))dlsym(RTLD_NEXT, "SSL_set_session");
  }
  set_session(ssl, NULL);
  return real_clear(ssl);
}
EOF
cc -shared -fPIC -O2 -o "$WORK/noresume.so" "$WORK/noresume.c" -ldl
# The handshake runs open ~thousands of loopback connections a second: let
# TIME_WAIT ports be reused on loopback if that is off (restored at exit).
if [ "$(sysctl -n net.ipv4.tcp_tw_reuse 2>/dev/null || echo 2)" = 0 ]; then
  sysctl -qw net.ipv4.tcp_tw_reuse=2 2>/dev/null && TW_REUSE_WAS=0 || echo "note: net.ipv4.tcp_tw_reuse is 0" >&2
fi

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
# Its TLS server: HTTP/2 as nginx spells it (`http2 on;` from 1.25.1, the
# listen parameter before), no session cache and no tickets (full handshakes
# only), and rustls' cipher suites and groups in rustls' order, the client's
# order preferred (ssl_prefer_server_ciphers off, rustls' default too).
NGINX_VERSION=$(nginx -v 2>&1 | sed -n 's|.*nginx/\([0-9.]*\).*|\1|p')
if printf '1.25.1\n%s\n' "$NGINX_VERSION" | sort -V -C; then
  NGINX_TLS_LISTEN="listen 127.0.0.1:$NGINX_TLS ssl backlog=4096; http2 on;"
else
  NGINX_TLS_LISTEN="listen 127.0.0.1:$NGINX_TLS ssl http2 backlog=4096;"
fi
PROXY_LOCATION='location / {
      proxy_pass http://backend;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header Host $proxy_host;
      proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
    }'
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
    $PROXY_LOCATION
  }
  server {
    $NGINX_TLS_LISTEN
    ssl_certificate $WORK/cert.pem;
    ssl_certificate_key $WORK/key.pem;
    ssl_protocols TLSv1.2 TLSv1.3;
    ssl_prefer_server_ciphers off;
    ssl_ciphers ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-RSA-AES256-GCM-SHA384:ECDHE-RSA-AES128-GCM-SHA256:ECDHE-RSA-CHACHA20-POLY1305;
    ssl_conf_command Ciphersuites TLS_AES_256_GCM_SHA384:TLS_AES_128_GCM_SHA256:TLS_CHACHA20_POLY1305_SHA256;
    ssl_ecdh_curve X25519:prime256v1:secp384r1;
    ssl_session_cache off;
    ssl_session_tickets off;
    $PROXY_LOCATION
  }
}
EOF
taskset -c "$PROXY_CPU" nginx -c "$WORK/nginx-proxy.conf" -p "$WORK"
# nginx doing gatehouse's per-request work (the file's own comments say
# what); it runs in the foreground (daemon off), its pid file in $WORK.
sed -e "s/PROXY_PORT/$NGINX_EQUAL/" -e "s/UPSTREAM_1/$UP1/" -e "s/UPSTREAM_2/$UP2/" \
  scripts/nginx-equal-work.conf >"$WORK/nginx-equal-work.conf"
taskset -c "$PROXY_CPU" nginx -c "$WORK/nginx-equal-work.conf" -p "$WORK" &
PIDS+=($!); NGINX_EQUAL_MASTER=$!

taskset -c "$LOAD_CPUS" redis-server --port "$REDIS" --bind 127.0.0.1 --save "" --appendonly no >/dev/null &
PIDS+=($!); REDIS_PIDS=($!)
# A Redis Cluster of three masters (no replicas: the bench measures decisions).
for port in "${CLUSTER_PORTS[@]}"; do
  mkdir -p "$WORK/cluster-$port"
  taskset -c "$LOAD_CPUS" redis-server --port "$port" --bind 127.0.0.1 --save "" --appendonly no \
    --cluster-enabled yes --cluster-config-file nodes.conf --dir "$WORK/cluster-$port" >/dev/null &
  PIDS+=($!); REDIS_PIDS+=($!)
done
for port in "${CLUSTER_PORTS[@]}"; do wait_port "$port"; done
redis-cli --cluster create $(printf '127.0.0.1:%s ' "${CLUSTER_PORTS[@]}") --cluster-yes >/dev/null
for port in "${CLUSTER_PORTS[@]}"; do
  for _ in $(seq 100); do
    redis-cli -p "$port" cluster info | grep -q '^cluster_state:ok' && break
    sleep 0.1
  done
done
CLUSTER_SEEDS=$(printf 'redis://127.0.0.1:%s,' "${CLUSTER_PORTS[@]}")

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
# What a BASELINE build may not know (the policy's algorithm key) is a layer
# of its own, given to this build's processes only.
cat >"$WORK/sliding-window.toml" <<EOF
[rate_limit.policies.bench_window]
window_s = 1
max = 1000000000
key = "user"
algorithm = "sliding_window"
[routes.windowed]
prefix = "/windowed"
service = "api"
auth = true
strip_prefix = true
rate_limit = "bench_window"
EOF
# The gatehouse under test (access log off, as nginx's), plus two variants
# for the cost of metrics and of the per-request log line at the default
# level (info, written to a file). The main one also has the TLS listener,
# given in its environment only (a BASELINE build may not know [server.tls]).
start_gatehouse() { # port log-level metrics [binary] [TLS port] [VAR=value…]
  local tls=() extra=("${@:6}") args=()
  [ -z "${5:-}" ] || tls=(GATEHOUSE__SERVER__TLS__LISTEN="127.0.0.1:$5"
    GATEHOUSE__SERVER__TLS__CERT_FILE="$WORK/cert.pem" GATEHOUSE__SERVER__TLS__KEY_FILE="$WORK/key.pem")
  [ -n "${4:-}" ] || args=(--config "$WORK/sliding-window.toml")
  env "${tls[@]}" "${extra[@]}" GATEHOUSE_SETTINGS_DIR="$WORK/settings" GATEHOUSE_ENV=bench GATEHOUSE_LOG=$2 \
    GATEHOUSE_METRICS=$3 GATEHOUSE__SERVER__LISTEN="127.0.0.1:$1" \
    taskset -c "$PROXY_CPU" "${4:-./target/release/gatehouse}" "${args[@]}" 2>>"$WORK/logs/gatehouse-$1.log" &
  PIDS+=($!)
}
start_gatehouse "$GATEHOUSE" warn on "" "$GATEHOUSE_TLS"; GATEHOUSE_PID=$!
start_gatehouse "$GATEHOUSE_CLUSTER" warn on "" "" GATEHOUSE__RATE_LIMIT__REDIS_CLUSTER="$CLUSTER_SEEDS"
CLUSTER_GATEHOUSE_PID=$!
start_gatehouse "$GATEHOUSE_NO_METRICS" warn off; NO_METRICS_PID=$!
start_gatehouse "$GATEHOUSE_INFO_LOG" info on; INFO_LOG_PID=$!
PORTS="$UP1 $UP2 $NGINX_PROXY $NGINX_EQUAL $NGINX_TLS $REDIS $GATEHOUSE $GATEHOUSE_TLS $GATEHOUSE_NO_METRICS $GATEHOUSE_INFO_LOG"
PORTS="$PORTS $GATEHOUSE_CLUSTER"
if [ -n "${BASELINE:-}" ]; then
  start_gatehouse "$BASELINE_PORT" warn on "$BASELINE"; BASELINE_PID=$!
  PORTS="$PORTS $BASELINE_PORT"
fi
for port in $PORTS; do wait_port "$port"; done
NGINX_PID=$(pgrep -f "nginx: worker process" -P "$(cat "$WORK/nginx-proxy.pid")" | head -1)
NGINX_EQUAL_PID=$(pgrep -f "nginx: worker process" -P "$NGINX_EQUAL_MASTER" | head -1)
TOKEN=$(GATEHOUSE_SETTINGS_DIR="$WORK/settings" GATEHOUSE_ENV=bench ./target/release/gatehouse token --sub bench --ttl 86400)
# 64 users' tokens, taken in turn by the "users" runs.
{
  echo "local tokens = {"
  for user in $(seq 64); do
    printf '  "Bearer %s",\n' "$(GATEHOUSE_SETTINGS_DIR="$WORK/settings" GATEHOUSE_ENV=bench \
      ./target/release/gatehouse token --sub "user-$user" --ttl 86400)"
  done
  echo "}"
  echo "local next = 0"
  echo "request = function()"
  echo "  next = next % #tokens + 1"
  echo "  return wrk.format(nil, nil, { Authorization = tokens[next] })"
  echo "end"
} >"$WORK/users.lua"

# What each TLS listener negotiates with the OpenSSL client (wrk's), and
# whether it resumes a session when the client offers one (TLS 1.2 session
# ID; the handshake runs never offer one): reported.
tls_facts() { # port
  local out reused
  out=$(openssl s_client -connect "127.0.0.1:$1" -alpn h2,http/1.1 </dev/null 2>/dev/null | tr -d '\0' || true)
  reused=$(openssl s_client -connect "127.0.0.1:$1" -tls1_2 -reconnect </dev/null 2>/dev/null | grep -c '^Reused' || true)
  printf '%s, %s, %s signature, ALPN %s (h2,http/1.1 offered), resumes an offered TLS 1.2 session: %s' \
    "$(sed -n 's/^New, \(TLSv[0-9.]*\), Cipher is \(.*\)/\1 \2/p' <<<"$out" | head -1)" \
    "$(sed -n 's/^Server Temp Key: \([^,]*\).*/\1/p' <<<"$out" | head -1)" \
    "$(sed -n 's/^Peer signature type: \(.*\)/\1/p' <<<"$out" | head -1)" \
    "$(sed -n 's/^ALPN protocol: \(.*\)/\1/p' <<<"$out" | head -1)" \
    "$([ "${reused:-0}" -gt 0 ] && echo yes || echo no)"
}
TLS_FACTS_NGINX=$(tls_facts "$NGINX_TLS")
TLS_FACTS_GATEHOUSE=$(tls_facts "$GATEHOUSE_TLS")

# name | url | pid to measure (empty: none) | extra wrk header | tool: "" wrk,
# h2 h2load, handshake wrk with a new connection (and TLS handshake) a
# request, users wrk with 64 users' tokens in turn
SCENARIOS=(
  "direct|http://127.0.0.1:$UP1/item||"
  "nginx|http://127.0.0.1:$NGINX_PROXY/item|$NGINX_PID|"
  "nginx equal work|http://127.0.0.1:$NGINX_EQUAL/api/products/item|$NGINX_EQUAL_PID|"
  "gatehouse public|http://127.0.0.1:$GATEHOUSE/public/item|$GATEHOUSE_PID|"
  ${BASELINE:+"baseline public|http://127.0.0.1:$BASELINE_PORT/public/item|$BASELINE_PID|"}
  ${BASELINE:+"baseline JWT+Redis limit|http://127.0.0.1:$BASELINE_PORT/limited/item|$BASELINE_PID|Authorization: Bearer $TOKEN"}
  "gatehouse public, no metrics|http://127.0.0.1:$GATEHOUSE_NO_METRICS/public/item|$NO_METRICS_PID|"
  "gatehouse public, info log|http://127.0.0.1:$GATEHOUSE_INFO_LOG/public/item|$INFO_LOG_PID|"
  "gatehouse JWT|http://127.0.0.1:$GATEHOUSE/jwt/item|$GATEHOUSE_PID|Authorization: Bearer $TOKEN"
  "gatehouse JWT+Redis limit|http://127.0.0.1:$GATEHOUSE/limited/item|$GATEHOUSE_PID|Authorization: Bearer $TOKEN"
  "limit: node, sliding_log|http://127.0.0.1:$GATEHOUSE/limited/item|$GATEHOUSE_PID||users"
  "limit: node, sliding_window|http://127.0.0.1:$GATEHOUSE/windowed/item|$GATEHOUSE_PID||users"
  "limit: cluster, sliding_log|http://127.0.0.1:$GATEHOUSE_CLUSTER/limited/item|$CLUSTER_GATEHOUSE_PID||users"
  "limit: cluster, sliding_window|http://127.0.0.1:$GATEHOUSE_CLUSTER/windowed/item|$CLUSTER_GATEHOUSE_PID||users"
  "direct 16KiB|http://127.0.0.1:$UP1/big||"
  "nginx 16KiB|http://127.0.0.1:$NGINX_PROXY/big|$NGINX_PID|"
  "gatehouse 16KiB|http://127.0.0.1:$GATEHOUSE/public/big|$GATEHOUSE_PID|"
  "nginx TLS|https://127.0.0.1:$NGINX_TLS/item|$NGINX_PID|"
  "gatehouse TLS|https://127.0.0.1:$GATEHOUSE_TLS/public/item|$GATEHOUSE_PID|"
  "nginx h2|https://127.0.0.1:$NGINX_TLS/item|$NGINX_PID||h2"
  "gatehouse h2|https://127.0.0.1:$GATEHOUSE_TLS/public/item|$GATEHOUSE_PID||h2"
  "nginx handshakes|https://127.0.0.1:$NGINX_TLS/item|$NGINX_PID|Connection: close|handshake"
  "gatehouse handshakes|https://127.0.0.1:$GATEHOUSE_TLS/public/item|$GATEHOUSE_PID|Connection: close|handshake"
)

cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
redis_ticks() { local pid sum=0; for pid in "${REDIS_PIDS[@]}"; do sum=$((sum + $(cpu_ticks "$pid"))); done; echo "$sum"; }
# Busy and total ticks of the load CPUs (every CPU but the proxy's), from
# /proc/stat: how close wrk, the upstreams and Redis came to saturating them.
load_cpu_ticks() {
  awk -v proxy="cpu$PROXY_CPU" '$1 ~ /^cpu[0-9]+$/ && $1 != proxy {
    busy += $2 + $3 + $4 + $7 + $8; total += $2 + $3 + $4 + $5 + $6 + $7 + $8 }
    END { print busy, total }' /proc/stat
}
rss_kib() { awk '/^VmRSS/ {print $2}' "/proc/$1/status"; }
hwm_kib() { awk '/^VmHWM/ {print $2}' "/proc/$1/status"; }

RESULTS="$WORK/results.tsv"
: >"$RESULTS"
GATEHOUSE_RSS_START=$(rss_kib "$GATEHOUSE_PID")

run_one() { # round name url pid header connections tool
  local round=$1 name=$2 url=$3 pid=$4 header=$5 conns=$6 tool=$7 before after
  local load=(taskset -c "$LOAD_CPUS")
  [ "$tool" = handshake ] && load=(env LD_PRELOAD="$WORK/noresume.so" "${load[@]}")
  if [ "$tool" = h2 ]; then
    "${load[@]}" h2load -t1 -c"$conns" -m"$H2_STREAMS" -D "$WARMUP" "$url" >/dev/null || true
  else
    local script=()
    [ "$tool" = users ] && script=(-s "$WORK/users.lua")
    "${load[@]}" wrk -t1 -c"$conns" -d"${WARMUP}s" "${script[@]}" ${header:+-H "$header"} "$url" >/dev/null
  fi
  before=$([ -n "$pid" ] && cpu_ticks "$pid" || echo 0)
  redis_before=$(redis_ticks)
  read -r load_busy_before load_total_before < <(load_cpu_ticks)
  if [ "$tool" = h2 ]; then
    : >"$WORK/h2load.log"
    "${load[@]}" h2load -t1 -c"$conns" -m"$H2_STREAMS" -D "$DURATION" --log-file="$WORK/h2load.log" "$url" >"$WORK/out.txt" || true
  else
    local args=(-t1 -c"$conns" -d"${DURATION}s" --latency)
    [ -n "$header" ] && args+=(-H "$header")
    [ "$tool" = users ] && args+=(-s "$WORK/users.lua")
    "${load[@]}" wrk "${args[@]}" "$url" >"$WORK/out.txt"
  fi
  after=$([ -n "$pid" ] && cpu_ticks "$pid" || echo 0)
  redis_after=$(redis_ticks)
  read -r load_busy_after load_total_after < <(load_cpu_ticks)
  local load_percent=$(( 100 * (load_busy_after - load_busy_before) / (load_total_after - load_total_before + 1) ))
  python3 - "$round" "$name" "$conns" "$((after - before))" "$(getconf CLK_TCK)" "$RESULTS" "$((redis_after - redis_before))" \
    "$tool" "$WORK" "$load_percent" <<'PY'
import re, statistics, sys
round_, name, conns, ticks, hz, path, redis_ticks, tool, work, load_percent = sys.argv[1:11]
out = open(f"{work}/out.txt").read()
def dur(pattern):
    found = re.search(pattern + r"\s+([\d.]+)(us|ms|s|m)\b", out)
    if not found:
        return float("nan")
    value, unit = found.groups()
    return float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60000.0}[unit]
if tool == "h2":
    # h2load: "finished in 10.00s, 12345.67 req/s, …", "requests: … N done,
    # N succeeded, N failed, …", "status codes: …"; latencies from its log
    # (start µs, status, duration µs per request).
    finished = re.search(r"finished in [\d.]+s, ([\d.]+) req/s", out)
    counts = re.search(r"requests: \d+ total, \d+ started, (\d+) done, (\d+) succeeded, (\d+) failed, (\d+) errored, (\d+) timeout", out)
    if not finished or not counts:
        sys.stderr.write(f"unreadable h2load output for {name}:\n{out}\n")
        sys.exit(0)
    rps = float(finished.group(1))
    requests, succeeded, failed, errored, timeouts = (int(n) for n in counts.groups())
    codes = re.search(r"status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx", out)
    errors = max(failed, requests - int(codes.group(1))) if codes else failed
    latencies = []
    for line in open(f"{work}/h2load.log"):
        fields = line.split()
        if len(fields) == 3:
            latencies.append(int(fields[2]) / 1000)
    if len(latencies) >= 2:
        cuts = statistics.quantiles(latencies, n=100)
        p50, p99 = cuts[49], cuts[98]
    else:
        p50 = p99 = float("nan")
    facts = [re.search(rf"^{key}: (.*)$", out, re.M) for key in ("TLS Protocol", "Cipher", "Server Temp Key", "Application protocol")]
    with open(f"{work}/h2-facts.tsv", "a") as f:
        f.write(name + "\t" + ", ".join(m.group(1).strip() for m in facts if m) + "\n")
else:
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
if errors:
    sys.stderr.write(f"{name}, {conns} connections: {errors} errors or non-2xx responses:\n{out}\n")
cpu_us = int(ticks) / int(hz) * 1e6 / requests if requests and int(ticks) else 0.0
with open(path, "a") as f:
    redis_us = int(redis_ticks) / int(hz) * 1e6 / requests if requests else 0.0
    f.write(f"{round_}\t{name}\t{conns}\t{rps:.0f}\t{p50:.3f}\t{p99:.3f}\t{errors}\t{cpu_us:.2f}\t{redis_us:.2f}\t{load_percent}\n")
PY
}

echo "bench: $ROUNDS rounds x ${DURATION}s, proxy on CPU $PROXY_CPU, load on CPUs $LOAD_CPUS" >&2
for round in $(seq "$ROUNDS"); do
  for conns in 64 256; do
    for scenario in "${SCENARIOS[@]}"; do
      IFS='|' read -r name url pid header tool <<<"$scenario"
      # The metrics and log variants also take the 256-connection runs: a
      # process that has served them keeps more pooled upstream connections,
      # and the comparison with the main process should not hinge on that.
      # HTTP/2 and the handshakes run once a round, in the 64 pass (h2 with
      # H2_STREAMS streams on each of the 64 connections; handshakes on 16,
      # which is plenty for handshakes and spares the ephemeral ports).
      case "$name" in *16KiB*) [ "$conns" = 64 ] || continue ;; esac
      case "$tool" in h2|handshake|users) [ "$conns" = 64 ] || continue ;; esac
      [ -z "${ONLY:-}" ] || [[ "$name" =~ $ONLY ]] || continue
      run_conns=$conns; [ "$tool" = handshake ] && run_conns=$HANDSHAKE_CONNS
      echo "round $round/$ROUNDS: $name, $run_conns connections${tool:+ ($tool)}" >&2
      run_one "$round" "$name" "$url" "$pid" "$header" "$run_conns" "$tool"
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
  "$SUSTAINED_RSS_START" "$SUSTAINED_RSS_END" "$SUSTAINED_REQUESTS" \
  "$H2_STREAMS" "$CERT_KIND" "$TLS_FACTS_NGINX" "$TLS_FACTS_GATEHOUSE" "$WORK/h2-facts.tsv" "$NGINX_VERSION" <<'PY'
import os, statistics, sys
from collections import defaultdict
path, rss_start, rss_end, hwm, rounds, duration, sus_start, sus_end, sus_requests = sys.argv[1:10]
h2_streams, cert_kind, facts_nginx, facts_gatehouse, h2_facts_path, nginx_version = sys.argv[10:16]
TLS_KINDS = ("TLS", "h2", "handshakes")
rows = defaultdict(list)
order = []
for line in open(path):
    rnd, name, conns, rps, p50, p99, errors, cpu, redis_cpu, load = line.rstrip("\n").split("\t")
    key = (name, int(conns))
    if key not in rows:
        order.append(key)
    rows[key].append((float(rps), float(p50), float(p99), int(errors), float(cpu), float(redis_cpu), float(load)))
def med(key, i):
    return statistics.median(r[i] for r in rows[key])
print(f"Medians of {rounds} interleaved rounds of {duration} s (wrk -t1; proxy pinned to one CPU, one worker).")
if any(name.rsplit(" ", 1)[-1] in TLS_KINDS for name, _ in order):
    print(f"HTTPS rows: TLS = wrk, keep-alive HTTP/1.1; h2 = h2load -t1, conns × streams; handshakes = wrk with"
          f" `Connection: close`, a new connection and full TLS handshake per request (req/s = handshakes/s, CPU µs per"
          f" handshake; wrk's latency starts after the handshake). h2 latencies are from h2load's request log.")
print()
print("| scenario | conns | req/s | p50 ms | p99 ms | errors | CPU µs/req | req/s vs direct | req/s vs nginx | CPU vs nginx | load CPU busy |")
print("|---|---|---|---|---|---|---|---|---|---|---|")
for name, conns in order:
    key = (name, conns)
    rps, p50, p99, cpu = med(key, 0), med(key, 1), med(key, 2), med(key, 4)
    errors = sum(r[3] for r in rows[key])
    big = "16KiB" in name
    kind = name.rsplit(" ", 1)[-1] if name.rsplit(" ", 1)[-1] in TLS_KINDS else ""
    direct = ("direct 16KiB" if big else "direct" + (f" {kind}" if kind else ""), conns)
    nginx = ("nginx 16KiB" if big else "nginx" + (f" {kind}" if kind else ""), conns)
    vs_direct = f"{rps / med(direct, 0):.2f}" if direct in rows else ""
    vs_nginx = f"{rps / med(nginx, 0):.2f}" if nginx in rows and not name.startswith("direct") else ""
    cpu_nginx = f"{cpu / med(nginx, 4):.2f}" if nginx in rows and cpu and med(nginx, 4) else ""
    cpu_text = f"{cpu:.1f}" if cpu else "–"
    conns_text = f"{conns}×{h2_streams}" if kind == "h2" else conns
    print(f"| {name} | {conns_text} | {rps:.0f} | {p50:.2f} | {p99:.2f} | {errors} | {cpu_text} | {vs_direct} | {vs_nginx} | {cpu_nginx} | {med(key, 6):.0f} % |")
print()
def ratio(a, b, i):
    return med(a, i) / med(b, i) if a in rows and b in rows and med(b, i) else float("nan")
for conns in (64, 256):
    public, jwt, limited = ("gatehouse public", conns), ("gatehouse JWT", conns), ("gatehouse JWT+Redis limit", conns)
    redis_us = med(limited, 5) if limited in rows else float("nan")
    print(f"- c{conns}: JWT CPU/req vs public {ratio(jwt, public, 4):.2f}x; JWT+Redis req/s vs public {ratio(limited, public, 0):.2f}x"
          f" (Redis CPU {redis_us:.1f} µs per decision, on the load CPU)")
def limit(place, algorithm):
    return (f"limit: {place}, {algorithm}", 64)
if limit("node", "sliding_log") in rows and limit("cluster", "sliding_log") in rows:
    for algorithm in ("sliding_log", "sliding_window"):
        node, cluster = limit("node", algorithm), limit("cluster", algorithm)
        print(f"- Redis, {algorithm}, 64 users: cluster req/s {ratio(cluster, node, 0):.2f}x one node's"
              f" ({med(cluster, 0):.0f} vs {med(node, 0):.0f}; target >= 0.90); Redis CPU per decision"
              f" {med(cluster, 5):.1f} µs summed over the cluster vs {med(node, 5):.1f} µs on one node;"
              f" gateway CPU/req {med(cluster, 4):.1f} vs {med(node, 4):.1f} µs")
    for place in ("node", "cluster"):
        log, window = limit(place, "sliding_log"), limit(place, "sliding_window")
        print(f"- Redis, {place}: sliding_window Redis CPU per decision {ratio(window, log, 5):.2f}x the log's"
              f" ({med(window, 5):.1f} vs {med(log, 5):.1f} µs; target <= 1), req/s {ratio(window, log, 0):.2f}x")
    print(f"- decisions per second the cluster sustains with the gateway on one core: {med(limit('cluster', 'sliding_log'), 0):.0f}"
          f" (sliding_log), {med(limit('cluster', 'sliding_window'), 0):.0f} (sliding_window)")
public, no_metrics, info_log = ("gatehouse public", 64), ("gatehouse public, no metrics", 64), ("gatehouse public, info log", 64)
for conns in (64, 256):
    for route, ours in (("public route", "gatehouse public"), ("JWT+Redis route", "gatehouse JWT+Redis limit")):
        baseline = (ours.replace("gatehouse", "baseline", 1), conns)
        if baseline in rows and (ours, conns) in rows:
            print(f"- c{conns}: this build against BASELINE on the {route}: CPU/req {100 * (ratio((ours, conns), baseline, 4) - 1):+.1f} %,"
                  f" req/s {100 * (ratio((ours, conns), baseline, 0) - 1):+.1f} %, p99 {med((ours, conns), 2):.2f} vs {med(baseline, 2):.2f} ms")
for conns in (64, 256):
    public, equal = ("gatehouse public", conns), ("nginx equal work", conns)
    if public in rows and equal in rows:
        print(f"- c{conns}: gatehouse public against nginx doing equal work: CPU/req {ratio(public, equal, 4):.2f}x"
              f" ({med(public, 4):.1f} vs {med(equal, 4):.1f} µs), p99 {med(public, 2):.2f} vs {med(equal, 2):.2f} ms,"
              f" req/s {ratio(public, equal, 0):.2f}x")
print(f"- metrics cost: CPU/req {100 * (ratio(public, no_metrics, 4) - 1):+.1f} % against no metrics")
print(f"- per-request info log line: CPU/req {100 * (ratio(info_log, public, 4) - 1):+.1f} % against warn level")
print(f"- gatehouse RSS: {int(rss_start)/1024:.1f} MiB idle at start, {int(rss_end)/1024:.1f} MiB at the end, peak {int(hwm)/1024:.1f} MiB")
print(f"- sustained 60 s at 256 connections ({int(sus_requests)} requests): RSS {int(sus_start)/1024:.1f} MiB after 5 s, {int(sus_end)/1024:.1f} MiB at 65 s")
if any(name.rsplit(" ", 1)[-1] in TLS_KINDS for name, _ in order):
    def cpu(name, conns):
        key = (name, conns)
        return f"{med(key, 4):.1f} µs" if key in rows else "n/a"
    def rps(name, conns):
        key = (name, conns)
        return f"{med(key, 0):.0f}" if key in rows else "n/a"
    tls_ratios = ", ".join(f"{ratio(('gatehouse TLS', c), ('nginx TLS', c), 4):.2f}× nginx's at {c} connections"
                           f" ({cpu('gatehouse TLS', c)} vs {cpu('nginx TLS', c)})"
                           for c in (64, 256) if ('gatehouse TLS', c) in rows and ('nginx TLS', c) in rows)
    print(f"- TLS keep-alive: gatehouse CPU/req = {tls_ratios or 'n/a'} (target ≤ 1.3)")
    print(f"- h2 vs h1.1 over TLS: gatehouse CPU/req h2 = {cpu('gatehouse h2', 64)} (64×{h2_streams} streams)"
          f" vs h1.1 = {cpu('gatehouse TLS', 64)} (64 conns) / {cpu('gatehouse TLS', 256)} (256 conns);"
          f" nginx h2 = {cpu('nginx h2', 64)} vs h1.1 = {cpu('nginx TLS', 64)} / {cpu('nginx TLS', 256)};"
          f" gatehouse h2 CPU/req = {ratio(('gatehouse h2', 64), ('nginx h2', 64), 4):.2f}× nginx's")
    hs = [k for k in order if k[0] == "gatehouse handshakes"]
    c = hs[0][1] if hs else 16
    print(f"- handshakes/s on one core ({c} connections, a full handshake each): gatehouse {rps('gatehouse handshakes', c)}"
          f" ({cpu('gatehouse handshakes', c)} CPU/handshake, {1e6 / med(('gatehouse handshakes', c), 4) if ('gatehouse handshakes', c) in rows and med(('gatehouse handshakes', c), 4) else float('nan'):.0f}/s if the core were all its own),"
          f" nginx {rps('nginx handshakes', c)} ({cpu('nginx handshakes', c)} CPU/handshake,"
          f" {1e6 / med(('nginx handshakes', c), 4) if ('nginx handshakes', c) in rows and med(('nginx handshakes', c), 4) else float('nan'):.0f}/s if all its own);"
          f" gatehouse CPU/handshake = {ratio(('gatehouse handshakes', c), ('nginx handshakes', c), 4):.2f}× nginx's")
    print(f"- TLS setup: one {cert_kind} certificate for localhost/127.0.0.1, TLS 1.2 and 1.3, ALPN h2 and http/1.1; nginx {nginx_version}"
          f" with ssl_session_cache off and ssl_session_tickets off, cipher suites and groups in rustls' order")
    print(f"- negotiated with the OpenSSL client (wrk): gatehouse {facts_gatehouse}; nginx {facts_nginx}")
    if os.path.exists(h2_facts_path):
        latest = {}
        for line in open(h2_facts_path):
            name, facts = line.rstrip("\n").split("\t", 1)
            latest[name] = facts
        print("- negotiated with h2load: " + "; ".join(f"{name}: {facts}" for name, facts in latest.items()))
PY
