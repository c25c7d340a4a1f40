"""A FastAPI app, served by pycluster: uvicorn in every worker, zero-error reloads.

    pip install -e '.[asgi]' fastapi
    cd examples && pycluster run fastapi_app:app --workers 4

There is no cluster code here: `pycluster run` finds the ASGI app, serves it with uvicorn on
the master's shared socket in each worker, and drains a worker that is stopped or replaced
(SIGHUP to the master: a rolling reload) without dropping a request.
"""

from contextlib import asynccontextmanager

from fastapi import FastAPI, Request

import pycluster


@asynccontextmanager
async def lifespan(app):
    yield {"greeting": "hello"}  # runs in each worker before it listens; a failure stops it


app = FastAPI(lifespan=lifespan)


@app.get("/")
async def index(request: Request):
    worker = pycluster.worker.id if pycluster.worker else 0
    return {"message": request.state.greeting, "worker": worker}
