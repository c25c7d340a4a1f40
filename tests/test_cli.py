"""The ``pycluster`` command line: usage errors, defaults, and real end-to-end runs."""

from __future__ import annotations

import os
import re
import signal
import sys
from pathlib import Path

import pytest
from helpers import Proc, http_get, script

from pycluster import cli

SYNC_APP = """
    import sys, pycluster
    from http.server import ThreadingHTTPServer, BaseHTTPRequestHandler

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            body = f"worker {pycluster.worker.id} args {sys.argv[1:]}\\n".encode()
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


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["run"], "required: APP"),
        (["run", "no_such_thing"], "neither a script path nor 'module:function'"),
        (["run", "app.py", "--workers", "0"], "--workers 0 must be at least 1"),
        (["run", "app.py", "--workers", "two"], "invalid int value: 'two'"),
        (["run", "app.py", "--bind", "localhost"], "bind address 'localhost' is not HOST:PORT"),
        (["run", "app.py", "--bind", "1.2.3.4:99999"], "port 0-65535"),
        (["run", "app.py", "--kill-timeout", "-1"], "--kill-timeout -1.0 must be"),
        (["run", "app.py", "--log-format", "xml"], "invalid choice: 'xml'"),
        (["run", "app.py", "--scheduling", "rr"], "invalid choice: 'rr'"),
        (["run", "app.py", "--plugin", "nope"], "no plugin named 'nope'"),
        (["frobnicate"], "invalid choice: 'frobnicate'"),
    ],
)
def test_usage_errors_exit_2_without_traceback(tmp_path, monkeypatch, capsys, argv, message):
    """Each user mistake exits 2 with one clear line on stderr and no traceback, and
    starts no process."""
    script(tmp_path, "import pycluster\n", "app.py")
    monkeypatch.chdir(tmp_path)
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert message in err
    assert "Traceback" not in err


def test_no_command_prints_help(capsys):
    """`pycluster` alone prints the usage and exits 2."""
    assert cli.main([]) == 2
    assert "usage: pycluster" in capsys.readouterr().err


def test_version_and_help(capsys):
    """--version prints the version; run --help explains APP and the options, exit 0."""
    assert cli.main(["--version"]) == 0
    assert re.match(r"pycluster \d", capsys.readouterr().out)
    assert cli.main(["run", "--help"]) == 0
    out = capsys.readouterr().out
    for word in ("APP", "--workers", "--bind", "--no-respawn", "--kill-timeout",
                 "--log-format", "--plugin", "WEB_CONCURRENCY"):
        assert word in out


def test_default_workers_from_web_concurrency_and_affinity():
    """WEB_CONCURRENCY wins; otherwise the CPUs this process may run on (affinity), never
    more than the cgroup quota; a bad WEB_CONCURRENCY is a usage error."""
    assert cli.default_workers({"WEB_CONCURRENCY": "7"}) == 7
    usable = len(os.sched_getaffinity(0))
    quota = cli._cgroup_cpus()
    assert cli.default_workers({}) == (min(usable, quota) if quota else usable)
    with pytest.raises(cli._UsageError, match="WEB_CONCURRENCY='x'"):
        cli.default_workers({"WEB_CONCURRENCY": "x"})


def test_cgroup_quota_is_read(tmp_path):
    """A cgroup v2 cpu.max of 150000/100000 allows 2 CPUs; 'max' means no limit."""
    root = tmp_path / "cg"
    own = Path("/proc/self/cgroup").read_text().split("0::", 1)[-1].strip().lstrip("/")
    where = root / own if own else root
    where.mkdir(parents=True)
    (where / "cpu.max").write_text("150000 100000\n")
    assert cli._cgroup_cpus(str(root)) == 2
    (where / "cpu.max").write_text("max 100000\n")
    assert cli._cgroup_cpus(str(root)) is None


def _port(proc: Proc) -> int:
    line = proc.expect_err(lambda line: "listening on 127.0.0.1:" in line, "a worker listening")
    return int(line.rsplit(":", 1)[1].split()[0])


def test_run_script_end_to_end(tmp_path):
    """`python -m pycluster run app.py -w 2 -b 127.0.0.1:0 -- --flag` serves from both
    workers with the extra args, logs the lifecycle, and stops cleanly on SIGTERM."""
    script(tmp_path, SYNC_APP, "app.py")
    argv = ["-m", "pycluster", "run", "app.py", "-w", "2", "-b", "127.0.0.1:0",
            "--kill-timeout", "5", "--", "--flag"]
    with Proc(argv, cwd=tmp_path, start_new_session=True, read_stderr=True) as proc:
        port = _port(proc)
        _port(proc)  # the second worker
        seen = {http_get(port).split(b"\r\n\r\n", 1)[1] for _ in range(40)}
        assert {b.split()[1] for b in seen} <= {b"1", b"2"}
        assert all(b"args ['--flag']" in b for b in seen)
        os.kill(proc.pid, signal.SIGTERM)
        assert proc.wait() == 0
        proc.expect_err(lambda line: "exited with code 0 after disconnect" in line, "worker exit")


def test_run_target_json_logs_and_respawn(tmp_path):
    """`run module:function --log-format json` logs JSON lines; a worker killed with
    SIGKILL is logged as an error and replaced (respawn is on by default)."""
    (tmp_path / "mod.py").write_text(
        "import time, pycluster\n"
        "def main():\n"
        "    pycluster.worker.listen()\n"
        "    pycluster.worker.on('disconnect', lambda: None)\n"
        "    while pycluster.worker.is_connected():\n"
        "        time.sleep(0.05)\n"
    )
    argv = ["-m", "pycluster", "run", "mod:main", "-w", "1", "-b", "127.0.0.1:0",
            "--log-format", "json", "--kill-timeout", "5"]
    import json

    with Proc(argv, cwd=tmp_path, start_new_session=True, read_stderr=True) as proc:
        first = json.loads(proc.expect_err(
            lambda line: '"event": "listening"' in line, "worker 1 listening"))
        assert first["worker_id"] == 1 and first["level"] == "info"
        os.kill(first["pid"], signal.SIGKILL)
        died = json.loads(proc.expect_err(lambda line: '"event": "exit"' in line, "worker 1 exit"))
        assert died["level"] == "error" and died["signal"] == "SIGKILL"
        assert "out of memory" in died["message"]
        second = json.loads(proc.expect_err(
            lambda line: '"event": "listening"' in line, "replacement listening"))
        assert second["worker_id"] == 2
        os.kill(proc.pid, signal.SIGTERM)
        assert proc.wait() == 0


def test_console_script_is_installed():
    """The `pycluster` console script exists next to this interpreter or on PATH."""
    import shutil

    found = shutil.which("pycluster") or os.path.exists(
        os.path.join(os.path.dirname(sys.executable), "pycluster"))
    assert found
