"""A plain WSGI app for `gunicorn --workers 1 app:app` under arbiterd.

No `-b`: gunicorn adopts the listener from LISTEN_FDS by itself, as under systemd;
`-b fd://3` on top of that makes it take fd 3 twice and die with EBADF.

The process answering is gunicorn's own worker, a child of the gunicorn master
that arbiterd started (so a grandchild of arbiterd): both pids are in the answer.
"""

import json
import os
import time
from urllib.parse import parse_qs


def app(environ, start_response):
    if environ.get("PATH_INFO") == "/sleep":
        ms = int(parse_qs(environ.get("QUERY_STRING", "")).get("ms", ["1000"])[0])
        time.sleep(ms / 1000)
    body = json.dumps(
        {
            "app": "gunicorn",
            "gunicorn_worker_pid": os.getpid(),
            "arbiter_worker_pid": os.getppid(),
            "worker_id": int(os.environ.get("ARBITER_WORKER_ID", "0")),
            "generation": int(os.environ.get("ARBITER_GENERATION", "0")),
        }
    ).encode()
    start_response(
        "200 OK",
        [("Content-Type", "application/json"), ("Content-Length", str(len(body)))],
    )
    return [body]
