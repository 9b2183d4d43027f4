#!/usr/bin/env python3
"""HTTP/2 in the clear (h2c, prior knowledge) across upgrades, with a client
nobody here wrote: httpx with httpcore and hyper-h2 (`pip install
'httpx[http2]'`). CONCURRENCY tasks share one client (its pool opens new
connections when a GOAWAY closes one) and send GET / one after another for
DURATION seconds, while this script sends SIGHUP to the process the PID file
names every INTERVAL seconds. No retries: a request that raised or got
another status than 200 is a failure, printed by class.

usage: ci/httpx-h2c-upgrades.py URL PIDFILE [DURATION=10] [INTERVAL=0.1] [CONCURRENCY=32]
e.g. target/release/examples/axum --listen 127.0.0.1:8080 --pid-file /tmp/axum.pid &
     python3 ci/httpx-h2c-upgrades.py http://127.0.0.1:8080/ /tmp/axum.pid
A measurement, not a CI step: figures in the README's Protocols section.
"""

import asyncio
import collections
import os
import signal
import sys
import time

import httpx


async def client(http, url, deadline, tally):
    while time.monotonic() < deadline:
        try:
            response = await http.get(url)
            if response.status_code == 200 and b"generation=" in response.content:
                tally["ok"] += 1
                tally["generations"].add(response.content.split(b"generation=")[1].split()[0])
            else:
                tally["failed"][f"status {response.status_code}"] += 1
        except Exception as error:  # every failure counts, by class
            tally["failed"][type(error).__name__] += 1
            if len(tally["examples"]) < 3:
                tally["examples"].append(repr(error))


async def upgrades(pid_file, deadline, interval, tally):
    while time.monotonic() < deadline:
        try:
            with open(pid_file) as f:
                os.kill(int(f.read().split()[0]), signal.SIGHUP)
            tally["signals"] += 1
        except (OSError, ValueError, IndexError):
            pass
        await asyncio.sleep(interval)


async def main():
    url, pid_file = sys.argv[1], sys.argv[2]
    duration = float(sys.argv[3]) if len(sys.argv) > 3 else 10.0
    interval = float(sys.argv[4]) if len(sys.argv) > 4 else 0.1
    concurrency = int(sys.argv[5]) if len(sys.argv) > 5 else 32
    tally = {
        "ok": 0,
        "failed": collections.Counter(),
        "examples": [],
        "generations": set(),
        "signals": 0,
    }
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(http1=False, http2=True, limits=limits, timeout=10.0) as http:
        deadline = time.monotonic() + duration
        await asyncio.gather(
            upgrades(pid_file, deadline, interval, tally),
            *(client(http, url, deadline, tally) for _ in range(concurrency)),
        )
    failed = sum(tally["failed"].values())
    print(
        f"httpx {httpx.__version__} h2c: {tally['ok'] + failed} requests, {failed} failed "
        f"{dict(tally['failed'])}; SIGHUPs sent {tally['signals']}, generations that answered "
        f"{len(tally['generations'])}"
    )
    for example in tally["examples"]:
        print(f"  e.g. {example}")
    sys.exit(1 if failed else 0)


asyncio.run(main())
