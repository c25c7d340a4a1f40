"""Figures 1 and 2: IPC throughput and fork latency, pycluster vs Node's cluster.

Each round runs Node's ``node_cluster_ipc.js`` and pycluster's twin ``ipc_pycluster.py``
once each (alternating which goes first), as fresh processes. Each run forks one worker,
reports ``fork_to_online_ms`` and ``fork_to_listening_ms``, then N ping-pong round trips
(``roundtrips_per_s``) and 5N one-way worker->master messages (``oneway_msgs_per_s``).
The table shows the median of the rounds and pycluster / Node.

Node is run with ``-r _loopback.js`` so its worker's ``listen(0)`` binds 127.0.0.1, like
pycluster's worker; that preload is one tiny file.
"""

from __future__ import annotations

import os
import subprocess

from _common import (
    HERE,
    PYTHON,
    SHARED_BENCH,
    Row,
    interleave,
    kill_tree,
    median,
    parse_figures,
    say,
)

NODE_SCRIPT = SHARED_BENCH / "node_cluster_ipc.js"
KEYS = ("roundtrips_per_s", "oneway_msgs_per_s", "fork_to_online_ms", "fork_to_listening_ms")


def _run(cmd: list[str], n: int, extra: dict[str, str] | None = None) -> dict[str, float]:
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            stdin=subprocess.DEVNULL, env={**_env(n), **(extra or {})},
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            kill_tree(proc)
    got = parse_figures(out.decode())
    if proc.returncode != 0 or not all(k in got for k in KEYS):
        msg = f"{cmd!r} exited {proc.returncode}: {out.decode()!r} {err.decode()[-500:]!r}"
        raise RuntimeError(msg)
    return got


def _env(n: int) -> dict[str, str]:
    env = dict(os.environ)
    env["N"] = str(n)
    return env


def run_node(n: int) -> dict[str, float]:
    """One run of Node's script."""
    return _run(["node", "-r", str(HERE / "_loopback.js"), str(NODE_SCRIPT)], n)


def run_pycluster(n: int, *, attach: bool = False) -> dict[str, float]:
    """One run of pycluster's twin (with *attach*, its worker handles messages on an
    attached asyncio loop)."""
    return _run([PYTHON, str(HERE / "ipc_pycluster.py")], n, {"ATTACH": "1"} if attach else {})


def measure(rounds: int, n: int) -> list[Row]:
    """Run both scripts *rounds* times, interleaved; return the rows of figures 1 and 2."""
    say(f"ipc: {rounds} rounds of node_cluster_ipc.js vs ipc_pycluster.py, N={n}")
    got = interleave(rounds, {"pycluster": lambda: run_pycluster(n),
                              "node": lambda: run_node(n)})
    py, node = got["pycluster"], got["node"]
    for key in KEYS:
        say(f"  {key}: pycluster {[round(v) for v in py[key]]}, "
            f"node {[round(v) for v in node[key]]}")
    rt = Row("IPC round trips/s", median(py["roundtrips_per_s"]),
             median(node["roundtrips_per_s"]), ">= 2x Node", None, "/s", "baseline: Node cluster")
    ow = Row("IPC one-way msgs/s (w->m)", median(py["oneway_msgs_per_s"]),
             median(node["oneway_msgs_per_s"]), ">= 1.3x Node", None, "/s",
             "baseline: Node cluster")
    rt.met = (rt.ratio or 0) >= 2.0
    ow.met = (ow.ratio or 0) >= 1.3
    rows = [rt, ow]
    for key, label in (("fork_to_online_ms", "fork -> online"),
                       ("fork_to_listening_ms", "fork -> listening")):
        row = Row(label, median(py[key]), median(node[key]), "<= Node", None, "ms",
                  "baseline: Node cluster")
        row.met = (row.pycluster or 0) <= (row.baseline or 0)
        rows.append(row)
    return rows
