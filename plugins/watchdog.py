"""``watchdog``: kill a worker whose app stopped sending heartbeats, after logging what
every one of its threads was doing."""

from __future__ import annotations

import asyncio
import logging
import math
import signal as signals
import time
from typing import Any

import pycluster
from pycluster import Master, RequestError, SettingsError, Worker

from .guard_hooks import WATCHDOG as CHANNEL

__all__ = ["Watchdog"]

log = logging.getLogger("pycluster.watchdog")


class Watchdog:
    """Kill a worker that sent no heartbeat for *timeout* seconds (gunicorn's
    ``--timeout``); respawn replaces it.

    Heartbeats come from the worker's app, never from pycluster's IPC thread (which keeps
    running while the app hangs): an asyncio app that called
    ``pycluster.worker.attach_loop()`` beats from its loop by itself; a synchronous app
    calls ``pycluster.worker.heartbeat()`` from the code that serves. A worker is watched
    from its first heartbeat on, and only while it is active (not leaving: a draining
    worker has ``kill_timeout``).

    On a missed deadline it asks the worker for the Python stack of every thread (answered
    on the worker's IPC thread, so it works while the app is stuck; up to
    *stack_timeout* seconds), logs them at error level, emits
    ``watchdog_kill(worker, stacks)`` on the master (*stacks* is ``None`` when the worker
    did not answer: stuck in C code that holds the GIL), then sends *signal* (SIGKILL).
    The kill is unexpected (``exited_after_disconnect`` stays false), so the respawn
    plugin replaces the worker.

    Args:
        timeout: seconds without a heartbeat before the worker is killed (> 0).
        signal: what to kill it with (``"SIGKILL"``; ``"SIGABRT"`` for a core dump).
        stack_timeout: seconds to wait for the stacks before killing anyway.
    """

    name = "watchdog"

    def __init__(self, *, timeout: float = 30.0, signal: str = "SIGKILL",
                 stack_timeout: float = 1.0) -> None:
        for key, value in (("timeout", timeout), ("stack_timeout", stack_timeout)):
            if (isinstance(value, bool) or not isinstance(value, (int, float))
                    or not math.isfinite(value) or value <= 0):
                msg = f"watchdog {key}={value!r} must be a number of seconds > 0"
                raise SettingsError(msg)
        if not isinstance(signal, str) or signal.upper() not in signals.Signals.__members__:
            msg = f"watchdog signal={signal!r} must be a signal name such as 'SIGKILL'"
            raise SettingsError(msg)
        self.timeout = float(timeout)
        self.signal = signal.upper()
        self.stack_timeout = float(stack_timeout)
        #: Workers killed so far.
        self.kills = 0
        self._master: Master | None = None
        self._killing: set[int] = set()  # ids of workers being dumped and killed
        self._timer: Any = None

    @property
    def interval(self) -> float:
        """Seconds between a worker's heartbeats: a quarter of the timeout."""
        return self.timeout / 4

    def install(self, master: Master) -> None:
        """Have *master*'s workers beat, and check their heartbeats periodically."""
        self._master = master
        master.worker_setup("pycluster.plugins.guard_hooks:watchdog")
        self._channel = master.channel(CHANNEL)
        self._channel.on("message", self._on_hello)
        master.on("exit", self._on_exit)
        self._timer = master.call_every(min(1.0, self.timeout / 8), self._check)

    def uninstall(self, master: Master) -> None:
        """Stop checking (workers keep beating; nothing reads it)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _on_hello(self, worker: Worker, data: Any) -> None:
        if worker.is_connected():
            self._channel.send(worker, {"interval": self.interval})

    def _on_exit(self, worker: Worker, code: int | None, signal: str | None) -> None:
        self._killing.discard(worker.id)

    def _check(self) -> None:
        master = self._master
        assert master is not None
        if master.stopping:
            return
        now = time.monotonic()
        for worker in list(master.workers.values()):
            last = worker.last_heartbeat
            if (last is None or now - last <= self.timeout or worker.id in self._killing
                    or not worker.is_active()):
                continue
            self._killing.add(worker.id)
            asyncio.ensure_future(self._kill(worker, now - last))

    async def _kill(self, worker: Worker, silent_for: float) -> None:
        extra = {"worker_id": worker.id, "pid": worker.pid, "event": "watchdog"}
        log.warning("worker %d (pid %s) sent no heartbeat for %.1f s (timeout %g s); asking "
                    "for its stacks", worker.id, worker.pid, silent_for, self.timeout,
                    extra=extra)
        stacks: str | None = None
        why = ""
        try:
            stacks = await worker.stacks(self.stack_timeout)
        except RequestError as exc:
            why = (f"no answer within {self.stack_timeout:g} s: stuck in C code that holds "
                   "the GIL?" if exc.timed_out else str(exc))
        except pycluster.ChannelClosedError as exc:
            why = str(exc)
        if worker.is_dead():
            return
        # The answer came through the channel after any heartbeat the worker wrote before
        # it: a worker that beat meanwhile was only waiting for a slow master.
        recovered = worker.last_heartbeat is not None and (
            time.monotonic() - worker.last_heartbeat <= self.timeout)
        if recovered or not worker.is_active():
            log.warning("worker %d (pid %s) %s; not killing it", worker.id, worker.pid,
                        "beat again (its heartbeats were waiting for a slow master)"
                        if recovered else "is leaving", extra=extra)
            self._killing.discard(worker.id)
            return
        if stacks is None:
            log.error("worker %d (pid %s) is hung: sent no heartbeat for %.1f s (timeout %g "
                      "s); no stacks (%s); %s", worker.id, worker.pid, silent_for,
                      self.timeout, why, self.signal, extra=extra)
        else:
            log.error("worker %d (pid %s) is hung: sent no heartbeat for %.1f s (timeout %g "
                      "s); %s; every thread:\n%s", worker.id, worker.pid, silent_for,
                      self.timeout, self.signal, stacks.rstrip("\n"), extra=extra)
        self.kills += 1
        assert self._master is not None
        self._master.emit("watchdog_kill", worker, stacks)
        worker.kill(self.signal)
