#!/usr/bin/env bash
# Starts example upstream services on loopback and the gateway in front of
# them on the shipped defaults, then prints curl commands to try.
# Ctrl-C stops everything this script started.
#
# Each process must be seen listening on its own port before the commands are
# printed: if a port is taken by another process, the commands would reach
# that process instead, so the script names it, stops what it started and
# exits 1.
set -euo pipefail
cd "$(dirname "$0")/.."

export GATEHOUSE_ENV=development
UPSTREAMS=(3001:user 3002:product 3003:order 3004:admin)

fail() {
  echo >&2
  echo "demo.sh: ERROR: $*" >&2
  exit 1
}

echo "Building gatehouse and the example upstream (release; the first build takes a few minutes)..."
cargo build --release --bin gatehouse --example upstream

# Where cargo put them: CARGO_TARGET_DIR, a configured build.target-dir, or ./target.
target_dir=$(cargo metadata --format-version 1 --no-deps |
  sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')
target_dir=${target_dir:-${CARGO_TARGET_DIR:-target}}
gatehouse=$target_dir/release/gatehouse
upstream=$target_dir/release/examples/upstream

# Validates the settings (every problem is printed) and reads the address the
# gateway will listen on (settings/local.toml or GATEHOUSE__SERVER__LISTEN may
# move it from 127.0.0.1:8080).
effective=$("$gatehouse" check-config) || fail "the settings are invalid (see above)"
listen=$(sed -n '/^listen = "/{s/^listen = "\(.*\)"$/\1/p;q}' <<<"$effective")
[[ -n $listen ]] || fail "check-config printed no server.listen"
gateway_port=${listen##*:}
case ${listen%:*} in
  0.0.0.0) gateway_url=http://127.0.0.1:$gateway_port ;;
  '[::]') gateway_url=http://[::1]:$gateway_port ;;
  *) gateway_url=http://$listen ;;
esac

names=()
pids=()
stop_all() {
  trap - EXIT
  if ((${#pids[@]})); then
    kill "${pids[@]}" 2>/dev/null || true
    wait "${pids[@]}" 2>/dev/null || true
    echo "demo stopped"
  fi
}
trap stop_all EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

have_ss=false
command -v ss >/dev/null && have_ss=true

# Who listens on TCP port $1, as `ss` prints it (with the owning process when
# this user may see it).
listeners() {
  if $have_ss; then ss -Hltnp "sport = :$1" 2>/dev/null || true; fi
}

# Waits until process $2 (named $1) listens on port $3; fails naming the cause.
# With `ss`, the listening socket must belong to that very PID. Without it, the
# fallback is weaker: the PID is alive, something answers $4/health, and the
# PID is still alive half a second later (a process that lost the port exits
# at once).
wait_listening() {
  local name=$1 pid=$2 port=$3 url=$4
  for _ in $(seq 100); do
    if ! kill -0 "$pid" 2>/dev/null; then
      local holder
      holder=$(listeners "$port")
      if [[ -n $holder ]]; then
        fail "$name (pid $pid) could not listen on port $port: it is taken by another process:
$holder"
      fi
      fail "$name (pid $pid) exited before listening on port $port (see its error above; is the port taken?)"
    fi
    if $have_ss; then
      grep -q "pid=$pid," <<<"$(listeners "$port")" && return 0
    elif curl -fs -o /dev/null --max-time 1 "$url/health"; then
      sleep 0.5
      kill -0 "$pid" 2>/dev/null && return 0
    fi
    sleep 0.1
  done
  fail "$name (pid $pid) is not listening on port $port after 10 s"
}

for entry in "${UPSTREAMS[@]}"; do
  port=${entry%%:*} service=${entry#*:}
  "$upstream" "127.0.0.1:$port" "$service" >/dev/null &
  names+=("upstream $service") pids+=($!)
done
for i in "${!UPSTREAMS[@]}"; do
  port=${UPSTREAMS[$i]%%:*}
  wait_listening "${names[$i]}" "${pids[$i]}" "$port" "http://127.0.0.1:$port"
done

"$gatehouse" &
names+=(gatehouse) pids+=($!)
wait_listening gatehouse "${pids[-1]}" "$gateway_port" "$gateway_url"

TOKEN=$("$gatehouse" token --sub demo-user) || fail "cannot mint the demo token (see above)"
ADMIN_TOKEN=$("$gatehouse" token --sub demo-admin --role admin) || fail "cannot mint the admin token (see above)"

cat <<MSG

gatehouse (pid ${pids[-1]}) is running on $gateway_url in front of four example services.
Try:

  curl -s $gateway_url/health
  curl -si $gateway_url/api/products/42
  curl -si $gateway_url/api/users/7                      # 401: token required
  curl -si $gateway_url/api/users/7 -H "Authorization: Bearer $TOKEN"
  curl -si $gateway_url/api/admin/stats -H "Authorization: Bearer $TOKEN"        # 403
  curl -si $gateway_url/api/admin/stats -H "Authorization: Bearer $ADMIN_TOKEN"
  curl -si $gateway_url/nowhere                          # 404

Press Ctrl-C to stop.
MSG

# Until Ctrl-C, or until one of them stops on its own.
wait -n "${pids[@]}" || true
for i in "${!pids[@]}"; do
  kill -0 "${pids[$i]}" 2>/dev/null || echo "demo.sh: ${names[$i]} (pid ${pids[$i]}) stopped" >&2
done
fail "a demo process stopped; stopping the others"
