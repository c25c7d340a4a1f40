"""The EventEmitter base of Master and Worker: a failing handler becomes an ``error`` event."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from pyee.base import EventEmitter

if TYPE_CHECKING:
    import logging

__all__ = ["Emitter", "logger"]


def logger() -> logging.Logger:
    """The ``pycluster`` logger (imported on first use: a worker may never need it)."""
    import logging

    return logging.getLogger("pycluster")


class Emitter(EventEmitter):
    """A pyee ``EventEmitter`` whose handlers cannot take the emitting process down.

    An exception raised by a handler is emitted as ``error`` on the same emitter, after
    which the remaining handlers of the original event still run. An ``error`` with no
    listener, or a failing ``error`` handler, is logged on the ``pycluster`` logger.
    """

    def emit(self, event: str, *args: Any, **kwargs: Any) -> bool:
        """Call every listener of *event* in order; return whether there was one.

        Same contract as pyee's, on a shorter path: the cluster emits twice per message.
        """
        with self._lock:
            handlers = self._events.get(event)
            funcs = list(handlers.values()) if handlers else None
        if not funcs:
            if event == "error":
                self._emit_handle_potential_error(event, args[0] if args else None)
            return False
        for f in funcs:
            try:
                f(*args, **kwargs)
            except Exception as exc:
                self._handler_failed(f, exc)
        return True

    def _handler_failed(self, f: Callable[..., Any], exc: Exception) -> None:
        # An error handler that fails is logged, never re-emitted: no loop of errors.
        if self._events.get("error") and not self.__dict__.get("_reporting"):
            self.__dict__["_reporting"] = True
            try:
                self.emit("error", exc)
            finally:
                self.__dict__["_reporting"] = False
        else:
            logger().error("event handler %r failed", f, exc_info=exc)

    def remove_listener(self, event: str, f: Callable[..., Any]) -> None:
        """Remove listener *f* of *event*; no error if it is not there (as in pyee 15+)."""
        try:
            super().remove_listener(event, f)
        except KeyError:
            pass

    def _emit_handle_potential_error(self, event: str, error: Any) -> None:
        if event == "error":
            logger().error("%s: unhandled error event: %s", self, error, exc_info=error)
