"""Shared fixtures: every test must leave no process and no open fd behind."""

from __future__ import annotations

import os
import signal
import time

import psutil
import pytest

from pycluster._procfs import open_fds

_OURS = ("socket:", "pipe:", "anon_inode:[pidfd]")


@pytest.fixture(autouse=True)
def _no_leaks():
    """Fail a test that leaves a child process (or a new fd) behind; kill what it left."""
    me = psutil.Process()
    before = open_fds(os.getpid())
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
    # pytest's own capture may open fds; only sockets, pipes and pidfds are ours to worry about
    ours = sorted((fd, link) for fd, link in open_fds(os.getpid()).items()
                  if fd not in before and link.startswith(_OURS))
    assert not ours, f"test leaked fds: {ours}"
