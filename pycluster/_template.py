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
4. answers each fork request (the worker's environment as JSON; its IPC socket and, for
   ``silent=True``, its stdout and stderr pipes as ``SCM_RIGHTS`` fds) with the new
   worker's pid. The worker is forked twice so that it becomes the master's child
   (the master is a ``PR_SET_CHILD_SUBREAPER``): the master reaps it and watches it
   with a pidfd as it does a spawned one.

The template never starts a thread, an event loop or a socket of its own; it exits when
the master closes the control socket (a reload retires it) or dies.
"""

from __future__ import annotations

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
from pycluster._reader import exit_now

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
    """Answer fork requests until the master goes away (then exit); return in a worker.

    A *failed* template forks too (even with a thread alive): its workers only connect,
    print why and exit with BOOT_FAILURE.
    """
    while True:
        try:
            data, fds, _flags, _addr = socket.recv_fds(ctl, MAX_REQUEST, 8)
        except OSError:
            data, fds = b"", []
        if not data:
            for fd in fds:
                os.close(fd)
            exit_now(0)  # retired, or the master died
        try:
            request = json.loads(data)
            why = _refusal(request, fds, failed=failed)
            if why is None:
                gc.freeze()
                _flush()
                pid = _double_fork()
        except Exception as exc:  # noqa: BLE001 - told to the master, which raises it
            why = str(exc)
        if why is not None:
            for fd in fds:
                os.close(fd)
            ctl.send(json.dumps({"error": why}).encode())
            continue
        if pid == 0:
            return request, fds
        for fd in fds:
            os.close(fd)
        ctl.send(json.dumps({"pid": pid}).encode())


def _refusal(request: Any, fds: list[int], *, failed: bool) -> str | None:
    """Why the template must not fork for *request*, or ``None``."""
    if not isinstance(request, dict) or not isinstance(request.get("env"), dict) or len(
        fds) not in (1, 3):
        return f"bad fork request ({len(fds)} fds)"
    return None if failed else _threads_alive("after importing the app")


def _double_fork() -> int:
    """Fork a grandchild that the master adopts; return its pid here, 0 in it.

    The middle process exits at once, so the worker is reparented to the nearest
    subreaper: the master. The worker waits for that (the middle's pidfd turns readable
    only once its children have been handed over), so its parent is the master when it
    arms ``PR_SET_PDEATHSIG`` and checks its parent's pid.
    """
    report_r, report_w = os.pipe()
    try:
        middle = os.fork()
    except BaseException:
        os.close(report_r)
        os.close(report_w)
        raise
    if middle == 0:
        code = 1
        try:
            os.close(report_r)
            me = os.getpid()
            pid = os.fork()
            if pid == 0:
                os.close(report_w)
                _until_gone(me)
                return 0
            os.write(report_w, b"%d" % pid)
            code = 0
        except BaseException:  # noqa: BLE001, S110 - the template sees no pid: an error
            pass
        os._exit(code)
    os.close(report_w)
    try:
        chunks = []
        while chunk := os.read(report_r, 32):
            chunks.append(chunk)
        os.waitpid(middle, 0)
    finally:
        os.close(report_r)
    if not chunks:
        msg = "the fork server could not fork a worker (fork failed in its middle process)"
        raise OSError(msg)
    return int(b"".join(chunks))


def _until_gone(pid: int) -> None:
    """Wait until process *pid* (this one's parent, the middle one) has exited."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return  # exited and reaped already
    try:
        select.select([fd], [], [])
    finally:
        os.close(fd)


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
    os.environ.clear()
    os.environ.update({str(k): str(v) for k, v in request["env"].items()})
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
