"""Timers for plugins: a later call that keeps the master running, and periodic ticks
that do not. Either can be set up before the master runs; it starts counting then."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ._errors import SettingsError

if TYPE_CHECKING:
    import asyncio

__all__ = ["Scheduler", "Timer"]


def check_delay(name: str, value: Any, *, positive: bool = False) -> float:
    """Return *value* as seconds, or raise SettingsError naming *name*."""
    ok = (isinstance(value, (int, float)) and not isinstance(value, bool)
          and math.isfinite(value) and (value > 0 if positive else value >= 0))
    if not ok:
        msg = f"{name}={value!r} must be a number of seconds {'> 0' if positive else '>= 0'}"
        raise SettingsError(msg)
    return float(value)


class Timer:
    """A pending :meth:`Master.call_later` or :meth:`Master.call_every`; :meth:`cancel`
    drops it (and, for ``call_later``, stops holding the master)."""

    def __init__(self, scheduler: Scheduler, release: Callable[[], None] | None) -> None:
        self._scheduler = scheduler
        self._release = release
        self._handle: asyncio.TimerHandle | None = None
        self.cancelled = False

    def cancel(self) -> None:
        """Drop the call if it has not run (every later tick of a periodic one)."""
        self.cancelled = True
        if self._handle is not None:
            self._handle.cancel()
        self._finish()

    def _finish(self) -> None:
        self._scheduler._live.discard(self)
        release, self._release = self._release, None
        if release is not None:
            release()


class Scheduler:
    """The master's timers; armed on its loop once it runs, all cancelled when it ends."""

    def __init__(self, on_error: Callable[[Callable[..., Any], Exception], None]) -> None:
        self._on_error = on_error
        self._loop: asyncio.AbstractEventLoop | None = None
        self._waiting: list[Callable[[asyncio.AbstractEventLoop], None]] = []
        self._live: set[Timer] = set()

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        """Arm the timers made before the loop ran."""
        self._loop = loop
        waiting, self._waiting = self._waiting, []
        for arm in waiting:
            arm(loop)

    def close(self) -> None:
        """Cancel every timer (the master has ended)."""
        for timer in list(self._live):
            timer.cancel()
        self._loop = None

    def _schedule(self, timer: Timer, arm: Callable[[asyncio.AbstractEventLoop], None]) -> Timer:
        self._live.add(timer)
        if self._loop is None:
            self._waiting.append(lambda loop: None if timer.cancelled else arm(loop))
        else:
            arm(self._loop)
        return timer

    def call_later(self, delay: float, release: Callable[[], None] | None,
                   fn: Callable[..., Any], args: tuple[Any, ...]) -> Timer:
        """Call ``fn(*args)`` once, *delay* seconds after now (or after the loop starts)."""
        timer = Timer(self, release)

        def fire() -> None:
            timer._finish()
            self._run(fn, args)

        def arm(loop: asyncio.AbstractEventLoop) -> None:
            timer._handle = loop.call_later(delay, fire)

        return self._schedule(timer, arm)

    def call_every(self, interval: float, fn: Callable[..., Any], args: tuple[Any, ...]) -> Timer:
        """Call ``fn(*args)`` every *interval* seconds; a late tick is not made up twice."""
        timer = Timer(self, None)

        def arm(loop: asyncio.AbstractEventLoop, due: float | None = None) -> None:
            now = loop.time()
            due = now + interval if due is None or due <= now else due

            def fire() -> None:
                self._run(fn, args)
                if not timer.cancelled and self._loop is loop:
                    arm(loop, due + interval)

            timer._handle = loop.call_at(due, fire)

        return self._schedule(timer, arm)

    def _run(self, fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
        try:
            fn(*args)
        except Exception as exc:
            self._on_error(fn, exc)
