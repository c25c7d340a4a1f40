"""The master's listening sockets, shared with (or kept per slot for) the workers."""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import stat
from collections.abc import Iterable
from typing import Any

import attrs

from ._listen import numeric_host

__all__ = ["DEFAULT_BACKLOG", "Address", "Listeners"]

#: Accept-queue length used when ``listen()`` is not given one (the kernel caps it at
#: ``net.core.somaxconn``).
DEFAULT_BACKLOG = 2048
#: Longest unix socket name ``bind()`` takes (``sun_path`` is 108 bytes with its NUL).
_SUN_PATH_MAX = 107


@attrs.frozen
class Address:
    """Where a worker listens: the payload of ``listening`` events.

    ``port`` is the real port, also when port 0 was asked for. For a unix socket ``host``
    is the socket's absolute path and ``port`` is ``None``.
    """

    host: str | None
    port: int | None
    family: socket.AddressFamily


@attrs.define(eq=False)
class _Handle:
    sock: socket.socket
    address: Address
    workers: set[int] = attrs.field(factory=set)
    slot: int | None = None


class Listeners:
    """Binds listening sockets on behalf of workers and hands out their fds.

    With ``"shared"`` scheduling there is one socket per address, which every worker
    accepts on; the master keeps it open until :meth:`close` so connections queue while
    workers come and go. With ``"reuseport"`` each worker slot gets its own
    ``SO_REUSEPORT`` socket, kept while a worker holds that slot so its replacement
    inherits the queue.
    """

    def __init__(self, scheduling: str) -> None:
        self._reuseport = scheduling == "reuseport"
        self._handles: dict[tuple[Any, ...], _Handle] = {}
        self._zero_index: dict[tuple[int, str], int] = {}
        self._zero_ports: dict[tuple[str, int], int] = {}
        self._unix_paths: list[tuple[str, int, int]] = []  # path, st_dev, st_ino

    def listen(
        self,
        worker_id: int,
        slot: int,
        host: str | None,
        port: int | None,
        path: str | None,
        backlog: int,
    ) -> tuple[socket.socket, Address]:
        """Return the socket worker *worker_id* should accept on, binding it if needed.

        Raises:
            OSError: binding failed (``EADDRINUSE``, ``EACCES``, ...), or this worker
                already listens on that fixed address.
        """
        if path is not None:
            key: tuple[Any, ...] = ("unix", path)
        else:
            host = host or "0.0.0.0"
            assert port is not None
            if port == 0:
                index = self._zero_index.get((worker_id, host), 0)
                self._zero_index[worker_id, host] = index + 1
                key = (host, 0, index)
            else:
                key = (host, port)
            if self._reuseport:
                key = (*key, slot)
        handle = self._handles.get(key)
        if handle is None:
            handle = self._bind(key, host, port, path, backlog, slot)
            self._handles[key] = handle
        elif worker_id in handle.workers:
            raise OSError(errno.EADDRINUSE, os.strerror(errno.EADDRINUSE))
        handle.workers.add(worker_id)
        return handle.sock, handle.address

    def bind_all(self, addresses: Iterable[tuple[int | str, ...]]) -> list[tuple[int | str, ...]]:
        """Bind the master's ``bind`` addresses (``listen()`` arguments: ``(port, host)`` or
        ``(path,)``) before any worker asks; return them as workers get them, port 0
        replaced by the real port.

        Raises:
            OSError: an address cannot be bound; the message names it and the reason.
        """
        bound: list[tuple[int | str, ...]] = []
        for address in addresses:
            if len(address) == 1:
                path = str(address[0])
                self._prebind_named(path, None, None, path)
                bound.append(address)
                continue
            port, host = int(address[0]), str(address[1])
            where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
            real = self._prebind_named(where, numeric_host(host, port, where), port, None)
            bound.append((real, host))
        return bound

    def _prebind_named(self, where: str, host: str | None, port: int | None,
                       path: str | None) -> int:
        try:
            return self.prebind(host, port, path)
        except (OSError, ValueError) as exc:
            err = getattr(exc, "errno", None) or 0
            msg = f"cannot listen on {where}: {getattr(exc, 'strerror', None) or exc}"
            raise OSError(err, msg) from None

    def prebind(self, host: str | None, port: int | None, path: str | None) -> int:
        """Bind an address before any worker asks for it (the ``bind`` setting), so that a
        port in use fails at once, in the master. Returns the real port (0 for a path).

        A worker's ``listen()`` of the same address (the real port, for port 0) gets this
        socket; with ``"reuseport"`` it is slot 0's.

        Raises:
            OSError: binding failed (``EADDRINUSE``, ``EACCES``, ...).
        """
        if path is not None:
            key: tuple[Any, ...] = ("unix", path)
        else:
            assert host is not None and port is not None
            key = (host, port)
        if self._reuseport:
            key = (*key, 0)
        handle = self._bind(key, host, port, path, DEFAULT_BACKLOG, 0)
        if path is None and port == 0:  # file it under its real port, as workers ask
            key = (host, handle.address.port, 0)[: len(key)]
        self._handles[key] = handle
        return handle.address.port or 0

    def _bind(
        self,
        key: tuple[Any, ...],
        host: str | None,
        port: int | None,
        path: str | None,
        backlog: int,
        slot: int,
    ) -> _Handle:
        if path is not None:
            name = _unix_name(path)
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.bind(name)
                sock.listen(backlog)
                sock.setblocking(False)  # see SharedSocket: the flag is shared
            except BaseException:
                sock.close()
                raise
            made = os.stat(path)
            self._unix_paths.append((path, made.st_dev, made.st_ino))
            return _Handle(sock, Address(path, None, socket.AF_UNIX))
        assert host is not None and port is not None
        group = key[:3] if port == 0 else None
        if self._reuseport and group is not None:
            port = self._zero_ports.get(group, 0)  # every slot joins the first slot's port
        family, sockaddr = _resolve(host, port)
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if self._reuseport:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind(sockaddr)
            sock.listen(backlog)
            sock.setblocking(False)  # see SharedSocket: the flag is shared
        except BaseException:
            sock.close()
            raise
        real_port = sock.getsockname()[1]
        if self._reuseport and group is not None:
            self._zero_ports.setdefault(group, real_port)
        return _Handle(sock, Address(host, real_port, family), slot=slot)

    def release(self, worker_id: int) -> None:
        """Forget *worker_id*'s use of every socket (it exited)."""
        for handle in self._handles.values():
            handle.workers.discard(worker_id)
        for key in [k for k in self._zero_index if k[0] == worker_id]:
            del self._zero_index[key]

    def release_slot(self, slot: int) -> None:
        """Close the ``reuseport`` sockets of a slot no worker holds any more."""
        for key, handle in list(self._handles.items()):
            if handle.slot == slot and self._reuseport and not handle.workers:
                del self._handles[key]
                handle.sock.close()

    def close(self) -> None:
        """Close every socket and remove the unix socket files the master made."""
        for handle in self._handles.values():
            handle.sock.close()
        self._handles.clear()
        for path, dev, ino in self._unix_paths:
            # Only the socket file this master made: a worker may have swapped a directory
            # on the way for a symlink, and a root master must not unlink what it points to.
            with contextlib.suppress(OSError, ValueError):
                now = os.lstat(path)
                if stat.S_ISSOCK(now.st_mode) and (now.st_dev, now.st_ino) == (dev, ino):
                    os.unlink(path)
        self._unix_paths.clear()


def _unix_name(path: str) -> str:
    """Return the name to bind *path* by: itself, or (as Node does) its shorter form
    relative to this process's cwd when the absolute one does not fit in ``sun_path``.

    Raises:
        OSError: ``ENAMETOOLONG``, when neither form fits.
    """
    if len(os.fsencode(path)) <= _SUN_PATH_MAX:
        return path
    relative = os.path.relpath(path)
    if len(os.fsencode(relative)) <= _SUN_PATH_MAX:
        return relative
    msg = f"unix socket path too long ({len(os.fsencode(path))} bytes; at most {_SUN_PATH_MAX})"
    raise OSError(errno.ENAMETOOLONG, msg)


def _resolve(host: str, port: int) -> tuple[socket.AddressFamily, Any]:
    """Return the family and address to bind *host*:*port* by.

    Only numeric hosts: the worker resolves names before it asks, so the master's loop
    never waits on DNS.

    Raises:
        OSError: the name does not resolve (``gaierror``), or it is not a host name at
            all: ``EINVAL`` for a NUL (getaddrinfo would silently cut the name there) or
            a name the IDNA codec refuses (a label over 63 bytes).
    """
    if "\0" in host:
        msg = f"host name {host!r} contains a NUL character"
        raise OSError(errno.EINVAL, msg)
    try:
        infos = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE | socket.AI_NUMERICHOST
        )
    except ValueError as exc:  # UnicodeError from the IDNA codec
        msg = f"host name {host!r} is not valid: {exc}"
        raise OSError(errno.EINVAL, msg) from None
    family, _, _, _, sockaddr = infos[0]
    return family, sockaddr
