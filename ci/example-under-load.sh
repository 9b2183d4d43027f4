#!/usr/bin/env bash
# The example server under wrk load while SIGHUP arrives every few
# milliseconds, at the serving generation and at successors still starting.
# Passes when wrk saw no socket error and no non-2xx answer, one process is
# left, the PID file names it, and the first and last generations have the
# same number of open descriptors.
#   usage: ci/example-under-load.sh [SECONDS] [keepalive|close]
set -euo pipefail
seconds=${1:-20}
mode=${2:-keepalive}
cd "$(dirname "$0")/.."
cargo build --release --example http_server -q
dir=$(mktemp -d)
pid_file=$dir/http.pid
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
# Started with stdio only, as a service manager starts it: a descriptor this
# shell inherited without close-on-exec would reach the first generation and
# no later one (the library hands a successor its link only).
start_clean() {
  local fd
  for fd in /proc/"$BASHPID"/fd/*; do
    fd=${fd##*/}
    if [ "$fd" -gt 2 ]; then eval "exec $fd>&-"; fi
  done
  exec "$@"
}
(start_clean env RUST_LOG=info target/release/examples/http_server --listen "127.0.0.1:$port" --pid-file "$pid_file") 2>"$dir/log" &
first=$!
cleanup() { kill -TERM "$(cat "$pid_file" 2>/dev/null)" 2>/dev/null || true; kill -KILL "$first" 2>/dev/null || true; }
trap cleanup EXIT
for _ in $(seq 200); do [ -s "$pid_file" ] && break; sleep 0.05; done
fds() { ls "/proc/$1/fd" | wc -l; }
first_fds=$(fds "$(cat "$pid_file")")

header=()
[ "$mode" = close ] && header=(-H "Connection: close")
wrk -t2 -c32 -d"${seconds}s" "${header[@]}" "http://127.0.0.1:$port/" >"$dir/wrk" &
wrk_pid=$!
signals=0
end=$((SECONDS + seconds - 1))
while [ $SECONDS -lt $end ]; do
  serving=$(cat "$pid_file")
  kill -HUP "$serving" 2>/dev/null || true
  # and at its children: successors that are still starting
  for child in $(pgrep -P "$serving" || true); do kill -HUP "$child" 2>/dev/null || true; done
  signals=$((signals + 1))
  sleep 0.005
done
wait "$wrk_pid"
cat "$dir/wrk"
# Let the last upgrade settle: exactly one process in the process group of the server.
serving=$(cat "$pid_file")
for _ in $(seq 100); do
  n=$(pgrep -f "examples/http_server --listen 127.0.0.1:$port" | wc -l)
  [ "$n" = 1 ] && break; sleep 0.05
done
last_fds=$(fds "$serving")
echo "SIGHUPs sent: $signals; generations: $(grep -c " serving " "$dir/log" || true)"
echo "processes left: $n; PID file: $serving; alive: $(kill -0 "$serving" && echo yes)"
echo "descriptors: first generation $first_fds, last $last_fds"
errors=$(grep -E 'Socket errors|Non-2xx' "$dir/wrk" || true)
if [ -n "$errors" ] || [ "$n" != 1 ] || [ "$first_fds" != "$last_fds" ]; then
  echo "FAIL: $errors"; exit 1
fi
echo PASS
