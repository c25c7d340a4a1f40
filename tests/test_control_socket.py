"""The control socket (``control`` plugin) and its client, ``pycluster status|reload|scale|
stop|list``: real masters, real unix sockets, and the ways they go wrong."""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from helpers import DEADLINE, Proc, http_get, script, wait_until
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pycluster.plugins import control

from pycluster import cli
from pycluster._procfs import socket_inodes, unix_sockets

APP = """
    import os, sys, pycluster
    from http.server import ThreadingHTTPServer, BaseHTTPRequestHandler

    if os.path.exists(os.path.join(os.path.dirname(os.path.abspath(__file__)), "broken")):
        sys.exit(1)  # a bad deploy: replacements die at start

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            body = f"worker {pycluster.worker.id}\\n".encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            pycluster.worker.count_request()  # before the answer: counted once it is read
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler, bind_and_activate=False)
    server.socket.close()
    server.socket = pycluster.worker.listen()
    pycluster.worker.on("disconnect", server.shutdown)
    server.serve_forever()
"""

# A master written by hand, for the plugin's options: NAME IDLE_TIMEOUT MAX_CLIENTS
MASTER = """
    import sys, pycluster
    if pycluster.is_primary:
        master = pycluster.Master(name=sys.argv[1], bind=["127.0.0.1:0"])
        master.use("control", idle_timeout=float(sys.argv[2]), max_clients=int(sys.argv[3]))
        master.use("reload")
        # another plugin's counts fill the requests column
        master.on("status_row", lambda worker, row: row.update(requests=worker.id * 10))
        for _ in range(2):
            master.fork()
        sys.exit(master.run())
    else:
        import app
"""


def start(tmp_path: Path, name: str, *extra: str, workers: int = 2) -> Proc:
    """Start ``pycluster run app.py`` named *name* and wait until *workers* listen."""
    script(tmp_path, APP, "app.py")
    proc = Proc(["-m", "pycluster", "run", "app.py", "-w", str(workers), "--bind",
                 "127.0.0.1:0", "--name", name, "--kill-timeout", "10", *extra],
                cwd=tmp_path, read_stderr=True)
    try:
        listening(name, workers, proc)
    except BaseException:
        proc.finish()
        raise
    return proc


def status(name: str) -> dict[str, Any]:
    """The cluster's status, straight from its socket."""
    result: dict[str, Any] = control.call(control.socket_path(name), {"verb": "status"})
    return result


def listening(name: str, count: int, proc: Proc | None = None) -> dict[str, Any]:
    """Wait until exactly *count* workers of cluster *name* exist, all listening."""

    def check() -> dict[str, Any] | None:
        if proc is not None:
            assert proc.popen.poll() is None, f"master exited: {proc.finish()}"
        try:
            found = status(name)
        except control.ControlError:
            return None
        states = [w["state"] for w in found["workers"]]
        return found if states == ["listening"] * count else None

    result: dict[str, Any] = wait_until(check, f"{count} listening workers in {name!r}")
    return result


def port_of(proc: Proc) -> int:
    """The port the cluster's workers listen on (from the log)."""
    line = proc.expect_err(lambda s: "listening on" in s, "a listening line")
    return int(line.rsplit(":", 1)[1])


def stop(proc: Proc) -> int:
    """SIGTERM the master and wait for it; the exit code."""
    if proc.popen.poll() is None:
        proc.popen.send_signal(signal.SIGTERM)
    return proc.wait()


def client(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """Run ``pycluster ARGV`` in this process: (exit code, stdout, stderr)."""
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def raw(path: str, data: bytes, timeout: float = DEADLINE) -> list[dict[str, Any]]:
    """Send *data* on a fresh connection, close our side, and return every answer line."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(path)
        try:
            sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the master closed early (a line too long): what it answered still counts
        received = b""
        try:
            while chunk := sock.recv(65536):
                received += chunk
        except ConnectionResetError:
            pass
    return [json.loads(line) for line in received.splitlines()]


# -- the verbs ----------------------------------------------------------------------------


def test_status_table_and_json_describe_the_real_workers(tmp_path, capsys):
    """`pycluster status` prints a pm2-like table of the workers; `--json` one object whose
    `workers` list names the very processes the master runs (id, pid, slot, state, ...),
    with the requests each served as the worker counted them (none for a worker that
    counted none)."""
    proc = start(tmp_path, "st")
    try:
        port = port_of(proc)
        assert b"worker" in http_get(port)
        code, out, err = client(capsys, "status")
        assert code == 0, err
        head, columns, *rows = out.splitlines()
        assert head.startswith(f"cluster st: master pid {proc.pid}")
        for word in ("id", "pid", "slot", "state", "uptime", "restarts", "cpu", "mem",
                     "requests", "last exit"):
            assert word in columns
        assert len(rows) == 2 and all("listening" in row for row in rows)
        code, out, err = client(capsys, "status", "--json", "--name", "st")
        assert code == 0, err
        found = json.loads(out)
        assert found["name"] == "st" and found["pid"] == proc.pid
        import psutil

        children = {c.pid for c in psutil.Process(proc.pid).children()}
        assert {w["pid"] for w in found["workers"]} == children
        table = unix_sockets()
        for row in found["workers"]:
            assert {"id", "pid", "slot", "state", "uptime", "restarts", "cpu_percent",
                    "rss_bytes", "requests", "last_exit"} <= row.keys()
            assert row["rss_bytes"] > 1 << 20 and row["restarts"] == 0
            # the control socket stays in the master: no worker inherits it
            assert found["socket"] not in {table.get(i) for i in socket_inodes(row["pid"])}
        assert found["socket"] in {table.get(i) for i in socket_inodes(proc.pid)}
        served = {w["pid"]: w["requests"] for w in found["workers"]}
        assert sorted(served.values(), key=str) == [1, None]  # the one request, counted
        for _ in range(3):
            http_get(port)
        code, out, err = client(capsys, "status", "--json", "--name", "st")
        assert sum(w["requests"] or 0 for w in json.loads(out)["workers"]) == 4
    finally:
        assert stop(proc) == 0
        proc.finish()


def test_scale_to_n_and_by_one_then_refuse_below_one(tmp_path, capsys):
    """`scale N`, `scale +1` and `scale -1` change the worker count (new workers listen,
    the newest extra ones drain away); scaling below one worker is refused with exit 1
    and usage mistakes exit 2, and the cluster keeps serving throughout."""
    proc = start(tmp_path, "sc")
    try:
        port = port_of(proc)
        assert client(capsys, "scale", "4")[0] == 0
        listening("sc", 4, proc)
        code, out, _ = client(capsys, "scale", "+1")
        assert code == 0 and "from 4 to 5" in out
        listening("sc", 5, proc)
        assert client(capsys, "scale", "-1")[0] == 0
        assert client(capsys, "scale", "1")[0] == 0
        found = listening("sc", 1, proc)
        assert found["workers"][0]["slot"] == 0  # the oldest stays
        code, _, err = client(capsys, "scale", "-1")
        assert code == 1 and "at least one must stay" in err
        for bad in ("0", "two", "+0", "1.5"):
            code, _, err = client(capsys, "scale", bad)
            assert code == 2 and "Traceback" not in err, bad
        assert b"worker" in http_get(port)
        listening("sc", 1, proc)
    finally:
        assert stop(proc) == 0
        proc.finish()


def test_reload_waits_for_the_result_and_fails_with_exit_1(tmp_path, capsys):
    """`pycluster reload` returns once every worker is replaced (new pids, restarts 1);
    when the new code dies at start it exits 1 saying why, and the old workers keep
    serving."""
    proc = start(tmp_path, "rl")
    try:
        port = port_of(proc)
        before = {w["pid"] for w in status("rl")["workers"]}
        code, out, err = client(capsys, "reload")
        assert code == 0, err
        assert "reloaded" in out
        after = listening("rl", 2, proc)
        assert not before & {w["pid"] for w in after["workers"]}
        assert all(w["restarts"] == 1 for w in after["workers"])
        (tmp_path / "broken").write_text("")
        code, _, err = client(capsys, "reload")
        assert code == 1
        assert "reload failed" in err and "died before it was ready" in err
        assert {w["pid"] for w in listening("rl", 2, proc)["workers"]} == {
            w["pid"] for w in after["workers"]}
        assert b"worker" in http_get(port)
    finally:
        assert stop(proc) == 0
        proc.finish()


def test_status_shows_a_crash_as_restart_and_last_exit(tmp_path, capsys):
    """A worker killed by SIGKILL is respawned in its slot; status counts the restart and
    shows the slot's last exit (`signal SIGKILL`)."""
    proc = start(tmp_path, "cr")
    try:
        victim = status("cr")["workers"][0]
        os.kill(victim["pid"], signal.SIGKILL)

        def replaced() -> dict[str, Any] | None:
            rows = [w for w in listening("cr", 2, proc)["workers"] if w["slot"] == victim["slot"]]
            return rows[0] if rows and rows[0]["pid"] != victim["pid"] else None

        row = wait_until(replaced, "the killed worker's replacement")
        assert row["restarts"] == 1
        assert row["last_exit"]["signal"] == "SIGKILL"
        assert not row["last_exit"]["after_disconnect"]
        code, out, _ = client(capsys, "status")
        assert code == 0 and "signal SIGKILL" in out
    finally:
        assert stop(proc) == 0
        proc.finish()


@pytest.mark.parametrize("now", [False, True])
def test_stop_ends_the_cluster_and_removes_socket_and_pid_file(tmp_path, capsys, now):
    """`pycluster stop` (graceful, or `--now`) returns once the master has exited (code 0);
    the socket and the `--pid-file` are gone."""
    pid_file = tmp_path / "master.pid"
    proc = start(tmp_path, "sp", "--pid-file", str(pid_file))
    try:
        assert pid_file.read_text().strip() == str(proc.pid)
        code, out, err = client(capsys, "stop", *(["--now"] if now else []))
        assert code == 0, err
        assert out.strip().endswith("sp: stopped")
        assert proc.popen.poll() is not None  # it waited for the master to exit
        assert proc.wait() == 0
        assert not pid_file.exists()
        assert not os.path.exists(control.socket_path("sp"))
    finally:
        proc.finish()


# -- finding the cluster ------------------------------------------------------------------


def test_no_cluster_running_is_one_clear_error(capsys):
    """With no cluster running, every verb exits 1 saying so; `list` prints nothing and
    exits 0; an unknown --name is an error naming it."""
    for verb in ("status", "reload", "stop"):
        code, _, err = client(capsys, verb)
        assert code == 1 and "no pycluster cluster of this user is running" in err, verb
    code, out, err = client(capsys, "list")
    assert code == 0 and out == ""
    code, _, err = client(capsys, "status", "--name", "nope")
    assert code == 1 and "no cluster named 'nope'" in err
    code, _, err = client(capsys, "status", "--name", "../etc")
    assert code == 2 and "cluster name '../etc'" in err


def test_several_clusters_need_a_name_and_the_error_lists_them(tmp_path, capsys):
    """With two clusters running, a verb without --name exits 1 listing both by name and
    pid; `list` shows both; with --name each is reached."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    one = start(tmp_path / "a", "one", workers=1)
    try:
        two = start(tmp_path / "b", "two", workers=1)
        try:
            code, _, err = client(capsys, "status")
            assert code == 1
            assert f"one (pid {one.pid})" in err and f"two (pid {two.pid})" in err
            assert "--name" in err
            code, out, _ = client(capsys, "list")
            assert code == 0 and "one" in out and "two" in out
            code, out, _ = client(capsys, "list", "--json")
            assert {c["name"]: c["pid"] for c in json.loads(out)} == {
                "one": one.pid, "two": two.pid}
            code, out, _ = client(capsys, "status", "--json", "--name", "two")
            assert code == 0 and json.loads(out)["pid"] == two.pid
        finally:
            assert stop(two) == 0
            two.finish()
    finally:
        assert stop(one) == 0
        one.finish()


def test_client_commands_from_the_shell(tmp_path):
    """The installed command line works end to end: `python -m pycluster status --json`
    prints the object, `stop` stops; exit codes as documented."""
    proc = start(tmp_path, "sh", workers=1)
    try:
        with Proc(["-m", "pycluster", "status", "--json"], cwd=tmp_path) as st:
            found = st.json(lambda obj: "workers" in obj, "the status object")
            assert st.wait() == 0
        assert found["workers"][0]["state"] == "listening"
        with Proc(["-m", "pycluster", "stop", "--name", "sh"], cwd=tmp_path) as sp:
            sp.expect(lambda line: line == "sh: stopped", "stopped")
            assert sp.wait() == 0
        assert proc.wait() == 0
    finally:
        proc.finish()


def test_a_master_that_does_not_answer_is_a_timeout_not_a_hang(tmp_path, capsys):
    """A master that accepts but does not answer (stopped with SIGSTOP) makes the client
    exit 1 after --timeout saying so; its socket is not taken for stale, and once the
    master runs again it answers."""
    proc = start(tmp_path, "hung", workers=1)
    try:
        os.kill(proc.pid, signal.SIGSTOP)
        try:
            code, _, err = client(capsys, "status", "--timeout", "0.5")
        finally:
            os.kill(proc.pid, signal.SIGCONT)
        assert code == 1 and "no answer" in err and "within 0.5 s" in err
        assert os.path.exists(control.socket_path("hung"))
        assert status("hung")["pid"] == proc.pid
    finally:
        assert stop(proc) == 0
        proc.finish()


# -- one name, one master; stale sockets ---------------------------------------------------


def test_second_master_with_the_same_name_refuses_to_start(tmp_path):
    """A second `pycluster run --name X` exits 1 at once with one line naming the pid that
    holds the name, forks no worker, and leaves the first cluster untouched."""
    proc = start(tmp_path, "dup", workers=1)
    try:
        with Proc(["-m", "pycluster", "run", "app.py", "--bind", "127.0.0.1:0", "--name",
                   "dup"], cwd=tmp_path) as second:
            assert second.wait() == 1
            err = second.finish()
        assert f"the name 'dup' is taken by pid {proc.pid}" in err
        assert "Traceback" not in err and "forked" not in err
        assert status("dup")["pid"] == proc.pid
    finally:
        assert stop(proc) == 0
        proc.finish()


def test_stale_socket_of_a_killed_master_is_cleaned(tmp_path, capsys):
    """After the master is SIGKILLed its socket file stays behind; the client reports no
    cluster (never "connection refused") and removes it, and a new master takes the name."""
    proc = start(tmp_path, "stale", workers=1)
    path = control.socket_path("stale")
    try:
        proc.popen.kill()
        proc.wait()
        assert stat.S_ISSOCK(os.lstat(path).st_mode)  # left behind
        code, _, err = client(capsys, "status")
        assert code == 1 and "no pycluster cluster" in err and "refused" not in err
        assert not os.path.exists(path)
    finally:
        proc.finish()
    # the workers notice their master's death by themselves; a fresh master reuses the name
    stale_again = Path(path)
    proc = Proc(["-m", "pycluster", "run", "app.py", "--bind", "127.0.0.1:0", "--name",
                 "stale", "-w", "1"], cwd=tmp_path, read_stderr=True)
    try:
        listening("stale", 1, proc)
        proc.popen.kill()  # stale again: this time the next master cleans it at start
        proc.wait()
    finally:
        proc.finish()
    assert stale_again.exists()
    proc = start(tmp_path, "stale", workers=1)
    try:
        assert status("stale")["pid"] == proc.pid
    finally:
        assert stop(proc) == 0
        proc.finish()


def test_pid_file_naming_a_live_master_refuses_a_stale_one_is_replaced(tmp_path):
    """`--pid-file` naming a running pycluster master makes a new master exit 1 saying so;
    a pid file left by a dead process is simply replaced."""
    pid_file = tmp_path / "app.pid"
    proc = start(tmp_path, "pf1", "--pid-file", str(pid_file), workers=1)
    try:
        with Proc(["-m", "pycluster", "run", "app.py", "--bind", "127.0.0.1:0", "--name",
                   "pf2", "--pid-file", str(pid_file)], cwd=tmp_path) as second:
            assert second.wait() == 1
            err = second.finish()
        assert f"names a running pycluster master (pid {proc.pid})" in err
        assert pid_file.read_text().strip() == str(proc.pid)
    finally:
        assert stop(proc) == 0
        proc.finish()
    pid_file.write_text("999999999\n")  # no such process
    proc = start(tmp_path, "pf3", "--pid-file", str(pid_file), workers=1)
    try:
        assert pid_file.read_text().strip() == str(proc.pid)
    finally:
        assert stop(proc) == 0
        proc.finish()
    assert not pid_file.exists()


# -- the directory and the peer ------------------------------------------------------------


@pytest.mark.parametrize("unsafe", ["mode", "owner"])
def test_unsafe_control_directory_is_refused(tmp_path, capsys, monkeypatch, unsafe):
    """A control directory others can enter (mode 0755), or one another user owns, is
    refused by the master (exit 1, nothing forked) and by the client, with the fix."""
    if unsafe == "owner" and os.getuid() != 0:
        pytest.skip("giving a directory to another user needs root")
    base = tmp_path / "xdg"
    (base / "pycluster").mkdir(parents=True)
    os.chmod(base / "pycluster", 0o755 if unsafe == "mode" else 0o700)
    if unsafe == "owner":
        os.chown(base / "pycluster", 65534, 65534)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(base))
    script(tmp_path, APP, "app.py")
    with Proc(["-m", "pycluster", "run", "app.py", "--bind", "127.0.0.1:0"],
              cwd=tmp_path) as proc:
        assert proc.wait() == 1
        err = proc.finish()
    assert "refusing the control directory" in err and "Traceback" not in err
    assert "forked" not in err
    code, _, err = client(capsys, "status")
    assert code == 1 and "refusing the control directory" in err


@pytest.mark.skipif(os.getuid() != 0, reason="connecting as another user needs root")
def test_peer_of_another_user_is_refused(tmp_path):
    """SO_PEERCRED: a client of another uid that reaches the socket anyway (the test opens
    the directory and socket for it) gets a refusal and nothing it asks is done."""
    proc = start(tmp_path, "peer", workers=1)
    path = control.socket_path("peer")
    dirs = [os.path.dirname(path), os.path.dirname(os.path.dirname(path))]
    try:
        for directory in dirs:
            os.chmod(directory, 0o711)
        os.chmod(path, 0o666)
        code = (
            "import json, os, socket, sys\n"
            "os.setgid(65534); os.setuid(65534)\n"
            "s = socket.socket(socket.AF_UNIX); s.settimeout(20); s.connect(sys.argv[1])\n"
            "try:\n"
            "    s.sendall(b'{\"verb\": \"stop\"}\\n')\n"
            "except BrokenPipeError:\n"
            "    pass  # refused at once: the answer is there to read\n"
            "print(s.makefile().readline(), end='')\n"
        )
        with Proc(["-c", code, path], cwd=tmp_path) as other:
            answer = other.json(lambda obj: True, "the refusal")
            assert other.wait() == 0
        assert answer["ok"] is False and "refused: uid 65534" in answer["error"]
        assert control.call(path, {"verb": "status"})["stopping"] is False
    finally:
        for directory in dirs:
            os.chmod(directory, 0o700)
        assert stop(proc) == 0
        proc.finish()


# -- hostile clients ----------------------------------------------------------------------

_VALID_ONLY = {"hello", "status"}
_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                 max_size=4),
    max_leaves=10,
)
_requests = st.one_of(
    st.binary(max_size=300),
    _json.map(lambda value: json.dumps(value).encode()),
    st.builds(lambda verb, extra: json.dumps({"verb": verb, **extra}).encode(),
              st.sampled_from(["hello", "status", "", "STATUS", "Stop", "reload ", "nope"])
              | st.text(max_size=10), st.dictionaries(st.text(max_size=5), _json, max_size=3)),
    st.builds(lambda count: json.dumps({"verb": "scale", "count": count}).encode(),
              st.one_of(st.integers(max_value=0), st.integers(min_value=1025), st.floats(),
                        st.text(max_size=5), st.booleans(), st.none())),
    st.builds(lambda delta: json.dumps({"verb": "scale", "delta": delta}).encode(),
              st.one_of(st.integers(max_value=-2), st.floats(), st.text(max_size=5))),
    st.builds(lambda now: json.dumps({"verb": "stop", "now": now}).encode(),
              st.one_of(st.integers(), st.text(max_size=5), st.none(), st.lists(st.none()))),
)


@pytest.mark.slow
def test_malformed_requests_get_error_answers_and_never_disturb_the_master(tmp_path):
    """Fuzzed with hypothesis: garbage bytes, JSON that is not an object, unknown verbs,
    bad arguments to scale and stop — every line gets an answer (`ok: false`, or the
    answer of a harmless hello/status) or the connection closes, and afterwards the same
    master and the same workers still serve and answer."""
    script(tmp_path, APP, "app.py")
    script(tmp_path, MASTER, "master.py")
    proc = Proc(["master.py", "fuzz", "10", "8"], cwd=tmp_path, read_stderr=True)
    try:
        before = listening("fuzz", 2, proc)
        path = control.socket_path("fuzz")

        @settings(max_examples=300, deadline=None,
                  suppress_health_check=[HealthCheck.function_scoped_fixture])
        @given(st.lists(_requests, min_size=1, max_size=4))
        def fuzz(lines: list[bytes]) -> None:
            data = b"".join(line.replace(b"\n", b" ") + b"\n" for line in lines)
            for answer in raw(path, data):
                assert isinstance(answer["ok"], bool)
                if not answer["ok"]:
                    assert isinstance(answer["error"], str) and answer["error"]

        fuzz()
        after = listening("fuzz", 2, proc)
        assert [w["pid"] for w in after["workers"]] == [w["pid"] for w in before["workers"]]
        assert after["pid"] == proc.pid and not after["stopping"]
    finally:
        stop(proc)
        proc.finish()


def test_huge_line_slow_client_and_connection_flood_leave_the_master_serving(tmp_path):
    """A line over 64 KiB gets an error and a closed connection; deep nesting is an error
    answer; a client that never finishes its line is cut off after the idle timeout
    while others are served meanwhile; connections beyond max_clients are closed, and
    the master answers again once they go."""
    script(tmp_path, APP, "app.py")
    script(tmp_path, MASTER, "master.py")
    proc = Proc(["master.py", "hostile", "1.0", "3"], cwd=tmp_path, read_stderr=True)
    try:
        listening("hostile", 2, proc)
        path = control.socket_path("hostile")
        answers = raw(path, b'{"verb": "' + b"x" * (control.MAX_LINE + 10) + b'"}\n')
        assert len(answers) == 1 and "longer than" in answers[0]["error"]
        answers = raw(path, b"[" * 50000 + b"]" * 50000 + b"\n")
        assert answers and answers[0]["ok"] is False
        with socket.socket(socket.AF_UNIX) as slow:
            slow.settimeout(DEADLINE)
            slow.connect(path)
            slow.sendall(b'{"verb": "sta')
            assert status("hostile")["pid"] == proc.pid  # served while the slow one waits
            started = time.monotonic()
            assert slow.recv(100) == b""  # cut off, not answered
            assert time.monotonic() - started < DEADLINE
        flood = []
        try:
            for _ in range(3):
                sock = socket.socket(socket.AF_UNIX)
                sock.connect(path)
                flood.append(sock)
            wait_until(lambda: _closed_at_once(path), "a connection over max_clients closed")
        finally:
            for sock in flood:
                sock.close()
        wait_until(lambda: _answers(path), "answers once the flood is gone")
        assert proc.popen.poll() is None
    finally:
        stop(proc)
        proc.finish()


def _closed_at_once(path: str) -> bool:
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(DEADLINE)
        sock.connect(path)
        try:
            sock.sendall(b'{"verb": "hello"}\n')
            return sock.recv(100) == b""
        except ConnectionResetError:
            return True


def _answers(path: str) -> bool:
    try:
        return bool(control.call(path, {"verb": "hello"}, timeout=DEADLINE))
    except control.ControlError:
        return False


def test_status_rows_take_fields_from_other_plugins(tmp_path, capsys):
    """A master whose plugin answers `status_row(worker, row)` fills the requests column:
    in the JSON rows and in the table."""
    script(tmp_path, APP, "app.py")
    script(tmp_path, MASTER, "master.py")
    proc = Proc(["master.py", "rows", "10", "8"], cwd=tmp_path, read_stderr=True)
    try:
        found = listening("rows", 2, proc)
        assert [w["requests"] for w in found["workers"]] == [w["id"] * 10 for w in
                                                             found["workers"]]
        code, out, _ = client(capsys, "status", "--name", "rows")
        assert code == 0
        rows = out.splitlines()[2:]
        requests = [row.split()[9] for row in rows]  # "22.0 MiB" is two words
        assert requests == [str(w["id"] * 10) for w in found["workers"]]
    finally:
        stop(proc)
        proc.finish()


def test_plugin_options_are_checked():
    """Bad options to the control plugin are SettingsErrors naming the option."""
    import pycluster

    for options, word in (({"idle_timeout": 0}, "idle_timeout"),
                          ({"max_clients": 0}, "max_clients"),
                          ({"name": "a/b"}, "cluster name"),
                          ({"sample_interval": "1"}, "sample_interval")):
        with pytest.raises(pycluster.SettingsError, match=word):
            control.ControlSocket(**options)


if sys.platform != "linux":  # pragma: no cover
    pytest.skip("the control socket reads /proc and SO_PEERCRED", allow_module_level=True)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["scale"], "required: N"),
        (["status", "--timeout", "0"], "--timeout 0.0 must be"),
        (["stop", "--name", ""], "cluster name ''"),
        (["list", "--bogus"], "unrecognized arguments: --bogus"),
    ],
)
def test_client_usage_errors_exit_2(capsys, argv, message):
    """Mistakes on a client command's line exit 2 with one line and no traceback, before
    any cluster is looked for."""
    code, _, err = client(capsys, *argv)
    assert code == 2 and message in err and "Traceback" not in err


def test_client_help_names_the_options(capsys):
    """`pycluster --help` lists the client commands; each command's --help its options."""
    with pytest.raises(SystemExit):
        cli._parser().parse_args(["--help"])
    out = capsys.readouterr().out
    for verb in ("status", "reload", "scale", "stop", "list"):
        assert verb in out
    assert cli.main(["status", "--help"]) == 0
    out = capsys.readouterr().out
    assert "--name" in out and "--json" in out and "--timeout" in out


def test_plugin_option_configures_the_one_control_socket(tmp_path, capsys):
    """`--plugin control:KEY=VALUE` configures the control socket that `pycluster run`
    always has (one socket, not a second one fighting the first for the name); an unknown
    option is a usage error."""
    proc = start(tmp_path, "opt", "--plugin", "control:max_clients=2", workers=1)
    try:
        assert status("opt")["pid"] == proc.pid
    finally:
        assert stop(proc) == 0
        proc.finish()
    script(tmp_path, APP, "app.py")
    argv = ["run", str(tmp_path / "app.py"), "--bind", "127.0.0.1:0",
                        "--plugin", "control:bogus=1"]
    code, _, err = client(capsys, *argv)
    assert code == 2 and "bogus" in err and "Traceback" not in err
