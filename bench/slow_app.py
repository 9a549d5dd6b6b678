#!/usr/bin/env python3
"""A slow arbiterd COMMAND worker for bench/capacity.py: HTTP on fd 3, one request
at a time (single-threaded), each held SLOW_APP_SECS (default 0.02 s) before the
answer, then the connection is closed (`Connection: close`).

    arbiterd -b 127.0.0.1:8000 -w 2..16 --ready notify -- python3 bench/slow_app.py

Sends READY=1 on NOTIFY_SOCKET once it holds the listener. It keeps no scoreboard
(no busy/idle reports), so the autoscaler judges it by the accept queue alone.
TERM: finish the request in hand, exit 0. Stdlib only.
"""

import os
import signal
import socket
import sys
import time

SERVICE = float(os.environ.get("SLOW_APP_SECS", "0.02"))
stopping = False


def notify(msg):
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return
    if addr.startswith("@"):
        addr = "\0" + addr[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        try:
            s.sendto(msg.encode(), addr)
        except OSError:
            pass


def on_term(_sig, _frame):
    global stopping
    stopping = True


def main():
    if os.environ.get("LISTEN_PID") != str(os.getpid()) or int(os.environ.get("LISTEN_FDS", "0")) < 1:
        print("slow_app.py: no LISTEN_FDS for this process; run it under arbiterd", file=sys.stderr)
        return 78
    sock = socket.socket(fileno=3)
    # A timeout (poll, then a non-blocking accept) so TERM is noticed within 0.5 s;
    # a lost accept race among workers is retried inside accept().
    sock.settimeout(0.5)
    signal.signal(signal.SIGTERM, on_term)
    body = f'{{"pid": {os.getpid()}}}'.encode()
    answer = (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\n"
              b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
    notify("READY=1")
    while not stopping:
        try:
            conn, _ = sock.accept()
        except (socket.timeout, BlockingIOError, InterruptedError):
            continue
        try:
            conn.settimeout(5)
            data = b""
            while b"\r\n\r\n" not in data:
                chunk = conn.recv(4096)
                if not chunk:
                    break
                data += chunk
            if data:
                time.sleep(SERVICE)
                conn.sendall(answer)
        except OSError:
            pass
        finally:
            conn.close()
    notify("STOPPING=1")
    return 0


if __name__ == "__main__":
    sys.exit(main())
