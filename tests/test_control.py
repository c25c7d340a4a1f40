"""The control path: plugin channels both ways, requests with deadlines, acts nobody
handles, scale(), timers, and binding the ``bind`` addresses before any worker starts."""

from __future__ import annotations

import asyncio
import logging
import socket
import textwrap

import pytest
from helpers import Events, run, script

import pycluster

#: A worker that opens plugin channel "probe": it answers requests (``{"op": ...}``),
#: echoes pushes back, reports what it sees as user messages, and stays until told to go.
PROBE = """
    import threading, time, pycluster
    w = pycluster.worker
    ch = w.channel("probe")
    stop = threading.Event()
    w.on("disconnect", stop.set)
    w.on("message", lambda m: w.send({"user": m}))
    ch.on("message", lambda data: ch.send({"echo": data}))

    @ch.handle
    def answer(data):
        if data["op"] == "add":
            return data["a"] + data["b"]
        if data["op"] == "fail":
            raise ValueError("no good: " + data["why"])
        if data["op"] == "slow":
            time.sleep(data["s"])
            return "late"

    w.send("started")
    for ask in WORKER_ASKS:
        try:
            w.send({"asked": ask, "got": ch.request(ask, timeout=10)})
        except pycluster.RequestError as exc:
            w.send({"asked": ask, "error": str(exc), "timed_out": exc.timed_out})
    w.send("asked")
    stop.wait(60)
"""


def probe(tmp_path, asks=(), **settings):
    body = f"WORKER_ASKS = {list(asks)!r}\n" + textwrap.dedent(PROBE)
    settings.setdefault("kill_timeout", 10)
    return pycluster.Master(exec=script(tmp_path, body), **settings)


def test_plugin_channel_push_and_ask_both_ways_apart_from_user_messages(tmp_path):
    """A plugin pushes to a worker's channel and gets the push echoed back as a channel
    ``message`` (never a user ``message`` event on either side); it asks the worker and gets
    the handler's answer; the worker asks the plugin and gets the master handler's answer,
    also when that handler is a coroutine."""
    master = probe(tmp_path, asks=[{"x": 2}, {"slow": True}])
    channel = master.channel("probe")
    assert master.channel("probe") is channel
    seen: dict[str, list] = {"channel": [], "user": []}
    answers: list = []

    async def slow_answer(data):
        await asyncio.sleep(0)
        return {"doubled": data["x"] * 2} if "x" in data else "awaited"

    channel.handle(lambda worker, data: slow_answer(data))
    channel.on("message", lambda worker, data: seen["channel"].append((worker.id, data)))

    async def ask(worker):
        answers.append(await channel.request(worker, {"op": "add", "a": 2, "b": 3}))
        worker.disconnect()

    def on_message(worker, message):
        seen["user"].append(message)
        if message == "asked":
            channel.send(worker, {"n": 1})
        if isinstance(message, dict) and message.get("user") == "go":
            asyncio.ensure_future(ask(worker))

    def on_channel(worker, data):
        if data == {"echo": {"n": 1}}:
            worker.send("go")

    master.on("message", on_message)
    channel.on("message", on_channel)
    master.fork()
    assert run(master) == 0
    assert seen["channel"] == [(1, {"echo": {"n": 1}})]
    assert seen["user"] == [
        "started",
        {"asked": {"x": 2}, "got": {"doubled": 4}},
        {"asked": {"slow": True}, "got": "awaited"},
        "asked",
        {"user": "go"},
    ]
    assert answers == [5]


def test_failed_requests_say_why_and_never_hurt_the_channel(tmp_path):
    """A worker's handler that raises fails the plugin's request with its message; a request
    on a channel the worker never opened, or past its deadline, fails too (``timed_out``);
    a worker asking a channel no plugin opened gets an error naming it. The worker stays
    connected and answers the next request."""
    master = probe(tmp_path, asks=[{"to": "nobody"}])
    master.channel("other")  # opened by the master, not by the worker
    outcomes: dict[str, object] = {}

    async def asks(worker):
        for name, channel, data, timeout in [
            ("fail", "probe", {"op": "fail", "why": "bad input"}, 10),
            ("no-channel", "other", {}, 10),
            ("slow", "probe", {"op": "slow", "s": 3}, 0.2),
            ("after", "probe", {"op": "add", "a": 1, "b": 1}, 10),
        ]:
            try:
                outcomes[name] = await master.channel(channel).request(worker, data, timeout)
            except pycluster.RequestError as exc:
                outcomes[name] = (str(exc), exc.timed_out)
        worker.disconnect()

    def on_message(worker, message):
        if isinstance(message, dict) and "asked" in message:
            outcomes["worker-ask"] = message
        if message == "asked":
            asyncio.ensure_future(asks(worker))

    master.on("message", on_message)
    master.fork()
    assert run(master) == 0
    assert "no good: bad input" in outcomes["fail"][0] and outcomes["fail"][1] is False
    assert "no plugin channel 'other'" in outcomes["no-channel"][0]
    assert outcomes["slow"][1] is True and "within 0.2 s" in outcomes["slow"][0]
    assert outcomes["after"] == 2
    ask = outcomes["worker-ask"]
    assert "no plugin channel 'probe'" in ask["error"] and ask["timed_out"] is False


def test_request_to_a_worker_that_dies_fails_at_once(tmp_path):
    """A plugin's request pending when its worker is SIGKILLed fails with RequestError
    (the channel closed) instead of waiting for its deadline; asking a dead worker raises
    ChannelClosedError."""
    master = probe(tmp_path)
    channel = master.channel("probe")
    outcome: list = []

    async def ask(worker):
        pending = channel.request(worker, {"op": "slow", "s": 30}, timeout=60)
        worker.kill("SIGKILL")
        try:
            await pending
        except pycluster.RequestError as exc:
            outcome.append(str(exc))

    master.on("message", lambda w, m: m == "asked" and asyncio.ensure_future(ask(w)))
    master.on("exit", lambda w, code, sig: outcome.append(sig))
    worker = master.fork()
    assert run(master) == 1
    assert outcome[0] == "SIGKILL" or "closed" in outcome[0]
    assert any("closed" in str(o) for o in outcome), outcome
    with pytest.raises(pycluster.ChannelClosedError):
        channel.send(worker, "late")


def test_an_act_nobody_handles_is_answered_with_an_error_not_a_protocol_error(tmp_path, caplog):
    """A control act the master does not know (a newer worker, a plugin missing) is logged
    and answered with an error; the worker is not killed and carries on messaging."""
    body = """
        import pycluster
        w = pycluster.worker
        reply, _ = w._request("no-such-act", {"x": 1}, "a test request", 10)
        w.send({"ok": reply["ok"], "error": reply["error"]})
    """
    master = pycluster.Master(exec=script(tmp_path, body), kill_timeout=10)
    events = Events(master)
    master.fork()
    with caplog.at_level(logging.WARNING, logger="pycluster"):
        assert run(master) == 0
    [(worker, message)] = events.of("message")
    assert message["ok"] is False and "no-such-act" in message["error"]
    assert (worker.exit_code, worker.signal_code) == (0, None)
    assert not events.of("error")
    assert any("no-such-act" in r.getMessage() for r in caplog.records)


def test_scale_forks_or_drains_the_newest_workers(tmp_path):
    """scale(3) from one worker forks two; scale(1) then disconnects the two newest, which
    exit after disconnect, and the first keeps running until the stop; size counts the
    workers that are alive and not leaving."""
    master = probe(tmp_path)
    steps: list = []

    def on_message(worker, message):
        if message != "asked":
            return
        steps.append((worker.id, master.size))
        if worker.id == 1:
            master.scale(3)
        elif len(steps) == 3:
            master.scale(1)
            steps.append(("after", master.size))

    def on_exit(worker, code, sig):
        steps.append(("exit", worker.id, worker.exited_after_disconnect))
        if master.size == 1 and len(master.workers) == 1:
            master.stop()

    master.on("message", on_message)
    master.on("exit", on_exit)
    master.fork()
    assert run(master) == 0
    assert steps[0] == (1, 1)
    assert ("after", 1) in steps
    exits = [s for s in steps if s[0] == "exit"]
    assert sorted(exits[:2]) == [("exit", 2, True), ("exit", 3, True)]
    assert exits[2] == ("exit", 1, True)


def test_scale_refuses_bad_counts_and_a_stopping_master(tmp_path):
    """scale() takes an int >= 1 (0 would end the cluster: that is stop()); once the master
    stops, scaling is a StateError."""
    master = probe(tmp_path)
    for bad in (0, -1, "2", 2.0, True, None):
        with pytest.raises(pycluster.SettingsError, match="scale"):
            master.scale(bad)
    master.stop()
    with pytest.raises(pycluster.StateError, match="stopping"):
        master.scale(2)
    assert run(master) == 0


def test_timers_before_run_and_ticks_that_do_not_hold_the_master(tmp_path):
    """call_later() before run() fires once the master runs (and keeps it running until
    then); call_every() ticks while it runs, does not keep it running, survives a failing
    tick (an error event), and stops with the master; bad intervals are SettingsErrors."""
    master = pycluster.Master(exec=script(tmp_path, "import pycluster\n"), kill_timeout=10)
    fired, ticks, errors = [], [], []
    master.on("error", errors.append)

    def tick():
        ticks.append(len(ticks))
        if len(ticks) == 2:
            raise RuntimeError("a bad tick")

    master.call_later(0.05, lambda: fired.append(master.fork().id))
    master.call_every(0.01, tick)
    with pytest.raises(pycluster.SettingsError, match="interval"):
        master.call_every(0, tick)
    with pytest.raises(pycluster.SettingsError, match="delay"):
        master.call_later(-1, tick)
    assert run(master) == 0
    assert fired == [1]
    assert len(ticks) >= 2
    assert [str(e.args[0]) if e.args else str(e) for e in errors] == ["a bad tick"]
    count = len(ticks)
    with pytest.raises(pycluster.StateError, match="finished"):
        master.call_every(1, tick)
    assert len(ticks) == count


def test_bind_addresses_are_bound_before_the_first_worker(tmp_path):
    """With bind=[":0" style address], the master binds before forking: the worker's
    ``bind`` holds the real port, listen() with no arguments gets that socket, and the
    listening event carries the same port."""
    body = """
        import pycluster
        w = pycluster.worker
        sock = w.listen()
        w.send({"bind": w.bind, "port": sock.getsockname()[1]})
    """
    master = pycluster.Master(exec=script(tmp_path, body), bind="127.0.0.1:0", kill_timeout=10)
    events = Events(master)
    master.fork()
    assert run(master) == 0
    [(worker, message)] = events.of("message")
    [(_, address)] = events.of("listening")
    port = message["port"]
    assert port != 0 and message["bind"] == [[port, "127.0.0.1"]] and address.port == port


def test_a_bind_address_in_use_fails_fork_before_any_worker_starts(tmp_path):
    """A bind address already taken makes the first fork() raise OSError naming the
    address and the reason, and no worker process is started."""
    taken = socket.socket()
    try:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        master = pycluster.Master(exec=script(tmp_path, "import pycluster\n"),
                                  bind=f"127.0.0.1:{port}")
        with pytest.raises(OSError, match=f"cannot listen on 127.0.0.1:{port}: .*in use"):
            master.fork()
        assert dict(master.workers) == {}
    finally:
        taken.close()


HOOKS = """
    import pycluster

    def answer(worker):
        channel = worker.channel("hooked")
        channel.handle(lambda data: {"set": pycluster.worker is worker, "id": worker.id,
                                     "data": data})

    def broken(worker):
        raise RuntimeError("the hook is broken")
"""


def test_worker_setup_hooks_run_in_every_worker_before_the_app(tmp_path):
    """A plugin's worker_setup("module:function") hook runs in each worker as it starts,
    with pycluster.worker set, before the app's code: here it opens a channel the master
    then asks; the same hook added twice runs once."""
    script(tmp_path, HOOKS, "hooks.py")
    body = """
        import threading, pycluster
        done = threading.Event()
        pycluster.worker.on("disconnect", done.set)
        pycluster.worker.send("started")
        done.wait(60)
    """
    master = pycluster.Master(exec=script(tmp_path, body), kill_timeout=10)
    master.worker_setup("hooks:answer")
    master.worker_setup("hooks:answer")
    answers = []

    async def ask(worker):
        answers.append(await master.channel("hooked").request(worker, "hi"))
        if len(answers) == 2:
            master.stop()

    master.on("message", lambda w, m: asyncio.ensure_future(ask(w)))
    master.fork()
    master.fork()
    assert run(master) == 0
    assert sorted(a["id"] for a in answers) == [1, 2]
    assert all(a["set"] and a["data"] == "hi" for a in answers)


def test_a_failing_worker_setup_hook_is_a_boot_failure(tmp_path):
    """A hook that raises ends its worker with BOOT_FAILURE before the app runs; a hook
    that is not a module:function string is refused at once."""
    script(tmp_path, HOOKS, "hooks.py")
    master = pycluster.Master(exec=script(tmp_path, "import pycluster\nprint('app ran')\n"),
                              silent=True, kill_timeout=10)
    with pytest.raises(pycluster.SettingsError, match="module:function"):
        master.worker_setup("not a spec")
    master.worker_setup("hooks:broken")
    lines = []
    master.on("output", lambda w, stream, line: lines.append(line))
    worker = master.fork()
    assert run(master) == 1
    assert worker.exit_code == pycluster.BOOT_FAILURE
    assert "app ran" not in lines
    assert lines[-1] == "pycluster: worker 1: the worker setup hook 'hooks:broken' failed"
    assert "RuntimeError: the hook is broken" in lines
