"""Rolling reload under load: pycluster's examples/asyncio_server.py against
``uvicorn --workers 2``, side by side in one run.

For each server: start it on 127.0.0.1, run ``wrk -t1 -c64 -d{DUR}s`` against it and
send SIGHUP to its master every DUR/(RELOADS+1) seconds, RELOADS times; then report
wrk's requests, socket errors (connect/read/write/timeout) and non-2xx answers. The
target: 0 errors and 0 non-2xx for pycluster.

    python benchmarks/reload.py [--duration 18] [--reloads 10] [--workers 2]

Needs wrk; uvicorn is run with this interpreter (``pip install uvicorn``).
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import PYTHON, ROOT, SHARED_BENCH, Row, free_port, missing, running, say, wait_port

HOST = "127.0.0.1"


@dataclass
class Result:
    """What one trial measured."""

    name: str
    sighups: int
    reloads_done: int | None
    requests: int
    connect: int
    read: int
    write: int
    timeout: int
    non_2xx: int

    @property
    def errors(self) -> int:
        return self.connect + self.read + self.write + self.timeout

    def line(self) -> str:
        done = "" if self.reloads_done is None else f" reloads_done={self.reloads_done}"
        return (f"{self.name}: reloads={self.sighups}{done} requests={self.requests} "
                f"socket_errors: connect={self.connect} read={self.read} write={self.write} "
                f"timeout={self.timeout} non_2xx={self.non_2xx}")


def parse_wrk(text: str) -> tuple[int, dict[str, int], int]:
    """Requests, socket errors by kind and non-2xx/3xx answers from wrk's report."""
    found = re.search(r"(\d+) requests in", text)
    if found is None:
        msg = f"no request count in wrk's output:\n{text}"
        raise RuntimeError(msg)
    errors = dict.fromkeys(("connect", "read", "write", "timeout"), 0)
    socket_errors = re.search(r"Socket errors: (.*)", text)
    if socket_errors:
        for kind, count in re.findall(r"(\w+) (\d+)", socket_errors[1]):
            errors[kind] = int(count)
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    return int(found[1]), errors, int(non_2xx[1]) if non_2xx else 0


def trial(name: str, cmd: list[str], env: dict[str, str], cwd: Path, port: int,
          duration: float, reloads: int, log: Path,
          done_pattern: str | None) -> Result:
    """Serve with *cmd*, load it with wrk and SIGHUP it *reloads* times; report."""
    with log.open("wb") as out, running(cmd, env, cwd=cwd, stdout=out,
                                        stderr=subprocess.STDOUT) as server:
        wait_port(port, server)
        say(f"{name}: serving on {HOST}:{port} (pid {server.pid}); wrk for {duration:g} s")
        wrk = subprocess.Popen(
            ["wrk", "-t1", "-c64", f"-d{duration:g}s", f"http://{HOST}:{port}/"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        try:
            start = time.monotonic()
            interval = duration / (reloads + 1)
            sent = 0
            for i in range(1, reloads + 1):
                time.sleep(max(0.0, start + i * interval - time.monotonic()))
                if server.poll() is not None:
                    msg = f"{name} exited with {server.returncode} during the run; see {log}"
                    raise RuntimeError(msg)
                os.kill(server.pid, signal.SIGHUP)
                sent += 1
            report, _ = wrk.communicate(timeout=duration + 60)
        finally:
            if wrk.poll() is None:
                wrk.kill()
                wrk.wait()
        alive = server.poll() is None
    if not alive:
        msg = f"{name} was not running at the end of the load; see {log}"
        raise RuntimeError(msg)
    requests, errors, non_2xx = parse_wrk(report)
    done = None
    if done_pattern is not None:
        done = len(re.findall(done_pattern, log.read_text(errors="replace")))
    return Result(name, sent, done, requests, non_2xx=non_2xx, **errors)


def measure(reloads: int = 10, duration: float = 18.0, workers: int = 2) -> list[Row]:
    """The row for core.py: failed requests across *reloads* reloads, pycluster's
    asyncio example vs ``uvicorn --workers`` serving the shared bench's ASGI hello."""
    scratch = Path(tempfile.mkdtemp(prefix="pycluster-reload-"))
    port = free_port()
    ours = trial("pycluster", [PYTHON, str(ROOT / "examples" / "asyncio_server.py")],
                 {"PORT": str(port), "HOST": HOST, "WORKERS": str(workers)}, ROOT, port,
                 duration, reloads, scratch / "pycluster.log",
                 done_pattern=r"rolling reload finished")
    say("  " + ours.line())
    port = free_port()
    base = trial("uvicorn", [PYTHON, "-m", "uvicorn", "--workers", str(workers),
                             "--no-access-log", "--host", HOST, "--port", str(port),
                             "--app-dir", str(SHARED_BENCH), "asgi_hello:app"],
                 {}, SHARED_BENCH, port, duration, reloads, scratch / "uvicorn.log",
                 done_pattern=None)
    say("  " + base.line())
    row = Row(f"failed requests, {reloads} reloads", ours.errors + ours.non_2xx,
              base.errors + base.non_2xx, "0 for pycluster", None, "",
              f"examples/asyncio_server.py vs uvicorn --workers {workers}; requests: "
              f"pycluster {ours.requests:,}, uvicorn {base.requests:,}")
    row.met = ours.errors + ours.non_2xx == 0 and ours.requests > 0
    return [row]


def main(argv: list[str] | None = None) -> int:
    """Run both trials and print one line each, then a comparison; 0 if the target is met."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=18.0, help="seconds of wrk load")
    parser.add_argument("--reloads", type=int, default=10, help="SIGHUPs during the load")
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args(argv)
    if missing("wrk"):
        say("wrk is not installed; nothing to measure")
        return 2
    scratch = Path(tempfile.mkdtemp(prefix="pycluster-reload-"))
    results = []
    port = free_port()
    results.append(trial(
        "pycluster", [PYTHON, str(ROOT / "examples" / "asyncio_server.py")],
        {"PORT": str(port), "HOST": HOST, "WORKERS": str(args.workers)}, ROOT, port,
        args.duration, args.reloads, scratch / "pycluster.log",
        done_pattern=r"rolling reload finished",
    ))
    try:
        import uvicorn  # noqa: F401
    except ImportError:
        say("uvicorn is not installed (pip install uvicorn): no baseline")
    else:
        port = free_port()
        results.append(trial(
            "uvicorn", [PYTHON, "-m", "uvicorn", "--workers", str(args.workers),
                        "--no-access-log", "--host", HOST, "--port", str(port),
                        "--app-dir", str(SHARED_BENCH), "asgi_hello:app"],
            {}, SHARED_BENCH, port, args.duration, args.reloads, scratch / "uvicorn.log",
            done_pattern=None,
        ))
    for result in results:
        print(result.line(), flush=True)
    ours = results[0]
    met = ours.errors == 0 and ours.non_2xx == 0 and ours.requests > 0
    if len(results) > 1:
        base = results[1]
        ratio = ours.requests / base.requests if base.requests else float("nan")
        print(f"comparison: pycluster {ours.errors} errors + {ours.non_2xx} non-2xx vs uvicorn "
              f"{base.errors} errors + {base.non_2xx} non-2xx over {ours.sighups} reloads each; "
              f"requests pycluster/uvicorn = {ratio:.2f}; target (0 errors, 0 non-2xx) "
              f"{'met' if met else 'NOT met'}", flush=True)
    else:
        print(f"target (0 errors, 0 non-2xx) {'met' if met else 'NOT met'}", flush=True)
    say(f"logs in {scratch}")
    return 0 if met else 1


if __name__ == "__main__":
    raise SystemExit(main())
