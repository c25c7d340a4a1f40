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
        root: configure the root logger instead (what ``pycluster run`` does): its
            handlers are replaced by one in *format* at *level*, so the records of every
            logger of the master — third-party plugins' too — come out the same way.

    Each event is logged once: the lifecycle here; what a plugin emits (``reloading``,
    ``reloaded``, ``reload_failed``, ``respawn_give_up``) by that plugin's own logger,
    a child of ``pycluster`` whose records carry the same fields.
    """

    name = "logging"

    def __init__(self, *, format: str = "text", level: int | str = logging.INFO,  # noqa: A002
                 stream: TextIO | None = None, root: bool = False) -> None:
        if format not in ("text", "json"):
            msg = f"logging format={format!r} must be 'text' or 'json'"
            raise SettingsError(msg)
        self.format = format
        self.level = level
        self.stream = stream
        if not isinstance(root, bool):
            msg = f"logging root={root!r} must be True or False"
            raise SettingsError(msg)
        self.root = root
        self._saved_root: tuple[int, list[logging.Handler]] | None = None
        self.logger = logging.getLogger("pycluster")
        self._handler: logging.Handler | None = None
        self._hung: set[int] = set()  # ids of workers the watchdog is killing

    def install(self, master: Master) -> None:
        """Subscribe to every lifecycle event of *master*."""
        logger = self.logger
        try:
            logger.setLevel(self.level)
        except (TypeError, ValueError) as exc:
            msg = f"logging level={self.level!r} is not a logging level"
            raise SettingsError(msg) from exc
        if self.root:
            self._configure_root()
        elif not logger.handlers and (
            self.format == "json" or not logging.getLogger().handlers
        ):
            handler = self._make_handler()
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
        master.on("watchdog_kill", lambda w, stacks: self._hung.add(w.id))
        master.on("error", self._on_error)
        master.on("output", self._on_output)

    def _make_handler(self) -> logging.Handler:
        handler = logging.StreamHandler(self.stream or sys.stderr)
        handler.setFormatter(
            JsonFormatter() if self.format == "json"
            else logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
        )
        return handler

    def _configure_root(self) -> None:
        """Own the root logger: one handler in this format for every logger's records."""
        root = logging.getLogger()
        self._saved_root = (root.level, list(root.handlers))
        for old in list(root.handlers):
            root.removeHandler(old)
        handler = self._make_handler()
        root.addHandler(handler)
        root.setLevel(self.logger.level)
        self.logger.propagate = True
        self._handler = handler

    def uninstall(self, master: Master) -> None:
        """Remove the handler this plugin added, if any (with *root*, the root logger's
        handlers and level are restored)."""
        if self._handler is None:
            return
        if self._saved_root is not None:
            root = logging.getLogger()
            root.removeHandler(self._handler)
            level, handlers = self._saved_root
            root.setLevel(level)
            for handler in handlers:
                root.addHandler(handler)
            self._saved_root = None
        else:
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
        hung = worker.id in self._hung
        self._hung.discard(worker.id)
        if hung and signal is not None:  # the watchdog logged why, with the stacks
            level = logging.ERROR
            how = f"was killed by {signal} (hung: the watchdog's kill)"
        elif signal == "SIGKILL":
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
            entry = _json_object(line)
            if entry is None:  # a plain line: wrapped
                entry = {"time": round(time.time(), 6), "line": line}
            # a worker's own JSON line stays as it is, with where it came from added
            entry.setdefault("worker_id", worker.id)
            entry.setdefault("pid", worker.pid)
            entry.setdefault("stream", stream)
            text = json.dumps(entry, default=str)
        else:
            text = f"[worker {worker.id}] {line}"
        out.write(text + "\n")
        out.flush()


def _json_object(line: str) -> dict[str, Any] | None:
    """*line* as a JSON object, if it is one (a worker that logs JSON itself)."""
    if not (line.startswith("{") and line.rstrip().endswith("}")):
        return None
    try:
        value = json.loads(line)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None
