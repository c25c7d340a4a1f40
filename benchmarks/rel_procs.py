"""``/proc`` helpers of ``reliability.py``: children, states, sockets, ports, zombies."""

from __future__ import annotations

import contextlib
import os


def children(pid: int) -> list[int]:
    """Direct children of *pid* (every thread's ``children`` file)."""
    found: list[int] = []
    with contextlib.suppress(OSError):
        for tid in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError), open(f"/proc/{pid}/task/{tid}/children") as f:
                found.extend(int(p) for p in f.read().split())
    return found


def state(pid: int) -> str | None:
    """One-letter state of *pid* (``R``, ``S``, ``Z``…), ``None`` once it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return None


def cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def workers(pid: int) -> list[int]:
    """Running (non-zombie) children of server *pid*, multiprocessing's helpers excluded."""
    return [c for c in children(pid) if state(c) not in (None, "Z")
            and "resource_tracker" not in cmdline(c)]


def zombies(pid: int) -> set[int]:
    """Children of *pid* in state Z."""
    return {c for c in children(pid) if state(c) == "Z"}


def socket_inodes(pid: int) -> set[str]:
    found: set[str] = set()
    with contextlib.suppress(OSError):
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
                if link.startswith("socket:["):
                    found.add(link[8:-1])
    return found


def tcp_rows() -> list[tuple[int, str, str]]:
    """(local port, state hex, inode) of every TCP socket (IPv4 and IPv6)."""
    rows = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError), open(table) as f:
            for line in f.readlines()[1:]:
                parts = line.split()
                rows.append((int(parts[1].rsplit(":", 1)[1], 16), parts[3], parts[9]))
    return rows


def listen_port(pid: int) -> int | None:
    """The TCP port *pid* listens on (its first listening socket), if any."""
    mine = socket_inodes(pid)
    for port, st, inode in tcp_rows():
        if st == "0A" and inode in mine:
            return port
    return None


def held_connections(pid: int, port: int) -> int:
    """Established connections to *port* that *pid* holds.

    Only the lines of *port* are split: after a gunicorn run the tables hold tens of
    thousands of TIME_WAIT sockets.
    """
    mine = socket_inodes(pid)
    local = f":{port:04X} "
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError), open(table) as f:
            for line in f:
                if local in line[:60]:
                    parts = line.split()
                    if parts[1].endswith(local.strip()) and parts[3] == "01" and parts[9] in mine:
                        count += 1
    return count


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))
