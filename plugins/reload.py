"""``reload``: graceful rolling reload, one slot at a time, gated on readiness."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from pycluster import Master, SettingsError, Worker

__all__ = ["Reload"]

log = logging.getLogger("pycluster.reload")


class Reload:
    """Replace every worker with a fresh one (new code, new config) without dropping
    a connection: ``master.reload()``, SIGHUP, or the CLI start it.

    For each slot in turn (*surge* slots at a time) it forks the replacement, waits until
    it is ready (its first ``listening``, or with ``wait_for="ready"`` its
    ``pycluster.worker.ready()``) for up to *ready_timeout* seconds, and only then
    disconnects the old worker, which gets ``kill_timeout`` to finish its requests. If a
    replacement dies or is not ready in time, the reload stops there: the replacement is
    disconnected, the old worker keeps serving, and ``reload_failed(reason)`` is emitted
    and logged. A reload asked for during a reload runs once more after it, never at the
    same time. Emits ``reloading()`` when a round starts and ``reloaded()`` when it ends well.

    Args:
        ready_timeout: seconds a replacement has to become ready.
        wait_for: ``"listening"`` or ``"ready"``.
        surge: how many slots are replaced at once.
    """

    name = "reload"

    def __init__(
        self, *, ready_timeout: float = 30.0, wait_for: str = "listening", surge: int = 1
    ) -> None:
        if isinstance(ready_timeout, bool) or not isinstance(ready_timeout, (int, float)) or (
            ready_timeout <= 0
        ):
            msg = f"reload ready_timeout={ready_timeout!r} must be a number of seconds > 0"
            raise SettingsError(msg)
        if wait_for not in ("listening", "ready"):
            msg = f"reload wait_for={wait_for!r} must be 'listening' or 'ready'"
            raise SettingsError(msg)
        if isinstance(surge, bool) or not isinstance(surge, int) or surge < 1:
            msg = f"reload surge={surge!r} must be an int >= 1"
            raise SettingsError(msg)
        self.ready_timeout = float(ready_timeout)
        self.wait_for = wait_for
        self.surge = surge
        #: Rounds that ended well / that stopped on a failure.
        self.completed = 0
        self.failed = 0
        self._master: Master | None = None
        self._task: asyncio.Task[None] | None = None
        self._again = False

    def install(self, master: Master) -> None:
        """Handle *master*'s ``reload`` event."""
        self._master = master
        master.on("reload", self._requested)

    def uninstall(self, master: Master) -> None:
        """Cancel a reload in progress (replacements already serving stay)."""
        if self._task is not None:
            self._task.cancel()

    @property
    def running(self) -> bool:
        """Whether a reload is in progress."""
        return self._task is not None and not self._task.done()

    def _requested(self) -> None:
        if self.running:
            self._again = True
            log.info("reload requested during a reload: it will run once more afterwards")
            return
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        master = self._master
        assert master is not None
        release = master.hold()
        try:
            while True:
                self._again = False
                ok = await self._round(master)
                if not ok or not self._again or master.stopping:
                    return
        finally:
            release()

    async def _round(self, master: Master) -> bool:
        old = sorted(
            (w for w in master.workers.values()
             if w.is_active()),
            key=lambda w: (w.slot, w.id),
        )
        log.info("reload: replacing %d worker(s), %d at a time", len(old), self.surge)
        master.emit("reloading")
        for start in range(0, len(old), self.surge):
            batch = [w for w in old[start : start + self.surge] if not w.is_dead()]
            if master.stopping:
                return False
            fresh: list[Worker] = []
            try:
                for worker in batch:
                    fresh.append(master.fork(env=worker.env, slot=worker.slot))
            except Exception as exc:  # EMFILE, EAGAIN, a bad uid: report it like a failure
                results: list[str | None] = [f"could not fork a replacement: {exc!r}"]
            else:
                results = await asyncio.gather(*(self._until_ready(w) for w in fresh))
            if master.stopping:  # a stop disconnects everyone, replacements included
                log.info("reload interrupted: the master is stopping")
                return False
            failures = [why for why in results if why]
            if failures:
                for worker in fresh:
                    worker.disconnect()
                reason = "; ".join(failures) + "; keeping the old worker(s) and stopping the reload"
                log.error("reload failed: %s", reason)
                self.failed += 1
                master.emit("reload_failed", reason)
                return False
            for worker in batch:
                worker.disconnect()
        self.completed += 1
        log.info("reload done: %d worker(s) replaced", len(old))
        master.emit("reloaded")
        return True

    async def _until_ready(self, worker: Worker) -> str | None:
        """Wait for *worker* to be ready; return why not, or ``None`` if it is."""
        loop = asyncio.get_running_loop()
        outcome: asyncio.Future[str | None] = loop.create_future()

        def ready(*_: Any) -> None:
            if not outcome.done():
                outcome.set_result(None)

        def died(code: int | None, signal: str | None) -> None:
            if not outcome.done():
                how = f"signal {signal}" if signal else f"exit code {code}"
                why = f"replacement worker {worker.id} died before it was ready ({how})"
                outcome.set_result(why)

        worker.on(self.wait_for, ready)
        worker.on("exit", died)
        try:
            return await asyncio.wait_for(outcome, self.ready_timeout)
        except asyncio.TimeoutError:
            return f"replacement worker {worker.id} was not ready within {self.ready_timeout:g} s"
        finally:
            worker.remove_listener(self.wait_for, ready)
            worker.remove_listener("exit", died)
