"""``pycluster run main:app`` against the servers people use, side by side in one run.

Same app object, 2 workers each, everything on 127.0.0.1:
- FastAPI (``serve_apps:fastapi_app``): ``pycluster run`` (uvicorn in each worker) vs
  ``uvicorn --workers 2`` vs ``gunicorn -k uvicorn_worker.UvicornWorker``;
- Flask (``serve_apps:flask_app``): ``pycluster run`` (waitress, 4 threads a worker) vs
  ``gunicorn -k gthread --threads 4``.

Three figures per server:
1. requests/s under ``wrk -t1 -c64 -d5s`` (after a 1 s warm-up; interleaved rounds,
   median); the ratio is against the best peer, target >= 0.97x;
2. failed requests (wrk socket errors + non-2xx) over 10 rolling reloads (SIGHUP to the
   master) under ``wrk -c64`` keep-alive load; target 0 for pycluster;
3. requests in flight at SIGTERM: 32 requests to ``/slow`` (0.5 s each) are sent, the
   master gets SIGTERM while they run; how many complete with 200, and the exit code;
4. ``pycluster run --reload``: failed requests while the Flask app's file is edited
   (``--reloads`` times, ``--interval`` apart) under the same load; target 0.

    python benchmarks/serve.py [--rounds 2] [--reloads 10] [--interval 5] [--seconds 5]
"""

from __future__ import annotations

import argparse
import http.client
import os
import signal
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import reload
from _common import HERE, PYTHON, free_port, interleave, median, missing, running, say, wait_port
from hello import wrk

HOST = "127.0.0.1"
SLOW_CLIENTS = 32


def servers(port: int) -> dict[str, tuple[str, list[str]]]:
    """name -> (app kind, command line), every one with 2 workers on HOST:port."""
    bind = f"{HOST}:{port}"
    pycluster = [PYTHON, "-m", "pycluster", "run", "--workers", "2", "--bind", bind]
    gunicorn = [PYTHON, "-m", "gunicorn", "--workers", "2", "--bind", bind,
                "--graceful-timeout", "30", "--no-control-socket"]
    return {
        "pycluster-fastapi": ("fastapi", [*pycluster, "serve_apps:fastapi_app"]),
        "uvicorn-fastapi": ("fastapi", [PYTHON, "-m", "uvicorn", "--workers", "2",
                                        "--no-access-log", "--log-level", "warning",
                                        "--host", HOST, "--port", str(port),
                                        "serve_apps:fastapi_app"]),
        "gunicorn-uvicorn-fastapi": ("fastapi", [*gunicorn, "-k", "uvicorn_worker.UvicornWorker",
                                                 "serve_apps:fastapi_app"]),
        "pycluster-flask": ("flask", [*pycluster, "--threads", "4", "serve_apps:flask_app"]),
        "gunicorn-gthread-flask": ("flask", [*gunicorn, "-k", "gthread", "--threads", "4",
                                             "serve_apps:flask_app"]),
    }


def throughput(name: str, seconds: int) -> dict[str, float]:
    port = free_port()
    _, cmd = servers(port)[name]
    with running(cmd, cwd=HERE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) as proc:
        wait_port(port, proc)
        answers(port)
        wrk(port, 1)
        rps = wrk(port, seconds)
    say(f"  {name:26s} {rps:9.0f} req/s")
    return {"rps": rps}


def answers(port: int, timeout: float = 60.0) -> None:
    """Wait until the app answers (a master may bind long before its workers serve)."""
    deadline = time.monotonic() + timeout
    while True:
        conn = http.client.HTTPConnection(HOST, port, timeout=5)
        try:
            conn.request("GET", "/")
            if conn.getresponse().status == 200:
                return
        except OSError:
            pass
        finally:
            conn.close()
        if time.monotonic() > deadline:
            msg = f"nothing answered on port {port} within {timeout} s"
            raise RuntimeError(msg)
        time.sleep(0.1)


def trial(name: str, reloads: int, interval: float, log: Path) -> reload.Result:
    """wrk -c64 for (reloads + 1) * interval seconds with a SIGHUP to the master every
    *interval*; the load starts once the app answers (not when the master has bound: wrk's
    first requests would wait for the workers to boot and count as timeouts)."""
    port = free_port()
    _, cmd = servers(port)[name]
    duration = interval * (reloads + 1)
    with log.open("wb") as out, running(cmd, cwd=HERE, stdout=out,
                                        stderr=subprocess.STDOUT) as proc:
        wait_port(port, proc)
        answers(port)
        time.sleep(2.0)  # the other worker up too
        load = subprocess.Popen(["wrk", "-t1", "-c64", f"-d{duration:g}s",
                                 f"http://{HOST}:{port}/"], stdout=subprocess.PIPE, text=True)
        try:
            start = time.monotonic()
            for i in range(1, reloads + 1):
                time.sleep(max(0.0, start + i * interval - time.monotonic()))
                os.kill(proc.pid, signal.SIGHUP)
            report, _ = load.communicate(timeout=duration + 60)
        finally:
            if load.poll() is None:
                load.kill()
                load.wait()
    requests, errors, non_2xx = reload.parse_wrk(report)
    done = None
    if name.startswith("pycluster"):
        done = log.read_text(errors="replace").count("rolling reload finished")
    return reload.Result(name, reloads, done, requests, non_2xx=non_2xx, **errors)


def in_flight(name: str) -> tuple[int, int | None]:
    """Send SLOW_CLIENTS requests to /slow, SIGTERM the master while they run; return
    (answered 200, the master's exit code)."""
    port = free_port()
    _, cmd = servers(port)[name]
    ok = [0]
    lock = threading.Lock()

    def one() -> None:
        conn = http.client.HTTPConnection(HOST, port, timeout=30)
        try:
            conn.request("GET", "/slow")
            if conn.getresponse().status == 200:
                with lock:
                    ok[0] += 1
        except OSError:
            pass
        finally:
            conn.close()

    with running(cmd, cwd=HERE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) as proc:
        wait_port(port, proc)
        answers(port)
        time.sleep(2.0)  # the other worker up too (the first answer comes from either)
        threads = [threading.Thread(target=one) for _ in range(SLOW_CLIENTS)]
        for thread in threads:
            thread.start()
        time.sleep(0.2)  # the requests are in the apps' 0.5 s sleeps
        os.kill(proc.pid, signal.SIGTERM)
        for thread in threads:
            thread.join(40)
        try:
            code: int | None = proc.wait(40)
        except subprocess.TimeoutExpired:
            code = None
    return ok[0], code


def edits_under_load(edits: int, interval: float) -> tuple[reload.Result, int]:
    """``pycluster run --reload`` on a copy of serve_apps.py under wrk load, the file
    edited *edits* times; return wrk's result and how many reloads finished."""
    folder = Path(tempfile.mkdtemp(prefix="pycluster-edit-"))
    source = folder / "serve_apps.py"
    source.write_text((HERE / "serve_apps.py").read_text())
    port = free_port()
    cmd = [PYTHON, "-m", "pycluster", "run", "--workers", "2", "--bind", f"{HOST}:{port}",
           "--reload", "serve_apps:flask_app"]
    log = folder / "pycluster.log"
    duration = interval * (edits + 1)
    with log.open("wb") as out, running(cmd, cwd=folder, stdout=out,
                                        stderr=subprocess.STDOUT) as proc:
        wait_port(port, proc)
        answers(port)
        time.sleep(2.0)  # the other worker up too
        load = subprocess.Popen(["wrk", "-t1", "-c64", f"-d{duration:g}s",
                                 f"http://{HOST}:{port}/"], stdout=subprocess.PIPE, text=True)
        try:
            start = time.monotonic()
            for i in range(1, edits + 1):
                time.sleep(max(0.0, start + i * interval - time.monotonic()))
                with source.open("a") as f:
                    f.write(f"# edit {i}\n")
            report, _ = load.communicate(timeout=duration + 60)
        finally:
            if load.poll() is None:
                load.kill()
                load.wait()
    requests, errors, non_2xx = reload.parse_wrk(report)
    done = log.read_text(errors="replace").count("rolling reload finished")
    return reload.Result("pycluster --reload", edits, done, requests, non_2xx=non_2xx,
                         **errors), done


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--reloads", type=int, default=10)
    parser.add_argument("--interval", type=float, default=5.0,
                        help="seconds between SIGHUPs (long enough for a reload to finish)")
    args = parser.parse_args(argv)
    if missing("wrk"):
        say("wrk is not installed; nothing to measure")
        return 2
    names = list(servers(0))
    say(f"throughput: {args.rounds} rounds of wrk -t1 -c64 -d{args.seconds}s, 2 workers each")
    got = interleave(args.rounds, {n: (lambda n=n: throughput(n, args.seconds)) for n in names})
    rps = {n: median(got[n]["rps"]) for n in names}
    scratch = Path(tempfile.mkdtemp(prefix="pycluster-serve-"))
    failed: dict[str, reload.Result] = {}
    for name in names:
        failed[name] = trial(name, args.reloads, args.interval, scratch / f"{name}.log")
        say("  " + failed[name].line())
    flight = {name: in_flight(name) for name in names}
    edited, _ = edits_under_load(args.reloads, args.interval)
    say("  " + edited.line())
    met = True
    print(f"{'server':26s} {'req/s':>9s} {'vs best peer':>12s} {'failed/reloads':>15s} "
          f"{'reloads done':>12s} {'in flight at SIGTERM':>21s} {'exit':>5s}")
    for kind in ("fastapi", "flask"):
        group = [n for n in names if servers(0)[n][0] == kind]
        best_peer = max(rps[n] for n in group if not n.startswith("pycluster"))
        for name in group:
            result = failed[name]
            errors = result.errors + result.non_2xx
            done, code = flight[name]
            ratio = rps[name] / best_peer
            if name.startswith("pycluster"):
                met &= ratio >= 0.97 and errors == 0 and done == SLOW_CLIENTS and code == 0
            reloads_done = "-" if result.reloads_done is None else str(result.reloads_done)
            print(f"{name:26s} {rps[name]:9.0f} {ratio:11.2f}x {errors:8d}/{result.sighups:<6d} "
                  f"{reloads_done:>12s} {done:>14d}/{SLOW_CLIENTS:<6d} {code!s:>5s}", flush=True)
    edit_errors = edited.errors + edited.non_2xx
    met &= edit_errors == 0
    print(f"pycluster run --reload, Flask app, {edited.sighups} edits under wrk -c64: "
          f"{edit_errors} failed of {edited.requests} requests, {edited.reloads_done} reloads "
          "finished", flush=True)
    print(f"targets (pycluster: >= 0.97x the best peer's req/s, 0 failed requests over "
          f"{args.reloads} reloads, all {SLOW_CLIENTS} in-flight requests answered, exit 0): "
          f"{'met' if met else 'NOT met'}", flush=True)
    say(f"logs in {scratch}")
    return 0 if met else 1


if __name__ == "__main__":
    raise SystemExit(main())
