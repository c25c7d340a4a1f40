"""Hello world: one worker per CPU answers `hello world` over HTTP on port 8000."""

import asyncio
import os

import pycluster

RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Length: 12\r\n\r\nhello world\n"


class Hello(asyncio.Protocol):
    def connection_made(self, transport):
        self.transport, self.buffer = transport, b""

    def data_received(self, data):
        *requests, self.buffer = (self.buffer + data).split(b"\r\n\r\n")
        self.transport.write(RESPONSE * len(requests))


async def serve(port):
    sock = pycluster.worker.listen(port)
    server = await asyncio.get_running_loop().create_server(Hello, sock=sock)
    await server.serve_forever()


if pycluster.is_primary:
    master = pycluster.Master()
    for _ in range(int(os.environ.get("WORKERS", os.cpu_count()))):
        master.fork()
    master.on("exit", lambda worker, code, signal: print(f"worker {worker.pid} died"))
    master.run()
else:
    asyncio.run(serve(int(os.environ.get("PORT", 8000))))
