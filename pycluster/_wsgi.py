"""Serving a WSGI app with waitress in a worker, on the master's socket, with our drain.

Waitress was chosen by measurement (README, "Choosing the WSGI server"). It has no
drain of its own, so pycluster adds one through waitress's extension points, its server's
``channel_class`` and the channel's ``task_class``:

- stop accepting: the server's ``accepting`` flag, set on waitress's loop (the master's
  socket keeps queueing for the other workers);
- ``Connection: close`` on the next response of each keep-alive connection: a task
  subclass closes the connection after any response that starts while draining (a WSGI
  app may not set hop-by-hop headers itself);
- the end: when no connection is left (idle ones close after ``keep_alive`` seconds, in
  waitress's own maintenance), or at the graceful timeout, the loop stops, the request
  threads finish, and the worker returns 0.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

from waitress.channel import HTTPChannel
from waitress.server import create_server
from waitress.task import WSGITask

import pycluster

from ._apps import AppError, ServeOptions, listen_or_leave

__all__ = ["serve"]

_POLL = 0.05
access_log = logging.getLogger("pycluster.access")


class _Drain:
    """Whether this worker drains; read by every response (one attribute load)."""

    draining = False


class _ClosingTask(WSGITask):  # type: ignore[misc]
    def build_response_header(self) -> Any:
        if _Drain.draining:
            self.set_close_on_finish()  # adds "Connection: close" unless the app chose
        return super().build_response_header()


class _Channel(HTTPChannel):  # type: ignore[misc]
    task_class = _ClosingTask


def _with_access_log(app: Callable[..., Any]) -> Callable[..., Any]:
    """Log one line per response, as uvicorn's access log does."""

    def logged(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        def start(status: str, headers: Any, exc_info: Any = None) -> Any:
            access_log.info('%s - "%s %s %s" %s', environ.get("REMOTE_ADDR", "-"),
                            environ.get("REQUEST_METHOD"), environ.get("PATH_INFO"),
                            environ.get("SERVER_PROTOCOL"), status)
            return start_response(status, headers, exc_info)

        return app(environ, start)  # type: ignore[no-any-return]

    return logged


def _counted(app: Callable[..., Any], count: Callable[[], None]) -> Callable[..., Any]:
    """*app*, counting each request it answers (``--max-requests``, ``pycluster status``)."""

    def counted(environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        try:
            return app(environ, start_response)
        finally:
            count()

    return counted


def _beat_in_maintenance(server: Any, beat: Callable[[], None]) -> None:
    """Send the watchdog's heartbeats from waitress's own loop: it calls each server's
    ``maintenance()`` every ``cleanup_interval`` (1 s) while the loop turns, and stops
    when the loop hangs, which is what the watchdog must notice."""
    for each in {id(x): x for x in [server, *getattr(server, "_map", {}).values()]
                 if hasattr(x, "maintenance")}.values():
        original = each.maintenance

        def maintenance(now: float, original: Callable[[float], None] = original) -> None:
            beat()
            original(now)

        each.maintenance = maintenance


def _mounted(app: Callable[..., Any], root_path: str) -> Callable[..., Any]:
    """The app behind a proxy that strips *root_path*: it goes into ``SCRIPT_NAME``."""
    prefix = root_path.rstrip("/")

    def mounted(environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        environ["SCRIPT_NAME"] = prefix + environ.get("SCRIPT_NAME", "")
        return app(environ, start_response)

    return mounted


def serve(app: Any, options: ServeOptions) -> int:
    """Serve *app* on ``pycluster.worker.listen()`` until disconnected; return the exit code."""
    worker = pycluster.worker
    assert worker is not None
    if options.access_log:
        handler = logging.StreamHandler(sys.stdout)  # where uvicorn's access log goes
        handler.setFormatter(logging.Formatter("%(levelname)s:     %(message)s"))
        access_log.addHandler(handler)
        access_log.propagate = False
        access_log.setLevel(logging.INFO)
        app = _with_access_log(app)
    # waitress warns "Task queue depth is N" whenever a request waits for a thread:
    # routine under load, and every worker would print it.
    logging.getLogger("waitress.queue").setLevel(logging.ERROR)
    if options.root_path:
        app = _mounted(app, options.root_path)
    extra: dict[str, Any] = {}
    if options.proxy_headers:
        if "," in options.forwarded_allow_ips:
            msg = (f"--forwarded-allow-ips {options.forwarded_allow_ips!r}: waitress trusts one "
                   "proxy address, or '*' for any")
            raise AppError(msg)
        extra.update(
            trusted_proxy=options.forwarded_allow_ips,
            trusted_proxy_headers={"x-forwarded-for", "x-forwarded-proto",
                                   "x-forwarded-host", "x-forwarded-port"},
        )
    if options.ssl_certfile or options.ssl_keyfile:
        msg = ("TLS (--ssl-certfile) is served for ASGI apps only: waitress has no TLS; "
               "terminate TLS in a proxy in front of a WSGI app")
        raise AppError(msg)
    if options.limit_concurrency:
        extra["connection_limit"] = options.limit_concurrency
    sock = listen_or_leave(worker)
    if sock is None:
        return 0
    server = create_server(
        _counted(app, worker.count_request),
        sockets=[sock],
        threads=options.threads,
        channel_timeout=options.keep_alive,
        cleanup_interval=1,
        **extra,
    )
    server.channel_class = _Channel
    _beat_in_maintenance(server, worker.heartbeat)
    done = threading.Event()
    worker.on("disconnect", lambda: _drain(server, options, done))
    server.run()
    server.task_dispatcher.shutdown()  # joins the request threads (they are idle now)
    return 0


def _drain(server: Any, options: ServeOptions, done: threading.Event) -> None:
    """On disconnect (on the pycluster-ipc thread): stop accepting, let each keep-alive
    connection close after its next response, and end waitress's loop when none is left."""
    if done.is_set():
        return
    done.set()
    deadline = time.monotonic() + max(0.0, options.graceful_timeout - 1.0)
    _Drain.draining = True

    stopped = threading.Event()

    def stop_accepting() -> None:
        server.accepting = False
        stopped.set()

    server.trigger.pull_trigger(stop_accepting)
    # Count connections only once waitress stopped accepting: one it accepts meanwhile
    # must be waited for, not closed with its request unread.
    stopped.wait(max(0.0, deadline - time.monotonic()))
    while server.active_channels and time.monotonic() < deadline:
        time.sleep(_POLL)
    server.trigger.pull_trigger(lambda: _close_all(server))


def _close_all(server: Any) -> None:
    for channel in list(server.active_channels.values()):
        channel.close()
    server.close()  # the trigger and the listening socket: the loop has nothing left
