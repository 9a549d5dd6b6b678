"""The WSGI app of bench/stop.py: each request is held STOP_APP_HOLD seconds
(default 0.02), then answered with the worker's pid. Served by gunicorn's sync
worker and by `python3 -m arbiter_preload` (python/) alike."""

import json
import os
import time

HOLD = float(os.environ.get("STOP_APP_HOLD", "0.02"))


def app(environ, start_response):
    time.sleep(HOLD)
    body = json.dumps({"pid": os.getpid()}).encode()
    start_response(
        "200 OK",
        [("Content-Type", "application/json"), ("Content-Length", str(len(body)))],
    )
    return [body]
