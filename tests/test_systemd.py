"""systemd without systemd: ``Type=notify`` messages read from a fake ``NOTIFY_SOCKET``,
and socket activation (``LISTEN_FDS``/``LISTEN_PID``, ``--bind fd://N``) from a launcher
that passes listening sockets, with ``pycluster run`` in a real process."""

from __future__ import annotations

import os
import signal
import socket
import time

import pytest
from helpers import DEADLINE, Proc, http_get, script

import pycluster
from pycluster._activation import listen_fds
from pycluster._settings import parse_address

#: Answers every GET with the worker id and whether systemd's variables reached it.
APP = """
    import os, pycluster
    from http.server import ThreadingHTTPServer, BaseHTTPRequestHandler

    LEAKED = sorted(k for k in ("NOTIFY_SOCKET", "LISTEN_FDS", "LISTEN_PID", "WATCHDOG_USEC")
                    if k in os.environ)

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            body = f"worker {pycluster.worker.id} leaked {LEAKED}\\n".encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler, bind_and_activate=False)
    server.socket.close()
    server.socket = pycluster.worker.listen()
    pycluster.worker.on("disconnect", server.shutdown)
    server.serve_forever()
"""


class Notifications:
    """A fake systemd: a datagram socket that collects ``sd_notify`` messages."""

    def __init__(self, address: str | bytes) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(address)
        self.messages: list[dict[str, str]] = []

    def next(self, what: str, predicate=lambda m: True) -> dict[str, str]:
        """Return the next message satisfying *predicate*; fail naming *what*."""
        deadline = time.monotonic() + DEADLINE
        while True:
            remaining = deadline - time.monotonic()
            assert remaining > 0, f"timed out waiting for {what}; got {self.messages!r}"
            self.sock.settimeout(remaining)
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            fields = dict(line.split("=", 1) for line in data.decode().splitlines() if line)
            self.messages.append(fields)
            if predicate(fields):
                return fields

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def notify(tmp_path):
    """A fake NOTIFY_SOCKET at a path in tmp_path."""
    fake = Notifications(str(tmp_path / "notify.sock"))
    try:
        yield fake
    finally:
        fake.close()


def _port_of(proc: Proc) -> int:
    line = proc.expect_err(lambda line: "listening on 127.0.0.1:" in line, "a worker listening")
    return int(line.rsplit(":", 1)[1])


def test_notify_ready_reloading_ready_stopping_in_order(tmp_path, notify):
    """Under ``pycluster run`` with NOTIFY_SOCKET set, the systemd plugin is on by itself:
    READY=1 comes once both initial workers listen; SIGHUP gives RELOADING=1 with a
    MONOTONIC_USEC taken from CLOCK_MONOTONIC during the reload, then READY=1 when the
    reload is over; SIGTERM gives STOPPING=1. Each has a STATUS line, and the workers
    never see NOTIFY_SOCKET."""
    app = script(tmp_path, APP, "app.py")
    argv = ["-m", "pycluster", "run", app, "-w", "2", "-b", "127.0.0.1:0", "--kill-timeout", "10"]
    env = {"NOTIFY_SOCKET": str(tmp_path / "notify.sock")}
    with Proc(argv, cwd=tmp_path, env=env, read_stderr=True) as proc:
        ready = notify.next("READY=1", lambda m: "READY" in m)
        assert ready["READY"] == "1"
        assert ready["STATUS"] == "2 worker(s) serving"
        port = _port_of(proc)
        assert b"leaked []" in http_get(port)
        before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        os.kill(proc.pid, signal.SIGHUP)
        reloading = notify.next("RELOADING=1", lambda m: "RELOADING" in m or "READY" in m)
        after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        assert reloading["RELOADING"] == "1"
        assert before <= int(reloading["MONOTONIC_USEC"]) <= after
        again = notify.next("READY=1 after the reload", lambda m: "READY" in m or "STOPPING" in m)
        assert again["READY"] == "1"
        assert again["STATUS"].startswith("reload finished; 2 worker(s) serving")
        os.kill(proc.pid, signal.SIGTERM)
        stopping = notify.next("STOPPING=1", lambda m: "STOPPING" in m)
        assert stopping == {"STOPPING": "1", "STATUS": "stopping"}
        assert proc.wait() == 0
    kinds = [k for m in notify.messages for k in ("READY", "RELOADING", "STOPPING") if k in m]
    assert kinds == ["READY", "RELOADING", "READY", "STOPPING"]


def test_a_failed_reload_still_ends_with_ready(tmp_path, notify):
    """A reload whose replacement dies while booting: after RELOADING=1 comes READY=1
    again (the old worker still serves, so ``systemctl reload`` does not hang), with a
    STATUS line saying the reload failed and why."""
    app = script(tmp_path, "import os, pycluster\n"
                           "if pycluster.worker.id > 1:\n"
                           "    raise SystemExit(3)\n" + APP.replace("\n    ", "\n").strip()
                 + "\n", "app.py")
    argv = ["-m", "pycluster", "run", app, "-w", "1", "-b", "127.0.0.1:0", "--kill-timeout", "10"]
    env = {"NOTIFY_SOCKET": str(tmp_path / "notify.sock")}
    with Proc(argv, cwd=tmp_path, env=env, read_stderr=True) as proc:
        notify.next("READY=1", lambda m: "READY" in m)
        port = _port_of(proc)
        os.kill(proc.pid, signal.SIGHUP)
        notify.next("RELOADING=1", lambda m: "RELOADING" in m)
        again = notify.next("READY=1 after the failed reload", lambda m: "READY" in m)
        assert again["STATUS"].startswith("reload failed: replacement worker 2 died")
        assert again["STATUS"].endswith("1 worker(s) serving")
        assert b"worker 1" in http_get(port)
        os.kill(proc.pid, signal.SIGTERM)
        assert proc.wait() == 0


def test_watchdog_pings_at_half_the_interval_and_a_worker_death_is_a_status(tmp_path, notify):
    """With WATCHDOG_USEC set (and WATCHDOG_PID unset), the master sends WATCHDOG=1 while
    its loop turns; a worker that dies unexpectedly is reported on a STATUS line."""
    app = script(tmp_path, APP, "app.py")
    argv = ["-m", "pycluster", "run", app, "-w", "1", "-b", "127.0.0.1:0", "--kill-timeout", "10"]
    env = {"NOTIFY_SOCKET": str(tmp_path / "notify.sock"), "WATCHDOG_USEC": "100000"}
    with Proc(argv, cwd=tmp_path, env=env, read_stderr=True) as proc:
        notify.next("READY=1", lambda m: "READY" in m)
        for n in range(3):
            assert notify.next(f"watchdog ping {n}", lambda m: "WATCHDOG" in m) == {
                "WATCHDOG": "1"}
        worker_pid = _worker_pids(proc)[0]
        os.kill(worker_pid, signal.SIGKILL)
        died = notify.next("the death on a STATUS line", lambda m: "died" in m.get("STATUS", ""))
        assert died["STATUS"].startswith("worker 1 died (signal SIGKILL)")
        os.kill(proc.pid, signal.SIGTERM)
        assert proc.wait() == 0


def _worker_pids(proc: Proc) -> list[int]:
    from pycluster._procfs import children

    deadline = time.monotonic() + DEADLINE
    while not (pids := children(proc.pid)):
        assert time.monotonic() < deadline, "no worker process"
        time.sleep(0.01)
    return pids


def test_watchdog_pid_of_another_process_means_no_pings(tmp_path, notify):
    """WATCHDOG_PID naming another process: the master sends no WATCHDOG=1 at all (the
    whole run: READY, then STOPPING, nothing else)."""
    app = script(tmp_path, APP, "app.py")
    argv = ["-m", "pycluster", "run", app, "-w", "1", "-b", "127.0.0.1:0"]
    env = {"NOTIFY_SOCKET": str(tmp_path / "notify.sock"), "WATCHDOG_USEC": "20000",
           "WATCHDOG_PID": "1"}
    with Proc(argv, cwd=tmp_path, env=env, read_stderr=True) as proc:
        notify.next("READY=1", lambda m: "READY" in m)
        http_get(_port_of(proc))
        os.kill(proc.pid, signal.SIGTERM)
        notify.next("STOPPING=1", lambda m: "STOPPING" in m)
        assert proc.wait() == 0
    assert not [m for m in notify.messages if "WATCHDOG" in m]


def test_abstract_notify_socket(tmp_path):
    """NOTIFY_SOCKET=@name is an abstract socket: READY=1 arrives there."""
    name = f"pycluster-test-{os.getpid()}-{time.monotonic_ns()}"
    fake = Notifications(b"\0" + name.encode())
    app = script(tmp_path, APP, "app.py")
    argv = ["-m", "pycluster", "run", app, "-w", "1", "-b", "127.0.0.1:0"]
    try:
        with Proc(argv, cwd=tmp_path, env={"NOTIFY_SOCKET": "@" + name}, read_stderr=True) as proc:
            assert fake.next("READY=1", lambda m: "READY" in m)["READY"] == "1"
            os.kill(proc.pid, signal.SIGTERM)
            assert proc.wait() == 0
    finally:
        fake.close()


@pytest.mark.parametrize("where", ["missing.sock", "not-a-socket"])
def test_unreachable_notify_socket_does_not_disturb_the_master(tmp_path, where):
    """NOTIFY_SOCKET naming nothing (or a plain file): the cluster serves as usual, logs
    one warning saying it cannot notify, and stops cleanly with exit code 0."""
    (tmp_path / "not-a-socket").write_text("")
    app = script(tmp_path, APP, "app.py")
    argv = ["-m", "pycluster", "run", app, "-w", "1", "-b", "127.0.0.1:0"]
    env = {"NOTIFY_SOCKET": str(tmp_path / where)}
    with Proc(argv, cwd=tmp_path, env=env, read_stderr=True) as proc:
        port = _port_of(proc)
        assert b"worker 1" in http_get(port)
        os.kill(proc.pid, signal.SIGTERM)
        assert proc.wait() == 0
    warnings = [line for line in proc.seen_err if "cannot notify systemd" in line]
    assert len(warnings) == 1, proc.seen_err
    assert "further failures are not logged" in warnings[0]


def test_a_bad_notify_socket_value_is_a_usage_error(tmp_path):
    """NOTIFY_SOCKET that is neither a path nor an @name (vsock) exits 2 with one line."""
    app = script(tmp_path, APP, "app.py")
    argv = ["-m", "pycluster", "run", app, "-w", "1", "-b", "127.0.0.1:0"]
    with Proc(argv, cwd=tmp_path, env={"NOTIFY_SOCKET": "vsock:2:1234"}) as proc:
        assert proc.wait() == 2
    assert "NOTIFY_SOCKET='vsock:2:1234' is not a socket path" in proc.finish()


# -- socket activation ------------------------------------------------------------------

#: Execs ``python -m pycluster run`` with its inherited socket moved to fd 3 and
#: LISTEN_FDS/LISTEN_PID set as systemd does (LISTEN_PID: the pid after exec, ours).
LAUNCHER = """
    import os, sys
    fd, pid = int(sys.argv[1]), sys.argv[2]
    os.dup2(fd, 3)
    os.close(fd)
    os.environ["LISTEN_FDS"] = "1"
    os.environ["LISTEN_PID"] = str(os.getpid()) if pid == "self" else pid
    os.execv(sys.executable, [sys.executable, "-m", "pycluster", "run", *sys.argv[3:]])
"""


def _listening_socket() -> socket.socket:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    return sock


def test_socket_activation_sockets_become_the_bind_addresses(tmp_path):
    """A launcher passes a listening socket as fd 3 with LISTEN_FDS=1 and LISTEN_PID set
    to the master's pid: the workers' listen() with no arguments gets that socket (the
    test's port answers, from both workers), and no LISTEN_* variable reaches them."""
    app = script(tmp_path, APP, "app.py")
    launcher = script(tmp_path, LAUNCHER, "launcher.py")
    sock = _listening_socket()
    port = sock.getsockname()[1]
    try:
        argv = [launcher, str(sock.fileno()), "self", app, "-w", "2", "--kill-timeout", "10"]
        with Proc(argv, cwd=tmp_path, pass_fds=(sock.fileno(),), read_stderr=True) as proc:
            sock.close()  # the cluster's copy is the only one now
            proc.expect_err(lambda line: f"listening on 127.0.0.1:{port}" in line,
                            "a worker listening on the inherited socket")
            answers = {http_get(port) for _ in range(20)}
            assert all(b"leaked []" in a for a in answers)
            os.kill(proc.pid, signal.SIGTERM)
            assert proc.wait() == 0
    finally:
        sock.close()


def test_bind_fd_adopts_a_passed_socket(tmp_path):
    """``--bind fd://N`` with N a listening socket the master inherited: the workers
    serve on it; nothing else is bound."""
    app = script(tmp_path, APP, "app.py")
    sock = _listening_socket()
    port = sock.getsockname()[1]
    try:
        argv = ["-m", "pycluster", "run", app, "-w", "1", "-b", f"fd://{sock.fileno()}"]
        with Proc(argv, cwd=tmp_path, pass_fds=(sock.fileno(),), read_stderr=True) as proc:
            sock.close()
            assert b"worker 1" in http_get(port)
            os.kill(proc.pid, signal.SIGTERM)
            assert proc.wait() == 0
    finally:
        sock.close()


def test_socket_activation_of_a_unix_socket(tmp_path):
    """An inherited unix socket (a ListenStream=/path unit) is adopted too: the worker
    answers on its path, and the master leaves the socket file in place when it stops
    (it belongs to systemd, not to us)."""
    app = script(tmp_path, APP, "app.py")
    launcher = script(tmp_path, LAUNCHER, "launcher.py")
    path = str(tmp_path / "app.sock")
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(path)
    sock.listen(64)
    try:
        argv = [launcher, str(sock.fileno()), "self", app, "-w", "1"]
        with Proc(argv, cwd=tmp_path, pass_fds=(sock.fileno(),), read_stderr=True) as proc:
            proc.expect_err(lambda line: f"listening on {path}" in line, "the worker listening")
            with socket.socket(socket.AF_UNIX) as client:
                client.settimeout(DEADLINE)
                client.connect(path)
                client.sendall(b"GET / HTTP/1.0\r\n\r\n")
                answer = b""
                while chunk := client.recv(4096):
                    answer += chunk
            assert b"worker 1 leaked []" in answer
            os.kill(proc.pid, signal.SIGTERM)
            assert proc.wait() == 0
        assert os.path.exists(path)
    finally:
        sock.close()


def test_listen_pid_of_another_process_is_ignored_with_a_warning(tmp_path):
    """LISTEN_PID naming another process: the inherited socket is not adopted (as
    sd_listen_fds does), a warning says so, and the --bind address is used."""
    app = script(tmp_path, APP, "app.py")
    launcher = script(tmp_path, LAUNCHER, "launcher.py")
    sock = _listening_socket()
    try:
        argv = [launcher, str(sock.fileno()), "1", app, "-w", "1", "-b", "127.0.0.1:0"]
        with Proc(argv, cwd=tmp_path, pass_fds=(sock.fileno(),), read_stderr=True) as proc:
            proc.expect_err(lambda line: "is meant for pid 1, not this process" in line,
                            "the warning")
            port = _port_of(proc)
            assert port != sock.getsockname()[1]
            assert b"worker 1" in http_get(port)
            os.kill(proc.pid, signal.SIGTERM)
            assert proc.wait() == 0
    finally:
        sock.close()


@pytest.mark.parametrize(("fds", "pid"), [("two", "self"), ("1", "me"), ("-1", "self")])
def test_garbage_listen_variables_are_a_usage_error(tmp_path, fds, pid):
    """LISTEN_FDS or LISTEN_PID that is not a whole number: exit 2, one line naming
    both, no traceback, no worker started."""
    app = script(tmp_path, APP, "app.py")
    code = (
        "import os, sys\n"
        f"os.environ['LISTEN_FDS'] = {fds!r}\n"
        f"os.environ['LISTEN_PID'] = str(os.getpid()) if {pid!r} == 'self' else {pid!r}\n"
        f"os.execv(sys.executable, [sys.executable, '-m', 'pycluster', 'run', {app!r}])\n"
    )
    with Proc(["-c", code], cwd=tmp_path) as proc:
        assert proc.wait() == 2
    err = proc.finish()
    assert f"LISTEN_FDS={fds!r}" in err and "must both be whole numbers" in err
    assert "Traceback" not in err


def test_bind_fd_of_a_closed_or_unfit_descriptor_fails_at_start(tmp_path):
    """``--bind fd://N`` where N is not open, or is a socket that does not listen, or
    is a UDP socket: the master exits 1 with one line saying which, before any worker
    starts."""
    app = script(tmp_path, APP, "app.py")
    argv = ["-m", "pycluster", "run", app, "-w", "1", "-b", "fd://77"]
    with Proc(argv, cwd=tmp_path) as proc:
        assert proc.wait() == 1
    assert "cannot adopt fd://77: file descriptor 77 is not open" in proc.finish()
    for kind, why in ((socket.SOCK_STREAM, "it is not listening"),
                      (socket.SOCK_DGRAM, "it is a SOCK_DGRAM socket")):
        sock = socket.socket(type=kind)
        try:
            argv = ["-m", "pycluster", "run", app, "-w", "1", "-b", f"fd://{sock.fileno()}"]
            with Proc(argv, cwd=tmp_path, pass_fds=(sock.fileno(),)) as proc:
                assert proc.wait() == 1
            err = proc.finish()
            assert f"cannot adopt fd://{sock.fileno()}: {why}" in err
            assert "Traceback" not in err
        finally:
            sock.close()


def test_a_file_is_not_a_socket(tmp_path):
    """``--bind fd://N`` where N is a regular file: exit 1, "it is not a socket"."""
    app = script(tmp_path, APP, "app.py")
    with open(app) as f:
        fd = f.fileno()
        argv = ["-m", "pycluster", "run", app, "-w", "1", "-b", f"fd://{fd}"]
        with Proc(argv, cwd=tmp_path, pass_fds=(fd,)) as proc:
            assert proc.wait() == 1
    assert f"cannot adopt fd://{fd}: it is not a socket" in proc.finish()


# -- the pieces, without processes ----------------------------------------------------------


@pytest.mark.parametrize(("text", "expected"), [("fd://3", ("fd", 3)), ("fd://0", ("fd", 0))])
def test_parse_address_fd(text, expected):
    """fd://N parses to ("fd", N)."""
    assert parse_address(text) == expected


@pytest.mark.parametrize("text", ["fd://", "fd://x", "fd://-1", "fd://3.0", "fd://99999999999"])
def test_parse_address_bad_fd(text):
    """A malformed fd:// address is a SettingsError quoting it and showing 'fd://3'."""
    with pytest.raises(pycluster.SettingsError, match=r"fd://N needs a file descriptor"):
        parse_address(text)


def test_fd_bind_needs_shared_scheduling_and_is_adopted_once():
    """fd:// with scheduling='reuseport', or the same fd twice, is a SettingsError."""
    with pytest.raises(pycluster.SettingsError, match="needs scheduling='shared'"):
        pycluster.Settings(bind="fd://3", scheduling="reuseport")
    with pytest.raises(pycluster.SettingsError, match="lists 'fd://3' twice"):
        pycluster.Settings(bind=["fd://3", "fd://3"])


def test_listen_fds_reads_and_removes_the_variables():
    """listen_fds() turns LISTEN_FDS=2 for this pid into fd://3 and fd://4 and removes
    the three variables; another pid gives no sockets and a warning; no LISTEN_FDS gives
    nothing."""
    env = {"LISTEN_FDS": "2", "LISTEN_PID": "42", "LISTEN_FDNAMES": "a:b", "OTHER": "x"}
    assert listen_fds(env, pid=42) == (["fd://3", "fd://4"], None)
    assert env == {"OTHER": "x"}
    fds, warning = listen_fds({"LISTEN_FDS": "1", "LISTEN_PID": "7"}, pid=42)
    assert fds == [] and "meant for pid 7" in warning
    assert listen_fds({}, pid=42) == ([], None)
