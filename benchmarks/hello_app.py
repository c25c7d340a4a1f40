"""The hello app of ``examples/hello.py`` without pycluster: the baseline server.

``python hello_app.py``: the parent binds 127.0.0.1:$PORT (backlog 2048) and
``os.fork()``s $WORKERS children (default 2) that each serve the identical asyncio
Protocol with ``create_server(sock=...)`` on that one shared socket: the plain way to
share a port, with nothing of pycluster. ``WORKERS=0`` serves in this process instead
(a bare interpreter running the app, for the start-cost figures).

``python hello_app.py --pycluster``: the same app as a pycluster worker (its master is
``startcost.py``), listening through ``pycluster.worker.listen($PORT, "127.0.0.1")``;
imports happen in the same order as in ``examples/hello.py``.

``Hello`` and ``RESPONSE`` are copied from ``examples/hello.py``; ``core.py`` checks that
they are still identical before measuring.
"""

from __future__ import annotations

import asyncio
import os
import socket
import sys

RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Length: 12\r\n\r\nhello world\n"


class Hello(asyncio.Protocol):
    def connection_made(self, transport):
        self.transport, self.buffer = transport, b""

    def data_received(self, data):
        *requests, self.buffer = (self.buffer + data).split(b"\r\n\r\n")
        self.transport.write(RESPONSE * len(requests))


async def serve(sock: socket.socket) -> None:
    """Serve ``Hello`` on *sock* forever."""
    server = await asyncio.get_running_loop().create_server(Hello, sock=sock)
    await server.serve_forever()


def plain(port: int, workers: int) -> None:
    """Bind once, then fork *workers* children that all accept on the same socket."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    sock.listen(2048)
    if workers == 0:
        asyncio.run(serve(sock))
        return
    pids = []
    for _ in range(workers):
        pid = os.fork()
        if pid == 0:
            try:
                asyncio.run(serve(sock))
            finally:
                os._exit(1)
        pids.append(pid)
    sock.close()
    for pid in pids:
        os.waitpid(pid, 0)


if __name__ == "__main__":
    PORT = int(os.environ.get("PORT", "8000"))
    if sys.argv[1:] == ["--pycluster"]:
        import pycluster

        if pycluster.is_primary:
            sys.exit("hello_app.py --pycluster is a worker script; startcost.py is its master")
        asyncio.run(serve(pycluster.worker.listen(PORT, "127.0.0.1")))
    else:
        plain(PORT, int(os.environ.get("WORKERS", "2")))
