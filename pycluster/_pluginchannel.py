"""Plugin channels: a plugin's own namespaced conversation with its workers.

``master.channel("metrics")`` in the master and ``pycluster.worker.channel("metrics")`` in
a worker are the two ends. Either end can push (``send``) and ask (``request``, answered
by the other end's ``handle``-registered function). Nothing on a plugin channel is a user
``message`` event, and user messages never reach a plugin channel. Data is JSON.

On the wire: ``{"act": "plugin", "ns": NAME, "data": …}``, with a ``seq`` for a request.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ._acts import ActError, Reply
from ._emitter import Emitter
from ._errors import ChannelClosedError, RequestError, SettingsError
from ._protocol import encode_act

if TYPE_CHECKING:
    import asyncio

    from ._host import PluginHost
    from ._thisworker import ThisWorker
    from ._worker import Worker

__all__ = ["PluginChannel", "WorkerChannel", "check_name", "reply_error"]


def check_name(name: Any) -> str:
    """Return *name* if it can name a plugin channel.

    Raises:
        SettingsError: not a non-empty str.
    """
    if not isinstance(name, str) or not name:
        msg = f"a plugin channel name must be a non-empty str such as 'metrics', not {name!r}"
        raise SettingsError(msg)
    return name


def reply_error(ctl: dict[str, Any] | None, what: str) -> RequestError | None:
    """The error a failed reply means (``None`` for a good one)."""
    if ctl is None:
        return RequestError(f"{what}: the channel closed before the answer came")
    if not ctl.get("ok"):
        return RequestError(f"{what} failed: {ctl.get('error')}")
    return None


class PluginChannel(Emitter):
    """The master's end of plugin channel *name* (get it with ``master.channel(name)``).

    Events: ``message(worker, data)`` for each ``send()`` from a worker's end.
    """

    def __init__(self, master: PluginHost, name: str) -> None:
        super().__init__()
        self.name = name
        self._master = master
        self._handler: Callable[[Worker, Any], Any] | None = None

    def __repr__(self) -> str:
        return f"<PluginChannel {self.name!r} (master)>"

    def handle(self, fn: Callable[[Worker, Any], Any]) -> Callable[[Worker, Any], Any]:
        """Answer workers' requests with ``fn(worker, data)``: its return value (or what
        the awaitable it returns gives) is the answer; what it raises is the error the
        worker's ``request()`` raises. One handler per channel; usable as a decorator."""
        self._handler = fn
        return fn

    def send(self, worker: Worker, data: Any) -> None:
        """Push *data* to *worker*'s end of this channel (a ``message`` event there).

        Raises:
            MessageError: *data* does not serialize as JSON, or is too large.
            ChannelClosedError: the worker is disconnected or dead.
        """
        frame = encode_act("plugin", self._limit(), ns=self.name, data=data)
        worker._write_control(frame)

    def request(self, worker: Worker, data: Any, timeout: float = 5.0) -> asyncio.Future[Any]:
        """Ask *worker*'s end of this channel; return a future of its answer.

        The future fails with :class:`pycluster.RequestError` when the worker answers
        with an error, has no handler, leaves, or does not answer within *timeout*
        seconds (``timed_out`` is then true). Call it while the master runs.

        Raises:
            MessageError: *data* does not serialize as JSON, or is too large.
            ChannelClosedError: the worker is disconnected or dead.
        """
        return self._master._request(worker, self.name, data, timeout)

    def _limit(self) -> int:
        return self._master._message_limit()

    def _on_push(self, worker: Worker, data: Any) -> None:
        self.emit("message", worker, data)

    def _on_request(self, worker: Worker, data: Any) -> Any:
        if self._handler is None:
            msg = f"the master's plugin channel {self.name!r} answers no requests"
            raise ActError(msg)
        result = self._handler(worker, data)
        if inspect.isawaitable(result):
            return _awaiting(result)
        return Reply({"data": result})


async def _awaiting(result: Any) -> Reply:
    return Reply({"data": await result})


class WorkerChannel(Emitter):
    """A worker's end of plugin channel *name* (``pycluster.worker.channel(name)``).

    Events: ``message(data)`` for each ``send()`` from the master's end; handlers run
    where the worker's other handlers run (the IPC thread, or the attached loop).
    """

    def __init__(self, worker: ThisWorker, name: str) -> None:
        super().__init__()
        self.name = name
        self._worker = worker
        self._handler: Callable[[Any], Any] | None = None

    def __repr__(self) -> str:
        return f"<PluginChannel {self.name!r} (worker {self._worker.id})>"

    def handle(self, fn: Callable[[Any], Any]) -> Callable[[Any], Any]:
        """Answer the master's requests with ``fn(data)``: its return value is the answer
        (on an attached loop it may be an awaitable); what it raises is the error the
        master's request fails with. One handler per channel; usable as a decorator."""
        self._handler = fn
        return fn

    def send(self, data: Any) -> None:
        """Push *data* to the master's end (a ``message(worker, data)`` event there).

        Raises:
            MessageError: *data* does not serialize as JSON, or is too large.
            ChannelClosedError: this worker is disconnecting, or the master is gone.
        """
        worker = self._worker
        if not worker.is_connected():
            msg = f"cannot send on {self.name!r}: worker {worker.id} is {worker.state.value}"
            raise ChannelClosedError(msg)
        worker._write(encode_act("plugin", worker._limit, ns=self.name, data=data))

    def request(self, data: Any, timeout: float = 5.0) -> Any:
        """Ask the master's end of this channel and wait for the answer (blocking).

        Raises:
            RequestError: the master answered with an error or has no such channel, the
                channel closed, or no answer came within *timeout* s (``timed_out``).
            MessageError: *data* does not serialize as JSON, or is too large.
            StateError: called on the ``pycluster-ipc`` thread (it would wait on itself).
        """
        worker = self._worker
        frame_fields = {"ns": self.name, "data": data}
        encode_act("plugin", worker._limit, **frame_fields)  # fail before asking
        what = f"request on plugin channel {self.name!r}"
        ctl, _ = worker._request("plugin", frame_fields, what, timeout)
        error = reply_error(ctl, what)
        if error is not None:
            raise error
        assert ctl is not None
        return ctl.get("data")

    def _on_request(self, data: Any, answer: Callable[[Any], None]) -> None:
        """Run the handler for a request of the master's; *answer* takes the result."""
        if self._handler is None:
            msg = f"worker {self._worker.id}'s plugin channel {self.name!r} answers no requests"
            answer(ActError(msg))
            return
        try:
            result = self._handler(data)
        except Exception as exc:
            answer(exc)
            return
        if inspect.isawaitable(result):
            import asyncio

            async def wait() -> None:
                try:
                    answer(Reply({"data": await result}))
                except Exception as exc:
                    answer(exc)

            asyncio.ensure_future(wait())
            return
        answer(Reply({"data": result}))
