"""An ASGI app served by uvicorn in every worker, on the master's shared socket.

    pip install -e '.[asgi]' && python examples/asgi_uvicorn.py

uvicorn does the HTTP; pycluster does the processes: respawn, rolling reload on SIGHUP
and logging. When a worker is disconnected it drains without dropping a request: it
stops accepting (the master's socket keeps queueing for the other workers), answers
the next request on each keep-alive connection with `Connection: close`, and asks
uvicorn to exit once its connections are gone (or after a grace period).
"""

import asyncio
import os

import pycluster

PORT = int(os.environ.get("PORT", 8000))
HOST = os.environ.get("HOST", "0.0.0.0")
draining = False


async def hello(scope, receive, send):
    body = f"hello from worker {pycluster.worker.id if pycluster.worker else 0}\n".encode()
    headers = [(b"content-type", b"text/plain"), (b"content-length", b"%d" % len(body))]
    if draining:
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def app(scope, receive, send):
    if scope["type"] == "http":
        await hello(scope, receive, send)
    elif scope["type"] == "lifespan":
        while (await receive())["type"] != "lifespan.shutdown":  # that is, startup
            if pycluster.worker:  # (not under a plain `uvicorn --workers`)
                pycluster.worker.attach_loop()  # pycluster's handlers run on uvicorn's loop
            await send({"type": "lifespan.startup.complete"})
        await send({"type": "lifespan.shutdown.complete"})


async def drain(server, grace=5.0):
    global draining
    draining = True
    for listener in server.servers:
        listener.close()  # stop accepting
    for _ in range(int(grace / 0.05)):
        if not server.server_state.connections:
            break
        await asyncio.sleep(0.05)
    server.should_exit = True


def main():
    if pycluster.is_primary:
        master = pycluster.Master()
        master.use("logging").use("respawn").use("reload")
        for _ in range(int(os.environ.get("WORKERS", os.cpu_count()))):
            master.fork()
        raise SystemExit(master.run())
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    pycluster.worker.on("disconnect", lambda: asyncio.ensure_future(drain(server)))
    server.run(sockets=[pycluster.worker.listen(PORT, HOST)])


if __name__ == "__main__":  # workers re-run this too; `uvicorn asgi_uvicorn:app` does not
    main()
