"""Masters and workers of ``reliability.py`` (one file: the master runs it again as its
workers' script, with ``KIND`` saying what the worker does).

- ``rel_cluster.py death cpu,syscall,...``: one worker per kind; prints their pids as
  ``{"pids": [...]}`` once every worker said it is about to block.
- ``rel_cluster.py crash KIND``: logging and respawn (4 restarts) on, 2 workers of KIND;
  prints ``{"code": ..., "forks": ...}`` when the master gives up.
- ``rel_cluster.py leaks TOTAL BATCH``: TOTAL workers that exit at once, BATCH at a time;
  prints the master's fds and RSS at the end of each batch, and zombie checks.
"""

from __future__ import annotations

import os

if os.environ.get("KIND") == "raise-at-import" and "PYCLUSTER_WORKER_ID" in os.environ:
    msg = "the app is broken"
    raise RuntimeError(msg)

import json  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402

import pycluster  # noqa: E402
from pycluster._procfs import fd_count, rss_kib, zombies  # noqa: E402


def out(**fields: object) -> None:
    os.write(1, (json.dumps(fields) + "\n").encode())


def worker_main(kind: str) -> None:
    import ctypes
    import resource
    import select
    import signal
    import time

    w = pycluster.worker
    assert w is not None
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    if kind == "cpu":
        w.send("ready")
        while True:
            pass
    elif kind == "syscall":
        r, _keep = os.pipe()
        w.send("ready")
        os.read(r, 1)
    elif kind == "sigblock":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.pthread_sigmask(signal.SIG_BLOCK,
                               set(signal.Signals) - {signal.SIGKILL, signal.SIGSTOP})
        threading.Thread(target=signal.sigwait, args=({signal.SIGUSR1},)).start()
        w.send("ready")
        select.select([], [], [])
    elif kind == "exit-after-50ms":
        time.sleep(0.05)
        raise SystemExit(1)
    elif kind == "segfault":
        ctypes.string_at(0)
    elif kind == "abort":
        os.abort()
    # "exit": leave at once


def death(kinds: list[str]) -> int:
    master = pycluster.Master(exec=__file__, args=[], kill_timeout=60)
    ready: dict[int, int | None] = {}

    def on_message(worker: pycluster.Worker, message: object) -> None:
        ready[worker.id] = worker.pid
        if len(ready) == len(kinds):
            out(pids=sorted(p for p in ready.values() if p))

    master.on("message", on_message)
    for kind in kinds:
        master.fork(env={"KIND": kind})
    return master.run()


def crash(kind: str) -> int:
    master = pycluster.Master(exec=__file__, args=[], kill_timeout=5, env={"KIND": kind})
    master.use("logging").use("respawn", max_restarts=4, min_delay=0.01, max_delay=0.05)
    forks: list[int] = []
    master.on("fork", lambda w: forks.append(w.id))
    master.fork()
    master.fork()
    code = master.run()
    out(code=code, forks=len(forks))
    return code


def leaks(total: int, batch: int) -> int:
    master = pycluster.Master(exec=__file__, args=[], kill_timeout=10, env={"KIND": "exit"})
    me = os.getpid()
    lock = threading.Lock()
    done = {"forked": 0, "exited": 0, "checks": 0, "bad": 0}
    reported: set[int] = set()
    stale: set[int] = set()
    quiet: list[int] = []
    samples: list[tuple[int, int, int]] = []
    halt = threading.Event()

    def fork_batch() -> None:
        for _ in range(min(batch, total - done["forked"])):
            master.fork()
            done["forked"] += 1

    def on_exit(worker: pycluster.Worker, code: int | None, sig: str | None) -> None:
        done["bad"] += (code, sig) != (0, None)
        reported.add(worker.pid or 0)
        done["exited"] += 1
        if master.workers:
            return
        with lock:
            quiet.append(len(zombies(me)))
            fds = fd_count(me) or 0
        samples.append((done["exited"], fds, rss_kib(me) or 0))
        fork_batch()

    def watch() -> None:
        while not halt.is_set():
            seen = set(reported)
            with lock:
                stale.update(zombies(me) & seen)
            done["checks"] += 1
            halt.wait(0.005)

    master.on("exit", on_exit)
    master.on("setup", lambda settings: fork_batch())
    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    code = master.run()
    halt.set()
    watcher.join()
    out(code=code, samples=samples, quiet_zombies=sum(quiet), stale=len(stale),
        checks=done["checks"], bad_exits=done["bad"], exited=done["exited"])
    return code


if __name__ == "__main__":
    if pycluster.is_worker:
        worker_main(os.environ["KIND"])
    elif sys.argv[1] == "death":
        sys.exit(death(sys.argv[2].split(",")))
    elif sys.argv[1] == "crash":
        sys.exit(crash(sys.argv[2]))
    elif sys.argv[1] == "leaks":
        sys.exit(leaks(int(sys.argv[2]), int(sys.argv[3])))
