"""Every example runs as the README says and does what its docstring promises.

Each runs as a real master process (through tests/loopback.py, so it binds 127.0.0.1),
on port 0, with two workers.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import psutil
import pytest
from helpers import Proc, http_get, wait_until

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
LOOPBACK = str(Path(__file__).resolve().parent / "loopback.py")


def start(name: str, **env: str) -> Proc:
    """Start examples/NAME with two workers on port 0 (127.0.0.1)."""
    settings = {"PORT": "0", "HOST": "127.0.0.1", "WORKERS": "2", **env}
    return Proc([LOOPBACK, str(EXAMPLES / name)], cwd=ROOT, env=settings,
                start_new_session=True, read_stderr=True)


def port_of(proc: Proc) -> int:
    """The port the master listens on for its workers (it holds the shared socket)."""

    def find() -> int | None:
        for conn in psutil.Process(proc.pid).net_connections(kind="tcp"):
            if conn.status == psutil.CONN_LISTEN and conn.laddr.ip == "127.0.0.1":
                return conn.laddr.port
        return None

    return wait_until(find, "the master's listening socket")


def body(port: int, path: str = "/") -> bytes:
    response = http_get(port, path=path)
    assert response.startswith(b"HTTP/1."), response
    assert b" 200 " in response.split(b"\r\n", 1)[0], response
    return response.split(b"\r\n\r\n", 1)[1]


def stop(proc: Proc, sig: int = signal.SIGTERM) -> int:
    os.kill(proc.pid, sig)
    return proc.wait()


def test_hello(tmp_path):
    """hello.py answers `hello world` from its workers and, on Ctrl-C (SIGINT), stops once
    and cleanly: each worker's exit is printed, no traceback, exit code 0."""
    with start("hello.py") as proc:
        port = port_of(proc)
        wait_until(lambda: len(psutil.Process(proc.pid).children()) == 2, "two workers")
        assert {body(port) for _ in range(20)} == {b"hello world\n"}
        assert stop(proc, signal.SIGINT) == 0
        stderr = proc.finish()
    died = [line for line in proc.seen + list(_drain(proc)) if line.endswith(" died")]
    assert len(died) == 2
    assert "Traceback" not in stderr


def _drain(proc: Proc):
    while True:
        line = proc.lines.get(timeout=10)
        if line is None:
            return
        yield line


@pytest.mark.parametrize("name", ["asyncio_server.py", "http_server.py"])
def test_servers_serve_reload_and_stop(name):
    """Each server example answers from both workers, replaces both on SIGHUP (a rolling
    reload with new worker ids), still answers, and stops with exit code 0 on SIGTERM."""
    with start(name) as proc:
        port = port_of(proc)
        for _ in range(2):
            proc.expect_err(lambda line: "listening on 127.0.0.1:" in line, "a worker listening")
        first = {body(port) for _ in range(30)}
        assert first <= {b"hello from worker 1\n", b"hello from worker 2\n"}
        os.kill(proc.pid, signal.SIGHUP)
        proc.expect_err(lambda line: "rolling reload finished" in line, "the reload to finish")
        wait_until(lambda: len(psutil.Process(proc.pid).children()) == 2, "old workers gone")
        after = {body(port) for _ in range(30)}
        assert after <= {b"hello from worker 3\n", b"hello from worker 4\n"}
        assert stop(proc) == 0
        stderr = proc.finish()
    assert "Traceback" not in stderr


def test_messaging_counts_requests_per_worker():
    """messaging.py: workers report what they serve; /stats returns the master's totals,
    which include every request made before it."""
    with start("messaging.py") as proc:
        port = port_of(proc)
        for _ in range(25):
            assert body(port).startswith(b"hello from worker")

        def totals() -> int:
            return sum(json.loads(body(port, "/stats")).values())

        wait_until(lambda: totals() >= 25, "the totals to include all 25 requests")
        assert stop(proc) == 0
        assert "Traceback" not in proc.finish()


def test_custom_plugin_example():
    """plugin.py: the ExitNotifier plugin counts the one crash and both survivors hear of it."""
    with Proc([LOOPBACK, str(EXAMPLES / "plugin.py")], cwd=ROOT, read_stderr=True) as proc:
        heard = [proc.expect(lambda line: "heard" in line, "a worker hearing of the exit")
                 for _ in range(2)]
        proc.expect(lambda line: line == "unexpected exits: 1", "the count")
        assert proc.wait() == 0
    assert all("'exited': 1" in line for line in heard)
