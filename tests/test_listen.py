"""Shared ports: ``pycluster.worker.listen()`` with real workers, real sockets and real clients.

Each test runs a real master in this process. Clients run on a thread (started from a
master handler, so the master's loop keeps running) and stop the master when they are done.
Workers answer every connection with their id and close it.
"""

from __future__ import annotations

import asyncio
import collections
import errno
import json
import os
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from helpers import DEADLINE, Events, Proc, run, script

import pycluster

#: Prepended to every worker script: ``serve(sock)`` answers each connection with the id.
SERVER = """
    import json, os, select, socket, sys, threading, pycluster
    w = pycluster.worker
    stop = threading.Event()
    w.on("disconnect", stop.set)

    def answer(sock, tag=""):
        while True:
            try:
                conn, _ = sock.accept()
            except BlockingIOError:  # the shared description was made non-blocking
                select.select([sock], [], [])
                continue
            try:
                conn.sendall(f"{tag}{w.id}".encode())
            except OSError:
                pass
            conn.close()

    def serve(sock, tag=""):
        threading.Thread(target=answer, args=(sock, tag), daemon=True).start()

    def facts(sock):
        return {"port": sock.getsockname()[1], "ino": os.fstat(sock.fileno()).st_ino,
                "reuseport": sock.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT),
                "shared": isinstance(sock, pycluster.SharedSocket)}
"""


def worker_script(tmp_path, body: str, name: str = "worker.py") -> str:
    return script(tmp_path, textwrap.dedent(SERVER) + textwrap.dedent(body), name)


def ask(address: Any, timeout: float = 10) -> str:
    """Connect to *address* (a port on 127.0.0.1, or a unix socket path); return the answer."""
    if isinstance(address, int):
        sock = socket.create_connection(("127.0.0.1", address), timeout=timeout)
    else:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        try:
            sock.connect(address)
        except BaseException:
            sock.close()
            raise
    with sock:
        chunks = []
        while chunk := sock.recv(64):
            chunks.append(chunk)
    return b"".join(chunks).decode()


def ask_many(address: Any, count: int, clients: int = 8) -> collections.Counter[str]:
    """*count* connections from *clients* threads at once; a Counter of the answers.

    Concurrent, so that a worker busy with one connection leaves the next to another:
    on a shared non-blocking socket, sequential connections may all go to the worker
    that woke up first.
    """
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(clients) as pool:
        return collections.Counter(pool.map(lambda _: ask(address), range(count)))


def ask_until_all_serve(address: Any, ids: set[str], count: int) -> collections.Counter[str]:
    """:func:`ask_many` batches of *count* until every worker in *ids* answered; all answers.

    On a shared socket the worker that accepts first takes the connection: on a busy machine
    one worker may take a whole batch while the other waits for a CPU. Fails after DEADLINE.
    """
    answers: collections.Counter[str] = collections.Counter()
    deadline = time.monotonic() + DEADLINE
    while not ids <= answers.keys():
        assert time.monotonic() < deadline, f"not every worker of {ids} answered: {answers}"
        answers.update(ask_many(address, count))
    return answers


class Client:
    """Runs *work* on a thread while the master's loop keeps running, then stops the master.

    Create it inside a master handler (it needs the running loop).
    """

    def __init__(self, master: pycluster.Master, work: Callable[[], Any]) -> None:
        self.result: Any = None
        self.error: BaseException | None = None
        loop = asyncio.get_running_loop()

        def body() -> None:
            try:
                self.result = work()
            except BaseException as exc:  # reported by get()
                self.error = exc
            finally:
                try:
                    loop.call_soon_threadsafe(master.stop)
                except RuntimeError:  # the loop already ended (the test failed)
                    pass

        self.thread = threading.Thread(target=body, daemon=True)
        self.thread.start()

    def get(self) -> Any:
        self.thread.join(DEADLINE)
        assert not self.thread.is_alive(), "client thread did not finish"
        if self.error is not None:
            raise self.error
        return self.result


def reserve_port() -> socket.socket:
    """A socket bound to 127.0.0.1:0 with SO_REUSEADDR but not listening.

    It keeps the port out of anyone else's hands, yet the master (which also sets
    SO_REUSEADDR) can bind and listen on it: a fixed port for the test, free of races.
    """
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    return sock


def make(tmp_path, body: str, **settings: Any) -> pycluster.Master:
    settings.setdefault("kill_timeout", 10)
    return pycluster.Master(exec=worker_script(tmp_path, body), **settings)


def test_port_zero_is_shared_and_both_workers_serve(tmp_path):
    """Two workers asking for port 0 get the same real port, on one shared socket; the
    listening events carry that port; batches of 200 connections are all answered (none
    reads as ""), by both workers."""
    master = make(tmp_path, """
        sock = w.listen(0, "127.0.0.1")
        serve(sock)
        w.send(facts(sock))
        stop.wait(60)
    """)
    events = Events(master)
    workers = [master.fork() for _ in range(2)]
    reports: dict[int, dict[str, Any]] = {}
    client: list[Client] = []

    def on_message(worker, message):
        reports[worker.id] = message
        if len(reports) == 2:
            client.append(Client(master, lambda: ask_until_all_serve(message["port"], {"1", "2"},
                                                                     200)))

    master.on("message", on_message)
    assert run(master) == 0
    answers = client[0].get()
    ports = {r["port"] for r in reports.values()}
    assert len(ports) == 1
    assert 0 not in ports
    port = ports.pop()
    listening = events.of("listening")
    assert sorted(w.id for w, _ in listening) == [1, 2]
    assert {(a.host, a.port, a.family) for _, a in listening} == {
        ("127.0.0.1", port, socket.AF_INET)}
    assert len({r["ino"] for r in reports.values()}) == 1, "shared mode: one socket"
    assert all(r["shared"] and not r["reuseport"] for r in reports.values())
    assert set(answers) == {"1", "2"}, f"both workers should serve: {answers}"
    assert [(w.exit_code, w.exited_after_disconnect) for w in workers] == [(0, True)] * 2
    assert not events.of("error")


ROLES = """
    role = os.environ["ROLE"]
    sock = w.listen(0, "127.0.0.1")
    if role == "serve":
        serve(sock)
    w.send({"port": sock.getsockname()[1], "role": role})
    stop.wait(60)
"""


def test_sigkill_of_a_worker_loses_no_connection_in_a_running_client_loop(tmp_path):
    """A client loop runs across the SIGKILL of one worker (which listens but never
    accepts, so nothing can be in flight in it) while another worker serves: every single
    connection, before, during and after the kill, is answered by the survivor."""
    master = make(tmp_path, ROLES)
    victim = master.fork(env={"ROLE": "idle"})
    survivor = master.fork(env={"ROLE": "serve"})
    victim_gone = threading.Event()
    victim.on("exit", lambda code, sig: victim_gone.set())
    ready: dict[str, int] = {}
    client: list[Client] = []

    def loop_across_kill(port: int, loop: asyncio.AbstractEventLoop) -> dict[str, Any]:
        answers: collections.Counter[str] = collections.Counter()
        failures: list[str] = []
        after = 0

        def one() -> None:
            try:
                answers[ask(port)] += 1
            except OSError as exc:
                failures.append(repr(exc))

        for _ in range(30):
            one()
        loop.call_soon_threadsafe(victim.kill, "SIGKILL")
        during = 0
        while not victim_gone.is_set():
            assert during < 100_000, "the victim never exited"
            one()
            during += 1
        while after < 30:
            one()
            after += 1
        return {"answers": answers, "failures": failures}

    def on_message(worker, message):
        ready[message["role"]] = message["port"]
        if len(ready) == 2:
            loop = asyncio.get_running_loop()
            client.append(Client(master, lambda: loop_across_kill(message["port"], loop)))

    master.on("message", on_message)
    run(master)
    result = client[0].get()
    assert ready["idle"] == ready["serve"]
    assert result["failures"] == []
    assert set(result["answers"]) == {str(survivor.id)}
    assert sum(result["answers"].values()) >= 60
    assert (victim.exit_code, victim.signal_code) == (None, "SIGKILL")
    assert (survivor.exit_code, survivor.exited_after_disconnect) == (0, True)


@pytest.mark.parametrize("scheduling", ["shared", "reuseport"])
def test_connections_queued_while_nobody_accepts_survive_a_sigkill(tmp_path, scheduling):
    """The accept queue lives in the master's socket (with "reuseport", the slot's): 50
    connections wait in it while the only worker listens without accepting; that worker is
    SIGKILLed, so no worker holds the socket any more; a replacement forked later in the
    same slot (as respawn does, after a backoff) gets the same port and socket, and answers
    every queued connection."""
    master = make(tmp_path, ROLES, scheduling=scheduling)
    victim = master.fork(env={"ROLE": "idle"})
    ports: dict[int, int] = {}
    pending: list[socket.socket] = []
    client: list[Client] = []
    replacement: list[pycluster.Worker] = []

    def collect() -> collections.Counter[str]:
        answers: collections.Counter[str] = collections.Counter()
        for sock in pending:
            with sock:
                chunks = []
                while chunk := sock.recv(64):
                    chunks.append(chunk)
            answers[b"".join(chunks).decode()] += 1
        answers.update(ask_many(ports[victim.id], 20))
        return answers

    def on_message(worker, message):
        ports[worker.id] = message["port"]
        if worker is victim:
            for _ in range(50):  # the handshakes complete: they sit in the accept queue
                pending.append(socket.create_connection(("127.0.0.1", message["port"]),
                                                        timeout=10))
            victim.kill("SIGKILL")
        else:
            client.append(Client(master, collect))

    def on_exit(worker, code, sig):
        if worker is victim:
            master.call_later(0.05, lambda: replacement.append(
                master.fork(env={"ROLE": "serve"}, slot=victim.slot)))

    master.on("message", on_message)
    master.on("exit", on_exit)
    try:
        run(master)
        answers = client[0].get()
    finally:
        for sock in pending:
            sock.close()
    (new,) = replacement
    assert ports[new.id] == ports[victim.id]
    assert answers == {str(new.id): 70}
    assert (victim.exit_code, victim.signal_code) == (None, "SIGKILL")
    assert (new.exit_code, new.exited_after_disconnect) == (0, True)


def test_second_listen_zero_gets_its_own_port_shared_by_index(tmp_path):
    """Node's index semantics: a worker's second listen(0) gets a different port from its
    first, and that second port is the one the other worker's second listen(0) gets;
    both ports serve, on both workers."""
    master = make(tmp_path, """
        first = w.listen(0, "127.0.0.1")
        second = w.listen(0, "127.0.0.1")
        serve(first, "a")
        serve(second, "b")
        w.send([first.getsockname()[1], second.getsockname()[1]])
        stop.wait(60)
    """)
    events = Events(master)
    for _ in range(2):
        master.fork()
    reports: dict[int, list[int]] = {}
    client: list[Client] = []

    def on_message(worker, message):
        reports[worker.id] = message
        if len(reports) == 2:
            client.append(Client(master, lambda: [ask_many(p, 100) for p in message]))

    master.on("message", on_message)
    assert run(master) == 0
    answers_first, answers_second = client[0].get()
    assert reports[1] == reports[2]
    first, second = reports[1]
    assert first != second
    listening = collections.defaultdict(list)
    for worker, address in events.of("listening"):
        listening[worker.id].append(address.port)
    assert dict(listening) == {1: [first, second], 2: [first, second]}
    assert set(answers_first) == {"a1", "a2"}, answers_first
    assert set(answers_second) == {"b1", "b2"}, answers_second


def test_fixed_and_ephemeral_ports_in_one_worker_both_serve(tmp_path):
    """One worker listens on a fixed port and on port 0: two sockets on two ports, both
    answer, and the listening events carry the fixed port and the real ephemeral one."""
    reserved = reserve_port()
    fixed = reserved.getsockname()[1]
    try:
        master = make(tmp_path, """
            fixed = w.listen(int(os.environ["FIXED"]), "127.0.0.1")
            ephemeral = w.listen(0, "127.0.0.1")
            serve(fixed, "fixed:")
            serve(ephemeral, "ephemeral:")
            w.send([fixed.getsockname()[1], ephemeral.getsockname()[1]])
            stop.wait(60)
        """, env={"FIXED": str(fixed)})
        events = Events(master)
        master.fork()
        client: list[Client] = []
        master.on("message", lambda w, m: client.append(
            Client(master, lambda: [ask_many(p, 20) for p in m])))
        assert run(master) == 0
        fixed_answers, ephemeral_answers = client[0].get()
    finally:
        reserved.close()
    (_, ports), = events.of("message")
    assert ports[0] == fixed
    assert ports[1] not in (0, fixed)
    assert [a.port for _, a in events.of("listening")] == ports
    assert fixed_answers == {"fixed:1": 20}
    assert ephemeral_answers == {"ephemeral:1": 20}


def test_unix_socket_path_is_relative_to_worker_cwd_and_removed_at_stop(tmp_path):
    """listen("app.sock") resolves against the worker's cwd; both workers share the one
    socket and serve on it; the listening event carries the absolute path (AF_UNIX, no
    port); the master removes the socket file when it stops."""
    workdir = tmp_path / "wd"
    workdir.mkdir()
    path = str(workdir / "app.sock")
    master = make(tmp_path, """
        sock = w.listen("app.sock")
        serve(sock)
        w.send(sock.getsockname())
        stop.wait(60)
    """, cwd=str(workdir))
    events = Events(master)
    for _ in range(2):
        master.fork()
    seen: list[str] = []
    was_socket: list[bool] = []
    client: list[Client] = []

    def on_message(worker, message):
        seen.append(message)
        if len(seen) == 2:
            was_socket.append(stat.S_ISSOCK(os.stat(path).st_mode))
            client.append(Client(master, lambda: ask_until_all_serve(path, {"1", "2"}, 100)))

    master.on("message", on_message)
    assert run(master) == 0
    answers = client[0].get()
    assert seen == [path, path]
    assert was_socket == [True]
    assert {(a.host, a.port, a.family) for _, a in events.of("listening")} == {
        (path, None, socket.AF_UNIX)}
    assert set(answers) == {"1", "2"}, answers
    assert not os.path.exists(path), "the master should remove its unix socket file"


def test_unix_socket_path_too_long_for_sun_path(tmp_path, monkeypatch):
    """A unix socket path longer than sun_path's 107 bytes is bound by its shorter form
    relative to the master's cwd (as Node does) and serves; when neither form fits,
    listen() raises OSError ENAMETOOLONG naming the path, and the master carries on."""
    monkeypatch.chdir(tmp_path)  # the master's cwd: the relative name is "d…d/app.sock"
    near, far = tmp_path / ("d" * 80), tmp_path / ("f" * 120)
    near.mkdir()
    far.mkdir()
    relative = os.path.join(near.name, "app.sock")
    assert len(str(near / "app.sock")) > 107 >= len(relative)
    master = make(tmp_path, """
        os.chdir(os.environ["DIR"])
        try:
            sock = w.listen("app.sock")
        except OSError as exc:
            w.send([exc.errno, str(exc)])
        else:
            serve(sock)
            w.send([0, "listening"])
            stop.wait(60)
    """)
    events = Events(master)
    fits = master.fork(env={"DIR": str(near)})
    too_long = master.fork(env={"DIR": str(far)})
    got: dict[int, list[Any]] = {}
    client: list[Client] = []

    def on_message(worker, message):
        got[worker.id] = message
        if len(got) == 2:
            client.append(Client(master, lambda: ask_many(relative, 20)))

    master.on("message", on_message)
    assert run(master) == 0
    answers = client[0].get()
    assert got[fits.id] == [0, "listening"]
    err, text = got[too_long.id]
    assert err == errno.ENAMETOOLONG, text
    assert str(far / "app.sock") in text
    assert [(w, a.host) for w, a in events.of("listening")] == [(fits, str(near / "app.sock"))]
    assert answers == {str(fits.id): 20}
    assert not (near / "app.sock").exists(), "the master removes the file it made"
    assert not events.of("error")


def test_unix_socket_path_that_exists_is_eaddrinuse_and_not_removed(tmp_path):
    """A unix socket path that is already taken (a stale file) gives EADDRINUSE naming the
    path, and the master does not delete a file it did not create."""
    path = tmp_path / "taken.sock"
    path.write_text("not mine")
    master = make(tmp_path, """
        try:
            w.listen(os.environ["SOCK"])
        except OSError as exc:
            w.send([exc.errno, str(exc)])
    """, env={"SOCK": str(path)})
    events = Events(master)
    master.fork()
    assert run(master) == 0
    (_, (err, text)), = events.of("message")
    assert err == errno.EADDRINUSE
    assert str(path) in text
    assert path.read_text() == "not mine"
    assert not events.of("listening")


def test_eaddrinuse_names_the_address_and_the_cluster_keeps_working(tmp_path):
    """A port already bound (by a socket of this test) makes listen() raise OSError
    EADDRINUSE naming the address; the master survives, another worker keeps serving, and
    once the port is free the same worker's retry binds it (the failure was not cached)."""
    taken = socket.create_server(("127.0.0.1", 0))
    port = taken.getsockname()[1]
    master = make(tmp_path, """
        role = os.environ["ROLE"]
        if role == "clash":
            port = int(os.environ["TAKEN"])
            try:
                w.listen(port, "127.0.0.1")
            except OSError as exc:
                retry = threading.Event()
                w.on("message", lambda m: retry.set())
                w.send({"errno": exc.errno, "text": str(exc), "type": type(exc).__name__})
                retry.wait(60)
                sock = w.listen(port, "127.0.0.1")
                serve(sock)
                w.send({"retried": sock.getsockname()[1]})
            else:
                w.send({"errno": None})
        else:
            sock = w.listen(0, "127.0.0.1")
            serve(sock)
            w.send({"port": sock.getsockname()[1]})
        stop.wait(60)
    """, env={"TAKEN": str(port)})
    events = Events(master)
    clash = master.fork(env={"ROLE": "clash"})
    other = master.fork(env={"ROLE": "serve"})
    got: dict[int, list[dict[str, Any]]] = collections.defaultdict(list)
    checks: list[threading.Thread] = []
    client: list[Client] = []
    before_retry: list[collections.Counter[str]] = []

    def check_then_retry(other_port: int, loop: asyncio.AbstractEventLoop) -> None:
        before_retry.append(ask_many(other_port, 20))
        taken.close()  # now the clashing worker may bind the port
        loop.call_soon_threadsafe(clash.send, "retry")

    def on_message(worker, message):
        got[worker.id].append(message)
        if "retried" in message:
            other_port = got[other.id][0]["port"]
            client.append(Client(master, lambda: {
                "fixed": ask_many(port, 20), "other": ask_many(other_port, 20)}))
        elif len(got) == 2 and not checks:
            checks.append(threading.Thread(
                target=check_then_retry,
                args=(got[other.id][0]["port"], asyncio.get_running_loop()), daemon=True))
            checks[0].start()

    master.on("message", on_message)
    try:
        assert run(master) == 0
        checks[0].join(DEADLINE)
        answers = client[0].get()
    finally:
        taken.close()
    first = got[clash.id][0]
    assert first["errno"] == errno.EADDRINUSE
    assert first["type"] == "OSError"
    assert f"127.0.0.1:{port}" in first["text"]
    assert before_retry == [{str(other.id): 20}]
    assert got[clash.id][1] == {"retried": port}
    assert answers == {"fixed": {str(clash.id): 20}, "other": {str(other.id): 20}}
    assert [w.id for w, _ in events.of("listening")] == [other.id, clash.id]
    assert not events.of("error")
    assert (clash.exit_code, other.exit_code) == (0, 0)


def test_same_worker_twice_on_one_fixed_port_is_eaddrinuse(tmp_path):
    """A worker that listens twice on the same fixed port gets EADDRINUSE (naming the
    address) the second time; its first socket keeps serving, and another worker asking for
    that port shares the same socket."""
    reserved = reserve_port()
    fixed = reserved.getsockname()[1]
    try:
        master = make(tmp_path, """
            port = int(os.environ["FIXED"])
            sock = w.listen(port, "127.0.0.1")
            serve(sock)
            if w.id == 1:
                try:
                    w.listen(port, "127.0.0.1")
                except OSError as exc:
                    w.send({"errno": exc.errno, "text": str(exc), "ino": facts(sock)["ino"]})
                else:
                    w.send({"errno": None, "ino": facts(sock)["ino"]})
            else:
                w.send({"ino": facts(sock)["ino"]})
            stop.wait(60)
        """, env={"FIXED": str(fixed)})
        events = Events(master)
        master.fork()
        master.fork()
        got: dict[int, dict[str, Any]] = {}
        client: list[Client] = []

        def on_message(worker, message):
            got[worker.id] = message
            if len(got) == 2:
                client.append(Client(master, lambda: ask_many(fixed, 100)))

        master.on("message", on_message)
        assert run(master) == 0
        answers = client[0].get()
    finally:
        reserved.close()
    assert got[1]["errno"] == errno.EADDRINUSE
    assert f"127.0.0.1:{fixed}" in got[1]["text"]
    assert got[1]["ino"] == got[2]["ino"]
    assert set(answers) <= {"1", "2"} and sum(answers.values()) == 100, answers
    assert sorted(w.id for w, _ in events.of("listening")) == [1, 2]


EACCES_MASTER = """
    import json, sys
    if sys.argv[1] == "drop-cap":
        import ctypes

        class Header(ctypes.Structure):
            _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]

        class Data(ctypes.Structure):
            _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                        ("inheritable", ctypes.c_uint32)]

        libc = ctypes.CDLL(None, use_errno=True)
        header, data = Header(0x20080522, 0), (Data * 2)()  # _LINUX_CAPABILITY_VERSION_3
        cap = 1 << 10  # CAP_NET_BIND_SERVICE
        if libc.capget(ctypes.byref(header), data) != 0 or not data[0].effective & cap:
            print(json.dumps({"skip": "cannot read or lacks CAP_NET_BIND_SERVICE"}), flush=True)
            sys.exit(0)
        data[0].effective &= ~cap
        data[0].permitted &= ~cap
        if libc.capset(ctypes.byref(header), data) != 0:
            print(json.dumps({"skip": f"capset failed: errno {ctypes.get_errno()}"}), flush=True)
            sys.exit(0)

    import pycluster

    master = pycluster.Master(exec="worker.py", args=[sys.argv[2]], kill_timeout=5)
    master.on("message", lambda w, m: print(json.dumps(m), flush=True))
    master.on("error", lambda e: print(json.dumps({"error": repr(e)}), flush=True))
    master.on("exit", lambda w, c, s: print(json.dumps({"exit": [c, s]}), flush=True))
    master.fork()
    sys.exit(master.run())
"""

EACCES_WORKER = """
    import json, os, sys, pycluster
    w = pycluster.worker
    port = int(sys.argv[1])
    try:
        w.listen(port, "127.0.0.1")
    except OSError as exc:
        w.send({"errno": exc.errno, "text": str(exc), "uid": os.getuid()})
    else:
        w.send({"errno": None, "uid": os.getuid()})
    sock = w.listen(0, "127.0.0.1")  # the worker and its master still work after the error
    w.send({"then": sock.getsockname()[1]})
"""


@pytest.mark.parametrize("how", ["nobody", "drop-cap"])
def test_privileged_port_is_eacces_naming_the_address(how):
    """A master without the right to bind ports below 1024 (run as uid 65534, or as root
    without CAP_NET_BIND_SERVICE) answers a worker's listen() on such a port with OSError
    EACCES naming the address; the worker and the master carry on."""
    if os.geteuid() != 0:
        pytest.skip("needs root: the test drops privileges for the master")
    with open("/proc/sys/net/ipv4/ip_unprivileged_port_start") as f:
        start = int(f.read())
    port = 80 if start > 80 else start - 1
    if port < 1:
        pytest.skip(f"ip_unprivileged_port_start={start}: every port is unprivileged here")
    kwargs: dict[str, Any] = {}
    if how == "nobody":
        kwargs["user"] = 65534
        try:
            probe = subprocess.run([sys.executable, "-c", "import pycluster"], user=65534,
                                   capture_output=True, timeout=DEADLINE, cwd="/")
        except PermissionError as exc:
            pytest.skip(f"uid 65534 cannot run {sys.executable} (a parent directory is "
                        f"private to root?): {exc}")
        if probe.returncode != 0:
            pytest.skip(f"uid 65534 cannot import pycluster: {probe.stderr.decode()[-300:]}")
    # The script and its directory must be readable by the master's user (tmp_path is not).
    folder = tempfile.mkdtemp(prefix="pycluster-eacces-")
    try:
        os.chmod(folder, 0o755)
        for name, body in (("master.py", EACCES_MASTER), ("worker.py", EACCES_WORKER)):
            os.chmod(script(Path(folder), body, name), 0o644)
        with Proc(["master.py", how, str(port)], cwd=folder, **kwargs) as proc:
            first = proc.json(lambda m: True, "the worker's first report")
            if "skip" in first:
                pytest.skip(first["skip"])
            then = proc.json(lambda m: "then" in m, "the listen(0) after the error")
            exit_line = proc.json(lambda m: "exit" in m, "the worker's exit")
            assert proc.wait() == 0
            stderr = proc.finish()
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    assert first["errno"] == errno.EACCES, first
    assert f"127.0.0.1:{port}" in first["text"]
    assert "denied" in first["text"].lower()
    if how == "nobody":
        assert first["uid"] == 65534
    assert then["then"] > 0
    assert exit_line == {"exit": [0, None]}
    assert "Traceback" not in stderr, stderr


BAD_ARGS = """
    import json, os, threading, pycluster
    w = pycluster.worker

    def attempt(*args, **kwargs):
        try:
            w.listen(*args, **kwargs)
        except Exception as exc:
            return [type(exc).__name__, str(exc)]
        return ["no error", ""]

    results = {
        "port=-1": attempt(-1, "127.0.0.1"),
        "port=70000": attempt(70000, "127.0.0.1"),
        "port='8000'": attempt("8000", "127.0.0.1"),
        "port=True": attempt(True, "127.0.0.1"),
        "port=8.0": attempt(8.0, "127.0.0.1"),
        "host=''": attempt(0, ""),
        "host=None": attempt(0, None),
        "backlog=0": attempt(0, "127.0.0.1", backlog=0),
        "backlog=-5": attempt(0, "127.0.0.1", backlog=-5),
        "backlog=True": attempt(0, "127.0.0.1", backlog=True),
        "backlog='64'": attempt(0, "127.0.0.1", backlog="64"),
    }
    on_thread = []
    went = threading.Event()
    gone = threading.Event()

    def on_message(message):
        on_thread.append(attempt(0, "127.0.0.1"))
        went.set()

    w.on("message", on_message)
    w.on("disconnect", gone.set)
    results["no port"] = attempt()  # and the master has no bind setting
    w.send(results)
    went.wait(60)
    w.send({"on the pycluster-ipc thread": on_thread[0]})
    gone.wait(60)
    print(json.dumps({"after disconnect": attempt(0, "127.0.0.1")}), flush=True)
"""


def test_bad_listen_arguments_raise_clear_errors_in_the_worker(tmp_path):
    """listen() with a bad port (-1, 70000, a digit string, a bool, a float, none), host
    ("" or None) or backlog (0, negative, bool, str) raises SettingsError naming the value,
    without asking the master; listen() inside an event handler and after disconnect raise
    StateError."""
    master = pycluster.Master(exec=script(tmp_path, BAD_ARGS), kill_timeout=10, silent=True,
                              cwd=str(tmp_path))
    events = Events(master)
    worker = master.fork()
    output: list[str] = []
    master.on("output", lambda w, stream, line: output.append(line))

    def on_message(w, message):
        if "port=-1" in message:
            w.send("go")
        else:
            w.disconnect()

    master.on("message", on_message)
    assert run(master) == 0, output
    (_, results), (_, on_thread) = events.of("message")
    kind, text = results.pop("no port")
    assert kind == "SettingsError", (kind, text)
    assert "needs a port" in text
    for case, (kind, text) in results.items():
        value = case.split("=", 1)[1]
        assert kind == "SettingsError", (case, kind, text)
        assert value in text, (case, text)
    assert on_thread["on the pycluster-ipc thread"][0] == "StateError"
    assert "pycluster-ipc" in on_thread["on the pycluster-ipc thread"][1]
    lines = [json.loads(line) for line in output if line.startswith("{")]
    assert lines, output
    kind, text = lines[0]["after disconnect"]
    assert kind == "StateError", (kind, text)
    assert "disconnecting" in text
    assert not events.of("listening")
    assert not events.of("error")
    assert os.listdir(tmp_path) == ["worker.py"], "no unix socket may have been made"
    assert (worker.exit_code, worker.exited_after_disconnect) == (0, True)


def test_reuseport_gives_each_slot_its_own_socket_kept_for_the_replacement(tmp_path):
    """scheduling="reuseport": two workers on port 0 share the real port, each on its own
    SO_REUSEPORT socket, and both serve. The slot's socket outlives its worker: connections
    queued on it after the worker exited are answered by the replacement forked with
    fork(slot=old.slot), which gets that very socket and serves on the same port."""
    master = make(tmp_path, """
        sock = w.listen(0, "127.0.0.1")
        serve(sock)
        w.send(facts(sock))
        stop.wait(60)
    """, scheduling="reuseport")
    events = Events(master)
    first, _second = master.fork(), master.fork()
    reports: dict[int, dict[str, Any]] = {}
    queued: list[socket.socket] = []
    client: list[Client] = []
    replacement: list[pycluster.Worker] = []

    def collect(port: int) -> dict[str, collections.Counter[str]]:
        answers: collections.Counter[str] = collections.Counter()
        for sock in queued:
            with sock:
                chunks = []
                while chunk := sock.recv(64):
                    chunks.append(chunk)
            answers[b"".join(chunks).decode()] += 1
        return {"queued": answers, "fresh": ask_many(port, 200)}

    def on_message(worker, message):
        reports[worker.id] = message
        if len(reports) == 2:
            answers = ask_many(message["port"], 200)  # on the loop: nothing else must run
            reports["answers"] = answers  # type: ignore[assignment]
            first.disconnect()
        elif worker.id == 3:
            client.append(Client(master, lambda: collect(message["port"])))

    def on_exit(worker, code, sig):
        if worker is first:
            replacement.append(master.fork(slot=first.slot))
            for _ in range(40):  # half of them hash to the slot nobody serves right now
                queued.append(socket.create_connection(("127.0.0.1", reports[1]["port"]),
                                                       timeout=10))

    master.on("message", on_message)
    master.on("exit", on_exit)
    try:
        assert run(master) == 0
        result = client[0].get()
    finally:
        for sock in queued:
            sock.close()
    port = reports[1]["port"]
    assert reports[2]["port"] == port == reports[3]["port"]
    assert all(reports[i]["reuseport"] and reports[i]["shared"] for i in (1, 2, 3))
    assert reports[1]["ino"] != reports[2]["ino"], "each slot has its own socket"
    assert reports[3]["ino"] == reports[1]["ino"], "the replacement gets its slot's socket"
    assert replacement[0].slot == first.slot
    assert replacement[0].id == 3
    assert set(reports["answers"]) == {"1", "2"}  # type: ignore[arg-type]
    assert sum(result["queued"].values()) == 40
    assert set(result["queued"]) == {"2", "3"}, result["queued"]
    assert set(result["fresh"]) == {"2", "3"}, result["fresh"]
    assert [a.port for _, a in events.of("listening")] == [port] * 3


ASYNC_AND_SOCKETSERVER = """
    import asyncio, socketserver, struct

    def max_backlog(sock):
        # TCP_INFO of a listening socket: tcpi_sacked is its accept-queue limit
        info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 104)
        return struct.unpack_from("I", info, 28)[0]

    async def main():
        w.attach_loop()
        first = w.listen(0, "127.0.0.1", backlog=64)
        second = w.listen(0, "127.0.0.1")
        before = [max_backlog(first), max_backlog(second)]
        first.listen(1)  # what a server library might do: must not shrink the queue

        async def handle(reader, writer):
            writer.write(f"asyncio:{w.id}".encode())
            await writer.drain()
            writer.close()
            await writer.wait_closed()

        server = await asyncio.start_server(handle, sock=first)  # calls listen(100)

        class Handler(socketserver.BaseRequestHandler):
            def handle(self):
                self.request.sendall(f"socketserver:{w.id}".encode())

        tcp = socketserver.TCPServer(None, Handler, bind_and_activate=False)
        tcp.socket.close()
        tcp.socket = second
        tcp.server_address = second.getsockname()
        thread = threading.Thread(target=tcp.serve_forever, args=(0.05,), daemon=True)
        thread.start()
        done = asyncio.Event()
        w.on("disconnect", done.set)  # runs on this loop (attach_loop)
        w.send({"types": [type(s).__name__ for s in (first, second)],
                "ports": [first.getsockname()[1], second.getsockname()[1]],
                "before": before, "after": [max_backlog(first), max_backlog(second)]})
        await done.wait()
        server.close()
        await server.wait_closed()
        await asyncio.to_thread(tcp.shutdown)
        tcp.server_close()

    asyncio.run(main())
"""


def test_shared_socket_serves_asyncio_and_socketserver_and_keeps_its_backlog(tmp_path):
    """The socket listen() returns is a real socket: asyncio.start_server(sock=) serves on
    one and socketserver on another. It is a SharedSocket whose listen() is a no-op, so
    neither asyncio's listen(100) nor an explicit listen(1) changes the accept-queue limit
    the master set (backlog=64 as asked, or the default)."""
    with open("/proc/sys/net/core/somaxconn") as f:
        somaxconn = int(f.read())
    master = make(tmp_path, ASYNC_AND_SOCKETSERVER)
    worker = master.fork()
    reports: list[dict[str, Any]] = []
    client: list[Client] = []

    def on_message(w, message):
        reports.append(message)
        client.append(Client(master, lambda: [ask_many(p, 30) for p in message["ports"]]))

    master.on("message", on_message)
    assert run(master) == 0
    via_asyncio, via_socketserver = client[0].get()
    (report,) = reports
    assert report["types"] == ["SharedSocket", "SharedSocket"]
    default = min(2048, somaxconn)
    assert report["before"] == [64, default]
    assert report["after"] == [64, default], "listen() on a SharedSocket must not shrink it"
    assert via_asyncio == {"asyncio:1": 30}
    assert via_socketserver == {"socketserver:1": 30}
    assert (worker.exit_code, worker.exited_after_disconnect) == (0, True)


def test_sync_servers_sharing_a_socket_never_block_in_accept(tmp_path):
    """Regression: two socketserver workers select() on one shared socket; a connection
    wakes both and the loser's accept() must not block (the socket is non-blocking), so
    both can stop serve_forever() when disconnected and exit 0 long before kill_timeout."""
    body = """
        import socketserver, pycluster

        class Echo(socketserver.StreamRequestHandler):
            def handle(self):
                self.wfile.write(b"%d\\n" % pycluster.worker.id)

        server = socketserver.TCPServer(("127.0.0.1", 0), Echo, bind_and_activate=False)
        server.socket.close()
        server.socket = pycluster.worker.listen(0, "127.0.0.1")
        assert server.socket.gettimeout() == 0.0
        pycluster.worker.on("disconnect", server.shutdown)
        pycluster.worker.send("serving")
        server.serve_forever()
    """
    master = pycluster.Master(exec=script(tmp_path, body), kill_timeout=120)
    workers = [master.fork() for _ in range(2)]
    answers, ports, serving = [], [], []
    master.on("listening", lambda worker, address: ports.append(address.port))

    def on_message(worker, message):
        serving.append(worker.id)
        if len(serving) == 2:  # both are in serve_forever()'s select() (or about to be)
            port = ports[0]
            for _ in range(5):
                with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
                    answers.append(conn.makefile().readline())
            master.disconnect()

    master.on("message", on_message)
    assert run(master, timeout=60) == 0
    assert len(answers) == 5
    assert [(w.exit_code, w.signal_code) for w in workers] == [(0, None), (0, None)]


def test_master_removes_only_the_socket_file_it_made(tmp_path):
    """Regression: a worker that swaps a directory on its unix socket's path for a symlink
    cannot make the master (which may run as root) unlink another file at stop: only the
    very socket file the master created is removed."""
    target = tmp_path / "target"
    target.mkdir()
    (target / "app.sock").write_text("precious")
    (tmp_path / "d1").mkdir()
    body = f"""
        import os, pycluster
        pycluster.worker.listen({str(tmp_path / "d1" / "app.sock")!r})
        os.rename({str(tmp_path / "d1")!r}, {str(tmp_path / "d1.old")!r})
        os.symlink({str(target)!r}, {str(tmp_path / "d1")!r})
    """
    master = make(tmp_path, body)
    master.fork()
    run(master)
    assert (target / "app.sock").read_text() == "precious"
