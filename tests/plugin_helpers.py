"""Helpers for the plugin tests: a master driven by a scenario, an HTTP keep-alive client."""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any

from helpers import DEADLINE

import pycluster

#: An asyncio HTTP worker that drains like examples/asyncio_server.py, on 127.0.0.1 port 0.
#: It tells the master its id, port, TAG env variable and VERSION (the code on disk).
HTTP_WORKER = """
    import asyncio, os, pycluster

    VERSION = {version!r}
    worker = pycluster.worker
    BODY = f"worker {{worker.id}} version {{VERSION}}\\n".encode()
    HEAD = b"HTTP/1.1 200 OK\\r\\nContent-Length: %d\\r\\n" % len(BODY)
    KEEP, CLOSE = HEAD + b"\\r\\n" + BODY, HEAD + b"Connection: close\\r\\n\\r\\n" + BODY


    class Hello(asyncio.Protocol):
        connections = set()
        draining = False

        def connection_made(self, transport):
            self.transport, self.buffer = transport, b""
            self.connections.add(self)

        def connection_lost(self, exc):
            self.connections.discard(self)

        def data_received(self, data):
            *requests, self.buffer = (self.buffer + data).split(b"\\r\\n\\r\\n")
            if not requests:
                return
            if self.draining:
                self.transport.write(KEEP * (len(requests) - 1) + CLOSE)
                self.transport.close()
            else:
                self.transport.write(KEEP * len(requests))


    async def serve():
        worker.attach_loop()
        disconnected = asyncio.Event()
        worker.on("disconnect", disconnected.set)
        {before_listen}
        sock = worker.listen(0, "127.0.0.1")
        server = await asyncio.get_running_loop().create_server(Hello, sock=sock)
        worker.send({{"id": worker.id, "port": sock.getsockname()[1],
                      "tag": os.environ.get("TAG"), "version": VERSION}})
        {after_listen}
        await disconnected.wait()
        server.close()
        Hello.draining = True
        for _ in range(200):
            if not Hello.connections:
                break
            await asyncio.sleep(0.05)
        for connection in list(Hello.connections):
            connection.transport.close()


    asyncio.run(serve())
"""


def http_worker(version: int = 1, before_listen: str = "pass", after_listen: str = "pass") -> str:
    """The source of :data:`HTTP_WORKER` with its blanks filled in."""
    return HTTP_WORKER.format(version=version, before_listen=before_listen,
                              after_listen=after_listen)


class Running:
    """A master being served on this thread's loop, as a scenario coroutine sees it."""

    def __init__(self, master: pycluster.Master, task: asyncio.Future[int]) -> None:
        self.master = master
        self.task = task

    async def until(self, predicate: Callable[[], Any], what: str,
                    timeout: float = DEADLINE) -> Any:
        """Poll *predicate* on the loop until it is truthy; fail naming *what* if the
        deadline passes or the master ends first."""
        deadline = time.monotonic() + timeout
        while True:
            value = predicate()
            if value:
                return value
            task = self.task
            if task.done():
                code = None if task.cancelled() or task.exception() else task.result()
                msg = f"the master ended (code {code}) before {what}"
                raise AssertionError(msg)
            assert time.monotonic() < deadline, f"timed out waiting for {what}"
            await asyncio.sleep(0.01)


def drive(master: pycluster.Master, scenario: Callable[[Running], Awaitable[None]] | None = None,
          timeout: float = DEADLINE) -> int:
    """Serve *master* and run *scenario* beside it on one loop; return the exit code.

    The scenario is what a user's code in the master does: it waits for events and acts.
    Each of the scenario and the rest of the master's run gets *timeout* seconds; on any
    failure the master is cancelled, which kills and reaps its workers.
    """

    async def main() -> int:
        served = asyncio.ensure_future(master.serve())
        try:
            if scenario is not None:
                await asyncio.wait_for(scenario(Running(master, served)), timeout)
            done, _ = await asyncio.wait({served}, timeout=timeout)
            assert served in done, f"master did not finish within {timeout} s"
            return served.result()
        finally:
            if not served.done():
                served.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await served

    return asyncio.run(main())


class Client(threading.Thread):
    """Keep-alive HTTP GETs against 127.0.0.1:*port* in a loop until :meth:`finish`.

    Counts good answers and records every failure (an exception or a status other than
    200); a ``Connection: close`` answer is followed by a new connection, as a browser does.
    """

    def __init__(self, port: int) -> None:
        super().__init__(daemon=True)
        self.port = port
        self.ok = 0
        self.failures: list[str] = []
        self.bodies: set[bytes] = set()
        self.last = b""
        self._halt = threading.Event()

    def run(self) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        try:
            while not self._halt.is_set():
                try:
                    conn.request("GET", "/")
                    response = conn.getresponse()
                    body = response.read()
                except (OSError, http.client.HTTPException) as exc:
                    self.failures.append(repr(exc))
                    conn.close()
                    continue
                if response.status != 200:
                    self.failures.append(f"status {response.status}: {body!r}")
                else:
                    self.ok += 1
                    self.bodies.add(body)
                    self.last = body
        finally:
            conn.close()

    def finish(self) -> None:
        """Stop the loop and wait for the thread (with a deadline)."""
        self._halt.set()
        self.join(DEADLINE)
        assert not self.is_alive(), "the HTTP client thread did not stop"


@contextlib.contextmanager
def clients(port: int, n: int = 4) -> Any:
    """Run *n* :class:`Client` threads against *port* for the duration of the block."""
    running = [Client(port) for _ in range(n)]
    for client in running:
        client.start()
    try:
        yield running
    finally:
        for client in running:
            client.finish()
