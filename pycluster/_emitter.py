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

    Built on pyee's extension points only (``_emit_run``, ``_emit_handle_potential_error``,
    ``listeners()``), as pyee's own asyncio emitter is.
    """

    _reporting = False  # an ``error`` handler is running: its failure is logged, not re-emitted

    def _emit_run(
        self, f: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> None:
        try:
            f(*args, **kwargs)
        except Exception as exc:
            self._handler_failed(f, exc)

    def _handler_failed(self, f: Callable[..., Any], exc: Exception) -> None:
        if self._reporting or not self.listeners("error"):
            logger().error("event handler %r failed", f, exc_info=exc)
            return
        self._reporting = True
        try:
            self.emit("error", exc)
        finally:
            self._reporting = False

    def has_listeners(self, event: str) -> bool:
        """Whether anything listens to *event* (a plugin may handle it)."""
        return bool(self.listeners(event))

    def remove_listener(self, event: str, f: Callable[..., Any]) -> None:
        """Remove listener *f* of *event*; no error if it is not there (as in pyee 15+)."""
        try:
            super().remove_listener(event, f)
        except KeyError:
            pass

    def _emit_handle_potential_error(self, event: str, error: Any) -> None:
        if event == "error":
            logger().error("%s: unhandled error event: %s", self, error, exc_info=error)
