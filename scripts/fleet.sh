#!/usr/bin/env bash
# Starts a gatehouse fleet on loopback (SPEC 12) and shows one rate-limit
# policy holding exactly across it:
#
#   Redis Cluster      3 masters + 3 replicas             ports B … B+5 (cluster bus B+10000 …)
#   example upstreams  user, product, order, admin        ports B+11 … B+14
#   gatehouse          gw1, gw2, gw3 (one worker each)    ports B+21 … B+23
#   HAProxy            round robin over gw1–gw3           port  B+80
#
# B is FLEET_PORT_BASE (default 7000). Every port, and every cluster bus port,
# must be free at start: a taken one is named and nothing is started.
#
#   scripts/fleet.sh                   start the fleet, run one burst, then watch
#                                      the cluster until Ctrl-C
#   scripts/fleet.sh burst [ADDRESS | :PORT]
#                                      (another terminal) one more burst through
#                                      the running fleet: from a fresh client, from
#                                      ADDRESS (127.x.y.z) again, or from a fresh
#                                      client whose keys are in the slots of the
#                                      Redis node on PORT
#
# The three gateways read one settings file (written to the temp dir, layered
# over settings/ as `--config`; GATEHOUSE__SERVER__LISTEN gives each its
# port): `rate_limit.backend = "redis"` with `redis_cluster` = the six nodes,
# a policy "fleet" of MAX requests (100) per WINDOW_S seconds (60) per client
# address on the public route /api/products (no global policy, so a burst is
# counted by that policy alone; ALGORITHM=sliding_window picks the other
# algorithm), and `trusted_proxies = ["127.0.0.1/32"]`, HAProxy's address.
#
# A burst sends BURST requests (300), CONCURRENCY at a time (10), with curl
# through HAProxy from one client address: curl binds its source to a fresh
# loopback address 127.x.y.z (or ADDRESS, to repeat a client); HAProxy drops
# any X-Forwarded-For the client sent and writes the address it saw (`option
# forwardfor`), which the gateways use as the client address since HAProxy is
# a trusted proxy. HAProxy names the gateway that answered in an `X-Gateway`
# response header; the burst counts 200s (admitted) and 429s per gateway,
# reads each gateway's gatehouse_rate_limit_backend_errors_total before and
# after (decisions that Redis did not make, `on_backend_error` did), and
# compares the total admitted with the policy's max (from RateLimit-Policy).
# A fresh client must be admitted exactly max times, whichever gateways
# served it. `burst` exits 1 when it is not.
#
# Things to try (printed with the actual ports once the fleet is up; M is
# the master holding the first burst's client, R its replica):
#   - `redis-cli -p M debug segfault; scripts/fleet.sh burst :M` (or kill -9
#     its pid): after cluster-node-timeout (2 s) the cluster marks M failed
#     and promotes R (this terminal prints each change of the masters); until
#     then M's slots cannot answer, so their decisions fall back to
#     on_backend_error ("local": each gateway counts alone, so up to 3 × max
#     are admitted), which the burst right after the kill shows.
#   - `scripts/fleet.sh burst :R` after the promotion: exactly max again.
#   - `scripts/fleet.sh burst ADDRESS` with the first burst's client, within
#     its window: the promoted replica had its counts, so it is admitted no
#     more (counts M had not yet replicated would be lost: Redis replication
#     is asynchronous).
# The nodes run with cluster-require-full-coverage no, so while one master's
# slots are down the other masters keep answering for theirs; with
# repl-diskless-sync-delay 0, so a replica's first sync starts at once (a
# replica that never synced cannot be promoted: the script waits for every
# replica's link to be up before it starts the gateways); and with
# `--enable-debug-command local` (Redis 7) for `debug segfault`.
#
# Ctrl-C, or any exit, stops everything the script started and removes its
# temp dir (settings, HAProxy config, every process's log). HAProxy, Redis and
# curl are installed from the distribution when missing (apt-get, with sudo
# when not root).
set -euo pipefail
cd "$(dirname "$0")/.."

fail() {
  echo >&2
  echo "fleet.sh: ERROR: $*" >&2
  exit 1
}

BASE=${FLEET_PORT_BASE:-7000}
if [[ ! $BASE =~ ^[0-9]+$ ]] || ((BASE < 1024 || BASE + 10005 > 65535)); then
  fail "FLEET_PORT_BASE must be a number from 1024 to 55530 (its cluster bus ports are 10000 above)"
fi
MAX=${MAX:-100}
WINDOW_S=${WINDOW_S:-60}
ALGORITHM=${ALGORITHM:-}
BURST=${BURST:-300}
CONCURRENCY=${CONCURRENCY:-10}
for knob in MAX WINDOW_S BURST CONCURRENCY; do
  [[ ${!knob} =~ ^[1-9][0-9]*$ ]] || fail "$knob must be a positive whole number, not \"${!knob}\""
done

POLICY=fleet
KEY_PREFIX=gatehouse:rl
REDIS_PORTS=("$BASE" $((BASE + 1)) $((BASE + 2)) $((BASE + 3)) $((BASE + 4)) $((BASE + 5)))
UPSTREAMS=($((BASE + 11)):user $((BASE + 12)):product $((BASE + 13)):order $((BASE + 14)):admin)
GATEWAYS=(gw1:$((BASE + 21)) gw2:$((BASE + 22)) gw3:$((BASE + 23)))
LB_PORT=$((BASE + 80))
LB_URL=http://127.0.0.1:$LB_PORT

names=()
pids=()
work=$(mktemp -d "${TMPDIR:-/tmp}/gatehouse-fleet.XXXXXX")
# shellcheck disable=SC2317  # run by the EXIT trap
stop_all() {
  trap - EXIT
  if ((${#pids[@]})); then
    kill "${pids[@]}" 2>/dev/null || true
    wait "${pids[@]}" 2>/dev/null || true
    echo "fleet stopped"
  fi
  rm -rf "$work"
}
trap stop_all EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# --- the burst (also `scripts/fleet.sh burst`) ------------------------------

# Any answering node of the cluster runs `redis-cli "$@"`.
redis_any() {
  local port
  for port in "${REDIS_PORTS[@]}"; do
    redis-cli -p "$port" "$@" 2>/dev/null && return 0
  done
  return 1
}

# gatehouse_rate_limit_backend_errors_total of the gateway on port $1, or "?".
backend_errors() {
  local text
  text=$(curl -fs --max-time 2 "http://127.0.0.1:$1/metrics") || { echo "?"; return 0; }
  awk '$1 == "gatehouse_rate_limit_backend_errors_total" { n = $2 } END { print n + 0 }' <<<"$text"
}

# Where a client's counts live: its keys all carry the hash tag {ADDRESS},
# so they are in one slot, on one master. Sets home_master and home_replica
# (ports, "" when unknown) for the instructions.
home_master=""
home_replica=""
client_home() {
  local client=$1 slot nodes master
  slot=$(redis_any cluster keyslot "$KEY_PREFIX:{$client}:$POLICY") || return 0
  nodes=$(redis_any cluster nodes) || return 0
  master=$(awk -v slot="$slot" '$3 ~ /master/ && $3 !~ /fail/ {
      for (i = 9; i <= NF; i++) {
        n = split($i, range, "-"); if (n == 1) range[2] = range[1]
        if (slot + 0 >= range[1] + 0 && slot + 0 <= range[2] + 0) { print $1, $2; exit }
      } }' <<<"$nodes")
  if [[ -z $master ]]; then
    echo "Its keys are in slot $slot, which no live master serves now."
    return 0
  fi
  local replicas
  replicas=$(awk -v id="${master%% *}" '$4 == id && $3 !~ /fail/ { sub(/@.*/, "", $2); printf " %s", $2 }' <<<"$nodes")
  master=${master#* }
  master=${master%@*}
  home_master=${master##*:}
  home_replica=$(awk '{ sub(/.*:/, "", $1); print $1 }' <<<"$replicas")
  echo "Its keys ({$client} hash tag) are in slot $slot, on master $master (replica:${replicas:- none})."
  echo "To fail that master:  redis-cli -p ${master##*:} debug segfault"
}

# Bursts from client $1; $2 is "fresh" for a client never seen (which must be
# admitted exactly max times: returns 1 when not) or "again".
burst() {
  local client=$1 seen=$2 dir=$work/burst
  mkdir -p "$dir"
  local -A before
  local entry name port
  for entry in "${GATEWAYS[@]}"; do
    name=${entry%%:*} port=${entry#*:}
    before[$name]=$(backend_errors "$port")
  done

  echo
  echo "Burst: $BURST requests, $CONCURRENCY at a time, from client $client through HAProxy ($LB_URL/api/products/N)"
  seq "$BURST" | xargs -P "$CONCURRENCY" -I{} \
    curl -s -o /dev/null -D "$dir/{}.head" --max-time 10 --interface "$client" "$LB_URL/api/products/{}" || true

  # One line per gateway: name admitted limited other; and the policy header.
  local tally
  tally=$(cat "$dir"/*.head 2>/dev/null | awk '
    function flush() { if (status != "") { seen[gateway] = 1; if (status == 200) ok[gateway]++; else if (status == 429) limited[gateway]++; else other[gateway]++ } }
    /^HTTP\// { flush(); status = $2; gateway = "-"; next }
    { sub(/\r$/, "") }
    tolower($1) == "x-gateway:" { gateway = $2 }
    tolower($1) == "ratelimit-policy:" { policy = $2 }
    END { flush(); for (g in seen) print g, ok[g] + 0, limited[g] + 0, other[g] + 0; print "policy", policy }')
  rm -rf "$dir"

  local admitted=0 limited=0 other=0 local_decisions=0 answered=0 row a l o after errors
  printf '  %-8s %-6s %9s %14s %6s %16s\n' gateway port admitted "limited (429)" other "backend errors"
  for entry in "${GATEWAYS[@]}"; do
    name=${entry%%:*} port=${entry#*:}
    row=$(awk -v g="$name" '$1 == g { print $2, $3, $4 }' <<<"$tally")
    read -r a l o <<<"${row:-0 0 0}"
    after=$(backend_errors "$port")
    if [[ $after == "?" || ${before[$name]} == "?" ]]; then errors="?"; else errors=$((after - before[$name])); fi
    printf '  %-8s %-6s %9s %14s %6s %16s\n' "$name" "$port" "$a" "$l" "$o" "$errors"
    admitted=$((admitted + a)) limited=$((limited + l)) other=$((other + o))
    [[ $errors == "?" ]] || local_decisions=$((local_decisions + errors))
  done
  row=$(awk '$1 == "-" { print $2 + $3 + $4 }' <<<"$tally")
  other=$((other + ${row:-0}))
  answered=$((admitted + limited + other))
  printf '  %-8s %-6s %9s %14s %6s %16s\n' total "" "$admitted" "$limited" "$other" "$local_decisions"
  ((answered == BURST)) || echo "  ($((BURST - answered)) requests got no answer; other = answered but neither 200 nor 429, or not by a gateway)"

  local policy max
  policy=$(awk '$1 == "policy" { print $2 }' <<<"$tally")
  max=${policy%%;*}
  if [[ ! $max =~ ^[0-9]+$ ]]; then
    echo "No response carried RateLimit-Policy: the policy did not apply (see the gateways' logs)."
    return 1
  fi
  echo "Policy \"$POLICY\": $max requests per ${policy#*;w=} s per client address."
  client_home "$client"
  if [[ $seen == again ]]; then
    echo "Admitted $admitted across the fleet: max less what $client was admitted in the last ${policy#*;w=} s."
    ((local_decisions == 0)) || echo "  $local_decisions decisions were made by on_backend_error, not by Redis."
    return 0
  fi
  if ((admitted == max)); then
    echo "Admitted $admitted across the fleet = max: the policy holds exactly."
    return 0
  fi
  echo "Admitted $admitted across the fleet, max is $max: NOT exact."
  ((local_decisions == 0)) ||
    echo "  $local_decisions decisions were made by on_backend_error, not by Redis (a node down or failing over?)."
  return 1
}

# A fresh loopback client address (127.0.0.1 is HAProxy's own, trusted).
random_client() {
  echo "127.$((RANDOM % 254 + 1)).$((RANDOM % 256)).$((RANDOM % 254 + 1))"
}

# A fresh client address whose keys are in the slots of the node on port $1,
# as the cluster's live nodes see them (a master that just died still has
# its slots until its replica takes them over).
client_on() {
  local port=$1 ranges client slot
  ranges=$(redis_any cluster nodes | awk -v port="$port" '{ address = $2; sub(/@.*/, "", address); sub(/.*:/, "", address) }
    address == port { for (i = 9; i <= NF; i++) if ($i !~ /^\[/) print $i }') || true
  [[ -n $ranges ]] || fail "the Redis node on port $port serves no slots now (see redis-cli -p $BASE cluster nodes)"
  for _ in $(seq 200); do
    client=$(random_client)
    slot=$(redis_any cluster keyslot "$KEY_PREFIX:{$client}:$POLICY")
    if awk -v slot="$slot" '{ n = split($1, range, "-"); if (n == 1) range[2] = range[1]
        if (slot + 0 >= range[1] + 0 && slot + 0 <= range[2] + 0) found = 1 } END { exit !found }' <<<"$ranges"; then
      echo "$client"
      return 0
    fi
  done
  fail "no client address found for the slots of port $port"
}

if [[ ${1:-} == burst ]]; then
  curl -fs -o /dev/null --max-time 2 "$LB_URL/health" ||
    fail "no fleet answers on $LB_URL (start one with scripts/fleet.sh; FLEET_PORT_BASE=$BASE)"
  case ${2:-} in
    '') client=$(random_client) seen=fresh ;;
    :*) client=$(client_on "${2#:}") seen=fresh ;;
    *) client=$2 seen=again ;;
  esac
  [[ $client =~ ^127\.[0-9]{1,3}\.[0-9]{1,3}\.[0-9]{1,3}$ && $client != 127.0.0.1 ]] ||
    fail "the client address must be a loopback address 127.x.y.z other than 127.0.0.1, not \"$client\""
  burst "$client" "$seen"
  exit
fi
[[ $# -eq 0 ]] || fail "usage: scripts/fleet.sh [burst [ADDRESS | :PORT]]"

# --- starting the fleet -----------------------------------------------------

need() { command -v "$1" >/dev/null 2>&1; }
if ! need haproxy || ! need redis-server || ! need redis-cli || ! need curl; then
  echo "Installing HAProxy, Redis and curl from the distribution..."
  SUDO=""
  [[ $(id -u) -eq 0 ]] || SUDO=sudo
  $SUDO apt-get update -qq
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq haproxy redis-server curl
fi
redis_major=$(redis-server --version | sed -n 's/.* v=\([0-9]*\)\..*/\1/p')
((${redis_major:-0} >= 5)) || fail "Redis 5 or later is needed for redis-cli --cluster (found: $(redis-server --version))"

have_ss=false
need ss && have_ss=true

# Who listens on TCP port $1: as `ss` prints it (with the owning process when
# this user may see it), or, without `ss`, a note when something answers.
listeners() {
  if $have_ss; then
    ss -Hltnp "sport = :$1" 2>/dev/null || true
  elif (echo >"/dev/tcp/127.0.0.1/$1") 2>/dev/null; then
    echo "something answers on 127.0.0.1:$1"
  fi
}

taken=()
for port in "${REDIS_PORTS[@]}" $((BASE + 10000)) $((BASE + 10001)) $((BASE + 10002)) \
  $((BASE + 10003)) $((BASE + 10004)) $((BASE + 10005)) \
  "${UPSTREAMS[@]%%:*}" "${GATEWAYS[@]#*:}" "$LB_PORT"; do
  holder=$(listeners "$port")
  [[ -z $holder ]] || taken+=("port $port is taken: $holder")
done
((${#taken[@]} == 0)) || fail "$(printf '%s\n' "${taken[@]}")
(FLEET_PORT_BASE moves every port of the fleet; is a fleet already running?)"

# Waits until process $2 (named $1, logging to $4) listens on port $3; fails
# naming the cause. With `ss`, the listening socket must belong to that very
# PID. Without it, the fallback is weaker: something accepts on the port and
# the PID is still alive half a second later (a process that lost the port
# exits at once).
wait_listening() {
  local name=$1 pid=$2 port=$3 log=$4
  for _ in $(seq 150); do
    if ! kill -0 "$pid" 2>/dev/null; then
      [[ -s $log ]] && tail -n 20 "$log" >&2
      local holder
      holder=$(listeners "$port")
      [[ -z $holder ]] || fail "$name (pid $pid) could not listen on port $port: it is taken by another process:
$holder"
      fail "$name (pid $pid) exited before listening on port $port (its log is above)"
    fi
    if $have_ss; then
      grep -q "pid=$pid," <<<"$(listeners "$port")" && return 0
    elif (echo >"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
      sleep 0.5
      kill -0 "$pid" 2>/dev/null && return 0
    fi
    sleep 0.1
  done
  fail "$name (pid $pid) is not listening on port $port after 15 s (log: $log)"
}

echo "Building gatehouse and the example upstream (release; the first build takes a few minutes)..."
cargo build --release --bin gatehouse --example upstream

# Where cargo put them: CARGO_TARGET_DIR, a configured build.target-dir, or ./target.
target_dir=$(cargo metadata --format-version 1 --no-deps |
  sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')
target_dir=${target_dir:-${CARGO_TARGET_DIR:-target}}
gatehouse=$target_dir/release/gatehouse
upstream=$target_dir/release/examples/upstream

# The gateways' settings, validated before anything starts.
export GATEHOUSE_ENV=development
seeds=$(printf '"redis://127.0.0.1:%s", ' "${REDIS_PORTS[@]}")
config=$work/fleet.toml
{
  cat <<TOML
# scripts/fleet.sh: the three gateways' settings, layered over settings/ as --config.
[server]
workers = 1
shutdown_timeout_s = 5
trusted_proxies = ["127.0.0.1/32"]   # HAProxy: its X-Forwarded-For names the client

[rate_limit]
backend = "redis"
redis_cluster = [${seeds%, }]
global = ""                          # the burst is counted by the "$POLICY" policy alone

[rate_limit.policies.$POLICY]
window_s = $WINDOW_S
max = $MAX
key = "ip"
message = "Too many requests from this address (fleet policy)"
TOML
  [[ -z $ALGORITHM ]] || echo "algorithm = \"$ALGORITHM\""
  for entry in "${UPSTREAMS[@]}"; do
    printf '\n[services.%s]\ninstances = ["http://127.0.0.1:%s"]\n' "${entry#*:}" "${entry%%:*}"
  done
  printf '\n[routes.products]\nrate_limit = "%s"\n' "$POLICY"
} >"$config"
"$gatehouse" --config "$config" check-config >/dev/null ||
  fail "gatehouse rejects the fleet settings (see above; they need rate_limit.redis_cluster, SPEC 12)"

# 1. The Redis Cluster.
redis_flags=(--cluster-enabled yes --cluster-node-timeout 2000 --cluster-require-full-coverage no
  --repl-diskless-sync-delay 0 --bind 127.0.0.1 --save "" --appendonly no --dir "$work")
((redis_major < 7)) || redis_flags+=(--enable-debug-command local)
for port in "${REDIS_PORTS[@]}"; do
  redis-server "${redis_flags[@]}" --port "$port" --cluster-config-file "$work/nodes-$port.conf" \
    >"$work/redis-$port.log" 2>&1 &
  names+=("redis 127.0.0.1:$port") pids+=($!)
done
for i in "${!REDIS_PORTS[@]}"; do
  wait_listening "${names[$i]}" "${pids[$i]}" "${REDIS_PORTS[$i]}" "$work/redis-${REDIS_PORTS[$i]}.log"
done
echo "Creating the Redis Cluster (3 masters, 3 replicas)..."
redis-cli --cluster create "${REDIS_PORTS[@]/#/127.0.0.1:}" --cluster-replicas 1 --cluster-yes \
  >"$work/cluster-create.log" 2>&1 || { cat "$work/cluster-create.log" >&2; fail "redis-cli --cluster create failed"; }
# Ready: the node says cluster_state:ok and, when it is a replica, its link
# to its master is up (its first sync is done).
node_ready() {
  redis-cli -p "$1" cluster info 2>/dev/null | grep -q '^cluster_state:ok' || return 1
  local replication
  replication=$(redis-cli -p "$1" info replication 2>/dev/null) || return 1
  grep -q '^role:master' <<<"$replication" || grep -q '^master_link_status:up' <<<"$replication"
}
for _ in $(seq 300); do
  ready=0
  for port in "${REDIS_PORTS[@]}"; do
    node_ready "$port" && ready=$((ready + 1))
  done
  ((ready < ${#REDIS_PORTS[@]})) || break
  sleep 0.1
done
((ready == ${#REDIS_PORTS[@]})) ||
  fail "only $ready of ${#REDIS_PORTS[@]} Redis nodes say cluster_state:ok (and, replicas, master_link_status:up) after 30 s"

# 2. The example upstreams.
for entry in "${UPSTREAMS[@]}"; do
  port=${entry%%:*} service=${entry#*:}
  "$upstream" "127.0.0.1:$port" "$service" >"$work/upstream-$service.log" 2>&1 &
  names+=("upstream $service") pids+=($!)
  wait_listening "upstream $service" "${pids[-1]}" "$port" "$work/upstream-$service.log"
done

# 3. The gateways.
for entry in "${GATEWAYS[@]}"; do
  name=${entry%%:*} port=${entry#*:}
  GATEHOUSE__SERVER__LISTEN=127.0.0.1:$port "$gatehouse" --config "$config" >"$work/$name.log" 2>&1 &
  names+=("gatehouse $name") pids+=($!)
  wait_listening "gatehouse $name" "${pids[-1]}" "$port" "$work/$name.log"
done

# 4. HAProxy in front.
cat >"$work/haproxy.cfg" <<CFG
global
    maxconn 2048

defaults
    mode http
    timeout connect 1s
    timeout client 30s
    timeout server 30s
    timeout check 1s

frontend fleet
    bind 127.0.0.1:$LB_PORT
    # The edge: a client's own X-Forwarded-For is dropped, and option
    # forwardfor writes the address HAProxy saw.
    http-request del-header X-Forwarded-For
    option forwardfor
    default_backend gateways

backend gateways
    balance roundrobin
    option httpchk GET /health
    http-response set-header X-Gateway %[srv_name]
$(for entry in "${GATEWAYS[@]}"; do echo "    server ${entry%%:*} 127.0.0.1:${entry#*:} check inter 1s fall 2 rise 1"; done)
CFG
haproxy -db -f "$work/haproxy.cfg" >"$work/haproxy.log" 2>&1 &
names+=(haproxy) pids+=($!)
wait_listening haproxy "${pids[-1]}" "$LB_PORT" "$work/haproxy.log"

# One request through each gateway first, so that each has found the
# cluster's slots before the burst (it counts against 127.0.0.1, not the
# burst's client).
for entry in "${GATEWAYS[@]}"; do
  curl -s -o /dev/null --max-time 5 "http://127.0.0.1:${entry#*:}/api/products/warm-up" || true
done

# 5. The burst.
client=$(random_client)
burst "$client" fresh || echo "fleet.sh: the first burst was not exact (see above)" >&2

# 6. What to try; then watch until Ctrl-C.
M=${home_master:-M} R=${home_replica:-R}
masters=$(redis_any cluster nodes | awk '$3 ~ /master/ { sub(/.*:/, "", $2); sub(/@.*/, "", $2); print $2 }' | sort | xargs)
replicas=$(redis_any cluster nodes | awk '$3 ~ /slave/ { sub(/.*:/, "", $2); sub(/@.*/, "", $2); print $2 }' | sort | xargs)
cat <<MSG

The fleet is up (logs and settings in $work):
  HAProxy        $LB_URL  (round robin over gw1 gw2 gw3; the X-Gateway header names the one that answered)
  gatehouse      $(for entry in "${GATEWAYS[@]}"; do printf '%s http://127.0.0.1:%s  ' "${entry%%:*}" "${entry#*:}"; done)
  Redis Cluster  masters $masters, replicas $replicas   (redis-cli -p $BASE cluster nodes)
  upstreams      $(for entry in "${UPSTREAMS[@]}"; do printf '%s :%s  ' "${entry#*:}" "${entry%%:*}"; done)

Try, from another terminal:
  scripts/fleet.sh burst
      a fresh client: exactly max admitted again
  redis-cli -p $M debug segfault; scripts/fleet.sh burst :$M
      fails master $M (it holds the first burst's client) and at once bursts a fresh client whose
      keys are on it: until its replica $R is promoted (cluster-node-timeout 2 s, then an election;
      this terminal shows it), those decisions are on_backend_error's, "local": each gateway
      counts alone, so up to 3 x max are admitted
  scripts/fleet.sh burst :$R
      after the promotion, a fresh client on the new master: exactly max
  scripts/fleet.sh burst $client
      the first burst's client again, within ${WINDOW_S} s of it (WINDOW_S=600 scripts/fleet.sh gives
      more time): the replica kept its counts, so none is admitted
  curl -s http://127.0.0.1:${GATEWAYS[0]#*:}/metrics | grep rate_limit
Redis pids (kill -9 fails a node too): $(for i in "${!names[@]}"; do [[ ${names[$i]} == redis* ]] && printf '%s=%s ' "${names[$i]##*:}" "${pids[$i]}"; done)
Press Ctrl-C to stop everything.

MSG

# Prints, with the time, each process that stops and each change of the
# cluster's state or masters, as one of the live nodes sees it.
watch_fleet() {
  local reported=() last_view="" view state i
  while true; do
    for i in "${!pids[@]}"; do
      if [[ -z ${reported[$i]:-} ]] && ! kill -0 "${pids[$i]}" 2>/dev/null; then
        echo "[$(date +%T)] ${names[$i]} (pid ${pids[$i]}) stopped"
        reported[i]=1
      fi
    done
    view=$(redis_any cluster nodes | awk '$3 ~ /master/ && ($3 ~ /fail/ || $9 != "") {
        sub(/.*:/, "", $2); sub(/@.*/, "", $2); print ($3 ~ /fail/ ? "failed" : "masters"), $2 }' |
      sort -k2n | awk '{ list[$1] = list[$1] " " $2 }
        END { printf "masters:%s", list["masters"]; if (list["failed"] != "") printf "; failed:%s", list["failed"] }' || true)
    state=$(redis_any cluster info | sed -n 's/^\(cluster_state:[a-z]*\).*/\1/p' || true)
    view="${state:-no Redis node answers} ${view}"
    if [[ $view != "$last_view" ]]; then
      echo "[$(date +%T)] $view"
      last_view=$view
    fi
    sleep 1
  done
}

# The watcher runs in the background (so Ctrl-C does not reach the commands
# it runs) while this shell waits in `wait`, where the INT trap runs at once.
# In the foreground, a command that caught the SIGINT and exited normally
# would make bash skip the trap, and the fleet would keep running.
watch_fleet &
names+=(watcher) pids+=($!)
wait "${pids[-1]}" || true
fail "the watcher (pid ${pids[-1]}) stopped; stopping the fleet"
