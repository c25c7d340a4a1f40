"""Fail fast at boot: ``pycluster run`` with an app that cannot start ends at once, with
the error shown once per worker at most and a last line that says why (issue 8)."""

from __future__ import annotations

import os
import signal
import socket

import pytest
from helpers import Proc, script

#: Listens on --bind, answers nothing, leaves on disconnect.
GOOD = """
    import threading, pycluster

    def main():
        done = threading.Event()
        pycluster.worker.on("disconnect", done.set)
        pycluster.worker.listen()
        done.wait(60)
"""


def pycluster_run(tmp_path, app: str, *extra: str) -> tuple[int, list[str], list[str]]:
    """Run ``python -m pycluster run APP -w 2`` to its end; (exit code, stdout, stderr)."""
    argv = ["-m", "pycluster", "run", app, "-w", "2", "-b", "127.0.0.1:0",
            "--kill-timeout", "5", *extra]
    with Proc(argv, cwd=tmp_path, start_new_session=True) as proc:
        code = proc.wait()
        return code, proc.seen, proc.finish().splitlines()


@pytest.mark.parametrize(("source", "shown"), [
    ("def main(:\n    pass\n", "SyntaxError"),
    ("raise RuntimeError('no database')\n", "RuntimeError: no database"),
    ("import pyc_no_such_dependency\n", "No module named 'pyc_no_such_dependency'"),
    # module:attr may also be an ASGI or WSGI app (issue 9): the line names all three
    ("main = 42\n", "APP 'app:main' is int 42: not an ASGI app, a WSGI app nor a function"),
])
def test_an_app_that_cannot_load_is_a_boot_failure(tmp_path, source, shown):
    """A syntax error, an exception at import, a missing dependency or a target that is
    not callable: exit 1, the error shown at most once per worker (not once per retry),
    and the last line says the cluster stopped because a worker failed to boot."""
    script(tmp_path, source, "app.py")
    code, _, err = pycluster_run(tmp_path, "app:main")
    assert code == 1
    assert 1 <= sum(shown in line for line in err) <= 2, err
    assert err[-1].startswith("pycluster: stopped: respawn gave up: worker ")
    assert "failed to boot (exit code 3)" in err[-1]


def test_a_script_that_crashes_at_start_stops_the_cluster_with_the_reason(tmp_path):
    """A script raising before it listens (no worker has listened yet) is not retried:
    exit 1, the traceback at most once per worker, and the last line says so."""
    script(tmp_path, "import pycluster\nraise ValueError('bad config')\n", "app.py")
    code, _, err = pycluster_run(tmp_path, "app.py")
    assert code == 1
    assert 1 <= sum("ValueError: bad config" in line for line in err) <= 2, err
    assert "died before it listened (exit code 1)" in err[-1]
    assert "no worker has listened yet" in err[-1]


def test_a_bind_address_in_use_is_one_line_and_no_worker(tmp_path):
    """--bind to a port in use: exit 1 with one line naming the address and the reason,
    before any worker starts (no fork is logged)."""
    script(tmp_path, GOOD, "app.py")
    taken = socket.socket()
    try:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        argv = ["-m", "pycluster", "run", "app:main", "-w", "2", "-b", f"127.0.0.1:{port}"]
        with Proc(argv, cwd=tmp_path, start_new_session=True) as proc:
            assert proc.wait() == 1
            err = proc.finish().splitlines()
    finally:
        taken.close()
    assert err == [f"pycluster: error: cannot listen on 127.0.0.1:{port}: "
                   "Address already in use"]


def test_workers_that_exit_0_without_listening_end_with_a_warning(tmp_path):
    """Workers that all return 0 without listening end the cluster with exit code 0 and a
    last line warning that no worker listened, not a line about an unexpected exit."""
    script(tmp_path, "def main():\n    return 0\n", "app.py")
    code, _, err = pycluster_run(tmp_path, "app:main")
    assert code == 0
    assert err[-1].startswith("pycluster: warning: every worker exited without listening")
    assert not any("unexpectedly" in line for line in err), err


def test_ps_tells_the_master_and_each_worker_apart(tmp_path):
    """The master's and each worker's process titles name the cluster and the worker id."""
    pytest.importorskip("setproctitle")
    script(tmp_path, GOOD, "shop.py")
    argv = ["-m", "pycluster", "run", "shop:main", "-w", "2", "-b", "127.0.0.1:0",
            "--kill-timeout", "5"]
    with Proc(argv, cwd=tmp_path, start_new_session=True, read_stderr=True) as proc:
        pids = [int(proc.expect_err(lambda line: "listening on" in line, "a worker listening")
                    .split("(pid ")[1].split(")")[0]) for _ in range(2)]
        titles = {}
        for pid in [proc.pid, *pids]:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                titles[pid] = f.read().replace(b"\0", b" ").decode().strip()
        os.kill(proc.pid, signal.SIGTERM)
        assert proc.wait() == 0
    assert titles[proc.pid] == "pycluster master [shop]"
    assert sorted(titles[p] for p in pids) == ["pycluster worker 1 [shop]",
                                               "pycluster worker 2 [shop]"]
