"""A `--ready notify` COMMAND worker for the ops tests: it says READY=1 only once the
file named by argv[1] exists (so a test decides when the workers are ready), then
answers every request on fd 3 with its pid and generation, as JSON.

TERM, QUIT and INT keep their default action: the worker exits at once.
"""

import json
import os
import select
import socket
import sys
import time

gate = sys.argv[1]


def notify(msg):
    addr = os.environ["NOTIFY_SOCKET"]
    addr = "\0" + addr[1:] if addr.startswith("@") else addr
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        s.sendto(msg.encode(), addr)
    finally:
        s.close()


while not os.path.exists(gate):
    time.sleep(0.02)
notify("READY=1")

BODY = json.dumps(
    {
        "pid": os.getpid(),
        "generation": int(os.environ.get("ARBITER_GENERATION", "0")),
    }
).encode()
HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\nConnection: close\r\n\r\n"

# The listener is shared with the master and the other workers: leave its blocking
# mode alone and wait in select, since another worker may take the connection first.
sock = socket.socket(fileno=3)
while True:
    try:
        select.select([sock], [], [])
        conn, _ = sock.accept()
    except (BlockingIOError, InterruptedError):
        continue
    with conn:
        conn.settimeout(10)
        try:
            data = b""
            while b"\r\n\r\n" not in data:
                chunk = conn.recv(4096)
                if not chunk:
                    break
                data += chunk
            conn.sendall(HEAD % len(BODY) + BODY)
        except OSError:
            pass
