"""A WSGI app served by waitress in every worker, on the master's shared socket.

    pip install -e '.[wsgi]' && python examples/wsgi_waitress.py

When a worker is disconnected it stops accepting (the master's socket keeps queueing
for the other workers), waits until no request is being handled, and exits. waitress
cannot be told to answer `Connection: close` on a keep-alive connection, so a client
that reuses a connection at that moment sees it closed and retries (as with any
waitress restart); for zero-error reloads under keep-alive, see asyncio_server.py or
asgi_uvicorn.py.
"""

import os
import time

import pycluster

PORT = int(os.environ.get("PORT", 8000))
HOST = os.environ.get("HOST", "0.0.0.0")


def app(environ, start_response):
    body = f"hello from worker {pycluster.worker.id}\n".encode()
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]


if pycluster.is_primary:
    master = pycluster.Master()
    master.use("logging").use("respawn").use("reload")
    for _ in range(int(os.environ.get("WORKERS", os.cpu_count()))):
        master.fork()
    raise SystemExit(master.run())
else:
    from waitress.server import create_server

    server = create_server(app, sockets=[pycluster.worker.listen(PORT, HOST)], threads=4)

    def stop_accepting():  # runs on waitress's loop
        server.del_channel()
        server.socket.close()

    def drain(grace=10.0):
        server.trigger.pull_trigger(stop_accepting)
        tasks, deadline = server.task_dispatcher, time.monotonic() + grace
        while (tasks.active_count or tasks.queue) and time.monotonic() < deadline:
            time.sleep(0.01)  # requests in flight finish
        pycluster.worker.kill()  # leave the cluster now (exit 0)

    pycluster.worker.on("disconnect", drain)  # runs on pycluster's IPC thread
    server.run()
