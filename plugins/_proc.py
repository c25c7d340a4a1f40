"""``/proc`` readings the built-in plugins share (a process's RSS and CPU time).

Plugins import only public ``pycluster`` names, so they keep this small reader of their own
instead of the core's private ``pycluster._procfs``.
"""

from __future__ import annotations

import os

__all__ = ["cpu_seconds", "rss_bytes"]

_HZ = os.sysconf("SC_CLK_TCK")
_PAGE = os.sysconf("SC_PAGE_SIZE")


def cpu_seconds(pid: int) -> float | None:
    """User and system CPU seconds of process *pid*, ``None`` if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            text = f.read()
        fields = text[text.rfind(b")") + 2 :].split()
        return (int(fields[11]) + int(fields[12])) / _HZ
    except (OSError, IndexError, ValueError):
        return None


def rss_bytes(pid: int | None) -> int | None:
    """Resident set size of process *pid* in bytes, ``None`` if it is gone (or no pid)."""
    if pid is None:
        return None
    try:
        with open(f"/proc/{pid}/statm", "rb") as f:
            return int(f.read().split()[1]) * _PAGE
    except (OSError, IndexError, ValueError):
        return None
