"""``start_method="forkserver"``: workers forked from a template that imported the app once
behave as spawned ones — same events, ids, env, output capture, respawn, reload (with
new code), and they die with the master (issue 12, part 1)."""

from __future__ import annotations

import os
import signal
import textwrap

import pytest
from helpers import DEADLINE, Events, Proc, http_get, run, script, wait_until

import pycluster
from pycluster._procfs import children, state

#: The app: answers ``VERSION pid`` over HTTP on the first --bind address, drains on
#: disconnect; every import of the module appends a line to $IMPORT_LOG.
APP = """
    import asyncio, os, sys, pycluster

    VERSION = "v1"
    with open(os.environ["IMPORT_LOG"], "a") as log:
        log.write(f"{os.getpid()} primary={pycluster.is_primary} worker={pycluster.worker}\\n")

    class Answer(asyncio.Protocol):
        def connection_made(self, transport):
            self.transport = transport
        def data_received(self, data):
            body = f"{VERSION} {os.getpid()}".encode()
            self.transport.write(b"HTTP/1.0 200 OK\\r\\nContent-Length: %d\\r\\n\\r\\n%s"
                                 % (len(body), body))
            self.transport.close()

    async def serve():
        loop = asyncio.get_running_loop()
        pycluster.worker.attach_loop()
        done = loop.create_future()
        pycluster.worker.on("disconnect", lambda: done.done() or done.set_result(None))
        pycluster.worker.on("message", lambda m: sys.exit(m["exit"]) if "exit" in m else
                            print(m["say"], os.environ.get("GREETING"), flush=True))
        server = await loop.create_server(Answer, sock=pycluster.worker.listen())
        await done
        server.close()

    def main():
        asyncio.run(serve())
"""


def app(tmp_path, body: str = APP) -> str:
    """Write the app module into *tmp_path*; return the $IMPORT_LOG path."""
    script(tmp_path, body, "fsapp.py")
    return str(tmp_path / "imports.log")


def imports(log: str) -> list[str]:
    """The lines of the import log: one per import of the app module."""
    try:
        with open(log) as f:
            return f.read().splitlines()
    except FileNotFoundError:
        return []


def master_for(tmp_path, **settings) -> pycluster.Master:
    log = app(tmp_path) if not (tmp_path / "fsapp.py").exists() else str(tmp_path / "imports.log")
    env = {"IMPORT_LOG": log, **settings.pop("env", {})}
    return pycluster.Master(target="fsapp:main", start_method="forkserver", cwd=str(tmp_path),
                            bind="127.0.0.1:0", args=[], env=env, kill_timeout=10, **settings)


def alive(pid: int) -> bool:
    """Whether *pid* runs (a zombie does not count)."""
    return state(pid) not in (None, "Z")


def test_forked_workers_have_a_spawned_workers_events_ids_env_and_parent(tmp_path):
    """Two forked workers: per worker fork → online → listening → disconnect → exit in
    order, ids 1 and 2, exited_after_disconnect after stop(), the master is their parent
    (they were adopted), settings.env and fork env reach them, and the app was imported
    once, in the template, where is_primary is False and pycluster.worker is None."""
    master = master_for(tmp_path, env={"GREETING": "hi"}, silent=True)
    events = Events(master)
    lines: list[tuple[int, str, str]] = []
    master.on("output", lambda w, stream, line: lines.append((w.id, stream, line)))
    workers = [master.fork(), master.fork(env={"GREETING": "hello"})]
    parents: dict[int, int | None] = {}

    def listening(worker, address):
        parents[worker.id] = _ppid(worker.pid)
        assert http_get(address.port).split(b"\r\n\r\n")[1].startswith(b"v1 ")
        worker.send({"say": f"w{worker.id}"})

    def output(worker, stream, line):
        if len(lines) == 2:
            master.stop()

    master.on("listening", listening)
    master.on("output", output)
    assert run(master) == 0
    assert [w.id for w in workers] == [1, 2]
    for worker in workers:
        assert events.names(worker) == ["fork", "online", "listening", "disconnect", "exit"]
        assert worker.exited_after_disconnect is True
        assert parents[worker.id] == os.getpid()
    assert sorted(lines) == [(1, "stdout", "w1 hi"), (2, "stdout", "w2 hello")]
    log = imports(str(tmp_path / "imports.log"))
    assert len(log) == 1 and log[0].endswith("primary=False worker=None"), log


def test_a_crash_is_not_exited_after_disconnect_and_respawn_forks_again(tmp_path):
    """A forked worker that exits 7 by itself: exit(7, None), exited_after_disconnect
    False; one SIGKILLed: exit(None, "SIGKILL"); respawn replaces both in their slots
    from the same template (the app is still imported only once)."""
    master = master_for(tmp_path)
    master.use("respawn", min_delay=0.01, max_delay=0.01, jitter=0)
    exits: list[tuple[int, int | None, str | None, bool | None, int]] = []
    listening: list[pycluster.Worker] = []

    def on_listening(worker, address):
        listening.append(worker)
        if worker.id == 1:
            worker.send({"exit": 7})
        elif worker.id == 2:
            worker.kill("SIGKILL")
        elif len(listening) == 4:
            master.stop()

    master.on("listening", on_listening)
    master.on("exit", lambda w, code, sig: exits.append(
        (w.id, code, sig, w.exited_after_disconnect, w.slot)))
    master.fork()
    master.fork()
    assert run(master) == 0
    assert (1, 7, None, False, 0) in exits
    assert (2, None, "SIGKILL", False, 1) in exits
    assert sorted(w.slot for w in listening[2:]) == [0, 1]
    assert len(imports(str(tmp_path / "imports.log"))) == 1


def test_a_template_that_dies_is_replaced(tmp_path):
    """SIGKILL the template while a worker serves: the worker keeps serving, the next
    fork comes from a new template (the app is imported a second time)."""
    master = master_for(tmp_path)
    log = str(tmp_path / "imports.log")
    templates: list[int] = []

    def on_listening(worker, address):
        if worker.id == 1:
            pids = master._forkserver.pids()  # noqa: SLF001 - which child is the template
            templates.extend(pids)
            os.kill(pids[0], signal.SIGKILL)
            wait_until(lambda: not alive(pids[0]), "the template's death")
            master.call_later(0.05, _fork_when_replaced, master, log)
        else:
            assert http_get(address.port).startswith(b"HTTP/1.0 200")
            master.stop()

    master.on("listening", on_listening)
    master.fork()
    assert run(master) == 0
    assert len(templates) == 1
    assert len(imports(log)) == 2


def test_a_worker_comes_from_the_spare_and_a_dead_spare_is_skipped(tmp_path):
    """The template forks a spare worker ahead and the master adopts it: the next fork()
    is that very process. A spare killed while it waits is not used (the fork after it
    still gets a worker, forked directly) and is reaped at once: no zombie stays behind."""
    master = master_for(tmp_path)
    spares: list[int] = []
    listening: list[pycluster.Worker] = []

    def spare() -> int:
        known = {w.pid for w in master.workers.values()} | set(master._forkserver.pids())  # noqa: SLF001
        found = [p for p in children(os.getpid()) if p not in known and alive(p)]
        return found[0] if found else 0

    def on_listening(worker, address):
        listening.append(worker)
        assert http_get(address.port).startswith(b"HTTP/1.0 200")
        if len(listening) == 1:
            wait_until(spare, "the template's spare")
            spares.append(spare())
            assert master.fork().pid == spares[0]  # the spare became worker 2
        elif len(listening) == 2:
            wait_until(spare, "the next spare")
            spares.append(spare())
            os.kill(spares[1], signal.SIGKILL)
            wait_until(lambda: not alive(spares[1]), "the spare's death")
            assert master.fork().pid != spares[1]
            assert state(spares[1]) is None  # reaped at once, not left a zombie
        else:
            master.stop()

    master.on("listening", on_listening)
    master.fork()
    assert run(master) == 0
    assert len(listening) == 3


def _fork_when_replaced(master, log):
    if len(imports(log)) < 2:  # the new template has not imported the app yet
        master.call_later(0.05, _fork_when_replaced, master, log)
        return
    master.fork()


def test_reload_loads_new_code_from_a_new_template(tmp_path):
    """After the module changes on disk, reload() starts a new template (the app is
    imported again), replaces every worker from it (they answer v2), and retires the
    old template."""
    master = master_for(tmp_path)
    master.use("reload")
    answers: list[bytes] = []
    before: set[int] = set()
    ports: list[int] = []

    def on_listening(worker, address):
        ports.append(address.port)
        if master.size == 2 and not before:
            before.update(children(os.getpid()))
            script(tmp_path, APP.replace('"v1"', '"v2"'), "fsapp.py")
            master.reload()

    def exited(worker, code, signal):
        if master.size == 2 and not any(w.pid in before for w in master.workers.values()):
            for _ in range(4):  # the old workers are gone: only the new ones answer
                answers.append(http_get(ports[0]).split(b"\r\n\r\n")[1][:2])
            wait_until(lambda: not any(alive(p) for p in before), "the old template's exit")
            master.stop()

    master.on("listening", on_listening)
    master.once("reloaded", lambda: master.on("exit", exited))
    master.fork()
    master.fork()
    assert run(master) == 0
    assert answers == [b"v2"] * 4
    assert len(imports(str(tmp_path / "imports.log"))) == 2


def test_a_reload_whose_new_code_does_not_import_fails_and_keeps_the_old_workers(tmp_path):
    """The new code raises at import: reload_failed says why (the exception's text), no
    worker is replaced, and the old ones still answer with the old code."""
    master = master_for(tmp_path)
    master.use("reload")
    failures: list[str] = []
    answers: list[bytes] = []
    first: list[int] = []
    ports: list[int] = []

    def on_listening(worker, address):
        ports.append(address.port)
        if master.size == 2 and not first:
            first.extend(sorted(w.pid for w in master.workers.values()))
            script(tmp_path, "raise RuntimeError('config is broken')\n", "fsapp.py")
            master.reload()

    def failed(reason):
        failures.append(reason)
        answers.append(http_get(ports[0]).split(b"\r\n\r\n")[1][:2])
        master.stop()

    master.on("listening", on_listening)
    master.on("reload_failed", failed)
    events = Events(master)
    master.fork()
    master.fork()
    assert run(master) == 0
    assert len(failures) == 1 and "RuntimeError: config is broken" in failures[0]
    assert answers == [b"v1"]
    assert events.names().count("fork") == 2
    assert sorted(w.pid for w, *_ in events.of("exit")) == first


def test_a_reload_asked_while_the_new_template_imports_loads_the_code_once_more(tmp_path):
    """reload() twice in a row: the template started for the first is retired once it has
    imported, and a third one imports the code again (it may have changed in between);
    one reload round runs, from that one, and the new code answers."""
    master = master_for(tmp_path)
    master.use("reload")
    rounds: list[str] = []
    answers: list[bytes] = []
    ports: list[int] = []

    def on_listening(worker, address):
        ports.append(address.port)
        if master.size == 2 and not rounds:
            rounds.append("asked")
            script(tmp_path, APP.replace('"v1"', '"v2"'), "fsapp.py")
            master.reload()
            master.reload()

    def exited(worker, code, signal):
        if "reloaded" in rounds and not any(w.id <= 2 for w in master.workers.values()):
            answers.append(http_get(ports[0]).split(b"\r\n\r\n")[1][:2])
            master.stop()

    def reloaded():
        rounds.append("reloaded")
        master.on("exit", exited)

    master.on("listening", on_listening)
    master.on("reloading", lambda: rounds.append("reloading"))
    master.on("reloaded", reloaded)
    master.fork()
    master.fork()
    assert run(master) == 0
    assert rounds == ["asked", "reloading", "reloaded"]
    assert answers == [b"v2"]
    assert len(imports(str(tmp_path / "imports.log"))) == 3


def test_a_template_that_dies_while_importing_fails_the_first_fork(tmp_path):
    """A module that kills its interpreter at import (os._exit): the first fork() raises
    a pycluster error saying the template died and how; pycluster run prints it on one
    line and exits 1."""
    app(tmp_path, "import os\nos._exit(9)\n")
    code, err = pycluster_run(tmp_path)
    assert code == 1, err
    assert err[-1].startswith("pycluster: error: the fork server's template (pid "), err
    assert err[-1].endswith("died (exit code 9) before it was ready"), err


def pycluster_run(tmp_path, *extra: str) -> tuple[int, list[str]]:
    argv = ["-m", "pycluster", "run", "fsapp:main", "-w", "2", "-b", "127.0.0.1:0",
            "--kill-timeout", "5", "--start-method", "forkserver", *extra]
    env = {"IMPORT_LOG": str(tmp_path / "imports.log")}
    with Proc(argv, cwd=tmp_path, env=env, start_new_session=True) as proc:
        code = proc.wait()
        return code, proc.finish().splitlines()


def test_an_app_that_does_not_import_in_the_template_is_a_boot_failure(tmp_path):
    """``pycluster run --start-method forkserver`` with an app raising at import: exit 1,
    the traceback at most once per worker, and the last line says a worker failed to
    boot, as with spawn."""
    app(tmp_path, "raise RuntimeError('no database')\n")
    code, err = pycluster_run(tmp_path)
    assert code == 1, err
    assert 1 <= sum("RuntimeError: no database" in line for line in err) <= 2, err
    assert err[-1].startswith("pycluster: stopped: respawn gave up: worker "), err
    assert "failed to boot (exit code 3)" in err[-1]


def test_a_template_that_cannot_import_the_app_forks_no_spare(tmp_path):
    """A template whose import failed keeps no spare: when its worker has failed to boot
    (exit code 3), the template is the master's only child."""
    app(tmp_path, "raise RuntimeError('no database')\n")
    master = master_for(tmp_path)
    found: list[list[int]] = []

    def exited(worker, code, signal):
        templates = set(master._forkserver.pids())  # noqa: SLF001
        found.append([p for p in children(os.getpid()) if p not in templates and alive(p)])
        master.stop()

    master.on("exit", exited)
    worker = master.fork()
    assert run(master) == 0
    assert worker.process.returncode == pycluster.BOOT_FAILURE
    assert found == [[]]


def test_a_thread_started_at_import_is_an_error_that_names_it(tmp_path):
    """A module that starts a thread at import cannot be forked safely: every worker fails
    to boot with a message naming the thread, and the cluster stops with exit 1."""
    app(tmp_path, textwrap.dedent(APP) + textwrap.dedent("""
        import threading, time
        threading.Thread(target=time.sleep, args=(60,), name="metrics-poller",
                         daemon=True).start()
    """))
    code, err = pycluster_run(tmp_path)
    assert code == 1, err
    named = [line for line in err if "'metrics-poller'" in line]
    assert named and "start_method='forkserver'" in named[0], err
    assert "failed to boot (exit code 3)" in err[-1]


def test_a_socket_opened_at_import_is_warned_about(tmp_path):
    """A module that opens a connection at import gets a warning naming the module (every
    forked worker would share the socket); the workers still start and serve."""
    app(tmp_path, textwrap.dedent(APP) + textwrap.dedent("""
        import socket
        CONNECTION = socket.socket()
    """))
    script(tmp_path, """
        import pycluster
        master = pycluster.Master(target="fsapp:main", start_method="forkserver",
                                  bind="127.0.0.1:0", args=[])
        master.on("listening", lambda worker, address: master.stop())
        master.fork()
        raise SystemExit(master.run())
    """, "master.py")
    env = {"IMPORT_LOG": str(tmp_path / "imports.log")}
    with Proc(["master.py"], cwd=tmp_path, env=env, start_new_session=True) as proc:
        assert proc.wait() == 0
        err = proc.finish()
    assert "pycluster: warning: importing 'fsapp:main' left socket(s) open" in err, err


def test_forked_workers_and_the_template_die_with_a_sigkilled_master(tmp_path):
    """SIGKILL a master running forked workers: the workers, the template and its spare
    worker (forked ahead, adopted by the master) exit too."""
    app(tmp_path)
    master = script(tmp_path, """
        import os, pycluster
        from pycluster._procfs import children
        master = pycluster.Master(target="fsapp:main", start_method="forkserver",
                                  bind="127.0.0.1:0", args=[])
        seen = []
        def listening(worker, address):
            seen.append(worker.pid)
            if len(seen) == 2:
                report()
        def report():  # once the template's spare is adopted: 2 workers, template, spare
            if len(children(os.getpid())) < 4:
                master.call_later(0.01, report)
                return
            print("pids", *seen, *children(os.getpid()), flush=True)
        master.on("listening", listening)
        master.fork()
        master.fork()
        master.run()
    """, "master.py")
    env = {"IMPORT_LOG": str(tmp_path / "imports.log"), "PYTHONPATH": str(tmp_path)}
    with Proc([master], cwd=tmp_path, env=env, start_new_session=True) as proc:
        pids = [int(p) for p in proc.expect(lambda line: line.startswith("pids"),
                                            "the pids line").split()[1:]]
        workers, others = pids[:2], set(pids[2:]) - set(pids[:2])
        assert set(workers) <= set(pids[2:]) and len(others) == 2  # the template, the spare
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        wait_until(lambda: not any(alive(p) for p in pids),
                   "the workers and the template to exit", DEADLINE)


@pytest.mark.parametrize(("settings", "match"), [
    ({"start_method": "fork"}, "start_method='fork' is not one of 'spawn', 'forkserver'"),
    ({"start_method": "forkserver"}, "start_method='forkserver' needs target="),
])
def test_bad_start_methods_are_settings_errors(settings, match):
    """An unknown start method, or forkserver without a target, is a SettingsError."""
    with pytest.raises(pycluster.SettingsError, match=match):
        pycluster.Master(**settings)


def test_the_cli_refuses_a_script_with_forkserver(tmp_path):
    """``pycluster run app.py --start-method forkserver`` is a usage error (exit 2) that
    says a script cannot be preloaded."""
    script(tmp_path, "print('never')\n", "app.py")
    with Proc(["-m", "pycluster", "run", "app.py", "--start-method", "forkserver"],
              cwd=tmp_path) as proc:
        assert proc.wait() == 2
        err = proc.finish()
    assert "--start-method forkserver needs APP as 'module:function'" in err
    assert "never" not in "".join(proc.seen)


def _ppid(pid: int | None) -> int | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rpartition(")")[2].split()[1])
    except (OSError, ValueError):
        return None
