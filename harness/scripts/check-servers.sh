#!/usr/bin/env bash
# `handover-harness check` against servers no one here wrote, as the
# README's table reports them: nginx (`nginx -s reload`), HAProxy
# (master-worker, SIGUSR2 to the master) and this repository's example.
# Each server gets a temporary directory with its configuration, PID file
# and logs, and listens on a free 127.0.0.1 port.
#   usage: harness/scripts/check-servers.sh [nginx|haproxy|example]... [-- CHECK_OPTIONS]
#   e.g.:  harness/scripts/check-servers.sh nginx -- --scenario keep-alive --duration 5s
set -euo pipefail
cd "$(dirname "$0")/../.."
servers=()
while [ $# -gt 0 ] && [ "$1" != -- ]; do servers+=("$1"); shift; done
[ "${1:-}" = -- ] && shift
[ ${#servers[@]} -gt 0 ] || servers=(nginx haproxy example)
cargo build -q --release -p handover-harness --bins
harness=target/release/handover-harness
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
status=0
for server in "${servers[@]}"; do
  dir=$(mktemp -d "/tmp/check-$server.XXXXXX")
  # nginx's workers run as nobody: they read /slow's file from here.
  chmod 755 "$dir"
  p=$(port)
  echo "== $server (files in $dir)"
  case $server in
    nginx)
      head -c 131072 /dev/zero | tr '\0' x >"$dir/big"
      cat >"$dir/nginx.conf" <<CONF
worker_processes 2;
daemon off;
pid $dir/nginx.pid;
error_log $dir/error.log notice;
events { worker_connections 1024; }
http {
    access_log off;
    client_body_temp_path $dir/body;
    proxy_temp_path $dir/proxy;
    fastcgi_temp_path $dir/fastcgi;
    uwsgi_temp_path $dir/uwsgi;
    scgi_temp_path $dir/scgi;
    server {
        listen 127.0.0.1:$p;
        location / { add_header X-Pid \$pid always; return 200 "pid=\$pid\n"; }
        # 128 KiB at 64 KiB/s: two seconds in flight.
        location /slow { limit_rate 64k; add_header X-Pid \$pid always; alias $dir/big; }
    }
}
CONF
      cp "$dir/nginx.conf" "$dir/nginx.conf.good"
      nginx="nginx -c $dir/nginx.conf -p $dir"
      "$harness" check --server "$nginx" --addr "127.0.0.1:$p" --pid-file "$dir/nginx.pid" \
        --upgrade-cmd "$nginx -s reload" --ready-header X-Pid --slow-path /slow \
        --broken-upgrade "echo 'no such directive;' >> $dir/nginx.conf" \
        --restore-upgrade "cp $dir/nginx.conf.good $dir/nginx.conf" \
        --out "$dir/report" "$@" || status=1
      ;;
    haproxy)
      cat >"$dir/haproxy.cfg" <<CONF
global
    pidfile $dir/haproxy.pid
defaults
    mode http
    timeout client 30s
    timeout server 30s
    timeout connect 5s
frontend web
    bind 127.0.0.1:$p
    http-request return status 200 content-type text/plain lf-string "pid=%pid\n" hdr X-Pid "%pid"
CONF
      cp "$dir/haproxy.cfg" "$dir/haproxy.cfg.good"
      "$harness" check --server "haproxy -W -db -f $dir/haproxy.cfg" --addr "127.0.0.1:$p" \
        --pid-file "$dir/haproxy.pid" --upgrade-signal USR2 --ready-header X-Pid \
        --broken-upgrade "echo 'no such keyword' >> $dir/haproxy.cfg" \
        --restore-upgrade "cp $dir/haproxy.cfg.good $dir/haproxy.cfg" \
        --out "$dir/report" "$@" || status=1
      ;;
    example)
      cargo build -q --release --example http_server
      # A copy, so that --broken-upgrade may replace it by a program that exits 1.
      cp target/release/examples/http_server "$dir/http_server"
      bin=$dir/http_server
      "$harness" check --server "$bin --listen {addr} --pid-file {pidfile}" --ready-body pid= \
        --broken-upgrade "mv $bin $bin.good && printf '#!/bin/sh\nexit 1\n' > $bin && chmod +x $bin" \
        --restore-upgrade "mv -f $bin.good $bin" \
        --out "$dir/report" "$@" || status=1
      ;;
    *) echo "unknown server $server (nginx, haproxy, example)"; exit 2 ;;
  esac
done
exit $status
