"""``metrics``: Prometheus ``/metrics``, ``/healthz`` and ``/readyz``, served by the master.

The master answers on its own address (``pycluster run --metrics HOST:PORT``, or
``master.use("metrics", address="HOST:PORT")``), on its own asyncio loop:

- ``/metrics``: the cluster's own series (``pycluster_workers`` by state, restarts by
  reason, reloads by result, recycles, watchdog kills, each worker's RSS and CPU seconds,
  user messages, master uptime) and every worker's prometheus_client default ``REGISTRY``,
  collected at scrape time over the plugin channel ``metrics`` and merged: no directory,
  no files. Prometheus text format, or OpenMetrics when the ``Accept`` header asks for it.
- ``/healthz``: 200 while the master's loop answers.
- ``/readyz``: 200 while at least one worker listens; 503 from the moment a stop begins.

Merging. Counters, histograms and summaries are summed across workers, and a worker's
last values are kept when it exits (its final values, when it exits by returning from
its main code), so a merged counter never goes down when a worker dies or is reloaded.
A worker that does not answer in time counts at its last known values. Gauges (and info,
stateset, untyped) are per worker, with a ``worker`` label (the worker id), unless the
app declares a mode with prometheus_client's vocabulary, ``Gauge(...,
multiprocess_mode="sum")``: ``sum``, ``max``, ``min``, ``mostrecent`` (the newest
worker's value) or ``all`` (per worker, the default); the ``live`` forms mean the same
here, since a gauge only ever shows live workers. A worker that does not answer in time
leaves its gauges out of that scrape and counts in ``pycluster_metrics_missed_answers_total``.
"""

from __future__ import annotations

import errno
import logging
import math
import os
import socket
import time
from typing import TYPE_CHECKING, Any, cast

from pycluster import ChannelClosedError, RequestError, SettingsError, WorkerState

from .metrics_http import Http
from .metrics_merge import Family, merge, parse_address, render, resolve, retire
from .metrics_worker import CHANNEL, snapshot, worker_side

if TYPE_CHECKING:
    import asyncio

    from pycluster import Master, Worker

__all__ = ["Family", "Metrics", "merge", "parse_address", "render", "resolve", "retire",
           "snapshot", "worker_side"]

log = logging.getLogger("pycluster.metrics")

#: Events of other plugins that the cluster's own series count (any arguments).
RECYCLE_EVENTS = ("recycle", "recycled")
WATCHDOG_EVENTS = ("watchdog_kill",)



# -- the master's side ------------------------------------------------------------------


class Metrics:
    """Serve ``/metrics``, ``/healthz`` and ``/readyz`` from the master (see the module
    docstring for what each answers and how workers' metrics merge).

    The address is bound when the plugin is installed, before any worker forks, so a
    port in use fails there. The server runs on the master's loop from ``setup`` until
    the loop ends. :attr:`address` is the real ``(host, port)`` (also for port 0).

    Args:
        address: ``"HOST:PORT"`` (``":PORT"``: every interface).
        timeout: seconds a scrape waits for each worker's answer.

    Raises:
        SettingsError: a malformed *address* or *timeout*.
        OSError: (from ``master.use``) the address cannot be bound; the message names it.
    """

    name = "metrics"

    def __init__(self, address: str | None = None, *, timeout: float = 3.0) -> None:
        if address is None:
            msg = "the metrics plugin needs an address: master.use('metrics', address='HOST:PORT')"
            raise SettingsError(msg)
        self.host, self.port = parse_address(address)
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not (
                math.isfinite(timeout) and timeout > 0):
            msg = f"metrics timeout={timeout!r} must be a number of seconds > 0"
            raise SettingsError(msg)
        self.timeout = float(timeout)
        self.address: tuple[str, int] | None = None
        self._master: Master | None = None
        self._sock: socket.socket | None = None
        self._server: asyncio.AbstractServer | None = None
        self._task: asyncio.Task[None] | None = None  # held: a task nobody holds is collected
        self._connections: set[Http] = set()
        self._started = time.monotonic()
        #: live worker id → (number of its last answer, its families)
        self._last: dict[int, tuple[int, list[list[Any]]]] = {}
        self._retired: dict[str, Family] = {}  # totals of exited workers
        self._collecting: asyncio.Future[None] | None = None
        self._conflicts: set[tuple[str, str, str]] = set()
        self._counts: dict[str, dict[str, float]] = {
            "restarts": {"signal": 0.0, "exit": 0.0, "watchdog": 0.0},
            "reloads": {"ok": 0.0, "failed": 0.0}, "recycles": {},
            "watchdog": {"": 0.0}, "give_ups": {"": 0.0}, "messages": {"": 0.0},
            "missed": {"timeout": 0.0, "gone": 0.0, "error": 0.0}, "conflicts": {"": 0.0},
        }
        self._hello: set[int] = set()  # workers whose metrics side is installed
        self._died: dict[int, str] = {}  # slot → why its last worker died unexpectedly
        self._watchdog_killed: set[int] = set()

    # -- installing ----------------------------------------------------------------

    def install(self, master: Master) -> None:
        """Bind the address, have workers answer on the ``metrics`` channel, and watch the
        lifecycle for the cluster's own series.

        Raises:
            OSError: the address cannot be bound (in use, not this host's, no permission).
        """
        self._sock = self._bind()
        self._master = master
        master.worker_setup("pycluster.plugins.metrics_worker:worker_side")
        master.channel(CHANNEL).handle(self._on_final)
        master.channel(CHANNEL).on("message", self._on_hello)
        master.on("setup", self._on_setup)
        master.on("fork", self._on_fork)
        master.on("exit", self._on_exit)
        master.on("message", self._on_message)
        master.on("reloaded", lambda *args: self._count("reloads", "ok"))
        master.on("reload_failed", lambda *args: self._count("reloads", "failed"))
        master.on("respawn_give_up", lambda *args: self._count("give_ups", ""))
        for event in RECYCLE_EVENTS:
            master.on(event, self._on_recycle)
        for event in WATCHDOG_EVENTS:
            master.on(event, self._on_watchdog)
        host, port = self.address or (self.host, self.port)
        shown = f"[{host}]" if ":" in host else host
        log.info("serving http://%s:%d/metrics, /healthz and /readyz", shown, port)

    def uninstall(self, master: Master) -> None:
        """Stop serving and close the address."""
        self._close()

    def _bind(self) -> socket.socket:
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((self.host, self.port))
            sock.listen(128)
            sock.setblocking(False)
        except OSError as exc:
            sock.close()
            shown = f"[{self.host}]" if ":" in self.host else self.host
            reason = exc.strerror or str(exc)
            raise OSError(exc.errno or errno.EINVAL,
                          f"cannot serve metrics on {shown}:{self.port}: {reason}") from None
        self.address = sock.getsockname()[:2]
        return sock

    def _on_setup(self, settings: Any) -> None:
        import asyncio

        self._task = asyncio.get_running_loop().create_task(self._serve())

    async def _serve(self) -> None:
        import asyncio

        sock = self._sock
        if sock is None:
            return
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: cast("asyncio.BaseProtocol", Http(self)), sock=sock)
        try:
            await loop.create_future()  # until the loop ends (asyncio.run cancels this)
        finally:
            self._close()

    def _close(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.close()
        for connection in list(self._connections):
            connection.close()
        sock, self._sock = self._sock, None
        if sock is not None:
            sock.close()

    # -- the lifecycle ---------------------------------------------------------------

    def _count(self, series: str, label: str, by: float = 1.0) -> None:
        counts = self._counts[series]
        counts[label] = counts.get(label, 0.0) + by

    def _on_fork(self, worker: Worker) -> None:
        why = self._died.pop(worker.slot, None)
        if why is not None:
            self._count("restarts", why)

    def _on_exit(self, worker: Worker, code: int | None, signal: str | None) -> None:
        self._hello.discard(worker.id)
        kept = self._last.pop(worker.id, None)
        if kept is not None:
            retire(self._retired, kept[1])
        master = self._master
        killed = worker.id in self._watchdog_killed
        self._watchdog_killed.discard(worker.id)
        if worker.exited_after_disconnect or (master is not None and master.stopping):
            return
        if killed:
            self._died[worker.slot] = "watchdog"
        elif signal is not None:
            self._died[worker.slot] = "signal"
        else:
            self._died[worker.slot] = "exit"

    def _on_message(self, worker: Worker, message: Any) -> None:
        self._count("messages", "")

    def _on_recycle(self, *args: Any) -> None:
        reason = next((a for a in args if isinstance(a, str)), "other")
        self._count("recycles", reason)

    def _on_watchdog(self, *args: Any) -> None:
        self._count("watchdog", "")
        for arg in args:
            if hasattr(arg, "slot") and hasattr(arg, "id"):
                self._watchdog_killed.add(arg.id)

    def _on_hello(self, worker: Worker, data: Any) -> None:
        if not worker.is_dead():
            self._hello.add(worker.id)

    def _on_final(self, worker: Worker, data: Any) -> bool:
        """A worker's last values, sent as it exits: they replace its last snapshot."""
        if isinstance(data, dict) and "final" in data and not worker.is_dead():
            try:
                self._last[worker.id] = (-1, resolve(None, data["final"]))
            except (ValueError, TypeError) as exc:
                log.warning("worker %d sent unreadable final metrics: %s", worker.id, exc)
        return True

    # -- answering -------------------------------------------------------------------

    def ready(self) -> tuple[bool, str]:
        """Whether the cluster is ready for traffic, and why (the ``/readyz`` body)."""
        master = self._master
        if master is None:
            return False, "not installed"
        if master.stopping:
            return False, "stopping"
        listening = sum(1 for w in master.workers.values()
                        if w.state is WorkerState.LISTENING and w.is_active())
        if not listening:
            return False, "no worker listens"
        return True, f"{listening} worker(s) listening"

    async def scrape(self, openmetrics: bool = False) -> str:
        """Collect every worker's metrics (concurrent scrapes share one collection) and
        return the merged exposition text."""
        import asyncio

        if self._collecting is None:
            self._collecting = asyncio.ensure_future(self._collect())
            self._collecting.add_done_callback(lambda _: setattr(self, "_collecting", None))
        await asyncio.shield(self._collecting)
        master = self._master
        assert master is not None
        answers = [(wid, kept[1]) for wid, kept in sorted(self._last.items())
                   if wid in master.workers]
        families = self._own_series()
        families.update(merge(self._retired, answers, self._conflict))
        return render(families, openmetrics)

    async def _collect(self) -> None:
        import asyncio

        master = self._master
        assert master is not None
        channel = master.channel(CHANNEL)
        asked: dict[asyncio.Future[Any], Worker] = {}
        for worker in list(master.workers.values()):
            if worker.id not in self._hello or not worker.is_connected():
                continue  # not ready to answer yet, or gone
            kept = self._last.get(worker.id)
            data = {"have": kept[0]} if kept else None
            try:
                asked[channel.request(worker, data, timeout=self.timeout)] = worker
            except ChannelClosedError:
                self._count("missed", "gone")
        if not asked:
            return
        done, _ = await asyncio.wait(asked, timeout=self.timeout + 1.0)
        for future, worker in asked.items():
            if future not in done:
                future.cancel()
                self._count("missed", "timeout")
                continue
            error = future.exception()
            if error is None:
                if worker.is_dead():  # its exit already kept the last values
                    continue
                kept = self._last.get(worker.id)
                answer = future.result()
                try:
                    families = resolve(kept[1] if kept else None, answer)
                except (ValueError, TypeError) as exc:
                    self._count("missed", "error")
                    log.warning("worker %d sent unreadable metrics: %s", worker.id, exc)
                    self._last.pop(worker.id, None)  # the next answer is whole again
                    continue
                self._last[worker.id] = (answer["n"], families)
            elif isinstance(error, RequestError) and error.timed_out:
                self._count("missed", "timeout")
            elif worker.is_dead() or not worker.is_connected():
                self._count("missed", "gone")
            else:
                self._count("missed", "error")

    def _conflict(self, name: str, kind: str, other: str, worker_id: int) -> None:
        key = (name, kind, other)
        if key not in self._conflicts:
            self._conflicts.add(key)
            self._count("conflicts", "")
            log.warning("worker %d registers %r as a %s, another worker as a %s; "
                        "keeping the %s", worker_id, name, other, kind, kind)

    def _own_series(self) -> dict[str, Family]:
        from pycluster import _procfs

        master = self._master
        assert master is not None
        families: dict[str, Family] = {}

        def family(name: str, kind: str, help_text: str) -> dict[str, float]:
            families[name] = Family(kind, help_text)
            return families[name].samples

        def counter(name: str, help_text: str, label: str, counts: dict[str, float]) -> None:
            samples = family(name, "counter", help_text)
            for value, count in counts.items():
                samples[f'{name}_total{{{label}="{value}"}}' if label else f"{name}_total"] = count

        states = family("pycluster_workers", "gauge", "Workers of this cluster, by state.")
        by_state = dict.fromkeys(("none", "online", "listening", "disconnecting",
                                  "disconnected"), 0.0)
        for worker in master.workers.values():
            state = worker.state.value
            if worker.exited_after_disconnect and worker.is_connected():
                state = "disconnecting"
            if state in by_state:
                by_state[state] += 1
        for state, count in by_state.items():
            states[f'pycluster_workers{{state="{state}"}}'] = count
        counter("pycluster_worker_restarts", "Workers replaced after an unexpected exit, "
                "by why the old one died (signal, exit, watchdog).", "reason",
                self._counts["restarts"])
        counter("pycluster_reloads", "Rolling reloads, by result.", "result",
                self._counts["reloads"])
        counter("pycluster_recycles", "Workers recycled (replaced on purpose), by reason.",
                "reason", self._counts["recycles"])
        counter("pycluster_watchdog_kills", "Hung workers killed by the watchdog.", "",
                self._counts["watchdog"])
        counter("pycluster_respawn_give_ups", "Times respawn gave up and stopped the cluster.",
                "", self._counts["give_ups"])
        counter("pycluster_messages", "User messages workers sent to the master.", "",
                self._counts["messages"])
        counter("pycluster_metrics_missed_answers", "Workers that did not answer a scrape "
                "(timeout, gone, error).", "reason", self._counts["missed"])
        counter("pycluster_metrics_conflicts", "Metric names registered with different "
                "types by different workers (each reported once).", "",
                self._counts["conflicts"])
        rss = family("pycluster_worker_resident_memory_bytes", "gauge",
                     "Resident memory of each worker.")
        cpu = family("pycluster_worker_cpu_seconds", "counter",
                     "User and system CPU seconds of each worker.")
        for worker in master.workers.values():
            pid = worker.pid
            if pid is None or worker.is_dead():
                continue
            label = f'{{worker="{worker.id}"}}'
            kib, seconds = _procfs.rss_kib(pid), _procfs.cpu_seconds(pid)
            if kib is not None:
                rss[f"pycluster_worker_resident_memory_bytes{label}"] = kib * 1024.0
            if seconds is not None:
                cpu[f"pycluster_worker_cpu_seconds_total{label}"] = seconds
        me = os.getpid()
        kib, seconds = _procfs.rss_kib(me), _procfs.cpu_seconds(me)
        family("pycluster_master_resident_memory_bytes", "gauge", "Resident memory of the "
               "master.")["pycluster_master_resident_memory_bytes"] = (kib or 0) * 1024.0
        family("pycluster_master_cpu_seconds", "counter", "User and system CPU seconds of "
               "the master.")["pycluster_master_cpu_seconds_total"] = seconds or 0.0
        family("pycluster_master_uptime_seconds", "gauge", "Seconds since the metrics plugin "
               "was made (the master's start).")["pycluster_master_uptime_seconds"] = (
            time.monotonic() - self._started)
        return families
