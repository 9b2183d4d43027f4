#!/usr/bin/env bash
# Do TLS sessions survive an upgrade? With OpenSSL's client (a TLS stack
# nobody here wrote): N sessions are made with generation 0 of the release
# axum example (`openssl s_client -sess_out`), the example is upgraded
# (SIGHUP, then the PID file names the successor), and each session is
# offered to generation 1 (`-sess_in`): how many were resumed ("Reused").
# Then `openssl s_time` against generation 1: connections made in a few
# seconds when a session resumes (`-reuse`) and when none does (`-new`):
# what the server and a client that lost its session pay for each.
#   usage: ci/tls-resumption.sh [SESSIONS] [TLS_VERSION_FLAG]
#   e.g.   ci/tls-resumption.sh 50 -tls1_3      ci/tls-resumption.sh 50 -tls1_2
#   BIN=path: another build of the example (default target/release/examples/axum).
# Needs: openssl. A measurement, not a CI step: figures in the README.
set -euo pipefail
cd "$(dirname "$0")/.."
sessions=${1:-50}
version=${2:--tls1_3}
bin=${BIN:-target/release/examples/axum}
[ -x "$bin" ] || cargo build --release -q -p handover --features axum,websocket,tls --example axum
dir=$(mktemp -d)
trap 'kill -TERM "$(cat "$dir/pid" 2>/dev/null)" 2>/dev/null || true; rm -rf "$dir"' EXIT

openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 1 \
  -subj /CN=localhost -keyout "$dir/key.pem" -out "$dir/cert.pem" 2>/dev/null
NO_COLOR=1 RUST_LOG=info "$bin" --listen 127.0.0.1:0 --pid-file "$dir/pid" \
  --tls-cert "$dir/cert.pem" --tls-key "$dir/key.pem" 2>"$dir/log" &
for _ in $(seq 200); do grep -q 'addr=' "$dir/log" 2>/dev/null && break; sleep 0.05; done
port=$(grep -o 'addr=127.0.0.1:[0-9]*' "$dir/log" | head -1 | cut -d: -f2)
for _ in $(seq 200); do [ -s "$dir/pid" ] && break; sleep 0.05; done
first=$(cat "$dir/pid")

# One request per session, read to the end: TLS 1.3 tickets come after
# the handshake, and s_client saves what it has when it exits.
hello() { # hello ARGS...: the s_client transcript of one GET /
  printf 'GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n' |
    openssl s_client -connect "127.0.0.1:$port" -servername localhost "$version" -ign_eof "$@" 2>&1
}
for i in $(seq "$sessions"); do
  hello -sess_out "$dir/session.$i" | grep -q 'generation=0' || { echo "session $i: no answer from generation 0" >&2; exit 1; }
done

kill -HUP "$first"
for _ in $(seq 400); do [ "$(cat "$dir/pid")" != "$first" ] && break; sleep 0.05; done
[ "$(cat "$dir/pid")" != "$first" ] || { echo "the upgrade did not happen" >&2; exit 1; }
for _ in $(seq 400); do kill -0 "$first" 2>/dev/null || break; sleep 0.05; done

reused=0
for i in $(seq "$sessions"); do
  out=$(hello -sess_in "$dir/session.$i")
  echo "$out" | grep -q 'generation=1' || { echo "session $i: no answer from generation 1" >&2; exit 1; }
  if echo "$out" | grep -q '^Reused'; then reused=$((reused + 1)); fi
done
echo "tls-resumption ($version): $reused of $sessions sessions made with generation 0 resumed with generation 1"

count() { # count MODE: connections s_time made in its time, each a GET /
  openssl s_time -connect "127.0.0.1:$port" "$version" -time "${TIME:-5}" "$1" -www / 2>/dev/null |
    awk '/connections in [0-9]+ real seconds/ { print $1; exit }'
}
echo "s_time against generation 1, connections (each a GET /) in ${TIME:-5} s: resumed (-reuse) $(count -reuse), full handshakes (-new) $(count -new)"
