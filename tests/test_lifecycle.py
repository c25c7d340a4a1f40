"""Lifecycle events, their order and arguments, and the Node exit/disconnect matrix.

Each test runs a real master in this process and real worker processes.
"""

from __future__ import annotations

import os
import signal
import socket

import pytest
from helpers import Events, run, script

import pycluster

LISTEN_AND_WAIT = """
    import sys, threading, pycluster
    w = pycluster.worker
    done = threading.Event()
    w.on("disconnect", done.set)
    sock = w.listen(0, "127.0.0.1")
    w.on("message", lambda m: {"exit": lambda: sys.exit(m["code"]),
                               "kill": lambda: w.kill(),
                               "disconnect": lambda: w.disconnect()}[m["do"]]())
    w.send("ready")
    done.wait(60)
"""


def make(tmp_path, body=LISTEN_AND_WAIT, **settings):
    return pycluster.Master(exec=script(tmp_path, body), kill_timeout=10, **settings)


def test_event_order_and_arguments(tmp_path):
    """fork → online → listening → disconnect → exit, worker events before the master's,
    with Node's arguments: listening gets the real port; exit gets (code, None)."""
    master = make(tmp_path)
    events = Events(master)
    worker = master.fork()
    order: list[str] = []
    for name in ("fork", "online", "listening", "disconnect", "exit"):
        worker.on(name, lambda *a, n=name: order.append(f"worker:{n}"))
        master.on(name, lambda *a, n=name: order.append(f"master:{n}"))
    states = {}
    master.on("fork", lambda w: states.setdefault("fork", w.state))
    master.on("online", lambda w: states.setdefault("online", w.state))
    master.on("listening", lambda w, a: states.setdefault("listening", w.state))
    master.on("disconnect", lambda w: states.setdefault("disconnect", w.state))
    master.on("exit", lambda w, c, s: states.setdefault("exit", w.state))
    master.on("message", lambda w, m: w.disconnect())
    assert run(master) == 0
    assert events.names(worker) == ["fork", "online", "listening", "message", "disconnect", "exit"]
    assert order == [f"{side}:{n}" for n in ("fork", "online", "listening", "disconnect", "exit")
                     for side in ("worker", "master")]
    (_, address), = events.of("listening")
    assert address.host == "127.0.0.1" and 0 < address.port < 65536
    assert address.family == socket.AF_INET
    assert events.of("exit") == [(worker, 0, None)]
    assert states == {"fork": pycluster.WorkerState.NONE, "online": pycluster.WorkerState.ONLINE,
                      "listening": pycluster.WorkerState.LISTENING,
                      "disconnect": pycluster.WorkerState.DISCONNECTED,
                      "exit": pycluster.WorkerState.DEAD}
    assert worker.id == 1 and worker.is_dead() and not worker.is_connected()


def test_ids_count_from_one_and_are_never_reused(tmp_path):
    """Worker ids are 1, 2, 3 … in fork order, also after earlier workers died."""
    master = make(tmp_path, "import pycluster\n")
    first = [master.fork() for _ in range(2)]
    ids = [w.id for w in first]
    master.on("exit", lambda w, c, s: len(ids) < 4 and ids.append(master.fork().id))
    assert run(master) == 0
    assert ids == [1, 2, 3, 4]


@pytest.mark.parametrize(
    ("action", "expected_exit", "after_disconnect"),
    [
        ("primary-kill", (None, "SIGTERM"), False),
        ("primary-kill-SIGKILL", (None, "SIGKILL"), False),
        ("primary-disconnect", (0, None), True),
        ("worker-disconnect", (0, None), True),
        ("worker-kill", (0, None), True),
        ("worker-exit-3", (3, None), False),
    ],
)
def test_exit_matrix(tmp_path, action, expected_exit, after_disconnect):
    """Each way a worker can end gives Node's exit arguments and exited_after_disconnect,
    and the flag is already right in the disconnect handler."""
    master = make(tmp_path)
    worker = master.fork()
    seen = {}

    def ready(w, message):
        if action == "primary-kill":
            w.kill()
        elif action == "primary-kill-SIGKILL":
            w.kill("SIGKILL")
        elif action == "primary-disconnect":
            w.disconnect()
        elif action == "worker-disconnect":
            w.send({"do": "disconnect"})
        elif action == "worker-kill":
            w.send({"do": "kill"})
        else:
            w.send({"do": "exit", "code": 3})

    master.on("message", ready)
    worker.on("disconnect", lambda: seen.setdefault("disconnect", worker.exited_after_disconnect))
    worker.on("exit", lambda code, sig: seen.setdefault("exit", (code, sig)))
    code = run(master)
    assert seen["exit"] == expected_exit
    assert worker.exited_after_disconnect is after_disconnect
    assert seen["disconnect"] is after_disconnect
    assert (worker.exit_code, worker.signal_code) == expected_exit
    assert code == (1 if action == "worker-exit-3" or action.startswith("primary-kill") else 0)


def test_crash_is_exit_1_and_not_after_disconnect(tmp_path):
    """An uncaught exception in a worker is exit (1, None) with exited_after_disconnect False."""
    master = make(tmp_path, "import pycluster\nraise RuntimeError('boom')\n", silent=True)
    worker = master.fork()
    assert run(master) == 1
    assert (worker.exit_code, worker.signal_code) == (1, None)
    assert worker.exited_after_disconnect is False


def test_workers_mapping_is_read_only_and_updated(tmp_path):
    """master.workers holds live workers by id, is read-only, and no longer holds a worker
    in its exit handlers."""
    master = make(tmp_path, "import pycluster\n")
    worker = master.fork()
    assert dict(master.workers) == {1: worker}
    with pytest.raises(TypeError):
        master.workers[5] = worker  # type: ignore[index]
    inside = []
    master.on("disconnect", lambda w: inside.append(("disconnect", w.id in master.workers)))
    master.on("exit", lambda w, c, s: inside.append(("exit", w.id in master.workers)))
    run(master)
    assert inside == [("disconnect", True), ("exit", False)]
    assert dict(master.workers) == {}


def test_setup_event_and_fork_env(tmp_path):
    """setup(settings) fires once when the master starts; fork(env) adds and overrides
    variables, and PYCLUSTER_* markers are gone from the worker's environment."""
    body = """
        import os, pycluster
        pycluster.worker.send({k: v for k, v in os.environ.items()
                               if k.startswith(("PYCLUSTER", "MY_"))})
    """
    master = make(tmp_path, body, env={"MY_A": "settings", "MY_B": "settings"})
    events = Events(master)
    master.fork(env={"MY_B": "fork", "MY_C": "fork"})
    run(master)
    assert events.of("setup") == [(master.settings,)]
    (_, env), = events.of("message")
    assert env == {"MY_A": "settings", "MY_B": "fork", "MY_C": "fork"}


def test_run_returns_at_once_without_workers(tmp_path):
    """A master with no worker and nothing pending returns 0 right away."""
    assert run(make(tmp_path), timeout=10) == 0


def test_stop_disconnects_all_and_returns_code(tmp_path):
    """stop(exit_code=7) disconnects every worker (exit 0, after disconnect) and run()
    returns 7; fork() afterwards is a StateError."""
    master = make(tmp_path)
    workers = [master.fork() for _ in range(3)]
    ready = []

    def on_message(w, m):
        ready.append(w)
        if len(ready) == 3:
            master.stop(exit_code=7)

    master.on("message", on_message)
    assert run(master) == 7
    assert [(w.exit_code, w.signal_code, w.exited_after_disconnect) for w in workers] == [
        (0, None, True)] * 3
    with pytest.raises(pycluster.StateError, match="stopping"):
        master.fork()


def test_kill_timeout_sigkills_a_worker_that_ignores_disconnect(tmp_path):
    """A worker that handles disconnect but never exits is SIGKILLed after kill_timeout."""
    body = """
        import time, pycluster
        pycluster.worker.on("disconnect", lambda: None)
        pycluster.worker.send("ready")
        while True:
            time.sleep(1)
    """
    master = pycluster.Master(exec=script(tmp_path, body), kill_timeout=0.5)
    worker = master.fork()
    master.on("message", lambda w, m: w.disconnect())
    run(master)
    assert (worker.exit_code, worker.signal_code) == (None, "SIGKILL")
    assert worker.exited_after_disconnect is True


def test_failing_handler_becomes_error_event(tmp_path):
    """A handler that raises does not stop the master: it becomes an error event and the
    other handlers of that event still run."""
    master = make(tmp_path, "import pycluster\n")
    master.fork()
    errors, later = [], []

    def bad(worker):
        raise ValueError("handler bug")

    master.on("online", bad)
    master.on("online", lambda w: later.append(w.id))
    master.on("error", errors.append)
    assert run(master) == 0
    assert later == [1]
    assert [str(e) for e in errors] == ["handler bug"]


@pytest.mark.parametrize("slot", ["x", -1, True, 1.5])
def test_bad_fork_slot_starts_nothing(tmp_path, slot):
    """fork(slot=...) that is not an int >= 0 is a SettingsError naming it; no process starts
    and no id is used."""
    master = make(tmp_path, "import pycluster\n")
    with pytest.raises(pycluster.SettingsError, match=f"slot={slot!r}"):
        master.fork(slot=slot)
    assert master.fork().id == 1
    run(master)


def test_bad_stop_exit_code(tmp_path):
    """stop(exit_code=...) that is not an int is a SettingsError; the master is not stopped."""
    master = make(tmp_path, "import pycluster\n")
    with pytest.raises(pycluster.SettingsError, match="exit_code='x'"):
        master.stop(exit_code="x")
    assert not master.stopping


def test_listen_on_a_host_name_is_resolved_in_the_worker(tmp_path):
    """listen(0, "localhost") works: the worker resolves the name (the master never waits
    on DNS) and the listening event carries the numeric address."""
    body = """
        import pycluster
        pycluster.worker.listen(0, "localhost")
    """
    master = make(tmp_path, body)
    events = Events(master)
    master.fork()
    run(master)
    (_, address), = events.of("listening")
    assert address.host in ("127.0.0.1", "::1")


def test_a_real_time_signal_is_named_and_reaped(tmp_path):
    """Regression: a worker killed by a signal with no name in signal.Signals (SIGRTMIN+1)
    exits as (None, "SIG<n>") and the master still finishes."""
    body = """
        import time, pycluster
        pycluster.worker.send("up")
        time.sleep(60)
    """
    master = make(tmp_path, body)
    worker = master.fork()
    number = signal.SIGRTMIN + 1
    master.on("message", lambda w, m: os.kill(w.pid, number))
    assert run(master) == 1
    assert (worker.exit_code, worker.signal_code) == (None, f"SIG{number}")


def test_without_pidfd_sigchld_reaps_workers_forked_later(tmp_path, monkeypatch):
    """Where pidfd_open fails (old kernels, sandboxes), workers forked while the master
    runs are still reaped (through SIGCHLD), in order after their fork event."""
    def no_pidfd(pid, flags=0):
        raise OSError(38, "Function not implemented")

    monkeypatch.setattr(os, "pidfd_open", no_pidfd)
    master = make(tmp_path, "import pycluster\n")
    events = Events(master)
    master.on("setup", lambda settings: master.fork())
    assert run(master, timeout=20) == 0
    assert events.names()[1:] == ["fork", "online", "disconnect", "exit"]


def test_stop_after_run_is_harmless(tmp_path):
    """stop() (or a plugin's late timer cancel) after run() returned does nothing."""
    master = make(tmp_path, "import pycluster\n")
    master.fork()
    assert run(master) == 0
    master.stop()
    master.hold()()
