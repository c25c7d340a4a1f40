"""A synchronous app: the standard library's threading HTTP server on a shared socket.

    python examples/http_server.py

Each worker runs `http.server` in its main thread, as plain blocking code. When the
cluster disconnects a worker, its `disconnect` handler stops `serve_forever()`; requests
in flight finish on their threads (each answer then says `Connection: close`, and idle
keep-alive connections time out) before the worker exits.
"""

import os
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pycluster


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive
    timeout = 5  # an idle keep-alive connection is closed after 5 s (so a drain ends)
    disable_nagle_algorithm = True  # headers and body go out as separate writes

    def do_GET(self):
        body = f"hello from worker {pycluster.worker.id}\n".encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        if not pycluster.worker.is_connected():  # draining: this is the last answer
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format, *args):
        pass


if pycluster.is_primary:
    master = pycluster.Master()
    master.use("logging").use("respawn").use("reload")
    for _ in range(int(os.environ.get("WORKERS", os.cpu_count()))):
        master.fork()
    raise SystemExit(master.run())
else:
    server = ThreadingHTTPServer(("", 0), Handler, bind_and_activate=False)
    server.daemon_threads = False  # server_close() waits for the requests in flight
    server.socket.close()
    server.socket = pycluster.worker.listen(int(os.environ.get("PORT", 8000)))
    pycluster.worker.on("disconnect", server.shutdown)  # runs on pycluster's IPC thread
    server.serve_forever()
    server.server_close()  # waits for the requests in flight
