"""Chaos target for ``reliability.py``: the hello world of ``examples/hello.py`` on 127.0.0.1.

``python rel_hello.py`` with ``WORKERS`` (default 2) and ``PORT`` (default 0: the master
binds an ephemeral port; ``reliability.py`` reads it from ``/proc``). Respawn is on, with
its crash-loop guard widened (this run kills on purpose) and ``stable_after=0.2`` so a
worker that served for 0.2 s is replaced at once, as gunicorn and uvicorn replace theirs.
``Hello`` is ``hello_app.py``'s, which ``core.py`` checks is the one in ``examples/hello.py``.
"""

import asyncio
import os
import sys

from hello_app import Hello

import pycluster


async def serve(port):
    sock = pycluster.worker.listen(port, "127.0.0.1")
    server = await asyncio.get_running_loop().create_server(Hello, sock=sock)
    await server.serve_forever()


if pycluster.is_primary:
    master = pycluster.Master(kill_timeout=5)
    master.use("respawn", max_restarts=1_000_000, stable_after=0.2)
    for _ in range(int(os.environ.get("WORKERS", "2"))):
        master.fork()
    sys.exit(master.run())
else:
    asyncio.run(serve(int(os.environ.get("PORT", "0"))))
