"""The app of ``forkserver.py``: ``fs_app:main``, an asyncio hello world that drains.

With ``BENCH_NUMPY=1`` the module imports numpy and builds an 8 MB table at import (a
stand-in for an app with a heavy library and data loaded at start). ``VERSION`` is what
it answers; ``forkserver.py`` rewrites it to show that a reload runs new code. On
``disconnect`` it stops accepting, answers the next request on each connection with
``Connection: close`` and returns once its connections are gone.
"""

from __future__ import annotations

import asyncio
import os

import pycluster

VERSION = "v1"
if os.environ.get("BENCH_NUMPY"):
    import numpy

    TABLE = numpy.arange(1_000_000, dtype=numpy.float64)


class Hello(asyncio.Protocol):
    """Answers VERSION to every request; once draining, the next answer closes."""

    connections: set[Hello] = set()
    draining = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport, self.buffer = transport, b""
        self.connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.connections.discard(self)

    def data_received(self, data: bytes) -> None:
        *requests, self.buffer = (self.buffer + data).split(b"\r\n\r\n")
        if not requests:
            return
        body = VERSION.encode() + b"\n"
        head = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n" % len(body)
        keep, close = head + b"\r\n" + body, head + b"Connection: close\r\n\r\n" + body
        if self.draining:
            self.transport.write(keep * (len(requests) - 1) + close)
            self.transport.close()
        else:
            self.transport.write(keep * len(requests))


async def serve(grace: float = 5.0) -> None:
    worker = pycluster.worker
    assert worker is not None
    worker.attach_loop()
    disconnected = asyncio.Event()
    worker.on("disconnect", disconnected.set)
    server = await asyncio.get_running_loop().create_server(Hello, sock=worker.listen())
    await disconnected.wait()
    # Stop accepting (queued connections go to the other workers), give the connections
    # accepted a moment ago their transports, then close: asyncio resets a connection
    # whose transport is made after its server closed.
    loop = asyncio.get_running_loop()
    for sock in server.sockets:
        loop.remove_reader(sock.fileno())
    await asyncio.sleep(0.05)
    server.close()
    Hello.draining = True
    for _ in range(int(grace / 0.05)):
        if not Hello.connections:
            break
        await asyncio.sleep(0.05)
    for connection in list(Hello.connections):
        connection.transport.close()


def main() -> None:
    asyncio.run(serve())
