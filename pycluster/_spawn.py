"""Starting a worker: a fresh interpreter with its IPC socket passed as an inherited fd."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from typing import IO

from ._errors import SettingsError
from ._settings import Settings

__all__ = ["ENV_PREFIX", "main_command", "spawn"]

#: Every variable pycluster sets for a worker starts with this.
ENV_PREFIX = "PYCLUSTER_"
_OPTIONS_WITH_VALUE = {"-W", "-X", "--check-hash-based-pycs"}


def _split_orig_argv() -> tuple[list[str], list[str]]:
    """Split how this interpreter was started into (interpreter options, program)."""
    argv = list(getattr(sys, "orig_argv", [sys.executable, *sys.argv]))[1:]
    tail = len(sys.argv) - 1
    head = argv[: len(argv) - tail] if tail else argv
    i = 0
    while i < len(head):
        token = head[i]
        if token in _OPTIONS_WITH_VALUE:
            i += 2
            continue
        if token == "-" or not token.startswith("-") or token.startswith(("-c", "-m")):
            break
        i += 1
    return head[:i], head[i:]


def main_command(settings: Settings) -> list[str]:
    """Return the command line of a worker for *settings*.

    Raises:
        SettingsError: the master was not started from a script, ``-m`` or ``-c``, so
            there is no main program to re-run and neither ``exec`` nor ``target`` is set.
    """
    options, program = _split_orig_argv()
    args = list(sys.argv[1:] if settings.args is None else settings.args)
    if settings.target:
        return [sys.executable, *options, "-m", "pycluster._boot", settings.target, *args]
    if settings.exec:
        return [sys.executable, *options, settings.exec, *args]
    if not program or program == ["-"]:
        msg = (
            "there is no main program to re-run in the workers (the master runs "
            "interactively or from stdin); pass Master(exec='worker.py') or "
            "Master(target='package.module:function')"
        )
        raise SettingsError(msg)
    return [sys.executable, *options, *program, *args]


def spawn(
    settings: Settings,
    command: list[str],
    worker_id: int,
    env: dict[str, str],
    bind: list[tuple[int | str, ...]],
    setups: list[str],
) -> tuple[subprocess.Popen[bytes], socket.socket]:
    """Start one worker process; return it and the master's end of its IPC socketpair.

    *bind* is what the worker's ``pycluster.worker.bind`` lists (the master's bound
    addresses, port 0 replaced by the real port); *setups* are the ``module:function``
    hooks the worker calls as it starts (:meth:`Master.worker_setup`).
    """
    mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    child_env = {k: v for k, v in os.environ.items() if not k.startswith(ENV_PREFIX)}
    child_env.update(settings.env)
    child_env.update(env)
    child_env.update(
        {
            "PYCLUSTER_WORKER_ID": str(worker_id),
            "PYCLUSTER_IPC_FD": str(theirs.fileno()),
            "PYCLUSTER_MASTER_PID": str(os.getpid()),
            "PYCLUSTER_SERIALIZATION": settings.serialization,
            "PYCLUSTER_MAX_MESSAGE": str(settings.max_message_size),
            "PYCLUSTER_BIND": json.dumps(bind),
        }
    )
    if settings.name:
        child_env["PYCLUSTER_NAME"] = settings.name
    if setups:
        child_env["PYCLUSTER_SETUP"] = json.dumps(setups)
    out: int | IO[bytes] | None = subprocess.PIPE if settings.silent else None
    kwargs: dict[str, object] = {}
    if sys.version_info >= (3, 11):
        kwargs["process_group"] = 0  # Ctrl-C reaches the master only; it stops the workers
    else:
        kwargs["start_new_session"] = True
    if settings.uid is not None or settings.gid is not None:
        gid = settings.gid
        if gid is None:  # not root's group 0: the user's own primary group
            import pwd

            try:
                gid = pwd.getpwuid(settings.uid).pw_gid  # type: ignore[arg-type]
            except KeyError:
                gid = settings.uid
        kwargs["user"] = settings.uid
        kwargs["group"] = gid
        kwargs["extra_groups"] = []
    try:
        process = subprocess.Popen(
            command,
            env=child_env,
            cwd=settings.cwd,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=out,
            pass_fds=(theirs.fileno(),),
            **kwargs,  # type: ignore[call-overload]
        )
    except BaseException:
        mine.close()
        raise
    finally:
        theirs.close()
    return process, mine
