"""Every figure the project claims, each against a baseline run alongside it.

    python3 benchmarks/core.py [--quick] [--only ipc,hello,asgi,reload,startcost]

1. IPC round trips/s and one-way msgs/s, pycluster vs Node cluster (``ipc.py``).
2. fork -> online / listening latency, pycluster vs Node cluster (``ipc.py``, same runs).
3. Hello-world req/s with 2 workers: pycluster vs the same server without pycluster vs
   Node cluster (``hello.py``).
4. The ASGI example (uvicorn in pycluster workers) vs ``uvicorn --workers``: req/s, and
   failed requests across reloads, with the same app (``asgi.py``).
5. Failed requests across 10 rolling reloads under wrk: ``examples/asyncio_server.py`` vs
   ``uvicorn --workers`` (``reload.py``).
6. Start cost: ``import pycluster`` in a worker, worker RSS and a 16-worker master's RSS,
   each against a bare equivalent (``startcost.py``).

The reliability figures (chaos, master deaths, crash loops, leaks) have their own script,
``reliability.py``: they take minutes, not seconds.

Progress and per-round values go to stderr; the table goes to stdout. A part whose tool
(``node``, ``wrk``) is missing is skipped with a line saying so. Exits 1 if a part failed.
"""

from __future__ import annotations

import argparse
import ast
import os
import subprocess
import sys
import time
import traceback

import asgi
import hello
import ipc
import reload
import startcost
from _common import HERE, PYTHON, ROOT, Row, busy_seconds, missing, our_cpu_seconds, say

PARTS = ("ipc", "hello", "asgi", "reload", "startcost")


def compile_package() -> None:
    """Write pycluster's .pyc files (the env sets PYTHONDONTWRITEBYTECODE), so workers
    load bytecode instead of compiling: start cost is measured as users see it."""
    subprocess.run([PYTHON, "-m", "compileall", "-q", str(ROOT / "pycluster")], check=True)


def same_app() -> bool:
    """Whether ``hello_app.py`` still has ``examples/hello.py``'s RESPONSE and Hello."""

    def parts(path: str) -> list[str]:
        tree = ast.parse((ROOT / path).read_text() if path.startswith("examples")
                         else (HERE / path).read_text())
        keep = [n for n in tree.body
                if (isinstance(n, ast.ClassDef) and n.name == "Hello")
                or (isinstance(n, ast.Assign) and ast.unparse(n.targets[0]) == "RESPONSE")]
        return [ast.dump(n) for n in keep]

    return parts("examples/hello.py") == parts("hello_app.py") != []


def fmt(value: float | None, unit: str) -> str:
    if value is None:
        return "-"
    text = f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.1f}"
    return f"{text} {unit}".strip()


def table(rows: list[Row]) -> str:
    """The result table: figure, pycluster, baseline, ratio, target, met."""
    head = ("figure", "pycluster", "baseline", "ratio", "target", "met")
    lines = [head]
    for r in rows:
        if r.met is None:
            met = "skipped" if r.pycluster is None else "-"
        else:
            met = "yes" if r.met else "NO"
        ratio = "-" if r.ratio is None else f"{r.ratio:.2f}x"
        lines.append((r.figure, fmt(r.pycluster, r.unit), fmt(r.baseline, r.unit), ratio,
                      r.target, met))
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    out = ["  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip()
           for line in lines]
    out.insert(1, "  ".join("-" * w for w in widths))
    notes = [f"  {r.figure}: {r.note}" for r in rows if r.note]
    return "\n".join([*out, "", "notes:", *notes])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds (a smoke run)")
    parser.add_argument("--only", default=",".join(PARTS),
                        help=f"comma-separated parts to run (default: {','.join(PARTS)})")
    args = parser.parse_args(argv)
    only = [p.strip() for p in args.only.split(",") if p.strip()]
    if bad := [p for p in only if p not in PARTS]:
        parser.error(f"unknown part(s) {bad!r}; choose from {PARTS}")
    q = args.quick
    rounds = {"ipc": 3 if q else 10, "hello": 1 if q else 4, "asgi": 1 if q else 3,
              "reload": 3 if q else 10, "startcost": 3 if q else 9}
    compile_package()
    rows: list[Row] = []
    extra: list[str] = []
    load: list[str] = []
    failed = False
    started = time.monotonic()
    for part in only:
        wall0, busy0, ours0 = time.monotonic(), busy_seconds(), our_cpu_seconds()
        try:
            if part == "ipc":
                if need := missing("node"):
                    print(f"SKIPPED figures 1-2 (IPC, fork latency): {need[0]} is not installed")
                    rows += [Row(f, None, None, t, None) for f, t in (
                        ("IPC round trips/s", ">= 2x Node"), ("IPC one-way msgs/s", ">= 1.3x Node"),
                        ("fork -> online", "<= Node"), ("fork -> listening", "<= Node"))]
                    continue
                rows += ipc.measure(rounds["ipc"], 20000)
            elif part == "hello":
                if need := missing("wrk", "node"):
                    print(f"SKIPPED figure 3 (hello req/s): {', '.join(need)} not installed")
                    rows += [Row("hello req/s", None, None, ">= 0.98x plain, >= 1.2x Node", None)]
                    continue
                if not same_app():
                    print("WARNING: benchmarks/hello_app.py's Hello/RESPONSE differ from "
                          "examples/hello.py; figure 3's baseline is not the same app")
                got, spread = hello.measure(rounds["hello"])
                rows += got
                for name, runs in spread.items():
                    extra.append(f"  {name}: " + "; ".join(runs))
            elif part in ("asgi", "reload"):
                if need := missing("wrk"):
                    print(f"SKIPPED {part}: {need[0]} is not installed")
                    continue
                try:
                    import uvicorn  # noqa: F401
                except ImportError:
                    print(f"SKIPPED {part}: uvicorn is not installed (pip install uvicorn)")
                    continue
                if part == "asgi":
                    rows += asgi.measure(rounds["asgi"])
                else:
                    rows += reload.measure(rounds["reload"], 2.0 * (rounds["reload"] + 1))
            else:
                compile_package()  # the package may have changed since the start
                rows += startcost.measure(rounds["startcost"])
        except Exception:
            failed = True
            traceback.print_exc()
            print(f"ERROR in part {part!r}: see the traceback on stderr")
        wall = time.monotonic() - wall0
        others = busy_seconds() - busy0 - (our_cpu_seconds() - ours0)
        load.append(f"  {part}: {wall:.0f} s; other processes used about "
                    f"{100 * others / (wall * (os.cpu_count() or 1)):.0f}% of the machine")
    say(f"done in {time.monotonic() - started:.0f} s")
    print(table(rows))
    print("machine load during each part (other sessions; a noisy machine blurs every ratio):")
    print("\n".join(load))
    if extra:
        print("hello: connections per worker (sampled mid-run) and worker CPU seconds, per round:")
        print("\n".join(extra))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
