"""A plain ASGI app for `uvicorn --fd 3 app:app` under arbiterd.

GET /            -> {"app": "uvicorn", "pid": ..., "worker_id": ..., "generation": ...}
GET /sleep?ms=N  -> the same, after N milliseconds (an in-flight request to reload across)
"""

import asyncio
import json
import os

IDENTITY = {
    "app": "uvicorn",
    "pid": os.getpid(),
    "worker_id": int(os.environ.get("ARBITER_WORKER_ID", "0")),
    "slot": int(os.environ.get("ARBITER_SLOT", "0")),
    "generation": int(os.environ.get("ARBITER_GENERATION", "0")),
}


async def app(scope, receive, send):
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    if scope["type"] != "http":
        return
    if scope["path"] == "/sleep":
        query = dict(
            kv.split("=", 1) for kv in scope["query_string"].decode().split("&") if "=" in kv
        )
        await asyncio.sleep(int(query.get("ms", "1000")) / 1000)
    body = json.dumps(IDENTITY).encode()
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
