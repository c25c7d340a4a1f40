"""Shared helpers of the benchmarks: result rows, medians, and processes we start and kill.

Every figure is a :class:`Row`: the pycluster value, a baseline measured side by side in
the same run, their ratio, and whether the target is met. Processes are started in their
own session and killed by pid (and by process group, and every descendant found under
them), never by name.
"""

from __future__ import annotations

import contextlib
import os
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from pycluster._procfs import children, state

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
SHARED_BENCH = Path("/work/shared/bench")
PYTHON = sys.executable  # the real interpreter, not a pyenv shim (a shim adds ~50 ms)


@dataclass
class Row:
    """One figure of the final table.

    ``ratio`` is pycluster / baseline. ``met`` is ``None`` when the part was skipped.
    ``note`` says what the baseline is or what was found.
    """

    figure: str
    pycluster: float | None
    baseline: float | None
    target: str
    met: bool | None
    unit: str = ""
    note: str = ""

    @property
    def ratio(self) -> float | None:
        if self.pycluster is None or not self.baseline:
            return None
        return self.pycluster / self.baseline


def median(values: Sequence[float]) -> float:
    """The median of *values* (which must not be empty)."""
    return float(statistics.median(values))


def say(text: str) -> None:
    """Progress line on stderr, so stdout stays the result table."""
    print(text, file=sys.stderr, flush=True)


def missing(*tools: str) -> list[str]:
    """The *tools* that are not on PATH."""
    return [t for t in tools if shutil.which(t) is None]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 20.0) -> None:
    """Return once 127.0.0.1:*port* accepts a connection.

    Raises:
        RuntimeError: *proc* exited first, or *timeout* seconds passed.
    """
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        if proc.poll() is not None:
            msg = f"{proc.args!r} exited with {proc.returncode} before port {port} accepted"
            raise RuntimeError(msg)
        if time.monotonic() > deadline:
            msg = f"port {port} did not accept within {timeout} s ({proc.args!r})"
            raise RuntimeError(msg)
        time.sleep(0.02)


def start(cmd: Sequence[str], env: dict[str, str] | None = None, **kw: object
          ) -> subprocess.Popen[bytes]:
    """Start *cmd* in its own session (so its process group can be killed as a whole)."""
    full_env = dict(os.environ)
    full_env.update(env or {})
    proc: subprocess.Popen[bytes] = subprocess.Popen(
        list(cmd), env=full_env, start_new_session=True, stdin=subprocess.DEVNULL, **kw  # type: ignore[call-overload]
    )
    return proc


def descendants(pid: int) -> list[int]:
    """Every process under *pid*, depth first."""
    found: list[int] = []
    for child in children(pid):
        found.append(child)
        found.extend(descendants(child))
    return found


def kill_tree(proc: subprocess.Popen[bytes], grace: float = 2.0) -> None:
    """SIGTERM *proc*, its process group and its descendants; SIGKILL what is left.

    pycluster puts each worker in its own process group, so the descendants are looked up
    by pid before anything is signalled, and each is signalled by pid.
    """
    pids = [proc.pid, *descendants(proc.pid)]
    for sig in (signal.SIGTERM, signal.SIGKILL):
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, sig)
        for pid in pids[1:]:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(grace)
        if proc.poll() is not None and not any(state(p) not in (None, "Z") for p in pids[1:]):
            return
    proc.wait()


@contextlib.contextmanager
def running(cmd: Sequence[str], env: dict[str, str] | None = None, **kw: object
            ) -> Iterator[subprocess.Popen[bytes]]:
    """Start *cmd* (see :func:`start`) and kill its whole tree on the way out."""
    proc = start(cmd, env, **kw)
    try:
        yield proc
    finally:
        kill_tree(proc)


def busy_seconds() -> float:
    """CPU seconds the whole machine has spent busy (all cores, from ``/proc/stat``)."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def our_cpu_seconds() -> float:
    """CPU seconds used by this process and its reaped descendants (``getrusage``)."""
    total = 0.0
    for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
        usage = resource.getrusage(who)
        total += usage.ru_utime + usage.ru_stime
    return total


def parse_figures(text: str) -> dict[str, float]:
    """``name value`` lines (as the Node scripts print) into a dict."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 2:
            with contextlib.suppress(ValueError):
                out[parts[0]] = float(parts[1])
    return out


def interleave(rounds: int, runners: dict[str, Callable[[], dict[str, float]]]
               ) -> dict[str, dict[str, list[float]]]:
    """Run every runner once per round, rotating which goes first; collect values.

    Returns ``{runner: {figure: [value per round]}}``.
    """
    names = list(runners)
    got: dict[str, dict[str, list[float]]] = {n: {} for n in names}
    for r in range(rounds):
        k = r % len(names)
        order = names[k:] + names[:k]
        for name in order:
            for key, value in runners[name]().items():
                got[name].setdefault(key, []).append(value)
    return got
