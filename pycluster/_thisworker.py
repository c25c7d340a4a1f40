"""``pycluster.worker``: this worker process, seen from inside.

Nothing here imports asyncio, so a synchronous worker does not pay for it.
"""

from __future__ import annotations

import collections
import os
import threading
from typing import Any

from ._acts import ActError, Pending, encode_reply, unknown_act
from ._emitter import logger
from ._errors import ChannelClosedError, ProtocolError, RequestError, StateError
from ._listen import SharedSocket, listen_request
from ._pluginchannel import WorkerChannel, check_name
from ._protocol import CONTROL, decode_control, decode_message, encode_control, encode_message
from ._reader import Dispatcher, exit_code, exit_now, read_frames
from ._state import WorkerState
from ._vitals import Vitals
from ._worker import Worker

__all__ = ["LISTEN_TIMEOUT", "ThisWorker"]

#: Seconds ``listen()`` waits for the master's answer.
LISTEN_TIMEOUT = 30.0


class ThisWorker(Vitals, Worker):
    """``pycluster.worker``: this worker process, seen from inside.

    Events: ``message(message)`` for each message the master sends, ``disconnect()`` when
    the cluster asks this worker to stop (close your servers, finish the requests in
    flight, then return from your main function), ``error(exc)``. Handlers run on the
    ``pycluster-ipc`` thread, or on the loop given to :meth:`attach_loop`. And
    ``max_requests(count)``, once, on the thread that called :meth:`count_request` when
    :attr:`requests` reaches :attr:`max_requests`.

    Attributes:
        requests: requests served, as counted by :meth:`count_request`.
    """

    def __init__(
        self,
        id: int,  # noqa: A002 - Node's name
        sock: Any,
        serialization: str,
        limit: int,
        master_pid: int,
    ) -> None:
        super().__init__(id)
        #: The master's ``bind`` addresses, each as ``listen()`` arguments:
        #: ``(port, host)`` or ``(path,)``. ``listen(*address)`` listens on one.
        self.bind: list[tuple[Any, ...]] = []
        self.state = self.state.to(WorkerState.ONLINE)  # it said so as it connected
        self._master_pid = master_pid
        self._sock = sock
        self._serialization = serialization
        self._limit = limit
        self._send_lock = threading.Lock()
        self._state_lock = threading.Lock()
        self._pending = Pending()
        self._setups: list[str] = []  # worker_setup hooks, run once pycluster.worker is set
        self._channels: dict[str, WorkerChannel] = {}
        self._inbox = Dispatcher(self)
        self._acts = {"reply": self._on_reply, "disconnect": self._on_disconnect,
                      "plugin": self._on_plugin, "stacks": self._on_stacks}
        self._init_vitals()
        self._reader = threading.Thread(target=self._read_loop, name="pycluster-ipc", daemon=True)

    def __repr__(self) -> str:
        return f"<Worker id={self.id} pid={self.pid} state={self.state.value} (this process)>"

    @property
    def pid(self) -> int:
        """This process's id."""
        return os.getpid()

    def is_connected(self) -> bool:
        """Whether this worker can still talk to the master (false once disconnecting)."""
        return self.state in (WorkerState.ONLINE, WorkerState.LISTENING)

    def is_dead(self) -> bool:
        """Always false: this process is running."""
        return False

    def _move(self, new: WorkerState) -> None:
        with self._state_lock:
            self.state = self.state.to(new)

    # -- sending ---------------------------------------------------------------------

    def send(self, message: Any) -> bool:
        """Send *message* to the master, where it becomes a ``message`` event.

        Safe from any thread; messages from one thread arrive in order. Returns ``True``.

        Raises:
            MessageError: *message* does not serialize or is over the size limit; nothing
                was sent and the channel still works.
            ChannelClosedError: this worker is disconnecting, or the master is gone.
        """
        if not self.is_connected():
            msg = f"cannot send: worker {self.id} is {self.state.value}"
            raise ChannelClosedError(msg)
        self._write(encode_message(message, self._serialization, self._limit))
        return True

    def _write(self, frame: bytes) -> None:
        try:
            with self._send_lock:
                self._sock.sendall(frame)
        except OSError as exc:
            msg = "cannot send: the channel to the master is closed"
            raise ChannelClosedError(msg) from exc

    def _request(
        self, act: str, fields: dict[str, Any], what: str, timeout: float
    ) -> tuple[dict[str, Any] | None, list[int]]:
        """Send request *act* and wait for the reply: ``(fields, fds)``, or ``(None, [])``
        if the channel closed first.

        Raises:
            RequestError: no reply within *timeout* seconds (``timed_out``).
            StateError: called on the ``pycluster-ipc`` thread (it would wait on itself).
        """
        if threading.current_thread() is self._reader:
            msg = (
                f"{what} cannot run on the pycluster-ipc thread (inside an event handler): "
                "call it from your main code, or attach_loop() first"
            )
            raise StateError(msg)
        event = threading.Event()
        answer: list[Any] = [None, []]

        def on_reply(ctl: dict[str, Any] | None, fds: list[int]) -> None:
            answer[:] = [ctl, fds]
            event.set()

        seq = self._pending.add(on_reply)
        try:
            self._write(encode_control(act, seq=seq, **fields))
        except ChannelClosedError:
            self._pending.drop(seq)
            return None, []
        if not event.wait(timeout):
            self._pending.drop(seq)
            msg = f"the master did not answer {what} in {timeout:g} s"
            raise RequestError(msg, timed_out=True)
        return answer[0], answer[1]

    # -- listening -------------------------------------------------------------------

    def listen(
        self,
        port: int | str | os.PathLike[str] | None = None,
        host: str = "0.0.0.0",
        *,
        backlog: int = 2048,
    ) -> SharedSocket:
        """Return a listening socket for *host*:*port*, shared through the master.

        The master binds the address once and every worker that asks for it gets the same
        socket (``scheduling="shared"``) or its slot's own ``SO_REUSEPORT`` socket
        (``"reuseport"``). Port 0 gives every worker the same real port. A ``str`` or path
        *port* is a unix socket path (relative to this worker's cwd). With no *port*, the
        first address of the master's ``bind`` setting (the CLI's ``--bind``) is used; see
        :attr:`bind` for all of them. Fires ``listening(worker, address)`` in the master.

        Raises:
            SettingsError: bad *port*, *host* or *backlog*.
            OSError: the master could not bind (``EADDRINUSE``, ``EACCES``, ...): the errno
                is the master's, the message names the address.
            StateError: this worker is disconnecting, the master did not answer in time,
                or ``listen()`` was called on the ``pycluster-ipc`` thread (from a handler:
                it would wait on itself).
        """
        fields, where = listen_request(port, host, backlog, self.bind)
        if not self.is_connected():
            msg = f"cannot listen on {where}: worker {self.id} is {self.state.value}"
            raise StateError(msg)
        try:
            reply, fds = self._request("listen", fields, f"listen() for {where}", LISTEN_TIMEOUT)
        except RequestError as exc:
            raise StateError(str(exc)) from None
        if reply is None:
            msg = f"cannot listen on {where}: the channel to the master closed"
            raise ChannelClosedError(msg)
        if not reply.get("ok"):
            err = reply.get("errno") or 0
            text = f"{reply.get('error')} (listening on {where})"
            if not err:
                raise StateError(text)
            raise OSError(err, text)
        if not fds:
            msg = f"the master's answer for {where} carried no socket"
            raise ProtocolError(msg)
        sock = SharedSocket(fileno=fds[0])
        sock.setblocking(False)  # it already is (the master set it); say so to Python
        for extra in fds[1:]:
            os.close(extra)
        self._write(encode_control("listening", of=reply["seq"]))
        with self._state_lock:
            if self.state is WorkerState.ONLINE:
                self.state = self.state.to(WorkerState.LISTENING)
        return sock

    def ready(self) -> None:
        """Tell the master this worker is ready to serve (a ``ready`` event there).

        For apps that need to warm up after ``listen()``: a rolling reload can wait for
        this instead of ``listening``.

        Raises:
            ChannelClosedError: this worker is disconnecting, or the master is gone.
        """
        if not self.is_connected():
            msg = f"cannot report ready: worker {self.id} is {self.state.value}"
            raise ChannelClosedError(msg)
        self._write(encode_control("ready"))

    def channel(self, name: str) -> WorkerChannel:
        """This worker's end of plugin channel *name* (the same object on every call).

        Raises:
            SettingsError: *name* is not a non-empty str.
        """
        check_name(name)
        with self._state_lock:
            found = self._channels.get(name)
            if found is None:
                found = self._channels[name] = WorkerChannel(self, name)
        return found

    # -- stopping --------------------------------------------------------------------

    def disconnect(self) -> ThisWorker:
        """Leave the cluster: the master marks this worker ``exited_after_disconnect``,
        ``disconnect`` handlers run (close your servers and let requests finish), and the
        process is expected to exit 0. Without a ``disconnect`` handler it exits at once.

        Returns this worker. Repeated calls do nothing.
        """
        with self._state_lock:
            if not self.is_connected():
                return self
            self.state = self.state.to(WorkerState.DISCONNECTING)
        self.exited_after_disconnect = True
        try:
            self._write(encode_control("disconnecting"))
        except ChannelClosedError:
            pass
        if not self.has_listeners("disconnect"):
            exit_now(0)
        self._inbox.emit("disconnect")
        return self

    def kill(self, signal: int | str = "SIGTERM") -> None:  # noqa: ARG002 - Node's signature
        """Leave the cluster now: tell the master, then exit 0 (``exited_after_disconnect``)."""
        try:
            self._write(encode_control("disconnecting"))
        except ChannelClosedError:
            pass
        exit_now(0)

    def attach_loop(self, loop: Any = None) -> None:
        """Run this worker's event handlers on an asyncio *loop* (default: the running one).

        Call it from inside the loop, before serving, in an asyncio app.
        """
        if loop is None:
            import asyncio

            loop = asyncio.get_running_loop()
        self._inbox.loop = loop
        self._start_beating()

    # -- reading ---------------------------------------------------------------------

    def _add_event_handler(self, event: str, k: Any, v: Any) -> None:
        super()._add_event_handler(event, k, v)
        if event == "message":
            self._inbox.message_listener_added()

    def _read_loop(self) -> None:
        try:
            read_frames(self._sock, self._limit, self._master_pid, self._on_frame)
        except ProtocolError as exc:
            self._inbox.emit("error", exc)
        except SystemExit as exc:  # sys.exit() in a handler on this thread ends the process
            exit_now(exit_code(exc))
        finally:
            self._master_lost()

    def _on_frame(self, kind: int, payload: bytes, fds: collections.deque[int]) -> None:
        try:
            if kind != CONTROL:
                self._inbox.deliver(decode_message(kind, payload, self._serialization))
                return
            ctl = decode_control(payload)
            handler = self._acts.get(ctl["act"])
            if handler is None:
                self._refuse(ctl, unknown_act(ctl, f"worker {self.id}"))
            else:
                handler(ctl, fds)
        except ProtocolError as exc:
            self._inbox.emit("error", exc)

    def _answer(self, seq: Any, result: Any) -> None:
        if not isinstance(seq, int):
            return
        frame, _ = encode_reply(seq, result)
        try:
            self._write(frame)
        except ChannelClosedError:
            pass

    def _refuse(self, ctl: dict[str, Any], error: ActError) -> None:
        logger().warning("%s", error)
        self._answer(ctl.get("seq"), error)

    def _on_reply(self, ctl: dict[str, Any], fds: collections.deque[int]) -> None:
        got = [fds.popleft()] if ctl.get("ok") and fds else []
        self._pending.resolve(ctl, got)

    def _on_disconnect(self, ctl: dict[str, Any], fds: collections.deque[int]) -> None:
        self.disconnect()

    def _on_stacks(self, ctl: dict[str, Any], fds: collections.deque[int]) -> None:
        """Answer the master's stack request here, on the IPC thread: it must work while
        the app's thread or loop is stuck (what the watchdog asks before a kill)."""
        try:
            from ._stacks import format_stacks  # on first use: traceback is not free

            stacks = format_stacks()
        except Exception as exc:  # never let a formatting problem end the IPC thread
            stacks = f"(the stacks could not be formatted: {exc!r})"
        room = self._limit // 8  # JSON escapes grow it; over the limit ends the channel
        if len(stacks) > room:
            stacks = stacks[:room] + "\n(cut: the stacks were longer than the message limit)\n"
        self._answer(ctl.get("seq"), {"stacks": stacks})

    def _on_plugin(self, ctl: dict[str, Any], fds: collections.deque[int]) -> None:
        name, data, seq = ctl.get("ns"), ctl.get("data"), ctl.get("seq")
        channel = self._channels.get(name) if isinstance(name, str) else None
        if seq is None:
            if channel is not None:
                self._inbox.call(lambda: channel.emit("message", data))
            return
        if channel is None:
            error = ActError(f"worker {self.id} has no plugin channel {name!r}")
            self._refuse(ctl, error)
            return
        self._inbox.call(lambda: channel._on_request(data, lambda r: self._answer(seq, r)))

    def _master_lost(self) -> None:
        with self._state_lock:
            was_connected = self.is_connected()
            if self.state is not WorkerState.DISCONNECTED:
                self.state = self.state.to(WorkerState.DISCONNECTED)
        self._pending.close()
        if was_connected and self.has_listeners("disconnect"):
            self._inbox.call_and_wait(lambda: self.emit("disconnect"), 1.0)
        exit_now(0)

