"""The ``metrics`` plugin's HTTP server: one small HTTP/1.1 connection handler on the
master's loop, answering ``/metrics``, ``/healthz`` and ``/readyz``."""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .metrics import Metrics

__all__ = ["OPENMETRICS", "TEXT", "Http"]

log = logging.getLogger("pycluster.metrics")

TEXT = "text/plain; version=0.0.4; charset=utf-8"
OPENMETRICS = "application/openmetrics-text; version=1.0.0; charset=utf-8"
_MAX_HEAD = 16 * 1024


class Http:
    """A tiny HTTP/1.1 server connection: GET or HEAD of ``/metrics``, ``/healthz``,
    ``/readyz``; keep-alive; one request at a time."""

    def __init__(self, plugin: Metrics) -> None:
        self._plugin = plugin
        self._transport: asyncio.Transport | None = None
        self._buffer = b""
        self._busy = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]
        self._plugin._connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self._plugin._connections.discard(self)
        self._transport = None

    def pause_writing(self) -> None:
        pass

    def resume_writing(self) -> None:
        pass

    def eof_received(self) -> bool:
        return False

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        if len(self._buffer) > 16 * _MAX_HEAD and self._transport is not None:
            self._transport.close()  # a client that sends without reading the answers
            return
        if not self._busy:
            self._next()

    def _next(self) -> None:
        head, found, rest = self._buffer.partition(b"\r\n\r\n")
        if not found:
            if len(self._buffer) > _MAX_HEAD:
                self._answer(431, "text/plain", b"request head too large\n", False, False)
            return
        self._buffer = rest
        lines = head.decode("latin-1").split("\r\n")
        parts = lines[0].split(" ")
        if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
            self._answer(400, "text/plain", b"bad request\n", False, False)
            return
        method, target, version = parts
        headers = {}
        for line in lines[1:]:
            key, _, value = line.partition(":")
            headers[key.strip().lower()] = value.strip()
        connection = headers.get("connection", "").lower()
        keep = connection != "close" if version == "HTTP/1.1" else connection == "keep-alive"
        if headers.get("content-length", "0") not in ("", "0") or "transfer-encoding" in headers:
            self._answer(400, "text/plain", b"no request bodies here\n", False, False)
            return
        if method not in ("GET", "HEAD"):
            self._answer(405, "text/plain", b"GET or HEAD only\n", keep, False, "Allow: GET, HEAD")
            return
        head_only = method == "HEAD"
        path = target.split("?", 1)[0]
        if path == "/metrics":
            openmetrics = "application/openmetrics-text" in headers.get("accept", "")
            self._busy = True
            import asyncio

            task = asyncio.ensure_future(self._plugin.scrape(openmetrics))
            task.add_done_callback(lambda t: self._scraped(t, openmetrics, keep, head_only))
        elif path == "/healthz":
            self._answer(200, "text/plain", b"ok\n", keep, head_only)
        elif path == "/readyz":
            ready, why = self._plugin.ready()
            self._answer(200 if ready else 503, "text/plain", why.encode() + b"\n", keep,
                         head_only)
        else:
            self._answer(404, "text/plain", b"not found: try /metrics, /healthz, /readyz\n",
                         keep, head_only)

    def _scraped(self, task: asyncio.Future[str], openmetrics: bool, keep: bool,
                 head_only: bool) -> None:
        self._busy = False
        if task.cancelled():
            return
        error = task.exception()
        if error is not None:
            log.error("a scrape failed: %r", error)
            self._answer(500, "text/plain", f"scrape failed: {error!r}\n".encode(), keep,
                         head_only)
            return
        self._answer(200, OPENMETRICS if openmetrics else TEXT, task.result().encode(),
                     keep, head_only)

    def _answer(self, status: int, ctype: str, body: bytes, keep: bool, head_only: bool,
                extra: str = "") -> None:
        transport = self._transport
        if transport is None:
            return
        reason = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
                  431: "Request Header Fields Too Large", 500: "Internal Server Error",
                  503: "Service Unavailable"}[status]
        head = (f"HTTP/1.1 {status} {reason}\r\nContent-Type: {ctype}\r\n"
                f"Content-Length: {len(body)}\r\n{extra + chr(13) + chr(10) if extra else ''}"
                f"{'' if keep else 'Connection: close' + chr(13) + chr(10)}\r\n")
        transport.write(head.encode() + (b"" if head_only else body))
        if not keep:
            transport.close()
        elif self._buffer and not self._busy:
            self._next()
