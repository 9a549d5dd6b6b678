"""uvicorn on arbiterd's fd 3, with a shutdown that serves what it accepted.

    arbiterd -w 4 -b 127.0.0.1:8000 -- python3 serve.py

The same as `uvicorn --fd 3 --no-access-log app:app`, except for one thing: on
TERM, uvicorn stops accepting and in the same instant closes every connection
whose request it has not read yet, so a request that reached this worker just
before arbiterd retired it is reset (Kludex/uvicorn#2757). Here the worker stops
accepting first, gives the event loop a moment to read what the connections it
already accepted have sent, and only then lets uvicorn close the idle ones: those
requests are served instead. Siblings keep accepting from the shared socket.
"""

import asyncio
import os

import uvicorn

# How long an accepted connection has to show its request once TERM has come. A
# client that connected but sends nothing for this long is closed, as before.
READ_GRACE = 0.25


class DrainingServer(uvicorn.Server):
    async def shutdown(self, sockets=None):
        for server in self.servers:
            server.close()
        await asyncio.sleep(READ_GRACE)
        await super().shutdown(sockets=sockets)


if __name__ == "__main__":
    config = uvicorn.Config(
        "app:app",
        fd=int(os.environ.get("UVICORN_FD", "3")),
        access_log=False,
    )
    DrainingServer(config).run()
