"""Minimal ASGI app (no framework) for distributor's tests and benchmarks.

Any HTTP request -> "Hello from worker <id> (pid <pid>)\n" (text/plain);
<id> is the distributor worker id (DISTRIBUTOR_WORKER_ID) that started
this process: gunicorn's own workers share their master's.
/slow?ms=N sleeps N ms (asyncio.sleep) first.

    python3 -m uvicorn --app-dir tests/apps/python asgi_app:app --fd 3
"""
import asyncio
import os
from urllib.parse import parse_qs

WORKER = os.environ.get("DISTRIBUTOR_WORKER_ID", "-")


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
    if scope["path"] == "/slow":
        query = parse_qs(scope["query_string"].decode("latin-1"))
        try:
            ms = float(query.get("ms", ["0"])[0])
        except ValueError:
            ms = 0.0
        await asyncio.sleep(ms / 1000)
    body = f"Hello from worker {WORKER} (pid {os.getpid()})\n".encode()
    await send({
        "type": "http.response.start",
        "status": 200,
        "headers": [
            (b"content-type", b"text/plain"),
            (b"content-length", str(len(body)).encode()),
        ],
    })
    await send({"type": "http.response.body", "body": body})
