"""The app of benchmarks/guard.py under ``pycluster run``: an asyncio HTTP server that
counts each request with ``pycluster.worker.count_request()``, drains like
examples/asyncio_server.py, and blocks its loop in ``slow_handler()`` on ``GET /block``."""

import asyncio
import time

import pycluster

worker = pycluster.worker
BODY = b"hello world\n"
HEAD = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n" % len(BODY)
KEEP, CLOSE = HEAD + b"\r\n" + BODY, HEAD + b"Connection: close\r\n\r\n" + BODY


def slow_handler():
    time.sleep(60)  # a request stuck in blocking code: the loop stops turning


class Hello(asyncio.Protocol):
    connections: set = set()
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
        if any(r.startswith(b"GET /block") for r in requests):
            slow_handler()
        worker.count_request(len(requests))
        if self.draining:
            self.transport.write(KEEP * (len(requests) - 1) + CLOSE)
            self.transport.close()
        else:
            self.transport.write(KEEP * len(requests))


async def serve(grace=5.0):
    worker.attach_loop()  # handlers on this loop, and the loop's own heartbeats
    disconnected = asyncio.Event()
    worker.on("disconnect", disconnected.set)
    server = await asyncio.get_running_loop().create_server(Hello, sock=worker.listen())
    await disconnected.wait()
    server.close()
    Hello.draining = True
    for _ in range(int(grace / 0.05)):
        if not Hello.connections:
            break
        await asyncio.sleep(0.05)
    for connection in list(Hello.connections):
        connection.transport.close()


asyncio.run(serve())
