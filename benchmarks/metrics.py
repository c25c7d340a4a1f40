"""Metrics: pycluster's ``--metrics`` beside gunicorn + prometheus_client multiprocess mode.

Three parts, each side by side in this one run:

1. **Scrape**: 8 workers, each with 1,000 series of its own (460 counter children, 200
   gauge children with ``multiprocess_mode="livesum"``, 20 histogram children of 17
   samples), the same app module on both servers. pycluster: ``pycluster run app.py -w 8
   --metrics`` (the master asks the workers over IPC and merges). gunicorn: ``gunicorn -w
   8`` with ``PROMETHEUS_MULTIPROC_DIR``; a worker answers ``/metrics`` with
   ``MultiProcessCollector`` (the documented setup). Figures: median wall time of one
   scrape, CPU seconds per scrape of the process that serves it (pycluster's master;
   for gunicorn the whole tree, since any worker may serve it), and CPU of every process.
   Both answers are checked to hold the same merged value.
2. **Request path**: the asyncio hello app counting each request in a prometheus_client
   Counter and Histogram, under ``pycluster run -w 2``, with ``--metrics`` (scraped every
   second meanwhile) and without. ``wrk -t1 -c64``, rounds interleaved, median req/s.
   (The FastAPI adapter of issue 9 is not on main yet, so this is the asyncio app; an
   uninstrumented run is shown for scale.)
3. **Kills during scrapes**: 2 workers, each incrementing a counter and a histogram
   ~1,000 times a second; a thread scrapes without pause while the script SIGKILLs a
   worker N times (waiting for the replacement each time). Figures: scrapes, scrapes
   whose merged counter or histogram count was lower than the one before, failed
   scrapes; and for gunicorn the files left in the multiprocess directory.

    python benchmarks/metrics.py [--only scrape,path,kills] [--kills 100] [--scrapes 30]

Needs prometheus_client; gunicorn for the baselines of parts 1 and 3, wrk for part 2.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import socket
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (  # noqa: E402
    PYTHON,
    ROOT,
    free_port,
    median,
    missing,
    running,
    say,
)

from pycluster._procfs import cpu_seconds, live_children  # noqa: E402

APP = """
    import os, threading, time, prometheus_client as pc

    REQ = pc.Counter("bench_requests", "Requests", ["path"])
    INF = pc.Gauge("bench_inflight", "In flight", ["path"], multiprocess_mode="livesum")
    LAT = pc.Histogram("bench_latency_seconds", "Latency", ["path"])
    for i in range(460):
        REQ.labels(f"/p{i}").inc()
    for i in range(200):
        INF.labels(f"/p{i}").set(1)
    for i in range(20):
        LAT.labels(f"/p{i}").observe(0.01)

    if os.environ.get("SPIN"):
        def spin():
            while True:
                REQ.labels("/spin").inc()
                LAT.labels("/spin").observe(0.5)
                time.sleep(0.001)
        threading.Thread(target=spin, daemon=True).start()
"""

GUNICORN_APP = """
    import app
    from prometheus_client import CollectorRegistry, generate_latest, multiprocess

    def application(environ, start_response):
        if environ["PATH_INFO"] == "/metrics":
            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)
            body = generate_latest(registry)
        else:
            body = b"hello world\\n"
        start_response("200 OK", [("Content-Length", str(len(body)))])
        return [body]
"""

PYCLUSTER_APP = """
    import asyncio, os, pycluster
    COUNT = os.environ.get("COUNT", "1") == "1"
    if COUNT:
        import app
        REQ, LAT = app.REQ.labels("/"), app.LAT.labels("/")
    RESPONSE = b"HTTP/1.1 200 OK\\r\\nContent-Length: 12\\r\\n\\r\\nhello world\\n"

    class Hello(asyncio.Protocol):
        def connection_made(self, transport):
            self.transport, self.buffer = transport, b""
        def data_received(self, data):
            *requests, self.buffer = (self.buffer + data).split(b"\\r\\n\\r\\n")
            if COUNT:
                for _ in requests:
                    REQ.inc()
                    LAT.observe(0.001)
            self.transport.write(RESPONSE * len(requests))

    async def main():
        pycluster.worker.attach_loop()
        stop = asyncio.Event()
        pycluster.worker.on("disconnect", stop.set)
        server = await asyncio.get_running_loop().create_server(
            Hello, sock=pycluster.worker.listen())
        await stop.wait()
        server.close()

    asyncio.run(main())
"""

KILL_MASTER = """
    import sys, pycluster
    master = pycluster.Master(exec="papp.py", bind=[sys.argv[1]], kill_timeout=10)
    master.use("respawn", max_restarts=100_000, min_delay=0.01, max_delay=0.05)
    master.use("metrics", address=sys.argv[2])
    master.fork(); master.fork()
    raise SystemExit(master.run())
"""


def get(port: int, path: str = "/metrics", timeout: float = 30.0) -> tuple[int, str]:
    """One HTTP/1.0 GET on 127.0.0.1: (status, body); (0, "") if it cannot connect."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
            sock.sendall(f"GET {path} HTTP/1.0\r\nHost: x\r\n\r\n".encode())
            chunks = []
            while chunk := sock.recv(262144):
                chunks.append(chunk)
    except OSError:  # refused or reset: the server (or the worker serving it) died
        return 0, ""
    head, _, body = b"".join(chunks).partition(b"\r\n\r\n")
    parts = head.split(b" ", 2)
    if len(parts) < 2 or not parts[1].isdigit():  # cut off: the server died meanwhile
        return 0, ""
    return int(parts[1]), body.decode()


def ping(port: int) -> bool:
    """Whether the app on 127.0.0.1:*port* answers one request with 200 (its first bytes)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            return sock.recv(64).startswith(b"HTTP/1.1 200")
    except OSError:
        return False


def value(text: str, series: str) -> float | None:
    """The value of the exact series ``name{labels}`` in exposition *text*."""
    match = re.search("^" + re.escape(series) + r" (\S+)$", text, re.M)
    return float(match.group(1)) if match else None


def tree_cpu(pid: int) -> float:
    """CPU seconds of *pid* and its live children."""
    return sum(cpu_seconds(p) or 0.0 for p in [pid, *live_children(pid)])


def wait_for(predicate, what: str, timeout: float = 120.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            msg = f"timed out waiting for {what}"
            raise RuntimeError(msg)
        time.sleep(0.05)


def scratch() -> Path:
    where = Path(tempfile.mkdtemp(prefix="pycluster-metrics-bench-"))
    for name, text in (("app.py", APP), ("gapp.py", GUNICORN_APP), ("papp.py", PYCLUSTER_APP),
                       ("kill_master.py", KILL_MASTER)):
        (where / name).write_text(textwrap.dedent(text))
    return where


def env_for(where: Path, **extra: str) -> dict[str, str]:
    path = os.pathsep.join(x for x in (str(where), str(ROOT), os.environ.get("PYTHONPATH"))
                           if x)
    return {"PYTHONPATH": path, **extra}


# -- 1. scrape ----------------------------------------------------------------------------


def measure_scrapes(port: int, serving_pid: int, root_pid: int, count: int
                    ) -> dict[str, float]:
    for _ in range(3):
        get(port)
    times = []
    cpu0, all0 = cpu_seconds(serving_pid) or 0.0, tree_cpu(root_pid)
    for _ in range(count):
        start = time.perf_counter()
        status, _ = get(port)
        times.append(time.perf_counter() - start)
        assert status == 200
    cpu1, all1 = cpu_seconds(serving_pid) or 0.0, tree_cpu(root_pid)
    return {"ms": median(times) * 1000, "cpu_ms": (cpu1 - cpu0) / count * 1000,
            "all_ms": (all1 - all0) / count * 1000}


def part_scrape(where: Path, count: int) -> list[str]:
    say("1. scrape: pycluster run -w 8 --metrics ...")
    app_port, mport = free_port(), free_port()
    cmd = [PYTHON, "-m", "pycluster", "run", "papp.py", "-w", "8", "-b",
           f"127.0.0.1:{app_port}", "--metrics", f"127.0.0.1:{mport}"]
    with running(cmd, env_for(where), cwd=where, stderr=open(os.devnull, "w")) as proc:
        wait_for(lambda: value(get(mport)[1], 'bench_requests_total{path="/p0"}') == 8,
                 "8 pycluster workers' metrics")
        text = get(mport)[1]
        samples = sum(1 for x in text.splitlines() if x.startswith("bench_"))
        ours = measure_scrapes(mport, proc.pid, proc.pid, count)
    rows = []
    if missing("gunicorn") and not _has_module("gunicorn"):
        say("   gunicorn is missing: no baseline")
        theirs = None
    else:
        say("1. scrape: gunicorn -w 8, PROMETHEUS_MULTIPROC_DIR ...")
        with tempfile.TemporaryDirectory(prefix="prom-multiproc-") as multiproc:
            port = free_port()
            cmd = [PYTHON, "-m", "gunicorn", "-w", "8", "-b", f"127.0.0.1:{port}",
                   "gapp:application"]
            env = env_for(where, PROMETHEUS_MULTIPROC_DIR=multiproc)
            with running(cmd, env, cwd=where, stderr=open(os.devnull, "w")) as proc:
                wait_for(lambda: value(get(port)[1], 'bench_requests_total{path="/p0"}') == 8,
                         "8 gunicorn workers' metrics")
                gtext = get(port)[1]
                gsamples = sum(1 for x in gtext.splitlines() if x.startswith("bench_"))
                theirs = measure_scrapes(port, proc.pid, proc.pid, count)
                theirs["cpu_ms"] = theirs["all_ms"]  # any worker may serve it
        say(f"   merged samples: pycluster {samples}, gunicorn {gsamples}")
    rows.append(row("scrape time, 8 workers x 1,000", ours["ms"], theirs and theirs["ms"],
                    "ms", "<= 0.5x gunicorn", lambda r: r <= 0.5))
    rows.append(row("CPU per scrape, serving side", ours["cpu_ms"],
                    theirs and theirs["cpu_ms"], "ms", "(master vs gunicorn tree)", None))
    rows.append(row("CPU per scrape, every process", ours["all_ms"],
                    theirs and theirs["all_ms"], "ms", "(no target)", None))
    return rows


def _has_module(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


# -- 2. request path ---------------------------------------------------------------------


def part_path(where: Path, rounds: int, seconds: int) -> list[str]:
    if missing("wrk"):
        say("2. request path: wrk is missing; skipped")
        return []
    results: dict[str, list[float]] = {"on": [], "off": [], "off again": [], "bare": []}

    def one(kind: str) -> None:
        port, mport = free_port(), free_port()
        cmd = [PYTHON, "-m", "pycluster", "run", "papp.py", "-w", "2", "-b",
               f"127.0.0.1:{port}"]
        if kind == "on":
            cmd += ["--metrics", f"127.0.0.1:{mport}"]
        env = env_for(where, COUNT="0" if kind == "bare" else "1")
        with running(cmd, env, cwd=where, stderr=open(os.devnull, "w")) as proc:
            wait_for(lambda: len(live_children(proc.pid)) == 2 and ping(port), "2 workers")
            wait_for(lambda: all(ping(port) for _ in range(20)), "warm")
            stop = threading.Event()

            def scrape() -> None:
                while not stop.wait(1.0):
                    get(mport)

            scraper = threading.Thread(target=scrape)
            if kind == "on":
                scraper.start()
            import subprocess

            out = subprocess.run(["wrk", "-t1", "-c64", f"-d{seconds}s",
                                  f"http://127.0.0.1:{port}/"], capture_output=True,
                                 text=True, check=True).stdout
            stop.set()
            if kind == "on":
                scraper.join()
            rate = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
            results[kind].append(rate)
            say(f"   {kind}: {rate:,.0f} req/s")

    for r in range(rounds):
        say(f"2. request path: round {r + 1} of {rounds}")
        order = list(results)
        order = order[r % len(order):] + order[:r % len(order)]
        for kind in order:
            one(kind)
    on, off, bare = (median(results[k]) for k in ("on", "off", "bare"))
    # the machine's load drifts between rounds: judge by the median of each round's ratio,
    # and show the same ratio between two runs of one configuration (the noise)
    def ratios(a: str, b: str) -> list[float]:
        return [x / y for x, y in zip(results[a], results[b], strict=True)]

    paired, noise = median(ratios("on", "off")), median(ratios("off again", "off"))
    say(f"   on/off per round: {[round(x, 2) for x in ratios('on', 'off')]}")
    say(f"   off again/off per round (noise): {[round(x, 2) for x in ratios('off again', 'off')]}")
    return [row("req/s, counted, --metrics on vs off", on, off, "/s", "(medians of rounds)",
                None),
            row("  the same, median of round ratios", paired, 1.0, "x", ">= 0.98x",
                lambda r: r >= 0.98),
            row("  noise: off again vs off, likewise", noise, 1.0, "x", "(1.00x if quiet)", None),
            row("req/s, counted vs not counted", off, bare, "/s", "(no target)", None)]


# -- 3. kills during scrapes ----------------------------------------------------------


class Scraper:
    """Scrapes *port* without pause on a thread; records the merged spin counters."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.seen: list[tuple[float, float]] = []
        self.failed = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            status, text = get(self.port)
            if status != 200:
                self.failed += 1
                continue
            self.seen.append((value(text, 'bench_requests_total{path="/spin"}') or 0.0,
                              value(text, 'bench_latency_seconds_count{path="/spin"}') or 0.0))

    def stop(self) -> dict[str, float]:
        self._stop.set()
        self._thread.join()
        drops = sum(1 for a, b in zip(self.seen, self.seen[1:], strict=False)
                    if b[0] < a[0] or b[1] < a[1])
        return {"scrapes": len(self.seen), "drops": drops, "failed": self.failed}


def part_kills(where: Path, kills: int) -> list[str]:
    say(f"3. kills: pycluster, {kills} SIGKILLs during scrapes ...")
    port, mport = free_port(), free_port()
    cmd = [PYTHON, "kill_master.py", f"127.0.0.1:{port}", f"127.0.0.1:{mport}"]
    env = env_for(where, SPIN="1")
    started = time.monotonic()
    with running(cmd, env, cwd=where, stderr=open(os.devnull, "w")) as proc:
        wait_for(lambda: "2 worker(s)" in get(mport, "/readyz")[1], "2 workers")
        scraper = Scraper(mport)
        for k in range(kills):
            victims = live_children(proc.pid)
            os.kill(victims[k % len(victims)], signal.SIGKILL)

            def back(k: int = k) -> bool:
                text = get(mport)[1]
                return (value(text, 'pycluster_worker_restarts_total{reason="signal"}') == k + 1
                        and value(text, 'pycluster_workers{state="listening"}') == 2)

            wait_for(back, f"replacement {k + 1}")
        ours = scraper.stop()
        text = get(mport)[1]
        missed = sum(float(x) for x in re.findall(
            r"^pycluster_metrics_missed_answers_total\{[^}]*\} (\S+)$", text, re.M))
    ours["seconds"] = time.monotonic() - started
    say(f"   pycluster: {ours}, missed answers {missed:g}")
    theirs: dict[str, float] | None = None
    if _has_module("gunicorn"):
        say(f"3. kills: gunicorn, {kills} SIGKILLs during scrapes ...")
        with tempfile.TemporaryDirectory(prefix="prom-multiproc-") as multiproc:
            port = free_port()
            cmd = [PYTHON, "-m", "gunicorn", "-w", "2", "-b", f"127.0.0.1:{port}",
                   "gapp:application"]
            genv = env_for(where, SPIN="1", PROMETHEUS_MULTIPROC_DIR=multiproc)
            started = time.monotonic()
            with running(cmd, genv, cwd=where, stderr=open(os.devnull, "w")) as proc:
                wait_for(lambda: ping(port) and len(live_children(proc.pid)) == 2,
                         "2 gunicorn workers")
                first = measure_scrapes(port, proc.pid, proc.pid, 5)["ms"]
                scraper = Scraper(port)
                for k in range(kills):
                    victims = live_children(proc.pid)
                    os.kill(victims[k % len(victims)], signal.SIGKILL)
                    wait_for(lambda v=victims: len(set(live_children(proc.pid)) - set(v)) >= 1
                             and len(live_children(proc.pid)) == 2, f"gunicorn replacement {k}")
                theirs = scraper.stop()
                theirs["files"] = len(os.listdir(multiproc))
                theirs["ms_before"] = first
                theirs["slowdown"] = measure_scrapes(port, proc.pid, proc.pid, 5)["ms"] / first
            theirs["seconds"] = time.monotonic() - started
            say(f"   gunicorn: {theirs}")
    rows = [row(f"counter decreases, {kills} kills", ours["drops"],
                theirs and theirs["drops"], "", "0 for pycluster", lambda r: True,
                met=ours["drops"] == 0),
            row("scrapes/s during the kills", ours["scrapes"] / ours["seconds"],
                theirs and theirs["scrapes"] / theirs["seconds"], "/s", "(no target)", None),
            row("failed scrapes", ours["failed"], theirs and theirs["failed"], "",
                "0 for pycluster", None, met=ours["failed"] == 0)]
    if theirs:
        say(f"   gunicorn's multiprocess dir after {kills} kills: {theirs['files']:g} files; "
            f"its scrape took {theirs['slowdown']:.2f}x as long as before the kills")
    return rows


# -- the table ----------------------------------------------------------------------------


def row(figure: str, ours: float, theirs: float | None, unit: str, target: str,
        test, met: bool | None = None) -> str:  # type: ignore[no-untyped-def]
    ratio = ours / theirs if theirs else None
    if met is None and test is not None and ratio is not None:
        met = bool(test(ratio))
    shown_ratio = f"{ratio:.2f}x" if ratio is not None else "-"
    shown_met = "-" if met is None else ("yes" if met else "NO")
    if unit == "x":
        fmt = lambda v: f"{v:.2f}x"  # noqa: E731
    else:
        fmt = (lambda v: f"{v:,.1f} {unit}".strip()) if unit else (lambda v: f"{v:,.0f}")
    theirs_text = fmt(theirs) if theirs is not None else "-"
    return (f"{figure:<38} {fmt(ours):>12} {theirs_text:>12} {shown_ratio:>6}  "
            f"{target:<27} {shown_met}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", default="scrape,path,kills")
    parser.add_argument("--kills", type=int, default=100)
    parser.add_argument("--scrapes", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=int, default=5)
    options = parser.parse_args()
    parts = set(options.only.split(","))
    where = scratch()
    rows: list[str] = []
    if "scrape" in parts:
        rows += part_scrape(where, options.scrapes)
    if "path" in parts:
        rows += part_path(where, options.rounds, options.seconds)
    if "kills" in parts:
        rows += part_kills(where, options.kills)
    print(f"{'figure':<38} {'pycluster':>12} {'baseline':>12} {'ratio':>6}  "
          f"{'target':<27} met")
    print(f"{'-' * 38} {'-' * 12} {'-' * 12} {'-' * 6}  {'-' * 27} ---")
    for line in rows:
        print(line)
    print("baseline: gunicorn 8 (or 2) sync workers + prometheus_client multiprocess mode; "
          "request path: the same pycluster app without --metrics")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
