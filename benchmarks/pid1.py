"""Orphans and zombies: a master as PID 1 of a PID namespace (a container without
``--init``), and as a child subreaper under ``pycluster run``.

One worker listens, then makes N orphans: a shell backgrounds each from a subshell that
exits at once, so each orphan's parent is gone and the kernel hands it to the nearest
reaper (PID 1 of the namespace, or a child subreaper). Every orphan blocks opening a FIFO;
once all N are adopted (children of the master), this script opens the FIFO and they all
exit together. Then it waits until no orphan is alive and counts the master's zombie
children. Rows, side by side in the same run:

- ``pycluster, PID 1``: ``unshare --pid --fork --mount-proc python master.py``, where
  master.py is a plain ``pycluster.Master`` (PID 1 installs the reaper by itself);
- ``no reaper, PID 1`` (baseline): the same master with a do-nothing plugin named
  ``reaper`` in its place, i.e. pycluster before this change, or any PID 1 that does
  not reap;
- ``pycluster run, subreaper``: ``pycluster run`` in this namespace (the master makes
  itself a child subreaper; orphans come to it instead of to init).

Columns: ``adopted`` orphans seen as the master's children; ``zombies`` of them left
unreaped once none is alive (and ``-`` where none could be adopted); ``gone ms`` from
opening the FIFO until the master had no child but its worker (``-`` if it never had);
``ratio``: zombies per adopted orphan.

    python benchmarks/pid1.py [--orphans 1000]

Needs root and ``unshare`` (util-linux) for the PID namespace rows. Linux only.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pycluster._procfs import children, cmdline, state  # noqa: E402

WORKER = """
    import subprocess, sys, time, pycluster
    count, fifo = sys.argv[1], sys.argv[2]
    pycluster.worker.listen(0, "127.0.0.1")
    subprocess.run(["sh", "-c", 'for i in $(seq "$1"); do ( read x < "$2" & ) ; done',
                    "sh", count, fifo], check=True)
    print("orphans made", flush=True)
    pycluster.worker.on("disconnect", lambda: None)
    while pycluster.worker.is_connected():
        time.sleep(0.05)
"""

MASTER = """
    import sys, pycluster

    class NoReaper:  # takes the reaper's name, so a PID 1 master does not add one
        name = "reaper"
        def install(self, master):
            pass

    master = pycluster.Master(exec=sys.argv[1], args=sys.argv[3:], kill_timeout=5)
    master.use("logging")
    if sys.argv[2] == "off":
        master.use(NoReaper())
    master.fork()
    sys.exit(master.run())
"""

DEADLINE = 120.0


def wait_for(predicate, what: str, timeout: float = DEADLINE):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            msg = f"timed out waiting for {what}"
            raise SystemExit(msg)
        time.sleep(0.005)


def release(fifo: Path) -> None:
    with contextlib.suppress(OSError):
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))


def measure(label: str, argv: list[str], orphans: int, fifo: Path, in_namespace: bool
            ) -> tuple[str, int, int | None, float | None]:
    """Run one row; return (label, adopted, zombies, gone ms)."""
    print(f"  {label} ...", file=sys.stderr, flush=True)
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        if in_namespace:  # unshare's child is the namespace's PID 1: the master
            (master,) = wait_for(lambda: children(proc.pid), "the master")
        else:
            master = proc.pid
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.strip() == "orphans made":
                break
        (worker,) = wait_for(lambda: [c for c in children(master)
                                      if "worker.py" in " ".join(cmdline(c))], "the worker")
        # "orphans made" comes after every intermediate subshell exited: each orphan was
        # reparented (to the master, or past it to init) as its parent exited
        adopted = len(set(children(master)) - {worker})
        started = time.monotonic()
        release(fifo)
        gone_ms: float | None = None
        if adopted:
            def settled() -> bool:
                release(fifo)  # again: an orphan may reach its open() after the first
                rest = set(children(master)) - {worker}
                return all(state(c) in ("Z", None) for c in rest)

            wait_for(settled, "the orphans to exit")
            if set(children(master)) == {worker}:
                gone_ms = (time.monotonic() - started) * 1000
            else:
                with contextlib.suppress(SystemExit):
                    wait_for(lambda: set(children(master)) == {worker}, "reaping", 3.0)
                    gone_ms = (time.monotonic() - started) * 1000
        zombies = len({c for c in children(master) if c != worker and state(c) == "Z"})
        os.kill(master, signal.SIGTERM)
        proc.wait(30)
        return label, adopted, zombies if adopted else None, gone_ms
    finally:
        release(fifo)
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--orphans", type=int, default=1000)
    options = parser.parse_args()
    n = options.orphans
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        (work / "worker.py").write_text(textwrap.dedent(WORKER))
        (work / "master.py").write_text(textwrap.dedent(MASTER))
        fifo = work / "go"
        os.mkfifo(fifo)
        py = sys.executable
        ns = os.geteuid() == 0 and shutil.which("unshare")
        unshare = ["unshare", "--pid", "--fork", "--mount-proc"]
        worker_args = [str(n), str(fifo)]
        if ns:
            for label, reap in (("pycluster, PID 1", "on"), ("no reaper, PID 1", "off")):
                argv = [*unshare, py, str(work / "master.py"), str(work / "worker.py"), reap,
                        *worker_args]
                rows.append(measure(label, argv, n, fifo, True))
        else:
            print("  (not root or no unshare: the PID 1 rows are skipped)", file=sys.stderr)
        argv = [py, "-m", "pycluster", "run", str(work / "worker.py"), "-w", "1", "--",
                *worker_args]
        rows.append(measure("pycluster run, subreaper", argv, n, fifo, False))
    print(f"\nOrphans: 1 worker makes {n} orphaned grandchildren, then they all exit")
    print(f"{'master':<26} {'adopted':>8} {'zombies':>8} {'ratio':>6} {'gone ms':>8}")
    for label, adopted, zombies, gone in rows:
        ratio = f"{zombies / adopted:.2f}" if adopted and zombies is not None else "-"
        print(f"{label:<26} {adopted:>8} {'-' if zombies is None else zombies:>8} "
              f"{ratio:>6} {'-' if gone is None else f'{gone:.0f}':>8}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
