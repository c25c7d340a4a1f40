"""``logging``: every lifecycle event on the ``pycluster`` logger; worker output by line."""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any, TextIO

from pycluster import Master, SettingsError, Worker

__all__ = ["JsonFormatter", "Logging"]

_FIELDS = ("worker_id", "pid", "event", "code", "signal", "reason", "address")


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time, level, logger, message and pycluster's fields."""

    def format(self, record: logging.LogRecord) -> str:
        """Return *record* as one line of JSON."""
        entry: dict[str, Any] = {
            "time": round(record.created, 6),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key in _FIELDS:
            value = record.__dict__.get(key)
            if value is not None:
                entry[key] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


class Logging:
    """Log the cluster's lifecycle through stdlib :mod:`logging` (logger ``pycluster``).

    Each record carries ``worker_id``, ``pid`` and ``event`` (and ``code``, ``signal``,
    ``reason``, ``address`` where they apply) as attributes, so any formatter can use them.
    Levels follow meaning: a worker killed by SIGKILL or another unexpected signal, or
    exiting non-zero, is an error; an exit asked for (disconnect, stop) is info.

    With ``silent=True`` on the master, each line a worker writes to stdout or stderr is
    written to the master's stdout or stderr as one whole line, prefixed with
    ``[worker N]`` (or as a JSON object with *format* ``"json"``), so lines of two workers
    never interleave.

    Args:
        format: ``"text"`` or ``"json"`` (JSON lines for log shippers).
        level: level for the ``pycluster`` logger.
        stream: where records go (default stderr). A handler is added only when the
            ``pycluster`` logger has none and either *format* is ``"json"`` or the root
            logger has no handler either; otherwise your logging configuration is used.
    """

    name = "logging"

    def __init__(self, *, format: str = "text", level: int | str = logging.INFO,  # noqa: A002
                 stream: TextIO | None = None) -> None:
        if format not in ("text", "json"):
            msg = f"logging format={format!r} must be 'text' or 'json'"
            raise SettingsError(msg)
        self.format = format
        self.level = level
        self.stream = stream
        self.logger = logging.getLogger("pycluster")
        self._handler: logging.Handler | None = None

    def install(self, master: Master) -> None:
        """Subscribe to every lifecycle event of *master*."""
        logger = self.logger
        try:
            logger.setLevel(self.level)
        except (TypeError, ValueError) as exc:
            msg = f"logging level={self.level!r} is not a logging level"
            raise SettingsError(msg) from exc
        if not logger.handlers and (self.format == "json" or not logging.getLogger().handlers):
            handler = logging.StreamHandler(self.stream or sys.stderr)
            handler.setFormatter(
                JsonFormatter() if self.format == "json"
                else logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
            )
            logger.addHandler(handler)
            logger.propagate = False
            self._handler = handler
        master.on("fork", lambda w: self._log(logging.INFO, w, "fork", "worker %d forked (pid %s)"))
        master.on("online", lambda w: self._log(
            logging.INFO, w, "online", "worker %d online (pid %s)"))
        master.on("listening", self._on_listening)
        master.on("disconnect", lambda w: self._log(
            logging.INFO if w.exited_after_disconnect else logging.WARNING, w, "disconnect",
            "worker %d disconnected (pid %s)"))
        master.on("exit", self._on_exit)
        master.on("error", self._on_error)
        master.on("output", self._on_output)
        master.on("respawn_give_up", lambda w, reason: self._log(
            logging.ERROR, w, "respawn_give_up", "worker %d (pid %s): respawn gave up: %s", reason,
            reason=reason))
        master.on("reloading", lambda: self.logger.info("rolling reload started",
                                                         extra={"event": "reloading"}))
        master.on("reloaded", lambda: self.logger.info("rolling reload finished",
                                                        extra={"event": "reloaded"}))
        master.on("reload_failed", lambda reason: self.logger.error(
            "rolling reload failed: %s", reason,
            extra={"event": "reload_failed", "reason": reason}))

    def uninstall(self, master: Master) -> None:
        """Remove the handler this plugin added, if any."""
        if self._handler is not None:
            self.logger.removeHandler(self._handler)
            self.logger.propagate = True
            self._handler = None

    def _log(self, level: int, worker: Worker, event: str, text: str, *args: Any,
             reason: str | None = None) -> None:
        self.logger.log(level, text, worker.id, worker.pid, *args,
                        extra={"worker_id": worker.id, "pid": worker.pid, "event": event,
                               "reason": reason})

    def _on_listening(self, worker: Worker, address: Any) -> None:
        where = address.host if address.port is None else f"{address.host}:{address.port}"
        self.logger.info("worker %d (pid %s) listening on %s", worker.id, worker.pid, where,
                         extra={"worker_id": worker.id, "pid": worker.pid,
                                "event": "listening", "address": where})

    def _on_exit(self, worker: Worker, code: int | None, signal: str | None) -> None:
        expected = bool(worker.exited_after_disconnect)
        if signal == "SIGKILL":
            level = logging.INFO if expected else logging.ERROR
            how = "was killed by SIGKILL" + ("" if expected else " (perhaps out of memory?)")
        elif signal is not None:
            level = logging.INFO if expected or signal in ("SIGTERM", "SIGINT") else logging.ERROR
            how = f"was killed by {signal}"
        else:
            level = logging.INFO if code == 0 else logging.ERROR
            how = f"exited with code {code}"
        if expected:
            reason = "after disconnect"
        elif code == 0:
            reason = "by itself"
        else:
            reason = "unexpectedly"
        self.logger.log(level, "worker %d (pid %s) %s %s", worker.id, worker.pid, how, reason,
                        extra={"worker_id": worker.id, "pid": worker.pid, "event": "exit",
                               "code": code, "signal": signal, "reason": reason})

    def _on_error(self, error: BaseException) -> None:
        self.logger.error("%s", error, exc_info=error if error.__cause__ else None,
                          extra={"event": "error", "worker_id": getattr(error, "worker_id", None)})

    def _on_output(self, worker: Worker, stream: str, line: str) -> None:
        out = sys.stdout if stream == "stdout" else sys.stderr
        if self.format == "json":
            text = json.dumps({"time": round(time.time(), 6), "worker_id": worker.id,
                               "pid": worker.pid, "stream": stream, "line": line})
        else:
            text = f"[worker {worker.id}] {line}"
        out.write(text + "\n")
        out.flush()
