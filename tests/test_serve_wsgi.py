"""``pycluster run main:app`` with a WSGI app: waitress in each worker, pycluster's drain."""

from __future__ import annotations

import signal

import pytest
from helpers import wait_until
from serve_helpers import Background, drain_keep_alive, get, port_of, start, stderr_of, stop

pytest.importorskip("waitress")
pytestmark = pytest.mark.slow

APP = """
    import pathlib, time
    HERE = pathlib.Path(__file__).parent

    def app(environ, start_response):
        path = environ["PATH_INFO"]
        if path == "/slow":
            (HERE / "slow-started").write_text("")
            while not (HERE / "release").exists():
                time.sleep(0.01)
        body = (f"wsgi {path} root={environ['SCRIPT_NAME']} "
                f"client={environ['REMOTE_ADDR']} scheme={environ['wsgi.url_scheme']}").encode()
        start_response("200 OK", [("Content-Length", str(len(body)))])
        return [body]
"""


def test_serves_and_stops_cleanly(tmp_path):
    """Two workers serve the app; SIGTERM stops the master with exit code 0."""
    with start(tmp_path, APP, workers=2) as proc:
        port = port_of(proc, workers=2)
        status, _, body = get(port, "/x")
        assert (status, body) == (200, b"wsgi /x root= client=127.0.0.1 scheme=http")
        assert stop(proc) == 0
        stderr = stderr_of(proc)
    assert "Traceback" not in stderr


def test_keep_alive_connection_gets_connection_close_then_is_closed(tmp_path):
    """On stop, a keep-alive connection is not cut: its next request is answered (200)
    with `Connection: close`, then the server closes it, and the master exits 0."""
    with start(tmp_path, APP, "--keep-alive", "30") as proc:
        port = port_of(proc)
        responses = drain_keep_alive(proc, port)
        assert all(status == 200 for status, _, _ in responses)
        assert proc.wait() == 0


def test_request_in_flight_at_sigterm_completes(tmp_path):
    """A request in flight when the master gets SIGTERM completes with 200 after the
    drain began, and the master exits 0."""
    with start(tmp_path, APP) as proc:
        port = port_of(proc)
        slow = Background(port, "/slow")
        wait_until(lambda: (tmp_path / "slow-started").exists(), "the slow request to start")
        proc.popen.send_signal(signal.SIGTERM)
        proc.expect_err(lambda x: "stopping" in x, "the stop to begin")
        (tmp_path / "release").write_text("")
        status, _, body = slow.result()
        assert (status, body) == (200, b"wsgi /slow root= client=127.0.0.1 scheme=http")
        assert proc.wait() == 0


def test_root_path_proxy_headers_and_access_log(tmp_path):
    """--root-path becomes SCRIPT_NAME; --proxy-headers with --forwarded-allow-ips trusts
    X-Forwarded-For/-Proto; --access-log logs each request."""
    options = ("--root-path", "/api", "--proxy-headers", "--forwarded-allow-ips", "*",
               "--access-log")
    with start(tmp_path, APP, *options) as proc:
        port = port_of(proc)
        status, _, body = get(port, "/y", x_forwarded_for="10.1.2.3", x_forwarded_proto="https")
        assert (status, body) == (200, b"wsgi /y root=/api client=10.1.2.3 scheme=https")
        proc.expect(lambda x: '"GET /y HTTP/1.1" 200' in x, "an access log line (stdout)")
        assert stop(proc) == 0


@pytest.mark.parametrize(
    ("options", "line"),
    [
        (("--ssl-keyfile", "key.pem", "--ssl-certfile", "cert.pem"),
         "pycluster: error: TLS (--ssl-certfile) is served for ASGI apps only"),
        (("--proxy-headers", "--forwarded-allow-ips", "10.0.0.1,10.0.0.2"),
         "pycluster: error: --forwarded-allow-ips '10.0.0.1,10.0.0.2': waitress trusts one"),
    ],
)
def test_what_waitress_cannot_do_is_refused_in_one_line(tmp_path, options, line):
    """waitress has no TLS and trusts a single proxy address: asking for either with a
    WSGI app is one line and exit 1 (a boot failure)."""
    (tmp_path / "key.pem").write_text("not read")
    (tmp_path / "cert.pem").write_text("not read")
    with start(tmp_path, APP, *options) as proc:
        assert proc.wait() == 1
        stderr = stderr_of(proc)
    assert line in stderr
    assert "Traceback" not in stderr
