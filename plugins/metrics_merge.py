"""Merging the workers' samples into one exposition: counters and histograms summed (the
totals of exited workers kept), gauges per worker or by ``multiprocess_mode``."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from pycluster import SettingsError

from .metrics_worker import SUMMED, number

__all__ = ["MODES", "Family", "merge", "parse_address", "render", "resolve", "retire"]

#: Gauge modes (prometheus_client's ``multiprocess_mode`` names), by what they mean here.
MODES = {"all": "all", "liveall": "all", "sum": "sum", "livesum": "sum", "max": "max",
         "livemax": "max", "min": "min", "livemin": "min", "mostrecent": "mostrecent",
         "livemostrecent": "mostrecent"}
_TEXT_TYPES = {"counter": "counter", "gauge": "gauge", "histogram": "histogram",
               "summary": "summary", "info": "gauge", "stateset": "gauge",
               "gaugehistogram": "histogram", "unknown": "untyped"}


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
                out.append(f"{key} {number(value)}\n")
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


