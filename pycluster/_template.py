"""The template of ``start_method="forkserver"``: imports the app once, forks workers.

Run by the master as ``python -m pycluster._template package.module:function [args...]``
with ``PYCLUSTER_TEMPLATE_FD`` (its end of a ``SOCK_SEQPACKET`` control socket),
``PYCLUSTER_MASTER_PID`` and ``PYCLUSTER_NAME`` in its environment. It:

1. imports the target's module and finds the function — the expensive part, done once;
2. checks that no thread runs (a fork copies only the forking thread: a lock another
   thread held stays locked forever in the child) and freezes the garbage collector's
   objects (``gc.freeze()``) so the pages they live on stay shared after each fork;
3. tells the master ``{"ready": true}``, or ``{"failed": TEXT}`` when step 1 or 2 went
   wrong (it still forks then: each worker prints TEXT and exits with
   :data:`pycluster.BOOT_FAILURE`, exactly as a spawned worker whose import fails);
4. keeps a spare worker ready (:mod:`pycluster._spare`): forked ahead, adopted by the
   master, which sends a new worker's environment and fds straight to it, so a new
   worker costs no fork; and answers a fork request that comes while no spare is ready
   (the worker's environment as JSON; its IPC socket and, for ``silent=True``, its
   stdout and stderr pipes as ``SCM_RIGHTS`` fds) by forking one with the new worker's
   pid. Workers are forked twice so that they become the master's children (the master
   is a ``PR_SET_CHILD_SUBREAPER``): the master reaps them and watches them with a pidfd
   as it does spawned ones.

The template never starts a thread, an event loop or a socket of its own (its spares
rehearse a worker's start: see :func:`pycluster._spare.rehearse`); it exits when the
master closes the control socket (a reload retires it) or dies.
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import select
import socket
import sys
import threading
import traceback
from typing import Any

import pycluster
from pycluster import _child
from pycluster._errors import BOOT_FAILURE
from pycluster._protocol import recv_fds
from pycluster._reader import exit_now
from pycluster._spare import Spare, double_fork, fork_adopted, rehearse, take_env

#: Largest fork request (the worker's environment as JSON).
MAX_REQUEST = 4 * 1024 * 1024


def main(argv: list[str]) -> Any:
    """Be the template for ``argv[0]``; in each forked worker, return what it exits with."""
    spec, *args = argv
    sys.argv = [spec, *args]
    env = _child.template_env
    if "PYCLUSTER_TEMPLATE_FD" not in env:
        sys.exit("pycluster._template is started by a master with start_method='forkserver'")
    ctl = socket.socket(fileno=int(env["PYCLUSTER_TEMPLATE_FD"]))
    ctl.set_inheritable(False)
    _child.arm_parent_death_signal()
    if os.getppid() != int(env["PYCLUSTER_MASTER_PID"]):
        exit_now(0)  # the master died before we got here
    name = env.get("PYCLUSTER_NAME")
    if name:
        _child.process_title(f"pycluster template [{name}]")
    target, failure = _load(spec)
    if failure is None:
        failure = _preload(target)
    if failure is None:
        failure = _threads_alive("while importing the app")
    if failure is None:
        _warn_sockets(spec, ctl.fileno())
    gc.collect()
    gc.freeze()
    _flush()
    ctl.send(json.dumps({"ready": True} if failure is None else {"failed": failure}).encode())
    request, fds = _serve(ctl, failed=failure is not None)
    # from here on: a worker, forked, reparented to the master
    ctl.close()
    return _become_worker(request, fds, target, failure)


def _load(spec: str) -> tuple[Any, str | None]:
    """Import the target; return it, or ``None`` and the text a failing worker prints."""
    try:
        target = _child.load(spec)
    except LookupError as exc:
        return None, f"pycluster: cannot load target {spec!r}: {exc}"
    except ModuleNotFoundError as exc:
        if exc.name and spec.startswith(exc.name):  # the app's module itself is missing
            return None, f"pycluster: cannot load target {spec!r}: {exc}"
        return None, (f"{traceback.format_exc()}"
                      f"pycluster: cannot load target {spec!r} (the traceback above says why)")
    except BaseException:  # noqa: BLE001 - a syntax error, an exception, sys.exit() at import
        return None, (f"{traceback.format_exc()}"
                      f"pycluster: cannot load target {spec!r} (the traceback above says why)")
    if not callable(target):
        kind = type(target).__name__
        return None, f"pycluster: target {spec!r} is a {kind}, not a function to call"
    return target, None


def _preload(target: Any) -> str | None:
    """Run the target's ``preload()`` if it has one (``pycluster run module:app``'s entry
    imports the app's module there), so the app is imported once, here; return the text a
    failing worker prints if it raises."""
    preload = getattr(target, "preload", None)
    if preload is None:
        return None
    try:
        preload()
    except BaseException:  # noqa: BLE001 - a syntax error, an exception, sys.exit() at import
        return (f"{traceback.format_exc()}"
                "pycluster: cannot load APP (the traceback above says why)")
    return None


def _threads_alive(when: str) -> str | None:
    """Why this process must not fork now (a thread besides the main one runs), or None."""
    if threading.active_count() == 1:
        return None
    names = ", ".join(repr(t.name) for t in threading.enumerate()
                      if t is not threading.main_thread())
    return (
        f"pycluster: start_method='forkserver': the app started thread(s) {names} {when}; "
        "a fork copies only the forking thread (locks held by the others stay locked in "
        "every worker), so the template must run none: start threads in the target "
        "function instead, or use start_method='spawn'"
    )


def _warn_sockets(spec: str, mine: int) -> None:
    """Warn (on stderr) about sockets the app opened at import: every worker would share
    each of them — one database connection written to by every worker at once."""
    try:
        fds = sorted(int(fd) for fd in os.listdir("/proc/self/fd"))
    except OSError:
        return
    found = []
    for fd in fds:
        if fd != mine:
            try:
                if os.readlink(f"/proc/self/fd/{fd}").startswith("socket:"):
                    found.append(str(fd))
            except OSError:
                pass
    if found:
        print(f"pycluster: warning: importing {spec!r} left socket(s) open (fd "
              f"{', '.join(found)}); with start_method='forkserver' every worker shares "
              "them: open connections in the target function instead", file=sys.stderr)


def _flush() -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            if stream is not None:
                stream.flush()
        except Exception:  # noqa: BLE001, S110 - a closed stream: nothing to duplicate
            pass


def _serve(ctl: socket.socket, *, failed: bool) -> tuple[dict[str, Any], list[int]]:
    """Answer the master until it goes away (then exit); return in a worker.

    Keeps one spare worker ready at the master (see :mod:`pycluster._spare`): forks it,
    offers it once adopted (``{"spare": pid}`` and its socket), and forks the next one when
    the master says it used it (``{"used": pid}``). A fork request (``{"env": ...}`` and
    the worker's fds: the master had no spare) forks a worker directly.

    A *failed* template forks too (even with a thread alive), with no spares: its
    workers only connect, print why and exit with BOOT_FAILURE.
    """
    adopting: Spare | None = None  # a spare being adopted
    offered = False  # a spare waits at the master
    spares = not failed
    while True:
        if spares and adopting is None and not offered and threading.active_count() == 1:
            try:
                adopting, assigned = _fork_spare(ctl)
            except OSError as exc:
                _say_no_spares(exc)
                spares = False
            else:
                if assigned is not None:  # this process is the spare, and has its request
                    return assigned
        waiting: list[Any] = [ctl] if adopting is None else [ctl, adopting.adoption]
        readable, _, _ = select.select(waiting, [], [])
        if adopting is not None and adopting.adoption in readable:
            try:
                adopting.offer(ctl)
                offered = True
            except OSError as exc:
                _say_no_spares(exc)
                spares = False
            adopting = None
        if ctl not in readable:
            continue
        data, fds = _receive(ctl)
        if not data:
            if adopting is not None:  # the master must hear of it, to reap it
                with contextlib.suppress(OSError):
                    adopting.offer(ctl)
            exit_now(0)  # retired, or the master died
        try:
            request = json.loads(data)
            if isinstance(request, dict) and "used" in request and not fds:
                offered = False
                continue
            why = _refusal(request, fds, failed=failed)
            if why is None:
                gc.freeze()
                _flush()
                pid = double_fork()
        except Exception as exc:  # noqa: BLE001 - told to the master, which raises it
            why = str(exc)
        if why is not None:
            for fd in fds:
                os.close(fd)
            ctl.send(json.dumps({"error": why}).encode())
            continue
        if pid == 0:
            if adopting is not None:
                adopting.close()  # the copies this worker inherited
            return request, fds
        for fd in fds:
            os.close(fd)
        ctl.send(json.dumps({"pid": pid}).encode())


def _say_no_spares(exc: OSError) -> None:
    """Say (on stderr) that this template stops forking spares, unless the master is
    gone (it exits then)."""
    if isinstance(exc, (BrokenPipeError, ConnectionResetError)):
        return
    print(f"pycluster: warning: the fork server's template cannot fork a spare worker "
          f"ahead ({exc}); it forks each worker when asked from now on", file=sys.stderr,
          flush=True)


def _receive(sock: socket.socket) -> tuple[bytes, list[int]]:
    """One request and its fds; ``b""`` (and no fds) once the other end is gone."""
    try:
        data, fds = recv_fds(sock, MAX_REQUEST, 8)
    except OSError:
        return b"", []
    if not data:
        for fd in fds:
            os.close(fd)
        return b"", []
    return data, fds


def _fork_spare(ctl: socket.socket
                ) -> tuple[Spare | None, tuple[dict[str, Any], list[int]] | None]:
    """Start forking a spare. Here, return it; in the spare, once its request came,
    return that (the spare exits instead if the master lets it go first).

    Raises:
        OSError: fork failed.
    """
    mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        gc.freeze()
        _flush()
        adoption = fork_adopted()
    except BaseException:
        mine.close()
        theirs.close()
        raise
    if adoption is not None:
        theirs.close()
        return Spare(adoption, mine), None
    try:  # the spare: it must never run on into the template's loop
        mine.close()
        ctl.close()
        _child.arm_parent_death_signal()
        name = _child.template_env.get("PYCLUSTER_NAME")
        if name:
            _child.process_title(f"pycluster spare [{name}]")
        rehearse()
        data, fds = _receive(theirs)
        theirs.close()
        if not data:
            exit_now(0)
        return None, (json.loads(data), fds)
    except BaseException:  # noqa: BLE001 - nothing to report to: end here
        exit_now(1)
        raise


def _refusal(request: Any, fds: list[int], *, failed: bool) -> str | None:
    """Why the template must not fork for *request*, or ``None``."""
    if not isinstance(request, dict) or not isinstance(request.get("env"), dict) or len(
        fds) not in (1, 3):
        return f"bad fork request ({len(fds)} fds)"
    return None if failed else _threads_alive("after importing the app")


def _become_worker(request: dict[str, Any], fds: list[int], target: Any,
                   failure: str | None) -> Any:
    """In a forked worker: take the environment, fds and id of a spawned worker, connect
    to the master as ``import pycluster`` does in one, then run the app."""
    os.setpgid(0, 0)  # its own process group, as a spawned worker
    ipc, *outputs = fds
    if outputs:
        for fd, std in zip(outputs, (1, 2), strict=True):
            os.dup2(fd, std)
            os.close(fd)
    take_env({str(k): str(v) for k, v in request["env"].items()})
    os.environ["PYCLUSTER_IPC_FD"] = str(ipc)
    _child.template_env.clear()
    worker = _child.setup()
    if worker is None:  # cannot happen: the request carries PYCLUSTER_WORKER_ID
        exit_now(BOOT_FAILURE)
        raise AssertionError
    pycluster.worker = worker
    pycluster.is_primary = pycluster.is_master = False
    pycluster.is_worker = True
    _child.run_setups(worker)
    if failure is not None:  # straight to the fd: a thread of the app may hold sys.stderr's lock
        os.write(2, failure.encode("utf-8", "replace") + b"\n")
        exit_now(BOOT_FAILURE)
    return target()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
