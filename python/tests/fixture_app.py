"""A tiny WSGI app for the tests: who served it, and with what environment."""

import ctypes
import json
import os
import subprocess
import time
from urllib.parse import parse_qs

LOADED_IN = os.getpid()  # the template's pid, under --preload
post_fork_calls = []


def post_fork():
    post_fork_calls.append(os.getpid())


def pdeathsig():
    sig = ctypes.c_int(0)
    ctypes.CDLL(None).prctl(2, ctypes.byref(sig), 0, 0, 0)  # PR_GET_PDEATHSIG
    return sig.value


def app(environ, start_response):
    path = environ["PATH_INFO"]
    query = parse_qs(environ.get("QUERY_STRING", ""))
    if path == "/sleep":
        time.sleep(int(query.get("ms", ["500"])[0]) / 1000)
    if path == "/echo":
        body = environ["wsgi.input"].read()
    elif path == "/child-env":
        # The environment as a program the worker starts sees it (the C environ).
        out = subprocess.run(["env"], stdout=subprocess.PIPE, check=True).stdout
        body = out
    elif path == "/boom":
        raise RuntimeError("boom")
    else:
        body = json.dumps(
            {
                "pid": os.getpid(),
                "loaded_in": LOADED_IN,
                "worker_id": os.environ.get("ARBITER_WORKER_ID"),
                "listen_pid": os.environ.get("LISTEN_PID"),
                "template_fd": os.environ.get("ARBITER_TEMPLATE_FD"),
                "post_fork_calls": post_fork_calls,
                "pdeathsig": pdeathsig(),
            }
        ).encode()
    start_response("200 OK", [("Content-Type", "application/octet-stream")])
    return [body]
