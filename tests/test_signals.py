"""Signals to the master, and no orphans when the master dies.

The master runs as a subprocess (its own session, so the test can signal its process
group as a terminal would) and prints one JSON line per event; its workers share its
stdout. Every wait is on those lines, with a deadline.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import time
from typing import Any

import psutil
import pytest
from helpers import DEADLINE, Proc, script, wait_until

MASTER = """
    import json, os, sys, pycluster

    def out(**fields):  # one write per line: workers write to the same pipe
        os.write(1, (json.dumps(fields) + "\\n").encode())

    kinds, kill_timeout, flags = sys.argv[1].split(","), float(sys.argv[2]), set(sys.argv[3:])
    master = pycluster.Master(exec="worker.py", args=[], kill_timeout=kill_timeout,
                              env={"KIND": kinds[0]})
    master.on("fork", lambda w: out(ev="fork", id=w.id, pid=w.pid))
    master.on("online", lambda w: out(ev="online", id=w.id))
    master.on("message", lambda w, m: out(ev="message", id=w.id, pid=w.pid, msg=m))
    master.on("disconnect", lambda w: out(ev="disconnect", id=w.id))
    master.on("exit", lambda w, code, sig: out(ev="exit", id=w.id, code=code, signal=sig,
                                               after=w.exited_after_disconnect))
    master.on("error", lambda exc: out(ev="error", error=repr(exc)))
    if "signal-listener" in flags:
        master.on("signal", lambda name: out(ev="signal", name=name))
    if "raise-in-handler" in flags:
        def bad(worker, message):
            raise RuntimeError(f"handler bug on {message}")
        master.on("message", bad)
    if "exit-in-handler" in flags:
        ready = []
        def leave(worker, message):
            ready.append(worker.id)
            if len(ready) == len(kinds):
                out(ev="leaving")
                sys.exit(3)
        master.on("message", leave)
    for kind in kinds:
        master.fork(env={"KIND": kind})
    code = master.run()
    out(ev="done", code=code)
    sys.exit(code)
"""

WORKER = """
    import json, os, signal, socket, sys, threading, time, pycluster

    w = pycluster.worker
    kind = os.environ["KIND"]

    def say(**fields):  # one write per line: the master writes to the same pipe
        os.write(1, (json.dumps({"worker": w.id, **fields}) + "\\n").encode())

    def ready():
        w.send({"ready": kind, "pid": os.getpid()})

    if kind == "serve":  # a well-behaved server: drains on disconnect, then exits 0
        done = threading.Event()
        def on_disconnect():
            say(ev="worker-disconnect")
            done.set()
        w.on("disconnect", on_disconnect)
        sock = w.listen(0, "127.0.0.1")
        ready()
        done.wait(120)
    elif kind == "slow":  # its disconnect handler never finishes
        def on_disconnect():
            say(ev="draining")
            threading.Event().wait()
        w.on("disconnect", on_disconnect)
        ready()
        threading.Event().wait()
    elif kind == "cpu":
        ready()
        while True:
            pass
    elif kind == "sleep":
        ready()
        time.sleep(3600)
    elif kind == "accept":
        sock = w.listen(0, "127.0.0.1")
        sock.setblocking(True)  # shared sockets come non-blocking; this one blocks
        ready()
        sock.accept()
    elif kind == "thread":  # the main thread ends; a non-daemon thread keeps the process
        threading.Thread(target=threading.Event().wait, name="forever").start()
        ready()
    elif kind == "ignore-term":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        ready()
        time.sleep(3600)
    elif kind == "gil":  # one long C call that never lets the IPC thread run
        ready()
        sum(range(10 ** 15))
"""


def start(tmp_path, kinds: list[str], *flags: str, kill_timeout: float = 60) -> Proc:
    """Start a master subprocess with one worker of each kind, in its own session."""
    script(tmp_path, MASTER, "master.py")
    script(tmp_path, WORKER, "worker.py")
    return Proc(["master.py", ",".join(kinds), str(kill_timeout), *flags], cwd=tmp_path,
                start_new_session=True)


def event(proc: Proc, what: str, **match: Any) -> dict[str, Any]:
    """The next JSON line whose fields include *match*."""
    return proc.json(lambda e: all(e.get(k) == v for k, v in match.items()), what)


def ready(proc: Proc, count: int) -> dict[int, int]:
    """Wait until *count* workers said they are ready; return their ids → pids."""
    pids = {}
    while len(pids) < count:
        line = proc.json(lambda e: e.get("ev") == "message" and "ready" in e["msg"],
                         f"{count} ready workers (have {sorted(pids)})")
        assert line["pid"] == line["msg"]["pid"], "worker.pid is the worker's own pid"
        pids[line["id"]] = line["pid"]
    return pids


def to_the_end(proc: Proc) -> list[dict[str, Any]]:
    """Read stdout to EOF (the master and every worker closed it); return all JSON lines
    seen so far, in order."""
    deadline = time.monotonic() + DEADLINE
    while True:
        try:
            line = proc.lines.get(timeout=max(0.01, deadline - time.monotonic()))
        except queue.Empty:
            msg = f"stdout did not end; saw {proc.seen[-20:]!r}"
            raise AssertionError(msg) from None
        if line is None:
            break
        proc.seen.append(line)
    return [json.loads(line) for line in proc.seen if line.startswith("{")]


def exits(lines: list[dict[str, Any]]) -> dict[int, list[tuple[Any, ...]]]:
    """Worker id → every exit reported for it, as (code, signal, exited_after_disconnect)."""
    found: dict[int, list[tuple[Any, ...]]] = {}
    for e in lines:
        if e.get("ev") == "exit":
            found.setdefault(e["id"], []).append((e["code"], e["signal"], e["after"]))
    return found


def clean(stderr: str) -> None:
    assert "Traceback" not in stderr, stderr
    assert "KeyboardInterrupt" not in stderr, stderr


@pytest.mark.parametrize(
    "send",
    [
        pytest.param(lambda pid: os.kill(pid, signal.SIGTERM), id="SIGTERM"),
        pytest.param(lambda pid: os.killpg(pid, signal.SIGINT), id="Ctrl-C"),
    ],
)
def test_sigterm_and_ctrl_c_stop_gracefully_once(tmp_path, send):
    """SIGTERM on the master, or Ctrl-C (SIGINT to the whole foreground process group),
    stops the cluster once, the graceful way: every worker gets `disconnect` (its handler
    runs) and exits 0 with exited_after_disconnect True, each exit is reported once, no
    traceback or KeyboardInterrupt reaches stderr, and the master exits 0."""
    with start(tmp_path, ["serve", "serve"]) as proc:
        ready(proc, 2)
        send(proc.pid)
        assert proc.wait() == 0
        lines = to_the_end(proc)
        stderr = proc.finish()
    assert exits(lines) == {1: [(0, None, True)], 2: [(0, None, True)]}
    assert sorted(e["worker"] for e in lines if e.get("ev") == "worker-disconnect") == [1, 2]
    assert [e for e in lines if e.get("ev") == "done"] == [{"ev": "done", "code": 0}]
    clean(stderr)


def test_second_sigint_during_a_slow_drain_stops_at_once(tmp_path):
    """A second Ctrl-C while workers drain (their disconnect handlers never finish, and
    kill_timeout is far beyond the test's deadline) stops the cluster at once: the workers
    get SIGTERM and the master exits 0 without a traceback."""
    with start(tmp_path, ["slow", "slow"], kill_timeout=600) as proc:
        ready(proc, 2)
        os.killpg(proc.pid, signal.SIGINT)
        draining = {event(proc, "a worker draining", ev="draining")["worker"] for _ in range(2)}
        assert draining == {1, 2}
        os.killpg(proc.pid, signal.SIGINT)
        assert proc.wait() == 0
        lines = to_the_end(proc)
        stderr = proc.finish()
    assert exits(lines) == {1: [(None, "SIGTERM", True)], 2: [(None, "SIGTERM", True)]}
    assert [e["code"] for e in lines if e.get("ev") == "done"] == [0]
    clean(stderr)


def test_sigquit_stops_immediately_with_sigterm(tmp_path):
    """SIGQUIT: immediate stop. Workers are not asked to disconnect (no handler runs), they
    get SIGTERM, their exit is (None, "SIGTERM"), and the master exits 0."""
    with start(tmp_path, ["serve", "serve"], kill_timeout=600) as proc:
        ready(proc, 2)
        os.kill(proc.pid, signal.SIGQUIT)
        assert proc.wait() == 0
        lines = to_the_end(proc)
        stderr = proc.finish()
    assert exits(lines) == {1: [(None, "SIGTERM", False)], 2: [(None, "SIGTERM", False)]}
    assert not [e for e in lines if e.get("ev") == "worker-disconnect"]
    assert [e["code"] for e in lines if e.get("ev") == "done"] == [0]
    clean(stderr)


def test_sigttin_adds_a_worker_and_sigttou_removes_one(tmp_path):
    """SIGTTIN forks one more worker; SIGTTOU gracefully removes one (the newest), leaving
    the first one untouched until the cluster stops."""
    with start(tmp_path, ["serve"]) as proc:
        ready(proc, 1)
        os.kill(proc.pid, signal.SIGTTIN)
        assert event(proc, "the forked worker", ev="fork")["id"] == 2
        assert ready(proc, 1).keys() == {2}
        os.kill(proc.pid, signal.SIGTTOU)
        gone = event(proc, "a worker's exit", ev="exit")
        assert (gone["id"], gone["code"], gone["after"]) == (2, 0, True)
        os.kill(proc.pid, signal.SIGTTIN)
        assert event(proc, "the next forked worker", ev="fork")["id"] == 3
        assert ready(proc, 1).keys() == {3}
        os.kill(proc.pid, signal.SIGTERM)
        assert proc.wait() == 0
        lines = to_the_end(proc)
        stderr = proc.finish()
    assert exits(lines) == {1: [(0, None, True)], 2: [(0, None, True)], 3: [(0, None, True)]}
    assert [e["id"] for e in lines if e.get("ev") == "exit"][0] == 2
    clean(stderr)


def test_sigttou_keeps_the_last_worker(tmp_path):
    """SIGTTOU never removes the last worker (the cluster would end): it logs a warning and
    the worker keeps serving; a SIGTTIN sent after it still adds a worker."""
    with start(tmp_path, ["serve"]) as proc:
        ready(proc, 1)
        os.kill(proc.pid, signal.SIGTTOU)
        os.kill(proc.pid, signal.SIGTTIN)  # the loop handles the two in the order sent
        assert event(proc, "the forked worker", ev="fork")["id"] == 2
        assert ready(proc, 1).keys() == {2}
        os.kill(proc.pid, signal.SIGTERM)
        assert proc.wait() == 0
        lines = to_the_end(proc)
        stderr = proc.finish()
    assert exits(lines) == {1: [(0, None, True)], 2: [(0, None, True)]}
    assert "SIGTTOU ignored" in stderr


@pytest.mark.parametrize("listener", [False, True])
def test_sighup_without_a_plugin_is_logged_and_the_cluster_keeps_running(tmp_path, listener):
    """SIGHUP with no plugin handling it: the master logs a warning and keeps running
    (it still answers SIGTTIN, no worker is touched). With a `signal` listener, the event
    is emitted with "SIGHUP" and nothing is logged."""
    flags = ["signal-listener"] if listener else []
    with start(tmp_path, ["serve"], *flags) as proc:
        ready(proc, 1)
        os.kill(proc.pid, signal.SIGHUP)
        if listener:
            assert event(proc, "the signal event", ev="signal")["name"] == "SIGHUP"
        os.kill(proc.pid, signal.SIGTTIN)
        assert ready(proc, 1).keys() == {2}
        os.kill(proc.pid, signal.SIGTERM)
        assert proc.wait() == 0
        lines = to_the_end(proc)
        stderr = proc.finish()
    assert exits(lines) == {1: [(0, None, True)], 2: [(0, None, True)]}
    if listener:
        assert "SIGHUP ignored" not in stderr
    else:
        assert "SIGHUP ignored: no plugin handles it" in stderr
    clean(stderr)


def alive(process: psutil.Process) -> bool:
    """Whether *process* (the very process, not a reuse of its pid) still runs."""
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


ORPHAN_KINDS = ["cpu", "sleep", "accept", "thread", "ignore-term", "gil"]


def test_no_orphans_when_the_master_is_sigkilled(tmp_path):
    """SIGKILL the master: every worker leaves within 5 s, whatever it was doing: in a CPU
    loop, asleep, blocked in accept(), held up by a non-daemon thread, ignoring SIGTERM, or
    stuck in one C call that holds the GIL (the IPC thread cannot run there)."""
    workers: list[psutil.Process] = []
    with start(tmp_path, ORPHAN_KINDS) as proc:
        try:
            pids = ready(proc, len(ORPHAN_KINDS))
            workers = [psutil.Process(pid) for pid in pids.values()]
            assert all(w.ppid() == proc.pid for w in workers)
            os.kill(proc.pid, signal.SIGKILL)
            assert proc.wait() == -signal.SIGKILL
            wait_until(lambda: not any(alive(w) for w in workers),
                       "every worker to leave after the master's SIGKILL", timeout=5)
        finally:
            for w in workers:
                if alive(w):
                    w.kill()


def test_exception_in_a_master_handler_is_an_error_event_and_the_cluster_runs_on(tmp_path):
    """An exception raised in a master handler becomes an `error` event; the master keeps
    running (it forks on SIGTTIN, and the new worker's message fails the same way), then
    stops cleanly on SIGTERM with exit code 0 and no traceback."""
    with start(tmp_path, ["serve"], "raise-in-handler") as proc:
        ready(proc, 1)
        assert "handler bug" in event(proc, "the error event", ev="error")["error"]
        os.kill(proc.pid, signal.SIGTTIN)
        assert ready(proc, 1).keys() == {2}
        assert "handler bug" in event(proc, "the second error event", ev="error")["error"]
        os.kill(proc.pid, signal.SIGTERM)
        assert proc.wait() == 0
        lines = to_the_end(proc)
        stderr = proc.finish()
    assert exits(lines) == {1: [(0, None, True)], 2: [(0, None, True)]}
    clean(stderr)


def test_sys_exit_in_a_master_handler_takes_every_worker_down(tmp_path):
    """sys.exit(3) inside a master handler (not an Exception, so not an `error` event) ends
    the master with code 3, and no worker outlives it, not even a busy or SIGTERM-ignoring
    one (Node: the primary's process.exit kills its workers)."""
    kinds = ["cpu", "ignore-term", "serve"]
    workers: list[psutil.Process] = []
    with start(tmp_path, kinds, "exit-in-handler") as proc:
        try:
            for pid in ready(proc, len(kinds)).values():
                try:
                    workers.append(psutil.Process(pid))
                except psutil.NoSuchProcess:
                    pass  # the master exits on the last "ready": this one already left with it
            event(proc, "the handler calling sys.exit", ev="leaving")
            assert proc.wait() == 3
            wait_until(lambda: not any(alive(w) for w in workers),
                       "every worker to leave with its master", timeout=5)
            lines = to_the_end(proc)
            stderr = proc.finish()
        finally:
            for w in workers:
                if alive(w):
                    w.kill()
    assert "done" not in {e.get("ev") for e in lines}
    assert "Traceback" not in stderr, stderr
