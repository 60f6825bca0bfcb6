"""Minimal WSGI app for distributor's tests and benchmarks.

Any request -> "Hello from worker <id> (pid <pid>)\n" (text/plain);
<id> is the distributor worker id (DISTRIBUTOR_WORKER_ID) that started
this process: gunicorn's own workers share their master's.
/slow?ms=N sleeps N ms first.

    python3 -m gunicorn --chdir tests/apps/python -w 1 wsgi_app:app
"""
import os
import time
from urllib.parse import parse_qs

WORKER = os.environ.get("DISTRIBUTOR_WORKER_ID", "-")


def app(environ, start_response):
    if environ.get("PATH_INFO") == "/slow":
        query = parse_qs(environ.get("QUERY_STRING", ""))
        try:
            ms = float(query.get("ms", ["0"])[0])
        except ValueError:
            ms = 0.0
        time.sleep(ms / 1000)
    body = f"Hello from worker {WORKER} (pid {os.getpid()})\n".encode()
    start_response("200 OK", [
        ("Content-Type", "text/plain"),
        ("Content-Length", str(len(body))),
    ])
    return [body]
