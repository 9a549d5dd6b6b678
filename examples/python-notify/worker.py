#!/usr/bin/env python3
"""An arbiterd worker in plain Python (standard library only) that speaks the
sd_notify protocol to the master, as it would to systemd:

  READY=1      once the listener is taken and the server is up (--ready notify)
  WATCHDOG=1   every WATCHDOG_USEC/2 while the serving loop turns (the heartbeat)
  STATUS=...   shown by `arbiterctl status`
  STOPPING=1   when it starts draining after TERM

It serves HTTP on the first listener (fd 3):
  GET /            -> {"app": "python-notify", "pid": ..., "worker_id": ..., "generation": ...}
  GET /sleep?ms=N  -> the same, after N milliseconds

TERM: stop accepting, finish the requests in flight, exit 0. Without LISTEN_FDS
(not started by arbiterd or systemd) it exits 78 (EX_CONFIG), which arbiterd does
not restart.
"""

import json
import os
import signal
import socket
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

EX_CONFIG = 78
SD_LISTEN_FDS_START = 3


def notify(message):
    """Send one datagram to NOTIFY_SOCKET (`@name` is the abstract namespace)."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
        try:
            s.sendto(message.encode(), address)
            return True
        except OSError:
            return False


def listen_socket():
    """fd 3, if LISTEN_FDS/LISTEN_PID say it is meant for this process."""
    if os.environ.get("LISTEN_PID") != str(os.getpid()):
        return None
    if int(os.environ.get("LISTEN_FDS", "0")) < 1:
        return None
    return socket.socket(fileno=SD_LISTEN_FDS_START)  # family and type from the fd


IDENTITY = {
    "app": "python-notify",
    "pid": os.getpid(),
    "worker_id": int(os.environ.get("ARBITER_WORKER_ID", "0")),
    "slot": int(os.environ.get("ARBITER_SLOT", "0")),
    "generation": int(os.environ.get("ARBITER_GENERATION", "0")),
}
served = 0
served_lock = threading.Lock()


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    timeout = 5  # an idle keep-alive connection does not hold up a graceful stop

    def do_GET(self):
        global served
        url = urlsplit(self.path)
        if url.path == "/sleep":
            time.sleep(int(parse_qs(url.query).get("ms", ["1000"])[0]) / 1000)
        body = json.dumps(IDENTITY).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
        with served_lock:
            served += 1

    def log_message(self, *args):  # no access log: it would go through the master
        pass


class Server(ThreadingHTTPServer):
    daemon_threads = False  # server_close() waits for requests in flight
    block_on_close = True


stopping = False


def on_term(signum, frame):
    # Only a flag: the loop below notices it within one poll interval. (Starting
    # a thread or taking a lock from a signal handler can deadlock.)
    global stopping
    stopping = True


def main():
    sock = listen_socket()
    if sock is None:
        print("worker.py: no LISTEN_FDS for this process; run it under arbiterd", file=sys.stderr)
        return EX_CONFIG
    # Every worker polls the same listening socket and only one wins each
    # connection: a blocking accept() would leave the losers stuck in accept(),
    # deaf to TERM, until the next connection. Non-blocking, a lost race is a
    # BlockingIOError that socketserver shrugs off. (The flag is shared by all the
    # workers holding this socket, which all want it so.)
    sock.setblocking(False)
    server = Server(("127.0.0.1", 0), Handler, bind_and_activate=False)
    server.socket.close()
    server.socket = sock
    server.server_address = sock.getsockname()

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, lambda *_: os._exit(0))
    signal.signal(signal.SIGQUIT, lambda *_: os._exit(0))

    # Heartbeat: half the watchdog period, as systemd's documentation asks, sent
    # from the serving loop itself, so a wedged loop stops beating.
    usec = int(os.environ.get("WATCHDOG_USEC", "0") or 0)
    mine = os.environ.get("WATCHDOG_PID", str(os.getpid())) == str(os.getpid())
    period = usec / 2e6 if usec and mine else None
    server.timeout = min(period or 0.5, 0.5)  # handle_request() waits at most this
    last_beat = 0.0

    notify(f"READY=1\nSTATUS=serving on {sock.getsockname()}")
    while not stopping:
        server.handle_request()  # one connection, or a timeout
        now = time.monotonic()
        if period and now - last_beat >= period:
            last_beat = now
            with served_lock:
                count = served
            notify(f"WATCHDOG=1\nSTATUS=served {count} requests")

    # TERM: stop accepting (the other workers keep the socket), let the requests
    # in flight finish (server_close joins their threads), exit 0.
    notify("STOPPING=1")
    server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
