"""The same app for gunicorn's sync workers (benchmarks/guard.py's baseline): hello
world, and ``GET /block`` stuck in ``slow_handler()``."""

import time


def slow_handler():
    time.sleep(60)


def app(environ, start_response):
    if environ.get("PATH_INFO") == "/block":
        slow_handler()
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "12")])
    return [b"hello world\n"]
