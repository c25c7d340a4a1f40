"""The guards side by side: the hung-worker watchdog and recycling by ``--max-requests``,
``pycluster run`` against gunicorn (sync workers, the same app) in one run.

1. Watchdog: 2 workers, ``--timeout T``. One ``GET /block`` blocks a worker in
   ``time.sleep()`` inside ``slow_handler()``. Measured from that request: when the
   server logs the kill, when the replacement is up (pycluster: its ``listening`` line;
   gunicorn: ``Booting worker``), whether the log names ``slow_handler``, and the requests
   of a background client (fresh connections, 4 threads) that failed meanwhile.
   Target: replaced within T + 1 s, the function named, 0 failed other requests.
2. Recycling: 2 workers, ``--max-requests N --max-requests-jitter J``, ``wrk -t1 -c64``
   (keep-alive, ``--timeout 10s``: on this shared 2-CPU machine an answer may take over
   wrk's default 2 s, which wrk counts as an error though the answer comes) until R
   recycles have started: wrk's socket errors by kind and non-2xx answers. Target: 0 for
   pycluster. pycluster serves benchmarks/guard_app.py (the asyncio server
   of examples/asyncio_server.py, counting requests with ``count_request()``); gunicorn
   serves benchmarks/guard_wsgi.py.

    python benchmarks/guard.py [--timeout 2] [--recycles 50] [--max-requests 1000]

Needs wrk for part 2 and gunicorn (``pip install gunicorn``) for the baselines.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import HERE, PYTHON, free_port, missing, running, say, wait_port

HOST = "127.0.0.1"


class LogWatch(threading.Thread):
    """Reads a server's log lines as they come, with the time each arrived."""

    def __init__(self, stream: object) -> None:
        super().__init__(daemon=True)
        self.stream = stream
        self.lines: list[tuple[float, str]] = []
        self.cond = threading.Condition()

    def run(self) -> None:
        for raw in self.stream:  # type: ignore[attr-defined]
            with self.cond:
                self.lines.append((time.monotonic(), raw.decode(errors="replace").rstrip()))
                self.cond.notify_all()

    def wait_for(self, match: Callable[[str], bool], after: float, timeout: float
                 ) -> tuple[float, str] | None:
        """The first line after monotonic time *after* that *match*es, or ``None``."""
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                for at, line in self.lines:
                    if at >= after and match(line):
                        return at, line
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self.cond.wait(left)

    def wait_until_count(self, match: Callable[[str], bool], count: int, timeout: float
                         ) -> int | None:
        """Wait until *count* lines *match*; return the count, or ``None`` on timeout."""
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                found = sum(1 for _, line in self.lines if match(line))
                if found >= count:
                    return found
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self.cond.wait(left)

    def count(self, match: Callable[[str], bool]) -> int:
        with self.cond:
            return sum(1 for _, line in self.lines if match(line))

    def text(self, after: float = 0.0) -> str:
        with self.cond:
            return "\n".join(line for at, line in self.lines if at >= after)


def _answered(sock: socket.socket) -> bool:
    """Read one answer (to its Content-Length, or EOF); whether it was a 200."""
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
        head, sep, rest = data.partition(b"\r\n\r\n")
        if sep:
            for line in head.split(b"\r\n")[1:]:
                key, _, value = line.partition(b":")
                if key.strip().lower() == b"content-length" and len(rest) >= int(value):
                    return data.split(b" ", 2)[1] == b"200"
    return data.split(b" ", 2)[1:2] == [b"200"]


@dataclass
class Client:
    """Fresh-connection GETs of / from a few threads, each outcome with its time."""

    port: int
    threads: int = 4
    outcomes: list[tuple[float, bool]] = field(default_factory=list)
    failures: list[tuple[float, str]] = field(default_factory=list)
    _halt: threading.Event = field(default_factory=threading.Event)

    def _loop(self) -> None:
        request = f"GET / HTTP/1.0\r\nHost: {HOST}\r\n\r\n".encode()
        while not self._halt.is_set():
            ok, why = False, "not a 200"
            try:
                with socket.create_connection((HOST, self.port), timeout=5) as sock:
                    sock.sendall(request)
                    ok = _answered(sock)
            except OSError as exc:
                why = type(exc).__name__
            self.outcomes.append((time.monotonic(), ok))
            if not ok:
                self.failures.append((time.monotonic(), why))

    def __enter__(self) -> Client:
        self._workers = [threading.Thread(target=self._loop, daemon=True)
                         for _ in range(self.threads)]
        for thread in self._workers:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._halt.set()
        for thread in self._workers:
            thread.join(10)

    def since(self, start: float) -> tuple[int, int]:
        """(requests, failed) that ended after *start*."""
        done = [ok for at, ok in self.outcomes if at >= start]
        return len(done), done.count(False)


@dataclass
class Watchdog:
    name: str
    killed: float | None
    replaced: float | None
    named: bool
    requests: int
    failed: int
    timeout: float
    failures: str = ""

    def line(self) -> str:
        def secs(value: float | None) -> str:
            return "never" if value is None else f"{value:.2f} s"

        met = self.replaced is not None and self.replaced <= self.timeout + 1
        return (f"   {self.name:<10} {secs(self.killed):>11} {secs(self.replaced):>14} "
                f"{'yes' if met else 'NO':>9} {'yes' if self.named else 'no':>19} "
                f"{self.requests:>14,} {self.failed:>7}")


def watchdog_trial(name: str, cmd: list[str], port: int, timeout: float,
                   killed_line: Callable[[str], bool], up_line: Callable[[str], bool]
                   ) -> Watchdog:
    """Serve with *cmd*, block one worker with GET /block, measure as the docstring says."""
    with running(cmd, cwd=HERE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) as server:
        log = LogWatch(server.stderr)
        log.start()
        wait_port(port, server)
        if log.wait_until_count(up_line, 2, 60) is None:
            msg = f"{name}: two workers did not come up:\n{log.text()[-3000:]}"
            raise RuntimeError(msg)
        time.sleep(0.5)
        with Client(port) as client:
            time.sleep(0.5)
            blocker = socket.create_connection((HOST, port), timeout=5)
            start = time.monotonic()
            blocker.sendall(f"GET /block HTTP/1.0\r\nHost: {HOST}\r\n\r\n".encode())
            killed = log.wait_for(killed_line, start, timeout + 30)
            up = log.wait_for(up_line, killed[0] if killed else start, 30)
            time.sleep(1.0)  # the other requests go on past the replacement
        blocker.close()
        requests, failed = client.since(start)
        text = log.text(start)
    at_kill = killed[0] if killed else start
    why = ", ".join(f"{kind} {at - at_kill:+.2f} s from the kill"
                    for at, kind in client.failures if at >= start)
    return Watchdog(name, killed[0] - start if killed else None,
                    up[0] - start if up else None, "slow_handler" in text, requests, failed,
                    timeout, why)


@dataclass
class Recycling:
    name: str
    recycles: int
    seconds: float
    requests: int
    errors: int
    non_2xx: int
    failed_recycles: int
    report: str = ""

    def line(self) -> str:
        per = (self.errors + self.non_2xx) / self.recycles if self.recycles else float("nan")
        return (f"   {self.name:<10} {self.recycles:>8} {self.seconds:>7.1f} "
                f"{self.requests:>10,} {self.errors:>7} {self.non_2xx:>7} {per:>14.2f}")


def parse_wrk(text: str) -> tuple[int, int, int]:
    """Requests, socket errors (all kinds) and non-2xx/3xx answers from wrk's report."""
    found = re.search(r"(\d+) requests in", text)
    if found is None:
        msg = f"no request count in wrk's output:\n{text}"
        raise RuntimeError(msg)
    errors = 0
    socket_errors = re.search(r"Socket errors: (.*)", text)
    if socket_errors:
        errors = sum(int(n) for _, n in re.findall(r"(\w+) (\d+)", socket_errors[1]))
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    return int(found[1]), errors, int(non_2xx[1]) if non_2xx else 0


def recycle_trial(name: str, cmd: list[str], port: int, recycles: int, cap: float,
                  recycle_line: Callable[[str], bool], failed_line: Callable[[str], bool]
                  ) -> Recycling:
    """Serve with *cmd*, load it with wrk until *recycles* recycles started (or *cap* s)."""
    with running(cmd, cwd=HERE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) as server:
        log = LogWatch(server.stderr)
        log.start()
        wait_port(port, server)
        time.sleep(1.0)
        before = log.count(recycle_line)
        wrk = subprocess.Popen(["wrk", "-t1", "-c64", f"-d{cap:g}s", "--timeout", "10s",
                                f"http://{HOST}:{port}/"],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        start = time.monotonic()
        try:
            while wrk.poll() is None and log.count(recycle_line) - before < recycles:
                time.sleep(0.05)
            if wrk.poll() is None:
                wrk.send_signal(signal.SIGINT)  # wrk stops and prints its report
            report, _ = wrk.communicate(timeout=30)
        finally:
            if wrk.poll() is None:
                wrk.kill()
                wrk.wait()
        seconds = time.monotonic() - start
        done = log.count(recycle_line) - before
        failed = log.count(failed_line)
        if server.poll() is not None:
            msg = f"{name} exited during the load:\n{log.text()[-3000:]}"
            raise RuntimeError(msg)
    requests, errors, non_2xx = parse_wrk(report)
    return Recycling(name, done, seconds, requests, errors, non_2xx, failed, report)


def main(argv: list[str] | None = None) -> int:
    """Run both parts for both servers; print the tables; 0 if pycluster met the targets."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--timeout", type=float, default=2.0, help="the watchdog's timeout")
    parser.add_argument("--recycles", type=int, default=50, help="recycles under wrk")
    parser.add_argument("--max-requests", type=int, default=300)
    parser.add_argument("--jitter", type=int, default=30)
    parser.add_argument("--cap", type=float, default=240.0, help="most seconds of wrk per server")
    args = parser.parse_args(argv)
    try:
        import gunicorn  # noqa: F401
    except ImportError:
        gunicorn_ok = False
        say("gunicorn is not installed (pip install gunicorn): no baseline")
    else:
        gunicorn_ok = True
    t = f"{args.timeout:g}"
    ok = True

    def ours(port: int, *extra: str) -> list[str]:
        return [PYTHON, "-m", "pycluster", "run", str(HERE / "guard_app.py"), "-w", "2",
                "-b", f"{HOST}:{port}", "--kill-timeout", "10", *extra]

    def theirs(port: int, *extra: str) -> list[str]:
        return [PYTHON, "-m", "gunicorn", "-w", "2", "-b", f"{HOST}:{port}",
                "--graceful-timeout", "10", *extra, "guard_wsgi:app"]

    with open("/proc/loadavg") as f:
        print(f"load average at start: {' '.join(f.read().split()[:3])} on "
              f"{os.cpu_count()} CPUs (boot of a fresh interpreter slows with it)")
    print(f"1. Watchdog: 2 workers, --timeout {t}; GET /block stuck in time.sleep() inside "
          "slow_handler(); a 4-thread client makes fresh connections meanwhile", flush=True)
    rows = []
    port = free_port()
    say("watchdog: pycluster")
    rows.append(watchdog_trial(
        "pycluster", ours(port, "--timeout", t), port, args.timeout,
        lambda line: "is hung" in line,
        lambda line: "listening on" in line))
    if gunicorn_ok:
        port = free_port()
        say("watchdog: gunicorn")
        rows.append(watchdog_trial(
            "gunicorn", theirs(port, "--timeout", t), port, args.timeout,
            lambda line: "WORKER TIMEOUT" in line,
            lambda line: "Booting worker" in line))
    print(f"   {'server':<10} {'killed after':>11} {'replaced after':>14} "
          f"{'<= ' + f'{args.timeout + 1:g} s':>9} {'log names function':>19} "
          f"{'other requests':>14} {'failed':>7}")
    for row in rows:
        print(row.line(), flush=True)
    for row in rows:
        if row.failures:
            print(f"   {row.name} failed requests by kind: {row.failures}")
    first = rows[0]
    ok &= (first.replaced is not None and first.replaced <= args.timeout + 1 and first.named
           and first.failed == 0)
    if len(rows) > 1 and rows[1].replaced and first.replaced:
        print(f"   replaced after, pycluster/gunicorn: {first.replaced / rows[1].replaced:.2f}x")
    boots = [f"{row.name} {row.replaced - row.killed:.2f} s" for row in rows
             if row.replaced is not None and row.killed is not None]
    print(f"   from the kill to the replacement up: {', '.join(boots)} (pycluster boots a fresh "
          "interpreter and reports listening; gunicorn forks its warm arbiter and logs "
          "Booting worker before the app is imported)")

    if missing("wrk"):
        say("wrk is not installed: no recycling figure")
        return 0 if ok else 1
    n, j = args.max_requests, args.jitter
    print(f"\n2. Recycling: 2 workers, --max-requests {n} --max-requests-jitter {j}, "
          f"wrk -t1 -c64 --timeout 10s keep-alive until {args.recycles} recycles", flush=True)
    results = []
    port = free_port()
    say("recycling: pycluster")
    results.append(recycle_trial(
        "pycluster", ours(port, "--max-requests", str(n), "--max-requests-jitter", str(j)),
        port, args.recycles, args.cap,
        lambda line: "recycling worker" in line, lambda line: "recycle of worker" in line))
    if gunicorn_ok:
        port = free_port()
        say("recycling: gunicorn")
        results.append(recycle_trial(
            "gunicorn", theirs(port, "--max-requests", str(n), "--max-requests-jitter", str(j)),
            port, args.recycles, args.cap,
            lambda line: "Autorestarting worker" in line, lambda line: False))
    print(f"   {'server':<10} {'recycles':>8} {'seconds':>7} {'requests':>10} {'errors':>7} "
          f"{'non-2xx':>7} {'failed/recycle':>14}")
    for result in results:
        print(result.line(), flush=True)
    for result in results:
        kinds = re.search(r"Socket errors: (.*)", result.report)
        latency = re.search(r"Latency\s+(\S+)\s+(\S+)\s+(\S+)", result.report)
        print(f"   {result.name}: socket errors {kinds[1] if kinds else 'none'}; latency avg "
              f"{latency[1] if latency else '?'}, max {latency[3] if latency else '?'}")
    mine = results[0]
    met = mine.errors == 0 and mine.non_2xx == 0 and mine.recycles >= args.recycles
    if len(results) > 1:
        base = results[1]
        print(f"   failed requests: pycluster {mine.errors + mine.non_2xx} vs gunicorn "
              f"{base.errors + base.non_2xx}; requests/s pycluster/gunicorn "
              f"{(mine.requests / mine.seconds) / max(base.requests / base.seconds, 1e-9):.2f}x;"
              f" failed recycles (old worker kept) pycluster {mine.failed_recycles}")
    print(f"   target (pycluster: {args.recycles} recycles, 0 failed requests) "
          f"{'met' if met else 'NOT met'}", flush=True)
    return 0 if ok and met else 1


if __name__ == "__main__":
    raise SystemExit(main())
