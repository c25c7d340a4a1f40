"""Reliability figures: chaos under load (beside gunicorn and uvicorn), master death, crash
loops, and leaks over 1000 fork/exit cycles.

``python benchmarks/reliability.py [--quick]`` (about 5 minutes; ``--quick`` shortens
every part for a smoke run). Progress goes to stderr, the result table to stdout.

1. Chaos: each server runs 2 workers on 127.0.0.1 (an ephemeral port, read from
   ``/proc``) under ``wrk -t1 -c64`` keep-alive load for 30 s; every 250 ms a random
   worker — a child of the server started here, nothing else — is stopped (SIGSTOP), its
   established connections are counted (each has at most one request in flight: wrk does
   not pipeline), and it is SIGKILLed. Servers: pycluster (``rel_hello.py``: examples/
   hello.py's protocol with respawn), gunicorn sync workers (``-w 2``,
   /work/shared/bench/wsgi_hello.py) and ``uvicorn --workers 2``
   (/work/shared/bench/asgi_hello.py). Printed: kills, requests, errors (wrk's socket
   errors, non-2xx and timeouts), errors per kill, the in-flight bound, how many kills the
   worker count was back to 2 before the next one, and whether the master lived.
2. Master death: 100 fresh clusters of 2-4 workers (CPU loop, blocked in read(),
   ignoring SIGTERM with all signals blocked and a thread in sigwait); SIGKILL the master;
   count the clusters with no worker left 1 s later (pidfds, so no pid reuse).
3. Crash loops: workers that raise at import, exit 1 after 50 ms, segfault or abort,
   with respawn (4 restarts): exit code, forks, seconds, the one log line saying why.
4. Leaks: 1000 workers that exit at once, 20 at a time; the master's fds and RSS after
   the first 100 and at the end, zombies seen after their exit event.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import re
import select
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from _common import HERE, PYTHON, SHARED_BENCH, missing, running, say

from pycluster._procfs import cmdline, held_connections, listening_ports, live_children, state

N = 2
SERVERS: dict[str, list[str]] = {
    "pycluster": [PYTHON, str(HERE / "rel_hello.py")],
    "gunicorn": [PYTHON, "-m", "gunicorn", "-w", str(N), "-b", "127.0.0.1:0",
                 "--chdir", str(SHARED_BENCH), "--log-level", "warning", "wsgi_hello:app"],
    "uvicorn": [PYTHON, "-m", "uvicorn", "asgi_hello:app", "--workers", str(N), "--host",
                "127.0.0.1", "--port", "0", "--app-dir", str(SHARED_BENCH),
                "--log-level", "warning"],
}


def workers(pid: int) -> list[int]:
    """Running children of server *pid*, multiprocessing's resource tracker excluded."""
    return [c for c in live_children(pid)
            if not any("resource_tracker" in arg for arg in cmdline(c))]


def wait_for(predicate: Any, what: str, timeout: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            msg = f"timed out waiting for {what}"
            raise RuntimeError(msg)
        time.sleep(0.01)


def parse_wrk(text: str) -> dict[str, int]:
    """Requests, failed requests (connect, read and write errors, non-2xx answers) and
    timeouts (answers slower than wrk's 2 s: late, not lost) from wrk's output."""
    requests = re.search(r"(\d+) requests in", text)
    found = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), "
                      r"timeout (\d+)", text)
    connect, read, write, timeout = (int(x) for x in found.groups()) if found else (0, 0, 0, 0)
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    errors = connect + read + write + (int(non2xx.group(1)) if non2xx else 0)
    return {"requests": int(requests.group(1)) if requests else 0, "errors": errors,
            "timeouts": timeout, "read": read, "write": write, "connect": connect}


def chaos(name: str, duration: float, interval: float, seed: int) -> dict[str, Any]:
    """One server through the chaos run; returns its figures."""
    rng = random.Random(seed)
    with tempfile.TemporaryFile() as log, running(SERVERS[name], {"WORKERS": str(N)},
                                                  stdout=log, stderr=log) as proc:
        port = wait_for(lambda: (listening_ports(proc.pid) or [None])[0]
                        if proc.poll() is None else -1,
                        f"{name} to listen")
        if port == -1:
            log.seek(0)
            msg = f"{name} exited: {log.read().decode()[-500:]}"
            raise RuntimeError(msg)
        wait_for(lambda: len(workers(proc.pid)) == N, f"{name}: {N} workers")
        time.sleep(1.0)  # let the workers finish booting before the load starts
        wrk = subprocess.Popen(["wrk", "-t1", "-c64", f"-d{duration:g}s",
                                f"http://127.0.0.1:{port}/"],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            kills = in_flight = recovered = 0
            recovery: list[float] = []
            master_lived = True
            start = time.monotonic()
            next_kill = start + 0.5
            end = start + duration - 0.5
            while next_kill < end:
                time.sleep(max(0.0, next_kill - time.monotonic()))
                if proc.poll() is not None:
                    master_lived = False
                    break
                live = workers(proc.pid)
                if not live:
                    next_kill += interval
                    continue
                victim = rng.choice(live)
                with contextlib.suppress(ProcessLookupError):
                    os.kill(victim, signal.SIGSTOP)
                    # kill() returns before the victim stops; until it has, it may accept
                    wait_for(lambda v=victim: state(v) in ("T", "Z", None), "SIGSTOP", 10)
                    in_flight += held_connections(victim, port)
                    os.kill(victim, signal.SIGKILL)
                    kills += 1
                killed_at = time.monotonic()
                next_kill = max(next_kill + interval, killed_at + interval / 2)
                while time.monotonic() < next_kill:
                    live = [p for p in workers(proc.pid) if p != victim]
                    if len(live) >= N:
                        recovered += 1
                        recovery.append(time.monotonic() - killed_at)
                        break
                    time.sleep(0.005)
            output, _ = wrk.communicate(timeout=duration + 30)
        finally:
            if wrk.poll() is None:
                wrk.kill()
                wrk.wait()
        final = False
        with contextlib.suppress(RuntimeError):
            final = bool(wait_for(lambda: len(workers(proc.pid)) == N, "final count", 30))
        master_lived = master_lived and proc.poll() is None
    figures = parse_wrk(output)
    recovery.sort()
    return {"kills": kills, **figures, "in_flight": in_flight, "recovered": recovered,
            "recovery_ms": 1000 * recovery[len(recovery) // 2] if recovery else None,
            "final": final, "master": master_lived}


DEATH_MIXES = [["cpu", "syscall"], ["sigblock", "cpu", "syscall"], ["syscall", "sigblock"],
               ["cpu", "sigblock", "syscall", "cpu"], ["sigblock", "sigblock", "cpu"]]


def one_death(round_: int) -> tuple[bool, float | None, int]:
    """Start a cluster, SIGKILL its master, return (no worker left 1 s later, seconds
    until the last one left, workers)."""
    kinds = DEATH_MIXES[round_ % len(DEATH_MIXES)]
    proc = subprocess.Popen([PYTHON, str(HERE / "rel_cluster.py"), "death", ",".join(kinds)],
                            stdout=subprocess.PIPE, start_new_session=True)
    pidfds: dict[int, int] = {}
    try:
        assert proc.stdout is not None
        ready, _, _ = select.select([proc.stdout], [], [], 60)
        line = proc.stdout.readline() if ready else b""
        pids = json.loads(line)["pids"]
        pidfds = {pid: os.pidfd_open(pid) for pid in pids}
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        killed = time.monotonic()
        left = dict(pidfds)
        last = None
        while left:
            remaining = killed + 1.0 - time.monotonic()
            if remaining <= 0:
                break
            done, _, _ = select.select(list(left.values()), [], [], remaining)
            left = {p: f for p, f in left.items() if f not in done}
            last = time.monotonic() - killed
        return not left, last if not left else None, len(pids)
    finally:
        for fd in pidfds.values():
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(fd, signal.SIGKILL)
            os.close(fd)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()


def crash(kind: str) -> dict[str, Any]:
    start = time.monotonic()
    result = subprocess.run([PYTHON, str(HERE / "rel_cluster.py"), "crash", kind],
                            capture_output=True, text=True, timeout=120, check=False)
    seconds = time.monotonic() - start
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    why = [line for line in result.stderr.splitlines() if "gives up" in line]
    return {"code": result.returncode, "forks": summary["forks"], "seconds": seconds,
            "why": why}


def leaks(total: int, batch: int) -> dict[str, Any]:
    start = time.monotonic()
    result = subprocess.run([PYTHON, str(HERE / "rel_cluster.py"), "leaks", str(total),
                             str(batch)], capture_output=True, text=True, timeout=900,
                            check=False)
    report = json.loads(result.stdout.strip().splitlines()[-1])
    report["seconds"] = time.monotonic() - start
    return report


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="short smoke run")
    options = parser.parse_args()
    duration, deaths, cycles = (6.0, 10, 100) if options.quick else (30.0, 100, 1000)
    lines: list[str] = []

    # 1. chaos
    servers = [s for s in SERVERS if s == "pycluster" or not missing(s)]
    rows = {}
    if missing("wrk"):
        lines.append("1. chaos: skipped (wrk is not installed)")
    else:
        for i, name in enumerate(servers):
            say(f"chaos: {name}, {duration:g} s of wrk -t1 -c64, a SIGKILL every 250 ms")
            try:
                rows[name] = chaos(name, duration, 0.25, seed=i + 1)
            except RuntimeError as exc:
                say(f"chaos: {name} failed: {exc}")
        lines.append(f"1. Chaos under load: {N} workers, wrk -t1 -c64 keep-alive, "
                     f"{duration:g} s, SIGKILL of a random worker every 250 ms")
        lines.append(f"   {'server':<10} {'kills':>6} {'requests':>10} {'errors':>7} "
                     f"{'err/kill':>8} {'in-flight':>9} {'errors<=':>8} {'timeouts':>8} "
                     f"{'back to N':>10} {'median ms':>9} {'final N':>7} {'master':>7}")
        for name, r in rows.items():
            per_kill = r["errors"] / r["kills"] if r["kills"] else 0.0
            med = f"{r['recovery_ms']:.0f}" if r["recovery_ms"] is not None else "-"
            lines.append(
                f"   {name:<10} {r['kills']:>6} {r['requests']:>10} {r['errors']:>7} "
                f"{per_kill:>8.1f} {r['in_flight']:>9} "
                f"{'yes' if r['errors'] <= r['in_flight'] else 'NO':>8} {r['timeouts']:>8} "
                f"{r['recovered']:>4}/{r['kills']:<5} {med:>9} "
                f"{'yes' if r['final'] else 'NO':>7} {'up' if r['master'] else 'DIED':>7}")
        lines.append("   errors: wrk's connect/read/write errors and non-2xx answers; "
                     "timeouts: answers slower than wrk's 2 s (late, not failed);")
        lines.append("   in-flight: connections the victims held when stopped (each has at "
                     "most one request in flight);")
        lines.append("   back to N: kills after which the worker count was N again before "
                     "the next kill (median ms: how long it took)")

    # 2. master death
    say(f"master death: {deaths} clusters, SIGKILL each master")
    with ThreadPoolExecutor(3) as pool:
        results = list(pool.map(one_death, range(deaths)))
    clean = sum(1 for ok, _, _ in results if ok)
    slowest = max((t for _, t, _ in results if t is not None), default=0.0)
    total_workers = sum(n for _, _, n in results)
    lines.append("")
    lines.append(f"2. Master death: {clean} of {deaths} clusters had no worker left 1 s after "
                 f"the master's SIGKILL ({total_workers} workers; slowest last exit "
                 f"{1000 * slowest:.0f} ms)")

    # 3. crash loops
    lines.append("")
    lines.append("3. Crash loops (respawn, max_restarts=4, 2 workers)")
    lines.append(f"   {'worker':<18} {'exit':>4} {'forks':>5} {'seconds':>7}  log line saying why")
    for kind in ("raise-at-import", "exit-after-50ms", "segfault", "abort"):
        say(f"crash loop: {kind}")
        r = crash(kind)
        why = r["why"][0].split(" ", 3)[-1] if len(r["why"]) == 1 else f"{len(r['why'])} lines!"
        lines.append(f"   {kind:<18} {r['code']:>4} {r['forks']:>5} {r['seconds']:>7.1f}  {why}")

    # 4. leaks
    say(f"leaks: {cycles} fork/exit cycles, 20 at a time")
    report = leaks(cycles, 20)
    samples = report["samples"]
    warm, last = samples[min(4, len(samples) - 1)], samples[-1]
    lines.append("")
    lines.append(f"4. Leaks: {report['exited']} fork/exit cycles (20 at a time) in "
                 f"{report['seconds']:.0f} s, exit code {report['code']}")
    lines.append(f"   master fds:  {warm[1]} after {warm[0]} cycles, {last[1]} after {last[0]} "
                 f"(min {min(s[1] for s in samples[4:])}, max {max(s[1] for s in samples[4:])})")
    lines.append(f"   master RSS:  {warm[2]} KiB after {warm[0]} cycles, {last[2]} KiB after "
                 f"{last[0]} ({last[2] - warm[2]:+d} KiB)")
    lines.append(f"   zombies: {report['quiet_zombies']} at batch ends, {report['stale']} seen "
                 f"after their exit event in {report['checks']} checks; "
                 f"{report['bad_exits']} exits other than 0")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
