"""``recycle``: replace a worker gracefully after N requests, past a memory size or an
age, the way a rolling reload replaces one: the replacement first, then the drain."""

from __future__ import annotations

import asyncio
import logging
import math
import random
import time
from typing import Any

import pycluster
from pycluster import Master, SettingsError, Worker

from .guard_hooks import RECYCLE as CHANNEL

__all__ = ["Recycle"]

from ._proc import rss_bytes

log = logging.getLogger("pycluster.recycle")


def _check(key: str, value: Any, kind: type, what: str) -> None:
    ok = (not isinstance(value, bool) and isinstance(value, (int, float) if kind is float else int)
          and math.isfinite(value) and value >= 0)
    if not ok:
        msg = f"recycle {key}={value!r} must be {what} >= 0 (0 = off)"
        raise SettingsError(msg)


class Recycle:
    """Replace workers that served *max_requests* requests, grew past *max_memory* MiB
    of RSS, or lived *max_age* seconds (each 0 = off) — gunicorn's ``--max-requests``,
    with a memory and an age limit beside it.

    Each worker gets its own request limit, at random in
    [*max_requests*, *max_requests* + *max_requests_jitter*], so workers started together
    are not all replaced together. Requests are counted in the worker: the app (or the
    server adapter) calls ``pycluster.worker.count_request()`` once per request, and the
    worker tells the master when it reaches its limit. Memory and age are checked every
    *check_interval* seconds.

    A worker is replaced as a rolling reload replaces one: the replacement is forked in
    its slot first; once it listens (within *ready_timeout* s) the old worker is
    disconnected and drains, so capacity never drops and no connection is refused. One
    recycle at a time per slot, none while the master stops. If the replacement dies or is
    not ready in time, the old worker keeps serving and the recycle is retried after
    *retry_after* seconds. Emits ``recycle(worker, reason)`` as a recycle starts.

    Args:
        max_requests: requests a worker serves before it is replaced.
        max_requests_jitter: at most this many more, at random per worker.
        max_memory: MiB of resident memory (RSS) a worker may use.
        max_age: seconds a worker may live.
        check_interval: seconds between memory and age checks.
        ready_timeout: seconds a replacement has to listen.
        retry_after: seconds before a failed recycle is tried again.
    """

    name = "recycle"

    def __init__(self, *, max_requests: int = 0, max_requests_jitter: int = 0,
                 max_memory: float = 0, max_age: float = 0, check_interval: float = 1.0,
                 ready_timeout: float = 30.0, retry_after: float = 10.0) -> None:
        _check("max_requests", max_requests, int, "an int")
        _check("max_requests_jitter", max_requests_jitter, int, "an int")
        _check("max_memory", max_memory, float, "a number of MiB")
        _check("max_age", max_age, float, "a number of seconds")
        for key, value in (("check_interval", check_interval), ("ready_timeout", ready_timeout),
                           ("retry_after", retry_after)):
            _check(key, value, float, "a number of seconds")
            if value == 0:
                msg = f"recycle {key}={value!r} must be a number of seconds > 0"
                raise SettingsError(msg)
        if max_requests_jitter and not max_requests:
            msg = (f"recycle max_requests_jitter={max_requests_jitter!r} needs max_requests "
                   "(the jitter is added to it)")
            raise SettingsError(msg)
        self.max_requests = max_requests
        self.max_requests_jitter = max_requests_jitter
        self.max_memory = float(max_memory)
        self.max_age = float(max_age)
        self.check_interval = float(check_interval)
        self.ready_timeout = float(ready_timeout)
        self.retry_after = float(retry_after)
        #: Recycles that completed (the replacement listened, the old worker was told to go).
        self.recycled = 0
        #: Recycles that failed (the old worker kept serving).
        self.failed = 0
        self._master: Master | None = None
        self._limits: dict[int, int] = {}  # worker id -> its request limit
        self._due: dict[int, str] = {}  # worker id -> why it is to be recycled
        self._not_before: dict[int, float] = {}  # worker id -> retry time after a failure
        self._busy: set[int] = set()  # slots with a recycle in progress
        self._tasks: set[asyncio.Task[None]] = set()
        self._timer: Any = None

    def limit(self, worker: Worker) -> int | None:
        """The request limit given to *worker*, or ``None`` (no ``max_requests``)."""
        return self._limits.get(worker.id)

    def install(self, master: Master) -> None:
        """Give *master*'s workers their limits and watch them."""
        self._master = master
        self._channel = master.channel(CHANNEL)
        if self.max_requests:
            master.worker_setup("pycluster.plugins.guard_hooks:recycle")
            self._channel.on("message", self._on_push)
        master.on("exit", self._on_exit)
        self._timer = master.call_every(self.check_interval, self._tick)

    def uninstall(self, master: Master) -> None:
        """Stop checking and cancel recycles in progress (replacements already up stay)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for task in list(self._tasks):
            task.cancel()

    def recycle(self, worker: Worker, reason: str) -> None:
        """Replace *worker* gracefully, for *reason*, as soon as its slot is free of
        another recycle (now, usually)."""
        if worker.id not in self._due:
            self._due[worker.id] = reason
        self._start_due()

    # -- reasons ---------------------------------------------------------------------

    def _on_push(self, worker: Worker, data: Any) -> None:
        if not isinstance(data, dict):
            return
        if "hello" in data:  # the worker-side hook is ready for its limit
            given = self.max_requests + random.randint(0, self.max_requests_jitter)
            self._limits[worker.id] = given
            if worker.is_connected():
                self._channel.send(worker, {"max_requests": given})
            return
        count = data.get("requests")
        limit = self._limits.get(worker.id)
        if limit is None or not isinstance(count, int) or count < limit:
            return
        self.recycle(worker, f"served {count} requests (max_requests {limit})")

    def _on_exit(self, worker: Worker, code: int | None, signal: str | None) -> None:
        for table in (self._limits, self._due, self._not_before):
            table.pop(worker.id, None)

    def _tick(self) -> None:
        master = self._master
        assert master is not None
        if master.stopping:
            return
        now = time.monotonic()
        for worker in list(master.workers.values()):
            if worker.id in self._due or not self._eligible(worker):
                continue
            age = now - (worker.started_at or now)
            if self.max_age and age >= self.max_age:
                self._due[worker.id] = f"{age:.0f} s old (max_age {self.max_age:g} s)"
            elif self.max_memory:
                rss = rss_bytes(worker.pid)
                if rss is not None and rss > self.max_memory * 1024 * 1024:
                    self._due[worker.id] = (f"RSS {rss / 1048576:.1f} MiB "
                                            f"(max_memory {self.max_memory:g} MiB)")
        self._start_due()

    # -- replacing -------------------------------------------------------------------

    @staticmethod
    def _eligible(worker: Worker) -> bool:
        return worker.is_active() and worker.state is pycluster.WorkerState.LISTENING

    def _start_due(self) -> None:
        master = self._master
        assert master is not None
        if master.stopping:
            return
        now = time.monotonic()
        for worker_id, reason in list(self._due.items()):
            worker = master.workers.get(worker_id)
            if worker is None or not worker.is_active():
                del self._due[worker_id]
                continue
            if (worker.slot in self._busy or now < self._not_before.get(worker_id, 0)
                    or not self._eligible(worker)):
                continue
            del self._due[worker_id]
            self._busy.add(worker.slot)
            task = asyncio.ensure_future(self._replace(master, worker, reason))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _replace(self, master: Master, worker: Worker, reason: str) -> None:
        release = master.hold()
        try:
            log.info("recycling worker %d (pid %s): %s", worker.id, worker.pid, reason,
                     extra={"worker_id": worker.id, "pid": worker.pid, "event": "recycle",
                            "reason": reason})
            master.emit("recycle", worker, reason)
            try:
                fresh = master.fork(env=worker.env, slot=worker.slot)
            except Exception as exc:  # EMFILE, EAGAIN, stopping: report it like a failure
                self._failed(worker, reason, f"could not fork a replacement: {exc!r}")
                return
            why = await self._until_listening(fresh)
            if master.stopping:
                return  # the stop disconnects everyone
            if why is not None:
                fresh.disconnect()
                self._failed(worker, reason, why)
                return
            self.recycled += 1
            gone = self._exited(worker)
            worker.disconnect()
            await gone  # one recycle at a time per slot: until the old worker has drained
        finally:
            self._busy.discard(worker.slot)
            release()
            if not master.stopping:
                self._start_due()

    def _failed(self, worker: Worker, reason: str, why: str) -> None:
        self.failed += 1
        log.error("recycle of worker %d (pid %s) failed: %s; it keeps serving, retry in %g s",
                  worker.id, worker.pid, why, self.retry_after,
                  extra={"worker_id": worker.id, "pid": worker.pid, "event": "recycle_failed",
                         "reason": why})
        self._not_before[worker.id] = time.monotonic() + self.retry_after
        if worker.is_active():
            self._due.setdefault(worker.id, reason)

    @staticmethod
    def _exited(worker: Worker) -> asyncio.Future[None]:
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

        def exited(*_: Any) -> None:
            if not done.done():
                done.set_result(None)

        if worker.is_dead():
            exited()
        else:
            worker.once("exit", exited)
        return done

    async def _until_listening(self, worker: Worker) -> str | None:
        """Wait for *worker*'s first ``listening``; return why not, or ``None``."""
        outcome: asyncio.Future[str | None] = asyncio.get_running_loop().create_future()

        def listening(*_: Any) -> None:
            if not outcome.done():
                outcome.set_result(None)

        def died(code: int | None, signal: str | None) -> None:
            if not outcome.done():
                how = f"signal {signal}" if signal else f"exit code {code}"
                outcome.set_result(f"replacement worker {worker.id} died before it "
                                   f"listened ({how})")

        worker.on("listening", listening)
        worker.on("exit", died)
        try:
            return await asyncio.wait_for(outcome, self.ready_timeout)
        except asyncio.TimeoutError:
            return (f"replacement worker {worker.id} did not listen within "
                    f"{self.ready_timeout:g} s")
        finally:
            worker.remove_listener("listening", listening)
            worker.remove_listener("exit", died)
