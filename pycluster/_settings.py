"""The master's settings: one frozen attrs class, validated with messages that teach."""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import attrs

from ._errors import SettingsError
from ._protocol import DEFAULT_MAX_MESSAGE

__all__ = ["Settings"]

SCHEDULING = ("shared", "reuseport")
#: A ``module:function`` (or ``module:attr.attr``) reference, as ``target`` and APP take it.
TARGET = re.compile(r"^[A-Za-z_][\w]*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
SERIALIZATION = ("json", "pickle")


def _path(name: str, value: Any) -> str:
    """Return ``os.fspath(value)``, or raise SettingsError naming *name* and *value*."""
    try:
        path: str = os.fspath(value)
    except TypeError:
        msg = f"{name}={value!r} must be a path (a str or os.PathLike)"
        raise SettingsError(msg) from None
    return path


def _exec(value: str | os.PathLike[str] | None) -> str | None:
    if value is None:
        return None
    path = _path("exec", value)
    if not os.path.isfile(path):
        msg = f"exec={path!r} is not a file; pass the path of the Python script workers run"
        raise SettingsError(msg)
    return os.path.abspath(path)


def _target(value: str | Callable[..., Any] | None) -> str | None:
    if value is None:
        return None
    if callable(value):
        module = getattr(value, "__module__", None)
        qualname = getattr(value, "__qualname__", "")
        if not module or "<" in qualname:
            msg = (
                f"target={value!r} cannot be found again by a fresh interpreter; "
                "pass a module-level function or a 'package.module:function' string"
            )
            raise SettingsError(msg)
        value = f"{module}:{qualname}"
    if not isinstance(value, str) or not TARGET.match(value):
        msg = f"target={value!r} is not of the form 'package.module:function'"
        raise SettingsError(msg)
    if value.partition(":")[0] == "__main__":
        msg = (
            f"target={value!r} is in the main script, which a worker cannot import by that "
            "name; move the function into a module, or pass exec= the script instead"
        )
        raise SettingsError(msg)
    return value


def _args(value: Any) -> tuple[str, ...] | None:
    if value is None:
        return None
    items = None
    if isinstance(value, Iterable) and not isinstance(value, (str, bytes)):
        items = tuple(value)  # once: a generator is read only once
    if items is None or not all(isinstance(a, str) for a in items):
        msg = f"args={value!r} must be a list of strings, e.g. args=['--port', '8000']"
        raise SettingsError(msg)
    return items


def check_env(value: Mapping[str, str] | None, name: str = "env") -> dict[str, str]:
    """Return *value* as a dict of str → str, or raise SettingsError naming the bad item."""
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        msg = f"{name}={value!r} must be a mapping of strings to strings"
        raise SettingsError(msg)
    for key, val in value.items():
        if not isinstance(key, str) or not isinstance(val, str) or not key or "=" in key:
            msg = f"{name} item {key!r}: {val!r} must be a non-empty str name (no '=') and a str"
            raise SettingsError(msg)
    return dict(value)


def parse_address(text: str) -> tuple[int | str, ...]:
    """Parse ``HOST:PORT``, ``[IPV6]:PORT``, ``:PORT``/``PORT`` (all interfaces) or
    ``unix:PATH`` into the arguments of ``pycluster.worker.listen()``: ``(port, host)`` or
    ``(path,)``.

    Raises:
        SettingsError: *text* is none of those.
    """
    if not isinstance(text, str):
        msg = (
            f"bind address {text!r} must be a string like '127.0.0.1:8000' "
            "or 'unix:/run/app.sock'"
        )
        raise SettingsError(msg)
    if text.startswith("unix:") and len(text) > 5:
        return (os.path.abspath(text[5:]),)
    host, sep, port = text.rpartition(":")
    if not sep:
        host, port = "", text
    bracketed = len(host) > 2 and host.startswith("[") and host.endswith("]")
    host = host[1:-1] if bracketed else host
    unbracketed = not bracketed and any(c in host for c in ":[]")
    if unbracketed or not (port.isascii() and port.isdigit()) or int(port) > 65535:
        msg = (
            f"bind address {text!r} is not HOST:PORT (port 0-65535), :PORT or unix:PATH, "
            "e.g. '127.0.0.1:8000'"
        )
        if unbracketed:
            msg += " (an IPv6 host goes in brackets: '[::1]:8000')"
        raise SettingsError(msg)
    return (int(port), host or "0.0.0.0")


def _bind(value: Any) -> tuple[tuple[int | str, ...], ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        value = [value]
    if isinstance(value, bytes) or not isinstance(value, Iterable):
        msg = f"bind={value!r} must be an address such as '127.0.0.1:8000', or a list of them"
        raise SettingsError(msg)
    return tuple(parse_address(v) for v in value)


def _cwd(value: str | os.PathLike[str] | None) -> str | None:
    if value is None:
        return None
    path = _path("cwd", value)
    if not os.path.isdir(path):
        msg = f"cwd={path!r} is not a directory"
        raise SettingsError(msg)
    return os.path.abspath(path)


def _choice(name: str, choices: tuple[str, ...]) -> Callable[[Any], str]:
    def convert(value: Any) -> str:
        if value not in choices:
            msg = f"{name}={value!r} is not one of {', '.join(map(repr, choices))}"
            if name == "scheduling" and value == "rr":
                msg += (
                    " ('rr' is not offered: 'shared' loses no queued connection when a "
                    "worker dies, and 'reuseport' spreads connections evenly)"
                )
            raise SettingsError(msg)
        return str(value)

    return convert


def _flag(value: Any) -> bool:
    if not isinstance(value, bool):
        msg = f"silent={value!r} must be True or False"
        raise SettingsError(msg)
    return value


def _seconds(value: Any) -> float:
    try:
        bad = isinstance(value, bool) or not isinstance(value, (int, float)) or not (
            value >= 0 and math.isfinite(value)
        )
    except OverflowError:  # an int too large for a float
        bad = True
    if bad:
        msg = f"kill_timeout={value!r} must be a number of seconds >= 0"
        raise SettingsError(msg)
    return float(value)


def _size(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1024 <= value < 2**32:
        msg = (
            f"max_message_size={value!r} must be an int of at least 1024 bytes and below "
            "2**32 (the frame header's length field)"
        )
        raise SettingsError(msg)
    return value


def _ident(kind: str) -> Callable[[Any], int | None]:
    def convert(value: Any) -> int | None:
        if value is None:
            return None
        if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            return value
        if isinstance(value, str) and value:
            if kind == "uid":
                import pwd

                try:
                    return pwd.getpwnam(value).pw_uid
                except KeyError:
                    pass
            else:
                import grp

                try:
                    return grp.getgrnam(value).gr_gid
                except KeyError:
                    pass
        msg = f"{kind}={value!r} is not a known {'user' if kind == 'uid' else 'group'} name or id"
        raise SettingsError(msg)

    return convert


def _name(value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not _NAME.match(value):
        msg = (
            f"name={value!r} must be 1-64 letters, digits, '.', '_' or '-' (starting with a "
            "letter or digit), e.g. 'shop-api'"
        )
        raise SettingsError(msg)
    return value


def _scheduling(value: Any) -> str:
    return _choice("scheduling", SCHEDULING)(value)


def _serialization(value: Any) -> str:
    return _choice("serialization", SERIALIZATION)(value)


def _uid(value: Any) -> int | None:
    return _ident("uid")(value)


def _gid(value: Any) -> int | None:
    return _ident("gid")(value)


@attrs.frozen
class Settings:
    """How a master starts its workers. Every field is checked when the master is made.

    Args:
        exec: path of the script workers run. Default: re-run the main program exactly as
            it was started (``sys.orig_argv``), so ``python app.py`` and ``python -m pkg``
            both work.
        target: instead of a script, a ``"package.module:function"`` (or a module-level
            function) each worker imports and calls.
        args: command-line arguments for workers (default: the master's own).
        env: variables added to every worker's environment.
        cwd: directory workers start in (default: the master's).
        silent: capture worker stdout/stderr in the master (``output`` events) instead of
            letting them share the master's.
        scheduling: ``"shared"`` (every worker accepts on one socket) or ``"reuseport"``
            (one ``SO_REUSEPORT`` socket per worker slot, kept for its replacement).
        serialization: ``"json"`` or ``"pickle"``; pickle lets a worker run code in the
            master, so only use it when you trust the workers.
        kill_timeout: seconds a disconnecting or stopping worker gets before SIGKILL.
        uid: user (name or id) workers run as.
        gid: group (name or id) workers run as; with either, supplementary groups are
            dropped.
        max_message_size: largest IPC message in bytes, in both directions.
        bind: addresses workers listen on when they call ``pycluster.worker.listen()``
            with no port: ``"HOST:PORT"``, ``":PORT"`` or ``"unix:PATH"`` (one or a list).
            The master binds them before it forks the first worker.
        name: the cluster's name: processes are titled ``pycluster master [NAME]`` and
            ``pycluster worker N [NAME]`` in ``ps`` (default: no title).
    """

    exec: str | None = attrs.field(default=None, converter=_exec)
    target: str | None = attrs.field(default=None, converter=_target)
    args: tuple[str, ...] | None = attrs.field(default=None, converter=_args)
    env: dict[str, str] = attrs.field(factory=dict, converter=check_env)
    cwd: str | None = attrs.field(default=None, converter=_cwd)
    silent: bool = attrs.field(default=False, converter=_flag)
    scheduling: str = attrs.field(default="shared", converter=_scheduling)
    serialization: str = attrs.field(default="json", converter=_serialization)
    kill_timeout: float = attrs.field(default=30.0, converter=_seconds)
    uid: int | None = attrs.field(default=None, converter=_uid)
    gid: int | None = attrs.field(default=None, converter=_gid)
    max_message_size: int = attrs.field(default=DEFAULT_MAX_MESSAGE, converter=_size)
    bind: tuple[tuple[int | str, ...], ...] = attrs.field(default=(), converter=_bind)
    name: str | None = attrs.field(default=None, converter=_name)

    def __attrs_post_init__(self) -> None:
        if self.exec and self.target:
            msg = f"pass exec= or target=, not both (exec={self.exec!r}, target={self.target!r})"
            raise SettingsError(msg)

    @classmethod
    def make(cls, settings: Mapping[str, Any]) -> Settings:
        """Build settings from keyword arguments, naming any unknown one."""
        known = {f.name for f in attrs.fields(cls)}
        unknown = sorted(set(settings) - known)
        if unknown:
            msg = f"unknown setting {unknown[0]!r}; the settings are: {', '.join(sorted(known))}"
            raise SettingsError(msg)
        return cls(**settings)
