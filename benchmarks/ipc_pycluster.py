"""pycluster's twin of Node's ``node_cluster_ipc.js``: fork latency and IPC throughput.

Primary: forks one worker and times, from the ``fork()`` call, its ``online`` and
``listening`` events; then plays N ping-pong round trips over the IPC channel, then asks
the worker to send 5N one-way messages ``{"t": "b", "k": k}`` and times them from the
first to the last. Prints the same four ``name value`` lines as the Node script.

Worker: ``import pycluster``, ``pycluster.worker.listen(0, "127.0.0.1")``, then blocks;
its message handler (on the ``pycluster-ipc`` thread) answers pings and runs the blast.
Env N sets the count (default 20000), as in the Node script. With ATTACH=1 the worker runs
an asyncio loop and calls ``attach_loop()``: its handler runs on that loop, as in an app.
"""

from __future__ import annotations

import os
import threading
import time
from typing import Any

import pycluster

N = int(os.environ.get("N", "20000"))


def primary() -> None:
    """Fork one worker, time it, ping-pong with it, then count its blast; print figures."""
    master = pycluster.Master()
    t0 = time.perf_counter()
    worker = master.fork()
    marks: dict[str, float] = {}
    state: dict[str, Any] = {"i": 0, "got": 0}

    def ms() -> float:
        return (time.perf_counter() - t0) * 1e3

    def on_online() -> None:
        marks["online"] = ms()

    def on_listening(address: Any) -> None:
        marks["listening"] = ms()
        print(f"fork_to_online_ms {marks['online']:.1f}")
        print(f"fork_to_listening_ms {marks['listening']:.1f}", flush=True)
        state["start"] = time.perf_counter()
        worker.send({"t": "ping", "i": 0})

    def on_message(m: Any) -> None:
        t = m["t"]
        if t == "pong":
            state["i"] += 1
            if state["i"] < N:
                worker.send({"t": "ping", "i": state["i"]})
                return
            sec = time.perf_counter() - state["start"]
            print(f"roundtrips_per_s {N / sec:.0f}", flush=True)
            worker.send({"t": "blast", "n": N * 5})
        elif t == "b":
            if state["got"] == 0:
                state["blast"] = time.perf_counter()
            state["got"] += 1
            if state["got"] == N * 5:
                sec = time.perf_counter() - state["blast"]
                print(f"oneway_msgs_per_s {N * 5 / sec:.0f}", flush=True)
                worker.kill()

    worker.on("online", on_online)
    worker.on("listening", on_listening)
    worker.on("message", on_message)
    master.run()


def child(me: Any) -> None:
    """Answer pings and run the blast on the IPC thread (keeping the main thread blocked),
    or on an attached loop."""

    def on_message(m: Any) -> None:
        if m["t"] == "ping":
            me.send({"t": "pong", "i": m["i"]})
        elif m["t"] == "blast":
            send = me.send
            for k in range(m["n"]):
                send({"t": "b", "k": k})

    me.on("message", on_message)
    if os.environ.get("ATTACH") == "1":  # handlers on the app's loop, as in a served app
        import asyncio

        async def serve() -> None:
            me.attach_loop()
            me.listen(0, "127.0.0.1")
            await asyncio.Event().wait()

        asyncio.run(serve())
    me.listen(0, "127.0.0.1")
    threading.Event().wait()


if __name__ == "__main__":
    if pycluster.is_primary:
        primary()
    else:
        child(pycluster.worker)
