"""The control socket: what a ``status`` costs with 64 workers, and ``scale 2→16→2`` under
load, each beside a baseline measured in the same run.

1. Status round trip, 64 workers (``pycluster run examples/asyncio_server.py -w 64``).
   Baseline: ``ps --ppid MASTER -o pid,etimes,pcpu,rss,stat`` — the listing you get
   without a control socket (pids, uptime, CPU, memory; no slots, states or exits).
   Measured, interleaved, ROUNDS times each: ``ps``; a raw ``hello`` round trip on the
   socket (the transport's floor); ``status`` over the socket from Python; the whole
   ``python -m pycluster status --json`` command, beside ``python -c pass`` (the
   interpreter's own start). Also the master's CPU per ``status``.
2. ``pycluster scale 16`` then ``pycluster scale 2``, CYCLES times, while ``wrk -t1 -c64``
   keeps 64 keep-alive connections busy on the same app (2 workers to start). Failed
   requests (socket errors + non-2xx) must be 0. Baselines: the same wrk run with no
   scaling (requests, for the cost of scaling), and gunicorn ``-k gthread`` scaled the
   same way with ``SIGTTIN``/``SIGTTOU`` (its only way), serving the shared bench's WSGI
   hello.

    python benchmarks/control.py [--rounds 30] [--workers 64] [--duration 15] [--cycles 2]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import PYTHON, ROOT, SHARED_BENCH, free_port, median, missing, running, say, wait_port
from reload import parse_wrk

from pycluster._procfs import children, cpu_seconds

HOST = "127.0.0.1"
APP = str(ROOT / "examples" / "asyncio_server.py")


def _env(port: int, runtime: str) -> dict[str, str]:
    return {"PORT": str(port), "HOST": HOST, "XDG_RUNTIME_DIR": runtime}


def _call(path: str, request: dict[str, Any]) -> Any:
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(30)
        sock.connect(path)
        sock.sendall(json.dumps(request).encode() + b"\n")
        data = b""
        while not data.endswith(b"\n"):
            chunk = sock.recv(1 << 16)
            if not chunk:
                msg = "the master closed the control connection"
                raise RuntimeError(msg)
            data += chunk
    answer = json.loads(data)
    if not answer["ok"]:
        raise RuntimeError(answer["error"])
    return answer["result"]


def _wait(predicate: Callable[[], bool], what: str, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            msg = f"timed out waiting for {what}"
            raise RuntimeError(msg)
        time.sleep(0.05)


def _listening(path: str, count: int) -> bool:
    try:
        rows = _call(path, {"verb": "status"})["workers"]
    except (OSError, RuntimeError):
        return False
    return [w["state"] for w in rows] == ["listening"] * count


def _timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1000


def status_round_trip(rounds: int, workers: int, scratch: Path) -> list[str]:
    """Part 1: lines for the table."""
    runtime = tempfile.mkdtemp(prefix="xdg-", dir=scratch)
    port = free_port()
    env = _env(port, runtime)
    path = os.path.join(runtime, "pycluster", "bench.sock")
    with (scratch / "status.log").open("wb") as log, running(
        [PYTHON, "-m", "pycluster", "run", APP, "-w", str(workers), "--name", "bench",
         "--bind", f"{HOST}:{port}"],
        env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
    ) as master:
        say(f"status: starting {workers} workers (pid {master.pid})")
        _wait(lambda: _listening(path, workers), f"{workers} listening workers")
        assert len(children(master.pid)) == workers
        ps = ["ps", "--ppid", str(master.pid), "-o", "pid,etimes,pcpu,rss,stat"]
        cli = [PYTHON, "-m", "pycluster", "status", "--json", "--name", "bench"]
        full_env = {**os.environ, **env}
        runners: dict[str, Callable[[], object]] = {
            "ps": lambda: subprocess.run(ps, check=True, capture_output=True),
            "hello": lambda: _call(path, {"verb": "hello"}),
            "status": lambda: _call(path, {"verb": "status"}),
            "cli": lambda: subprocess.run(cli, check=True, capture_output=True, env=full_env),
            "python": lambda: subprocess.run([PYTHON, "-c", "pass"], check=True),
        }
        times: dict[str, list[float]] = {name: [] for name in runners}
        for r in range(rounds):
            names = list(runners)
            k = r % len(names)
            for name in names[k:] + names[:k]:
                times[name].append(_timed(runners[name]))
        calls = max(rounds, 200)  # CPU time comes in 10 ms ticks: average over many
        before = cpu_seconds(master.pid) or 0.0
        for _ in range(calls):
            _call(path, {"verb": "status"})
        master_ms = ((cpu_seconds(master.pid) or 0.0) - before) * 1000 / calls
        rows = len(_call(path, {"verb": "status"})["workers"])
    ps_ms = median(times["ps"])
    hello_ms = median(times["hello"])
    lines = [f"status round trip, {workers} workers ({rows} rows), median of {rounds}:"]
    for name, label, base, base_name in (
        ("status", "status over the socket (Python)", ps_ms, "ps --ppid"),
        ("cli", "pycluster status --json (whole command)", ps_ms, "ps --ppid"),
        ("status", "status over the socket (Python)", hello_ms, "raw hello round trip"),
        ("cli", "pycluster status --json (whole command)", median(times["python"]),
         "python -c pass"),
    ):
        ours = median(times[name])
        lines.append(f"  {label:42s} {ours:8.2f} ms   {base_name:22s} {base:8.2f} ms   "
                     f"ratio {ours / base:5.2f}x")
    lines.append(f"  master CPU per status: {master_ms:.2f} ms (over {max(rounds, 200)} calls)")
    return lines


def _scale_cli(count: int, env: dict[str, str]) -> None:
    subprocess.run([PYTHON, "-m", "pycluster", "scale", str(count), "--name", "bench"],
                   check=True, capture_output=True, env={**os.environ, **env})


def _wrk(port: int, duration: float) -> subprocess.Popen[str]:
    return subprocess.Popen(["wrk", "-t1", "-c64", f"-d{duration:g}s", f"http://{HOST}:{port}/"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _finish_wrk(wrk: subprocess.Popen[str]) -> tuple[int, int]:
    """Stop wrk now (SIGINT: it prints its report) and return (requests, failed)."""
    try:
        if wrk.poll() is None:
            wrk.send_signal(signal.SIGINT)
        report, _ = wrk.communicate(timeout=60)
    finally:
        if wrk.poll() is None:
            wrk.kill()
            wrk.wait()
    requests, errors, non_2xx = parse_wrk(report)
    return requests, sum(errors.values()) + non_2xx


def scale_trial(scratch: Path, duration: float, cycles: int, scale: bool
                ) -> tuple[int, int, int, float]:
    """pycluster under wrk for at least *duration* s; scale 2→16→2 *cycles* times if
    *scale*: (requests, failed, scalings done, seconds of load)."""
    runtime = tempfile.mkdtemp(prefix="xdg-", dir=scratch)
    port = free_port()
    env = _env(port, runtime)
    path = os.path.join(runtime, "pycluster", "bench.sock")
    done = 0
    log_name = "scale.log" if scale else "steady.log"
    with (scratch / log_name).open("wb") as log, running(
        [PYTHON, "-m", "pycluster", "run", APP, "-w", "2", "--name", "bench",
         "--bind", f"{HOST}:{port}"],
        env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
    ) as master:
        wait_port(port, master)
        _wait(lambda: _listening(path, 2), "2 listening workers")
        wrk = _wrk(port, 3600)
        start = time.monotonic()
        try:
            for _ in range(cycles if scale else 0):
                time.sleep(1.0)
                _scale_cli(16, env)
                _wait(lambda: _listening(path, 16), "16 listening workers")
                time.sleep(1.0)
                _scale_cli(2, env)
                _wait(lambda: _listening(path, 2), "back to 2 workers")
                done += 2
            time.sleep(max(1.0, start + duration - time.monotonic()))
        finally:
            elapsed = time.monotonic() - start
            requests, failed = _finish_wrk(wrk)
        if master.poll() is not None:
            msg = f"the master exited during the run; see {scratch / log_name}"
            raise RuntimeError(msg)
    return requests, failed, done, elapsed


def _signal_gunicorn(pid: int, sig: signal.Signals, log: Path) -> None:
    """Send *sig* and wait until gunicorn logs that it handled it: its arbiter keeps at
    most five pending signals and drops the rest, so a burst of 14 would lose some."""
    line = f"Handling signal: {sig.name[3:].lower()}"
    seen = log.read_text(errors="replace").count(line)
    os.kill(pid, sig)
    _wait(lambda: log.read_text(errors="replace").count(line) > seen, f"gunicorn {line}", 30)


def gunicorn_trial(scratch: Path, duration: float, cycles: int
                   ) -> tuple[int, int, int, float] | None:
    """gunicorn -k gthread, 2 workers, scaled to 16 and back with SIGTTIN/SIGTTOU."""
    gunicorn = shutil.which("gunicorn")
    if gunicorn is None:
        return None
    port = free_port()
    cmd = [gunicorn, "-k", "gthread", "--threads", "4", "-w", "2",
           "-b", f"{HOST}:{port}", "--chdir", str(SHARED_BENCH), "wsgi_hello:app"]
    log_path = scratch / "gunicorn.log"
    with log_path.open("wb") as log, running(
        cmd, {}, cwd=SHARED_BENCH, stdout=log, stderr=subprocess.STDOUT,
    ) as master:
        wait_port(port, master)
        _wait(lambda: len(children(master.pid)) == 2, "2 gunicorn workers", 30)
        wrk = _wrk(port, 3600)
        start = time.monotonic()
        done = 0
        try:
            for _ in range(cycles):
                time.sleep(1.0)
                for _ in range(14):
                    _signal_gunicorn(master.pid, signal.SIGTTIN, log_path)
                _wait(lambda: len(children(master.pid)) == 16, "16 gunicorn workers", 60)
                time.sleep(1.0)
                for _ in range(14):
                    _signal_gunicorn(master.pid, signal.SIGTTOU, log_path)
                _wait(lambda: len(children(master.pid)) == 2, "2 gunicorn workers", 120)
                done += 2
            time.sleep(max(1.0, start + duration - time.monotonic()))
        finally:
            elapsed = time.monotonic() - start
            requests, failed = _finish_wrk(wrk)
    return requests, failed, done, elapsed


def main(argv: list[str] | None = None) -> int:
    """Run both parts and print the figures; 0 if scaling failed no request."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--workers", type=int, default=64)
    parser.add_argument("--duration", type=float, default=15.0,
                        help="least seconds of load per trial (longer if scaling takes longer)")
    parser.add_argument("--cycles", type=int, default=2)
    args = parser.parse_args(argv)
    scratch = Path(tempfile.mkdtemp(prefix="pycluster-control-"))
    for line in status_round_trip(args.rounds, args.workers, scratch):
        print(line, flush=True)
    if missing("wrk"):
        say("wrk is not installed: no scaling figure")
        return 0
    say(f"scale: pycluster 2->16->2 x{args.cycles} under wrk -t1 -c64, >= {args.duration:g} s")
    scaled = scale_trial(scratch, args.duration, args.cycles, scale=True)
    say("scale: the same without scaling, as long")
    steady = scale_trial(scratch, scaled[3], args.cycles, scale=False)
    say("scale: gunicorn -k gthread with SIGTTIN/SIGTTOU")
    peer = gunicorn_trial(scratch, scaled[3], args.cycles)
    print(f"scale 2->16->2 x{args.cycles} under wrk -t1 -c64 keep-alive:", flush=True)
    print(f"  {'server':34s} {'scalings':>8s} {'seconds':>7s} {'requests':>10s} {'req/s':>8s} "
          f"{'failed':>7s}")
    rows = [("pycluster scale (control socket)", scaled),
            ("pycluster, no scaling (baseline)", steady)]
    if peer is not None:
        rows.append(("gunicorn gthread TTIN/TTOU (peer)", peer))
    for name, (requests, failed, done, seconds) in rows:
        print(f"  {name:34s} {done:8d} {seconds:7.1f} {requests:10,d} {requests / seconds:8,.0f} "
              f"{failed:7d}")
    ratio = (scaled[0] / scaled[3]) / (steady[0] / steady[3])
    print(f"  req/s scaled/steady: {ratio:.2f}x; failed requests with "
          f"scaling: {scaled[1]} (target 0: {'met' if scaled[1] == 0 else 'NOT met'})")
    say(f"logs in {scratch}")
    return 0 if scaled[1] == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
