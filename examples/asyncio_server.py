"""An asyncio HTTP server that drains gracefully: reloads and stops lose no request.

    python examples/asyncio_server.py          # then: kill -HUP <master pid>

Respawn, rolling reload (SIGHUP) and logging are on. When a worker is disconnected it
stops accepting (the master's shared socket keeps queueing for the other workers),
answers the next request on each keep-alive connection with ``Connection: close``, and
exits once its connections are gone (idle ones are closed after a grace period).
"""

import asyncio
import os

import pycluster

PORT = int(os.environ.get("PORT", 8000))
HOST = os.environ.get("HOST", "0.0.0.0")
BODY = f"hello from worker {pycluster.worker.id if pycluster.worker else 0}\n".encode()
HEAD = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n" % len(BODY)
KEEP, CLOSE = HEAD + b"\r\n" + BODY, HEAD + b"Connection: close\r\n\r\n" + BODY


class Hello(asyncio.Protocol):
    """Answers every request; once draining, the next answer closes the connection."""

    connections: set["Hello"] = set()
    draining = False

    def connection_made(self, transport):
        self.transport, self.buffer = transport, b""
        self.connections.add(self)

    def connection_lost(self, exc):
        self.connections.discard(self)

    def data_received(self, data):
        *requests, self.buffer = (self.buffer + data).split(b"\r\n\r\n")
        if not requests:
            return
        if self.draining:
            self.transport.write(KEEP * (len(requests) - 1) + CLOSE)
            self.transport.close()
        else:
            self.transport.write(KEEP * len(requests))


async def serve(grace=5.0):
    worker = pycluster.worker
    worker.attach_loop()  # run pycluster's event handlers on this loop
    disconnected = asyncio.Event()
    worker.on("disconnect", disconnected.set)
    server = await asyncio.get_running_loop().create_server(Hello, sock=worker.listen(PORT, HOST))
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
    for connection in list(Hello.connections):  # idle past the grace period
        connection.transport.close()


if pycluster.is_primary:
    master = pycluster.Master()
    master.use("logging").use("respawn").use("reload")
    for _ in range(int(os.environ.get("WORKERS", os.cpu_count()))):
        master.fork()
    raise SystemExit(master.run())
else:
    asyncio.run(serve())
