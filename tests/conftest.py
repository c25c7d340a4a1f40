"""Shared fixtures: every test must leave no process and no open fd behind."""

from __future__ import annotations

import os
import signal
import time

import psutil
import pytest

_OURS = ("socket:", "pipe:", "anon_inode:[pidfd]")


def _fds() -> set[int]:
    return {int(fd) for fd in os.listdir("/proc/self/fd")}


@pytest.fixture(autouse=True)
def _no_leaks():
    """Fail a test that leaves a child process (or a new fd) behind; kill what it left."""
    me = psutil.Process()
    before = _fds()
    yield
    deadline = time.monotonic() + 5
    children = me.children(recursive=True)
    while children and time.monotonic() < deadline:
        time.sleep(0.02)
        children = [c for c in me.children(recursive=True) if c.is_running()
                    and c.status() != psutil.STATUS_ZOMBIE]
    for child in children:
        try:
            os.kill(child.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    for child in me.children(recursive=True):
        try:
            child.wait(timeout=5)
        except psutil.Error:
            pass
    assert not children, f"test leaked processes: {[c.pid for c in children]}"
    leaked = {fd for fd in _fds() - before if os.path.exists(f"/proc/self/fd/{fd}")}
    # pytest's own capture may open fds; only sockets and pipes are ours to worry about
    ours = {fd for fd in leaked
            if os.readlink(f"/proc/self/fd/{fd}").startswith(_OURS)}
    named = sorted((fd, os.readlink(f"/proc/self/fd/{fd}")) for fd in ours)
    assert not ours, f"test leaked fds: {named}"
