"""``respawn``: replace workers that die unexpectedly, with backoff and a crash-loop guard."""

from __future__ import annotations

import collections
import logging
import math
import random
import time
from collections.abc import Iterable
from typing import Any

from pycluster import BOOT_FAILURE, Master, SettingsError, Worker

__all__ = ["Respawn", "backoff"]

log = logging.getLogger("pycluster.respawn")


def backoff(misses: int, min_delay: float, max_delay: float) -> float:
    """Seconds to wait before replacing a worker after *misses* quick deaths in a row in
    its slot: none after the first, then *min_delay* doubling up to *max_delay*."""
    if misses <= 0:
        return 0.0
    return min(max_delay, min_delay * 2.0 ** min(misses - 1, 64))


def _number(value: Any) -> bool:
    """A finite int or float, not a bool."""
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value))


class Respawn:
    """Fork a replacement, in the same slot and with the same env, for a worker that died
    unexpectedly: it crashed, was killed by a signal, or exited with a code other than
    those in *stop_exit_codes*. A worker that exited after ``disconnect()`` (a stop, a
    reload, a scale-down) is never replaced, nor is any worker while the master stops.

    Backoff: the first replacement after a stable run is immediate; each further death of
    a worker that lived less than *stable_after* seconds (a boot failure always counts:
    it died before its first ``listening``) doubles the delay from *min_delay* up to
    *max_delay*, with ±*jitter* randomness. Crash-loop guard: more than *max_restarts*
    replacements within *window* seconds, a worker exiting with ``BOOT_FAILURE`` (3)
    before it was ever ready, or (with *fail_fast*) any worker dying before it listened
    while no worker of the cluster has listened yet (the app fails at start: retrying
    would only repeat the error), makes the plugin give up: it logs why, emits
    ``respawn_give_up(worker, reason)`` on the master, and stops the master with exit
    code 1 and that reason.

    Args:
        min_delay: delay before the second quick replacement in a row, in seconds.
        max_delay: largest delay between replacements.
        jitter: fraction of the delay added or removed at random (spreads restarts).
        stable_after: a worker alive this long resets the backoff.
        max_restarts: replacements allowed within *window* seconds.
        window: seconds over which *max_restarts* is counted.
        stop_exit_codes: exit codes that mean "do not replace" (default: 0).
        fail_fast: give up at the first death before any worker has listened (``False``:
            retry such deaths with backoff, e.g. for workers that never listen).
    """

    name = "respawn"

    def __init__(
        self,
        *,
        min_delay: float = 0.1,
        max_delay: float = 15.0,
        jitter: float = 0.1,
        stable_after: float = 30.0,
        max_restarts: int = 10,
        window: float = 60.0,
        stop_exit_codes: tuple[int, ...] | list[int] = (0,),
        fail_fast: bool = True,
    ) -> None:
        for key, value in (("min_delay", min_delay), ("max_delay", max_delay),
                           ("stable_after", stable_after), ("window", window)):
            if not _number(value) or value < 0:
                msg = f"respawn {key}={value!r} must be a number of seconds >= 0"
                raise SettingsError(msg)
        if not _number(jitter) or not 0 <= jitter < 1:
            msg = f"respawn jitter={jitter!r} must be a number in [0, 1)"
            raise SettingsError(msg)
        codes = list(stop_exit_codes) if isinstance(stop_exit_codes, Iterable) else None
        if codes is None or not all(isinstance(c, int) and not isinstance(c, bool) for c in codes):
            msg = (
                f"respawn stop_exit_codes={stop_exit_codes!r} must be a list of exit codes, "
                "e.g. (0, 3)"
            )
            raise SettingsError(msg)
        if not isinstance(fail_fast, bool):
            msg = f"respawn fail_fast={fail_fast!r} must be True or False"
            raise SettingsError(msg)
        if isinstance(max_restarts, bool) or not isinstance(max_restarts, int) or max_restarts < 0:
            msg = f"respawn max_restarts={max_restarts!r} must be an int >= 0"
            raise SettingsError(msg)
        self.min_delay = float(min_delay)
        self.max_delay = float(max_delay)
        self.jitter = float(jitter)
        self.stable_after = float(stable_after)
        self.max_restarts = max_restarts
        self.window = float(window)
        self.stop_exit_codes = frozenset(codes)
        self.fail_fast = fail_fast
        #: Replacements forked so far.
        self.restarts = 0
        self._recent: collections.deque[float] = collections.deque()
        self._unstable: dict[int, int] = {}  # slot -> deaths in a row without a stable run
        self._ready: set[int] = set()  # ids of workers that reached their first listening
        self._served = False  # whether any worker of the cluster has listened
        self._pending: dict[int, Any] = {}  # slot -> Timer
        self._gave_up = False
        self._master: Master | None = None

    def install(self, master: Master) -> None:
        """Watch *master*'s exits."""
        self._master = master
        master.on("listening", self._on_listening)
        master.on("ready", self._on_listening)
        master.on("exit", self._on_exit)
        master.on("stop", self._cancel_pending)  # a stopping master forks nothing more

    def uninstall(self, master: Master) -> None:
        """Cancel replacements that are waiting out their backoff."""
        self._cancel_pending()

    def _cancel_pending(self) -> None:
        for timer in self._pending.values():
            timer.cancel()
        self._pending.clear()

    def _on_listening(self, worker: Worker, address: Any = None) -> None:
        self._ready.add(worker.id)
        self._served = True

    def _on_exit(self, worker: Worker, code: int | None, signal: str | None) -> None:
        master = self._master
        assert master is not None
        was_ready = worker.id in self._ready
        self._ready.discard(worker.id)
        if master.stopping:
            self._cancel_pending()  # a stopping master forks nothing: let it end now
            return
        if self._gave_up or worker.exited_after_disconnect:
            return
        if signal is None and code in self.stop_exit_codes:
            return
        if self._slot_taken(worker.slot):
            return  # e.g. a failed reload replacement: its slot still has a worker
        uptime = time.monotonic() - (worker.started_at or time.monotonic())
        why = f"signal {signal}" if signal else f"exit code {code}"
        if code == BOOT_FAILURE and not was_ready:
            self._give_up(worker, f"worker {worker.id} failed to boot ({why})")
            return
        if self.fail_fast and not was_ready and not self._served and uptime < self.stable_after:
            self._give_up(
                worker,
                f"worker {worker.id} died before it listened ({why}) and no worker has "
                "listened yet: the app fails at start",
            )
            return
        now = time.monotonic()
        while self._recent and now - self._recent[0] > self.window:
            self._recent.popleft()
        if len(self._recent) >= self.max_restarts:
            self._give_up(
                worker,
                f"{len(self._recent) + 1} unexpected exits within {self.window:g} s "
                f"(max_restarts={self.max_restarts}); the last: worker {worker.id}, {why}",
            )
            return
        self._recent.append(now)
        if was_ready and uptime >= self.stable_after:
            self._unstable[worker.slot] = 0
        misses = self._unstable.get(worker.slot, 0)
        self._unstable[worker.slot] = misses + 1
        delay = backoff(misses, self.min_delay, self.max_delay)
        delay *= 1 + random.uniform(-self.jitter, self.jitter)
        log.info("respawning slot %d (worker %d died: %s) in %.2f s",
                 worker.slot, worker.id, why, delay)
        self._pending[worker.slot] = master.call_later(delay, self._replace, worker)

    def _slot_taken(self, slot: int) -> bool:
        master = self._master
        assert master is not None
        return any(w.slot == slot and w.is_active() for w in master.workers.values())

    def _replace(self, worker: Worker) -> None:
        master = self._master
        assert master is not None
        self._pending.pop(worker.slot, None)
        if master.stopping or self._gave_up or self._slot_taken(worker.slot):
            return
        self.restarts += 1
        master.fork(env=worker.env, slot=worker.slot)

    def _give_up(self, worker: Worker, reason: str) -> None:
        master = self._master
        assert master is not None
        self._gave_up = True
        self._cancel_pending()
        log.error("respawn gives up: %s; stopping the cluster", reason)
        master.emit("respawn_give_up", worker, reason)
        master.stop(exit_code=1, reason=f"respawn gave up: {reason}")
