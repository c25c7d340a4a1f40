"""Reliability: chaos under load, master death, crash loops and leaks, with real processes.

Marked ``reliability`` (the quick run is ``pytest -m "not reliability"``; CI runs them).
``benchmarks/reliability.py`` runs the long versions and prints the figures: 30 s of chaos
beside gunicorn and uvicorn, 100 master deaths, the crash loops, 1000 fork/exit cycles.

- Chaos: a respawning cluster under keep-alive load, one worker SIGKILLed after another;
  the master stays up, the count returns to N after each kill, and no request fails
  unless it was in flight on a killed worker.
- Master death: SIGKILL of a master whose workers spin, block in a syscall or block
  signals in a thread leaves no worker behind.
- Crash loops: workers that raise at import, exit 1 after 50 ms, segfault or abort end a
  respawning master with a non-zero code and one log line that says why.
- Leaks: fork/exit cycles (300 here, 1000 in the benchmark) keep the master's fds
  equal and its RSS flat, and no zombie is ever left after its ``exit`` event.

Hostile IPC is in ``test_reliability_ipc.py``; bad input and security checks are in
``test_reliability_input.py``.
"""

from __future__ import annotations

import contextlib
import os
import random
import select
import signal
import threading
import time

import pytest
from helpers import DEADLINE, Proc, script, wait_until
from plugin_helpers import clients

import pycluster
from pycluster._procfs import (
    children,
    held_connections,
    live_children,
    open_fds,
    rss_kib,
    state,
    zombies,
)

pytestmark = pytest.mark.reliability


# -- helpers ----------------------------------------------------------------------------


def wait_gone(pidfds: dict[int, int], timeout: float) -> set[int]:
    """Wait until every process (pid → pidfd) has exited or *timeout* passed; return the
    pids still running."""
    deadline = time.monotonic() + timeout
    left = dict(pidfds)
    while left:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        ready, _, _ = select.select(list(left.values()), [], [], remaining)
        for fd in ready:
            left = {p: f for p, f in left.items() if f != fd}
    return set(left)


# -- 1. chaos under load --------------------------------------------------------------------

#: The hello world of examples/hello.py on 127.0.0.1, with respawn on and no crash-loop
#: guard (this test kills on purpose). The master prints the real port once.
CHAOS_APP = """
    import asyncio, json, os, sys, pycluster

    RESPONSE = b"HTTP/1.1 200 OK\\r\\nContent-Length: 12\\r\\n\\r\\nhello world\\n"

    class Hello(asyncio.Protocol):
        def connection_made(self, transport):
            self.transport, self.buffer = transport, b""
        def data_received(self, data):
            *requests, self.buffer = (self.buffer + data).split(b"\\r\\n\\r\\n")
            self.transport.write(RESPONSE * len(requests))

    async def serve():
        sock = pycluster.worker.listen(0, "127.0.0.1")
        server = await asyncio.get_running_loop().create_server(Hello, sock=sock)
        await server.serve_forever()

    if pycluster.is_primary:
        master = pycluster.Master(kill_timeout=5)
        master.use("respawn", max_restarts=100_000, stable_after=0.2)
        said = []
        def listening(worker, address):
            if not said:
                said.append(address.port)
                os.write(1, (json.dumps({"port": address.port}) + "\\n").encode())
        master.on("listening", listening)
        for _ in range(int(os.environ["WORKERS"])):
            master.fork()
        sys.exit(master.run())
    else:
        asyncio.run(serve())
"""


def test_chaos_sigkill_a_worker_every_250ms_under_keepalive_load(tmp_path):
    """Under keep-alive HTTP load (16 client connections), a random worker of a
    2-worker respawning cluster is SIGKILLed every 250 ms for 5 s: the master stays up
    through every kill, the count of running workers is back to 2 after each kill, every
    client keeps getting answers, and the failed requests are no more than the
    connections the killed workers held when they died (each held connection has at most
    one request in flight). Each victim is stopped (SIGSTOP, and seen stopped in /proc)
    before its connections are counted, so it cannot take a new one between the count
    and the SIGKILL."""
    n = 2
    script(tmp_path, CHAOS_APP, "app.py")
    rng = random.Random(1)
    kills = in_flight = 0
    with Proc(["app.py"], cwd=tmp_path, env={"WORKERS": str(n)}, start_new_session=True) as proc:
        try:
            port = proc.json(lambda m: "port" in m, "the master's port")["port"]
            wait_until(lambda: len(live_children(proc.pid)) == n, f"{n} workers")
            with clients(port, 16) as running:
                wait_until(lambda: all(c.ok for c in running), "every client answered once")
                end = time.monotonic() + 5
                while time.monotonic() < end:
                    victims = live_children(proc.pid)
                    assert len(victims) == n, victims
                    victim = rng.choice(victims)
                    os.kill(victim, signal.SIGSTOP)
                    # kill() returns before the victim stops; until it has, it may accept
                    wait_until(lambda v=victim: state(v) in ("T", "Z", None), "the victim stopped")
                    in_flight += held_connections(victim, port)
                    os.kill(victim, signal.SIGKILL)
                    kills += 1
                    wait_until(lambda v=victim: state(v) in (None, "Z") or v not in children(
                        proc.pid), "the victim to die")
                    assert proc.popen.poll() is None, "the master died"
                    wait_until(lambda v=victim: v not in live_children(proc.pid) and len(
                        live_children(proc.pid)) == n, f"the worker count back to {n}")
                    threading.Event().wait(0.25)  # pacing between kills, not a synchronisation
                before = [c.ok for c in running]
                wait_until(lambda: all(c.ok > b for c, b in zip(running, before, strict=True)),
                           "every client answered after the last kill")
            failures = [f for c in running for f in c.failures]
            served = sum(c.ok for c in running)
            assert proc.popen.poll() is None, "the master died"
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGTERM)
        assert proc.wait() == 0
    assert kills >= 5
    assert served > 0
    assert len(failures) <= in_flight, (len(failures), in_flight, failures[:5])


# -- 2. master death ----------------------------------------------------------------------

#: Master for the death test: forks one worker per kind and prints their pids once each
#: has said it is about to block.
DEATH_MASTER = """
    import json, os, sys, pycluster
    kinds = sys.argv[1].split(",")
    master = pycluster.Master(exec="worker.py", args=[], kill_timeout=60)
    ready = {}
    def on_message(worker, message):
        ready[worker.id] = worker.pid
        if len(ready) == len(kinds):
            os.write(1, (json.dumps({"pids": sorted(ready.values())}) + "\\n").encode())
    master.on("message", on_message)
    for kind in kinds:
        master.fork(env={"KIND": kind})
    sys.exit(master.run())
"""

#: A worker that is busy in a way that could keep it from noticing its master's death.
DEATH_WORKER = """
    import os, select, signal, threading, time, pycluster
    w = pycluster.worker
    kind = os.environ["KIND"]
    if kind == "cpu":  # pure-Python CPU loop in the main thread
        w.send("ready")
        while True:
            pass
    elif kind == "syscall":  # blocked in read() on a pipe nobody writes to
        r, keep = os.pipe()
        w.send("ready")
        os.read(r, 1)
    elif kind == "sigblock":  # SIGTERM ignored, every signal blocked, a thread in sigwait
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.pthread_sigmask(signal.SIG_BLOCK, set(signal.Signals) - {signal.SIGKILL,
                                                                     signal.SIGSTOP})
        t = threading.Thread(target=signal.sigwait, args=({signal.SIGUSR1},))
        t.start()
        w.send("ready")
        select.select([], [], [])
"""

DEATH_MIXES = [
    ["cpu", "syscall"], ["sigblock", "cpu", "syscall"], ["syscall", "sigblock"],
    ["cpu", "sigblock", "syscall", "cpu"], ["sigblock", "sigblock"],
]


def test_no_worker_outlives_a_sigkilled_master_ten_times(tmp_path):
    """Ten times, a fresh cluster of 2-4 workers (busy in a CPU loop, blocked in a read()
    syscall, or ignoring SIGTERM with every signal blocked and a thread in sigwait) loses
    its master to SIGKILL: every worker has exited before the deadline."""
    script(tmp_path, DEATH_MASTER, "master.py")
    script(tmp_path, DEATH_WORKER, "worker.py")
    for round_ in range(10):
        kinds = DEATH_MIXES[round_ % len(DEATH_MIXES)]
        pidfds: dict[int, int] = {}
        with Proc(["master.py", ",".join(kinds)], cwd=tmp_path, start_new_session=True) as proc:
            try:
                pids = proc.json(lambda m: "pids" in m, f"round {round_}: {kinds} ready")["pids"]
                pidfds = {pid: os.pidfd_open(pid) for pid in pids}
                assert {p for p in pids if state(p) not in (None, "Z")} == set(pids)
                os.kill(proc.pid, signal.SIGKILL)
                assert proc.wait() == -signal.SIGKILL
                left = wait_gone(pidfds, DEADLINE)
                assert not left, f"round {round_} ({kinds}): workers {left} outlived the master"
            finally:
                for fd in pidfds.values():
                    with contextlib.suppress(ProcessLookupError):
                        signal.pidfd_send_signal(fd, signal.SIGKILL)
                    os.close(fd)


# -- 3. crash loops -------------------------------------------------------------------------

#: A master with the logging and respawn plugins (bounded: 4 restarts) and 2 workers.
CRASH_MASTER = """
    import json, os, sys, pycluster
    kind = sys.argv[1]
    settings = {"target": "boot_fails:main"} if kind == "target-import" else {"exec": "worker.py"}
    master = pycluster.Master(args=[], kill_timeout=5, env={"KIND": kind}, **settings)
    master.use("logging").use("respawn", max_restarts=4, min_delay=0.01, max_delay=0.05)
    forks = []
    master.on("fork", lambda w: forks.append(w.id))
    master.fork()
    master.fork()
    code = master.run()
    os.write(1, (json.dumps({"code": code, "forks": len(forks)}) + "\\n").encode())
    sys.exit(code)
"""

CRASH_WORKER = """
    import ctypes, os, resource, time
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # no core file for the crashes below
    kind = os.environ["KIND"]
    if kind == "raise-at-import":
        raise RuntimeError("the app is broken")
    import pycluster
    if kind == "exit-after-50ms":
        time.sleep(0.05)
        raise SystemExit(1)
    if kind == "segfault":
        ctypes.string_at(0)
    if kind == "abort":
        os.abort()
"""

CRASH_CAUSES = {
    "raise-at-import": "exit code 1",
    "exit-after-50ms": "exit code 1",
    "segfault": "signal SIGSEGV",
    "abort": "signal SIGABRT",
    "target-import": "failed to boot (exit code 3)",
}


@pytest.mark.parametrize("kind", list(CRASH_CAUSES))
def test_crash_loop_ends_the_master_non_zero_with_one_line_saying_why(tmp_path, kind):
    """Workers that raise at import, exit 1 after 50 ms, segfault, abort, or name a target
    that cannot be imported, with respawn on (4 restarts allowed): the master gives up
    after a bounded number of forks (2 workers + 4 restarts at most), exits non-zero
    before the deadline, and its log has exactly one line saying why, naming the cause."""
    script(tmp_path, CRASH_MASTER, "master.py")
    script(tmp_path, CRASH_WORKER, "worker.py")
    script(tmp_path, "import sys\nimport no_such_module_pyc  # noqa\n", "boot_fails.py")
    with Proc(["master.py", kind], cwd=tmp_path, read_stderr=True) as proc:
        summary = proc.json(lambda m: "code" in m, "the master's summary")
        assert proc.wait() == 1
        with contextlib.suppress(AssertionError):  # read stderr to its end (EOF)
            proc.expect_err(lambda line: False, "stderr's end")
        stderr = proc.finish()
    assert summary["code"] == 1
    assert 1 <= summary["forks"] <= 2 + 4
    why = [line for line in stderr.splitlines() if "gives up" in line]
    assert len(why) == 1, stderr
    assert CRASH_CAUSES[kind] in why[0], why


# -- 5. leaks -------------------------------------------------------------------------------


class LeakRun:
    """Forks *total* workers that exit at once, *batch* at a time, on a master in this
    process. At the end of each batch (no worker running) it samples this process's fds,
    RSS and zombie children; a thread samples zombies all along."""

    def __init__(self, master: pycluster.Master, total: int, batch: int) -> None:
        self.master, self.total, self.batch = master, total, batch
        self.forked = self.exited = 0
        self.samples: list[tuple[int, int, int]] = []  # (cycles, fds, rss KiB)
        self.quiet_zombies: list[set[int]] = []
        self.reported: set[int] = set()  # pids whose exit event was emitted (reaped)
        self.stale: set[int] = set()  # zombies found after their exit event
        self.zombie_checks = 0
        self.fd_kinds: list[list[str]] = []
        self._halt = threading.Event()
        self._scan = threading.Lock()  # the watcher's own /proc reads open fds too
        master.on("exit", self.on_exit)
        master.on("setup", lambda settings: self.fork_batch())

    def fork_batch(self) -> None:
        for _ in range(min(self.batch, self.total - self.forked)):
            self.master.fork()
            self.forked += 1

    def on_exit(self, worker: pycluster.Worker, code: int | None, sig: str | None) -> None:
        assert (code, sig) == (0, None), (worker, code, sig)
        self.reported.add(worker.pid)  # type: ignore[arg-type]
        self.exited += 1
        if self.master.workers:
            return
        with self._scan:
            self.quiet_zombies.append(zombies(os.getpid()))
            fds = sorted(link.split("[")[0] for link in open_fds(os.getpid()).values())
        rss = rss_kib(os.getpid())
        assert rss is not None
        self.fd_kinds.append(fds)
        self.samples.append((self.exited, len(fds), rss))
        self.fork_batch()

    def watch(self) -> None:
        """Thread: any zombie child whose exit was already reported is a leak."""
        me = os.getpid()
        while not self._halt.is_set():
            reported = set(self.reported)  # copied first: a pid reaped later is no leak
            with self._scan:
                self.stale |= zombies(me) & reported
            self.zombie_checks += 1
            self._halt.wait(0.005)

    def __enter__(self) -> LeakRun:
        self._watcher = threading.Thread(target=self.watch, daemon=True)
        self._watcher.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._halt.set()
        self._watcher.join(DEADLINE)


def test_fork_exit_cycles_leak_no_fd_no_memory_and_no_zombie(tmp_path, capsys):
    """300 workers that exit at once, 10 at a time, on one master: at every point where
    no worker runs, the master's open fds are the same as after the first batches and
    it has no zombie child; its RSS grows by less than 16 MiB from then to the end; and
    a thread watching /proc never sees a zombie whose ``exit`` event was already
    emitted (a worker left unreaped)."""
    master = pycluster.Master(exec=script(tmp_path, "import pycluster\n"), args=[],
                              kill_timeout=10)
    with LeakRun(master, total=300, batch=10) as leak:
        code = master.run()
    assert code == 0
    assert leak.exited == 300
    warm = leak.samples[2]  # after 30 cycles: imports and caches are in place
    last = leak.samples[-1]
    with capsys.disabled():
        print(f"\n  leaks: start (cycle {warm[0]}) fds={warm[1]} rss={warm[2]} KiB; "
              f"end (cycle {last[0]}) fds={last[1]} rss={last[2]} KiB; "
              f"{leak.zombie_checks} zombie checks")
    assert {fds for _, fds, _ in leak.samples[2:]} == {warm[1]}, (leak.fd_kinds[2],
                                                                 leak.fd_kinds[-1])
    assert last[2] - warm[2] < 16 * 1024
    assert not any(leak.quiet_zombies), [z for z in leak.quiet_zombies if z]
    assert not leak.stale
    assert leak.zombie_checks > 10
    assert not zombies(os.getpid())
