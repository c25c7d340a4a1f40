"""The exceptions pycluster raises: one base class, one subclass per kind of mistake."""

from __future__ import annotations

__all__ = [
    "BOOT_FAILURE",
    "ChannelClosedError",
    "MessageError",
    "ProtocolError",
    "PyclusterError",
    "RequestError",
    "SettingsError",
    "StateError",
]

#: Exit code of a worker that failed to start (gunicorn's and uvicorn's convention): the
#: respawn plugin gives up instead of forking it again.
BOOT_FAILURE = 3


class PyclusterError(Exception):
    """Base class of every error pycluster raises on purpose."""


class SettingsError(PyclusterError, ValueError):
    """A setting or argument has a value pycluster cannot use."""


class StateError(PyclusterError, RuntimeError):
    """An operation does not fit the current state (of a master or a worker)."""


class ChannelClosedError(PyclusterError, BrokenPipeError):
    """The IPC channel to the other side is closed: the worker is disconnected or dead."""


class MessageError(PyclusterError, ValueError):
    """A message cannot be sent: it does not serialize, or it is larger than allowed."""


class ProtocolError(PyclusterError):
    """A worker wrote something to its IPC channel that is not a valid frame.

    The master emits it as an ``error`` event on the worker and on the master, and ends
    that worker; the master and the other workers carry on.
    """

    def __init__(self, message: str, worker_id: int | None = None) -> None:
        super().__init__(message)
        #: Id of the worker that sent the bad frame (``None`` on the worker side).
        self.worker_id = worker_id


class RequestError(PyclusterError):
    """A request to the other side failed: it answered with an error, nothing there
    handles it, the channel closed, or no answer came before the deadline
    (:attr:`timed_out`)."""

    def __init__(self, message: str, *, timed_out: bool = False) -> None:
        super().__init__(message)
        #: Whether the deadline passed with no answer.
        self.timed_out = timed_out
