"""The FastAPI example against ``uvicorn --workers``: the same app, the same worker count.

- ``pycluster``: ``pycluster run fastapi_app:app`` (uvicorn in each pycluster worker, on
  the master's shared socket, with respawn, reload and pycluster's drain);
- ``uvicorn``: ``uvicorn --workers 2 fastapi_app:app`` (uvicorn's own supervisor, serving
  the very same ``app`` object from the same file).

Two figures: requests/s under ``wrk -t1 -c64`` (interleaved rounds, medians), and the
socket errors and non-2xx answers while each master gets SIGHUP (a rolling restart in
both) several times under the same load.
"""

from __future__ import annotations

from pathlib import Path

import reload
from _common import (
    PYTHON,
    ROOT,
    Row,
    free_port,
    interleave,
    median,
    running,
    say,
    wait_port,
)
from hello import wrk

EXAMPLES = ROOT / "examples"
HOST = "127.0.0.1"


def commands(port: int, workers: int) -> dict[str, tuple[list[str], dict[str, str]]]:
    """The two servers' command lines and environments."""
    return {
        "pycluster": ([PYTHON, "-m", "pycluster", "run", "fastapi_app:app", "--workers",
                       str(workers), "--bind", f"{HOST}:{port}"], {}),
        "uvicorn": ([PYTHON, "-m", "uvicorn", "--workers", str(workers), "--no-access-log",
                     "--log-level", "warning", "--host", HOST, "--port", str(port),
                     "--app-dir", str(EXAMPLES), "fastapi_app:app"], {}),
    }


def throughput(name: str, workers: int, seconds: int) -> dict[str, float]:
    """Requests/s of one server after a 1 s warm-up."""
    port = free_port()
    cmd, env = commands(port, workers)[name]
    with running(cmd, env, cwd=EXAMPLES) as proc:
        wait_port(port, proc)
        wrk(port, 1)
        rps = wrk(port, seconds)
    say(f"  asgi {name:9s} {rps:9.0f} req/s")
    return {"rps": rps}


def measure(rounds: int, workers: int = 2, seconds: int = 5, reloads: int = 5,
            scratch: Path | None = None) -> list[Row]:
    """The rows: req/s pycluster vs uvicorn, and errors during reloads for each."""
    say(f"asgi: {rounds} rounds of wrk -t1 -c64 -d{seconds}s, {workers} workers each")
    got = interleave(rounds, {name: (lambda n=name: throughput(n, workers, seconds))
                              for name in ("pycluster", "uvicorn")})
    py, uv = median(got["pycluster"]["rps"]), median(got["uvicorn"]["rps"])
    rps = Row("ASGI example req/s", py, uv, "(no target)", None, "/s",
              "baseline: uvicorn --workers with the same app and worker count")
    errors: dict[str, reload.Result] = {}
    for name in ("pycluster", "uvicorn"):
        port = free_port()
        cmd, env = commands(port, workers)[name]
        errors[name] = reload.trial(
            f"asgi-{name}", cmd, env, EXAMPLES, port, duration=2.0 * (reloads + 1),
            reloads=reloads, log=(scratch or Path("/tmp")) / f"asgi-{name}.log",
            done_pattern=r"rolling reload finished" if name == "pycluster" else None,
        )
        say("  " + errors[name].line())
    ours, base = errors["pycluster"], errors["uvicorn"]
    failed = Row(f"ASGI failed requests, {reloads} reloads", ours.errors + ours.non_2xx,
                 base.errors + base.non_2xx, "0 for pycluster", None, "",
                 f"requests: pycluster {ours.requests:,}, uvicorn {base.requests:,}; "
                 "same app, SIGHUP to each master")
    failed.met = ours.errors + ours.non_2xx == 0
    return [rps, failed]
