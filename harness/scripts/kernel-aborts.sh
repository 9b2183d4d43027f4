#!/usr/bin/env bash
# Runs a command and prints how many TCP connections the kernel reset
# meanwhile because a request met a closed socket (Linux, /proc/net/netstat):
# TCPAbortOnClose, a process closed a connection with data it had not read
# (a request that had arrived); TCPAbortOnData, data arrived after the
# process had closed it (a request on its way). Each is a request lost by
# the server, seen by neither client: an independent count of what check's
# clients call resets. The count is the whole machine's: run nothing else.
#   usage: harness/scripts/kernel-aborts.sh COMMAND...
set -euo pipefail
aborts() { awk '/^TcpExt:/ { if (!h) { for (i = 1; i <= NF; i++) col[$i] = i; h = 1 } else print $col["TCPAbortOnClose"] + $col["TCPAbortOnData"] }' /proc/net/netstat; }
before=$(aborts)
status=0
"$@" || status=$?
echo "kernel: $(( $(aborts) - before )) connections reset for a request that met a closed socket (TCPAbortOnClose + TCPAbortOnData)"
exit $status
