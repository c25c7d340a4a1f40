"""An aiohttp app with aiohttp's own runner, on the master's shared socket.

    pip install aiohttp
    cd examples && pycluster run aiohttp_app:main --workers 4

aiohttp is neither ASGI nor WSGI, so `main` is the function each worker calls. It drains
like `pycluster run` does for ASGI and WSGI apps: when the worker is disconnected it stops
accepting, answers the next request on each keep-alive connection with
`Connection: close`, and returns once its connections are gone.
"""

import asyncio

from aiohttp import web

import pycluster

GRACE = 20.0  # seconds; below pycluster run's --graceful-timeout (30)


async def index(request):
    return web.json_response({"message": "hello", "worker": pycluster.worker.id})


def make_app():
    app = web.Application()
    app.router.add_get("/", index)
    return app


async def serve():
    stopping = asyncio.Event()
    pycluster.worker.attach_loop()  # pycluster's events run on this loop
    pycluster.worker.on("disconnect", stopping.set)
    app = make_app()

    async def close_when_stopping(request, response):
        if stopping.is_set():
            response.force_close()  # "Connection: close", then the connection closes

    app.on_response_prepare.append(close_when_stopping)
    runner = web.AppRunner(app, handle_signals=False, access_log=None, keepalive_timeout=5)
    await runner.setup()
    site = web.SockSite(runner, pycluster.worker.listen())
    await site.start()
    await stopping.wait()
    await site.stop()  # stop accepting; the other workers take the new connections
    loop = asyncio.get_running_loop()
    deadline = loop.time() + GRACE
    while loop.time() < deadline:  # each connection closes after its next response
        if not runner.server.connections:
            break
        await asyncio.sleep(0.05)
    await runner.cleanup()


def main():
    asyncio.run(serve())
