"""Where IPC round trips go: what this machine allows a Python master at all, step by step
up to pycluster's whole path, against Node's cluster in the same run (issue 12, part 2).

Each step is an asyncio master playing N ping-pong round trips with a forked child over a
``socketpair``; the child is a bare blocking echo loop (``recv``, ``sendall``), so only the
master side grows from step to step:

1. ``floor``: the master reads with ``loop.add_reader`` and answers with ``send``: no
   framing, no serialization. Nothing written in Python can beat it.
2. ``+ framing``: the master reads and writes through pycluster's ``Channel`` (its frame
   decoder and write queue).
3. ``+ JSON``: each answer is decoded and a new message encoded (``decode_message``,
   ``encode_message``), as any JSON channel must.

Then the whole path, both sides (``ipc_pycluster.py``: worker events, ``send()``, the IPC
thread; again with the worker's handlers on an attached asyncio loop, as in a served app),
and Node's ``node_cluster_ipc.js``; each figure is the median of ROUNDS,
interleaved, with its ratio to Node's round trips.

    python benchmarks/ipc_floor.py [--rounds 5] [--n 20000]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import Row, interleave, median, missing, say
from core import table
from ipc import run_node, run_pycluster

from pycluster._channel import Channel
from pycluster._protocol import decode_message, encode_message

LIMIT = 1 << 24
STEPS = ("floor", "+ framing", "+ JSON")


def _echo(sock: socket.socket) -> None:
    while data := sock.recv(65536):
        sock.sendall(data)
    os._exit(0)


def _round(step: str, n: int) -> dict[str, float]:
    """Round trips/s of *step* (see the module docstring) against a bare echo child."""
    mine, theirs = socket.socketpair()
    pid = os.fork()
    if pid == 0:
        mine.close()
        _echo(theirs)
    theirs.close()
    try:
        return {"rt": asyncio.run(_ping_pong(step, n, mine))}
    finally:
        mine.close()
        os.waitpid(pid, 0)


async def _ping_pong(step: str, n: int, mine: socket.socket) -> float:
    loop = asyncio.get_running_loop()
    done: asyncio.Future[None] = loop.create_future()
    count = [0]
    first = encode_message({"t": "ping", "i": 0}, "json", LIMIT)
    send: Callable[[bytes], object]
    try:
        if step == "floor":
            mine.setblocking(False)

            def answer() -> None:
                mine.recv(65536)
                count[0] += 1
                if count[0] == n:
                    done.set_result(None)
                else:
                    mine.send(first)

            loop.add_reader(mine.fileno(), answer)
            send = mine.send
        else:
            def on_frames(frames: list[tuple[int, bytes]]) -> None:
                for kind, payload in frames:
                    count[0] += 1
                    if count[0] == n:
                        done.set_result(None)
                    elif step == "+ JSON":
                        got = decode_message(kind, payload, "json")
                        channel.write(encode_message({"t": "ping", "i": got["i"] + 1},
                                                     "json", LIMIT))
                    else:
                        channel.write(first)

            channel = Channel(mine, LIMIT, on_frames, lambda error: None)
            channel.attach(loop)
            send = channel.write
        t0 = time.perf_counter()
        send(first)
        await asyncio.wait_for(done, 60)
        return n / (time.perf_counter() - t0)
    finally:
        if step == "floor":
            loop.remove_reader(mine.fileno())
        else:
            channel.close()


def measure(rounds: int, n: int) -> list[Row]:
    """Every step, Node and pycluster's whole path, interleaved; the rows."""
    runs: dict[str, Callable[[], dict[str, float]]] = {
        step: (lambda step=step: _round(step, n)) for step in STEPS}
    runs["pycluster"] = lambda: {"rt": run_pycluster(n)["roundtrips_per_s"]}
    runs["attached"] = lambda: {"rt": run_pycluster(n, attach=True)["roundtrips_per_s"]}
    runs["node"] = lambda: {"rt": run_node(n)["roundtrips_per_s"]}
    got = {name: values["rt"] for name, values in interleave(rounds, runs).items()}
    node = median(got["node"])
    say(f"  node: {[round(v) for v in got['node']]}")
    rows = []
    labels = {"pycluster": "pycluster's whole path (both sides)",
              "attached": "  the same, worker handlers on its loop"}
    for name in (*STEPS, "pycluster", "attached"):
        say(f"  {name}: {[round(v) for v in got[name]]}")
        label = labels.get(name, f"master {name}, bare echo child")
        row = Row(label, median(got[name]), node, ">= 2x Node", None, "/s",
                  "baseline: Node cluster, same run")
        row.met = (row.ratio or 0) >= 2.0
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--n", type=int, default=20000)
    options = parser.parse_args(argv)
    if missing("node"):
        say("node is missing: nothing to compare with")
        return 1
    say(f"IPC round trips, step by step: {options.rounds} rounds of N={options.n}, "
        f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    print(table(measure(options.rounds, options.n)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
