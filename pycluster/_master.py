"""``Master``: forks workers, shares ports with them and publishes their lifecycle."""

from __future__ import annotations

import asyncio
import functools
import os
import signal
import threading
import time
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any

from ._channel import Channel
from ._control import Control
from ._emitter import logger
from ._errors import ProtocolError, SettingsError, StateError
from ._host import PluginHost
from ._output import OutputReader
from ._settings import Settings, check_env
from ._signals import Signals
from ._sockets import Listeners
from ._spawn import main_command, spawn
from ._state import WorkerState
from ._supervise import Supervision
from ._timers import check_delay
from ._worker import Worker

__all__ = ["Master"]

log = logger()


class Master(PluginHost):
    """The primary process of a cluster: an EventEmitter that forks and watches workers.

    Args:
        **settings: see :class:`pycluster.Settings` (``exec``, ``target``, ``args``,
            ``env``, ``cwd``, ``silent``, ``scheduling``, ``serialization``,
            ``kill_timeout``, ``uid``, ``gid``, ``max_message_size``, ``bind``, ``name``).

    Events (on a worker's handle first, then here with the worker first):
    ``fork(worker)``, ``online(worker)``, ``listening(worker, address)``,
    ``ready(worker)`` (the worker called ``pycluster.worker.ready()``),
    ``message(worker, message)``, ``disconnect(worker)``, ``exit(worker, code, signal)``,
    ``output(worker, stream, line)`` (``silent=True``), ``setup(settings)`` once when the
    master starts running, ``stop()`` when :meth:`stop` is first called, ``reload()``
    (see :meth:`reload`), ``signal(name)`` for SIGUSR1, SIGUSR2 and an unhandled SIGHUP,
    and ``error(exc)``. Order per worker: ``fork → online → listening* → disconnect → exit``.

    Raises:
        SettingsError: a setting is unknown or has a bad value.
    """

    def __init__(self, **settings: Any) -> None:
        super().__init__()
        self.settings = Settings.make(settings)
        self._command = main_command(self.settings)
        self._workers: dict[int, Worker] = {}
        self.workers: Mapping[int, Worker] = MappingProxyType(self._workers)
        self._next_id = 1
        self._listeners = Listeners(self.settings.scheduling)
        self._bind: list[tuple[int | str, ...]] | None = None  # bound before the first fork
        self._control = Control(self)
        self._signals = Signals(self)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._deferred: list[Callable[[], None]] = []
        self._stopping = False
        self._exit_code: int | None = None
        self._abnormal = False
        self._done: asyncio.Future[int] | None = None
        self._sigchld = False  # whether SIGCHLD reaps (where pidfd is missing)
        #: Why the cluster stopped, when :meth:`stop` was given a reason (a plugin gave up).
        self.stop_reason: str | None = None

    # -- forking -----------------------------------------------------------------------

    def fork(self, env: Mapping[str, str] | None = None, *, slot: int | None = None) -> Worker:
        """Start a worker process and return its handle.

        The first fork binds the ``bind`` addresses, so a port in use fails here, before
        any worker starts.

        Args:
            env: variables added to this worker's environment (over ``settings.env``).
            slot: the slot the worker fills; default: the lowest slot no connected worker
                holds. A replacement passes the slot of the worker it replaces.

        Emits ``fork(worker)`` once the master is running (so handlers added after
        ``fork()`` returns still see it).

        Raises:
            StateError: the master is stopping or stopped.
            SettingsError: *env* is not a mapping of strings, or *slot* is not an int >= 0.
            OSError: a ``bind`` address cannot be bound (the message names it).
        """
        if self._stopping:
            msg = "cannot fork: the master is stopping; fork() before stop() or in a new Master"
            raise StateError(msg)
        extra = check_env(env, "fork env")
        if slot is not None and (isinstance(slot, bool) or not isinstance(slot, int) or slot < 0):
            msg = f"slot={slot!r} must be an int >= 0 (the slot of the worker replaced)"
            raise SettingsError(msg)
        if slot is None:
            taken = {w.slot for w in self._workers.values() if w.is_active()}
            slot = next(i for i in range(len(taken) + 1) if i not in taken)
        bind = self._bind_addresses()
        worker = Worker(self._next_id, slot=slot)
        process, sock = spawn(self.settings, self._command, worker.id, extra, bind,
                              self._setups)
        self._next_id += 1
        channel = Channel(
            sock,
            self.settings.max_message_size,
            functools.partial(self._control.on_frames, worker),
            functools.partial(self._on_channel_close, worker),
        )
        outputs = [
            OutputReader(stream, functools.partial(self._on_output, worker, name))
            for name, stream in (("stdout", process.stdout), ("stderr", process.stderr))
            if stream is not None
        ]
        worker.process = process
        worker.env = extra
        worker.started_at = time.monotonic()
        worker._master = self
        worker._sup = Supervision(process, channel, outputs)
        self._workers[worker.id] = worker
        self._soon(functools.partial(self._attach, worker))
        return worker

    def _bind_addresses(self) -> list[tuple[int | str, ...]]:
        if self._bind is None:
            self._bind = self._listeners.bind_all(self.settings.bind)
        return self._bind

    def _attach(self, worker: Worker) -> None:
        loop = self._loop
        sup = worker._sup
        assert loop is not None and sup is not None
        sup.attach(loop, functools.partial(self._reap, worker))
        if not sup.watches_exit and not self._sigchld:
            self._sigchld = self._watch_sigchld(loop)
        worker.emit("fork")
        self.emit("fork", worker)
        self._reap(worker)  # it may have died before the loop ran

    # -- running ---------------------------------------------------------------------

    def run(self) -> int:
        """Run the master until no worker is left and nothing will fork another.

        Installs SIGTERM/SIGINT (graceful stop), SIGQUIT (immediate stop), SIGTTIN/
        SIGTTOU (one worker more/less) and SIGHUP/SIGUSR1/SIGUSR2 (``signal`` events)
        handlers when called from the main thread. Returns the exit code for the process:
        the one given to :meth:`stop`, else 1 if the cluster ended because workers died
        unexpectedly, else 0.
        """
        return asyncio.run(self.serve())

    async def serve(self) -> int:
        """Like :meth:`run`, inside a running asyncio loop."""
        if self._done is not None:
            msg = "this master has already run; make a new Master to run again"
            raise StateError(msg)
        loop = asyncio.get_running_loop()
        self._loop = loop
        self._done = loop.create_future()
        restore = self._signals.install(loop)
        if not hasattr(os, "pidfd_open"):
            self._sigchld = self._watch_sigchld(loop)
        try:
            self._bind_addresses()
            self.emit("setup", self.settings)
            deferred, self._deferred = self._deferred, []
            for call in deferred:
                call()
            self._scheduler.start(loop)
            self._check_done()
            return await self._done
        finally:
            if self._sigchld:
                loop.remove_signal_handler(signal.SIGCHLD)
                self._sigchld = False
            restore()
            self._shutdown_now()

    def stop(
        self, *, graceful: bool = True, exit_code: int | None = None, reason: str | None = None
    ) -> None:
        """Stop the cluster: no more forks; every worker disconnects (or is signalled).

        Emits ``stop()`` the first time (plugins drop what they planned to fork).

        Args:
            graceful: ``True`` (SIGTERM/SIGINT): workers are disconnected and get
                ``kill_timeout`` seconds to finish. ``False`` (SIGQUIT): workers get SIGTERM
                at once, then SIGKILL after ``kill_timeout``.
            exit_code: what :meth:`run` returns (default 0).
            reason: why, for people: kept as :attr:`stop_reason` (the first one given).
        """
        if exit_code is not None:
            if isinstance(exit_code, bool) or not isinstance(exit_code, int):
                msg = f"exit_code={exit_code!r} must be an int (what run() returns)"
                raise SettingsError(msg)
            self._exit_code = exit_code
        if reason is not None and self.stop_reason is None:
            self.stop_reason = str(reason)
        first = not self._stopping
        self._stopping = True
        if first:
            log.info("stopping %d worker(s)%s", len(self._workers), "" if graceful else " now")
            self.emit("stop")
        for worker in list(self._workers.values()):
            if graceful:
                worker.disconnect()
            else:
                worker.kill("SIGTERM")
                self._soon(functools.partial(self._arm_deadline, worker))
        self._soon(self._check_done)

    def disconnect(self) -> None:
        """Disconnect every connected worker (see :meth:`Worker.disconnect`)."""
        for worker in list(self._workers.values()):
            if worker.is_connected():
                worker.disconnect()

    def reload(self) -> None:
        """Ask the installed reload plugin for a rolling reload (what SIGHUP does).

        Emits ``reload()``.

        Raises:
            StateError: no plugin handles ``reload`` (install one: ``master.use("reload")``).
        """
        if not self.has_listeners("reload"):
            msg = "nothing handles reload(); install the reload plugin: master.use('reload')"
            raise StateError(msg)
        self.emit("reload")

    @property
    def size(self) -> int:
        """How many workers are active: alive and not leaving (see :meth:`Worker.is_active`)."""
        return sum(1 for w in self._workers.values() if w.is_active())

    def scale(self, count: int) -> None:
        """Run *count* workers: fork the missing ones, or disconnect the newest extra ones
        (they drain gracefully). SIGTTIN and SIGTTOU go through here.

        Raises:
            SettingsError: *count* is not an int >= 1 (to end the cluster, :meth:`stop` it).
            StateError: the master is stopping.
        """
        if isinstance(count, bool) or not isinstance(count, int) or count < 1:
            msg = f"scale({count!r}): the count must be an int >= 1; to end the cluster, stop() it"
            raise SettingsError(msg)
        if self._stopping:
            msg = f"cannot scale to {count}: the master is stopping"
            raise StateError(msg)
        active = sorted((w for w in self._workers.values() if w.is_active()), key=lambda w: w.id)
        if count != len(active):
            log.info("scaling from %d to %d worker(s)", len(active), count)
        for _ in range(count - len(active)):
            self.fork()
        for worker in reversed(active[count:]):
            worker.disconnect()

    @property
    def stopping(self) -> bool:
        """Whether :meth:`stop` was called (plugins must not fork then)."""
        return self._stopping

    def _request(self, worker: Worker, name: str, data: Any, timeout: float
                 ) -> asyncio.Future[Any]:
        check_delay("timeout", timeout, positive=True)
        return self._control.request(worker, name, data, timeout)

    def _finished(self) -> bool:
        return self._done is not None and self._done.done()

    def _message_limit(self) -> int:
        return self.settings.max_message_size

    def _soon(self, call: Callable[[], None]) -> None:
        if self._loop is None:
            self._deferred.append(call)  # runs when serve() starts
        elif not self._loop.is_closed():
            self._loop.call_soon(call)
        # else: run() has returned; there is nothing left to do it for

    def _check_done(self) -> None:
        done = self._done
        if done is None or done.done() or self._workers or self._holds:
            return
        code = self._exit_code
        if code is None:
            code = 1 if self._abnormal and not self._stopping else 0
        done.set_result(code)

    def _watch_sigchld(self, loop: asyncio.AbstractEventLoop) -> bool:
        if threading.current_thread() is not threading.main_thread():
            return False

        def reap_all() -> None:
            for worker in list(self._workers.values()):
                self._reap(worker)

        loop.add_signal_handler(signal.SIGCHLD, reap_all)
        return True

    # -- a worker's channel, output and exit ------------------------------------------

    def _on_channel_close(self, worker: Worker, error: ProtocolError | None) -> None:
        sup = worker._sup
        assert sup is not None
        sup.pending.close()
        if error is not None:
            error.worker_id = worker.id
            log.error("worker %d (pid %s) broke the IPC protocol: %s; ending it",
                      worker.id, worker.pid, error)
            worker.kill("SIGKILL")
            self._report(worker, error)
        if worker.exited_after_disconnect is None:
            worker.exited_after_disconnect = False
        worker.state = worker.state.to(WorkerState.DISCONNECTED)
        worker.emit("disconnect")
        self.emit("disconnect", worker)
        self._arm_deadline(worker)

    def _report(self, worker: Worker, error: Exception) -> None:
        handled = False
        if worker.has_listeners("error"):
            worker.emit("error", error)
            handled = True
        if self.has_listeners("error"):
            self.emit("error", error)
            handled = True
        if not handled:
            log.error("unhandled error from worker %d: %s", worker.id, error)

    def _on_output(self, worker: Worker, name: str, line: str) -> None:
        worker.emit("output", name, line)
        self.emit("output", worker, name, line)

    def _arm_deadline(self, worker: Worker) -> None:
        """SIGKILL *worker* if it is still alive ``kill_timeout`` seconds from now."""
        sup = worker._sup
        if sup is None or worker.is_dead():
            return
        if self._loop is None:
            self._deferred.append(functools.partial(self._arm_deadline, worker))
            return

        def expire() -> None:
            if not worker.is_dead():
                log.warning("worker %d (pid %s) did not exit within %.1f s; SIGKILL",
                            worker.id, worker.pid, self.settings.kill_timeout)
                worker.kill("SIGKILL")

        sup.arm_deadline(self._loop, self.settings.kill_timeout, expire)

    def _reap(self, worker: Worker, *, force: bool = False) -> None:
        sup = worker._sup
        if sup is None or worker.is_dead() or (not sup.attached and not force):
            return  # not attached yet: _attach reaps it first thing, in order after fork
        rc = sup.returncode()
        if rc is None:
            return
        code, sig = (rc, None) if rc >= 0 else (None, _signal_name(-rc))
        sup.release(self._loop)
        worker.exit_code, worker.signal_code = code, sig
        worker.state = worker.state.to(WorkerState.DEAD)
        if not worker.exited_after_disconnect and rc != 0 and not self._stopping:
            self._abnormal = True
        del self._workers[worker.id]
        self._listeners.release(worker.id)
        self._control.forget(worker)
        worker.emit("exit", code, sig)
        self.emit("exit", worker, code, sig)
        if worker.exited_after_disconnect and not any(
            w.slot == worker.slot for w in self._workers.values()
        ):  # a crashed worker's slot keeps its queue for the replacement
            self._listeners.release_slot(worker.slot)
        self._check_done()

    def _shutdown_now(self) -> None:
        """Leave nothing behind: kill and reap any worker still alive, close sockets."""
        self._stopping = True
        self._scheduler.close()
        for worker in list(self._workers.values()):
            if worker._sup is not None:
                worker._sup.kill_and_wait(5)
            self._reap(worker, force=True)
        self._listeners.close()


def _signal_name(number: int) -> str:
    """``"SIGKILL"`` for 9; real-time and other unnamed signals as ``"SIG35"``."""
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"SIG{number}"
