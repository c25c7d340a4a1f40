"""Tiny masters for ``startcost.py``, kept minimal so that their own RSS means something.

``python masters.py pycluster N [SCRIPT ARGS...]``: a ``pycluster.Master`` forks N workers
running SCRIPT (default: this file's ``block`` mode, a worker that just blocks). With env
``BENCH_IMPORTTIME=1`` the workers run with ``PYTHONPROFILEIMPORTTIME=1`` (their stderr is
this process's stderr; the master itself is not profiled).

``python masters.py plain N``: the same without pycluster: ``subprocess.Popen`` N plain
children that block, then an asyncio loop (what a hand-made master would import and run).

Both print ``ready <VmRSS kB of this master>`` once all N workers are up, then run until
killed.
"""

from __future__ import annotations

import os
import sys


def own_rss_kib() -> int | None:
    """This process's VmRSS in KiB.

    ``pycluster/_procfs.py`` is loaded as a file of its own: importing it from the package
    would add pycluster's imports to the plain master, whose RSS is the baseline.
    """
    import importlib.util

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                        "pycluster", "_procfs.py")
    spec = importlib.util.spec_from_file_location("_bench_procfs", path)
    assert spec is not None
    assert spec.loader is not None
    procfs = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(procfs)
    rss: int | None = procfs.rss_kib(os.getpid())
    return rss


def pycluster_master(n: int, command: list[str]) -> None:
    """Fork *n* workers running *command*; print ``ready RSS`` when all are online."""
    import pycluster

    env = {"PYTHONPROFILEIMPORTTIME": "1"} if os.environ.get("BENCH_IMPORTTIME") else {}
    master = pycluster.Master(exec=command[0], args=command[1:], env=env)
    online = 0

    def on_online(worker: pycluster.Worker) -> None:
        nonlocal online
        online += 1
        if online == n:
            print(f"ready {own_rss_kib()}", flush=True)

    master.on("online", on_online)
    for _ in range(n):
        master.fork()
    master.run()


def plain_master(n: int) -> None:
    """Start *n* plain blocking children; print ``ready RSS`` when all said they are up."""
    import asyncio
    import subprocess

    child = [sys.executable, "-c", "import threading; print(flush=True); threading.Event().wait()"]
    procs = [subprocess.Popen(child, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL)
             for _ in range(n)]
    for proc in procs:
        assert proc.stdout is not None
        proc.stdout.readline()

    async def run() -> None:
        await asyncio.sleep(0)
        print(f"ready {own_rss_kib()}", flush=True)
        await asyncio.Event().wait()

    asyncio.run(run())


def block() -> None:
    """A pycluster worker that just blocks."""
    import threading

    import pycluster  # noqa: F401 - connects to the master

    threading.Event().wait()


if __name__ == "__main__":
    mode = sys.argv[1]
    if mode == "block":
        block()
    elif mode == "plain":
        plain_master(int(sys.argv[2]))
    else:
        pycluster_master(int(sys.argv[2]), sys.argv[3:] or [os.path.abspath(__file__), "block"])
