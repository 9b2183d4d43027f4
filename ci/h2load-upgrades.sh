#!/usr/bin/env bash
# The axum example under h2load (nghttp2-client: a load generator nobody
# here wrote) while SIGHUP upgrades it every 100 ms for 10 s; prints
# h2load's own summary, and from its per-request log the p99 latency of
# requests that started within 50 ms after an upgrade signal against all
# the others.
#   usage: ci/h2load-upgrades.sh MODE [EXTRA_EXAMPLE_FLAGS...]
#   MODE: h2c | h1 | h2-tls | h1-tls      e.g. ci/h2load-upgrades.sh h2c
#   STOCK=1: the example's --stock-shutdown (axum's with_graceful_shutdown), plain only
#   CERT=cert.pem KEY=key.pem: the PEM pair for the TLS modes (h2load does
#   not verify it: any self-signed pair will do).
# Needs: h2load (apt-get install nghttp2-client), python3. A measurement,
# not a CI step: run by hand, figures in the README's Protocols section.
set -euo pipefail
cd "$(dirname "$0")/.."
mode=${1:?mode: h2c, h1, h2-tls or h1-tls}
shift
bin=target/release/examples/axum
[ -x "$bin" ] || cargo build --release -q -p handover --features axum,websocket,tls --example axum
dir=$(mktemp -d)
trap 'kill -TERM "$(cat "$dir/pid" 2>/dev/null)" 2>/dev/null || true; [ -n "${KEEP:-}" ] && cp -r "$dir" "$KEEP"; rm -rf "$dir"' EXIT

flags=()
scheme=http
case $mode in
  *-tls)
    : "${CERT:?CERT and KEY: a PEM certificate and key for the TLS modes}" "${KEY:?}"
    flags+=(--tls-cert "$CERT" --tls-key "$KEY")
    scheme=https
    ;;
esac
[ "${STOCK:-0}" = 1 ] && flags+=(--stock-shutdown)
h2flags=()
case $mode in h1*) h2flags+=(--h1) ;; esac

NO_COLOR=1 RUST_LOG=info "$bin" --listen 127.0.0.1:0 --pid-file "$dir/pid" "${flags[@]}" "$@" 2>"$dir/log" &
for _ in $(seq 200); do grep -q 'addr=' "$dir/log" 2>/dev/null && break; sleep 0.05; done
port=$(grep -o 'addr=127.0.0.1:[0-9]*' "$dir/log" | head -1 | cut -d: -f2)
echo "h2load-upgrades: $mode ${STOCK:+stock }on port $port"

if [ "${LOAD:-h2load}" = curl ]; then
  # curl's HTTP/2 (nghttp2 inside) follows GOAWAY: new requests go to a new
  # connection, and one the server refused (above the last stream id) is
  # sent again, as RFC 9113 allows. h2load does neither (see README).
  for _ in $(seq "${REQUESTS:-40000}"); do echo "url = \"$scheme://127.0.0.1:$port/\""; echo 'output = "/dev/null"'; done >"$dir/curl.conf"
  curlflags=(--http2-prior-knowledge)
  case $mode in h1*) curlflags=(--http1.1) ;; *-tls) curlflags=(--http2) ;; esac
  curl -s -k -Z --parallel-max 32 "${curlflags[@]}" -K "$dir/curl.conf" \
    -w '%{time_starttransfer} %{http_code} %{num_connects} %{errormsg}\n' >"$dir/curl.out" 2>"$dir/curl.err" &
else
  h2load -D 10 -c 32 -m 4 -t 2 "${h2flags[@]}" --log-file="$dir/requests.log" \
    "$scheme://127.0.0.1:$port/" >"$dir/h2load.out" 2>&1 &
fi
load=$!
: >"$dir/signals"
upgrades=0
end=$((SECONDS + 10))
while [ $SECONDS -lt $end ] && kill -0 $load 2>/dev/null; do
  date +%s.%N >>"$dir/signals"
  kill -HUP "$(cat "$dir/pid")" 2>/dev/null || true
  upgrades=$((upgrades + 1))
  sleep 0.1
done
wait $load || true
if [ "${LOAD:-h2load}" = curl ]; then
  echo "curl: $(wc -l <"$dir/curl.out") transfers, status counts: $(awk '{ print $2 }' "$dir/curl.out" | sort | uniq -c | tr -s ' ' | tr '\n' ';')"
  echo "curl: connections opened: $(awk '{ n += $3 } END { print n }' "$dir/curl.out"); first errors: $(awk '$2 != 200' "$dir/curl.out" | head -3)"
  echo "signals sent: $upgrades; generations that served: $(grep -c 'axum: serving' "$dir/log" || true); upgrades failed: $(grep -c 'upgrade failed' "$dir/log" || true)"
  exit 0
fi
grep -E '^(finished|requests|status codes|traffic|time for request|  *[0-9]+ *[0-9]|req/s)' "$dir/h2load.out" | head -12
echo "signals sent: $upgrades; generations that served: $(grep -c 'axum: serving' "$dir/log" || true); upgrades failed: $(grep -c 'upgrade failed' "$dir/log" || true)"
python3 - "$dir/requests.log" "$dir/signals" <<'EOF'
import sys
# h2load --log-file: start time (µs since epoch), status, duration (µs).
rows = [l.split() for l in open(sys.argv[1])]
signals = [float(s) for s in open(sys.argv[2])]
near, steady, failed = [], [], 0
import bisect
for start_us, status, dur_us in rows:
    start = int(start_us) / 1e6
    if int(status) != 200:
        failed += 1
    i = bisect.bisect_right(signals, start)
    (near if i > 0 and start - signals[i - 1] < 0.05 else steady).append(int(dur_us) / 1000)
def p(xs, q):
    xs = sorted(xs); return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float('nan')
print(f"logged requests {len(rows)}, non-200 {failed}")
print(f"p50/p99 ms: within 50 ms after a SIGHUP {p(near,.5):.2f}/{p(near,.99):.2f} (n={len(near)}), "
      f"other {p(steady,.5):.2f}/{p(steady,.99):.2f} (n={len(steady)})")
EOF
