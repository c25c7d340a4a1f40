"""Figure 4: what pycluster adds to a worker's start cost and memory, and a master's RSS.

- Import time: ``hello_app.py --pycluster`` as the worker of a real pycluster master, with
  ``PYTHONPROFILEIMPORTTIME=1`` (= ``-X importtime``), vs ``hello_app.py`` served by a bare
  interpreter (``WORKERS=0``) with the same flag. Figures: the cumulative time of the
  ``pycluster`` line in the worker (it includes connecting to the master: ``setup()`` runs
  at import), and on each side the app's own imports (the top-level ones after ``site``).
- Worker RSS: the same two processes (without the import profiler), each having answered
  one request, ``VmRSS`` from ``/proc/PID/status``.
- Master RSS: ``masters.py pycluster 16`` (a Master with 16 online workers that just block)
  vs ``masters.py plain 16`` (subprocess + asyncio, 16 blocking children); each reports
  its own ``VmRSS`` once all 16 are up.

Each round runs every variant once, in rotating order; the table shows medians.
"""

from __future__ import annotations

import re
import select
import socket
import subprocess
import time

from _common import (
    HERE,
    PYTHON,
    Row,
    descendants,
    free_port,
    interleave,
    median,
    running,
    say,
    wait_port,
)

from pycluster._procfs import rss_kib

_LINE = re.compile(r"^import time:\s+(\d+) \|\s+(\d+) \|( *)(\S+)\s*$")
MIB = 1024.0


def import_times(stderr: str) -> tuple[float, float | None]:
    """From ``-X importtime`` output: (the app's imports in ms, ``pycluster``'s ms).

    The app's imports are the top-level imports after ``site`` (which ends the
    interpreter's own start-up, the same on both sides), cumulative times summed.
    """
    total, mine, after_site = 0.0, None, False
    for line in stderr.splitlines():
        match = _LINE.match(line)
        if not match or len(match.group(3)) != 1:  # one space: a top-level import
            continue
        if not after_site:
            after_site = match.group(4) == "site"
            continue
        ms = int(match.group(2)) / 1000
        total += ms
        if match.group(4) == "pycluster":
            mine = ms
    return total, mine


def read_ready(proc: subprocess.Popen[bytes], timeout: float = 30.0) -> int:
    """Wait for a master's ``ready <kB>`` line; return the kB."""
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if select.select([proc.stdout], [], [], 0.1)[0]:
            line = proc.stdout.readline().decode()
            if line.startswith("ready "):
                return int(line.split()[1])
            if not line:
                break
    msg = f"{proc.args!r} did not say ready within {timeout} s (exit code {proc.poll()})"
    raise RuntimeError(msg)


def one_request(port: int) -> None:
    """Send one HTTP request and read the answer (so both apps have served once)."""
    with socket.create_connection(("127.0.0.1", port), 5) as s:
        s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        s.recv(1024)


def hello_worker(pycluster: bool, profile: bool) -> dict[str, float]:
    """Run the hello app (as a pycluster worker or bare); return its RSS or import times."""
    port = free_port()
    env = {"PORT": str(port), "WORKERS": "0"}
    if pycluster:
        cmd = [PYTHON, str(HERE / "masters.py"), "pycluster", "1",
               str(HERE / "hello_app.py"), "--pycluster"]
        env["BENCH_IMPORTTIME"] = "1" if profile else ""
    else:
        cmd = [PYTHON, str(HERE / "hello_app.py")]
        if profile:
            env["PYTHONPROFILEIMPORTTIME"] = "1"
    with running(cmd, env, stdout=subprocess.PIPE, stderr=subprocess.PIPE) as proc:
        if pycluster:
            read_ready(proc)
        wait_port(port, proc)
        one_request(port)
        time.sleep(0.2)
        pid = descendants(proc.pid)[0] if pycluster else proc.pid
        rss = rss_kib(pid)
        if rss is None:
            msg = f"pid {pid} has no RSS: it is gone"
            raise RuntimeError(msg)
    if not profile:
        return {"rss": rss / MIB}
    assert proc.stderr is not None
    total, mine = import_times(proc.stderr.read().decode())
    if pycluster and mine is None:
        msg = "no 'pycluster' line in the worker's -X importtime output"
        raise RuntimeError(msg)
    return {"imports": total, "pycluster": mine or 0.0}


def master_rss(kind: str, workers: int) -> dict[str, float]:
    """RSS (MiB) of a minimal master of *kind* with *workers* blocking workers up."""
    with running([PYTHON, str(HERE / "masters.py"), kind, str(workers)],
                 stdout=subprocess.PIPE) as proc:
        return {"rss": read_ready(proc, 60.0) / MIB}


def measure(rounds: int, workers: int = 16) -> list[Row]:
    """Run every variant *rounds* times, interleaved; return the rows of figure 4."""
    say(f"startcost: {rounds} rounds (import time, worker RSS, master RSS with {workers} workers)")
    got = interleave(rounds, {
        "py-imports": lambda: hello_worker(True, True),
        "bare-imports": lambda: hello_worker(False, True),
        "py-rss": lambda: hello_worker(True, False),
        "bare-rss": lambda: hello_worker(False, False),
        "master": lambda: master_rss("pycluster", workers),
        "plain-master": lambda: master_rss("plain", workers),
    })
    for name, values in got.items():
        shown = (f"{k} {[round(v, 1) for v in vs]}" for k, vs in values.items())
        say(f"  {name}: " + ", ".join(shown))
    m = {name: {k: median(vs) for k, vs in values.items()} for name, values in got.items()}
    own = m["py-imports"]["pycluster"]
    extra = m["py-imports"]["imports"] - m["bare-imports"]["imports"]
    rows = [
        Row("import pycluster in a worker", own, m["bare-imports"]["imports"], "<= 15 ms",
            own <= 15, "ms", "baseline: the bare app's own imports (after site); the worker's "
            f"are {extra:+.1f} ms over them (medians); fastest run of import pycluster: "
            f"{min(got['py-imports']['pycluster']):.1f} ms (noise only adds)"),
        Row("worker RSS, hello app", m["py-rss"]["rss"], m["bare-rss"]["rss"], "<= +4 MiB",
            m["py-rss"]["rss"] - m["bare-rss"]["rss"] <= 4, "MiB",
            "baseline: bare interpreter serving the same app"),
        Row(f"master RSS, {workers} workers", m["master"]["rss"], m["plain-master"]["rss"],
            "<= 40 MiB", m["master"]["rss"] <= 40, "MiB",
            f"baseline: subprocess+asyncio parent of {workers} children"),
    ]
    return rows
