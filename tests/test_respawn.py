"""The respawn plugin: which deaths are replaced, how fast, and when it gives up.

Each test runs a real master in this process (driven by a scenario coroutine on the same
loop) and real worker processes listening on 127.0.0.1 port 0.
"""

from __future__ import annotations

import logging
import time

import pytest
from helpers import Events, script
from plugin_helpers import Running, drive
from pycluster.plugins.respawn import Respawn

import pycluster

#: Listens, reports {"id", "tag", "slot"}; on {"do": "exit", "code": n} exits with n.
WORKER = """
    import os, threading, pycluster
    w = pycluster.worker
    done = threading.Event()
    w.on("disconnect", done.set)
    w.on("message", lambda m: os._exit(m["code"]))
    w.listen(0, "127.0.0.1")
    w.send({"id": w.id, "tag": os.environ.get("TAG")})
    done.wait(60)
"""


def make(tmp_path, body=WORKER, **settings):
    settings.setdefault("kill_timeout", 10)
    return pycluster.Master(exec=script(tmp_path, body), **settings)


class Ready:
    """Collects the hello message of every worker, by worker id."""

    def __init__(self, master):
        self.by_id = {}
        master.on("message", lambda w, m: self.by_id.setdefault(w.id, m))


def test_replaces_a_sigkilled_worker_in_its_slot_with_its_env(tmp_path):
    """A worker killed by SIGKILL is replaced by a new worker (new id) in the same slot,
    with the same fork env; the cluster keeps its size and stop() still ends it with 0."""
    master = make(tmp_path).use("respawn")
    events = Events(master)
    ready = Ready(master)
    first = [master.fork(env={"TAG": "a"}), master.fork(env={"TAG": "b"})]
    slots = {}

    async def scenario(r: Running):
        await r.until(lambda: len(ready.by_id) == 2, "both workers ready")
        slots.update({w.id: w.slot for w in master.workers.values()})
        first[0].kill("SIGKILL")
        await r.until(lambda: 3 in ready.by_id, "the replacement ready")
        slots.update({w.id: w.slot for w in master.workers.values()})
        assert sorted(master.workers) == [2, 3]
        master.stop()

    assert drive(master, scenario) == 0
    assert [e[0].id for e in events.of("fork")] == [1, 2, 3]
    assert events.of("exit")[0] == (first[0], None, "SIGKILL")
    assert slots == {1: 0, 2: 1, 3: 0}
    assert ready.by_id[3]["tag"] == "a"


@pytest.mark.parametrize("side", ["primary", "worker"])
def test_does_not_replace_a_disconnected_worker(tmp_path, side):
    """A worker that exits after disconnect() (asked by the master, or by itself) is not
    replaced: the master ends once both workers are gone, after two forks only."""
    body = WORKER.replace('lambda m: os._exit(m["code"])', "lambda m: w.disconnect()")
    master = make(tmp_path, body).use("respawn")
    events = Events(master)
    ready = Ready(master)
    workers = [master.fork(), master.fork()]

    async def scenario(r: Running):
        await r.until(lambda: len(ready.by_id) == 2, "both workers ready")
        for worker in workers:
            if side == "primary":
                worker.disconnect()
            else:
                worker.send({"do": "disconnect"})

    assert drive(master, scenario) == 0
    assert len(events.of("fork")) == 2
    assert [(w.exit_code, w.exited_after_disconnect) for w in workers] == [(0, True)] * 2


@pytest.mark.parametrize("graceful", [True, False])
def test_does_not_replace_workers_while_stopping(tmp_path, graceful):
    """stop() (disconnect) and stop(graceful=False) (SIGTERM, so not 'after disconnect')
    end every worker, and none is replaced; run() returns stop()'s exit code."""
    master = make(tmp_path).use("respawn")
    events = Events(master)
    ready = Ready(master)
    workers = [master.fork() for _ in range(3)]

    async def scenario(r: Running):
        await r.until(lambda: len(ready.by_id) == 3, "three workers ready")
        master.stop(graceful=graceful, exit_code=4)

    assert drive(master, scenario) == 4
    assert len(events.of("fork")) == 3
    expected = (0, None) if graceful else (None, "SIGTERM")
    assert [(w.exit_code, w.signal_code) for w in workers] == [expected] * 3


@pytest.mark.parametrize(
    ("stop_exit_codes", "code", "replaced"),
    [
        (None, 0, False),  # the default: exit 0 means done
        (None, 5, True),
        ((0, 5), 5, False),
        ((0, 5), 6, True),
        ((), 0, True),  # nothing is "do not restart": a clean exit is replaced too
    ],
)
def test_stop_exit_codes(tmp_path, stop_exit_codes, code, replaced):
    """A worker exiting by itself with a code in stop_exit_codes is not replaced; any other
    code is (once ready, so it is not a boot failure)."""
    options = {} if stop_exit_codes is None else {"stop_exit_codes": stop_exit_codes}
    master = make(tmp_path).use("respawn", **options)
    events = Events(master)
    ready = Ready(master)
    worker = master.fork()

    async def scenario(r: Running):
        await r.until(lambda: ready.by_id, "worker 1 ready")
        worker.send({"do": "exit", "code": code})
        await r.until(lambda: worker.is_dead(), "worker 1 exit")
        if replaced:
            await r.until(lambda: 2 in ready.by_id, "the replacement ready")
            master.stop()

    drive(master, scenario)
    assert (worker.exit_code, worker.exited_after_disconnect) == (code, False)
    assert len(events.of("fork")) == (2 if replaced else 1)
    if replaced:
        assert master.plugins[0].restarts == 1


def test_crash_loop_gives_up_and_ends_the_master_non_zero(tmp_path, caplog):
    """A worker that exits 1 at once is replaced with backoff until max_restarts
    replacements happened within the window; the next death makes respawn give up: it
    emits respawn_give_up(worker, reason), logs why at ERROR, and the master ends with 1
    after exactly 1 + max_restarts forks."""
    master = make(tmp_path, "import pycluster\nraise SystemExit(1)\n")
    respawn = Respawn(min_delay=0.01, max_delay=0.05, max_restarts=4, window=600,
                      fail_fast=False)
    master.use(respawn)
    events = Events(master)
    gave_up = []
    master.on("respawn_give_up", lambda w, reason: gave_up.append((w.id, reason)))
    master.fork()
    with caplog.at_level(logging.INFO, logger="pycluster"):
        assert drive(master) == 1
    assert len(events.of("fork")) == 5
    assert respawn.restarts == 4
    assert all(code == 1 for _, code, _ in events.of("exit"))
    (worker_id, reason), = gave_up
    assert worker_id == 5
    assert "5 unexpected exits" in reason
    assert "max_restarts=4" in reason
    errors = [r for r in caplog.records
              if r.name == "pycluster.respawn" and r.levelno == logging.ERROR]
    assert [r.getMessage().split(":")[0] for r in errors] == ["respawn gives up"]


def test_a_worker_dying_before_any_worker_listened_gives_up_at_once(tmp_path, caplog):
    """Fail fast at boot: with default options, a worker that dies before listening while
    no worker of the cluster has listened yet (an app that fails at start) is not retried;
    respawn gives up on that first death with a reason saying so, which the master keeps
    as stop_reason, and run() returns 1."""
    master = make(tmp_path, "import pycluster\nraise RuntimeError('broken at import')\n")
    master.use("respawn")
    events = Events(master)
    master.fork()
    with caplog.at_level(logging.INFO, logger="pycluster"):
        assert drive(master) == 1
    assert len(events.of("fork")) == 1
    assert "died before it listened (exit code 1)" in master.stop_reason
    assert "no worker has listened yet" in master.stop_reason
    assert master.stop_reason.startswith("respawn gave up: worker 1 ")


def test_fail_fast_is_off_once_the_cluster_has_served(tmp_path):
    """Once a worker has listened, a later worker that dies before listening is retried
    with backoff as usual (a bad deploy of one slot does not stop a serving cluster at
    once): here the second worker fails twice, then the master is stopped cleanly."""
    body = WORKER.replace("w.listen(0,", "if os.environ.get('TAG') == 'bad':\n"
                          "        raise SystemExit(1)\n    w.listen(0,")
    master = make(tmp_path, body).use("respawn", min_delay=0.01)
    events = Events(master)
    ready = Ready(master)
    master.fork()
    master.on("listening", lambda w, a: w.id == 1 and master.fork(env={"TAG": "bad"}))

    async def scenario(r: Running):
        await r.until(lambda: len(events.of("exit")) >= 3, "three deaths of the bad slot")
        master.stop()

    assert drive(master, scenario) == 0
    assert 1 in ready.by_id
    assert master.stop_reason is None


def test_boot_failure_exit_3_gives_up_at_once(tmp_path):
    """A worker exiting with code 3 (BOOT_FAILURE) before it ever listened is not retried:
    respawn gives up on the first death, and the other workers are stopped gracefully."""
    body = """
        import os, threading, pycluster
        w = pycluster.worker
        if w.id == 2:  # fails to boot, once worker 1 listens (so its stop is the plain one)
            w.on("message", lambda m: os._exit(3))
            threading.Event().wait(60)
        done = threading.Event()
        w.on("disconnect", done.set)
        w.listen(0, "127.0.0.1")
        done.wait(60)
    """
    master = make(tmp_path, body).use("respawn")
    events = Events(master)
    gave_up = []
    master.on("respawn_give_up", lambda w, reason: gave_up.append((w.id, reason)))
    first, second = master.fork(), master.fork()
    master.on("listening", lambda w, address: second.send("fail now"))
    assert drive(master) == 1
    assert len(events.of("fork")) == 2
    assert (second.exit_code, first.exit_code, first.exited_after_disconnect) == (3, 0, True)
    (worker_id, reason), = gave_up
    assert worker_id == 2
    assert "failed to boot (exit code 3)" in reason


def test_exit_3_after_listening_is_replaced(tmp_path):
    """Exit code 3 is a boot failure only before the worker's first listening: a worker
    that served and then exits 3 is replaced like any crash."""
    master = make(tmp_path).use("respawn")
    events = Events(master)
    ready = Ready(master)
    gave_up = []
    master.on("respawn_give_up", lambda *a: gave_up.append(a))
    worker = master.fork()

    async def scenario(r: Running):
        await r.until(lambda: ready.by_id, "worker 1 ready")
        worker.send({"do": "exit", "code": 3})
        await r.until(lambda: 2 in ready.by_id, "the replacement ready")
        master.stop()

    assert drive(master, scenario) == 0
    assert worker.exit_code == 3
    assert len(events.of("fork")) == 2
    assert not gave_up


class Recorder(logging.Handler):
    """Keeps the delay respawn decided on for each replacement (from its log record)."""

    def __init__(self):
        super().__init__()
        self.delays = []

    def emit(self, record):
        if record.getMessage().startswith("respawning slot"):
            self.delays.append(record.args[-1])


@pytest.fixture
def delays():
    logger = logging.getLogger("pycluster.respawn")
    recorder, level = Recorder(), logger.level
    logger.addHandler(recorder)
    logger.setLevel(logging.INFO)
    try:
        yield recorder.delays
    finally:
        logger.removeHandler(recorder)
        logger.setLevel(level)


# Workers 1..5 crash before listening; worker 6 listens, says hello and exits 1 when told;
# from worker 7 on they listen and wait. A counter file gives each process its number.
COUNTED = """
    import os, threading, pycluster
    fd = os.open({path!r}, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    os.write(fd, b"x")
    n = os.fstat(fd).st_size
    os.close(fd)
    w = pycluster.worker
    if n <= {crashes}:
        raise SystemExit(1)
    done = threading.Event()
    w.on("disconnect", done.set)
    w.on("message", lambda m: os._exit(m["code"]))
    w.listen(0, "127.0.0.1")
    w.send({{"id": w.id, "n": n}})
    done.wait(60)
"""


def test_backoff_grows_to_the_cap_without_jitter(tmp_path, delays):
    """Quick deaths in one slot get delays 0, min, 2*min, 4*min … capped at max_delay
    (jitter=0 makes the plugin's decisions exact), and the forks happen in that order."""
    body = COUNTED.format(path=str(tmp_path / "count"), crashes=6)
    master = make(tmp_path, body)
    master.use(Respawn(min_delay=0.01, max_delay=0.04, jitter=0, max_restarts=20, fail_fast=False))
    ready = Ready(master)
    forked_at = []
    master.on("fork", lambda w: forked_at.append(w.started_at))
    master.fork()

    async def scenario(r: Running):
        await r.until(lambda: ready.by_id, "the first worker that listens")
        master.stop()

    assert drive(master, scenario) == 0
    assert delays == [0.0, 0.01, 0.02, 0.04, 0.04, 0.04]
    assert len(forked_at) == 7
    assert forked_at == sorted(forked_at)


def test_backoff_jitter_stays_within_bounds(tmp_path, delays):
    """With jitter=0.5 each delay is the exponential delay times a factor in [0.5, 1.5]."""
    body = COUNTED.format(path=str(tmp_path / "count"), crashes=5)
    master = make(tmp_path, body)
    master.use(Respawn(min_delay=0.02, max_delay=0.08, jitter=0.5, max_restarts=20,
                       fail_fast=False))
    ready = Ready(master)
    master.fork()

    async def scenario(r: Running):
        await r.until(lambda: ready.by_id, "the first worker that listens")
        master.stop()

    assert drive(master, scenario) == 0
    bases = [0.0, 0.02, 0.04, 0.08, 0.08]
    assert len(delays) == len(bases)
    for got, base in zip(delays, bases, strict=True):
        assert base * 0.5 - 1e-9 <= got <= base * 1.5 + 1e-9, (got, base)


def test_backoff_resets_after_a_stable_run(tmp_path, delays):
    """After a worker that was ready stayed up stable_after seconds, its death is replaced
    at once again and the backoff starts over: delays 0, min, 2*min, then 0, min."""
    body = COUNTED.format(path=str(tmp_path / "count"), crashes=3).replace(
        "if n <= 3:", "if n <= 3 or n == 5:")
    master = make(tmp_path, body)
    master.use(Respawn(min_delay=0.01, max_delay=1, jitter=0, stable_after=0.2,
                       max_restarts=20, fail_fast=False))
    ready = Ready(master)
    master.fork()

    async def scenario(r: Running):
        stable = await r.until(lambda: master.workers.get(4) if 4 in ready.by_id else None,
                               "worker 4 ready")
        # worker 4 must live past stable_after: that is the condition under test
        await r.until(lambda: time.monotonic() - stable.started_at >= 0.2,
                      "worker 4 up for stable_after")
        stable.send({"do": "exit", "code": 1})
        await r.until(lambda: 6 in ready.by_id, "worker 6 ready")
        master.stop()

    assert drive(master, scenario) == 0
    assert delays == [0.0, 0.01, 0.02, 0.0, 0.01]


def test_unuse_cancels_a_pending_replacement(tmp_path):
    """Removing the plugin while a replacement waits out a long backoff cancels it: the
    master, with no worker left, ends instead of waiting for the timer."""
    master = make(tmp_path, "import pycluster\nraise SystemExit(1)\n")
    respawn = Respawn(min_delay=600, max_delay=600, max_restarts=20, fail_fast=False)
    master.use(respawn)
    events = Events(master)
    master.fork()

    async def scenario(r: Running):
        await r.until(lambda: len(events.of("exit")) == 2, "the replacement's death")
        master.unuse(respawn)

    assert drive(master, scenario) == 1
    assert len(events.of("fork")) == 2


def test_stop_cancels_a_pending_replacement(tmp_path):
    """stop() while a slot's replacement waits out a long backoff ends the cluster
    without waiting for that timer (the other workers are disconnected as usual)."""
    body = """
        import os, threading, pycluster
        w = pycluster.worker
        if w.id != 1:
            raise SystemExit(1)
        done = threading.Event()
        w.on("disconnect", done.set)
        w.listen(0, "127.0.0.1")
        w.send({"id": w.id})
        done.wait(60)
    """
    master = make(tmp_path, body)
    master.use(Respawn(min_delay=600, max_delay=600, max_restarts=20, fail_fast=False))
    events = Events(master)
    ready = Ready(master)
    master.fork()
    master.fork()

    async def scenario(r: Running):
        await r.until(lambda: 1 in ready.by_id and len(events.of("exit")) == 2,
                      "worker 1 ready, worker 2 and its replacement dead")
        master.stop()

    assert drive(master, scenario, timeout=20) == 0
    assert len(events.of("fork")) == 3


def test_give_up_cancels_other_pending_replacements(tmp_path):
    """When respawn gives up, a replacement of another slot that waits out its backoff
    is dropped too: the master ends with 1 at once rather than after that delay."""
    master = make(tmp_path, "import pycluster\nraise SystemExit(1)\n")
    master.use(Respawn(min_delay=600, max_delay=600, max_restarts=3, fail_fast=False))
    events = Events(master)
    gave_up = []
    master.on("respawn_give_up", lambda w, reason: gave_up.append(reason))
    master.fork()
    master.fork()
    # 1 and 2 die: replaced at once by 3 and 4. Of 3 and 4, the first to die waits 600 s
    # for its replacement; the second is the fourth death: max_restarts=3 is spent.
    assert drive(master, timeout=20) == 1
    assert len(events.of("fork")) == 4
    assert len(gave_up) == 1
    assert "max_restarts=3" in gave_up[0]


def test_sigterm_with_only_a_pending_replacement_ends_the_master(tmp_path):
    """stop() while no worker is alive and one replacement waits out a long backoff ends
    the master at once: a stopping master forks nothing, so nothing should hold it."""
    master = make(tmp_path, "import pycluster\nraise SystemExit(1)\n")
    master.use(Respawn(min_delay=600, max_delay=600, max_restarts=20, fail_fast=False))
    events = Events(master)
    master.fork()

    async def scenario(r: Running):
        await r.until(lambda: len(events.of("exit")) == 2, "the replacement's death")
        master.stop()

    assert drive(master, scenario, timeout=10) == 0
    assert len(events.of("fork")) == 2
