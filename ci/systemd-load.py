#!/usr/bin/env python3
"""HTTP load for ci/systemd.sh: GET / in a loop from a few threads until a
stop file appears or a deadline passes, then write a summary: a line "OK FAILED TEXT", then the details as JSON.

usage: systemd-load.py PORT STOP_FILE MAX_SECONDS OUT_FILE

OUT_FILE.started appears once every thread has had its first answer, so
that the caller can wait for the load to be running rather than guess.

Half of the busy threads open a new connection per request (`Connection:
close`), half keep their connection alive (and open a new one when the
server says `Connection: close`, as a draining generation does). Six more
keep a connection idle between requests, as a browser or a pooled client
does: four for 0.9 s (shorter than the example's 1 s quiet period: a
draining generation keeps them until their next request, so every drain
lasts a good part of a second), two for 2.5 s (a draining generation closes
those once they have been quiet for its quiet period). Like any pooled
client, they check that the server has not closed an idle connection
before they reuse it. Every request that does not get `200` and a
`pid=... generation=...` body counts as failed, by class: refused, reset,
timeout, wrong (a non-200 status or an unexpected body), other.
"""

import http.client
import json
import os
import select
import socket
import sys
import threading
import time

port = int(sys.argv[1])
stop_file = sys.argv[2]
deadline = time.monotonic() + float(sys.argv[3])
out = sys.argv[4]

lock = threading.Lock()
counts = {"ok": 0, "refused": 0, "reset": 0, "timeout": 0, "wrong": 0, "other": 0}
examples = []
pids = {}


answered = set()


def record(kind, detail=None, pid=None):
    with lock:
        if kind == "ok":
            me = threading.get_ident()
            if me not in answered:
                answered.add(me)
                if len(answered) == len(threads):
                    open(out + ".started", "w").close()
        counts[kind] += 1
        if detail is not None and len(examples) < 5:
            examples.append(f"{kind}: {detail}")
        if pid is not None:
            pids[pid] = pids.get(pid, 0) + 1


def worker(keep_alive):
    conn = None
    while time.monotonic() < deadline and not os.path.exists(stop_file):
        try:
            if conn is None:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            headers = {} if keep_alive else {"Connection": "close"}
            conn.request("GET", "/", headers=headers)
            response = conn.getresponse()
            body = response.read().decode(errors="replace")
            if response.status == 200 and body.startswith("pid="):
                record("ok", pid=body.split()[0][4:])
            else:
                record("wrong", f"status {response.status} body {body[:60]!r}")
            if not keep_alive or response.will_close:
                conn.close()
                conn = None
        except ConnectionRefusedError as e:
            record("refused", repr(e))
            conn = None
        except (ConnectionResetError, BrokenPipeError, http.client.RemoteDisconnected) as e:
            record("reset", repr(e))
            conn = None
        except (socket.timeout, TimeoutError) as e:
            record("timeout", repr(e))
            conn = None
        except Exception as e:  # noqa: BLE001 - every failure is counted
            record("other", repr(e))
            conn = None
        time.sleep(0.002)
    if conn is not None:
        conn.close()


def idle_worker(idle):
    """A keep-alive connection that is idle for `idle` seconds between requests."""
    conn = None
    while time.monotonic() < deadline and not os.path.exists(stop_file):
        try:
            if conn is None:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
                conn.connect()
            conn.request("GET", "/")
            response = conn.getresponse()
            body = response.read().decode(errors="replace")
            if response.status == 200 and body.startswith("pid="):
                record("ok", pid=body.split()[0][4:])
            else:
                record("wrong", f"status {response.status} body {body[:60]!r}")
            if response.will_close:
                conn.close()
                conn = None
                continue
            # Idle; a server that closes the connection meanwhile is seen
            # here (readable at EOF), and a new one is opened.
            # One wait to the end of the idle time, so that the check comes
            # right before the next request, as a pool checks at checkout.
            readable, _, _ = select.select([conn.sock], [], [], idle)
            if readable:
                conn.close()
                conn = None
        except ConnectionRefusedError as e:
            record("refused", repr(e))
            conn = None
        except (ConnectionResetError, BrokenPipeError, http.client.RemoteDisconnected) as e:
            record("reset", repr(e))
            conn = None
        except (socket.timeout, TimeoutError) as e:
            record("timeout", repr(e))
            conn = None
        except Exception as e:  # noqa: BLE001 - every failure is counted
            record("other", repr(e))
            conn = None
    if conn is not None:
        conn.close()


threads = [threading.Thread(target=worker, args=(i % 2 == 0,)) for i in range(4)]
threads += [threading.Thread(target=idle_worker, args=(0.9,)) for _ in range(4)]
threads += [threading.Thread(target=idle_worker, args=(2.5,)) for _ in range(2)]
for t in threads:
    t.start()
for t in threads:
    t.join()
failed = sum(v for k, v in counts.items() if k != "ok")
classes = " ".join(f"{k}={v}" for k, v in counts.items() if k != "ok" and v)
text = f"{counts['ok']} ok, {failed} failed{' (' + classes + ')' if classes else ''}, served by {len(pids)} pids"
if examples:
    text += "; first: " + "; ".join(examples)
# One line: OK FAILED TEXT, then the details as JSON.
with open(out + ".tmp", "w") as f:
    f.write(f"{counts['ok']} {failed} {text}\n")
    json.dump(dict(counts, failed=failed, examples=examples, pids=pids), f)
    f.write("\n")
os.rename(out + ".tmp", out)
