"""The master's end of the control path: one table of acts, and requests to workers."""

from __future__ import annotations

import asyncio
import errno
import inspect
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ._acts import ActError, Reply, check_listen, encode_reply, unknown_act
from ._emitter import logger
from ._errors import ChannelClosedError, ProtocolError, RequestError, SettingsError, StateError
from ._pluginchannel import reply_error
from ._protocol import CONTROL, decode_control, decode_message, encode_act
from ._state import WorkerState

if TYPE_CHECKING:
    from ._master import Master
    from ._sockets import Address
    from ._worker import Worker

__all__ = ["Control"]

log = logger()

#: An act handler: ``(worker, ctl)`` → reply fields, a :class:`Reply`, an awaitable of
#: one (for a request), or ``None``. It may raise :class:`ActError` to answer an error.
Handler = Callable[["Worker", dict[str, Any]], Any]


class Control:
    """Dispatches what workers write: user messages as ``message`` events, control acts
    through :attr:`acts`; sends the master's own requests and routes their replies."""

    def __init__(self, master: Master) -> None:
        self._master = master
        self._addresses: dict[tuple[int, int], Address] = {}  # (worker id, seq) → address
        self._unknown_channels: set[str] = set()
        self.acts: dict[str, Handler] = {
            "online": self._online,
            "listen": self._listen,
            "listening": self._listening,
            "ready": self._ready,
            "disconnecting": self._disconnecting,
            "reply": self._reply,
            "plugin": self._plugin,
        }

    # -- reading ---------------------------------------------------------------------

    def on_frames(self, worker: Worker, frames: list[tuple[int, bytes]]) -> None:
        """Handle the frames *worker* wrote, in order; a bad one ends its channel."""
        master = self._master
        serialization = master.settings.serialization
        sup = worker._sup
        assert sup is not None
        channel = sup.channel
        for kind, payload in frames:
            if channel.closed:
                return
            try:
                if kind == CONTROL:
                    self._on_control(worker, decode_control(payload))
                else:
                    message = decode_message(kind, payload, serialization)
                    worker.emit("message", message)
                    master.emit("message", worker, message)
            except ProtocolError as exc:
                channel.close(exc)
            except StateError as exc:
                channel.close(ProtocolError(f"out-of-order control message: {exc}"))
            except (TypeError, ValueError, OverflowError) as exc:  # a field of the wrong shape
                channel.close(ProtocolError(f"bad control message: {exc!r}"))

    def _on_control(self, worker: Worker, ctl: dict[str, Any]) -> None:
        seq = ctl.get("seq")
        handler = self.acts.get(ctl["act"])
        try:
            if handler is None:
                raise unknown_act(ctl, "the master")
            result = handler(worker, ctl)
        except ActError as exc:
            if handler is None:
                log.warning("worker %d (pid %s): %s", worker.id, worker.pid, exc)
            result = exc
        if not isinstance(seq, int) or ctl["act"] == "reply":
            return
        if inspect.isawaitable(result):
            task = asyncio.ensure_future(result)
            task.add_done_callback(lambda done: self._answer(worker, seq, _outcome(done)))
        else:
            self._answer(worker, seq, result)

    def _answer(self, worker: Worker, seq: int, result: Any) -> None:
        sup = worker._sup
        if sup is None or sup.channel.closed:
            return
        frame, fds = encode_reply(seq, result)
        sup.channel.write(frame, fds)

    # -- the acts --------------------------------------------------------------------

    def _online(self, worker: Worker, ctl: dict[str, Any]) -> None:
        worker.state = worker.state.to(WorkerState.ONLINE)
        worker.emit("online")
        self._master.emit("online", worker)

    def _listen(self, worker: Worker, ctl: dict[str, Any]) -> Reply:
        host, port, path, backlog = (ctl.get(k) for k in ("host", "port", "path", "backlog"))
        if not isinstance(ctl.get("seq"), int):
            msg = f"malformed listen request (no seq: nothing to answer): {ctl!r}"
            raise ProtocolError(msg)
        try:
            check_listen(host, port, path, backlog)
        except SettingsError as exc:
            msg = f"malformed listen request ({exc}): {ctl!r}"
            raise ProtocolError(msg) from None
        assert isinstance(backlog, int)
        master = self._master
        if master.stopping or worker.exited_after_disconnect:
            msg = "the worker is disconnecting"
            raise ActError(msg)
        try:
            sock, address = master._listeners.listen(
                worker.id, worker.slot, host, port, path, backlog
            )
        except (OSError, ValueError) as exc:  # ValueError: a path or name the OS refuses
            err = getattr(exc, "errno", None) or errno.EINVAL
            raise ActError(getattr(exc, "strerror", None) or str(exc), err) from None
        self._addresses[worker.id, ctl["seq"]] = address
        return Reply({"host": address.host, "port": address.port}, [sock.fileno()])

    def _listening(self, worker: Worker, ctl: dict[str, Any]) -> None:
        address = self._addresses.pop((worker.id, ctl.get("of", -1)), None)
        if address is None:
            msg = f"'listening' for a listen() that never happened: {ctl!r}"
            raise ProtocolError(msg)
        worker.state = worker.state.to(WorkerState.LISTENING)
        worker.emit("listening", address)
        self._master.emit("listening", worker, address)

    def _ready(self, worker: Worker, ctl: dict[str, Any]) -> None:
        worker.emit("ready")
        self._master.emit("ready", worker)

    def _disconnecting(self, worker: Worker, ctl: dict[str, Any]) -> None:
        worker.exited_after_disconnect = True
        self._master._arm_deadline(worker)

    def _reply(self, worker: Worker, ctl: dict[str, Any]) -> None:
        sup = worker._sup
        assert sup is not None
        sup.pending.resolve(ctl, [])

    def _plugin(self, worker: Worker, ctl: dict[str, Any]) -> Any:
        name = ctl.get("ns")
        channel = self._master._channels.get(name) if isinstance(name, str) else None
        if "seq" not in ctl:
            if channel is not None:
                channel._on_push(worker, ctl.get("data"))
            elif str(name) not in self._unknown_channels:  # once per name: pushes repeat
                self._unknown_channels.add(str(name))
                log.warning("worker %d pushed to plugin channel %r, which no plugin opened",
                            worker.id, name)
            return None
        if channel is None:
            msg = f"the master has no plugin channel {name!r} (is its plugin installed?)"
            raise ActError(msg)
        return channel._on_request(worker, ctl.get("data"))

    def forget(self, worker: Worker) -> None:
        """Drop what is kept for *worker* (it exited)."""
        for key in [k for k in self._addresses if k[0] == worker.id]:
            del self._addresses[key]

    # -- asking workers --------------------------------------------------------------

    def request(self, worker: Worker, name: str, data: Any, timeout: float) -> asyncio.Future[Any]:
        """Ask plugin channel *name* of *worker*; see :meth:`PluginChannel.request`."""
        master = self._master
        loop = master._loop
        if loop is None:
            msg = "request() needs a running master (call it from an event handler or a timer)"
            raise StateError(msg)
        frame_fields = {"ns": name, "data": data}
        encode_act("plugin", master.settings.max_message_size, **frame_fields)  # fail early
        sup = worker._sup
        if sup is None or sup.channel.closed:
            msg = f"cannot ask worker {worker.id}: it is {worker._where()}"
            raise ChannelClosedError(msg)
        future: asyncio.Future[Any] = loop.create_future()
        what = f"request to worker {worker.id} on plugin channel {name!r}"

        def on_reply(ctl: dict[str, Any] | None, fds: list[int]) -> None:
            if future.done():
                return
            error = reply_error(ctl, what)
            if error is not None:
                future.set_exception(error)
            else:
                assert ctl is not None
                future.set_result(ctl.get("data"))

        seq = sup.pending.add(on_reply)
        worker._write_control(encode_act("plugin", master.settings.max_message_size,
                                          seq=seq, **frame_fields))

        def expire() -> None:
            sup.pending.drop(seq)
            if not future.done():
                future.set_exception(
                    RequestError(f"{what}: no answer within {timeout:g} s", timed_out=True))

        timer = loop.call_later(timeout, expire)
        future.add_done_callback(lambda _: timer.cancel())
        return future


def _outcome(done: asyncio.Future[Any]) -> Any:
    if done.cancelled():
        return ActError("the handler was cancelled")
    exc = done.exception()
    return exc if exc is not None else done.result()
