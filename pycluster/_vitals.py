"""What a worker tells the master about its health: heartbeats and requests served.

A mixin of :class:`pycluster.ThisWorker` (``pycluster.worker``): the watchdog plugin sets
:attr:`Vitals.heartbeat_interval` and kills a worker whose heartbeats stop; the recycle
plugin sets :attr:`Vitals.max_requests` and replaces a worker that served that many.
"""

from __future__ import annotations

import math
import threading
import time
from typing import TYPE_CHECKING, Any

from ._errors import ChannelClosedError, SettingsError
from ._protocol import encode_control

__all__ = ["Vitals"]


class Vitals:
    """Heartbeats and the request count of this worker (see the module docstring)."""

    requests: int
    _inbox: Any

    def _init_vitals(self) -> None:
        self.requests = 0
        self._count_lock = threading.Lock()
        self._max_requests: int | None = None
        self._limit_told = False
        self._beat_interval: float | None = None
        self._last_beat = -math.inf
        self._beat_chain = 0  # bumped to end the loop's heartbeat chain

    if TYPE_CHECKING:  # provided by ThisWorker; declared here for the type checker only

        def is_connected(self) -> bool: ...

        def _write(self, frame: bytes) -> None: ...

        def emit(self, event: str, *args: Any, **kwargs: Any) -> bool: ...

    def heartbeat(self) -> None:
        """Tell the master this worker's app is alive (for the hung-worker watchdog).

        Only needed in a synchronous app: after :meth:`attach_loop`, the loop sends
        heartbeats by itself. Call it from the code that serves, at least every
        ``--timeout`` / 2 seconds while the app is healthy, idle or not (per request and
        from the server's idle tick, e.g. ``socketserver``'s ``service_actions()``). Cheap:
        it writes to the master at most once per :attr:`heartbeat_interval`, and not at
        all while no watchdog asked for heartbeats. A worker is watched from its first
        heartbeat on: an app that never calls this is never killed by the watchdog.
        """
        interval = self._beat_interval
        if interval is None:
            return
        now = time.monotonic()
        if now - self._last_beat >= interval:
            self._beat(now)

    def _beat(self, now: float) -> None:
        self._last_beat = now
        if self.is_connected():
            try:
                self._write(encode_control("heartbeat"))
            except ChannelClosedError:
                pass

    @property
    def heartbeat_interval(self) -> float | None:
        """Seconds between heartbeats, or ``None`` (the default: none are sent).

        The watchdog plugin sets it from the master; with a loop attached, setting it
        starts (or retimes) the loop's own heartbeats. Setting ``None`` stops them.
        """
        return self._beat_interval

    @heartbeat_interval.setter
    def heartbeat_interval(self, seconds: float | None) -> None:
        if seconds is not None and (
            isinstance(seconds, bool) or not isinstance(seconds, (int, float))
            or not math.isfinite(seconds) or seconds <= 0
        ):
            msg = f"heartbeat_interval={seconds!r} must be a number of seconds > 0, or None"
            raise SettingsError(msg)
        self._beat_interval = None if seconds is None else float(seconds)
        self._start_beating()

    def _start_beating(self) -> None:
        """Start a new chain of heartbeats on the attached loop (ending any older one)."""
        self._beat_chain += 1
        loop = self._inbox.loop
        if loop is None or self._beat_interval is None:
            return
        try:
            loop.call_soon_threadsafe(self._beat_on_loop, loop, self._beat_chain)
        except RuntimeError:  # the loop is closed
            pass

    def _beat_on_loop(self, loop: Any, chain: int) -> None:
        interval = self._beat_interval
        if chain != self._beat_chain or interval is None or not self.is_connected():
            return
        self._beat(time.monotonic())
        loop.call_later(interval, self._beat_on_loop, loop, chain)

    @property
    def max_requests(self) -> int | None:
        """When :attr:`requests` reaches this, ``max_requests(count)`` is emitted once.

        ``None`` (the default) for no limit. The recycle plugin sets it from the master
        (``--max-requests``); setting it again re-arms the event.
        """
        return self._max_requests

    @max_requests.setter
    def max_requests(self, limit: int | None) -> None:
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int)
                                  or limit < 1):
            msg = f"max_requests={limit!r} must be an int >= 1, or None"
            raise SettingsError(msg)
        with self._count_lock:
            self._max_requests = limit
            self._limit_told = False
            count = self.requests
        if limit is not None and count >= limit:
            self._tell_limit(count)

    def count_request(self, n: int = 1) -> None:
        """Count *n* requests served (what a server calls once per request answered).

        Cheap (an addition under a lock) and safe from any thread; the count is
        :attr:`requests`. When it reaches :attr:`max_requests`, ``max_requests(count)``
        is emitted once, on the calling thread (the recycle plugin then replaces this
        worker gracefully).

        Raises:
            SettingsError: *n* is not an int >= 0.
        """
        if type(n) is not int or n < 0:
            msg = f"count_request({n!r}): n must be an int >= 0"
            raise SettingsError(msg)
        with self._count_lock:
            self.requests += n
            count = self.requests
            limit = self._max_requests
        if limit is not None and count >= limit and not self._limit_told:
            self._tell_limit(count)

    def _tell_limit(self, count: int) -> None:
        with self._count_lock:
            if self._limit_told:
                return
            self._limit_told = True
        self.emit("max_requests", count)
