"""The guards: the hung-worker watchdog (heartbeats from the app, stacks from the IPC
thread, kill, respawn) and recycling (max_requests with jitter, max_memory, max_age: the
replacement listens before the old worker drains).

Each test runs a real master in this process, driven by a scenario coroutine on its loop,
and real worker processes; timeouts are short so the tests are quick, and every wait has
a deadline.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import textwrap

import pytest
from helpers import Events, Proc, http_get, script
from plugin_helpers import Running, drive, http_worker
from pycluster.plugins.recycle import Recycle, rss_bytes
from pycluster.plugins.watchdog import Watchdog

import pycluster
from pycluster import cli

#: An asyncio worker: attaches its loop (so the loop beats), tells the master it runs;
#: worker 1 then blocks its loop in ``stuck_in_the_app()`` when the master says "hang".
LOOP_WORKER = """
    import asyncio, signal, time, pycluster
    w = pycluster.worker

    def stuck_in_the_app():
        time.sleep(60)

    async def main():
        w.attach_loop()
        stop = asyncio.Event()
        w.on("disconnect", stop.set)
        w.on("message", lambda m: m == "hang" and stuck_in_the_app())
        while w.heartbeat_interval is None:  # the watchdog's interval arrives
            await asyncio.sleep(0.01)
        w.listen(0, "127.0.0.1")
        w.send("running")
        await stop.wait()

    asyncio.run(main())
"""


def make(tmp_path, body, **settings):
    settings.setdefault("kill_timeout", 10)
    return pycluster.Master(exec=script(tmp_path, textwrap.dedent(body)), **settings)


class Kills:
    """Records ``watchdog_kill(worker, stacks)`` events."""

    def __init__(self, master):
        self.seen: list[tuple[pycluster.Worker, str | None]] = []
        master.on("watchdog_kill", lambda worker, stacks: self.seen.append((worker, stacks)))


def running_ids(master):
    """Collect the ids of workers that said "running"."""
    ids: list[int] = []
    master.on("message", lambda w, m: m == "running" and ids.append(w.id))
    return ids


def test_watchdog_logs_every_thread_of_a_hung_loop_then_kills_it_and_respawn_replaces_it(
        tmp_path, caplog):
    """A worker whose asyncio loop is blocked in ``time.sleep()`` stops beating; the
    watchdog logs its stacks (naming the blocking function, with the IPC thread named),
    emits ``watchdog_kill`` with them, SIGKILLs it (not ``exited_after_disconnect``) and
    respawn forks a replacement in the same slot, which is watched in turn; the logging
    plugin's exit line names the watchdog's kill instead of guessing at memory."""
    master = make(tmp_path, LOOP_WORKER).use("watchdog", timeout=0.5).use("respawn")
    master.use("logging")
    events = Events(master)
    kills = Kills(master)
    ids = running_ids(master)
    first = master.fork()

    async def scenario(r: Running):
        await r.until(lambda: 1 in ids and first.last_heartbeat, "worker 1 running, beating")
        first.send("hang")
        await r.until(lambda: 2 in ids, "the replacement running")
        await r.until(lambda: master.workers[2].last_heartbeat, "the replacement beating")
        master.stop()

    with caplog.at_level(logging.INFO, logger="pycluster"):
        assert drive(master, scenario) == 0
    [(worker, stacks)] = kills.seen
    assert worker is first
    assert "stuck_in_the_app" in stacks and "time.sleep(60)" in stacks
    assert "Thread 'MainThread'" in stacks and "'pycluster-ipc'" in stacks
    assert events.of("exit")[0] == (first, None, "SIGKILL")
    assert first.exited_after_disconnect is False
    replacement = events.of("fork")[1][0]
    assert replacement.slot == first.slot
    [warned, hung] = [r for r in caplog.records if r.name == "pycluster.watchdog"]
    assert warned.levelno == logging.WARNING and "asking for its stacks" in warned.getMessage()
    assert hung.levelno == logging.ERROR
    assert "worker 1" in hung.getMessage() and "is hung: sent no heartbeat" in hung.getMessage()
    assert "stuck_in_the_app" in hung.getMessage() and "SIGKILL" in hung.getMessage()
    # the logging plugin's exit line says it was the watchdog, not a guess at memory
    [exited] = [r for r in caplog.records if getattr(r, "event", None) == "exit"
                and r.worker_id == 1]
    assert "hung: the watchdog's kill" in exited.getMessage()
    assert "out of memory" not in exited.getMessage()


def test_a_worker_that_never_beats_is_not_watched(tmp_path):
    """A synchronous worker that never calls ``heartbeat()`` is never killed, however long
    it is silent: it sleeps for many timeouts, then exits 0 by itself."""
    body = """
        import time, pycluster
        w = pycluster.worker
        while w.heartbeat_interval is None:
            time.sleep(0.01)
        time.sleep(1.5)  # six timeouts without a heartbeat
        w.send("done")
    """
    master = make(tmp_path, body).use("watchdog", timeout=0.25)
    kills = Kills(master)
    events = Events(master)
    worker = master.fork()
    assert drive(master) == 0
    assert kills.seen == []
    assert events.of("message") == [(worker, "done")]
    assert (worker.exit_code, worker.last_heartbeat) == (0, None)


@pytest.mark.parametrize("kill_with", ["SIGKILL", "SIGABRT"])
def test_sync_app_beats_cheaply_then_hangs_ignoring_sigterm_and_is_killed(tmp_path, kill_with):
    """A synchronous app calling ``heartbeat()`` in a tight loop writes at most a frame
    per interval (calling it per request costs nothing); when it then hangs in a function
    of its own while ignoring SIGTERM, it is killed anyway (with the watchdog's *signal*),
    with that function named."""
    body = """
        import signal, time, pycluster
        w = pycluster.worker
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        while w.heartbeat_interval is None:
            time.sleep(0.01)
        writes = []
        real_write = w._write
        w._write = lambda frame: (writes.append(frame), real_write(frame))
        for _ in range(100_000):
            w.heartbeat()
        w._write = real_write
        w.send({"calls": 100_000, "writes": len(writes)})

        def blocked_in_sync_code():
            time.sleep(60)

        blocked_in_sync_code()
    """
    master = make(tmp_path, body).use("watchdog", timeout=1.0, signal=kill_with)
    kills = Kills(master)
    events = Events(master)
    worker = master.fork()
    assert drive(master) == 1  # it died unexpectedly and nothing replaced it
    [(_, report)] = events.of("message")
    assert 1 <= report["writes"] <= 3, report
    [(killed, stacks)] = kills.seen
    assert killed is worker and "blocked_in_sync_code" in stacks
    assert worker.signal_code == kill_with


def test_hang_in_c_code_holding_the_gil_is_killed_though_no_stacks_come(tmp_path, caplog):
    """A worker stuck in C code that holds the GIL (``ctypes.PyDLL``'s ``sleep``) cannot
    answer the stack request: the watchdog logs that it got no answer within
    ``stack_timeout``, emits ``watchdog_kill(worker, None)`` and kills it anyway."""
    body = """
        import ctypes, time, pycluster
        w = pycluster.worker
        while w.heartbeat_interval is None:
            time.sleep(0.01)
        w.heartbeat()
        ctypes.PyDLL(None).sleep(60)  # PyDLL keeps the GIL during the call
    """
    master = make(tmp_path, body).use(Watchdog(timeout=0.5, stack_timeout=0.3))
    kills = Kills(master)
    worker = master.fork()
    with caplog.at_level(logging.INFO, logger="pycluster"):
        assert drive(master) == 1
    assert kills.seen == [(worker, None)]
    assert worker.signal_code == "SIGKILL"
    assert any("is hung" in r.getMessage() and "no stacks" in r.getMessage()
               and "holds the GIL" in r.getMessage() for r in caplog.records)


def test_a_draining_worker_is_left_to_kill_timeout(tmp_path):
    """A worker that beats, then is disconnected and takes longer than the watchdog's
    timeout to drain, is not killed by the watchdog: it exits 0 after disconnect."""
    body = """
        import asyncio, time, pycluster
        w = pycluster.worker

        async def main():
            w.attach_loop()
            stop = asyncio.Event()
            w.on("disconnect", stop.set)
            while w.heartbeat_interval is None:
                await asyncio.sleep(0.01)
            w.send("running")
            await stop.wait()
            time.sleep(1.5)  # a slow drain: many timeouts without a heartbeat

        asyncio.run(main())
    """
    master = make(tmp_path, body).use("watchdog", timeout=0.25)
    kills = Kills(master)
    worker = master.fork()
    said: list[str] = []
    worker.on("message", said.append)

    async def scenario(r: Running):
        # after its "running" (sent once it beats): a disconnect before would make send() fail
        await r.until(lambda: worker.last_heartbeat and said, "the worker beating and running")
        worker.disconnect()

    assert drive(master, scenario) == 0
    assert kills.seen == []
    assert (worker.exit_code, worker.exited_after_disconnect) == (0, True)


def test_stacks_of_a_healthy_worker_and_the_failure_paths(tmp_path):
    """``worker.stacks()`` returns every thread's stack of a running worker (its main
    thread's current function named); a bad timeout is a SettingsError; asking a dead
    worker raises ChannelClosedError; a worker's ``heartbeat_interval`` and
    ``count_request`` refuse bad values."""
    body = """
        import threading, time, pycluster
        w = pycluster.worker
        errors = []
        for bad in (0, -1, float("nan"), "1", True):
            try:
                w.heartbeat_interval = bad
            except pycluster.SettingsError as exc:
                errors.append(str(exc))
        for bad in (-1, 1.5, None):
            try:
                w.count_request(bad)
            except pycluster.SettingsError as exc:
                errors.append(str(exc))
        for bad in (0, 2.0):
            try:
                w.max_requests = bad
            except pycluster.SettingsError as exc:
                errors.append(str(exc))
        w.send(errors)
        stop = threading.Event()
        w.on("disconnect", stop.set)

        def waiting_for_the_master():
            stop.wait(60)

        waiting_for_the_master()
    """
    master = make(tmp_path, body)
    events = Events(master)
    worker = master.fork()
    got: dict[str, object] = {}

    async def scenario(r: Running):
        await r.until(lambda: events.of("message"), "the worker's report")
        for _ in range(500):  # until the main thread is past send(), in its wait
            got["stacks"] = await worker.stacks(5.0)
            if "waiting_for_the_master" in got["stacks"]:
                break
        with pytest.raises(pycluster.SettingsError, match="timeout=0"):
            worker.stacks(0)
        worker.kill("SIGKILL")
        await r.until(lambda: worker.is_dead(), "the worker dead")
        with pytest.raises(pycluster.ChannelClosedError):
            worker.stacks()

    assert drive(master, scenario) == 1
    assert "waiting_for_the_master" in got["stacks"]
    [(_, errors)] = events.of("message")
    assert len(errors) == 10, errors
    assert "heartbeat_interval=0" in errors[0] and "count_request(-1)" in errors[5]
    assert "max_requests=0" in errors[8]


@pytest.mark.parametrize(
    ("plugin", "options", "message"),
    [
        (Watchdog, {"timeout": 0}, "timeout=0 must be a number of seconds > 0"),
        (Watchdog, {"timeout": float("inf")}, "timeout=inf"),
        (Watchdog, {"stack_timeout": -1}, "stack_timeout=-1"),
        (Watchdog, {"signal": "SIGNOPE"}, "signal='SIGNOPE'"),
        (Recycle, {"max_requests": -1}, "max_requests=-1 must be an int >= 0"),
        (Recycle, {"max_requests": 1.5}, "max_requests=1.5"),
        (Recycle, {"max_requests_jitter": 5}, "needs max_requests"),
        (Recycle, {"max_memory": float("nan")}, "max_memory=nan"),
        (Recycle, {"max_age": -3}, "max_age=-3"),
        (Recycle, {"check_interval": 0}, "check_interval=0 must be a number of seconds > 0"),
    ],
)
def test_bad_plugin_options_are_settings_errors(plugin, options, message):
    """Each bad option of the watchdog and recycle plugins is a SettingsError naming it."""
    with pytest.raises(pycluster.SettingsError, match=message.replace("(", r"\(")):
        plugin(**options)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--timeout", "-1"], "--timeout -1 must be a number of seconds >= 0"),
        (["--timeout", "nan"], "--timeout nan must be"),
        (["--max-requests", "-5"], "--max-requests -5 must be a whole number >= 0"),
        (["--max-requests", "1.5"], "invalid int value: '1.5'"),
        (["--max-requests-jitter", "10"], "--max-requests-jitter needs --max-requests"),
        (["--max-memory", "inf"], "--max-memory inf must be a number of MiB"),
        (["--max-age", "-0.5"], "--max-age -0.5 must be"),
    ],
)
def test_bad_guard_options_exit_2(tmp_path, monkeypatch, capsys, argv, message):
    """A bad watchdog or recycling option on the command line exits 2 with one line
    naming the option, before any worker starts."""
    script(tmp_path, "import pycluster\n", "app.py")
    monkeypatch.chdir(tmp_path)
    assert cli.main(["run", "app.py", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


#: Counts requests once its limit came: worker 1 counts COUNT, others none.
COUNTING = "\n".join([
    "import threading",
    "if worker.id == 1:",
    "    def count():",
    "        while worker.max_requests is None:",
    "            threading.Event().wait(0.01)",
    "        for _ in range(COUNT):",
    "            worker.count_request()",
    "        worker.send({'counted': worker.requests, 'limit': worker.max_requests})",
    "    threading.Thread(target=count).start()",
])


def counting_worker(count: int) -> str:
    body = textwrap.dedent(http_worker()).replace(
        "asyncio.run(serve())", COUNTING.replace("COUNT", str(count)) + "\nasyncio.run(serve())")
    return body


def test_max_requests_replaces_the_worker_replacement_first_then_drain(tmp_path):
    """A worker that reached its request limit is recycled: ``recycle(worker, reason)``,
    its replacement is forked in its slot and listens, and only then is the old worker
    disconnected; it exits 0 after disconnect and is not respawned; capacity (the number
    of listening workers) never drops. Limits with jitter lie in [N, N + J]; the master can
    ask a worker's count on the plugin's channel."""
    master = make(tmp_path, counting_worker(5)).use("respawn")
    plugin = Recycle(max_requests=3, max_requests_jitter=1)
    master.use(plugin)
    events = Events(master)
    recycles: list[tuple[int, str]] = []
    master.on("recycle", lambda w, reason: recycles.append((w.id, reason)))
    listening_counts: list[int] = []

    def count_listening(*_):
        listening_counts.append(sum(1 for w in master.workers.values()
                                    if w.state is pycluster.WorkerState.LISTENING
                                    and not w.exited_after_disconnect))

    master.on("disconnect", count_listening)
    first, second = master.fork(), master.fork()
    limits: list[int | None] = []
    served: list[dict] = []

    async def scenario(r: Running):
        await r.until(lambda: plugin.limit(second), "worker 2's limit given")
        served.append(await master.channel("recycle").request(second, {}))
        await r.until(lambda: first.is_dead(), "worker 1 recycled")
        limits.extend(plugin.limit(w) for w in master.workers.values())
        master.stop()

    assert drive(master, scenario) == 0
    [(recycled, reason)] = recycles
    assert recycled == 1 and "max_requests" in reason
    names = [(e[0], e[1].id) for e in events.log if e[0] in ("fork", "listening", "disconnect",
                                                             "exit")]
    third = 3
    assert names.index(("listening", third)) < names.index(("disconnect", 1))
    assert first.exited_after_disconnect is True and first.exit_code == 0
    assert [e[0].id for e in events.of("fork")] == [1, 2, 3]  # no respawn of worker 1
    assert events.of("fork")[2][0].slot == first.slot
    assert listening_counts[0] == 2  # when worker 1 left, two others listened
    assert all(3 <= limit <= 4 for limit in limits), limits
    report = next(m for w, m in events.of("message") if "counted" in m)
    assert report["counted"] == 5 and report["limit"] in (3, 4)
    assert second.exit_code == 0
    assert served == [{"requests": 0}]  # what the master can poll: worker 2 counted none


@pytest.mark.parametrize("limit", [{"max_age": 0.3}, {"max_memory": 1}])
def test_max_age_and_max_memory_recycle_gracefully(tmp_path, limit):
    """A worker older than ``max_age`` or with more RSS than ``max_memory`` MiB is
    recycled the same way (the reason says which); the replacement takes its slot."""
    master = make(tmp_path, http_worker())
    master.use(Recycle(check_interval=0.1, **limit))
    recycles: list[tuple[int, str]] = []
    master.on("recycle", lambda w, reason: recycles.append((w.id, reason)))
    first = master.fork()

    async def scenario(r: Running):
        await r.until(lambda: first.is_dead(), "worker 1 recycled")
        await r.until(lambda: master.size == 1, "the replacement serving")
        master.stop()

    assert drive(master, scenario) == 0
    assert recycles[0][0] == 1
    assert ("max_age" if "max_age" in limit else "RSS") in recycles[0][1]
    assert first.exited_after_disconnect is True
    assert rss_bytes(os.getpid()) > 1024 * 1024 and rss_bytes(None) is None


def test_a_failed_replacement_keeps_the_old_worker(tmp_path, caplog):
    """If the replacement dies before it listens, the recycle fails: it is logged, the
    old worker keeps serving (it is not disconnected), nothing respawns the replacement,
    and the retry waits ``retry_after``."""
    body = http_worker(before_listen="if worker.id > 1: raise SystemExit(1)")
    master = make(tmp_path, body).use("respawn")
    plugin = Recycle(max_age=0.2, check_interval=0.1, retry_after=600)
    master.use(plugin)
    first = master.fork()

    async def scenario(r: Running):
        await r.until(lambda: plugin.failed == 1, "the recycle failed")
        await asyncio.sleep(0.3)  # a few more checks: no retry before retry_after
        assert first.is_active() and len(master.workers) == 1
        port = next(m["port"] for m in ports)
        assert b"worker 1" in await asyncio.to_thread(http_get, port)
        master.stop()

    ports: list[dict] = []
    master.on("message", lambda w, m: ports.append(m))
    with caplog.at_level(logging.INFO, logger="pycluster"):
        assert drive(master, scenario) == 0
    assert plugin.recycled == 0
    assert any("recycle of worker 1" in r.getMessage() and "died before it listened"
               in r.getMessage() for r in caplog.records)


def test_nothing_is_recycled_while_the_master_stops(tmp_path):
    """Once the master stops, a worker past its age is not recycled: no fork follows."""
    body = http_worker().replace("await disconnected.wait()\n",
                                 "await disconnected.wait()\n        time.sleep(0.5)\n")
    body = body.replace("import asyncio, os, pycluster", "import asyncio, os, time, pycluster")
    master = make(tmp_path, body)
    master.use(Recycle(max_age=0.05, check_interval=0.05))
    events = Events(master)
    master.once("listening", lambda w, a: master.stop())
    master.fork()
    assert drive(master) == 0
    assert len(events.of("fork")) == 1


APP = """
    import asyncio, time, pycluster
    w = pycluster.worker

    def stuck_in_the_app():
        time.sleep(60)

    class Hello(asyncio.Protocol):
        def connection_made(self, transport):
            self.transport = transport

        def data_received(self, data):
            if b"/block" in data:
                stuck_in_the_app()
            w.count_request()
            self.transport.write(b"HTTP/1.1 200 OK\\r\\nContent-Length: 3\\r\\n\\r\\nok\\n")

    async def main():
        w.attach_loop()
        stop = asyncio.Event()
        w.on("disconnect", stop.set)
        server = await asyncio.get_running_loop().create_server(Hello, sock=w.listen())
        print(f"worker {w.id} serving", flush=True)
        await stop.wait()
        server.close()

    asyncio.run(main())
"""


def test_cli_timeout_and_max_requests_end_to_end(tmp_path):
    """`pycluster run app.py --timeout 1 --max-requests 3`: three requests recycle
    worker 1 (logged, the replacement serves); a request that blocks the loop makes the
    watchdog log the blocking function and kill worker 2, and respawn replaces it."""
    script(tmp_path, APP, "app.py")
    argv = ["-m", "pycluster", "run", "app.py", "-w", "1", "-b", "127.0.0.1:0",
            "--timeout", "1", "--max-requests", "3", "--kill-timeout", "5"]
    with Proc(argv, cwd=tmp_path, start_new_session=True, read_stderr=True) as proc:
        proc.expect(lambda line: line == "worker 1 serving", "worker 1 serving")
        line = proc.expect_err(lambda line: "listening on 127.0.0.1:" in line, "listening")
        port = int(line.rsplit(":", 1)[1].split()[0])
        for _ in range(3):
            assert http_get(port).endswith(b"ok\n")
        proc.expect_err(lambda line: "recycling worker 1" in line and "max_requests 3" in line,
                        "the recycle of worker 1")
        proc.expect(lambda line: line == "worker 2 serving", "worker 2 serving")
        proc.expect_err(lambda line: "worker 1" in line and "after disconnect" in line,
                        "worker 1 drained")
        with pytest.raises(TimeoutError):  # the worker's loop is stuck: no answer
            http_get(port, path="/block", timeout=0.5)
        proc.expect_err(lambda line: "worker 2" in line and "is hung" in line,
                        "the watchdog killing worker 2")
        proc.expect_err(lambda line: "in stuck_in_the_app" in line, "the blocking function")
        proc.expect(lambda line: line == "worker 3 serving", "the replacement serving")
        assert http_get(port).endswith(b"ok\n")
        os.kill(proc.pid, signal.SIGTERM)
        assert proc.wait() == 0


def test_stacks_longer_than_the_message_limit_are_cut_not_fatal(tmp_path):
    """A worker whose stacks are longer than the channel's message limit answers a cut
    text that says so, and its channel stays open (the next request is answered too)."""
    body = """
        import threading, pycluster
        w = pycluster.worker
        stop = threading.Event()
        w.on("disconnect", stop.set)

        def deep(n):
            if n == 0:
                w.send("deep")
                stop.wait(60)
                return
            deep(n - 1)

        deep(200)
    """
    master = make(tmp_path, body, max_message_size=4096)
    events = Events(master)
    worker = master.fork()
    got: list[str] = []

    async def scenario(r: Running):
        await r.until(lambda: events.of("message"), "the worker deep in its stack")
        got.append(await worker.stacks(5.0))
        got.append(await worker.stacks(5.0))
        master.stop()

    assert drive(master, scenario) == 0
    assert all("(cut: the stacks were longer than the message limit)" in text for text in got)
    assert not events.of("error")
