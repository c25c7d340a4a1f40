"""The worker's side of ``listen()``: the request it sends, and the socket it gets back."""

from __future__ import annotations

import errno
import os
import socket
from typing import Any

from ._acts import check_listen
from ._errors import SettingsError

__all__ = ["SharedSocket", "listen_request"]


class SharedSocket(socket.socket):
    """A listening socket the master bound and shares with this worker.

    It is a plain :class:`socket.socket` except that :meth:`listen` keeps the master's
    backlog: servers such as asyncio call ``listen(100)`` on a socket they are given,
    which would shrink the accept queue every worker shares.

    It is non-blocking. Every process holding it shares one open file, so one blocking
    flag: when a connection arrives, every worker waiting for it wakes up, and those
    that lose the race must get ``BlockingIOError`` from ``accept()`` instead of blocking
    there (``socketserver`` then just waits again; asyncio expects it). A server that
    wants a plain blocking ``accept()`` loop calls ``setblocking(True)`` in every worker.
    """

    __slots__ = ()

    def listen(self, backlog: int = 0, /) -> None:
        """Do nothing: the socket is already listening with the master's backlog."""


def listen_request(
    port: int | str | os.PathLike[str] | None,
    host: str,
    backlog: int,
    bind: list[tuple[Any, ...]],
) -> tuple[dict[str, Any], str]:
    """Build the fields of a ``listen`` request, and the address as a person writes it.

    With no *port*, the first of the master's *bind* addresses is used. A str or path
    *port* is a unix socket path (made absolute here, in the worker's cwd); a host name
    is resolved here, so the master's loop never waits on DNS.

    Raises:
        SettingsError: a bad *port*, *host* or *backlog*, or no port and no *bind*.
        OSError: the host name does not resolve; the message names the address.
    """
    if port is None:
        if not bind:
            msg = "listen() needs a port: none was given and the master has no bind setting"
            raise SettingsError(msg)
        port, host = (*bind[0], host)[:2]
    if isinstance(port, (str, os.PathLike)):
        if isinstance(port, str) and (not port.strip() or port.strip().isdigit()):
            msg = (
                f"port={port!r} is not a unix socket path: pass an int for a TCP port, "
                "or a path such as './app.sock' (a pathlib.Path for any name)"
            )
            raise SettingsError(msg)
        path = os.path.abspath(os.fspath(port))
        if "\0" in path:
            msg = f"port={port!r}: a unix socket path cannot contain a NUL character"
            raise SettingsError(msg)
        check_listen(None, None, path, backlog)
        return {"path": path, "backlog": backlog}, path
    check_listen(host, port, None, backlog)
    where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return {"host": numeric_host(host, port, where), "port": port, "backlog": backlog}, where


def numeric_host(host: str, port: int, where: str) -> str:
    """Resolve *host* to the numeric address to bind.

    A numeric address is only rewritten the canonical way (``0:0::1`` as ``::1``), not
    resolved: the first ``getaddrinfo()`` of a process costs milliseconds (it imports the
    IDNA codec), which a forked worker would pay on its way to listening.

    Raises:
        OSError: the name does not resolve; the message names the address.
    """
    for family in (socket.AF_INET, socket.AF_INET6):
        try:
            return socket.inet_ntop(family, socket.inet_pton(family, host))  # canonical
        except (OSError, ValueError):
            continue
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise socket.gaierror(exc.errno, f"{exc.strerror} (listening on {where})") from None
    except ValueError as exc:  # UnicodeError from the IDNA codec
        raise OSError(errno.EINVAL, f"host name {host!r} is not valid: {exc}") from None
    return str(infos[0][4][0])
