"""The ``metrics`` plugin: ``/metrics`` merged by the master, ``/healthz``, ``/readyz``.

End-to-end tests run ``python -m pycluster run app.py --metrics 127.0.0.1:0`` and talk to
the master's metrics port; the pure merge and render functions are tested directly.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import threading
from pathlib import Path

import pytest
from helpers import DEADLINE, Proc, http_get, script, wait_until
from pycluster.plugins import metrics, metrics_worker
from pycluster.plugins.metrics import Family, merge, parse_address, render, resolve, retire

from pycluster import SettingsError, cli
from pycluster._procfs import live_children

APP = """
    import asyncio, os, pathlib, pycluster, prometheus_client as pc

    me = pycluster.worker.id
    REQ = pc.Counter("app_requests", "Requests served", ["path"])
    LAT = pc.Histogram("app_latency_seconds", "Latency", buckets=(0.1, 1.0))
    LIVE = pc.Gauge("app_live", "Workers up, summed", multiprocess_mode="livesum")
    HIGH = pc.Gauge("app_high", "Highest worker id x 10", multiprocess_mode="max")
    ID = pc.Gauge("app_worker_id", "Each worker's id")
    if os.environ.get("CLASH"):  # odd workers say counter, even ones gauge
        (pc.Counter if me % 2 else pc.Gauge)("app_clash", "Two types under one name")
    if os.environ.get("BROKEN"):  # a custom collector that raises at every scrape
        class Broken:
            def describe(self):
                return []
            def collect(self):
                raise RuntimeError("broken collector")
        pc.REGISTRY.register(Broken())
    if os.environ.get("SLOW_WORKER") == str(me):  # this worker's registry hangs once
        import time
        class Slow:
            hung = False
            def describe(self):  # else register() calls collect() at once
                return []
            def collect(self):
                if not Slow.hung:
                    Slow.hung = True
                    time.sleep(float(os.environ["SLOW_SECONDS"]))
                return []
        pc.REGISTRY.register(Slow())

    class Http(asyncio.Protocol):
        def connection_made(self, transport):
            self.transport, self.buffer = transport, b""
        def data_received(self, data):
            *requests, self.buffer = (self.buffer + data).split(b"\\r\\n\\r\\n")
            for request in requests:
                REQ.labels(request.split(b" ")[1].decode()).inc()
                LAT.observe(0.05)
                self.transport.write(b"HTTP/1.1 200 OK\\r\\nContent-Length: 3\\r\\n\\r\\nok\\n")

    async def main():
        LIVE.set(1); HIGH.set(me * 10); ID.set(me)
        pycluster.worker.attach_loop()
        stop = asyncio.Event()
        pycluster.worker.on("disconnect", stop.set)
        server = await asyncio.get_running_loop().create_server(
            Http, sock=pycluster.worker.listen())
        await stop.wait()
        server.close()
        release = os.environ.get("RELEASE")
        if release:  # drain until the test says so
            pathlib.Path(f"{release}.{me}.draining").touch()
            while not os.path.exists(release):
                await asyncio.sleep(0.02)

    asyncio.run(main())
"""


#: A master that respawns without a crash-loop limit (the kill tests kill on purpose).
KILLABLE_MASTER = """
import pycluster
master = pycluster.Master(exec="app.py", bind=["127.0.0.1:0"], kill_timeout=10)
master.use("logging").use("respawn", max_restarts=10_000, min_delay=0.01, max_delay=0.05)
master.use("metrics", address="127.0.0.1:0")
master.fork(); master.fork()
raise SystemExit(master.run())
"""


def _start(tmp_path: Path, *extra: str, env: dict[str, str] | None = None,
           workers: int = 2) -> Proc:
    script(tmp_path, APP, "app.py")
    argv = ["-m", "pycluster", "run", "app.py", "-w", str(workers), "-b", "127.0.0.1:0",
            "--metrics", "127.0.0.1:0", "--kill-timeout", "10", *extra]
    return Proc(argv, cwd=tmp_path, env=env, start_new_session=True, read_stderr=True)


def _ports(proc: Proc, workers: int = 2) -> tuple[int, int]:
    """(app port, metrics port), once *workers* workers listen."""
    line = proc.expect_err(lambda line: "serving http://" in line, "the metrics address")
    mport = int(re.search(r":(\d+)/metrics", line).group(1))  # type: ignore[union-attr]
    app = 0
    for _ in range(workers):
        line = proc.expect_err(lambda line: "listening on 127.0.0.1:" in line, "a listening")
        app = int(line.rsplit(":", 1)[1].split()[0])
    return app, mport


def _get(port: int, path: str = "/metrics", head: str = "") -> tuple[int, dict[str, str], str]:
    """GET *path* (HTTP/1.0, extra header lines *head*): (status, headers, body)."""
    with socket.create_connection(("127.0.0.1", port), timeout=DEADLINE) as sock:
        sock.sendall(f"GET {path} HTTP/1.0\r\nHost: x\r\n{head}\r\n".encode())
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    top, _, body = data.partition(b"\r\n\r\n")
    lines = top.decode().split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (x.partition(":") for x in lines[1:])}
    return int(lines[0].split()[1]), headers, body.decode()


def _value(text: str, series: str) -> float | None:
    """The value of one exact series (``name{labels}``) in exposition *text*."""
    for line in text.splitlines():
        if line.startswith(series + " "):
            return float(line.rsplit(" ", 1)[1])
    return None


# -- pure functions -----------------------------------------------------------------------


def _answer(*families: list) -> list:
    """Families as the master keeps them, from ``[name, kind, help, mode, {key: value}]``."""
    return resolve(None, {"n": 1, "families": [
        [n, k, h, m, list(samples), list(samples.values())] for n, k, h, m, samples in families]})


def test_merge_sums_counters_keeps_exited_totals_and_applies_gauge_modes():
    """Counters and histograms are summed; an exited worker's totals stay; gauges are per
    worker by default and summed / maxed / minned / newest when declared."""
    one = _answer(["c", "counter", "C", "", {'c_total{p="a"}': 2.0}],
                  ["h", "histogram", "H", "", {'h_bucket{le="+Inf"}': 1.0, "h_count": 1.0}],
                  ["g", "gauge", "G", "", {"g": 5.0}],
                  ["s", "gauge", "S", "livesum", {"s": 1.0}],
                  ["m", "gauge", "M", "max", {"m": 3.0}],
                  ["n", "gauge", "N", "min", {"n": 3.0}],
                  ["r", "gauge", "R", "mostrecent", {"r": 3.0}])
    two = _answer(["c", "counter", "C", "", {'c_total{p="a"}': 3.0, 'c_total{p="b"}': 1.0}],
                  ["h", "histogram", "H", "", {'h_bucket{le="+Inf"}': 4.0, "h_count": 4.0}],
                  ["g", "gauge", "G", "", {"g": 7.0}],
                  ["s", "gauge", "S", "livesum", {"s": 1.0}],
                  ["m", "gauge", "M", "max", {"m": 9.0}],
                  ["n", "gauge", "N", "min", {"n": 9.0}],
                  ["r", "gauge", "R", "mostrecent", {"r": 9.0}])
    merged = merge({}, [(1, one), (2, two)], lambda *a: None)
    assert merged["c"].samples == {'c_total{p="a"}': 5.0, 'c_total{p="b"}': 1.0}
    assert merged["h"].samples == {'h_bucket{le="+Inf"}': 5.0, "h_count": 5.0}
    assert merged["g"].samples == {'g{worker="1"}': 5.0, 'g{worker="2"}': 7.0}
    assert merged["s"].samples == {"s": 2.0}
    assert merged["m"].samples == {"m": 9.0}
    assert merged["n"].samples == {"n": 3.0}
    assert merged["r"].samples == {"r": 9.0}
    retired: dict[str, Family] = {}
    retire(retired, one)  # worker 1 exits: its counters stay, its gauges go
    assert set(retired) == {"c", "h"}
    after = merge(retired, [(2, two)], lambda *a: None)
    assert after["c"].samples == {'c_total{p="a"}': 5.0, 'c_total{p="b"}': 1.0}
    assert after["g"].samples == {'g{worker="2"}': 7.0}


def test_resolve_fills_in_the_keys_a_worker_left_out():
    """A family whose keys did not change since the answer the master has comes without
    them; the master fills them in, and refuses an answer it cannot complete."""
    first = resolve(None, {"n": 1, "families": [["c", "counter", "", "", ["c_total"], [1.0]]]})
    again = resolve(first, {"n": 2, "families": [["c", "counter", "", "", None, [4.0]]]})
    assert again == [["c", "counter", "", "", ["c_total"], [4.0]]]
    with pytest.raises(ValueError, match="do not match"):
        resolve(None, {"n": 2, "families": [["c", "counter", "", "", None, [4.0]]]})
    with pytest.raises(TypeError, match="not a metrics answer"):
        resolve(None, "garbage")


def test_worker_snapshot_reads_metrics_as_collect_would_and_leaves_out_known_keys():
    """The worker's fast reading of Counters, Gauges and Histograms (labelled or not,
    with escapes, set_function, large bounds) gives exactly the keys and values their
    collect() gives; a second snapshot for a master that has the first sends no keys."""
    import prometheus_client as pc

    counter = pc.Counter("t_a", "A", ["x", "y"], registry=None)
    counter.labels("1", 'q"\\').inc(3)
    plain = pc.Counter("t_b", "B", registry=None)
    plain.inc(2)
    gauge = pc.Gauge("t_g", "G", ["x"], multiprocess_mode="max", registry=None)
    gauge.labels("1").set(float("inf"))
    function = pc.Gauge("t_f", "F", registry=None)
    function.set_function(lambda: 7)
    histogram = pc.Histogram("t_h", "H", ["x"], buckets=(0.5, 1e7), registry=None)
    histogram.labels("a").observe(3)
    for metric in (counter, plain, gauge, function, histogram):
        fast = metrics_worker._fast_family(metric)
        slow = metrics_worker._families(metric.collect())[0]
        assert fast is not None and fast[:3] == slow[:3] and fast[4:] == slow[4:]
    assert metrics_worker._fast_family(gauge)[3] == "max"
    first = metrics_worker.snapshot()
    second = metrics_worker.snapshot(first["n"])
    assert second["n"] == first["n"] + 1
    assert all(family[4] is None for family in second["families"])
    assert metrics_worker.snapshot(first["n"])["families"][0][4] is not None  # not the last one


def test_render_text_and_openmetrics():
    """Text format names a counter family with ``_total`` and writes ``+Inf``/``NaN``;
    OpenMetrics names the family bare, escapes help and ends with ``# EOF``."""
    family = Family("counter", 'say "hi"\nthere')
    family.samples['c_total{a="1"}'] = 2.0
    gauge = Family("gauge", "g")
    gauge.samples["g"] = float("nan")
    gauge.samples['g{x="y"}'] = float("inf")
    text = render({"c": family, "g": gauge}, openmetrics=False)
    assert '# HELP c_total say "hi"\\nthere\n# TYPE c_total counter\nc_total{a="1"} 2.0\n' in text
    assert "g NaN\n" in text and 'g{x="y"} +Inf\n' in text
    om = render({"c": family}, openmetrics=True)
    assert om.startswith('# HELP c say \\"hi\\"\\nthere\n# TYPE c counter\n')
    assert om.endswith("# EOF\n")


@pytest.mark.parametrize(("text", "expected"), [
    ("127.0.0.1:9100", ("127.0.0.1", 9100)), (":9100", ("0.0.0.0", 9100)),
    ("[::1]:0", ("::1", 0)), ("localhost:1", ("localhost", 1)),
])
def test_parse_address(text, expected):
    """``HOST:PORT``, ``:PORT`` (every interface) and ``[IPv6]:PORT`` are accepted."""
    assert parse_address(text) == expected


@pytest.mark.parametrize("text", ["9100", "host:", "host:http", "h:70000", "::1:80", None])
def test_parse_address_refuses(text):
    """Anything else is a SettingsError that shows the value and an example."""
    with pytest.raises(SettingsError, match="expected HOST:PORT|in brackets"):
        parse_address(text)


def test_cli_refuses_a_malformed_metrics_address(tmp_path, monkeypatch, capsys):
    """`--metrics nonsense` is a usage error: exit 2, one line, no process started."""
    script(tmp_path, "import pycluster\n", "app.py")
    monkeypatch.chdir(tmp_path)
    assert cli.main(["run", "app.py", "--metrics", "nonsense"]) == 2
    err = capsys.readouterr().err
    assert "expected HOST:PORT" in err and "Traceback" not in err


# -- real clusters ------------------------------------------------------------------------


def test_metrics_merged_across_workers_and_kept_across_a_reload(tmp_path):
    """/metrics sums the workers' counters and histograms, shows gauges per worker or as
    declared, and the cluster's own series; after a rolling reload (every worker
    replaced, no scrape in between) the counters still include every request."""
    with _start(tmp_path) as proc:
        port, mport = _ports(proc)
        for _ in range(30):
            http_get(port, path="/a")
        status, headers, text = _get(mport)
        assert status == 200 and headers["content-type"].startswith("text/plain; version=0.0.4")
        assert _value(text, 'app_requests_total{path="/a"}') == 30
        assert _value(text, "app_latency_seconds_count") == 30
        assert _value(text, 'app_latency_seconds_bucket{le="0.1"}') == 30
        assert _value(text, "app_live") == 2
        assert _value(text, "app_high") == 20
        assert {_value(text, f'app_worker_id{{worker="{i}"}}') for i in (1, 2)} == {1, 2}
        assert _value(text, 'pycluster_workers{state="listening"}') == 2
        assert _value(text, 'pycluster_worker_resident_memory_bytes{worker="1"}') > 0
        assert "pycluster_master_uptime_seconds " in text
        for _ in range(10):  # counted by the old workers after the last scrape
            http_get(port, path="/b")
        os.kill(proc.pid, signal.SIGHUP)
        proc.expect_err(lambda line: "worker(s) replaced" in line, "the reload")
        text = wait_until(lambda: (t := _get(mport)[2]) and "worker=\"2\"" not in t
                          and "worker=\"1\"" not in t and t, "the old workers' exits")
        assert _value(text, 'app_requests_total{path="/a"}') == 30
        assert _value(text, 'app_requests_total{path="/b"}') == 10  # their last words
        assert _value(text, 'pycluster_reloads_total{result="ok"}') == 1
        assert _value(text, 'app_worker_id{worker="1"}') is None  # gauges of the gone go
        assert _value(text, "app_live") == 2
        os.kill(proc.pid, signal.SIGTERM)
        assert proc.wait() == 0


def test_openmetrics_healthz_readyz_and_other_paths(tmp_path):
    """An OpenMetrics Accept header gets OpenMetrics (``# EOF``); /healthz and /readyz
    answer 200; an unknown path 404; POST 405; a keep-alive client gets two answers on
    one connection."""
    with _start(tmp_path, workers=1) as proc:
        _, mport = _ports(proc, workers=1)
        status, headers, text = _get(mport, head="Accept: application/openmetrics-text\r\n")
        assert status == 200 and headers["content-type"].startswith("application/openmetrics")
        assert "# TYPE app_requests counter\n" in text and text.endswith("# EOF\n")
        assert _get(mport, "/healthz")[0] == 200
        status, _, body = _get(mport, "/readyz")
        assert status == 200 and "1 worker(s) listening" in body
        assert _get(mport, "/nope")[0] == 404
        with socket.create_connection(("127.0.0.1", mport), timeout=DEADLINE) as sock:
            sock.sendall(b"POST /metrics HTTP/1.0\r\n\r\n")
            assert sock.recv(100).startswith(b"HTTP/1.1 405")
        with socket.create_connection(("127.0.0.1", mport), timeout=DEADLINE) as sock:
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n" * 2)
            data = b""
            while data.count(b"ok\n") < 2:
                chunk = sock.recv(4096)
                assert chunk, "the server closed a keep-alive connection"
                data += chunk
            assert data.count(b"HTTP/1.1 200 OK") == 2
        os.kill(proc.pid, signal.SIGTERM)
        assert proc.wait() == 0


def test_sigterm_makes_readyz_503_at_once_then_drains_and_exits_0(tmp_path):
    """The Kubernetes sequence: SIGTERM → /readyz says 503 while the workers still drain
    (and /metrics still answers) → they finish → the master exits 0."""
    release = tmp_path / "release"
    with _start(tmp_path, env={"RELEASE": str(release)}) as proc:
        _, mport = _ports(proc)
        assert _get(mport, "/readyz")[0] == 200
        os.kill(proc.pid, signal.SIGTERM)
        wait_until(lambda: _get(mport, "/readyz")[0] == 503, "/readyz to say 503")
        wait_until(lambda: all(Path(f"{release}.{i}.draining").exists() for i in (1, 2)),
                   "both workers draining")
        assert proc.popen.poll() is None
        status, _, body = _get(mport, "/readyz")
        assert status == 503 and body == "stopping\n"
        status, _, text = _get(mport)  # a scrape while the cluster stops answers
        assert status == 200 and _value(text, 'pycluster_workers{state="disconnecting"}') == 2
        assert _get(mport, "/healthz")[0] == 200
        release.touch()
        assert proc.wait() == 0


def test_metrics_port_in_use_is_a_boot_failure(tmp_path):
    """`--metrics` on a port something else holds: exit 1 with one line naming the
    address, before any worker starts."""
    script(tmp_path, APP, "app.py")
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        argv = ["-m", "pycluster", "run", "app.py", "-w", "1", "-b", "127.0.0.1:0",
                "--metrics", f"127.0.0.1:{port}"]
        with Proc(argv, cwd=tmp_path, start_new_session=True) as proc:
            assert proc.wait() == 1
            err = proc.finish().strip().splitlines()
    assert err == [f"pycluster: error: cannot serve metrics on 127.0.0.1:{port}: "
                   "Address already in use"]


def test_type_conflict_is_reported_once_and_the_scrape_answers(tmp_path):
    """Two workers registering one name with different types: every scrape answers 200,
    the first type wins, the conflict is logged once and counted once. A collector that
    raises is left out; the worker's other metrics still come."""
    with _start(tmp_path, env={"CLASH": "1", "BROKEN": "1"}) as proc:
        app, mport = _ports(proc)
        http_get(app, path="/x")
        for _ in range(3):
            status, _, text = _get(mport)
            assert status == 200
        assert _value(text, "pycluster_metrics_conflicts_total") == 1
        assert _value(text, 'app_requests_total{path="/x"}') == 1
        assert "# TYPE app_clash_total counter" in text or "# TYPE app_clash gauge" in text
        os.kill(proc.pid, signal.SIGTERM)
        assert proc.wait() == 0
        lines = list(proc.seen_err)
        while (line := proc.err_lines.get(timeout=DEADLINE)) is not None:
            lines.append(line)
        warned = [x for x in lines if "'app_clash'" in x]
    assert len(warned) == 1 and "keeping the" in warned[0]


def test_a_worker_that_does_not_answer_leaves_a_gap_not_a_hung_scrape(tmp_path):
    """A worker whose registry hangs past the plugin's timeout: the scrape answers with
    the other worker's gauges, keeps the silent one's counters at their last values, and
    counts a missed answer."""
    master = """
        import pycluster
        master = pycluster.Master(exec="app.py", bind=["127.0.0.1:0"], kill_timeout=10)
        master.use("logging").use("metrics", address="127.0.0.1:0", timeout=0.5)
        master.fork(); master.fork()
        raise SystemExit(master.run())
    """
    script(tmp_path, APP, "app.py")
    script(tmp_path, master, "master.py")
    env = {"SLOW_WORKER": "2", "SLOW_SECONDS": "3"}
    with Proc(["master.py"], cwd=tmp_path, env=env, start_new_session=True,
              read_stderr=True) as proc:
        _, mport = _ports(proc)
        text = _get(mport)[2]
        assert _value(text, 'pycluster_metrics_missed_answers_total{reason="timeout"}') == 1
        assert _value(text, 'app_worker_id{worker="1"}') == 1
        assert _value(text, 'app_worker_id{worker="2"}') is None
        text = wait_until(lambda: (t := _get(mport)[2]) and
                          _value(t, 'app_worker_id{worker="2"}') and t, "worker 2 answering")
        os.kill(proc.pid, signal.SIGTERM)
        assert proc.wait() == 0


@pytest.mark.slow
def test_counters_never_decrease_while_workers_are_killed_during_scrapes(tmp_path):
    """10 SIGKILLs of busy workers while another thread scrapes without pause: the merged
    request counter and histogram count never go down, and every scrape answers 200."""
    busy = APP.replace("async def main():", """async def main():
        async def spin():
            while True:
                REQ.labels("/spin").inc(); LAT.observe(0.5)
                await asyncio.sleep(0.001)
        asyncio.get_running_loop().create_task(spin())""")
    script(tmp_path, busy, "app.py")
    script(tmp_path, KILLABLE_MASTER, "master.py")
    seen: list[tuple[float, float]] = []
    failures: list[str] = []
    done = threading.Event()
    with Proc(["master.py"], cwd=tmp_path, start_new_session=True, read_stderr=True) as proc:
        _, mport = _ports(proc)

        def scrape() -> None:
            while not done.is_set():
                status, _, text = _get(mport)
                if status != 200:
                    failures.append(f"status {status}")
                    continue
                seen.append((_value(text, 'app_requests_total{path="/spin"}') or 0.0,
                             _value(text, "app_latency_seconds_count") or 0.0))

        def back_to_two(kills: int) -> bool:
            text = _get(mport)[2]
            return (_value(text, 'pycluster_worker_restarts_total{reason="signal"}') == kills
                    and _value(text, 'pycluster_workers{state="listening"}') == 2)

        scraper = threading.Thread(target=scrape)
        scraper.start()
        try:
            for kill in range(10):
                os.kill(live_children(proc.pid)[kill % 2], signal.SIGKILL)
                wait_until(lambda k=kill: back_to_two(k + 1), f"replacement {kill + 1}")
        finally:
            done.set()
            scraper.join(DEADLINE)
        text = _get(mport)[2]
        assert _value(text, 'pycluster_worker_restarts_total{reason="signal"}') == 10
        os.kill(proc.pid, signal.SIGTERM)
        assert proc.wait() == 0
    assert not failures
    assert len(seen) > 10
    drops = [(a, b) for a, b in zip(seen, seen[1:], strict=False) if b[0] < a[0] or b[1] < a[1]]
    assert not drops, f"a counter went down: {drops[:3]}"
    assert seen[-1][0] > seen[0][0]


def test_plugin_refuses_bad_options():
    """A bad timeout or address is a SettingsError when the plugin is made."""
    with pytest.raises(SettingsError, match="timeout"):
        metrics.Metrics("127.0.0.1:0", timeout=0)
    with pytest.raises(SettingsError, match="HOST:PORT"):
        metrics.Metrics("127.0.0.1")
    with pytest.raises(SettingsError, match="needs an address"):
        metrics.Metrics()
