"""Fail fast at boot: how ``pycluster run`` and gunicorn end when an app cannot start.

Each case starts the server with 2 workers on ``--bind 127.0.0.1:PORT`` (a port that was
free a moment ago, or one this script holds, for ``port-in-use``) and waits for the
server's main process to exit by itself, for at most ``--timeout`` seconds. Then its whole
process group and every process under it is SIGKILLed and reaped; the row says
``timeout``. The table shows, per case and server:

- ``exit``: the main process's exit code (``sig NAME`` if a signal ended it);
- ``seconds``: from starting the process until it exited (or was killed);
- ``ratio``: on pycluster rows, pycluster's seconds / gunicorn's seconds for the case
  (``>`` or ``<`` when one of them timed out: then it is a bound, not a ratio);
- ``lines``: lines of output, stdout and stderr together;
- ``left``: processes still alive when the main process had exited (this script, a
  child subreaper, kills and reaps them; ``-`` after a timeout);
- ``last line``: the last non-empty line of output, cut to 100 characters.

Cases (pycluster target / gunicorn target; modules are written to a scratch directory
that is the servers' cwd and is on their ``PYTHONPATH``):

  port-in-use          ok_app:main / ok_app:app, the port held by this script
  syntax-error         syntax_error:main / syntax_error:app
  import-error         import_error:main / import_error:app (RuntimeError at import)
  import-error-script  import_error.py / n/a (gunicorn has no script mode)
  not-callable         not_callable:NOT_CALLABLE (an int) on both
  crash-at-start       crash_app:main raises RuntimeError when called / gunicorn's
                       nearest equivalent: the app factory crash_app:create() raises,
                       which gunicorn calls in each worker while it boots
  exit-zero            exit_zero:main returns 0 at once / n/a (a WSGI app cannot exit)
  control              ok_app:main / ok_app:app: waits until the port accepts, gets one
                       answer, sends SIGTERM; seconds still count from the start (the
                       stop alone is said on stderr)

    python benchmarks/boot_failures.py [--only CASE ...] [--timeout 60] [--logs DIR]

``--logs DIR`` keeps each run's whole output as ``DIR/CASE.SERVER.log``. The servers
import whatever pycluster this interpreter imports; to measure another copy, put it on
``PYTHONPATH`` (the scratch directory is added in front of what is there).

Needs gunicorn in this interpreter (``pip install gunicorn``); without it only the
pycluster rows run. Linux only (``/proc`` and ``prctl``). Progress goes to stderr, the
table to stdout.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import http.client
import importlib.util
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from _common import descendants

from pycluster._procfs import children

HOST = "127.0.0.1"
WORKERS = 2
LAST_LINE = 100
PYTHON = sys.executable  # the real interpreter, not a pyenv shim

# The scratch modules. ok_app imports pycluster only inside main(), so gunicorn never
# loads it.
MODULES = {
    "ok_app.py": '''\
import asyncio

ANSWER = b"HTTP/1.1 200 OK\\r\\nContent-Length: 3\\r\\nConnection: close\\r\\n\\r\\nok\\n"


async def _answer(reader, writer):
    try:
        await reader.readuntil(b"\\r\\n\\r\\n")
        writer.write(ANSWER)
        await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        pass  # the script's "does the port accept yet?" probe sends nothing
    finally:
        writer.close()


async def _serve():
    import pycluster

    worker = pycluster.worker
    worker.attach_loop()
    left = asyncio.Event()
    worker.on("disconnect", left.set)
    server = await asyncio.start_server(_answer, sock=worker.listen())
    await left.wait()
    server.close()
    await server.wait_closed()
    return 0


def main():
    """pycluster: listen on --bind, serve until the worker is disconnected."""
    return asyncio.run(_serve())


def app(environ, start_response):
    """gunicorn: a plain WSGI app."""
    start_response("200 OK", [("Content-Length", "3")])
    return [b"ok\\n"]
''',
    "syntax_error.py": "def main(:\n    return 0\n\napp = main\n",
    "import_error.py": (
        'raise RuntimeError("import_error: this module fails at import")\n\n'
        "def main():\n    return 0\n\napp = main\n"
    ),
    "not_callable.py": "NOT_CALLABLE = 42\n",
    "crash_app.py": '''\
def main():
    raise RuntimeError("crash_app: this worker fails as soon as it starts")


def create():
    raise RuntimeError("crash_app: this app factory fails as soon as it is called")
''',
    "exit_zero.py": "def main():\n    return 0\n",
}


@dataclass
class Case:
    """One way to fail at boot: the APP argument for each server (``None``: n/a)."""

    name: str
    pycluster: str
    gunicorn: str | None
    hold_port: bool = False
    control: bool = False


CASES = [
    Case("port-in-use", "ok_app:main", "ok_app:app", hold_port=True),
    Case("syntax-error", "syntax_error:main", "syntax_error:app"),
    Case("import-error", "import_error:main", "import_error:app"),
    Case("import-error-script", "import_error.py", None),
    Case("not-callable", "not_callable:NOT_CALLABLE", "not_callable:NOT_CALLABLE"),
    Case("crash-at-start", "crash_app:main", "crash_app:create()"),
    Case("exit-zero", "exit_zero:main", None),
    Case("control", "ok_app:main", "ok_app:app", control=True),
]


@dataclass
class Result:
    """What one run of one server showed."""

    exit: str
    seconds: float | None
    lines: int | None
    left: str
    last: str


NOT_APPLICABLE = Result("n/a", None, None, "", "")


def say(text: str) -> None:
    """Progress line on stderr, so stdout stays the result table."""
    print(text, file=sys.stderr, flush=True)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def become_subreaper() -> bool:
    """Make this process adopt orphaned descendants (so they can be found and reaped)."""
    pr_set_child_subreaper = 36
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return bool(libc.prctl(pr_set_child_subreaper, 1, 0, 0, 0) == 0)
    except (OSError, AttributeError):
        return False


def _zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def reap_orphans(deadline: float) -> int:
    """SIGKILL and reap every child of this process; return how many were still alive.

    The servers' own main processes have been waited for by now, so every child left is
    an orphan this subreaper adopted.
    """
    alive: set[int] = set()
    while True:
        kids = children(os.getpid())
        if not kids:
            return len(alive)
        for pid in kids:
            if not _zombie(pid):
                alive.add(pid)
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, os.WNOHANG)
        if time.monotonic() > deadline:
            say(f"  could not reap {kids} within the deadline")
            return len(alive)
        time.sleep(0.02)


def kill_all(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL *proc*'s process group and every process under it, then reap them.

    pycluster puts each worker in a process group of its own, so the workers are found
    under *proc* before anything is signalled and are signalled by pid as well.
    """
    with contextlib.suppress(ProcessLookupError):
        os.kill(proc.pid, signal.SIGSTOP)  # no more forks while we look
    pids = descendants(proc.pid)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    proc.wait(10)


def command(server: str, app: str, port: int) -> list[str]:
    """The command line that runs *app* under *server* with 2 workers on *port*."""
    bind = f"{HOST}:{port}"
    if server == "pycluster":
        return [PYTHON, "-m", "pycluster", "run", app, "--workers", str(WORKERS),
                "--bind", bind]
    return [PYTHON, "-m", "gunicorn", "--workers", str(WORKERS), "--bind", bind, app]


def one_request(port: int) -> None:
    """GET / and read the whole answer."""
    conn = http.client.HTTPConnection(HOST, port, timeout=5)
    try:
        conn.request("GET", "/")
        conn.getresponse().read()
    finally:
        conn.close()


def accepts(port: int) -> bool:
    """Whether 127.0.0.1:*port* accepts a connection now."""
    try:
        with socket.create_connection((HOST, port), 0.2):
            return True
    except OSError:
        return False


def exit_text(code: int) -> str:
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"sig {signal.Signals(-code).name}"
    return str(code)


def run_one(server: str, case: Case, scratch: Path, logs: Path, timeout: float) -> Result:
    """Run *case* under *server* once; kill whatever is left; return what it showed."""
    app = case.pycluster if server == "pycluster" else case.gunicorn
    if app is None:
        return NOT_APPLICABLE
    held: socket.socket | None = None
    if case.hold_port:
        held = socket.socket()
        held.bind((HOST, 0))
        held.listen()
        port = int(held.getsockname()[1])
    else:
        port = free_port()
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(scratch), env.get("PYTHONPATH")]))
    env.pop("WEB_CONCURRENCY", None)
    log = logs / f"{case.name}.{server}.log"
    timed_out = False
    left = "-"
    try:
        with open(log, "wb") as out:
            start = time.monotonic()
            deadline = start + timeout
            proc = subprocess.Popen(
                command(server, app, port), cwd=scratch, env=env, stdin=subprocess.DEVNULL,
                stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
            )
        try:
            if case.control:
                control(proc, port, deadline)
            proc.wait(max(0.0, deadline - time.monotonic()))
            ended = time.monotonic()
        except subprocess.TimeoutExpired:
            timed_out = True
            ended = time.monotonic()
        finally:
            if proc.poll() is None:
                kill_all(proc)
            orphans = reap_orphans(time.monotonic() + 10)
        if not timed_out:
            left = str(orphans)
    finally:
        if held is not None:
            held.close()
    text = log.read_text(errors="replace")
    lines = [line.rstrip() for line in text.splitlines()]
    last = next((line.strip() for line in reversed(lines) if line.strip()), "")
    if len(last) > LAST_LINE:
        last = last[: LAST_LINE - 3] + "..."
    code = "timeout" if timed_out else exit_text(proc.returncode)
    return Result(code, ended - start, len(lines), left, last)


def control(proc: subprocess.Popen[bytes], port: int, deadline: float) -> None:
    """Wait until *port* accepts, get one answer, then SIGTERM *proc* (the normal path)."""
    while not accepts(port):
        if proc.poll() is not None:
            say("  control: the server exited before its port accepted")
            return
        if time.monotonic() > deadline:
            return  # the caller's wait times out
        time.sleep(0.05)
    one_request(port)
    stopped = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(max(0.0, deadline - time.monotonic()))
        say(f"  control: stopped {time.monotonic() - stopped:.2f} s after SIGTERM")


def ratio(mine: Result, theirs: Result) -> str:
    """pycluster's seconds / gunicorn's, as text; a bound if one timed out."""
    if mine.seconds is None or not theirs.seconds:
        return ""
    mark = {(True, False): ">", (False, True): "<"}.get(
        (mine.exit == "timeout", theirs.exit == "timeout"), ""
    )
    if mine.exit == theirs.exit == "timeout":
        return ""
    return f"{mark}{mine.seconds / theirs.seconds:.2f}x"


def table(rows: list[tuple[str, str, Result, str]]) -> str:
    """The result table as text."""
    head = ("case", "server", "exit", "seconds", "ratio", "lines", "left", "last line")
    body = []
    for case, server, res, ratio in rows:
        body.append((
            case, server, res.exit,
            "" if res.seconds is None else f"{res.seconds:.2f}",
            ratio,
            "" if res.lines is None else str(res.lines),
            res.left, res.last,
        ))
    widths = [max(len(r[i]) for r in [head, *body]) for i in range(len(head) - 1)]

    def fmt(r: tuple[str, ...]) -> str:
        pairs = enumerate(zip(r[:-1], widths, strict=True))
        cells = [c.rjust(w) if i >= 2 else c.ljust(w) for i, (c, w) in pairs]
        return "  ".join([*cells, r[-1]]).rstrip()

    return "\n".join([fmt(head), fmt(tuple("-" * len(h) for h in head)), *map(fmt, body)])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", action="append", metavar="CASE",
                        choices=[c.name for c in CASES],
                        help="run only this case (repeatable): " + ", ".join(c.name for c in CASES))
    parser.add_argument("--timeout", type=float, default=60.0, metavar="S",
                        help="seconds a run may take before it is killed (default 60)")
    parser.add_argument("--logs", type=Path, metavar="DIR",
                        help="keep each run's output in DIR/CASE.SERVER.log")
    options = parser.parse_args()
    cases = [c for c in CASES if not options.only or c.name in options.only]
    servers = ["pycluster"]
    if importlib.util.find_spec("gunicorn") is None:
        say("gunicorn is not installed in this interpreter: pycluster rows only")
    else:
        servers.append("gunicorn")
    if not become_subreaper():
        say("could not become a child subreaper: orphaned workers may go unnoticed")
    rows: list[tuple[str, str, Result, str]] = []
    with tempfile.TemporaryDirectory(prefix="boot_failures.") as tmp:
        scratch = Path(tmp)
        logs = options.logs or scratch
        logs.mkdir(parents=True, exist_ok=True)
        for name, source in MODULES.items():
            (scratch / name).write_text(source)
        for case in cases:
            results: dict[str, Result] = {}
            for server in servers:
                say(f"{case.name}: {server}")
                results[server] = run_one(server, case, scratch, logs, options.timeout)
            mine, theirs = results["pycluster"], results.get("gunicorn", NOT_APPLICABLE)
            rows.append((case.name, "pycluster", mine, ratio(mine, theirs)))
            if "gunicorn" in servers:
                rows.append((case.name, "gunicorn", theirs, ""))
    print(f"boot failures, {WORKERS} workers each, timeout {options.timeout:g} s")
    print(table(rows), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
