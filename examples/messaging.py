"""Master↔worker messages: workers report the requests they serve; the master keeps
the totals and answers `GET /stats` requests through any worker.

    python examples/messaging.py     # then: curl localhost:8000/ ; curl localhost:8000/stats

Each worker sends `{"served": n}` to the master every 100 requests and once a second.
For `/stats` a worker asks the master (`{"stats": request_id}`) and the master answers
that worker with the totals per worker.
"""

import json
import os
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pycluster

if pycluster.is_primary:
    master = pycluster.Master()
    master.use("logging").use("respawn")
    served = {}  # worker id -> requests

    def on_message(worker, message):
        if "served" in message:
            served[worker.id] = served.get(worker.id, 0) + message["served"]
        elif "stats" in message:
            worker.send({"reply": message["stats"], "served": served})

    master.on("message", on_message)
    for _ in range(int(os.environ.get("WORKERS", os.cpu_count()))):
        master.fork()
    raise SystemExit(master.run())

worker = pycluster.worker
lock = threading.Lock()
unreported = 0
replies = {}  # request id -> [event, answer]


def report():
    global unreported
    with lock:
        count, unreported = unreported, 0
    if count and worker.is_connected():
        worker.send({"served": count})


def on_message(message):
    waiting = replies.get(message.get("reply"))
    if waiting:
        waiting[1] = message["served"]
        waiting[0].set()


def ask_master():
    key = threading.get_ident()
    replies[key] = waiting = [threading.Event(), None]
    report()  # include what this worker served so far
    worker.send({"stats": key})
    waiting[0].wait(5)
    del replies[key]
    return waiting[1]


class Handler(BaseHTTPRequestHandler):
    disable_nagle_algorithm = True

    def do_GET(self):
        global unreported
        if self.path == "/stats":
            body = json.dumps(ask_master()).encode() + b"\n"
        else:
            body = f"hello from worker {worker.id}\n".encode()
            with lock:
                unreported += 1
                due = unreported >= 100
            if due:
                report()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format, *args):
        pass


def tick(stop):
    while not stop.wait(1.0):
        report()


worker.on("message", on_message)
stopped = threading.Event()
threading.Thread(target=tick, args=(stopped,), daemon=True).start()
server = ThreadingHTTPServer(("", 0), Handler, bind_and_activate=False)
server.socket.close()
server.socket = worker.listen(int(os.environ.get("PORT", 8000)))
worker.on("disconnect", lambda: (stopped.set(), server.shutdown()))
server.serve_forever()
server.server_close()
