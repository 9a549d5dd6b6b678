"""A COMMAND worker for the black-box tests: a few lines of Python, as a user would write.

It takes its listening socket from fd 3 (systemd convention, set up by arbiterd) and
answers every `GET /` with what it found at startup, as JSON, so that the tests can
check the worker contract from outside: its pid and process group, the LISTEN_* and
ARBITER_* variables, its open fds and its signal state. It never fails on a broken
contract: it reports, and the test asserts.
"""

import json
import os
import select
import socket


def open_fds():
    """The fds open now, with what they point at. os.listdir opens (then closes) a
    directory fd of its own: it is listed but is no longer open, so drop it."""
    fds = {}
    for name in os.listdir("/proc/self/fd"):
        try:
            fds[int(name)] = os.readlink("/proc/self/fd/" + name)
        except OSError:
            pass
    return fds


def proc_stat():
    with open("/proc/self/stat") as f:
        line = f.read()
    # comm may contain spaces and parens: the other fields start after the last ')'
    rest = line[line.rindex(")") + 2 :].split()
    return {"state": rest[0], "ppid": int(rest[1]), "pgid": int(rest[2]), "sid": int(rest[3])}


def signal_state():
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("SigBlk", "SigIgn", "SigCgt"):
                out[key] = value.strip()
    return out


# Gathered before the worker opens anything itself (the signal state already
# includes what the interpreter sets at startup: SIGPIPE/SIGXFSZ ignored, SIGINT
# caught; it never touches TERM or HUP).
FDS = open_fds()
STAT = proc_stat()
REPORT = {
    "pid": os.getpid(),
    "ppid": STAT["ppid"],
    "pgid": STAT["pgid"],
    "sid": STAT["sid"],
    "fds": sorted(FDS),
    "fd_targets": {str(k): v for k, v in sorted(FDS.items())},
    "signals": signal_state(),
    "env": {
        k: v
        for k, v in os.environ.items()
        if k.startswith(("LISTEN_", "ARBITER_", "WATCHDOG_", "APP_")) or k == "NOTIFY_SOCKET"
    },
}
BODY = json.dumps(REPORT).encode()

# The listener is shared with the master and the other workers: leave its blocking
# mode alone (it lives on the shared open file description), and wait in select,
# since another worker may take the connection first.
sock = socket.socket(fileno=3)
while True:
    try:
        select.select([sock], [], [])
        conn, _ = sock.accept()
    except (BlockingIOError, InterruptedError):
        continue
    with conn:
        conn.settimeout(10)
        data = b""
        try:
            while b"\r\n\r\n" not in data:
                chunk = conn.recv(4096)
                if not chunk:
                    break
                data += chunk
            parts = data.split(b"\r\n", 1)[0].split()
            path = parts[1].decode("latin-1") if len(parts) > 1 else "/"
            if path == "/":
                status, body = "200 OK", BODY
            else:
                status, body = "404 Not Found", b'{"error":"not found"}'
            head = "HTTP/1.1 %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\nConnection: close\r\n\r\n"
            conn.sendall((head % (status, len(body))).encode() + body)
        except OSError:
            pass
