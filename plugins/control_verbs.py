"""The verbs the ``control`` plugin's socket answers: ``hello``, ``status``, ``reload``,
``scale`` and ``stop`` (a mixin of :class:`pycluster.plugins.control.ControlSocket`)."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from pycluster import SettingsError, StateError, __version__

from ._proc import rss_bytes as _rss_bytes
from .control_client import MAX_SCALE

if TYPE_CHECKING:
    from pycluster import Master, PluginChannel, Worker

__all__ = ["ASK_TIMEOUT", "Verbs"]

log = logging.getLogger("pycluster.control")

#: Seconds ``status`` waits for a worker to say how many requests it served (a hung
#: worker's row shows none; the answer never waits longer).
ASK_TIMEOUT = 0.5


class Verbs:
    """One ``async`` method per verb: ``(request, peer_pid) -> result``; what it raises is
    answered as the error."""

    cluster: str | None
    path: str | None
    _master: Master | None
    _started: float
    _reloading: bool
    _restarts: dict[int, int]
    _last_exit: dict[int, dict[str, Any]]
    _status_channel: PluginChannel

    if TYPE_CHECKING:  # the plugin's bookkeeping, kept by ControlSocket

        def _cpu_percent(self, pid: int, started: float | None) -> float | None: ...

    def _summary(self) -> dict[str, Any]:
        master = self._master
        assert master is not None
        return {
            "name": self.cluster, "pid": os.getpid(), "version": __version__,
            "uptime": round(time.monotonic() - self._started, 3),
            "workers": master.size, "stopping": master.stopping,
        }

    async def _hello(self, request: dict[str, Any], peer_pid: int) -> Any:
        return self._summary()

    async def _status(self, request: dict[str, Any], peer_pid: int) -> Any:
        master = self._master
        assert master is not None
        now = time.monotonic()
        rows = []
        workers = sorted(master.workers.values(), key=lambda w: (w.slot, w.id))
        served = await self._requests_served(workers)
        for worker in workers:
            pid = worker.pid
            last = self._last_exit.get(worker.slot)
            row: dict[str, Any] = {
                "id": worker.id,
                "pid": pid,
                "slot": worker.slot,
                "state": worker.state.value,
                "leaving": bool(worker.exited_after_disconnect),
                "uptime": None if worker.started_at is None else round(now - worker.started_at, 3),
                "restarts": self._restarts.get(worker.slot, 0),
                "cpu_percent": None if pid is None else self._cpu_percent(pid, worker.started_at),
                "rss_bytes": None if pid is None else _rss_bytes(pid),
                "requests": served.get(worker.id),
                "last_exit": None if last is None else {**last, "ago": round(now - last["at"], 3)},
            }
            master.emit("status_row", worker, row)
            rows.append(row)
        return {
            **self._summary(),
            "socket": self.path,
            "reloading": self._reloading,
            "cpu_percent": self._cpu_percent(os.getpid(), self._started),
            "rss_bytes": _rss_bytes(os.getpid()),
            "workers": rows,
        }

    async def _requests_served(self, workers: list[Worker]) -> dict[int, int]:
        """Ask each connected worker how many requests it served (at most
        :data:`ASK_TIMEOUT` s); the workers that answered with a count."""
        import asyncio

        asking = [w for w in workers if w.is_connected()]
        answers = await asyncio.gather(
            *(self._status_channel.request(w, "requests", timeout=ASK_TIMEOUT)
              for w in asking), return_exceptions=True)
        served = {}
        for worker, answer in zip(asking, answers, strict=True):
            count = answer.get("requests") if isinstance(answer, dict) else None
            if isinstance(count, int) and not isinstance(count, bool):
                served[worker.id] = count
        return served

    async def _reload(self, request: dict[str, Any], peer_pid: int) -> Any:
        import asyncio

        master = self._master
        assert master is not None
        outcome: asyncio.Future[str | None] = asyncio.get_running_loop().create_future()
        started = False

        def reloading() -> None:
            nonlocal started
            started = True

        def settle(why: str | None) -> None:
            if not outcome.done():
                outcome.set_result(why)

        def reloaded() -> None:
            if started:  # else: the round before ours ended; ours runs next
                settle(None)

        def failed(reason: str) -> None:
            if started:
                settle(reason)
            else:
                settle(f"the reload in progress failed, so the one asked for did not run: "
                       f"{reason}")

        def stopping() -> None:
            settle("the master is stopping")

        handlers: list[tuple[str, Callable[..., None]]] = [
            ("reloading", reloading), ("reloaded", reloaded), ("reload_failed", failed),
            ("stop", stopping)]
        for event, handler in handlers:
            master.on(event, handler)
        try:
            if master.stopping:
                stopping()
            else:
                log.info("reload asked for on the control socket (client pid %d)", peer_pid)
                master.reload()
            why = await outcome
        finally:
            for event, handler in handlers:
                master.remove_listener(event, handler)
        if why is not None:
            msg = f"reload failed: {why}"
            raise StateError(msg)
        return {"reloaded": True, "workers": master.size}

    async def _scale(self, request: dict[str, Any], peer_pid: int) -> Any:
        master = self._master
        assert master is not None
        before = master.size
        count, delta = request.get("count"), request.get("delta")
        if (count is None) == (delta is None):
            msg = 'scale needs either "count" (workers to run) or "delta" (+N or -N)'
            raise SettingsError(msg)
        if delta is not None:
            if isinstance(delta, bool) or not isinstance(delta, int):
                msg = f"scale delta={delta!r} must be a whole number like 1 or -1"
                raise SettingsError(msg)
            count = before + delta
            if count < 1:
                msg = (f"cannot scale by {delta:+d}: {before} worker(s) run and at least one "
                       "must stay; to end the cluster, stop it")
                raise SettingsError(msg)
        if isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= MAX_SCALE:
            msg = f"scale count={count!r} must be a whole number from 1 to {MAX_SCALE}"
            raise SettingsError(msg)
        log.info("scale to %d asked for on the control socket (client pid %d)", count, peer_pid)
        master.scale(count)
        return {"from": before, "to": count}

    async def _stop(self, request: dict[str, Any], peer_pid: int) -> Any:
        master = self._master
        assert master is not None
        now = request.get("now", False)
        if not isinstance(now, bool):
            msg = f"stop now={now!r} must be true or false"
            raise SettingsError(msg)
        log.info("%s stop asked for on the control socket (client pid %d)",
                 "immediate" if now else "graceful", peer_pid)
        workers = len(master.workers)
        master.stop(graceful=not now)
        return {"stopping": True, "pid": os.getpid(), "workers": workers}
