"""Serving an ASGI app with uvicorn in a worker, on the master's socket, with our drain.

Only uvicorn's public API is used: ``uvicorn.Config`` (with an HTTP protocol class, which
``Config(http=...)`` accepts) and ``uvicorn.Server.serve(sockets=...)``, ``started`` and
``should_exit``. The drain needs three things uvicorn does not expose, so pycluster
keeps them itself:

- the listening servers, to stop accepting: the event loop is a subclass whose
  ``create_server`` remembers what it made;
- the open connections, to know when the drain is over: the HTTP protocol class is a
  subclass that records each transport in ``connection_made``/``connection_lost``;
- ``Connection: close`` on the next response of each keep-alive connection: the app is
  wrapped, and while draining the wrapper adds the header, which uvicorn honours by
  closing the connection after that response.

Lifespan runs here too (before ``listen()``, so a failing startup is a boot failure
that the respawn plugin does not retry), and its state reaches every request's scope.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import uvicorn
from uvicorn.config import HTTP_PROTOCOLS
from uvicorn.importer import import_from_string

import pycluster

from ._apps import BOOT_FAILURE, ServeOptions, listen_or_leave

__all__ = ["serve"]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

log = logging.getLogger("pycluster.serve")
_CLOSE = (b"connection", b"close")
_POLL = 0.05


class _Gate:
    """The app as uvicorn sees it: lifespan state in each scope, ``Connection: close``
    on every response that starts while the worker drains."""

    def __init__(self, app: Any, asgi2: bool) -> None:
        self.app = app
        self.asgi2 = asgi2
        self.state: dict[str, Any] = {}
        self.draining = False
        worker = pycluster.worker
        #: Counts each HTTP request served (``--max-requests``, ``pycluster status``).
        self.count: Any = worker.count_request if worker is not None else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.state and scope["type"] != "lifespan":
            scope["state"] = self.state.copy()
        http = scope["type"] == "http"
        if self.draining and http:
            send = _closing(send)
        try:
            if self.asgi2:
                await self.app(scope)(receive, send)
            else:
                await self.app(scope, receive, send)
        finally:
            if http and self.count is not None:
                self.count()


def _closing(send: Send) -> Send:
    async def closing_send(message: Message) -> None:
        if message["type"] == "http.response.start":
            headers = [h for h in message.get("headers", ()) if h[0].lower() != b"connection"]
            message = {**message, "headers": [*headers, _CLOSE]}
        await send(message)

    return closing_send


class _Lifespan:
    """The ASGI lifespan protocol, as uvicorn's ``lifespan="auto"`` runs it."""

    def __init__(self, gate: _Gate) -> None:
        self.gate = gate
        self.inbox: asyncio.Queue[Message] = asyncio.Queue()
        self.replies: asyncio.Queue[Message | None] = asyncio.Queue()
        self.task: asyncio.Task[None] | None = None
        self.supported = True

    async def _run(self) -> None:
        scope = {"type": "lifespan", "asgi": {"version": "3.0", "spec_version": "2.0"},
                 "state": self.gate.state}
        try:
            await self.gate(scope, self.inbox.get, self._send)
        except BaseException as exc:  # noqa: BLE001 - any error means "no lifespan here"
            if not isinstance(exc, Exception):
                raise
            self.supported = False
            log.debug("ASGI lifespan unsupported or failed: %r", exc)
        finally:
            self.replies.put_nowait(None)

    async def _send(self, message: Message) -> None:
        await self.replies.put(message)

    async def startup(self) -> str | None:
        """Run startup; return ``None`` when the app is ready, else why it failed."""
        self.task = asyncio.ensure_future(self._run())
        await self.inbox.put({"type": "lifespan.startup"})
        reply = await self.replies.get()
        if reply is None:
            return None  # the app does not speak lifespan (uvicorn's "auto")
        if reply["type"] == "lifespan.startup.failed":
            return str(reply.get("message") or "lifespan.startup.failed")
        return None

    async def shutdown(self) -> None:
        if not self.supported or self.task is None or self.task.done():
            return
        await self.inbox.put({"type": "lifespan.shutdown"})
        reply = await self.replies.get()
        if reply is not None and reply["type"] == "lifespan.shutdown.failed":
            log.error("ASGI lifespan shutdown failed: %s", reply.get("message"))


def _tracked(base: type[asyncio.Protocol], live: set[Any]) -> type[asyncio.Protocol]:
    """A subclass of uvicorn's HTTP protocol class that records its open transports."""

    def connection_made(self: Any, transport: Any) -> None:
        live.add(transport)
        base.connection_made(self, transport)

    def connection_lost(self: Any, exc: Exception | None) -> None:
        live.discard(getattr(self, "transport", None))
        base.connection_lost(self, exc)

    namespace = {"connection_made": connection_made, "connection_lost": connection_lost}
    return type(f"Tracked{base.__name__}", (base,), namespace)


def _loop_factory(servers: list[Any]) -> Callable[[], asyncio.AbstractEventLoop]:
    """A loop class (uvloop's when installed) whose ``create_server`` keeps its servers."""
    base: type[asyncio.AbstractEventLoop]
    try:
        import uvloop

        base = uvloop.Loop
    except ImportError:
        base = asyncio.SelectorEventLoop

    async def create_server(self: Any, *args: Any, **kwargs: Any) -> Any:
        server = await base.create_server(self, *args, **kwargs)
        servers.append(server)
        return server

    return type("PyclusterLoop", (base,), {"create_server": create_server})


def serve(app: Any, options: ServeOptions, *, asgi2: bool = False) -> int:
    """Serve *app* on ``pycluster.worker.listen()`` until disconnected; return the exit code."""
    worker = pycluster.worker
    assert worker is not None
    gate = _Gate(app, asgi2)
    live: set[Any] = set()
    servers: list[Any] = []
    config = uvicorn.Config(
        gate,
        interface="asgi3",
        lifespan="off",  # ours runs before listen(); see _Lifespan
        http=_tracked(import_from_string(HTTP_PROTOCOLS[options.http]), live),
        log_level="warning",
        access_log=options.access_log,
        proxy_headers=options.proxy_headers,
        forwarded_allow_ips=options.forwarded_allow_ips,
        root_path=options.root_path,
        timeout_keep_alive=options.keep_alive,
        limit_concurrency=options.limit_concurrency,
        ssl_keyfile=options.ssl_keyfile,
        ssl_certfile=options.ssl_certfile,
        timeout_graceful_shutdown=1,
        # asyncio accepts up to `backlog` connections per wake-up; the master's socket keeps
        # its own backlog (SharedSocket.listen does nothing). One at a time, the workers
        # woken together share a burst of connections instead of the first taking them all.
        backlog=1,
    )
    if options.access_log:
        logging.getLogger("uvicorn.access").setLevel(logging.INFO)
    try:
        config.load()
    except Exception as exc:  # TLS files that do not load, a missing httptools, ...
        print(f"pycluster: error: cannot configure uvicorn: {exc}", file=sys.stderr, flush=True)
        return BOOT_FAILURE
    server = uvicorn.Server(config)
    loop = _loop_factory(servers)()
    try:
        asyncio.set_event_loop(loop)
        return loop.run_until_complete(_main(server, gate, live, servers, options))
    finally:
        try:
            loop.run_until_complete(loop.shutdown_asyncgens())
        finally:
            asyncio.set_event_loop(None)
            loop.close()


async def _main(server: uvicorn.Server, gate: _Gate, live: set[Any], servers: list[Any],
                options: ServeOptions) -> int:
    worker = pycluster.worker
    assert worker is not None
    loop = asyncio.get_running_loop()
    worker.attach_loop(loop)
    stopping = loop.create_future()

    def on_disconnect() -> None:
        if not stopping.done():
            stopping.set_result(time.monotonic())

    worker.on("disconnect", on_disconnect)
    lifespan = _Lifespan(gate)
    failed = await lifespan.startup()
    if failed is not None:
        print(f"pycluster: error: ASGI lifespan startup failed: {failed}", file=sys.stderr,
              flush=True)
        return BOOT_FAILURE
    if stopping.done():
        await lifespan.shutdown()
        return 0
    sock = await loop.run_in_executor(None, listen_or_leave, worker)
    if sock is None:
        await lifespan.shutdown()
        return 0
    drain = asyncio.ensure_future(_drain(server, gate, live, servers, stopping, options))
    try:
        await server.serve(sockets=[sock])
    finally:
        drain.cancel()
    await lifespan.shutdown()
    return 0


async def _drain(server: uvicorn.Server, gate: _Gate, live: set[Any], servers: list[Any],
                 stopping: asyncio.Future[float], options: ServeOptions) -> None:
    """On disconnect: stop accepting, close each keep-alive connection after its next
    response, wait for the connections to go (or the graceful timeout), then let uvicorn
    finish (it waits for what is still running, then returns)."""
    began = await stopping
    # Leave a second of the master's timeout for uvicorn's shutdown and lifespan.
    deadline = began + max(0.0, options.graceful_timeout - 1.0)
    gate.draining = True
    while not server.started and not server.should_exit:  # noqa: ASYNC110 - no event for it
        await asyncio.sleep(_POLL)
    # Stop accepting first, and close the servers only once the connections accepted
    # meanwhile have their transports: asyncio makes a transport a loop turn or more after
    # the accept, and one made after its server closed is reset unserved (the server's
    # _attach() asserts that it is open).
    loop = asyncio.get_running_loop()
    for listener in servers:
        for sock in listener.sockets:
            loop.remove_reader(sock.fileno())
    await asyncio.sleep(_POLL)
    for listener in servers:
        listener.close()
    while time.monotonic() < deadline:
        for transport in [t for t in live if t.is_closing()]:
            live.discard(transport)
        if not live:
            break
        await asyncio.sleep(_POLL)
    server.should_exit = True
