#!/usr/bin/env python3
"""A WSGI app under the standard library's wsgiref server on fd 3, reporting
busy/idle on arbiterd's scoreboard through `arbiter_preload.scoreboard.WSGIMiddleware`
(python/arbiter_preload/scoreboard.py: one file, standard library only).

  GET /            -> {"pid": ..., "worker_id": ...}
  GET /sleep?ms=N  -> the same, after N ms (at most 60 s): busy meanwhile

    arbiterd -w 2 -b 127.0.0.1:8000 -- python3 app.py

TERM: finish the request in hand, exit 0.
"""

import json, os, signal, socket, sys, threading, time
from urllib.parse import parse_qs
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer

# The repository's python/ (or `pip install ./python`).
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "python"))
from arbiter_preload.scoreboard import WSGIMiddleware  # noqa: E402


def app(environ, start_response):
    if environ["PATH_INFO"] == "/sleep":
        ms = int(parse_qs(environ.get("QUERY_STRING", "")).get("ms", ["0"])[0])
        time.sleep(min(max(ms, 0), 60_000) / 1000)
    body = json.dumps({"pid": os.getpid(), "worker_id": os.environ.get("ARBITER_WORKER_ID")})
    start_response("200 OK", [("Content-Type", "application/json"),
                              ("Content-Length", str(len(body)))])
    return [body.encode()]


class FdServer(WSGIServer):
    """wsgiref's server on the inherited listener instead of a socket of its own."""

    def server_bind(self):
        self.socket.close()
        self.socket = socket.socket(fileno=3)
        # Shared with sibling workers: an accept that loses the race must not block.
        self.socket.setblocking(False)
        self.server_address = self.socket.getsockname()
        self.server_name, self.server_port = self.server_address[:2]
        self.setup_environ()

    def server_activate(self):
        pass  # arbiterd already listens


class QuietHandler(WSGIRequestHandler):
    def log_message(self, *args):
        pass


if __name__ == "__main__":
    if os.environ.get("LISTEN_PID") != str(os.getpid()):
        sys.exit(78)  # EX_CONFIG: not started by arbiterd (or systemd)
    server = FdServer(("", 0), QuietHandler)
    server.set_app(WSGIMiddleware(app))
    # shutdown() waits for serve_forever to return: from another thread.
    signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=server.shutdown).start())
    server.serve_forever()
