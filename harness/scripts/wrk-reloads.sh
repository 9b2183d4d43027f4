#!/usr/bin/env bash
# An independent measurement of what `handover-harness check` reports: wrk
# (keep-alive, or a new connection per request) against a server that is
# already running, with RELOAD run every INTERVAL seconds meanwhile. wrk
# counts a request whose connection closed before its answer as a read
# error, as check's clients count it a reset.
#   usage: harness/scripts/wrk-reloads.sh URL 'RELOAD' [SECONDS] [INTERVAL] [keepalive|close] [CONNECTIONS]
#   e.g.:  harness/scripts/wrk-reloads.sh http://127.0.0.1:8080/ "nginx -c $PWD/nginx.conf -s reload" 10 1
set -euo pipefail
url=$1 reload=$2 seconds=${3:-10} interval=${4:-1} mode=${5:-keepalive} connections=${6:-8}
header=()
[ "$mode" = close ] && header=(-H "Connection: close")
out=$(mktemp)
wrk -t1 -c"$connections" -d"${seconds}s" "${header[@]}" "$url" >"$out" &
wrk_pid=$!
reloads=0
# The first reload half an interval in, as check's.
sleep "$(python3 -c "print($interval / 2)")"
end=$((SECONDS + seconds - 1))
while [ $SECONDS -lt $end ]; do
  sh -c "$reload" && reloads=$((reloads + 1))
  sleep "$interval"
done
wait "$wrk_pid"
cat "$out"
requests=$(awk '/requests in/ { print $1 }' "$out")
errors=$(grep -oE '(connect|read|write|timeout) [0-9]+' "$out" | tr '\n' ' ' || true)
non2xx=$(awk '/Non-2xx/ { print $NF }' "$out")
echo "wrk: $requests requests, $reloads reloads, socket errors: ${errors:-none}, non-2xx: ${non2xx:-0}"
rm -f "$out"
