"""The apps benchmarks/serve.py serves with every server: the same objects for all.

``fastapi_app``: a FastAPI app; ``flask_app``: a Flask app. Each answers ``/`` with a
small JSON body and ``/slow`` after half a second (requests in flight at SIGTERM).
"""

import asyncio
import time

from fastapi import FastAPI
from flask import Flask

fastapi_app = FastAPI()


@fastapi_app.get("/")
async def fastapi_index():
    return {"message": "hello"}


@fastapi_app.get("/slow")
async def fastapi_slow():
    await asyncio.sleep(0.5)
    return {"message": "slow"}


flask_app = Flask(__name__)


@flask_app.get("/")
def flask_index():
    return {"message": "hello"}


@flask_app.get("/slow")
def flask_slow():
    time.sleep(0.5)
    return {"message": "slow"}
