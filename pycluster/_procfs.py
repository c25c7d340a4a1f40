"""What Linux's ``/proc`` says about a process: children, state, memory, CPU, fds, sockets.

A function about one process returns ``None`` (or an empty collection) once that process
is gone, so polling a worker that dies meanwhile gives an answer, not an exception. The
``parse_*`` functions are the pure part: each takes the text of one file or one line.

This module imports nothing but the standard library and nothing from the rest of
pycluster, so a benchmark can load the file alone without importing the package.
"""

from __future__ import annotations

import os
from typing import NamedTuple

__all__ = [
    "TCP_ESTABLISHED",
    "TCP_LISTEN",
    "Stat",
    "TcpSocket",
    "children",
    "cmdline",
    "cpu_seconds",
    "fd_count",
    "held_connections",
    "inet_inodes",
    "listening_ports",
    "live_children",
    "open_fds",
    "parse_rss_kib",
    "parse_stat",
    "parse_tcp_line",
    "parse_unix_line",
    "rss_kib",
    "socket_inodes",
    "state",
    "tcp_sockets",
    "unix_sockets",
    "zombies",
]

#: TCP states as ``/proc/net/tcp`` writes them (two hex digits).
TCP_ESTABLISHED = "01"
TCP_LISTEN = "0A"

_TCP_TABLES = ("/proc/net/tcp", "/proc/net/tcp6")
_INET_TABLES = (*_TCP_TABLES, "/proc/net/udp", "/proc/net/udp6", "/proc/net/raw",
                "/proc/net/raw6")


class Stat(NamedTuple):
    """The fields of ``/proc/PID/stat`` that pycluster reads."""

    comm: str
    """The command name (at most 15 bytes, as the kernel keeps it)."""
    state: str
    """One letter: ``R`` running, ``S`` sleeping, ``T`` stopped, ``Z`` zombie…"""
    utime: int
    """User CPU time, in clock ticks."""
    stime: int
    """System CPU time, in clock ticks."""


class TcpSocket(NamedTuple):
    """One row of ``/proc/net/tcp`` or ``/proc/net/tcp6``."""

    port: int
    """The local port."""
    state: str
    """The state code, e.g. :data:`TCP_LISTEN` or :data:`TCP_ESTABLISHED`."""
    inode: int
    """The socket's inode, as in a ``socket:[INODE]`` fd link."""


# -- parsing (pure) ------------------------------------------------------------------------


def parse_stat(text: str) -> Stat:
    """Parse the text of ``/proc/PID/stat``.

    The command name is the second field, in parentheses, and may itself hold spaces and
    parentheses: it runs from the first ``(`` to the last ``)``.

    Raises:
        ValueError: *text* is not a stat line.
    """
    start, end = text.find("("), text.rfind(")")
    fields = text[end + 1 :].split()
    if start < 0 or end < start or len(fields) < 13:
        msg = f"not a /proc/PID/stat line: {text[:80]!r}"
        raise ValueError(msg)
    return Stat(text[start + 1 : end], fields[0], int(fields[11]), int(fields[12]))


def parse_rss_kib(status: str) -> int | None:
    """Return the ``VmRSS`` (KiB) in the text of ``/proc/PID/status``, or ``None`` if it
    has none (a zombie or a kernel thread)."""
    for line in status.splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return None


def parse_tcp_line(line: str) -> TcpSocket:
    """Parse one row (not the heading) of ``/proc/net/tcp`` or ``/proc/net/tcp6``.

    Raises:
        ValueError: *line* is not such a row.
    """
    parts = line.split()
    try:
        return TcpSocket(int(parts[1].rsplit(":", 1)[1], 16), parts[3], int(parts[9]))
    except (IndexError, ValueError):
        msg = f"not a /proc/net/tcp row: {line[:80]!r}"
        raise ValueError(msg) from None


def parse_unix_line(line: str) -> tuple[int, str]:
    """Parse one row (not the heading) of ``/proc/net/unix`` into ``(inode, path)``.

    The path is ``""`` for an unnamed socket, starts with ``@`` for an abstract one, and
    is kept whole when it holds spaces.

    Raises:
        ValueError: *line* is not such a row.
    """
    parts = line.split(maxsplit=7)
    try:
        inode = int(parts[6])
    except (IndexError, ValueError):
        msg = f"not a /proc/net/unix row: {line[:80]!r}"
        raise ValueError(msg) from None
    return inode, parts[7].rstrip("\n") if len(parts) > 7 else ""


# -- one process ---------------------------------------------------------------------------


def _read(path: str) -> str | None:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read()
    except OSError:  # gone (ENOENT, ESRCH), or not ours to read
        return None


def children(pid: int) -> list[int]:
    """Return the direct children of *pid* (from every thread's ``children`` file)."""
    found: list[int] = []
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return found
    for tid in tids:
        text = _read(f"/proc/{pid}/task/{tid}/children")
        if text:
            found.extend(int(p) for p in text.split())
    return found


def state(pid: int) -> str | None:
    """Return the one-letter state of *pid* (see :attr:`Stat.state`), ``None`` once it
    is gone (reaped)."""
    text = _read(f"/proc/{pid}/stat")
    return None if text is None else parse_stat(text).state


def live_children(pid: int) -> list[int]:
    """Return the children of *pid* that are not zombies."""
    return [c for c in children(pid) if state(c) not in (None, "Z")]


def zombies(pid: int) -> set[int]:
    """Return the children of *pid* that have exited and are not reaped yet."""
    return {c for c in children(pid) if state(c) == "Z"}


def cmdline(pid: int) -> list[str]:
    """Return the command line of *pid*, ``[]`` once it is gone (or for a zombie)."""
    text = _read(f"/proc/{pid}/cmdline")
    if not text:
        return []
    args = text.split("\0")
    if args[-1] == "":  # the NUL after the last argument (a process that set its title
        args.pop()  # may have none)
    return args


def rss_kib(pid: int) -> int | None:
    """Return the resident set size of *pid* in KiB, ``None`` once it is gone or a zombie."""
    text = _read(f"/proc/{pid}/status")
    return None if text is None else parse_rss_kib(text)


def cpu_seconds(pid: int) -> float | None:
    """Return the user + system CPU seconds *pid* has used, ``None`` once it is gone."""
    text = _read(f"/proc/{pid}/stat")
    if text is None:
        return None
    stat = parse_stat(text)
    return (stat.utime + stat.stime) / os.sysconf("SC_CLK_TCK")


def fd_count(pid: int) -> int | None:
    """Return how many fds *pid* has open, ``None`` once it is gone (for this process,
    the one that lists them is counted too)."""
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None


def open_fds(pid: int) -> dict[int, str]:
    """Return what each open fd of *pid* is (``socket:[INODE]``, ``pipe:[INODE]``, a
    path…), by fd; ``{}`` once it is gone. An fd closed while this reads is left out."""
    found: dict[int, str] = {}
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return found
    for fd in fds:
        try:
            found[int(fd)] = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            pass
    return found


def socket_inodes(pid: int) -> set[int]:
    """Return the inodes of the sockets *pid* has open."""
    return {int(link[8:-1]) for link in open_fds(pid).values() if link.startswith("socket:[")}


# -- sockets of the whole machine ---------------------------------------------------------


def _rows(table: str) -> list[str]:
    text = _read(table)  # None: e.g. no IPv6 in this kernel
    return [] if text is None else text.splitlines()[1:]


def tcp_sockets(port: int | None = None) -> list[TcpSocket]:
    """Return every IPv4 and IPv6 TCP socket, or only those whose local port is *port*.

    With *port*, only the rows that mention it are parsed: after a load test the tables
    can hold tens of thousands of ``TIME_WAIT`` sockets.
    """
    mark = "" if port is None else f":{port:04X} "
    found: list[TcpSocket] = []
    for table in _TCP_TABLES:
        for line in _rows(table):
            if mark in line:
                row = parse_tcp_line(line)
                if port is None or row.port == port:
                    found.append(row)
    return found


def listening_ports(pid: int) -> list[int]:
    """Return the TCP ports *pid* holds a listening socket on, sorted."""
    mine = socket_inodes(pid)
    return sorted({s.port for s in tcp_sockets() if s.state == TCP_LISTEN and s.inode in mine})


def held_connections(pid: int, port: int) -> int:
    """Return how many established TCP connections on local *port* *pid* holds an fd of."""
    mine = socket_inodes(pid)
    return sum(1 for s in tcp_sockets(port) if s.state == TCP_ESTABLISHED and s.inode in mine)


def unix_sockets() -> dict[int, str]:
    """Return the path of every AF_UNIX socket by inode (see :func:`parse_unix_line`)."""
    return dict(parse_unix_line(line) for line in _rows("/proc/net/unix"))


def inet_inodes() -> set[int]:
    """Return the inodes of every TCP, UDP and raw socket, IPv4 and IPv6."""
    return {int(line.split()[9]) for table in _INET_TABLES for line in _rows(table)}
