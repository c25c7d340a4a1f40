"""Figure 3: hello-world requests/s with 2 workers, pycluster vs no pycluster vs Node.

Three servers, each with 2 workers on 127.0.0.1:
- ``pycluster``: ``examples/hello.py`` (WORKERS=2), run through ``_loopback.py`` so its
  workers bind 127.0.0.1 instead of 0.0.0.0 (nothing else changes);
- ``plain``: ``hello_app.py``, the identical asyncio Protocol in 2 forked processes that
  share one socket the plain way (the "same server without pycluster");
- ``node``: ``node_cluster_hello.js`` (WORKERS=2), with the ``_loopback.js`` preload.

Each round starts each server in its own session (rotating the order), waits for the
port, warms up with a 1 s wrk run, then measures ``wrk -t1 -c64 -d5s``, and kills the
server's process tree. Halfway through the measured run it samples, per worker process,
how many of wrk's connections it holds; after the run, each worker's CPU seconds. That
shows whether the two workers share the load.
"""

from __future__ import annotations

import os
import re
import resource
import subprocess
import threading
import time
from collections.abc import Callable

from _common import (
    HERE,
    PYTHON,
    ROOT,
    SHARED_BENCH,
    Row,
    busy_seconds,
    descendants,
    free_port,
    interleave,
    median,
    running,
    say,
    wait_port,
)

from pycluster._procfs import TCP_ESTABLISHED, socket_inodes, tcp_sockets
from pycluster._procfs import cpu_seconds as procfs_cpu_seconds

WRK = ["wrk", "-t1", "-c64"]


#: The command line of each server; PORT and WORKERS=2 go in its environment.
SERVERS: dict[str, list[str]] = {
    "pycluster": [PYTHON, str(HERE / "_loopback.py"), str(ROOT / "examples" / "hello.py")],
    "plain": [PYTHON, str(HERE / "hello_app.py")],
    "node": ["node", "-r", str(HERE / "_loopback.js"), str(SHARED_BENCH / "node_cluster_hello.js")],
}


def connections_per_pid(pids: list[int], port: int) -> dict[int, int]:
    """How many established connections to *port* each of *pids* holds an fd of."""
    inodes = {s.inode for s in tcp_sockets(port) if s.state == TCP_ESTABLISHED}
    return {pid: len(socket_inodes(pid) & inodes) for pid in pids}


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds *pid* has used (0 once it is gone)."""
    return procfs_cpu_seconds(pid) or 0.0


def wrk(port: int, seconds: int) -> float:
    """Requests/s from one wrk run against 127.0.0.1:*port*."""
    out = subprocess.run([*WRK, f"-d{seconds}s", f"http://127.0.0.1:{port}/"],
                         capture_output=True, text=True, timeout=seconds + 30, check=True).stdout
    match = re.search(r"Requests/sec:\s+([\d.]+)", out)
    if not match:
        msg = f"no Requests/sec in wrk output: {out!r}"
        raise RuntimeError(msg)
    return float(match.group(1))


def one_run(name: str, cmd: list[str], seconds: int, spread: dict[str, list[str]]
            ) -> dict[str, float]:
    """Start one server, warm it up, measure it; note how its workers shared the load."""
    port = free_port()
    env = {"PORT": str(port), "WORKERS": "2"}
    with running(cmd, env, stdout=subprocess.DEVNULL) as proc:
        wait_port(port, proc)
        time.sleep(0.3)
        wrk(port, 1)
        pids = descendants(proc.pid)
        sample: dict[int, int] = {}
        timer = threading.Timer(seconds / 2, lambda: sample.update(connections_per_pid(pids, port)))
        ours = [proc.pid, *pids]
        cpu0 = {p: cpu_seconds(p) for p in ours}
        busy0, kids0 = busy_seconds(), _children_cpu()
        timer.start()
        try:
            rps = wrk(port, seconds)
        finally:
            timer.cancel()
        cpu = {p: cpu_seconds(p) - cpu0[p] for p in ours}
        wrk_cpu = _children_cpu() - kids0
        foreign = busy_seconds() - busy0 - sum(cpu.values()) - wrk_cpu
    conns = "/".join(str(sample.get(p, "?")) for p in pids)
    cpus = "/".join(f"{cpu[p]:.1f}" for p in pids)
    per_cpu = rps * seconds / max(sum(cpu.values()), 1e-9)
    spread.setdefault(name, []).append(f"conns {conns} cpu-s {cpus} others {foreign:.1f}")
    say(f"  {name:9s} {rps:9.0f} req/s   per worker: connections {conns}, CPU s {cpus}; "
        f"wrk {wrk_cpu:.1f} s, master {cpu[proc.pid]:.1f} s, other processes {foreign:.1f} s")
    return {"rps": rps, "per_cpu": per_cpu, "foreign": foreign}


def measure(rounds: int, seconds: int = 5) -> tuple[list[Row], dict[str, list[str]]]:
    """Run the three servers *rounds* times, interleaved; return the rows of figure 3
    and, per server, how the load was spread over its workers in each round."""
    say(f"hello: {rounds} rounds of wrk -t1 -c64 -d{seconds}s, 2 workers each")
    spread: dict[str, list[str]] = {}
    runners: dict[str, Callable[[], dict[str, float]]] = {
        name: (lambda n=name, c=cmd: one_run(n, c, seconds, spread))  # type: ignore[misc]
        for name, cmd in SERVERS.items()
    }
    got = interleave(rounds, runners)
    py, plain, node = (median(got[n]["rps"]) for n in ("pycluster", "plain", "node"))
    vs_plain = Row("hello req/s vs no pycluster", py, plain, ">= 0.98x", None, "/s",
                   "baseline: same Protocol, 2 forked procs, 1 shared socket")
    vs_node = Row("hello req/s vs Node cluster", py, node, ">= 1.2x", None, "/s",
                  "baseline: node_cluster_hello.js")
    vs_plain.met = (vs_plain.ratio or 0) >= 0.98
    vs_node.met = (vs_node.ratio or 0) >= 1.2
    eff = Row("hello req per server CPU-s", median(got["pycluster"]["per_cpu"]),
              median(got["plain"]["per_cpu"]), "(no target)", None, "",
              "baseline: no pycluster; requests / CPU s of master+workers: robust to other load; "
              f"Node: {median(got['node']['per_cpu']):,.0f}")
    foreign = median([v for g in got.values() for v in g["foreign"]])
    if foreign > 0.1 * seconds * (os.cpu_count() or 1):
        say(f"WARNING: other processes used a median {foreign:.1f} CPU s per {seconds} s wrk "
            "run; req/s figures are noisy")
        for row in (vs_plain, vs_node):
            row.note += f"; NOISY: other processes used {foreign:.1f} CPU s per run"
    return [vs_plain, vs_node, eff], spread
