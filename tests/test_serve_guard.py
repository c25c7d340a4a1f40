"""Apps served by ``pycluster run module:app`` take part in the guards without help from
the app: each request is counted for ``--max-requests``, and the serving loop sends the
watchdog's heartbeats (uvicorn's loop through ``attach_loop()``, waitress's loop through
its maintenance tick), so a healthy idle app is never killed by ``--timeout``."""

from __future__ import annotations

import pytest
from helpers import http_get
from serve_helpers import port_of, start, stderr_of, stop

ASGI = """
    async def app(scope, receive, send):
        assert scope["type"] == "http"
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})
"""

WSGI = """
    def app(environ, start_response):
        start_response("200 OK", [("Content-Length", "2")])
        return [b"ok"]
"""


@pytest.mark.slow
@pytest.mark.parametrize("source", [ASGI, WSGI], ids=["asgi", "wsgi"])
def test_served_requests_are_counted_for_max_requests(tmp_path, source):
    """With --max-requests 3, the fourth request to a served app's only worker finds it
    being recycled: the recycle is logged, a replacement listens, and requests keep being
    answered (the old worker drains)."""
    proc = start(tmp_path, source, "--max-requests", "3", "--timeout", "5")
    try:
        port = port_of(proc)
        for _ in range(4):
            assert http_get(port).endswith(b"ok")
        proc.expect_err(lambda line: "recycling worker 1" in line and "3" in line,
                        "worker 1 recycled after its requests")
        port_of(proc)  # the replacement listening
        assert http_get(port).endswith(b"ok")
        assert stop(proc) == 0
    finally:
        err = stderr_of(proc)
    assert "watchdog" not in err.lower() or "hung" not in err, err


PRELOADED = """
    import os
    LOADED_IN = os.getpid()

    async def app(scope, receive, send):
        if scope["type"] != "http":
            return
        body = f"{LOADED_IN} {os.getpid()}".encode()
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})
"""


@pytest.mark.slow
def test_an_app_is_imported_once_in_the_fork_servers_template(tmp_path):
    """`pycluster run main:app --start-method forkserver`: the app's module is imported in
    the template, before the fork (the pid it recorded at import is not the serving
    worker's), and the forked worker serves it."""
    proc = start(tmp_path, PRELOADED, "--start-method", "forkserver")
    try:
        port = port_of(proc)
        loaded_in, serving_in = http_get(port).rsplit(b"\r\n\r\n", 1)[1].split()
        assert loaded_in != serving_in
        assert stop(proc) == 0
    finally:
        stderr_of(proc)
