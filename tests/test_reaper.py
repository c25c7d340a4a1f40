"""Containers: the master reaps the orphans it adopts, as a child subreaper under
``pycluster run`` and as PID 1 of a PID namespace, and leaves its own workers' exits to
itself (their exit codes still arrive)."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys

import pytest
from helpers import DEADLINE, Proc, script, wait_until

from pycluster._procfs import children, cmdline, state

#: A worker that, once listening, makes argv[1] orphans: a shell backgrounds each from a
#: subshell that exits at once, so its parent is gone; each orphan blocks opening the
#: FIFO argv[2] until the test opens it for writing, then exits. The worker prints
#: "orphans made" once the shell has returned.
ORPHANS = """
    import subprocess, sys, time, pycluster
    count, fifo = sys.argv[1], sys.argv[2]
    sock = pycluster.worker.listen()
    subprocess.run(["sh", "-c", 'for i in $(seq "$1"); do ( read x < "$2" & ) ; done',
                    "sh", count, fifo], check=True)
    print("orphans made", flush=True)
    pycluster.worker.on("disconnect", lambda: None)
    while pycluster.worker.is_connected():
        time.sleep(0.05)
"""


def _release(fifo) -> None:
    """Let every orphan blocked on *fifo* go: open it for writing, then close it, if
    some orphan has it open. Called again while waiting: an orphan that reaches its
    open() after this one is let go by the next call."""
    with contextlib.suppress(OSError):
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))


@contextlib.contextmanager
def _released(fifo):
    """Release the orphans on the way out, whatever happened."""
    try:
        yield
    finally:
        _release(fifo)


def test_run_is_a_subreaper_that_reaps_workers_orphans(tmp_path):
    """Under ``pycluster run`` the master is a child subreaper: the orphans of a
    worker's children are reparented to it (not to init), and once they exit none stays
    a zombie; the worker itself keeps running and the cluster stops with exit code 0."""
    app = script(tmp_path, ORPHANS, "app.py")
    fifo = tmp_path / "go"
    os.mkfifo(fifo)
    argv = ["-m", "pycluster", "run", app, "-w", "1", "-b", "127.0.0.1:0", "--", "20", str(fifo)]
    with Proc(argv, cwd=tmp_path, read_stderr=True) as proc, _released(fifo):
        proc.expect(lambda line: line == "orphans made", "the orphans made")
        (worker,) = wait_until(lambda: [c for c in children(proc.pid)
                                        if "app.py" in " ".join(cmdline(c))], "the worker")
        orphans = wait_until(lambda: len(set(children(proc.pid)) - {worker}) == 20
                             and set(children(proc.pid)) - {worker},
                             "20 orphans reparented to the master")
        wait_until(lambda: _release(fifo) or set(children(proc.pid)) == {worker},
                   "the orphans released and reaped")
        assert not set(orphans) & set(children(proc.pid))
        assert state(worker) not in ("Z", None), "the worker still runs"
        os.kill(proc.pid, signal.SIGTERM)
        assert proc.wait() == 0


def test_a_worker_exit_code_still_reaches_the_master(tmp_path):
    """The reaper never takes a worker's exit status: a worker exiting with code 7 is
    logged as such (not lost to the reaper) under ``pycluster run``."""
    app = script(tmp_path, """
        import sys, pycluster
        pycluster.worker.listen()
        sys.exit(7)
    """, "app.py")
    argv = ["-m", "pycluster", "run", app, "-w", "1", "-b", "127.0.0.1:0", "--no-respawn"]
    with Proc(argv, cwd=tmp_path, read_stderr=True) as proc:
        proc.expect_err(lambda line: "exited with code 7 unexpectedly" in line, "the exit code")
        assert proc.wait() == 1


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("unshare"),
                    reason="needs root and unshare(1) for a PID namespace")
def test_master_as_pid_1_reaps_orphans_and_handles_sigterm(tmp_path):
    """A master that is PID 1 of a PID namespace (``unshare --pid --fork``, as in a
    container without --init) adopts the orphans of its workers' children and reaps
    them — 200 orphans, then no child but the worker — and SIGTERM sent from outside
    still stops it gracefully (exit code 0)."""
    app = script(tmp_path, ORPHANS, "app.py")
    fifo = tmp_path / "go"
    os.mkfifo(fifo)
    argv = ["unshare", "--pid", "--fork", "--mount-proc", sys.executable, "-m", "pycluster",
            "run", app, "-w", "1", "-b", "127.0.0.1:0", "--", "200", str(fifo)]
    unshare = subprocess.Popen(argv, cwd=tmp_path, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    try:
        (master,) = wait_until(lambda: children(unshare.pid), "the master in the namespace")
        wait_until(lambda: len(children(master)) == 201, "200 orphans adopted by PID 1")
        wait_until(lambda: _release(fifo) or len(children(master)) == 1,
                   "the orphans released and reaped")
        os.kill(master, signal.SIGTERM)
        stdout, stderr = unshare.communicate(timeout=DEADLINE)
        assert unshare.returncode == 0, stderr
        assert "orphans made" in stdout
        assert "master received SIGTERM" in stderr
    finally:
        _release(fifo)
        if unshare.poll() is None:
            unshare.kill()
        unshare.communicate()
