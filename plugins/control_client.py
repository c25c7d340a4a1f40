"""The client side of the ``control`` plugin: where control sockets live, and how a
shell talks to one (``pycluster status|reload|scale|stop|list``; also usable from Python).

It needs neither asyncio nor a master, so the ``pycluster`` client commands start fast.
"""

from __future__ import annotations

import json
import os
import re
import socket
import stat
import struct
from typing import Any

from pycluster import PyclusterError, SettingsError, StateError

__all__ = [
    "MAX_LINE",
    "ControlError",
    "call",
    "check_name",
    "clusters",
    "find",
    "probe",
    "runtime_dir",
    "socket_path",
]

#: Longest request line the master reads (bytes); a longer one is answered with an error.
MAX_LINE = 64 * 1024
#: Most workers ``scale`` accepts (a typo like ``scale 10000`` should not fork forever).
MAX_SCALE = 1024
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_SUFFIX = ".sock"
_CREDS = struct.Struct("3i")


class ControlError(PyclusterError):
    """A control request failed: no such cluster, no answer, refused, or an error answer.

    :attr:`stale` is true when nothing listens on the socket (its master is gone).
    """

    def __init__(self, message: str, *, stale: bool = False) -> None:
        super().__init__(message)
        self.stale = stale


# -- where the sockets live ----------------------------------------------------------------


def runtime_dir(*, create: bool = True) -> str:
    """Return this user's control directory, made (mode 0700) if *create* and missing.

    Raises:
        StateError: it is not a directory owned by this user with no group or other
            permissions (someone else could plant or read sockets there), or it cannot
            be made.
    """
    uid = os.getuid()
    base = os.environ.get("XDG_RUNTIME_DIR", "")
    if base and os.path.isabs(base) and os.path.isdir(base):
        path = os.path.join(base, "pycluster")
    else:
        path = f"/tmp/pycluster-{uid}"
    if create:
        try:
            os.mkdir(path, 0o700)
        except FileExistsError:
            pass
        except OSError as exc:
            msg = f"cannot make the control directory {path}: {exc.strerror}"
            raise StateError(msg) from None
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return path  # nothing runs yet (only when not creating)
    if not stat.S_ISDIR(st.st_mode):
        why = "it is not a directory"
    elif st.st_uid != uid:
        why = f"it belongs to uid {st.st_uid}, not to this user (uid {uid})"
    elif st.st_mode & 0o077:
        why = f"its mode is {stat.S_IMODE(st.st_mode):04o}; group and others must have none"
    else:
        return path
    msg = (f"refusing the control directory {path}: {why}; it must be this user's, mode "
           f"0700 (fix: chmod 700 {path}, or remove it)")
    raise StateError(msg)


def check_name(name: str) -> str:
    """Return *name* if it can name a cluster's socket, else raise SettingsError."""
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        msg = (f"cluster name {name!r} must be 1-64 letters, digits, '.', '_' or '-', "
               "starting with a letter or digit")
        raise SettingsError(msg)
    return name


def socket_path(name: str, directory: str | None = None) -> str:
    """The control socket of the cluster named *name* (in :func:`runtime_dir`)."""
    check_name(name)
    return os.path.join(runtime_dir() if directory is None else directory, name + _SUFFIX)


# -- the client side -----------------------------------------------------------------------


def call(path: str, request: dict[str, Any], timeout: float | None = 10.0) -> Any:
    """Send *request* to the control socket at *path* and return the answer's result.

    Args:
        timeout: seconds for connecting and for the answer (``None``: no limit).

    Raises:
        ControlError: nothing listens there (``stale``), no answer in time, the
            connection closed, or the master answered with an error (its message).
    """
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        try:
            sock.connect(path)
        except (ConnectionRefusedError, FileNotFoundError) as exc:
            msg = f"no master listens on {path} ({exc.strerror})"
            raise ControlError(msg, stale=True) from None
        except TimeoutError:
            msg = f"the master behind {path} did not accept within {timeout:g} s"
            raise ControlError(msg) from None
        except OSError as exc:
            msg = f"cannot connect to {path}: {exc.strerror}"
            raise ControlError(msg) from None
        try:
            try:
                sock.sendall(json.dumps(request).encode() + b"\n")
            except (BrokenPipeError, ConnectionResetError):
                pass  # it answered (a refusal) and closed before reading: read that
            data = b""
            while not data.endswith(b"\n"):
                chunk = sock.recv(1 << 16)
                if not chunk:
                    msg = f"the master behind {path} closed the connection without an answer"
                    raise ControlError(msg)
                data += chunk
        except TimeoutError:
            msg = f"no answer from the master behind {path} within {timeout:g} s"
            raise ControlError(msg) from None
        except OSError as exc:
            msg = f"the connection to {path} failed: {exc.strerror or exc}"
            raise ControlError(msg) from None
    finally:
        sock.close()
    try:
        answer = json.loads(data)
    except ValueError:
        msg = f"the answer from {path} is not JSON: {data[:80]!r}"
        raise ControlError(msg) from None
    if not isinstance(answer, dict) or not isinstance(answer.get("ok"), bool):
        msg = f"the answer from {path} is not a control answer: {data[:80]!r}"
        raise ControlError(msg)
    if not answer["ok"]:
        raise ControlError(str(answer.get("error")))
    return answer.get("result")


def probe(path: str, timeout: float = 2.0) -> dict[str, Any] | None:
    """Ask the socket at *path* who it is: ``{"name", "pid", "workers", ...}``.

    Returns ``None`` when no master is there; a stale socket (its master died) is
    removed on the way. A master that accepts but does not answer gives a dict with
    ``"error"``.
    """
    try:
        before = os.lstat(path)
    except FileNotFoundError:
        return None
    if not stat.S_ISSOCK(before.st_mode):
        return None
    try:
        hello = call(path, {"verb": "hello"}, timeout)
    except ControlError as exc:
        if exc.stale:
            _unlink_if_same(path, before.st_ino)
            return None
        name = os.path.basename(path)[: -len(_SUFFIX)]
        return {"name": name, "pid": None, "socket": path, "error": str(exc)}
    if not isinstance(hello, dict):
        return None
    return {**hello, "socket": path}


def clusters(timeout: float = 2.0) -> list[dict[str, Any]]:
    """This user's running clusters, by name (see :func:`probe`); stale sockets go."""
    directory = runtime_dir(create=False)
    try:
        entries = sorted(os.listdir(directory))
    except FileNotFoundError:
        return []
    found = []
    for entry in entries:
        if entry.endswith(_SUFFIX):
            info = probe(os.path.join(directory, entry), timeout)
            if info is not None:
                found.append(info)
    return found


def find(name: str | None = None, timeout: float = 2.0) -> dict[str, Any]:
    """The running cluster named *name*, or the only one when *name* is ``None``.

    Returns its :func:`probe` answer (``"socket"`` is the path to :func:`call`).

    Raises:
        ControlError: no such cluster, none or several running (the message lists them),
            or it does not answer.
    """
    if name is not None:
        path = socket_path(name, runtime_dir(create=False))
        info = probe(path, timeout)
        if info is None:
            others = ", ".join(c["name"] for c in clusters(timeout))
            msg = (f"no cluster named {name!r} is running"
                   + (f" (running: {others})" if others else ""))
            raise ControlError(msg)
    else:
        running = clusters(timeout)
        if not running:
            msg = ("no pycluster cluster of this user is running (no live socket in "
                   f"{runtime_dir(create=False)})")
            raise ControlError(msg)
        if len(running) > 1:
            names = ", ".join(f"{c['name']} (pid {c['pid']})" for c in running)
            msg = f"{len(running)} clusters are running: {names}; choose one with --name NAME"
            raise ControlError(msg)
        info = running[0]
    if "error" in info:
        raise ControlError(str(info["error"]))
    return info


def _unlink_if_same(path: str, inode: int) -> None:
    """Remove *path* if it is still the file with *inode* (not a newer master's socket)."""
    try:
        if os.lstat(path).st_ino == inode:
            os.unlink(path)
    except FileNotFoundError:
        pass


def _is_pycluster_master(pid: int) -> bool:
    """Whether *pid* is alive and looks like a pycluster master (its title or argv)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = f.read()
        with open(f"/proc/{pid}/comm", "rb") as f:
            comm = f.read()
    except OSError:
        return False
    return b"pycluster" in argv or comm.startswith(b"pyc-master")
