"""The worker-side halves of the ``watchdog``, ``recycle`` and ``control`` plugins.

Each plugin registers its function here with ``master.worker_setup()``, so every worker
imports this module as it starts: it imports nothing beyond ``pycluster`` (no asyncio, no
logging), and costs a worker next to nothing.

Each half asks the master for its settings with a ``hello`` push, rather than the master
pushing them at ``online``: a push that arrived before the hook opened its channel would
find no channel to take it.
"""

from __future__ import annotations

from typing import Any

import pycluster

__all__ = ["RECYCLE", "STATUS", "WATCHDOG", "recycle", "status", "watchdog"]

#: The plugin channel on which the master tells each worker its heartbeat interval.
WATCHDOG = "watchdog"
#: The plugin channel: the master sends each worker its request limit; a worker that
#: reaches it says so; the master may ask a worker how many requests it served.
RECYCLE = "recycle"
#: The plugin channel on which ``pycluster status`` asks each worker what it served.
STATUS = "status"


def watchdog(worker: pycluster.ThisWorker) -> None:
    """Take the heartbeat interval the master sends (from then on an attached loop beats
    by itself, and ``pycluster.worker.heartbeat()`` sends)."""
    channel = worker.channel(WATCHDOG)

    def configure(data: Any) -> None:
        interval = data.get("interval") if isinstance(data, dict) else None
        worker.heartbeat_interval = interval

    channel.on("message", configure)
    channel.send({"hello": 1})


def recycle(worker: pycluster.ThisWorker) -> None:
    """Take this worker's request limit, report reaching it (``count_request()``
    counts), and answer the master's polls of the count."""
    channel = worker.channel(RECYCLE)

    def configure(data: Any) -> None:
        if isinstance(data, dict) and "max_requests" in data:
            worker.max_requests = data["max_requests"]

    def reached(count: int) -> None:
        if worker.is_connected():
            channel.send({"requests": count})

    channel.on("message", configure)
    channel.handle(lambda data: {"requests": worker.requests})
    worker.on("max_requests", reached)
    channel.send({"hello": 1})


def status(worker: pycluster.ThisWorker) -> None:
    """Answer ``pycluster status``: the requests this worker served (``count_request()``
    counts them; served apps do), or ``None`` while it has counted none."""
    worker.channel(STATUS).handle(lambda data: {"requests": worker.requests or None})
