"""Which WSGI server ``pycluster run`` uses: the candidates, one process each, same app.

The Flask app of ``serve_apps.py`` served by one process of each candidate on 127.0.0.1,
measured with ``wrk -t1 -c64 -d5s`` after a 1 s warm-up (interleaved rounds, median);
the ratio is against gunicorn's gthread worker (the peer ``benchmarks/serve.py`` compares
with). Each candidate gets 4 request threads.

- ``waitress``: ``waitress.create_server`` (asyncore loop + thread pool);
- ``cheroot``: ``cheroot.wsgi.Server`` (CherryPy's server, a thread per connection);
- ``a2wsgi+uvicorn``: the app wrapped by ``a2wsgi.WSGIMiddleware``, served by uvicorn;
- ``gunicorn-gthread``: ``gunicorn -k gthread --threads 4 -w 1``.

    python benchmarks/wsgi_servers.py [--rounds 3]
"""

from __future__ import annotations

import argparse
import subprocess

from _common import HERE, PYTHON, free_port, interleave, median, missing, running, say, wait_port
from hello import wrk

HOST = "127.0.0.1"
RUNNERS = {
    "waitress": "from waitress import serve; import serve_apps; "
                "serve(serve_apps.flask_app, host='{host}', port={port}, threads=4)",
    "cheroot": "from cheroot.wsgi import Server; import serve_apps; "
               "Server(('{host}', {port}), serve_apps.flask_app, numthreads=4).safe_start()",
    "a2wsgi+uvicorn": "import uvicorn, serve_apps; from a2wsgi import WSGIMiddleware; "
                      "uvicorn.run(WSGIMiddleware(serve_apps.flask_app, workers=4), host='{host}', "
                      "port={port}, log_level='warning', access_log=False)",
}


def command(name: str, port: int) -> list[str]:
    if name == "gunicorn-gthread":
        return [PYTHON, "-m", "gunicorn", "-k", "gthread", "--threads", "4", "-w", "1",
                "--bind", f"{HOST}:{port}", "--no-control-socket", "serve_apps:flask_app"]
    return [PYTHON, "-c", RUNNERS[name].format(host=HOST, port=port)]


def throughput(name: str, seconds: int) -> dict[str, float]:
    port = free_port()
    with running(command(name, port), cwd=HERE, stdout=subprocess.DEVNULL,
                 stderr=subprocess.DEVNULL) as proc:
        wait_port(port, proc)
        wrk(port, 1)
        rps = wrk(port, seconds)
    say(f"  {name:18s} {rps:9.0f} req/s")
    return {"rps": rps}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=int, default=5)
    args = parser.parse_args(argv)
    if missing("wrk"):
        say("wrk is not installed; nothing to measure")
        return 2
    names = [*RUNNERS, "gunicorn-gthread"]
    got = interleave(args.rounds, {n: (lambda n=n: throughput(n, args.seconds)) for n in names})
    base = median(got["gunicorn-gthread"]["rps"])
    print(f"{'server':18s} {'req/s':>9s} {'vs gthread':>10s}")
    for name in names:
        value = median(got[name]["rps"])
        print(f"{name:18s} {value:9.0f} {value / base:9.2f}x", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
