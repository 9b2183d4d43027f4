#!/usr/bin/env python3
"""WebSocket echo across upgrades, with a client nobody here wrote: Python's
`websockets` (`pip install websockets`). CLIENTS sockets each send a message,
wait for its echo, and send the next, for DURATION seconds, while this script
sends SIGHUP to the process the PID file names every INTERVAL seconds. When
the server closes a socket with 1001 (going away), the client opens a new
one (to the new generation) and sends the message again if its echo had not
come. Anything else is a failure: a socket closed without a close frame or
with another code, a wrong echo, a connection refused. No other retry.

usage: ci/websockets-upgrades.py URL PIDFILE [DURATION=10] [INTERVAL=0.1] [CLIENTS=16]
e.g. target/release/examples/axum --listen 127.0.0.1:8080 --pid-file /tmp/axum.pid &
     python3 ci/websockets-upgrades.py ws://127.0.0.1:8080/ws /tmp/axum.pid
A measurement, not a CI step: figures in the README's Protocols section.
"""

import asyncio
import collections
import os
import signal
import sys
import time

import websockets
from websockets.exceptions import ConnectionClosed


async def client(number, url, deadline, tally):
    sequence = 0
    while time.monotonic() < deadline:
        try:
            async with websockets.connect(url, open_timeout=10, close_timeout=10) as socket:
                tally["connections"] += 1
                while time.monotonic() < deadline:
                    message = f"client {number} message {sequence}"
                    await socket.send(message)
                    echo = await asyncio.wait_for(socket.recv(), 10)
                    if echo != message:
                        tally["failed"]["wrong echo"] += 1
                    else:
                        tally["echoed"] += 1
                    sequence += 1
                await socket.close()
        except ConnectionClosed as closed:
            code = closed.rcvd.code if closed.rcvd else None
            if code == 1001:
                tally["going_away"] += 1  # reconnect; the message is sent again
            else:
                tally["failed"][f"closed {code}"] += 1
                if len(tally["examples"]) < 3:
                    tally["examples"].append(repr(closed))
        except Exception as error:  # every other end is a failure
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
    clients = int(sys.argv[5]) if len(sys.argv) > 5 else 16
    tally = {
        "echoed": 0,
        "connections": 0,
        "going_away": 0,
        "failed": collections.Counter(),
        "examples": [],
        "signals": 0,
    }
    deadline = time.monotonic() + duration
    await asyncio.gather(
        upgrades(pid_file, deadline, interval, tally),
        *(client(n, url, deadline, tally) for n in range(clients)),
    )
    failed = sum(tally["failed"].values())
    print(
        f"websockets {websockets.__version__}: {tally['echoed']} messages echoed, {failed} failed "
        f"{dict(tally['failed'])}; {tally['connections']} connections, {tally['going_away']} closed "
        f"with 1001; SIGHUPs sent {tally['signals']}"
    )
    for example in tally["examples"]:
        print(f"  e.g. {example}")
    sys.exit(1 if failed else 0)


asyncio.run(main())
