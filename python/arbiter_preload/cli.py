"""python3 -m arbiter_preload MODULE:APP [--asgi] [--post-fork MODULE:FUNC]

With ARBITER_TEMPLATE_FD (arbiterd --preload): a template that loads the
application once and forks the workers. Without (arbiterd without --preload): a
plain worker that loads it and serves. The same command line works both ways.
"""

import argparse
import gc
import importlib
import os
import signal
import socket
import sys
import traceback

from . import template, wsgi
from .worker_env import EX_CONFIG, SD_LISTEN_FDS_START, ignore_masters_signals, listen_fds

APP_LOAD_ERROR = 4  # as gunicorn: halts the master while the first generation boots
BOOT_ERROR = 3


def load(spec, what):
    """`module:attr[.attr...]`, the module imported with the current directory on
    sys.path (as gunicorn does); `module:factory()` calls a factory."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"{what} must be MODULE:NAME, not {spec!r}")
    call = attr.endswith("()")
    if call:
        attr = attr[:-2]
    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.insert(0, cwd)
    obj = importlib.import_module(module_name)
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise AttributeError(f"{what} {spec!r}: no {part!r} in {obj!r}") from None
    if call:
        obj = obj()
    if not callable(obj):
        raise TypeError(f"{what} {spec!r} is not callable")
    return obj


def parse_args(argv):
    p = argparse.ArgumentParser(
        prog="python3 -m arbiter_preload",
        description="Serve a WSGI (or ASGI) application under arbiterd, preloaded "
        "in a template with --preload, or as a plain worker without.",
    )
    p.add_argument("app", metavar="MODULE:APP", help="the application, as gunicorn takes it")
    p.add_argument("--asgi", action="store_true", help="an ASGI application, served by uvicorn")
    p.add_argument(
        "--post-fork",
        metavar="MODULE:FUNC",
        help="called with no arguments in each worker before it serves (reconnect databases, reseed)",
    )
    return p.parse_args(argv)


def _listeners():
    n = listen_fds()
    if n < 1:
        return None
    return [socket.socket(fileno=fd) for fd in range(SD_LISTEN_FDS_START, SD_LISTEN_FDS_START + n)]


def make_serve(app, post_fork, asgi):
    """What a worker runs once its fds and environment are in place: signals,
    the post-fork hook, the server. `old_mask`: the signal mask to restore once
    the worker's handlers are installed (the template held signals off across the
    fork). Returns the exit status."""

    def prepare_and_serve(old_mask=None):
        wsgi.install_signals()
        if old_mask is not None:
            signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
        if post_fork is not None:
            try:
                post_fork()
            except Exception:
                print("arbiter_preload: the post-fork hook failed:", file=sys.stderr)
                traceback.print_exc()
                return BOOT_ERROR
        if wsgi.Stop.requested:
            return 0
        if asgi:
            from . import asgi as asgi_server

            return asgi_server.serve(app, lambda: wsgi.Stop.requested)
        listeners = _listeners()
        if listeners is None:
            print("arbiter_preload: no listener (LISTEN_FDS) for this worker", file=sys.stderr)
            return EX_CONFIG
        return wsgi.serve(app, listeners)

    return prepare_and_serve


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.reconfigure(line_buffering=True)  # lines into the master's log as they come
        except (AttributeError, ValueError):
            pass
    # While the application loads too, template or plain worker.
    ignore_masters_signals()
    sock = template.template_socket()
    if sock is not None:
        # Exit at once on these while loading, too (the loop installs the same).
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT):
            signal.signal(sig, template._exit_now)
    try:
        app = load(args.app, "the application")
        post_fork = load(args.post_fork, "the post-fork hook") if args.post_fork else None
        if args.asgi:
            from .asgi import load_uvicorn

            load_uvicorn()
    except Exception:
        print(f"arbiter_preload: cannot load {args.app}:", file=sys.stderr)
        traceback.print_exc()
        return APP_LOAD_ERROR
    serve = make_serve(app, post_fork, args.asgi)
    if sock is None:
        return serve()
    # Everything loaded so far stays put in the workers: out of the collector's
    # sight, its pages are not written by a collection and stay shared.
    gc.collect()
    if hasattr(gc, "freeze"):
        gc.freeze()
    return template.run(sock, serve)
