"""The worker's side of the ``metrics`` plugin: it answers the master's scrapes with its
prometheus_client default registry, read without rendering text (installed in every
worker through ``master.worker_setup``)."""

from __future__ import annotations

import atexit
import logging
import math
import sys
import threading
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pycluster import ThisWorker, WorkerChannel

__all__ = ["CHANNEL", "SUMMED", "number", "snapshot", "worker_side"]

log = logging.getLogger("pycluster.metrics")

#: The plugin channel the master asks workers on.
CHANNEL = "metrics"
#: Types whose samples are summed across workers and kept after a worker exits.
SUMMED = frozenset({"counter", "histogram", "summary"})


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
                family[5] = [v if math.isfinite(v) else number(v) for v in values]
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
    keys = [name + "_bucket" + _label_text({**labels, "le": number(bound)})
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


def number(value: float) -> str:
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


