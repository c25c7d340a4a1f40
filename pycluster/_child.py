"""Becoming a worker: what a process started by a master does when it imports pycluster.

The master passes everything in ``PYCLUSTER_*`` variables (Node's ``NODE_UNIQUE_ID``):
this reads and removes them, so the worker's own children are not workers; arms
``PR_SET_PDEATHSIG`` so the worker dies with the master; names the process for ``ps``;
starts the IPC thread and tells the master the worker is online.
"""

from __future__ import annotations

import importlib
import json
import os
import signal
import socket
import sys
import threading
import traceback
from typing import Any

from ._errors import BOOT_FAILURE, SettingsError
from ._protocol import DEFAULT_MAX_MESSAGE, encode_control
from ._reader import exit_now
from ._thisworker import ThisWorker

__all__ = ["load", "process_title", "run_setups", "setup"]

_PR_SET_PDEATHSIG = 1


def setup() -> ThisWorker | None:
    """Make this process a worker if the master said so in its environment.

    Returns ``None`` in a process that is not a worker.

    Raises:
        SettingsError: the ``PYCLUSTER_*`` variables are there but incomplete.
    """
    env = os.environ
    if "PYCLUSTER_WORKER_ID" not in env:
        return None
    mine = {k: env.pop(k) for k in [k for k in env if k.startswith("PYCLUSTER_")]}
    try:
        worker_id = int(mine["PYCLUSTER_WORKER_ID"])
        fd = int(mine["PYCLUSTER_IPC_FD"])
        master_pid = int(mine["PYCLUSTER_MASTER_PID"])
        serialization = mine.get("PYCLUSTER_SERIALIZATION", "json")
        limit = int(mine.get("PYCLUSTER_MAX_MESSAGE", str(DEFAULT_MAX_MESSAGE)))
    except (KeyError, ValueError) as exc:
        msg = f"this process looks like a pycluster worker but its environment is incomplete: {exc}"
        raise SettingsError(msg) from None
    _arm_parent_death_signal()
    if os.getppid() != master_pid:
        exit_now(0)  # the master died before we got here
    sock = socket.socket(fileno=fd)
    sock.set_inheritable(False)
    worker = ThisWorker(worker_id, sock, serialization, limit, master_pid)
    try:
        worker.bind = [tuple(a) for a in json.loads(mine.get("PYCLUSTER_BIND", "[]"))]
    except (ValueError, TypeError):
        worker.bind = []
    name = mine.get("PYCLUSTER_NAME")
    if name:
        process_title(f"pycluster worker {worker_id} [{name}]")
    worker._setups = json.loads(mine.get("PYCLUSTER_SETUP", "[]"))
    worker._write(encode_control("online"))
    worker._reader.start()
    return worker


def run_setups(worker: ThisWorker) -> None:
    """Call the plugins' worker-side hooks (:meth:`Master.worker_setup`), in order, once
    ``pycluster.worker`` is set; a hook that fails is this worker's boot failure."""
    for spec in worker._setups:
        _run_setup(spec, worker)


def load(spec: str) -> Any:
    """Import ``"module:qualname"`` and return the object it names.

    Raises:
        LookupError: the module has no such attribute (the message says which).
        Exception: whatever importing the module raised.
    """
    module_name, _, qualname = spec.partition(":")
    target: Any = importlib.import_module(module_name)
    try:
        for part in qualname.split("."):
            target = getattr(target, part)
    except AttributeError as exc:
        raise LookupError(str(exc)) from None
    return target


def _run_setup(spec: str, worker: ThisWorker) -> None:
    """Call a plugin's worker-side hook; if it fails, this worker fails to boot."""
    try:
        load(spec)(worker)
    except Exception:
        traceback.print_exc()
        print(f"pycluster: worker {worker.id}: the worker setup hook {spec!r} failed",
              file=sys.stderr)
        exit_now(BOOT_FAILURE)


def process_title(title: str) -> None:
    """Name this process for ``ps``: the whole command line with setproctitle (the
    ``proctitle`` extra), else the 15-character name ``ps -o comm`` and ``top`` show."""
    try:
        from setproctitle import setproctitle
    except ImportError:
        pass
    else:
        setproctitle(title)
        return
    try:
        with open("/proc/self/comm", "w") as comm:  # Linux: the kernel keeps 15 bytes
            comm.write(title.replace("pycluster ", "pyc-"))
    except OSError:
        pass


def _arm_parent_death_signal() -> None:
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except (OSError, AttributeError):
        pass
    if threading.current_thread() is threading.main_thread():
        signal.pthread_sigmask(signal.SIG_SETMASK, set())
