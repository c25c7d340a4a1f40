"""The reload plugin: a rolling reload replaces every worker, one slot at a time, gated
on the replacement's readiness, without a failed request; a failed replacement leaves
the old worker serving.

Workers are asyncio HTTP servers that drain like examples/asyncio_server.py, on
127.0.0.1 port 0; client threads send keep-alive requests throughout.
"""

from __future__ import annotations

import json
import os
import signal
import textwrap

import pytest
from helpers import DEADLINE, Events, Proc, script, wait_until
from plugin_helpers import Running, clients, drive, http_worker
from pycluster.plugins.reload import Reload

import pycluster


def write_worker(tmp_path, **blanks):
    path = tmp_path / "worker.py"
    path.write_text(textwrap.dedent(http_worker(**blanks)))
    return str(path)


class Cluster:
    """A master with the reload plugin and a record of what the reload did."""

    def __init__(self, tmp_path, n=2, *, kill_timeout=10, respawn=False, **options):
        self.master = pycluster.Master(exec=write_worker(tmp_path, **options.pop("blanks", {})),
                                       kill_timeout=kill_timeout)
        self.reload = Reload(**options)
        self.master.use(self.reload)
        if respawn:
            self.master.use("respawn")
        self.events = Events(self.master)
        self.hello = {}  # worker id -> its hello message
        self.rounds = []  # reloading / reloaded / reload_failed, in order
        self.failures = []  # reasons given with reload_failed
        self.most_live = 0  # most workers not yet told to disconnect, at any fork
        self.early_disconnects = []  # old workers disconnected before their replacement listened
        master = self.master
        master.on("message", lambda w, m: self.hello.setdefault(w.id, m))
        master.on("reloading", lambda: self.rounds.append("reloading"))
        master.on("reloaded", lambda: self.rounds.append("reloaded"))
        master.on("reload_failed", lambda reason: (self.rounds.append("reload_failed"),
                                                   self.failures.append(reason)))
        master.on("fork", self._on_fork)
        master.on("disconnect", self._on_disconnect)
        for i in range(n):
            master.fork(env={"TAG": "abcdef"[i]})

    def _on_fork(self, worker):
        self.most_live = max(self.most_live, len(self.live()))

    def _on_disconnect(self, worker):
        if not worker.exited_after_disconnect or self.master.stopping:
            return
        if not any(w.slot == worker.slot and w.id > worker.id
                   and w.state is pycluster.WorkerState.LISTENING
                   for w in self.master.workers.values()):
            self.early_disconnects.append(worker.id)

    def live(self):
        """Workers not told to disconnect, by id."""
        return {w.id: w for w in self.master.workers.values() if not w.exited_after_disconnect}

    def port(self):
        return next(iter(self.hello.values()))["port"]


async def traffic(r: Running, cs, more=50):
    """Wait until the clients got *more* answers than now."""
    start = sum(c.ok for c in cs)
    await r.until(lambda: sum(c.ok for c in cs) >= start + more, f"{more} more answers")


def failures(cs):
    return [f for c in cs for f in c.failures]


@pytest.mark.slow
def test_reload_replaces_every_worker_with_no_failed_request(tmp_path):
    """Three reloads in a row under keep-alive load: each gives all-new worker ids, the
    same count in the same slots with the same fork env, never more than N + surge workers
    not disconnecting, an old worker disconnected only once its replacement listens, the
    code as on disk at that moment, and not one failed request."""
    cluster = Cluster(tmp_path)
    master = cluster.master
    generations = []

    async def scenario(r: Running):
        await r.until(lambda: len(cluster.hello) == 2, "two workers listening")
        generations.append(sorted(cluster.live()))
        with clients(cluster.port()) as cs:
            for n in range(1, 4):
                if n == 3:  # the third reload runs the code as it is on disk now
                    write_worker(tmp_path, version=2)
                await traffic(r, cs)
                master.reload()
                await r.until(lambda n=n: cluster.reload.completed == n, f"reload {n} done")
                live = cluster.live()
                await r.until(lambda live=live: all(i in cluster.hello for i in live),
                              "new hellos")
                generations.append(sorted(live))
                assert sorted((w.slot, cluster.hello[i]["tag"]) for i, w in live.items()) == [
                    (0, "a"), (1, "b")]
            await traffic(r, cs)
            await r.until(lambda: all(b"version 2" in c.last for c in cs),
                          "answers from the reloaded code")
        assert failures(cs) == []
        assert sum(c.ok for c in cs) > 0
        master.stop()

    assert drive(cluster.master, scenario, timeout=60) == 0
    assert generations == [[1, 2], [3, 4], [5, 6], [7, 8]]
    assert [cluster.hello[i]["version"] for i in range(1, 9)] == [1] * 6 + [2] * 2
    assert cluster.rounds == ["reloading", "reloaded"] * 3
    assert cluster.most_live <= 2 + 1
    assert cluster.early_disconnects == []
    assert all((w.exit_code, w.exited_after_disconnect) == (0, True)
               for (w, *_) in cluster.events.of("exit"))


MASTER = """
    import json, sys, pycluster

    def out(**fields):
        print(json.dumps(fields), flush=True)

    master = pycluster.Master(exec={worker!r}, kill_timeout=10)
    master.use("reload")
    master.on("message", lambda w, m: out(event="hello", slot=w.slot, **m))
    master.on("reloaded", lambda: out(event="reloaded"))
    master.on("reload_failed", lambda reason: out(event="reload_failed", reason=reason))
    master.on("exit", lambda w, code, sig: out(event="exit", id=w.id, code=code, signal=sig,
                                                after=w.exited_after_disconnect))
    master.fork(env={{"TAG": "a"}})
    master.fork(env={{"TAG": "b"}})
    sys.exit(master.run())
"""


@pytest.mark.slow
def test_sighup_reloads_a_master_process(tmp_path):
    """SIGHUP to a master process (with the reload plugin) is a rolling reload: three
    SIGHUPs give three new generations in the same slots, with no failed request; SIGTERM
    then ends the master with 0 and every worker exited after disconnect."""
    master_py = script(tmp_path, MASTER.format(worker=write_worker(tmp_path)), "master.py")
    hello = {}
    exits = []

    def line(fields):
        if fields["event"] == "hello":
            hello[fields["id"]] = fields
        elif fields["event"] == "exit":
            exits.append(fields)
        return fields["event"] in ("reloaded", "reload_failed")

    with Proc([master_py], cwd=tmp_path) as proc:
        proc.json(lambda f: line(f) or len(hello) == 2, "two hellos")
        port = hello[1]["port"]
        with clients(port) as cs:
            for n in range(3):
                start = sum(c.ok for c in cs)
                wait_until(lambda s=start: sum(c.ok for c in cs) >= s + 50, "client traffic")
                os.kill(proc.pid, signal.SIGHUP)
                got = proc.json(line, f"reload {n + 1} done")
                assert got["event"] == "reloaded", got
            start = sum(c.ok for c in cs)
            wait_until(lambda: sum(c.ok for c in cs) >= start + 50, "client traffic")
        assert failures(cs) == []
        os.kill(proc.pid, signal.SIGTERM)
        assert proc.wait() == 0, proc.finish()
        while (rest := proc.lines.get(timeout=DEADLINE)) is not None:
            if rest.startswith("{"):
                line(json.loads(rest))
    assert sorted(hello) == list(range(1, 9))
    assert [(hello[i]["slot"], hello[i]["tag"]) for i in range(1, 9)] == [(0, "a"), (1, "b")] * 4
    assert sorted(e["id"] for e in exits) == list(range(1, 9))
    assert all((e["code"], e["signal"], e["after"]) == (0, None, True) for e in exits)


HANG = "import time\n        if os.path.exists({mark!r}): time.sleep(3600)"
CRASH = "if os.path.exists({mark!r}): raise RuntimeError('replacement fails to boot')"


@pytest.mark.parametrize(
    ("how", "ready_timeout", "reason"),
    [
        (HANG, 0.5, "replacement worker 3 was not ready within 0.5 s"),
        (CRASH, 30, "replacement worker 3 died before it was ready (exit code 1)"),
    ],
    ids=["hangs", "crashes"],
)
def test_failed_replacement_keeps_the_old_workers_serving(tmp_path, how, ready_timeout, reason):
    """A replacement that never listens (hung: stopped after ready_timeout, SIGKILLed
    after kill_timeout) or crashes while booting stops the reload: reload_failed(reason)
    is emitted once, the other slot is left alone, the old workers keep serving with no
    failed request, and respawn (installed too) does not replace the failed one."""
    mark = tmp_path / "broken"
    cluster = Cluster(tmp_path, respawn=True, kill_timeout=2, ready_timeout=ready_timeout,
                      blanks={"before_listen": how.format(mark=str(mark))})
    master = cluster.master

    async def scenario(r: Running):
        await r.until(lambda: len(cluster.hello) == 2, "two workers listening")
        with clients(cluster.port()) as cs:
            await traffic(r, cs)
            mark.write_text("the code on disk is broken now")
            master.reload()
            await r.until(lambda: cluster.failures, "reload_failed")
            await r.until(lambda: 3 in [e[0].id for e in cluster.events.of("exit")],
                          "the failed replacement's exit")
            await traffic(r, cs, 200)
            assert {c.last.split()[1] for c in cs} <= {b"1", b"2"}
        assert failures(cs) == []
        assert sorted(cluster.live()) == [1, 2]
        assert all(w.is_connected() for w in cluster.live().values())
        assert not cluster.reload.running
        master.stop()

    assert drive(master, scenario, timeout=60) == 0
    assert cluster.failures == [reason + "; keeping the old worker(s) and stopping the reload"]
    assert cluster.rounds == ["reloading", "reload_failed"]
    assert (cluster.reload.failed, cluster.reload.completed) == (1, 0)
    assert [e[0].id for e in cluster.events.of("fork")] == [1, 2, 3]
    assert master.plugins[1].restarts == 0


@pytest.mark.slow
@pytest.mark.parametrize("surge", [1, 2])
def test_reload_asked_during_a_reload_runs_once_more_afterwards(tmp_path, surge):
    """Two more reload() calls while a reload runs are merged into one more round, which
    starts after the first ends: rounds never overlap, at most N + surge workers are not
    disconnecting at any fork, and every slot is replaced twice."""
    cluster = Cluster(tmp_path, n=3, surge=surge)
    master = cluster.master
    asked = []

    def again(worker):
        if worker.id == 4 and not asked:
            asked.append(cluster.reload.running)
            master.reload()
            master.reload()

    master.on("fork", again)

    async def scenario(r: Running):
        await r.until(lambda: len(cluster.hello) == 3, "three workers listening")
        master.reload()
        await r.until(lambda: cluster.reload.completed == 2 and not cluster.reload.running,
                      "two rounds done")
        master.stop()

    assert drive(master, scenario, timeout=60) == 0
    assert asked == [True]
    assert cluster.rounds == ["reloading", "reloaded"] * 2
    assert [e[0].id for e in cluster.events.of("fork")] == list(range(1, 10))
    assert cluster.most_live <= 3 + surge
    assert cluster.early_disconnects == []
    slots = {w.id: w.slot for (w,) in cluster.events.of("fork")}
    assert [slots[i] for i in range(1, 10)] == [0, 1, 2] * 3


@pytest.mark.parametrize("wait_for", ["listening", "ready"])
def test_wait_for_ready_waits_for_worker_ready(tmp_path, wait_for):
    """With wait_for="ready" the old worker is disconnected only after its replacement
    called pycluster.worker.ready() (here: when the master tells it to), not at its
    listening; with the default "listening" it does not wait for ready()."""
    cluster = Cluster(tmp_path, n=1, wait_for=wait_for, blanks={"after_listen": (
        'worker.on("message", lambda m: worker.ready() if m == "go" else worker.send(m))')})
    master = cluster.master
    ready = []
    master.on("ready", lambda w: ready.append(w.id))

    async def scenario(r: Running):
        await r.until(lambda: 1 in cluster.hello, "worker 1 listening")
        old = master.workers[1]
        master.reload()
        await r.until(lambda: 2 in cluster.hello, "the replacement listening")
        if wait_for == "ready":
            # a round trip to the replacement: the reload has seen its listening by now
            master.workers[2].send("ping")
            await r.until(lambda: ("message", master.workers[2], "ping") in cluster.events.log,
                          "the replacement's echo")
            assert not old.exited_after_disconnect
            assert cluster.reload.running
            master.workers[2].send("go")
        await r.until(lambda: cluster.reload.completed == 1, "the reload done")
        assert old.exited_after_disconnect
        master.stop()

    assert drive(master, scenario) == 0
    assert ready == ([2] if wait_for == "ready" else [])
    assert cluster.early_disconnects == []


def test_reload_without_the_plugin_is_a_state_error(tmp_path):
    """master.reload() with no reload plugin raises StateError naming the fix, also after
    the plugin was removed again; with it installed it is accepted."""
    master = pycluster.Master(exec=write_worker(tmp_path))
    with pytest.raises(pycluster.StateError, match=r"master\.use\('reload'\)"):
        master.reload()
    plugin = Reload()
    master.use(plugin)
    master.unuse(plugin)
    with pytest.raises(pycluster.StateError, match="reload plugin"):
        master.reload()


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"ready_timeout": 0}, "ready_timeout"),
        ({"wait_for": "online"}, "wait_for"),
        ({"surge": 0}, "surge"),
        ({"surge": True}, "surge"),
        ({"nope": 1}, "nope"),
    ],
)
def test_bad_options_are_settings_errors(tmp_path, options, match):
    """Bad reload options are SettingsErrors that name the option."""
    master = pycluster.Master(exec=write_worker(tmp_path))
    with pytest.raises(pycluster.SettingsError, match=match):
        master.use("reload", **options)
