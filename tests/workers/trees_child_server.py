"""A worker whose serving is done by a child process, as servers with a process
of their own per worker do. The child serves HTTP on fd 3, taking 20 ms a
request; a TERM sent to it directly kills it at once, mid-request (the default
action), but when its parent asks (SIGUSR1) it stops accepting, finishes what it
accepted and exits. The parent asks on TERM, waits for the child, and exits 0.
Under --kill-mode mixed a reload therefore loses nothing; under group it does."""

import json
import os
import select
import signal
import socket
import sys
import time


def serve():
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    r, w = os.pipe()
    os.set_blocking(w, False)
    signal.set_wakeup_fd(w)
    signal.signal(signal.SIGUSR1, lambda s, f: None)
    lsock = socket.socket(fileno=3)
    lsock.setblocking(False)
    while True:
        ready, _, _ = select.select([lsock, r], [], [])
        if r in ready:
            break
        try:
            conn, _ = lsock.accept()
        except BlockingIOError:
            continue
        conn.setblocking(True)
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = conn.recv(4096)
            if not chunk:
                break
            data += chunk
        time.sleep(0.02)
        body = json.dumps({"pid": os.getpid(), "parent": os.getppid()}).encode()
        conn.sendall(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\n"
            + b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
        )
        conn.close()
    sys.exit(0)


child = os.fork()
if child == 0:
    serve()
    os._exit(0)
signal.signal(signal.SIGTERM, lambda s, f: os.kill(child, signal.SIGUSR1))
while True:
    try:
        os.waitpid(child, 0)
        break
    except ChildProcessError:
        break
sys.exit(0)
