"""--ready notify HTTP worker on fd 3 for the reload tests.

argv[1]: a flag file. When it exists at startup, this worker is a broken release:
argv[2] says how it fails, `hang` (never sends READY=1) or `exit1` (exits 1 before
ready). Otherwise it sends READY=1 and answers every request with
{"pid", "generation", "worker_id"} as JSON, heartbeating between requests. TERM: finish
the request in hand, then exit 0.
"""

import json
import os
import select
import signal
import socket
import sys
import time

from health_lib import beat, notify

flag, mode = sys.argv[1], sys.argv[2]
if os.path.exists(flag):
    if mode == "exit1":
        sys.exit(1)
    while True:
        time.sleep(1000)

# The listening socket is shared and blocking (settimeout would make it
# non-blocking for every worker): an idle worker leaves from inside accept().
stopping = False
busy = False


def on_term(signum, frame):
    global stopping
    stopping = True
    if not busy:
        raise SystemExit(0)


signal.signal(signal.SIGTERM, on_term)
sock = socket.socket(fileno=3)
body = json.dumps(
    {
        "pid": os.getpid(),
        "generation": int(os.environ["ARBITER_GENERATION"]),
        "worker_id": int(os.environ["ARBITER_WORKER_ID"]),
    }
).encode()
notify("READY=1")
while not stopping:
    beat()
    r, _, _ = select.select([sock], [], [], 0.1)
    if not r:
        continue
    conn, _ = sock.accept()
    busy = True
    with conn:
        conn.settimeout(5)
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = conn.recv(4096)
            if not chunk:
                break
            data += chunk
        conn.sendall(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\n"
            + b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
        )
    busy = False
