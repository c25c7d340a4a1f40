"""``Worker``: the master's handle on one worker process."""

from __future__ import annotations

import signal as _signal
from typing import TYPE_CHECKING, Any

from ._emitter import Emitter
from ._errors import ChannelClosedError, SettingsError
from ._protocol import encode_control, encode_message
from ._state import WorkerState

if TYPE_CHECKING:
    import subprocess

    from ._master import Master
    from ._supervise import Supervision

__all__ = ["Worker", "signal_number"]


def signal_number(sig: int | str) -> _signal.Signals:
    """Return the signal named or numbered *sig*.

    Raises:
        SettingsError: no such signal.
    """
    try:
        if isinstance(sig, str):
            name = sig.upper()
            return _signal.Signals[name if name.startswith("SIG") else "SIG" + name]
        return _signal.Signals(sig)
    except (KeyError, ValueError):
        msg = f"unknown signal {sig!r}; use a name like 'SIGTERM' or a signal.Signals member"
        raise SettingsError(msg) from None


class Worker(Emitter):
    """One worker process, as the master sees it.

    Events, each emitted on the worker before the master's event of the same name:
    ``fork()``, ``online()``, ``listening(address)``, ``ready()``, ``message(message)``,
    ``disconnect()``, ``exit(code, signal)``, ``error(exc)``, and with ``silent=True``
    ``output(stream, line)``.

    Attributes:
        id: 1, 2, 3 … in fork order, never reused.
        process: the :class:`subprocess.Popen` of the worker.
        state: a :class:`WorkerState`.
        exited_after_disconnect: ``None`` until it disconnects or exits; then ``True``
            if ``disconnect()`` was called on either side or the worker called ``kill()``
            on itself, ``False`` if it crashed, exited by itself or the master killed it.
        slot: the position this worker fills (0 … n-1); a replacement takes the slot of
            the worker it replaces.
        env: the variables given to ``fork(env=...)`` for it (a replacement reuses them).
        started_at: ``time.monotonic()`` when it was forked.
        exit_code, signal_code: as in the ``exit`` event, once it is dead.
    """

    def __init__(self, id: int = 0, *, slot: int = 0) -> None:  # noqa: A002 - Node's name
        super().__init__()
        self.id = id
        self.slot = slot
        self.process: subprocess.Popen[bytes] | None = None
        self.state = WorkerState.NONE
        self.exited_after_disconnect: bool | None = None
        self.exit_code: int | None = None
        self.signal_code: str | None = None
        self.env: dict[str, str] = {}
        self.started_at: float | None = None
        self._master: Master | None = None
        self._sup: Supervision | None = None  # the master's hold on the process

    def __repr__(self) -> str:
        return f"<Worker id={self.id} pid={self.pid} state={self.state.value}>"

    @property
    def pid(self) -> int | None:
        """The worker's process id."""
        return self.process.pid if self.process is not None else None

    def send(self, message: Any) -> bool:
        """Send *message* to the worker, where it becomes a ``message`` event.

        Messages arrive in the order they were sent. Returns ``True`` (as Node does).

        Raises:
            MessageError: *message* does not serialize, or is over ``max_message_size``;
                nothing was sent and the channel still works.
            ChannelClosedError: the worker is disconnected or dead.
        """
        settings = self._require_master().settings
        self._write_control(
            encode_message(message, settings.serialization, settings.max_message_size)
        )
        return True

    def _write_control(self, frame: bytes, fds: list[int] | None = None) -> None:
        """Write *frame* to the worker's channel.

        Raises:
            ChannelClosedError: the worker is disconnected or dead.
        """
        sup = self._sup
        if sup is None or sup.channel.closed:
            msg = f"cannot send to worker {self.id}: it is {self._where()}"
            raise ChannelClosedError(msg)
        sup.channel.write(frame, fds)

    def kill(self, signal: int | str = "SIGTERM") -> None:
        """Send *signal* to the worker process; no graceful disconnect first.

        ``exited_after_disconnect`` stays ``False`` (unless ``disconnect()`` was called).

        Raises:
            SettingsError: *signal* is not a signal.
        """
        sig = signal_number(signal)
        if self.process is not None and not self.is_dead():
            self.process.send_signal(sig)

    def disconnect(self) -> Worker:
        """Ask the worker to stop: it stops accepting, finishes its work and exits 0.

        Sets ``exited_after_disconnect``. The worker gets ``kill_timeout`` seconds, then
        SIGKILL. ``disconnect`` and ``exit`` follow on both emitters. Calling it again, or
        on a worker that is already gone, does nothing. Returns the worker.
        """
        master = self._require_master()
        if self.is_dead() or self.state is WorkerState.DISCONNECTED:
            return self
        if self.exited_after_disconnect:
            return self
        self.exited_after_disconnect = True
        if self.is_connected():
            self._write_control(encode_control("disconnect"))
        master._arm_deadline(self)
        return self

    def is_dead(self) -> bool:
        """Whether the process has exited (true in ``exit`` handlers)."""
        return self.state is WorkerState.DEAD

    def is_connected(self) -> bool:
        """Whether the IPC channel is open (false in ``disconnect`` handlers)."""
        sup = self._sup
        return sup is not None and not sup.channel.closed

    def is_active(self) -> bool:
        """Whether the worker is alive, connected and not leaving: it counts toward the
        cluster's size (false once ``disconnect()`` was called on either side)."""
        return self.is_connected() and not self.exited_after_disconnect

    def _require_master(self) -> Master:
        if self._master is None:
            msg = f"worker {self.id} was not made by Master.fork(); it has no process"
            raise ChannelClosedError(msg)
        return self._master

    def _where(self) -> str:
        if self.is_dead():
            return "dead"
        if self.exited_after_disconnect:
            return "disconnecting"
        return "disconnected"
