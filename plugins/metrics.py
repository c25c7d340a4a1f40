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

import atexit
import errno
import logging
import math
import os
import socket
import sys
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, cast

from pycluster import ChannelClosedError, RequestError, SettingsError, WorkerState

if TYPE_CHECKING:
    import asyncio

    from pycluster import Master, ThisWorker, Worker, WorkerChannel

__all__ = ["Family", "Metrics", "merge", "parse_address", "render", "resolve", "retire",
           "snapshot", "worker_side"]

log = logging.getLogger("pycluster.metrics")

#: The plugin channel the master asks workers on.
CHANNEL = "metrics"
#: Types whose samples are summed across workers and kept after a worker exits.
SUMMED = frozenset({"counter", "histogram", "summary"})
#: Gauge modes (prometheus_client's ``multiprocess_mode`` names), by what they mean here.
MODES = {"all": "all", "liveall": "all", "sum": "sum", "livesum": "sum", "max": "max",
         "livemax": "max", "min": "min", "livemin": "min", "mostrecent": "mostrecent",
         "livemostrecent": "mostrecent"}
#: Events of other plugins that the cluster's own series count (any arguments).
RECYCLE_EVENTS = ("recycle", "recycled")
WATCHDOG_EVENTS = ("watchdog_kill",)

TEXT = "text/plain; version=0.0.4; charset=utf-8"
OPENMETRICS = "application/openmetrics-text; version=1.0.0; charset=utf-8"
_TEXT_TYPES = {"counter": "counter", "gauge": "gauge", "histogram": "histogram",
               "summary": "summary", "info": "gauge", "stateset": "gauge",
               "gaugehistogram": "histogram", "unknown": "untyped"}
_MAX_HEAD = 16 * 1024


# -- the worker's side ----------------------------------------------------------------

#: What this worker answered last: its number and each family's keys (so the next
#: answer can leave out keys the master already has).
_sent: dict[str, Any] = {"n": 0, "keys": {}}
_sent_lock = threading.Lock()
_broken: set[int] = set()  # ids of collectors whose failure was logged


def worker_side(worker: ThisWorker) -> None:
    """The worker-side half (``master.worker_setup`` runs it in every worker): answer the
    master's ``metrics`` requests with :func:`snapshot`, and hand over the final values
    when the process exits normally."""
    channel = worker.channel(CHANNEL)
    channel.handle(_answer)
    channel.send({"hello": 1})  # the master asks only workers that said it: they can answer
    atexit.register(_last_words, channel)


def _answer(data: Any) -> dict[str, Any]:
    have = data.get("have") if isinstance(data, dict) else None
    return snapshot(have if isinstance(have, int) else None)


def _last_words(channel: WorkerChannel) -> None:
    if "prometheus_client" not in sys.modules:
        return
    try:
        channel.request({"final": snapshot()}, timeout=1.0)
    except Exception:  # the master is gone or busy: the values of the last scrape stand
        pass


def snapshot(have: int | None = None) -> dict[str, Any]:
    """This process's prometheus_client default registry, as the master merges it.

    ``{"n": N, "families": [[name, type, help, mode, keys, values], …]}``: *keys* are
    the series as exposition text writes them (``name_total{k="v"}``), *values* their
    values (a value that is not finite is its text, ``"+Inf"``). When *have* is the
    number of this worker's previous answer, a family whose keys have not changed since
    has ``None`` for *keys*. No families if the app never imported prometheus_client;
    ``_created`` samples are left out (they do not merge).
    """
    registry = getattr(sys.modules.get("prometheus_client"), "REGISTRY", None)
    families: list[list[Any]] = []
    if registry is not None:  # None too while the app's thread is still importing it
        collectors = getattr(registry, "_collector_to_names", None)
        if isinstance(collectors, dict):
            with getattr(registry, "_lock", threading.Lock()):
                found = list(collectors)
            for collector in found:
                family = _fast_family(collector)
                if family is not None:
                    families.append(family)
                    continue
                try:
                    families.extend(_families(collector.collect()))
                except Exception:  # one broken collector must not cost the others
                    if id(collector) not in _broken:  # said once per collector
                        _broken.add(id(collector))
                        log.exception("collector %r failed; its metrics are left out",
                                      collector)
        else:  # another prometheus_client: its public collect()
            families.extend(_families(registry.collect()))
    with _sent_lock:
        reuse = have is not None and have == _sent["n"]
        before: dict[str, list[str]] = _sent["keys"]
        sent: dict[str, list[str]] = {}
        for family in families:
            keys = sent[family[0]] = family[4]
            if reuse and before.get(family[0]) == keys:
                family[4] = None
            values = family[5]
            if not all(map(math.isfinite, values)):
                family[5] = [v if math.isfinite(v) else _number(v) for v in values]
        number = _sent["n"] = _sent["n"] + 1
        _sent["keys"] = sent
    return {"n": number, "families": families}


def _families(metrics: Any) -> list[list[Any]]:
    """Families from prometheus_client ``Metric`` objects (the general path)."""
    out: list[list[Any]] = []
    for metric in metrics:
        summed = metric.type in SUMMED
        keys: list[str] = []
        values: list[float] = []
        for sample in metric.samples:
            if summed and sample.name.endswith("_created"):
                continue
            keys.append(sample.name + _label_text(sample.labels))
            values.append(float(sample.value))
        out.append([metric.name, metric.type, metric.documentation, "", keys, values])
    return out


def _fast_family(metric: Any) -> list[Any] | None:
    """The family of a prometheus_client Counter, Gauge or Histogram, read from its
    children directly with each child's keys made once; ``None`` for anything else
    (then its public ``collect()`` is used)."""
    kind = getattr(metric, "_type", None)
    if kind not in ("counter", "gauge", "histogram") or not hasattr(metric, "_labelnames"):
        return None
    try:
        name: str = metric._name
        labelnames = tuple(metric._labelnames)
        if labelnames:
            with metric._lock:
                children = list(metric._metrics.items())
        else:
            children = [((), metric)]
        cache: dict[tuple[str, ...], list[str]] = metric.__dict__.setdefault(
            "_pycluster_keys", {})
        keys: list[str] = []
        values: list[float] = []
        for labelvalues, child in children:
            known = cache.get(labelvalues)
            if known is None:
                known = cache[labelvalues] = _child_keys(kind, name, labelnames, labelvalues,
                                                         child)
            keys.extend(known)
            if kind == "histogram":
                total = 0.0
                for bucket in child._buckets:
                    total += bucket.get()
                    values.append(total)
                values.append(total)
                if len(known) > len(child._buckets) + 1:
                    values.append(child._sum.get())
            elif "_child_samples" in child.__dict__:  # a Gauge with set_function()
                values.append(float(next(iter(child._child_samples())).value))
            else:
                values.append(child._value.get())
        mode = getattr(metric, "_multiprocess_mode", "") if kind == "gauge" else ""
        documentation = metric._documentation
    except (AttributeError, TypeError, ValueError, StopIteration):
        return None
    return [name, kind, documentation, mode, keys, values]


def _child_keys(kind: str, name: str, labelnames: tuple[str, ...],
                labelvalues: tuple[str, ...], child: Any) -> list[str]:
    labels = dict(zip(labelnames, labelvalues, strict=False))
    if kind == "counter":
        return [name + "_total" + _label_text(labels)]
    if kind == "gauge":
        return [name + _label_text(labels)]
    keys = [name + "_bucket" + _label_text({**labels, "le": _number(bound)})
            for bound in child._upper_bounds]
    text = _label_text(labels)
    keys.append(name + "_count" + text)
    if child._upper_bounds[0] >= 0:
        keys.append(name + "_sum" + text)
    return keys


def _label_text(labels: dict[str, str]) -> str:
    if not labels:
        return ""
    return "{" + ",".join(f'{k}="{_escape(v)}"' for k, v in labels.items()) + "}"


def _escape(value: str) -> str:
    if "\\" in value or '"' in value or "\n" in value:
        return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return value


def _number(value: float) -> str:
    """A number as both formats write it (Go's style for large ``le`` bounds)."""
    if value != value:
        return "NaN"
    if value == math.inf:
        return "+Inf"
    if value == -math.inf:
        return "-Inf"
    text = repr(float(value))
    dot = text.find(".")
    if value > 0 and dot > 6 and "e" not in text:  # 1e+07, as Go and prometheus_client write it
        mantissa = f"{text[0]}.{text[1:dot]}{text[dot + 1:]}".rstrip("0.")
        return f"{mantissa}e+{dot - 1:02d}"
    return text


# -- merging --------------------------------------------------------------------------


class Family:
    """One merged metric family: its type, help, gauge mode and samples in order."""

    __slots__ = ("help", "kind", "mode", "samples")

    def __init__(self, kind: str, help: str, mode: str = "") -> None:  # noqa: A002
        self.kind = kind
        self.help = help
        self.mode = MODES.get(mode, "all")
        #: series (``name{labels}``) → value, in the order first seen.
        self.samples: dict[str, float] = {}


def resolve(previous: list[list[Any]] | None, answer: Any) -> list[list[Any]]:
    """A worker's families with every key filled in: keys it left out (``None``) are
    those of the same family in *previous*, its last answer the master kept; values that
    came as text are numbers again.

    Raises:
        ValueError: the answer is malformed, or leaves out keys the master does not have.
    """
    if not isinstance(answer, dict) or not isinstance(answer.get("families"), list):
        msg = f"not a metrics answer: {str(answer)[:80]!r}"
        raise TypeError(msg)
    known = {f[0]: f[4] for f in previous or ()}
    out: list[list[Any]] = []
    for name, kind, help_text, mode, keys, values in answer["families"]:
        if keys is None:
            keys = known.get(name)
        if not isinstance(keys, list) or not isinstance(values, list) or (
                len(keys) != len(values)):
            msg = f"family {name!r}: its keys and values do not match"
            raise ValueError(msg)
        if str in map(type, values):
            values = [float(v) if isinstance(v, str) else v for v in values]
        out.append([name, kind, help_text, mode or "", keys, values])
    return out


def merge(retired: dict[str, Family], answers: list[tuple[int, list[list[Any]]]],
          conflict: Callable[[str, str, str, int], None]) -> dict[str, Family]:
    """Merge workers' families (``(worker id, families)`` from :func:`resolve`, oldest
    worker first) over the totals of exited workers; *conflict(name, kind, other_kind,
    worker_id)* is told of a family whose type differs from the first one seen (that
    worker's family is left out)."""
    by_name: dict[str, list[tuple[int, list[Any]]]] = {}
    for worker_id, families in answers:
        for entry in families:
            by_name.setdefault(entry[0], []).append((worker_id, entry))
    merged: dict[str, Family] = {}
    for name, kept in retired.items():
        merged[name] = Family(kept.kind, kept.help)
    for name, entries in by_name.items():
        first = entries[0][1]
        kind = merged[name].kind if name in merged else first[1]
        same: list[tuple[int, list[Any]]] = []
        for worker_id, entry in entries:
            if entry[1] != kind:
                conflict(name, kind, entry[1], worker_id)
            else:
                same.append((worker_id, entry))
        if not same:
            continue
        family = merged.get(name)
        if family is None:
            family = merged[name] = Family(kind, same[0][1][2], same[0][1][3])
        how = "sum" if kind in SUMMED else family.mode
        family.samples = _combine(how, same)
    for name, kept in retired.items():
        samples = merged[name].samples
        for key, value in kept.samples.items():
            samples[key] = samples.get(key, 0.0) + value
    return merged


_FOLD: dict[str, Callable[[Any], float]] = {"sum": math.fsum, "max": max, "min": min}


def _combine(how: str, entries: list[tuple[int, list[Any]]]) -> dict[str, float]:
    """One family's samples across workers, by *how*: ``all`` (each worker's own, with a
    ``worker`` label), ``sum``, ``max``, ``min`` or ``mostrecent`` (the newest worker's)."""
    if how == "all":
        samples: dict[str, float] = {}
        for worker_id, family in entries:
            label = f'worker="{worker_id}"'
            for key, value in zip(family[4], family[5], strict=False):
                samples[_with_label(key, label)] = value
        return samples
    if how == "mostrecent":
        samples = {}
        for _, family in entries:
            samples.update(zip(family[4], family[5], strict=False))
        return samples
    fold = _FOLD.get(how, math.fsum)
    keys = entries[0][1][4]
    if all(f[4] is keys or f[4] == keys for _, f in entries):  # the usual case: C loops
        columns = zip(*(f[5] for _, f in entries), strict=False)
        return dict(zip(keys, map(fold, columns), strict=False))
    gathered: dict[str, list[float]] = {}
    for _, family in entries:
        for key, value in zip(family[4], family[5], strict=False):
            gathered.setdefault(key, []).append(value)
    return {key: fold(values) for key, values in gathered.items()}


def _with_label(key: str, label: str) -> str:
    """*key* (``name`` or ``name{…}``) with *label* added, unless it has a ``worker``."""
    brace = key.find("{")
    if brace < 0:
        return f"{key}{{{label}}}"
    if '{worker="' in key or ',worker="' in key:
        return key
    return f"{key[:-1]},{label}}}"


def retire(retired: dict[str, Family], families: list[list[Any]]) -> None:
    """Add the counters, histograms and summaries of an exited worker's last *families*
    to *retired*, the totals kept for workers that are gone."""
    for name, kind, help_text, _mode, keys, values in families:
        if kind not in SUMMED:
            continue
        family = retired.get(name)
        if family is None:
            family = retired[name] = Family(kind, help_text)
        elif family.kind != kind:
            continue
        samples = family.samples
        for key, value in zip(keys, values, strict=False):
            samples[key] = samples.get(key, 0.0) + value


def render(families: dict[str, Family], openmetrics: bool) -> str:
    """The exposition text of *families*: OpenMetrics 1.0, or Prometheus text 0.0.4."""
    out: list[str] = []
    for name, family in families.items():
        kind = family.kind
        if openmetrics:
            doc = family.help.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')
            out.append(f"# HELP {name} {doc}\n# TYPE {name} {kind}\n")
        else:
            shown = name + "_total" if kind == "counter" else (
                name + "_info" if kind == "info" else name)
            doc = family.help.replace("\\", "\\\\").replace("\n", "\\n")
            out.append(f"# HELP {shown} {doc}\n# TYPE {shown} {_TEXT_TYPES.get(kind, 'untyped')}\n")
        for key, value in family.samples.items():
            if math.isfinite(value):
                out.append(f"{key} {value!r}\n")
            else:
                out.append(f"{key} {_number(value)}\n")
    if openmetrics:
        out.append("# EOF\n")
    return "".join(out)


def parse_address(address: Any) -> tuple[str, int]:
    """``"HOST:PORT"``, ``"[IPv6]:PORT"`` or ``":PORT"`` (all interfaces) → ``(host, port)``.

    Raises:
        SettingsError: anything else, with what was given.
    """
    text = address if isinstance(address, str) else ""
    host, sep, port = text.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not sep or not port.isdigit() or int(port) > 65535 or ("[" in host or "]" in host):
        msg = f"--metrics {address!r}: expected HOST:PORT, e.g. 127.0.0.1:9100 or :9100"
        raise SettingsError(msg)
    if ":" in host and not text.startswith("["):
        msg = f"--metrics {address!r}: put an IPv6 address in brackets, e.g. [::1]:9100"
        raise SettingsError(msg)
    return host or "0.0.0.0", int(port)


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
        self._connections: set[_Http] = set()
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
        master.worker_setup("pycluster.plugins.metrics:worker_side")
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
            lambda: cast("asyncio.BaseProtocol", _Http(self)), sock=sock)
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


class _Http:
    """A tiny HTTP/1.1 server connection: GET or HEAD of ``/metrics``, ``/healthz``,
    ``/readyz``; keep-alive; one request at a time."""

    def __init__(self, plugin: Metrics) -> None:
        self._plugin = plugin
        self._transport: asyncio.Transport | None = None
        self._buffer = b""
        self._busy = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]
        self._plugin._connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self._plugin._connections.discard(self)
        self._transport = None

    def pause_writing(self) -> None:
        pass

    def resume_writing(self) -> None:
        pass

    def eof_received(self) -> bool:
        return False

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        if len(self._buffer) > 16 * _MAX_HEAD and self._transport is not None:
            self._transport.close()  # a client that sends without reading the answers
            return
        if not self._busy:
            self._next()

    def _next(self) -> None:
        head, found, rest = self._buffer.partition(b"\r\n\r\n")
        if not found:
            if len(self._buffer) > _MAX_HEAD:
                self._answer(431, "text/plain", b"request head too large\n", False, False)
            return
        self._buffer = rest
        lines = head.decode("latin-1").split("\r\n")
        parts = lines[0].split(" ")
        if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
            self._answer(400, "text/plain", b"bad request\n", False, False)
            return
        method, target, version = parts
        headers = {}
        for line in lines[1:]:
            key, _, value = line.partition(":")
            headers[key.strip().lower()] = value.strip()
        connection = headers.get("connection", "").lower()
        keep = connection != "close" if version == "HTTP/1.1" else connection == "keep-alive"
        if headers.get("content-length", "0") not in ("", "0") or "transfer-encoding" in headers:
            self._answer(400, "text/plain", b"no request bodies here\n", False, False)
            return
        if method not in ("GET", "HEAD"):
            self._answer(405, "text/plain", b"GET or HEAD only\n", keep, False, "Allow: GET, HEAD")
            return
        head_only = method == "HEAD"
        path = target.split("?", 1)[0]
        if path == "/metrics":
            openmetrics = "application/openmetrics-text" in headers.get("accept", "")
            self._busy = True
            import asyncio

            task = asyncio.ensure_future(self._plugin.scrape(openmetrics))
            task.add_done_callback(lambda t: self._scraped(t, openmetrics, keep, head_only))
        elif path == "/healthz":
            self._answer(200, "text/plain", b"ok\n", keep, head_only)
        elif path == "/readyz":
            ready, why = self._plugin.ready()
            self._answer(200 if ready else 503, "text/plain", why.encode() + b"\n", keep,
                         head_only)
        else:
            self._answer(404, "text/plain", b"not found: try /metrics, /healthz, /readyz\n",
                         keep, head_only)

    def _scraped(self, task: asyncio.Future[str], openmetrics: bool, keep: bool,
                 head_only: bool) -> None:
        self._busy = False
        if task.cancelled():
            return
        error = task.exception()
        if error is not None:
            log.error("a scrape failed: %r", error)
            self._answer(500, "text/plain", f"scrape failed: {error!r}\n".encode(), keep,
                         head_only)
            return
        self._answer(200, OPENMETRICS if openmetrics else TEXT, task.result().encode(),
                     keep, head_only)

    def _answer(self, status: int, ctype: str, body: bytes, keep: bool, head_only: bool,
                extra: str = "") -> None:
        transport = self._transport
        if transport is None:
            return
        reason = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
                  431: "Request Header Fields Too Large", 500: "Internal Server Error",
                  503: "Service Unavailable"}[status]
        head = (f"HTTP/1.1 {status} {reason}\r\nContent-Type: {ctype}\r\n"
                f"Content-Length: {len(body)}\r\n{extra + chr(13) + chr(10) if extra else ''}"
                f"{'' if keep else 'Connection: close' + chr(13) + chr(10)}\r\n")
        transport.write(head.encode() + (b"" if head_only else body))
        if not keep:
            transport.close()
        elif self._buffer and not self._busy:
            self._next()
