"""``start_method="forkserver"`` against ``"spawn"``, side by side in one run (issue 12).

The app is ``fs_app:main`` (an asyncio hello world that drains on disconnect), plain and
with ``BENCH_NUMPY=1`` (numpy imported and an 8 MB table built at import). Each variant
runs a real :class:`pycluster.Master` in this process, from a scratch copy of the app:

- fork → listening: one warm-up worker (for forkserver it starts the template, whose
  import is not counted), then FORKS workers forked one after another PAUSE s apart,
  each timed from ``master.fork()`` to its ``listening`` event (median); then FORKS more
  back to back, each forked as the one before listens;
- SIGKILLed worker → replacement listening: with the respawn plugin, KILLS workers of
  different slots SIGKILLed one after another PAUSE s apart, each timed from the kill to the
  replacement's ``listening`` (median; a slot's first death is replaced at once);
- memory: 8 workers of the numpy app, listening; the sum of their PSS (``Pss:`` of
  ``/proc/PID/smaps_rollup``: shared pages are divided among the processes sharing
  them), and for forkserver also with the template's own PSS added;
- reload under load: 2 workers of the hello app, ``wrk -t1 -c64`` for DURATION s; after
  a third of it the module's ``VERSION`` is rewritten to ``v2`` and ``master.reload()``
  runs (reload plugin); wrk's socket errors and non-2xx answers are counted, and one
  request after the reload must answer ``v2``.

    python benchmarks/forkserver.py [--forks 8] [--kills 4] [--duration 6] [--pause 0.1]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import HERE, Row, missing, say
from core import table
from reload import parse_wrk

import pycluster

HOST = "127.0.0.1"
DEADLINE = 120.0


def pss_kib(pid: int) -> int:
    """The proportional set size of *pid* in KiB (``/proc/PID/smaps_rollup``)."""
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            if line.startswith("Pss:"):
                return int(line.split()[1])
    msg = f"no Pss line for pid {pid}"
    raise RuntimeError(msg)


def cpu_ms(pid: int) -> float:
    """CPU time *pid* has run so far, all its threads, in ms (``schedstat``: ns, exact)."""
    total = 0
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/schedstat") as f:
            total += int(f.read().split()[0])
    return total / 1e6


def make_master(scratch: Path, method: str, numpy: bool, **plugins: dict[str, Any]
                ) -> pycluster.Master:
    env = {"BENCH_NUMPY": "1"} if numpy else {}
    master = pycluster.Master(target="fs_app:main", start_method=method, cwd=str(scratch),
                              bind=f"{HOST}:0", args=[], env=env, kill_timeout=10)
    for name, options in plugins.items():
        master.use(name, **options)
    return master


async def listening(worker: pycluster.Worker) -> float:
    """Wait for *worker*'s first ``listening``; return ``time.monotonic()`` then."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[float] = loop.create_future()

    def ready(address: Any) -> None:
        if not done.done():
            done.set_result(time.monotonic())

    def died(code: int | None, sig: str | None) -> None:
        if not done.done():
            done.set_exception(RuntimeError(f"worker {worker.id} died ({code}, {sig})"))

    worker.once("listening", ready)
    worker.once("exit", died)
    return await asyncio.wait_for(done, DEADLINE)


async def with_master(master: pycluster.Master,
                      body: Callable[[pycluster.Master], Awaitable[dict[str, float]]]
                      ) -> dict[str, float]:
    """Run *master* while *body* measures; stop it and wait for its end."""
    serving = asyncio.ensure_future(master.serve())
    try:
        return await body(master)
    finally:
        if not master.stopping:
            master.stop()
        await asyncio.wait_for(serving, DEADLINE)


def start_costs(scratch: Path, method: str, numpy: bool, forks: int, kills: int,
                pause: float) -> dict[str, float]:
    """Median fork → listening (with *pause* s before each fork, and back to back) and
    SIGKILL → replacement listening (with *pause* s before each kill), in ms."""

    async def timed_fork(master: pycluster.Master) -> tuple[float, pycluster.Worker]:
        t0 = time.monotonic()
        worker = master.fork()
        return await listening(worker) - t0, worker

    async def body(master: pycluster.Master) -> dict[str, float]:
        await listening(master.fork())  # warm-up (forkserver: starts the template)
        spans, cpu, rushed = [], [], []
        for _ in range(forks):
            await asyncio.sleep(pause)
            span, worker = await timed_fork(master)
            spans.append(span)
            cpu.append(cpu_ms(worker.pid or 0))
        await asyncio.sleep(pause)
        for _ in range(forks):
            rushed.append((await timed_fork(master))[0])
        loop = asyncio.get_running_loop()
        respawns = []
        for victim in sorted(master.workers.values(), key=lambda w: w.slot)[:kills]:
            replaced: asyncio.Future[pycluster.Worker] = loop.create_future()

            def forked(worker: pycluster.Worker, slot: int = victim.slot,
                       future: asyncio.Future[pycluster.Worker] = replaced) -> None:
                if worker.slot == slot and not future.done():
                    future.set_result(worker)

            master.on("fork", forked)
            await asyncio.sleep(pause)
            t0 = time.monotonic()
            os.kill(victim.pid or 0, signal.SIGKILL)
            fresh = await asyncio.wait_for(replaced, DEADLINE)
            respawns.append(await listening(fresh) - t0)
            master.remove_listener("fork", forked)
        return {"fork": statistics.median(spans) * 1000, "cpu": statistics.median(cpu),
                "rushed": statistics.median(rushed) * 1000,
                "respawn": statistics.median(respawns) * 1000}

    master = make_master(scratch, method, numpy, respawn={"fail_fast": False})
    return asyncio.run(with_master(master, body))


def memory(scratch: Path, method: str, workers: int = 8) -> dict[str, float]:
    """Total PSS (MiB) of *workers* listening workers of the numpy app (and + template)."""

    async def body(master: pycluster.Master) -> dict[str, float]:
        forked = [master.fork() for _ in range(workers)]
        await asyncio.gather(*(listening(w) for w in forked))
        await asyncio.sleep(0.5)  # let start-up garbage settle the same way for both
        pids = {w.pid for w in forked}
        total = sum(pss_kib(pid or 0) for pid in pids)
        others = [p for p in _children() if p not in pids]
        extra = sum(pss_kib(p) for p in others)
        return {"pss": total / 1024, "pss_all": (total + extra) / 1024}

    master = make_master(scratch, method, numpy=True)
    return asyncio.run(with_master(master, body))


def _children() -> list[int]:
    from pycluster._procfs import children

    return [p for p in children(os.getpid()) if os.path.exists(f"/proc/{p}/smaps_rollup")]


def reload_under_load(scratch: Path, method: str, duration: float) -> dict[str, float]:
    """wrk -t1 -c64 across one reload to new code: errors, non-2xx, whether v2 answers."""
    app = scratch / "fs_app.py"
    app.write_text((HERE / "fs_app.py").read_text())

    async def body(master: pycluster.Master) -> dict[str, float]:
        await asyncio.gather(listening(master.fork()), listening(master.fork()))
        port = master._bind[0][0]  # type: ignore[index]  # noqa: SLF001 - the real port
        wrk = await asyncio.create_subprocess_exec(
            "wrk", "-t1", "-c64", f"-d{duration:g}s", f"http://{HOST}:{port}/",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
        await asyncio.sleep(duration / 3)
        app.write_text(app.read_text().replace('VERSION = "v1"', 'VERSION = "v2"'))
        loop = asyncio.get_running_loop()
        outcome: asyncio.Future[str] = loop.create_future()
        master.once("reloaded", lambda: outcome.done() or outcome.set_result("ok"))
        master.once("reload_failed",
                    lambda reason: outcome.done() or outcome.set_result(reason))
        t0 = time.monotonic()
        master.reload()
        result = await asyncio.wait_for(outcome, DEADLINE)
        took = time.monotonic() - t0
        report = (await wrk.communicate())[0].decode()
        requests, errors, non_2xx = parse_wrk(report)
        reader, writer = await asyncio.open_connection(HOST, port)
        writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), DEADLINE)
        answer = await asyncio.wait_for(reader.readline(), DEADLINE)
        writer.close()
        return {"requests": requests, "failed": sum(errors.values()) + non_2xx,
                "v2": float(answer.rstrip().endswith(b"v2")), "ok": float(result == "ok"),
                "seconds": took}

    master = make_master(scratch, method, numpy=False, reload={})
    return asyncio.run(with_master(master, body))


def measure(forks: int = 8, kills: int = 4, duration: float = 6.0, pause: float = 0.1
            ) -> list[Row]:
    """Every figure for spawn and forkserver, side by side; the rows."""
    scratch = Path(tempfile.mkdtemp(prefix="pycluster-forkserver-"))
    try:
        shutil.copy(HERE / "fs_app.py", scratch / "fs_app.py")
        got: dict[tuple[str, str], dict[str, float]] = {}
        for numpy in (False, True):
            app = "numpy app" if numpy else "hello world"
            for method in ("spawn", "forkserver"):
                got[(method, app)] = r = start_costs(scratch, method, numpy, forks, kills,
                                                          pause)
                say(f"  {method:10} {app:11}: fork→listening {r['fork']:.1f} ms "
                    f"(back to back {r['rushed']:.1f} ms) "
                    f"(the worker's own CPU by then: {r['cpu']:.1f} ms), "
                    f"SIGKILL→replacement listening {r['respawn']:.1f} ms")
        for method in ("spawn", "forkserver"):
            got[(method, "memory")] = r = memory(scratch, method)
            say(f"  {method:10} 8 numpy workers: PSS {r['pss']:.1f} MiB "
                f"(with the template and anything else of the master's: {r['pss_all']:.1f})")
        if missing("wrk"):
            say("  wrk is missing: no reload figure")
        else:
            for method in ("spawn", "forkserver"):
                got[(method, "reload")] = r = reload_under_load(scratch, method, duration)
                say(f"  {method:10} reload under wrk -c64: {r['requests']:.0f} requests, "
                    f"{r['failed']:.0f} failed, reload {'done' if r['ok'] else 'FAILED'} in "
                    f"{r['seconds']:.2f} s, new code answers: {'yes' if r['v2'] else 'NO'}")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    rows = []
    for app in ("hello world", "numpy app"):
        fs, sp = got[("forkserver", app)], got[("spawn", app)]
        rows.append(Row(f"fork → listening, {app}", fs["fork"], sp["fork"], "<= 10 ms",
                        fs["fork"] <= 10, "ms", f"baseline: spawn; median of {forks}, "
                        f"{pause:g} s apart (load average now {os.getloadavg()[0]:.1f} on "
                        f"{os.cpu_count()} CPUs: wall time includes waiting for a CPU)"))
        rows.append(Row(f"  the same, back to back, {app}", fs["rushed"], sp["rushed"], "-",
                        None, "ms", f"baseline: spawn; median of {forks}, each forked as "
                        "the one before listens: the fork server's next spare may not be "
                        "ready, and it forks one directly"))
        rows.append(Row(f"a new worker's CPU until listening, {app}", fs["cpu"], sp["cpu"],
                        "-", None, "ms", "baseline: spawn; the worker's own CPU time "
                        "(all threads, /proc/PID/task/*/schedstat), which load does not "
                        "inflate; for forkserver since it was forked as a spare"))
        rows.append(Row(f"SIGKILL → replacement listening, {app}", fs["respawn"],
                        sp["respawn"], "< spawn", fs["respawn"] < sp["respawn"], "ms",
                        f"baseline: spawn; median of {kills}, {pause:g} s apart"))
    fs, sp = got[("forkserver", "memory")], got[("spawn", "memory")]
    rows.append(Row("PSS of 8 numpy workers", fs["pss"], sp["pss"], "<= 0.6x spawn",
                    fs["pss"] <= 0.6 * sp["pss"], "MiB",
                    f"baseline: spawn; with the template's PSS added: {fs['pss_all']:.1f} MiB "
                    f"({fs['pss_all'] / sp['pss_all']:.2f}x spawn's {sp['pss_all']:.1f})"))
    if ("forkserver", "reload") in got:
        fs, sp = got[("forkserver", "reload")], got[("spawn", "reload")]
        row = Row("failed requests, reload under wrk -c64", fs["failed"], sp["failed"],
                  "0, new code answers", None, "",
                  f"baseline: spawn; requests: forkserver {fs['requests']:,.0f}, spawn "
                  f"{sp['requests']:,.0f}; new code answers after it: forkserver "
                  f"{'yes' if fs['v2'] else 'NO'}, spawn {'yes' if sp['v2'] else 'NO'}")
        row.met = fs["failed"] == 0 and fs["v2"] == 1 and fs["ok"] == 1
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    """Measure, print the table; 0 if every target is met."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--forks", type=int, default=8)
    parser.add_argument("--kills", type=int, default=4)
    parser.add_argument("--duration", type=float, default=6.0)
    parser.add_argument("--pause", type=float, default=0.1,
                        help="seconds before each timed fork or kill (default 0.1)")
    options = parser.parse_args(argv)
    say(f"forkserver vs spawn: {options.forks} forks, {options.kills} kills, "
        f"{options.duration:g} s of wrk per reload")
    rows = measure(options.forks, options.kills, options.duration, options.pause)
    print(table(rows))
    return 0 if all(r.met is not False for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
