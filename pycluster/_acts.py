"""Control acts, shared by both ends of the channel: requests, replies and their checks.

A control frame is a JSON object whose ``act`` names what to do. An act with a ``seq``
is a request: the other side answers with ``{"act": "reply", "seq": …, "ok": …}``. Each
side dispatches acts through one table (``name → handler``) and keeps one table of its
own requests waiting for a reply (:class:`Pending`). An act that nothing handles is
logged and, if it was a request, answered with an error, so either side can grow new
acts (plugins add theirs through ``plugin`` acts) without breaking the other.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from typing import Any

from ._errors import PyclusterError, SettingsError
from ._protocol import encode_control

__all__ = [
    "ActError",
    "Pending",
    "Reply",
    "check_listen",
    "encode_reply",
    "unknown_act",
]

#: What a request's callback gets: the reply's fields (``None`` if the channel closed
#: first) and the fds that came with it.
OnReply = Callable[[dict[str, Any] | None, list[int]], None]


class ActError(PyclusterError):
    """Raised by an act handler: the request is answered with ``ok: false`` and this
    message (and *errno*, for errors that are an ``OSError`` on the asking side)."""

    def __init__(self, message: str, errno: int = 0) -> None:
        super().__init__(message)
        self.errno = errno


class Reply:
    """What a request handler answers: reply fields, and fds passed along with them.

    (A plain class: workers import this module, and need not pay for attrs.)
    """

    __slots__ = ("fds", "fields")

    def __init__(self, fields: dict[str, Any] | None = None, fds: list[int] | None = None) -> None:
        self.fields = fields or {}
        self.fds = fds or []


def encode_reply(seq: int, result: Any) -> tuple[bytes, list[int]]:
    """The frame answering request *seq* with *result*: a :class:`Reply`, a dict of
    fields, an :class:`ActError`, or any other exception (answered as an error)."""
    if isinstance(result, Reply):
        return encode_control("reply", seq=seq, ok=True, **result.fields), result.fds
    if isinstance(result, BaseException):
        errno = result.errno if isinstance(result, ActError) else 0
        text = str(result) if isinstance(result, ActError) else f"{type(result).__name__}: {result}"
        return encode_control("reply", seq=seq, ok=False, errno=errno, error=text), []
    return encode_control("reply", seq=seq, ok=True, **(result or {})), []


def unknown_act(ctl: dict[str, Any], where: str) -> ActError:
    """The error for an act nothing on this side handles (to log and to answer)."""
    return ActError(f"{where} has no handler for the control act {ctl['act']!r}")


class Pending:
    """This side's requests that wait for a reply, by sequence number. Thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._seq = 0
        self._waiting: dict[int, OnReply] = {}
        self._closed = False

    def add(self, on_reply: OnReply) -> int:
        """Register *on_reply* for a new request; return its sequence number.

        If the channel is already closed, *on_reply* is called at once with ``None``.
        """
        with self._lock:
            self._seq += 1
            seq = self._seq
            closed = self._closed
            if not closed:
                self._waiting[seq] = on_reply
        if closed:
            on_reply(None, [])
        return seq

    def drop(self, seq: int) -> None:
        """Forget request *seq* (it timed out); a late reply is then ignored."""
        with self._lock:
            self._waiting.pop(seq, None)

    def resolve(self, ctl: dict[str, Any], fds: list[int]) -> None:
        """Hand reply *ctl* to its request; close the fds of a reply nobody waits for."""
        seq = ctl.get("seq")
        with self._lock:
            on_reply = self._waiting.pop(seq, None) if isinstance(seq, int) else None
        if on_reply is None:
            for fd in fds:
                os.close(fd)
            return
        on_reply(ctl, fds)

    def close(self) -> None:
        """The channel closed: every waiting request gets ``None`` now, later ones at once."""
        with self._lock:
            self._closed = True
            waiting, self._waiting = self._waiting, {}
        for on_reply in waiting.values():
            on_reply(None, [])


def check_listen(host: Any, port: Any, path: Any, backlog: Any) -> None:
    """Check the fields of a ``listen`` request, as the worker builds it and as the master
    receives it: a TCP ``host``/``port`` or a unix ``path``, and a ``backlog``.

    Raises:
        SettingsError: a field is missing or of the wrong shape; the message names it.
    """
    if (port is None) == (path is None):
        msg = f"listen needs a port or a unix socket path, not both (port={port!r}, path={path!r})"
        raise SettingsError(msg)
    if path is not None:
        if not isinstance(path, str) or not path.startswith("/") or "\0" in path:
            msg = f"unix socket path {path!r} must be an absolute path with no NUL character"
            raise SettingsError(msg)
    else:
        if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
            msg = f"port={port!r} must be an int from 0 to 65535, or a unix socket path"
            raise SettingsError(msg)
        if not isinstance(host, str) or not host or "\0" in host:
            msg = f"host={host!r} must be a non-empty string such as '127.0.0.1' (no NUL)"
            raise SettingsError(msg)
    if isinstance(backlog, bool) or not isinstance(backlog, int) or not 1 <= backlog < 2**31:
        msg = f"backlog={backlog!r} must be an int from 1 to 2**31 - 1"
        raise SettingsError(msg)
