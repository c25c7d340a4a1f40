"""A Flask app, served by pycluster: waitress in every worker, zero-error reloads.

    pip install -e '.[wsgi]' flask
    cd examples && pycluster run flask_app:app --workers 4

`pycluster run` finds the WSGI app and serves it with waitress (`--threads` per worker) on
the master's shared socket, with the same drain as for ASGI apps.
"""

from flask import Flask

import pycluster

app = Flask(__name__)


@app.get("/")
def index():
    worker = pycluster.worker.id if pycluster.worker else 0
    return {"message": "hello", "worker": worker}
