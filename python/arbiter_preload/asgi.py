"""uvicorn on the first listener (fd 3), with the draining shutdown of
examples/uvicorn/serve.py, the heartbeat, READY=1 and STATUS= from uvicorn's own
once-per-0.1 s tick, and the scoreboard middleware when there is an entry.

asyncio makes the listener non-blocking, and so for every process sharing it
(docs/workers.md, "O_NONBLOCK on shared listeners"): with --asgi, all the workers
are uvicorn workers, which want it so.
"""

import asyncio
import os
import signal
import time

from .scoreboard import ASGIMiddleware, Scoreboard
from .worker_env import SD_LISTEN_FDS_START, Heartbeat, notify

# How long an accepted connection has to show its request once TERM has come.
READ_GRACE = 0.25
STATUS_EVERY = 5.0


def load_uvicorn():
    import uvicorn  # noqa: F401  (imported in the template, shared by the workers)

    return uvicorn


def serve(app, stop_requested=lambda: False):
    uvicorn = load_uvicorn()

    class Server(uvicorn.Server):
        heartbeat = Heartbeat(period=0.5)
        reported, reported_at = 0, 0.0

        async def startup(self, sockets=None):
            await super().startup(sockets=sockets)
            if self.started and not self.should_exit:
                self.heartbeat.beat(force=True)
                notify(f"READY=1\nSTATUS=serving, pid {os.getpid()}")
            if stop_requested():
                self.should_exit = True  # a TERM before uvicorn took the signal

        async def on_tick(self, counter):
            self.heartbeat.beat()
            served = self.server_state.total_requests
            now = time.monotonic()
            if served != self.reported and now - self.reported_at >= STATUS_EVERY:
                notify(f"STATUS=served {served} requests")
                self.reported, self.reported_at = served, now
            return await super().on_tick(counter)

        async def shutdown(self, sockets=None):
            notify("STOPPING=1")
            # Stop accepting, give the connections already accepted a moment to
            # show their requests, and only then let uvicorn close the idle ones.
            for server in self.servers:
                server.close()
            await asyncio.sleep(READ_GRACE)
            await super().shutdown(sockets=sockets)

        def handle_exit(self, sig, frame):
            if sig in (signal.SIGINT, signal.SIGQUIT):
                os._exit(0)  # at once
            super().handle_exit(sig, frame)

    if os.environ.get("ARBITER_SCOREBOARD_FD"):
        app = ASGIMiddleware(app, Scoreboard())
    config = uvicorn.Config(
        app,
        fd=SD_LISTEN_FDS_START,
        access_log=False,
        log_level=os.environ.get("ARBITER_PRELOAD_LOG_LEVEL", "warning"),
    )
    Server(config).run()
    return 0
